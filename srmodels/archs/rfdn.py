"""Placeholder: being written."""
from torch import nn


class RFDN(nn.Module):
    def __init__(self, **kwargs):
        raise NotImplementedError
