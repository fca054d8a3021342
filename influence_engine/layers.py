"""Which layers are tracked, and how their weights are laid out.

A tracked layer computes ``y = W a + b`` for each token. ``nn.Linear`` (weight ``(out, in)``), GPT-2's
``Conv1D`` (weight ``(in, out)``) and one expert's projection of a fused mixture-of-experts module
(:class:`~influence_engine.experts.ExpertLinear`, a slice of a 3-D parameter) qualify natively. What the presets
mean on each family is in presets.py. Influence treats the bias as an extra input
column of ones, so a layer's gradient is an ``(out, in + bias)`` matrix ``G = sum_t g_t a_t^T``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from torch import nn

from .errors import ModelError, UserError
from .experts import ExpertLinear, expand_experts, use_eager_experts
from .presets import PRESETS, preset_layers

try:  # transformers is optional for the maths, required for HF models
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class LayerSpec:
    """Shape of one tracked layer: gradient matrices are ``(out_features, a_dim)``."""

    name: str
    kind: str  # "linear" | "conv1d" | "expert"
    in_features: int
    out_features: int
    bias: bool

    @property
    def a_dim(self) -> int:
        return self.in_features + int(self.bias)

    def to_json(self) -> dict:
        return asdict(self)


def is_trackable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, ExpertLinear)) or (bool(Conv1D) and isinstance(module, Conv1D))


def layer_spec(name: str, module: nn.Module) -> LayerSpec:
    if isinstance(module, ExpertLinear):
        return LayerSpec(name, "expert", module.in_features, module.out_features, module.bias is not None)
    if isinstance(module, nn.Linear):
        return LayerSpec(name, "linear", module.in_features, module.out_features, module.bias is not None)
    if Conv1D and isinstance(module, Conv1D):
        n_in, n_out = module.weight.shape
        return LayerSpec(name, "conv1d", int(n_in), int(n_out), module.bias is not None)
    raise TypeError(f"{name}: {type(module).__name__} is not a Linear or Conv1D layer")


def select_layers(model: nn.Module, layers: str = "mlp") -> dict[str, nn.Module]:
    """Tracked modules by name, in model order.

    ``layers`` is a preset (``mlp``, ``attention``, ``all``, ``lora``: see presets.py) or a regular expression
    searched in module names (e.g. ``h\\.[0-3]\\.mlp``). ``all`` is every Linear/Conv1D/expert layer except
    the output head and routers."""
    candidates = {n: m for n, m in model.named_modules() if n and is_trackable(m)}
    if layers in PRESETS:
        chosen = preset_layers(model, candidates, layers)
    else:
        try:
            pattern = re.compile(layers)
        except re.error as exc:
            raise UserError(f"--layers {layers!r}: not a preset ({', '.join(PRESETS)}) and not a valid "
                            f"regular expression: {exc}") from None
        chosen = {n: m for n, m in candidates.items() if pattern.search(n)}
    if not chosen:
        sample = ", ".join(list(candidates)[:6]) or "none"
        raise UserError(f"--layers {layers!r} matches no Linear/Conv1D layer of this model",
                        hint=f"layer names look like: {sample}")
    return chosen


# ------------------------------------------------------------------------------------------ the engine's use
def track_experts(model: nn.Module, layers: str, precision: str) -> dict[str, nn.Module]:
    """Select the tracked layers, expanding fused experts first so each expert can be chosen; fused modules none
    of whose experts are tracked keep transformers' own forward (eager in fp64, which ``grouped_mm`` refuses)."""
    expand_experts(model)
    tracked = select_layers(model, layers)
    ids = {id(m) for m in tracked.values()}
    for module in model.modules():
        if "expert_layers" in module.__dict__ and not any(id(m) in ids for m in module.modules()):
            module.__dict__.pop("forward", None)
    if precision == "fp64":
        try:
            use_eager_experts(model)
        except Exception as exc:  # pragma: no cover - a transformers without the eager switch
            raise ModelError(f"--precision fp64: this model's experts cannot run in float64 ({exc})",
                             hint="use --precision fp32") from None
    return tracked
