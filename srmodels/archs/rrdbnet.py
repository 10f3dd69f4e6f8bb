"""Placeholder: being written."""
from torch import nn


class RRDBNet(nn.Module):
    def __init__(self, **kwargs):
        raise NotImplementedError
