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

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import NumericalError
from .factors import Factors, per_document_gradient
from .layers import LayerSpec
from .passes import BaseAccumulator, PassContext, augment
from .queries import PreparedQueries

BatchScores = Callable[[PassContext, dict[str, torch.Tensor]], None]  # (batch, per-layer scores) at batch end

# Forming per-document gradients costs memory traffic on top of FLOPs; weigh it in the estimate. Measured on
# CPU at GPT-2-small's MLP shape (T=512, Q=r=32) the two paths cost about the same in fp32, and the factored one
# 1.5-1.8x less with bf16 operands, where the gradient path also pays a full-precision reduction against the
# dense queries; on an H200 the factored path ran the bf16 scoring pass at 0.83x a forward + backward to
# activations. At equal estimates prefer the factored path: plain large GEMMs on every device.
GRADIENT_PATH_OVERHEAD = 2.0
GRADIENT_PATH_OVERHEAD_LOW_PRECISION = 3.0
MAX_DENSE_QUERY_BYTES = 2 * 2**30


def choose_path(spec: LayerSpec, n_queries: int, rank: int | None, tokens_per_doc: float,
                low_precision: bool = False) -> str:
    """``factored`` or ``gradient`` for one layer, by estimated multiply-adds per document."""
    if rank is None:
        return "gradient"
    overhead = GRADIENT_PATH_OVERHEAD_LOW_PRECISION if low_precision else GRADIENT_PATH_OVERHEAD
    factored = tokens_per_doc * (spec.in_features + spec.out_features + 1) * n_queries * rank
    gradient = overhead * (tokens_per_doc + n_queries) * spec.out_features * spec.a_dim
    dense_bytes = n_queries * spec.out_features * spec.a_dim * 4
    return "gradient" if gradient < factored and dense_bytes <= MAX_DENSE_QUERY_BYTES else "factored"


class _QueryOperands:
    """Device-side operands for one layer: flattened ``U``/``V`` (GEMM operands, in ``gemm_dtype``) or the
    dense ``P`` split into its weight block and bias column (in ``dtype``: the reduction that produces the
    scores stays in full precision)."""

    def __init__(self, spec: LayerSpec, lq, path: str, device: torch.device, dtype: torch.dtype,
                 gemm_dtype: torch.dtype, per_token: bool):
        self.path = path
        n_in = spec.in_features
        self.V_bias = self.P_bias = self.P_dense = None
        if path == "factored":
            q, _, r = lq.U.shape
            self.rank = r
            V = lq.V.permute(1, 0, 2).reshape(spec.a_dim, q * r)
            self.V_in = V[:n_in].to(device, gemm_dtype)
            if spec.bias:
                self.V_bias = V[n_in].to(device, dtype)
            self.U = lq.U.permute(1, 0, 2).reshape(spec.out_features, q * r).to(device, gemm_dtype)
        elif per_token:
            self.P_dense = lq.dense().to(device, dtype)
        else:
            P = lq.dense()  # (Q, out, a_dim)
            self.P_in = P[:, :, :n_in].permute(1, 2, 0).contiguous().to(device, dtype)  # (out, in, Q)
            if spec.bias:
                self.P_bias = P[:, :, n_in].T.contiguous().to(device, dtype)  # (out, Q)


class ScoreAccumulator(BaseAccumulator):
    """Scores each batch against the prepared queries; keeps per-layer scores when ``per_layer``.

    Large products take ``gemm_dtype`` operands (bfloat16 in bf16 mode); products are summed over tokens and
    layers in ``dtype``. Bias columns are handled apart (``Σ_t g_t`` against the bias part of the query), so
    no ones column is ever concatenated to the activations."""

    def __init__(self, queries: PreparedQueries, device: torch.device, dtype: torch.dtype,
                 tokens_per_doc: float, per_token: bool = False, paths: dict[str, str] | None = None,
                 gemm_dtype: torch.dtype | None = None, on_batch: BatchScores | None = None):
        self.on_batch = on_batch
        self.n_queries = len(queries)
        self.per_token = per_token
        self.positional = per_token  # per-token scores need every layer's rows at their tokens' positions
        self.dtype = dtype
        self.gemm_dtype = gemm_dtype or dtype
        low = self.gemm_dtype.itemsize < dtype.itemsize
        self.paths = paths or {n: choose_path(s, self.n_queries, queries.layers[n].rank, tokens_per_doc, low)
                               for n, s in queries.specs.items()}
        self.ops = {n: _QueryOperands(s, queries.layers[n], self.paths[n], device, dtype, self.gemm_dtype, per_token)
                    for n, s in queries.specs.items()}
        self.layer_scores: dict[str, torch.Tensor] = {}  # this batch: (B, Q) or (B, T, Q) with per_token

    def begin_batch(self, ctx: PassContext) -> None:
        self.layer_scores = {}

    def forward(self, spec: LayerSpec, a: torch.Tensor, ctx: PassContext):
        op = self.ops[spec.name]
        if op.path == "factored":
            x = a.to(self.gemm_dtype)
            return ctx.zero_padding((x.flatten(0, 1) @ op.V_in).view(*x.shape[:2], -1))
        if self.per_token:
            return augment(ctx.masked(a), spec, ctx.mask)
        return ctx.masked(a, self.gemm_dtype)

    def backward(self, spec: LayerSpec, state, g: torch.Tensor, ctx: PassContext) -> None:
        op = self.ops[spec.name]
        dt = self.dtype
        B, T = g.shape[:2]
        if op.path == "factored":
            gu = ctx.masked(g, self.gemm_dtype) @ op.U  # (B, T, Q*r)
            if self.per_token:
                prod = state.to(dt) * gu.to(dt)
                if op.V_bias is not None:
                    prod += gu.to(dt) * op.V_bias
                s = prod.view(B, T, self.n_queries, op.rank).sum(-1)
            else:
                s = (state.to(dt) * gu.to(dt)).sum(1)
                if op.V_bias is not None:
                    s += gu.sum(1, dtype=dt) * op.V_bias
                s = s.view(B, self.n_queries, op.rank).sum(-1)
        elif self.per_token:
            g = ctx.masked(g)
            # (B, T, out) x (Q, out, a_dim) -> (B, T, Q, a_dim), dotted with a_t
            s = torch.einsum("bto,qoi,bti->btq", g, op.P_dense, state)
        else:
            g = ctx.masked(g, self.gemm_dtype)
            G = per_document_gradient(state, g)  # (B, out, in)
            s = self._contract(op, G, g.sum(1, dtype=dt) if op.P_bias is not None else None)
        self.layer_scores[spec.name] = s

    def gradients(self, spec: LayerSpec, G: torch.Tensor, ctx: PassContext) -> None:
        """Stored per-document gradients (B, out, a_dim), contracted as the ``gradient`` path does."""
        op = self.ops[spec.name]
        if op.path != "gradient" or self.per_token:
            raise ValueError("stored gradients are scored on the 'gradient' path, without per-token scores")
        n_in = spec.in_features
        self.layer_scores[spec.name] = self._contract(op, G[:, :, :n_in], G[:, :, n_in] if spec.bias else None)

    def _contract(self, op: _QueryOperands, G: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``<G_b, P_q>`` (B, Q) from the weight block ``G`` (B, out, in) and bias column (B, out). Summed over
        (out, in) as a batch of per-row products, then over rows: one flat GEMM here would have a K of out*in
        and an output of B x Q, which GPUs run on a handful of SMs."""
        dt = self.dtype
        s = torch.bmm(G.to(dt).transpose(0, 1), op.P_in).sum(0)
        if bias is not None:
            s += bias.to(dt) @ op.P_bias
        return s

    def end_batch(self, ctx: PassContext) -> None:
        if self.on_batch is not None:
            self.on_batch(ctx, self.layer_scores)
        self.layer_scores = {}

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
        return a  # cast and augmented in backward: nothing larger than the activation is held meanwhile

    def backward(self, spec: LayerSpec, a, g: torch.Tensor, ctx: PassContext) -> None:
        G = per_document_gradient(augment(ctx.masked(a), spec, ctx.mask), ctx.masked(g))
        self._pending[spec.name] = self.factors.self_product(spec.name, G)

    def end_batch(self, ctx: PassContext) -> None:
        total = sum(self._pending.values())
        for doc_id, v in zip(ctx.batch.ids, total.double().cpu().tolist(), strict=True):
            self.values[doc_id] = v
        self._pending = {}

    def abort_batch(self) -> None:
        self._pending = {}
