"""Which layers are tracked, and how their weights are laid out.

A tracked layer computes ``y = W a + b`` for each token. Both ``nn.Linear`` (weight ``(out, in)``) and
GPT-2's ``Conv1D`` (weight ``(in, out)``) qualify natively. Influence treats the bias as an extra input
column of ones, so a layer's gradient is an ``(out, in + bias)`` matrix ``G = sum_t g_t a_t^T``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from torch import nn

from .errors import UserError

try:  # transformers is optional for the maths, required for HF models
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]

PRESETS = {
    # Grosse et al. track the MLP layers: that is the default.
    "mlp": re.compile(r"(^|\.)(mlp|feed_forward|ffn|ff)\."),
    "attention": re.compile(r"(^|\.)(attn|attention|self_attn|self_attention)\."),
}
_OUTPUT_HEADS = re.compile(r"(^|\.)(lm_head|embed_out|output)$")


@dataclass(frozen=True)
class LayerSpec:
    """Shape of one tracked layer: gradient matrices are ``(out_features, a_dim)``."""

    name: str
    kind: str  # "linear" | "conv1d"
    in_features: int
    out_features: int
    bias: bool

    @property
    def a_dim(self) -> int:
        return self.in_features + int(self.bias)

    def to_json(self) -> dict:
        return asdict(self)


def is_trackable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def layer_spec(name: str, module: nn.Module) -> LayerSpec:
    if isinstance(module, nn.Linear):
        return LayerSpec(name, "linear", module.in_features, module.out_features, module.bias is not None)
    if Conv1D and isinstance(module, Conv1D):
        n_in, n_out = module.weight.shape
        return LayerSpec(name, "conv1d", int(n_in), int(n_out), module.bias is not None)
    raise TypeError(f"{name}: {type(module).__name__} is not a Linear or Conv1D layer")


def select_layers(model: nn.Module, layers: str = "mlp") -> dict[str, nn.Module]:
    """Tracked modules by name, in model order.

    ``layers`` is a preset (``mlp``, ``attention``, ``all``) or a regular expression searched in module
    names (e.g. ``h\\.[0-3]\\.mlp``). ``all`` is every Linear/Conv1D except the output head.
    """
    candidates = {n: m for n, m in model.named_modules() if n and is_trackable(m)}
    if layers == "all":
        chosen = {n: m for n, m in candidates.items() if not _OUTPUT_HEADS.search(n)}
    elif layers in PRESETS:
        pattern = PRESETS[layers]
        chosen = {n: m for n, m in candidates.items() if pattern.search(n)}
    else:
        try:
            pattern = re.compile(layers)
        except re.error as exc:
            raise UserError(f"--layers {layers!r}: not a preset (mlp, attention, all) and not a valid "
                            f"regular expression: {exc}") from None
        chosen = {n: m for n, m in candidates.items() if pattern.search(n)}
    if not chosen:
        sample = ", ".join(list(candidates)[:6]) or "none"
        raise UserError(f"--layers {layers!r} matches no Linear/Conv1D layer of this model",
                        hint=f"layer names look like: {sample}")
    return chosen
