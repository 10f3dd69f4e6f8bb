"""Placeholder: being written."""
from torch import nn


class DAT(nn.Module):
    def __init__(self, **kwargs):
        raise NotImplementedError
