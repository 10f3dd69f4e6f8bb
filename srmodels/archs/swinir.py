"""Placeholder: being written."""
from torch import nn


class SwinIR(nn.Module):
    def __init__(self, **kwargs):
        raise NotImplementedError
