"""srmodels.archs._layers: the fused inference path gives what the plain layers give."""
import torch
from torch import nn

from srmodels.archs._layers import linear_gelu


def test_linear_gelu_matches_plain_layers():
    torch.manual_seed(0)
    fc, act = nn.Linear(30, 60), nn.GELU()
    x = torch.randn(2, 50, 30)
    with torch.inference_mode():
        fused = linear_gelu(x, fc, act)
    torch.testing.assert_close(fused, act(fc(x)), rtol=1e-6, atol=1e-6)
    # Training keeps autograd's two-op path.
    y = linear_gelu(x.requires_grad_(), fc, act)
    assert y.grad_fn is not None and "Gelu" in type(y.grad_fn).__name__
    # tanh-approximate GELU is never handed to the exact fused kernel.
    tanh = nn.GELU(approximate="tanh")
    with torch.inference_mode():
        torch.testing.assert_close(linear_gelu(x.detach(), fc, tanh), tanh(fc(x.detach())))
