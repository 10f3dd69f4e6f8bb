"""Weights for other tools (safetensors, ONNX, the official layouts), the ensemble as an NTIRE challenge
submission, and speed against the official code.

May import: srmodels.core, srmodels.archs, srmodels.data, srmodels.models.
"""
