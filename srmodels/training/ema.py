"""The exponential moving average of the weights (``TrainConfig.ema_decay``), as an object that the training loop
calls the same way whether it is on or off.

``WeightsEma`` (decay in (0, 1)) keeps the average; validation, model selection and best.pth then use it, and
best.pth and the resume state hold it. ``NoEma`` (decay 0) keeps nothing: validation and best.pth use the trained
weights, and no metric, checkpoint key, meta field or resume-state entry mentions EMA. ``weights_ema`` picks one.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Iterator, Mapping

import torch
from torch import nn


def _cpu_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of a module's state dict."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


@contextmanager
def _holding(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """``module`` holds ``tensors`` inside the block and its own weights again afterwards, bit for bit (in-place
    copies: the optimizer's parameters stay the same objects)."""
    own = {k: v.detach().clone() for k, v in module.state_dict().items()}
    module.load_state_dict(tensors)
    try:
        yield
    finally:
        module.load_state_dict(own)


class WeightsEma:
    """Exponential moving average of a module's weights, ``ema = decay * ema + (1 - decay) * weight`` after every
    ``update``, starting equal to the module's weights.

    Floating-point parameters are averaged; every other state_dict entry (BatchNorm running statistics and
    counters, constant buffers) is copied, so the average always runs with the statistics of the weights being
    trained. ``tensors`` is a state dict of the module (same keys, device and dtypes). Under DDP every rank holds
    the same weights after each step, so every rank's average is the same.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        live = module.state_dict(keep_vars=True)
        params = {id(p) for p in module.parameters()}
        self.averaged = [k for k, v in live.items() if id(v) in params and v.is_floating_point()]
        self.copied = [k for k in live if k not in set(self.averaged)]
        self.tensors = {k: v.detach().clone() for k, v in live.items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        # The module's state_dict is read anew every time: a module may replace a buffer rather than update it.
        live = module.state_dict(keep_vars=True)
        ema = [self.tensors[k] for k in self.averaged]
        torch._foreach_mul_(ema, self.decay)
        torch._foreach_add_(ema, [live[k].detach() for k in self.averaged], alpha=1.0 - self.decay)
        for k in self.copied:
            self.tensors[k].copy_(live[k])

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Continue from a saved average (``tensors`` as ``state`` returns it)."""
        if tensors.keys() != self.tensors.keys():
            raise ValueError("the saved EMA does not have the module's keys")
        with torch.no_grad():
            for k, v in tensors.items():
                self.tensors[k].copy_(v)

    def state(self) -> dict[str, torch.Tensor]:
        """CPU copies of the averaged weights (for best.pth and the resume state)."""
        return {k: v.detach().cpu().clone() for k, v in self.tensors.items()}

    # What the training loop calls; NoEma answers the same calls.

    def applied(self, module: nn.Module) -> AbstractContextManager[None]:
        """``module`` (the one averaged) holds the average inside the block, its own weights again afterwards."""
        return _holding(module, self.tensors)

    def saved(self, module: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """The weight sets a best.pth keeps: ``weights``, the average, and ``raw``, ``module``'s own (CPU copies)."""
        return {"weights": self.state(), "raw": _cpu_copy(module)}

    def describe(self) -> dict[str, Any]:
        """What the checkpoint's meta and the metrics add: the decay."""
        return {"ema_decay": self.decay}

    def resume_entries(self) -> dict[str, Any]:
        """What the resume state adds: the average."""
        return {"ema": self.state()}

    def restore(self, resume: Mapping[str, Any]) -> None:
        """Continue from the average in a resume state."""
        self.load(resume["ema"])


class NoEma:
    """EMA off: the calls of ``WeightsEma`` that the training loop makes, doing nothing and adding nothing."""

    def update(self, module: nn.Module) -> None:
        """Nothing is averaged."""

    def applied(self, module: nn.Module) -> AbstractContextManager[None]:
        """``module`` keeps its own weights."""
        return nullcontext()

    def saved(self, module: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """The weight set a best.pth keeps: ``weights``, ``module``'s own (CPU copies)."""
        return {"weights": _cpu_copy(module)}

    def describe(self) -> dict[str, Any]:
        return {}

    def resume_entries(self) -> dict[str, Any]:
        return {}

    def restore(self, resume: Mapping[str, Any]) -> None:
        """Nothing to restore."""


Ema = WeightsEma | NoEma


def weights_ema(module: nn.Module, decay: float) -> Ema:
    """The average of ``module``'s weights with ``decay`` (``WeightsEma``), or ``NoEma`` when ``decay`` is 0."""
    return WeightsEma(module, decay) if decay else NoEma()
