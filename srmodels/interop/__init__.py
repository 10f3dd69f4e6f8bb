"""Weights for other tools (safetensors, ONNX, the official layouts) and speed against the official code.

May import: srmodels.core, srmodels.archs, srmodels.data, srmodels.models.
"""
