"""srmodels: reproducible x4 super-resolution backbones, their fusion, and the pipeline that trains and scores them.

The packages follow the data, lowest layer first; each may import only the packages ``LAYERS`` names for it
(tests/test_layers.py enforces this, lazy imports inside functions included):

- ``core``: plumbing every layer uses: errors, the CPU kernel pin, params (whose validation reads the
  architectures' table), paths, files, provenance.
- ``archs``: the architectures as plain ``nn.Module`` ports with upstream names; torch only.
- ``data``: images, MATLAB bicubic, the prepare stage's splits, datasets, the cached member outputs' format.
- ``metrics``: PSNR/SSIM and the paired statistics that compare two models on the same images.
- ``models``: an architecture with uniform I/O, checkpoints, the fusion nets, inference, CPU fast paths.
- ``training``: the one training loop and its two jobs (a backbone, the fusion net), EMA, DDP.
- ``evaluation``: fusing and scoring the scored sets, baselines and oracles, reports, seed-sweep summaries.
- ``interop``: weights for other tools (safetensors, ONNX, the official layouts) and speed against upstream.

``srmodels.tracking`` (MLflow, the only package importing it) records runs and the trained ensemble as an
MLflow model, and changes no result, so no stage depends on it; it may import ``core`` and ``models``. ``srmodels.cli`` (the ``srmodels`` command) and the stage scripts in
``stages/`` sit on top and may import any package.
"""

__version__ = "0.1.0"

# Package (or top-level module) -> the srmodels packages it may import besides itself. Importing this module loads nothing else.
LAYERS: dict[str, tuple[str, ...]] = {
    "core": ("archs",),  # params validation checks variant names against the architectures
    "archs": (),
    "data": ("core",),
    "metrics": (),
    "models": ("core", "archs", "data"),
    "training": ("core", "archs", "data", "metrics", "models"),
    "evaluation": ("core", "archs", "data", "metrics", "models"),
    "interop": ("core", "archs", "data", "models"),
    "tracking": ("core", "models"),
}
