"""Queries: gradients of the measurement, preconditioned and (optionally) compressed to low rank.

For a query, the measurement is ``f = log p(completion | prompt)``; we take gradients of the completion's
negative log-likelihood ``-f`` so that ``score(q, d) = <(H + λI)^{-1} ∇(-f), ∇L_d>``: by the influence
function, upweighting document ``d`` by ε changes ``f`` by ``ε · score``. Positive means the document
raises the completion's log-probability.

A preconditioned query gradient ``P`` of a layer (``out × a_dim``) is kept whole or as ``U V^T`` with rank
``r`` (truncated SVD, the singular values folded into ``U``). Scoring then contracts ``U`` with output
gradients and ``V`` with inputs token by token, never forming a per-document gradient.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .factors import Factors, _check_finite, _load_tensors, _save_tensors, per_document_gradient
from .layers import LayerSpec
from .passes import BaseAccumulator, PassContext, augment, masked


class GradientAccumulator(BaseAccumulator):
    """Collects each document's full gradient per layer (for queries: few documents, kept in float64)."""

    def __init__(self, specs: dict[str, LayerSpec]):
        self.specs = specs
        self.grads: dict[str, dict[str, torch.Tensor]] = {n: {} for n in specs}
        self._pending: dict[str, torch.Tensor] = {}

    def begin_batch(self, ctx: PassContext) -> None:
        self._pending = {}

    def forward(self, spec: LayerSpec, a: torch.Tensor, ctx: PassContext) -> torch.Tensor:
        return augment(masked(a, ctx.mask, ctx.dtype), spec, ctx.mask)

    def backward(self, spec: LayerSpec, a: torch.Tensor, g: torch.Tensor, ctx: PassContext) -> None:
        self._pending[spec.name] = per_document_gradient(a, masked(g, ctx.mask, ctx.dtype))

    def end_batch(self, ctx: PassContext) -> None:
        for name, grads in self._pending.items():
            for doc_id, grad in zip(ctx.batch.ids, grads.double().cpu(), strict=True):
                self.grads[name][doc_id] = grad
        self._pending = {}

    def abort_batch(self) -> None:
        self._pending = {}

    def stacked(self, ids: Sequence[str]) -> dict[str, torch.Tensor]:
        return {n: torch.stack([g[i] for i in ids]) for n, g in self.grads.items()}


@dataclass
class LayerQueries:
    """One layer's prepared queries: ``full`` (Q, out, a_dim) or ``U`` (Q, out, r) and ``V`` (Q, a_dim, r)."""

    full: torch.Tensor | None = None
    U: torch.Tensor | None = None
    V: torch.Tensor | None = None

    @property
    def rank(self) -> int | None:
        return None if self.U is None else int(self.U.shape[-1])

    def dense(self) -> torch.Tensor:
        return self.full if self.full is not None else self.U @ self.V.transpose(-1, -2)


@dataclass
class PreparedQueries:
    """Preconditioned query gradients for every tracked layer, ready to score documents against."""

    ids: list[str]
    specs: dict[str, LayerSpec]
    layers: dict[str, LayerQueries]
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.ids)

    def save(self, path: str | Path) -> None:
        tensors = {}
        for n, lq in self.layers.items():
            for key in ("full", "U", "V"):
                if getattr(lq, key) is not None:
                    tensors[f"{n}/{key}"] = getattr(lq, key)
        _save_tensors(Path(path), tensors, {"ids": self.ids, "layers": [s.to_json() for s in self.specs.values()],
                                            **self.meta})

    @classmethod
    def load(cls, path: str | Path) -> PreparedQueries:
        t, meta = _load_tensors(Path(path))
        specs = {d["name"]: LayerSpec(**d) for d in meta.pop("layers")}
        ids = meta.pop("ids")
        layers = {n: LayerQueries(t.get(f"{n}/full"), t.get(f"{n}/U"), t.get(f"{n}/V")) for n in specs}
        return cls(ids, specs, layers, meta)


def low_rank(P: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors ``U, V`` with ``U V^T ≈ P`` (batched SVD in float64)."""
    Uf, s, Vh = torch.linalg.svd(P.double(), full_matrices=False)
    return (Uf[..., :rank] * s[..., None, :rank]), Vh[..., :rank, :].transpose(-1, -2)


def precondition_queries(grads: dict[str, torch.Tensor], ids: Sequence[str], factors: Factors,
                         rank: int = 32) -> PreparedQueries:
    """Precondition stacked query gradients and compress layers larger than ``rank`` (0 keeps them exact)."""
    if rank < 0:
        raise UserError(f"--query-rank {rank}: must be 0 (exact) or a positive rank")
    layers: dict[str, LayerQueries] = {}
    for name, G in grads.items():
        P = factors.precondition(name, G.double())
        _check_finite(name, "preconditioned query gradient", P)
        if rank and rank < min(P.shape[-2:]):
            U, V = low_rank(P, rank)
            layers[name] = LayerQueries(U=U, V=V)
        else:
            layers[name] = LayerQueries(full=P)
    meta = {"strategy": factors.strategy, "rank": rank, "factors_model": factors.meta.get("model_fingerprint")}
    return PreparedQueries(list(ids), dict(factors.specs), layers, json.loads(json.dumps(meta)))
