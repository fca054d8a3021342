"""Mixture-of-experts: each expert of a fused-experts module as a layer of its own.

Transformers 5 stores a MoE block's experts as one module with 3-D parameters (``gate_up_proj`` ``(E, 2I, H)``,
``down_proj`` ``(E, H, I)``; Mixtral, Qwen2/3-MoE, OLMoE, Granite-MoE, ...) and runs them through a kernel
(``grouped_mm``) in one call, so no ``nn.Linear`` exists per expert and no hook sees an expert's inputs.
:func:`expand_experts` gives each expert's projections an :class:`ExpertLinear` view (no parameters of its own:
it reads its slice of the fused parameter) and runs the block's experts through them, one expert at a time on
the tokens routed to it, with the same arithmetic as transformers' own eager loop (activation or gate, optional
post-expert norm, routing weight applied to the expert's output, sum over the experts chosen for a token).

Each expert is then a layer like any other, with one difference: it sees only the tokens routed to it. The
pass presents its inputs and output gradients as ``(B, T', ·)`` tensors, each document's routed tokens side by side
(:func:`routed_view`), with a per-layer token mask (``PassContext.routed``), so every accumulator works unchanged
and counts (the normaliser of the activation covariance ``A``) are the expert's own routed, non-padding tokens.
Accumulators that need token positions (per-token explanations) get ``T' = T`` with rows at their positions.
The routing weight multiplies the expert's output after ``down_proj``, so it is part of ``down_proj``'s output
gradient (and, through the chain rule, ``gate_up_proj``'s): the expert's gradient is exactly the model's.

Cost: ``T'`` is the most tokens any document of the batch sent to the expert, so an expert's accumulator work
scales with its routed tokens (``≈ B·T·k/E``, more when routing is uneven), not with the whole batch. The model's
own compute is unchanged (experts run on their routed tokens only).
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# the fused parameters of a transformers experts module: (gated, ungated) up projections, then the down one
_UP = ("gate_up_proj", "up_proj")
_DOWN = "down_proj"


class ExpertLinear(nn.Module):
    """One projection of one expert of a fused-experts module, as a Linear layer ``y = W x (+ b)``.

    Holds no parameters: ``weight`` is the expert's ``(out, in)`` slice of the owner's 3-D parameter. ``routed``
    is set by the owner's forward to the flat token indices (into the batch's ``B·T`` positions) of the current
    call, so a pass can place the expert's rows back where their tokens are."""

    def __init__(self, owner: nn.Module, param: str, index: int):
        super().__init__()
        self.__dict__["_owner"] = owner  # not a submodule: the owner already holds this one
        self.param, self.index = param, index
        self.transposed = bool(getattr(owner, "is_transposed", False))
        self.routed: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        w = getattr(self._owner, self.param)[self.index]
        return w.T if self.transposed else w

    @property
    def bias(self) -> torch.Tensor | None:
        if not getattr(self._owner, "has_bias", False):
            return None
        return getattr(self._owner, f"{self.param}_bias")[self.index]

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.param}[{self.index}]: in_features={self.in_features}, out_features={self.out_features}"


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module with 3-D expert parameters (``gate_up_proj``/``up_proj`` and ``down_proj``)."""
    up = next((getattr(module, p) for p in _UP if isinstance(getattr(module, p, None), nn.Parameter)), None)
    down = getattr(module, _DOWN, None)
    return (up is not None and up.dim() == 3 and isinstance(down, nn.Parameter) and down.dim() == 3
            and hasattr(module, "num_experts"))


def _up_param(module: nn.Module) -> str:
    return "gate_up_proj" if getattr(module, "has_gate", True) and isinstance(
        getattr(module, "gate_up_proj", None), nn.Parameter) else "up_proj"


def _tracked_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager experts loop, with every expert's projections called as :class:`ExpertLinear`
    modules (every expert, even one no token was routed to: passes rely on every tracked layer's hooks firing)."""
    final = torch.zeros_like(hidden_states)
    up_name = _up_param(self)
    gated = up_name == "gate_up_proj"
    apply_gate = getattr(self, "_apply_gate", None)
    with torch.no_grad():
        hits = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)  # (E+1, k, N)
    for e, layer in enumerate(self.expert_layers):
        top_k_pos, token_idx = torch.where(hits[e])
        up, down = getattr(layer, up_name), layer.down_proj
        up.routed = down.routed = token_idx
        h = up(hidden_states[token_idx])
        if gated:
            if apply_gate is not None:
                h = apply_gate(h)
            else:
                gate, lin = h.chunk(2, dim=-1)
                h = self.act_fn(gate) * lin
        else:
            h = self.act_fn(h)
        h = down(h)
        if getattr(self, "has_post_expert_norm", False):
            h = self.post_expert_norm(h)
        h = h * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, h.to(final.dtype))
    return final


def expand_experts(model: nn.Module) -> int:
    """Give every fused-experts module of ``model`` one :class:`ExpertLinear` per expert and projection (children
    ``<experts>.<e>.gate_up_proj`` / ``.up_proj`` / ``.down_proj``; no parameters, so weights and state dict are
    unchanged) and run it through them. Idempotent; returns how many modules were expanded."""
    n = 0
    for module in list(model.modules()):
        if not is_fused_experts(module) or hasattr(module, "expert_layers"):
            continue
        up = _up_param(module)
        layers = nn.ModuleList()
        for e in range(int(module.num_experts)):
            layer = nn.Module()
            setattr(layer, up, ExpertLinear(module, up, e))
            layer.down_proj = ExpertLinear(module, _DOWN, e)
            layers.append(layer)
        # children named 0..E-1 directly under the experts module, as in the older per-expert layouts
        module.__dict__["expert_layers"] = list(layers)
        for e, layer in enumerate(layers):
            module.add_module(str(e), layer)
        module.forward = types.MethodType(_tracked_forward, module)
        n += 1
    return n


def has_fused_experts(model: nn.Module) -> bool:
    return any(is_fused_experts(m) for m in model.modules())


def use_eager_experts(model: nn.Module) -> None:
    """Run untracked fused experts with transformers' eager loop (``grouped_mm`` refuses float64)."""
    setter = getattr(model, "set_experts_implementation", None)
    if setter is not None and has_fused_experts(model):
        setter("eager")


# ------------------------------------------------------------------------------------------ the pass's view
@dataclass
class RoutedView:
    """Where an expert's rows go in the ``(B, T', ·)`` tensors the accumulators see: row ``rows[j]`` of the expert's
    input (or output gradient) at ``[b[j], t[j]]``, zeros elsewhere. ``mask`` (B, T') marks those places and
    ``n_tokens`` counts them (real, non-padding tokens routed to the expert)."""

    rows: torch.Tensor
    b: torch.Tensor
    t: torch.Tensor
    mask: torch.Tensor
    n_tokens: int

    def place(self, x: torch.Tensor) -> torch.Tensor:
        B, T = self.mask.shape
        out = x.new_zeros(B, T, x.shape[-1])
        out[self.b, self.t] = x[self.rows]
        return out


def routed_view(routed: torch.Tensor, mask: torch.Tensor, packed: bool = True) -> RoutedView:
    """The view of an expert that saw flat batch positions ``routed`` (padding positions dropped). ``packed``: each
    document's routed tokens side by side from position 0, so ``T'`` is the most any document sent to the expert
    (``≈ T k / E``) and the accumulators' GEMMs scale with the routed tokens; otherwise ``T' = T`` with every row at
    its token's position (for per-token explanations)."""
    B, T = mask.shape
    b, t = routed // T, routed % T
    rows = mask[b, t].nonzero().squeeze(1)
    b, t = b[rows], t[rows]
    at = torch.zeros(B, T, dtype=torch.bool, device=mask.device)
    at[b, t] = True
    if not packed:
        return RoutedView(rows, b, t, at, int(rows.numel()))
    counts = at.sum(1)
    width = max(1, int(counts.max())) if B else 1  # one wait for the device per expert and batch
    t = (at.cumsum(1) - 1)[b, t]
    view_mask = torch.arange(width, device=mask.device) < counts[:, None]
    return RoutedView(rows, b, t, view_mask, int(rows.numel()))


def expert_modules(model: nn.Module) -> Iterator[tuple[str, ExpertLinear]]:
    for name, m in model.named_modules():
        if isinstance(m, ExpertLinear):
            yield name, m


# ----------------------------------------------------------------------------- older per-expert Linear layouts
class GatheredRows(torch.overrides.TorchFunctionMode):
    """Where the rows of a per-expert ``nn.Linear`` came from, in older MoE layouts (transformers 4 Mixtral,
    Qwen2-MoE, OLMoE, ...): each expert is called on its tokens' rows gathered from the flattened hidden states, and
    its output is scattered back with ``final.index_add_(0, token_idx, out)``. That ``token_idx`` is the routing:
    layers that saw ``n`` gathered rows wait (:meth:`expect`) until an ``index_add`` along dimension 0 with ``n``
    indices places them. Active only during the forward pass of models whose tracked layers sit under
    ``experts.<i>.``."""

    _INDEX_ADD = {torch.Tensor.index_add_, torch.Tensor.index_add, torch.index_add}

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[tuple[int, str, object]] = []

    def expect(self, rows: int, name: str, place) -> None:
        self.pending.append((rows, name, place))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._INDEX_ADD and self.pending:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            index = args[2] if len(args) > 2 else kwargs.get("index")
            if dim == 0 and isinstance(index, torch.Tensor) and index.dim() == 1:
                n = index.numel()
                ready = [p for p in self.pending if p[0] == n]
                self.pending = [p for p in self.pending if p[0] != n]
                for _, _, place in ready:
                    place(index)
        return func(*args, **kwargs)

    def check(self) -> None:
        """Refuse a forward pass that left gathered rows unplaced (a layout this does not know)."""
        from .errors import ModelError

        if self.pending:
            rows, name, _ = self.pending[0]
            raise ModelError(f"layer {name} saw {rows} gathered rows whose tokens the engine cannot place (no "
                             f"index_add back into the hidden states)",
                             hint="track other --layers, or load the model with transformers >= 5 (fused experts)")


def gathers_rows(tracked: dict[str, nn.Module]) -> bool:
    """Whether tracked layers sit in per-expert modules of an older layout (``...experts.<i>.<layer>``)."""
    import re

    pattern = re.compile(r"(^|\.)experts\.\d+\.")
    return any(pattern.search(n) and not isinstance(m, ExpertLinear) for n, m in tracked.items())
