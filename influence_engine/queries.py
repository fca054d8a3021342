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
from .factors import Factors, per_document_gradient
from .layers import LayerSpec
from .passes import BaseAccumulator, PassContext, augment
from .statistics import check_finite, load_tensors, save_tensors
from .strategies import Strategy


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
        save_tensors(Path(path), tensors, {"ids": self.ids, "layers": [s.to_json() for s in self.specs.values()],
                                            **self.meta})

    @classmethod
    def load(cls, path: str | Path) -> PreparedQueries:
        t, meta = load_tensors(Path(path))
        specs = {d["name"]: LayerSpec(**d) for d in meta.pop("layers")}
        ids = meta.pop("ids")
        layers = {n: LayerQueries(t.get(f"{n}/full"), t.get(f"{n}/U"), t.get(f"{n}/V")) for n in specs}
        return cls(ids, specs, layers, meta)


def _orthonormal(Y: torch.Tensor, failed: list[torch.Tensor] | None = None) -> torch.Tensor:
    """An orthonormal basis of the columns of each ``Y`` (..., m, k): Cholesky QR, twice (batched GEMMs and
    small Cholesky factorisations, fast on GPUs). Whether a Gram matrix was not positive definite is appended
    to ``failed`` as a device tensor, not checked here: checking would wait for the device at every call.
    Without ``failed``, Householder QR."""
    if failed is None:
        return torch.linalg.qr(Y).Q
    for _ in range(2):
        L, info = torch.linalg.cholesky_ex(Y.mT @ Y)
        failed.append((info != 0).any())
        Y = torch.linalg.solve_triangular(L, Y.mT, upper=False).mT
    return Y


def low_rank(P: torch.Tensor, rank: int, *, oversample: int | None = None, power_iterations: int = 4,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors ``U, V`` with ``U V^T ≈ P`` (in ``P``'s dtype and on its device; singular values
    in ``U``, ``V`` orthonormal).

    Small matrices (the short side at most ``3 k``, ``k = rank + oversample``) get the exact top singular
    vectors from the eigenvectors of their (short side) Gram matrix in float64: the same answer as a full SVD
    for the leading directions, several times faster on CPUs. Larger ones a randomized SVD (Halko et al.
    2011): a seeded sketch of ``k`` directions (``oversample`` defaults to ``rank + 16``) refined by
    ``power_iterations`` subspace iterations, so the error over the best rank-``rank`` approximation shrinks
    like ``(σ_{k+1}/σ_rank)^(2q+1)``: with ``k = 2 rank + 16`` four are plenty (ten took 77% of the query
    preparation on a real model, 29 s for 8 queries on 90 layers, for top-10 lists equal to four's). All of it is
    batched GEMMs, fast on GPUs (whose dense SVDs are slow); the last, ``k x k`` step goes through a Gram
    matrix in float64 on the CPU. The sketch is shared by all queries, so each query's factors do not depend
    on how queries are batched."""
    wide = P.shape[-2] <= P.shape[-1]
    Pw = P if wide else P.mT  # (..., m, n), m <= n
    m, n = Pw.shape[-2:]
    k = min(m, rank + (rank + 16 if oversample is None else oversample))
    if m <= 3 * k:
        Q, B = None, Pw  # the short side is small: the exact top singular vectors, from its Gram matrix
    else:
        omega = torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        omega = omega.to(P.device, P.dtype)
        failed: list[torch.Tensor] | None = []
        while True:
            Y = Pw @ omega
            for _ in range(power_iterations):  # orthonormalised after every product: stable in float32 too
                Y = Pw @ _orthonormal(Pw.mT @ _orthonormal(Y, failed), failed)
            Q = _orthonormal(Y, failed)  # (..., m, k): Pw ≈ Q Q^T Pw
            if failed is None or not bool(torch.stack(failed).any()):  # one wait for the device, here
                break
            failed = None  # a rank-deficient sketch: again with Householder QR
        B = Q.mT @ Pw  # (..., k, n)
    Bd = B.double()
    _, W = torch.linalg.eigh((Bd @ Bd.mT).cpu())  # B's left singular vectors, in float64
    W = W[..., -rank:].flip(-1).to(P.device, P.dtype)
    right = B.mT @ W  # (..., n, rank): right singular vectors times singular values
    s = torch.linalg.vector_norm(right, dim=-2, keepdim=True)
    right = right / torch.where(s > 0, s, torch.ones_like(s))
    left = W if Q is None else Q @ W
    return (left * s, right) if wide else (right * s, left)


def score_weights(eigen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column weights ``w_S, w_A`` with ``w_S[i]² w_A[j]² ∝ r_i c_j ≈ Λ_ij``: the corrected eigenvalues as
    a Kronecker product of their row and column sums ``r, c`` (each floored at 1e-12 of its largest).

    With the empirical Fisher, ``Λ_ij`` is the mean square of the training documents' gradients along eigen-direction
    ``(i, j)``, so ``Σ Λ_ij E_ij²`` is the mean squared error a compression error ``E`` (in the eigenbasis) puts on
    the scores of those documents. A plain best rank-r fit of the preconditioned query spends its rank where the
    query is large, which at small damping is where ``Λ`` is small (``1 / (Λ + λ)``) and the documents' gradients
    barely reach; fitting ``w_S R w_A`` instead spends it where scores feel it."""
    e = eigen.double().clamp(min=0)
    r, c = e.sum(1), e.sum(0)
    r, c = r + 1e-12 * r.max().clamp(min=1e-300), c + 1e-12 * c.max().clamp(min=1e-300)
    return r.sqrt().to(eigen.dtype), c.sqrt().to(eigen.dtype)


def _compressed(R: torch.Tensor, rank: int, kind: Strategy, t: dict[str, torch.Tensor],
                weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> LayerQueries:
    """``P = unrotate(R)`` (``Q_S R Q_A^T``, or ``R`` itself without a basis), kept whole or at rank ``rank``,
    on ``R``'s device and in its dtype. Orthogonal rotations keep singular values, so ``P``'s best rank-r
    factors are the rotated factors of ``R``: the compression never needs ``P`` itself. With ``weights``
    (:func:`score_weights`), the rank-r fit is the best one for ``w_S R w_A`` (weighted by what the scores feel),
    unweighted after."""
    if rank and rank < min(R.shape[-2:]):
        if weights is None:
            U, V = low_rank(R, rank)
        else:
            w_s, w_a = weights
            U, V = low_rank(w_s[:, None] * R * w_a[None, :], rank)
            U, V = U / w_s[:, None], V / w_a[:, None]
        if kind.rotated:
            U, V = t["Q_S"] @ U, t["Q_A"] @ V
        return LayerQueries(U=U, V=V)
    return LayerQueries(full=kind.unrotate(t, R))


def _check_rank(rank: int) -> None:
    if rank < 0:
        raise UserError(f"--query-rank {rank}: must be 0 (exact) or a positive rank")


def _meta(factors: Factors, rank: int, weighted: bool = False) -> dict[str, Any]:
    meta = {"strategy": factors.strategy, "rank": rank, "factors_model": factors.meta.get("model_fingerprint"),
            "compression": "exact" if not rank else "score-weighted" if weighted else "plain"}
    return json.loads(json.dumps(meta))


class QueryAccumulator(BaseAccumulator):
    """Query gradients preconditioned and compressed batch by batch on the compute device, so only the
    prepared form (``U, V`` at low rank) is ever kept: memory does not grow with full per-query gradients."""

    def __init__(self, specs: dict[str, LayerSpec], factors: Factors, rank: int,
                 dtype: torch.dtype = torch.float64, keep_factors: bool = True):
        _check_rank(rank)
        self.specs = specs
        self.factors, self.rank, self.dtype = factors, rank, dtype
        self.kind = factors.kind
        self.parts: dict[str, dict[str, tuple[torch.Tensor, ...]]] = {n: {} for n in specs}
        self.keep_factors = keep_factors  # False when one batch holds every query: free each layer after use
        self._on_device: dict[str, dict[str, torch.Tensor]] = {}
        self._pending: dict[str, LayerQueries] = {}
        # EK-FAC with the empirical Fisher: its eigenvalues are the training gradients' own second moments, so the
        # rank-r fit is weighted by them (score_weights); otherwise the plain best rank-r fit
        settings = factors.settings
        self.weighted = bool(rank and self.kind.lambdas and self.kind.rotated and settings is not None
                             and settings.fisher == "empirical")
        self._weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _factor_tensors(self, name: str, device: torch.device) -> dict[str, torch.Tensor]:
        """The layer's factors on the compute device (cast there, not on the host), kept for later batches
        when there are any."""
        t = self._on_device.get(name)
        if t is None:
            t = {k: v.to(device).to(self.dtype) for k, v in self.factors.tensors[name].items()}
            if self.keep_factors:
                self._on_device[name] = t
        return t

    def begin_batch(self, ctx: PassContext) -> None:
        self._pending = {}

    def forward(self, spec: LayerSpec, a: torch.Tensor, ctx: PassContext) -> torch.Tensor:
        return a  # as the layer saw it (bf16 under autocast): cast and augmented only when its gradient comes

    def backward(self, spec: LayerSpec, a: torch.Tensor, g: torch.Tensor, ctx: PassContext) -> None:
        # prepared layer by layer as the backward pass reaches it: one layer's full gradients at a time
        g = ctx.masked(g, self.dtype)
        a = augment(ctx.masked(a, self.dtype), spec, ctx.mask)
        t = self._factor_tensors(spec.name, g.device)
        T, n_out, n_a = a.shape[1], spec.out_features, spec.a_dim
        if self.kind.rotated and T * (n_out**2 + n_a**2) < n_out * n_a * (n_out + n_a):
            # Q_S^T G Q_A = (g Q_S)^T (a Q_A): rotate the tokens, never forming G (cheaper for short queries)
            R = per_document_gradient(a @ t["Q_A"], g @ t["Q_S"])
        else:
            R = self.kind.rotate(t, per_document_gradient(a, g))
        R = self.kind.scale(t, self.factors.damping[spec.name], R)
        check_finite(spec.name, "preconditioned query gradient", R)
        weights = None
        if self.weighted:  # per layer, once (_compressed uses them only where it compresses)
            if spec.name not in self._weights:
                self._weights[spec.name] = score_weights(t[self.kind.eigen_key])
            weights = self._weights[spec.name]
        self._pending[spec.name] = _compressed(R, self.rank, self.kind, t, weights)

    def end_batch(self, ctx: PassContext) -> None:
        for name, lq in self._pending.items():
            for i, doc_id in enumerate(ctx.batch.ids):
                self.parts[name][doc_id] = (lq.full[i],) if lq.full is not None else (lq.U[i], lq.V[i])
        self._pending = {}

    def abort_batch(self) -> None:
        self._pending = {}

    def prepared(self, ids: Sequence[str]) -> PreparedQueries:
        if not ids:
            raise UserError("no queries to prepare")
        layers = {}
        for name, parts in self.parts.items():
            rows = [parts[i] for i in ids]
            if len(rows[0]) == 1:
                layers[name] = LayerQueries(full=torch.stack([r[0] for r in rows]))
            else:
                layers[name] = LayerQueries(U=torch.stack([r[0] for r in rows]), V=torch.stack([r[1] for r in rows]))
        meta = _meta(self.factors, self.rank, self.weighted)
        return PreparedQueries(list(ids), dict(self.factors.specs), layers, meta)
