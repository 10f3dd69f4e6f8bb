"""srmodels: reproducible x4 super-resolution backbones, fusion and pipeline."""

__version__ = "0.1.0"
