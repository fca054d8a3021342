"""Fused kernels for Python-level activations whose formula torch has as one kernel.

Hugging Face's ``NewGELUActivation`` (GPT-2's ``gelu_new``) and ``FastGELUActivation`` compute the tanh
approximation of GELU as six or seven elementwise operations in Python: each one a pass over the MLP's widest
activation, each of their outputs kept for the backward pass. ``torch.nn.functional.gelu(x,
approximate="tanh")`` is the same formula in one kernel with one saved input (Hugging Face's own
``gelu_pytorch_tanh``); results differ by floating-point rounding only. Every pass (covariance, eigenvalue
correction, scoring) goes through the model's activations forward and back, so this is paid on every token.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class TanhGELU(nn.Module):
    """``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` as torch's fused kernel."""

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x, approximate="tanh")


def _python_tanh_gelus() -> tuple[type, ...]:
    try:
        from transformers.activations import FastGELUActivation, NewGELUActivation
    except Exception:  # pragma: no cover - transformers without these classes
        return ()
    return (NewGELUActivation, FastGELUActivation)


def fuse_activations(model: nn.Module) -> int:
    """Replace the model's Python-level tanh-GELU modules by :class:`TanhGELU`, in place; how many were."""
    kinds = _python_tanh_gelus()
    if not kinds:
        return 0
    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) in kinds:
                setattr(module, name, TanhGELU())
                n += 1
    return n
