"""Scores: every query against every document, streamed through a top-k.

Per layer, ``score(q, d) = <P_q, G_d>`` with ``G_d = Σ_t g_t a_t^T``. Two ways to contract, chosen per
layer by a cost estimate:

* ``factored`` (low-rank queries): ``Σ_t Σ_r (g_t · U_qr)(a_t · V_qr)``: two GEMMs per layer in the hooks,
  no per-document gradient ever exists. Cost per token ``(in + out) · Q · r``.
* ``gradient``: form ``G_d`` (one batched GEMM, ``T · out · in`` per document), then one GEMM against the
  dense queries (``Q · out · in`` per document). Cheaper for long documents and many queries at high rank.

Summing per token instead of per document gives the per-token breakdown used by :func:`explain`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import NumericalError
from .factors import Factors, per_document_gradient
from .layers import LayerSpec
from .passes import BaseAccumulator, PassContext, augment, masked
from .queries import PreparedQueries

# Forming per-document gradients costs memory traffic on top of FLOPs; weigh it in the estimate.
GRADIENT_PATH_OVERHEAD = 1.5
MAX_DENSE_QUERY_BYTES = 2 * 2**30


def choose_path(spec: LayerSpec, n_queries: int, rank: int | None, tokens_per_doc: float) -> str:
    """``factored`` or ``gradient`` for one layer, by estimated multiply-adds per document."""
    if rank is None:
        return "gradient"
    factored = tokens_per_doc * (spec.in_features + spec.out_features + 1) * n_queries * rank
    gradient = GRADIENT_PATH_OVERHEAD * (tokens_per_doc + n_queries) * spec.out_features * spec.a_dim
    dense_bytes = n_queries * spec.out_features * spec.a_dim * 4
    return "gradient" if gradient < factored and dense_bytes <= MAX_DENSE_QUERY_BYTES else "factored"


class _QueryOperands:
    """Device-side operands for one layer: flattened ``U``/``V`` or the dense ``P``."""

    def __init__(self, spec: LayerSpec, lq, path: str, device: torch.device, dtype: torch.dtype):
        self.path = path
        if path == "factored":
            q, _, r = lq.U.shape
            self.rank = r
            V = lq.V.permute(1, 0, 2).reshape(spec.a_dim, q * r).to(device, dtype)
            self.V_in, self.V_bias = V[: spec.in_features], (V[spec.in_features] if spec.bias else None)
            self.U = lq.U.permute(1, 0, 2).reshape(spec.out_features, q * r).to(device, dtype)
        else:
            P = lq.dense()
            self.P = P.reshape(P.shape[0], -1).T.contiguous().to(device, dtype)  # (out*a_dim, Q)
            self.P_dense = P.to(device, dtype)


class ScoreAccumulator(BaseAccumulator):
    """Scores each batch against the prepared queries; keeps per-layer scores when ``per_layer``."""

    def __init__(self, queries: PreparedQueries, device: torch.device, dtype: torch.dtype,
                 tokens_per_doc: float, per_token: bool = False, paths: dict[str, str] | None = None):
        self.n_queries = len(queries)
        self.per_token = per_token
        self.paths = paths or {n: choose_path(s, self.n_queries, queries.layers[n].rank, tokens_per_doc)
                               for n, s in queries.specs.items()}
        self.ops = {n: _QueryOperands(s, queries.layers[n], self.paths[n], device, dtype)
                    for n, s in queries.specs.items()}
        self.layer_scores: dict[str, torch.Tensor] = {}  # this batch: (B, Q) or (B, T, Q) with per_token

    def begin_batch(self, ctx: PassContext) -> None:
        self.layer_scores = {}

    def forward(self, spec: LayerSpec, a: torch.Tensor, ctx: PassContext):
        op = self.ops[spec.name]
        a = masked(a, ctx.mask, ctx.dtype)
        if op.path == "factored":
            av = a @ op.V_in
            if op.V_bias is not None:
                av = av + ctx.mask.unsqueeze(-1).to(av.dtype) * op.V_bias
            return av
        return augment(a, spec, ctx.mask)

    def backward(self, spec: LayerSpec, state, g: torch.Tensor, ctx: PassContext) -> None:
        op = self.ops[spec.name]
        g = masked(g, ctx.mask, ctx.dtype)
        B, T = g.shape[:2]
        if op.path == "factored":
            prod = state * (g @ op.U)  # (B, T, Q*r)
            if self.per_token:
                s = prod.view(B, T, self.n_queries, op.rank).sum(-1)
            else:
                s = prod.sum(1).view(B, self.n_queries, op.rank).sum(-1)
        elif self.per_token:
            # (B, T, out) x (Q, out, a_dim) -> (B, T, Q, a_dim), dotted with a_t
            s = torch.einsum("bto,qoi,bti->btq", g, op.P_dense, state)
        else:
            s = per_document_gradient(state, g).flatten(1) @ op.P
        self.layer_scores[spec.name] = s

    def abort_batch(self) -> None:
        self.layer_scores = {}


@dataclass
class TopK:
    """Streaming top-k per query over documents, on the device; memory does not grow with N."""

    k: int
    values: torch.Tensor | None = None  # (Q, k)
    index: torch.Tensor | None = None  # (Q, k) global document index

    def push(self, scores: torch.Tensor, index: torch.Tensor) -> None:
        """``scores``: (B, Q) for documents ``index`` (B,)."""
        vals = scores.T
        idx = index.to(scores.device).unsqueeze(0).expand_as(vals)
        if self.values is not None:
            vals = torch.cat([self.values, vals], dim=1)
            idx = torch.cat([self.index, idx], dim=1)
        k = min(self.k, vals.shape[1])
        self.values, pick = vals.topk(k, dim=1)
        self.index = idx.gather(1, pick)


def check_scores(scores: torch.Tensor, layer_scores: dict[str, torch.Tensor]) -> None:
    if torch.isfinite(scores).all():
        return
    for name, s in layer_scores.items():
        if not torch.isfinite(s).all():
            raise NumericalError(f"layer {name}: scores contain NaN or Inf",
                                 hint="check the factors (damping too small?) or use --precision fp32")
    raise NumericalError("scores contain NaN or Inf")


class SelfInfluenceAccumulator(BaseAccumulator):
    """``<G_d, (H + λI)^{-1} G_d>`` per document, summed over layers."""

    def __init__(self, factors: Factors):
        self.factors = factors
        self._pending: dict[str, torch.Tensor] = {}
        self.values: dict[str, float] = {}

    def begin_batch(self, ctx: PassContext) -> None:
        self._pending = {}

    def forward(self, spec: LayerSpec, a: torch.Tensor, ctx: PassContext):
        return augment(masked(a, ctx.mask, ctx.dtype), spec, ctx.mask)

    def backward(self, spec: LayerSpec, a, g: torch.Tensor, ctx: PassContext) -> None:
        G = per_document_gradient(a, masked(g, ctx.mask, ctx.dtype))
        self._pending[spec.name] = self.factors.self_product(spec.name, G)

    def end_batch(self, ctx: PassContext) -> None:
        total = sum(self._pending.values())
        for doc_id, v in zip(ctx.batch.ids, total.double().cpu().tolist(), strict=True):
            self.values[doc_id] = v
        self._pending = {}

    def abort_batch(self) -> None:
        self._pending = {}
