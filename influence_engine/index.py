r"""A gradient index: new queries scored against a corpus without another pass over it.

For strategies that precondition by an elementwise scaling in a fixed basis (EK-FAC and K-FAC in the
eigenbasis ``Q_S, Q_A``; diagonal and identity without a basis), the influence of document ``d`` on query
``q`` splits into two halves, one per side::

    score(q, d) = Σ_layers < (Q_S^T G_q Q_A) / (Λ + λ),  Q_S^T G_d Q_A >
                = Σ_layers < W_q, W_d >,         W = (Q_S^T G Q_A) ⊙ (Λ + λ)^{-1/2}

So one pass over the corpus stores every document's ``W_d`` (the build: the cost of one eigenvalue-correction
pass, since the scaling is elementwise and each document's rotated gradient is formed anyway), and a query is
then one more ``W_q`` and an inner product: top-k search by blocked matrix products (exact) or a FAISS
inner-product index (approximate).

To keep the index small, ``W`` is sketched on both sides by a seeded Kronecker random projection
``S_out W S_in^T`` (``S_out``: ``k_out × out``, ``S_in``: ``k_in × a_dim``, Gaussian entries of variance
``1/k``). Since ``E[S^T S] = I`` on each side and the two are independent, the sketched inner product is an
unbiased estimate of the exact one; a side whose ``k`` is not below its dimension is left unsketched. With the
sketch off the index scores are the exact EK-FAC scores (with full-rank queries).

Vectors are stored as memory-mapped ``.npy`` parts (one per shard), rows in document order, with their ids.
Only the strategies in :data:`INDEX_STRATEGIES` are supported: the index needs the preconditioner to factor
into two equal halves, which an elementwise scaling in a fixed orthonormal basis does.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_path, write_json_atomic
from .cache import GradientCache, TokenCache
from .data import Example
from .errors import FactorMismatchError, UserError
from .factors import Factors, per_document_gradient
from .layers import LayerSpec
from .passes import BaseAccumulator, PassContext, Progress, augment
from .scoring import TopK
from .statistics import load_tensors, save_tensors
from .strategies import Strategy

FORMAT_VERSION = 1
INDEX_STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")
STORE_DTYPES = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64}

Rows = Callable[[list[str], torch.Tensor], None]  # (document ids, their index vectors (B, width)) per batch


def check_strategy(name: str) -> Strategy:
    """The strategy ``name`` if the index supports it; a one-line error otherwise."""
    from .strategies import get_strategy

    kind = get_strategy(name)
    if kind.name not in INDEX_STRATEGIES:
        raise UserError(f"strategy {name!r}: the gradient index supports {', '.join(INDEX_STRATEGIES)} only "
                        f"(it needs an elementwise scaling in a fixed basis)", hint="score by a pass instead")
    return kind


def store_dtype(precision: str, choice: str = "auto") -> str:
    """The stored dtype: ``fp64`` for fp64 passes, else ``fp16``, unless ``choice`` names one."""
    if choice == "auto":
        return "fp64" if precision == "fp64" else "fp16"
    if choice not in STORE_DTYPES:
        raise UserError(f"--index-dtype {choice!r}: choose auto, {', '.join(STORE_DTYPES)}")
    return choice


# ------------------------------------------------------------------------------------------------- sketch
SKETCH_KINDS = ("random", "eigen", "pca", "top", "lowrank")


def parse_sketch_spec(text: str | None) -> tuple[str, tuple[int, int]] | None:
    """``"16x16"`` -> ("random", (16, 16)); ``"eigen:32x32"`` / ``"eigen:32"`` -> ("eigen", (32, 32));
    ``"pca:24x24"`` likewise; ``"top:4096"`` -> ("top", (4096, 0)) (coordinates kept over all layers);
    ``off``/``none``/empty -> None (no sketch: exact scores)."""
    if text is None or str(text).strip().lower() in ("", "off", "none", "0"):
        return None
    m = re.fullmatch(r"\s*top\s*:\s*(\d+)\s*", str(text), re.IGNORECASE)
    if m and int(m.group(1)) >= 1:
        return "top", (int(m.group(1)), 0)
    m = re.fullmatch(r"\s*lowrank\s*:\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", str(text), re.IGNORECASE)
    if m and int(m.group(1)) >= 1 and 1 <= int(m.group(2) or m.group(1)) <= int(m.group(1)):
        return "lowrank", (int(m.group(1)), int(m.group(2) or m.group(1)))
    m = re.fullmatch(r"\s*(?:(random|eigen|pca)\s*:\s*)?(\d+)\s*(?:[xX]\s*(\d+))?\s*", str(text), re.IGNORECASE)
    if not m or (m.group(1) is None and m.group(3) is None) or int(m.group(2)) < 1 or (
            m.group(3) is not None and int(m.group(3)) < 1):
        raise UserError(f"--sketch {text!r}: give top:M (the M eigen-coordinates of largest expected score energy), "
                        f"OUTxIN such as 16x16 (a random Kronecker sketch), eigen:OUTxIN or pca:OUTxIN (leading "
                        f"directions per layer side), or off")
    k_out = int(m.group(2))
    return (m.group(1) or "random").lower(), (k_out, int(m.group(3) or k_out))


def parse_sketch(text: str | None) -> tuple[int, int] | None:
    """The per-layer size ``(OUT, IN)`` of any sketch (None: off)."""
    spec = parse_sketch_spec(text)
    return None if spec is None else spec[1]


def sketch_name(kind: str, size: tuple[int, int] | None) -> str:
    if size is None:
        return "off"
    if kind == "top":
        return f"top:{size[0]}"
    if kind == "lowrank":
        return f"lowrank:{size[0]}" + ("" if size[1] == size[0] else f"x{size[1]}")
    return f"{size[0]}x{size[1]}" if kind == "random" else f"{kind}:{size[0]}x{size[1]}"


def _layer_seed(seed: int, name: str, side: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{name}/{side}".encode())) % (2**63)


def _leading(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of the identity picking the ``k`` largest ``scores`` (ties by index), in index order: a selection of
    eigendirections, orthonormal."""
    order = torch.argsort(-scores.double(), stable=True)[:k].sort().values
    return torch.eye(len(scores), dtype=torch.float64)[order]


@dataclass
class Sketch:
    """Per layer, the two projections (``None`` on a side left whole), float64, applied to the whitened rotated
    gradient ``W`` (``out × a_dim``) as ``S_out W S_in^T``.

    ``random``: Gaussian entries of variance ``1/k`` made from the seed alone (an unbiased estimate of the score).
    ``eigen``: the ``k`` leading eigendirections of each side (rows of the identity in the EK-FAC eigenbasis,
    ranked by the eigenvalue matrix's row / column sums: the gradient-covariance and activation-covariance
    spectra, eigenvalue-corrected). ``pca``: the ``k`` leading eigenvectors of the whitened gradients' own
    covariances ``Σ_d W_d W_d^T`` and ``Σ_d W_d^T W_d`` over a sample of documents. Both data-aware kinds have
    orthonormal rows, so the sketched score is ``<P W_q, P W_d>`` for an orthogonal projection ``P`` and
    ``|exact - sketched| ≤ ‖(I-P) W_q‖ ‖(I-P) W_d‖`` (Cauchy-Schwarz on the part outside the sketch)."""

    size: tuple[int, int] | None
    seed: int
    out: dict[str, torch.Tensor | None]
    inp: dict[str, torch.Tensor | None]
    kind: str = "random"
    keep: dict[str, torch.Tensor] | None = None  # top: per layer, the flat eigen-coordinates kept (sorted)

    @property
    def orthonormal(self) -> bool:
        """Whether the projection is orthogonal (no sketch, eigen, pca, top): the residual bound holds."""
        return self.size is None or self.kind in ("eigen", "pca", "top")

    @property
    def name(self) -> str:
        return sketch_name(self.kind, self.size)

    @classmethod
    def make(cls, specs: dict[str, LayerSpec], size: tuple[int, int] | None, seed: int = 0, *, kind: str = "random",
             factors: Factors | None = None, covariances: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
             energy: dict[str, torch.Tensor] | None = None) -> Sketch:
        """``random`` needs only the seed; ``eigen`` the factors (their eigenvalues); ``pca`` the whitened
        gradients' side covariances (:func:`whitened_covariances`); ``top`` each coordinate's expected score
        energy (:func:`score_energy`)."""
        if kind not in SKETCH_KINDS:
            raise UserError(f"sketch kind {kind!r}: choose {', '.join(SKETCH_KINDS)}")
        if kind == "lowrank" and size is not None:
            return cls(size, seed, dict.fromkeys(specs), dict.fromkeys(specs), kind)
        if kind == "top" and size is not None:
            if energy is None:
                raise ValueError("a top sketch needs the coordinates' score energy")
            names = list(specs)
            flat = torch.cat([energy[n].double().flatten() for n in names])
            chosen = torch.argsort(-flat, stable=True)[:size[0]].sort().values
            keep, at = {}, 0
            for n in names:
                w = specs[n].out_features * specs[n].a_dim
                keep[n] = chosen[(chosen >= at) & (chosen < at + w)] - at
                at += w
            return cls(size, seed, dict.fromkeys(names), dict.fromkeys(names), kind, keep)
        out: dict[str, torch.Tensor | None] = {}
        inp: dict[str, torch.Tensor | None] = {}
        for name, s in specs.items():
            for j, (side, dim, store) in enumerate((("out", s.out_features, out), ("in", s.a_dim, inp))):
                k = size[j] if size else 0
                if not size or (k >= dim and kind == "random"):
                    store[name] = None
                    continue
                k = min(k, dim)  # a data-aware side at full rank is a rotation: kept (the exactness tests use it)
                if kind == "random":
                    g = torch.Generator().manual_seed(_layer_seed(seed, name, side))
                    store[name] = torch.randn(k, dim, generator=g, dtype=torch.float64) / k ** 0.5
                elif kind == "eigen":
                    if factors is None:
                        raise ValueError("an eigen sketch needs the factors")
                    kf = check_strategy(factors.strategy)
                    if kf.eigen_key is None:
                        raise UserError(f"--sketch eigen: strategy {factors.strategy} has no eigenvalues",
                                        hint="use a random sketch (OUTxIN)")
                    eig = factors.tensors[name][kf.eigen_key].double()
                    store[name] = _leading(eig.sum(dim=1 - j), k)
                else:
                    if covariances is None:
                        raise ValueError("a pca sketch needs the whitened gradients' covariances")
                    vals, vecs = torch.linalg.eigh(covariances[name][j].double())
                    store[name] = vecs[:, torch.argsort(-vals, stable=True)[:k]].T.contiguous()
        return cls(size, seed, out, inp, kind)

    def shape(self, spec: LayerSpec) -> tuple[int, int]:
        """The stored block's shape for this layer."""
        if self.keep is not None:
            return 1, len(self.keep[spec.name])
        if self.kind == "lowrank" and self.size is not None:
            return self.size[0], spec.out_features + spec.a_dim
        o, i = self.out[spec.name], self.inp[spec.name]
        return (spec.out_features if o is None else o.shape[0], spec.a_dim if i is None else i.shape[0])


# ------------------------------------------------------------------------------------------- accumulator
class IndexAccumulator(BaseAccumulator):
    """Per document, ``S_out [(Q_S^T G_d Q_A) ⊙ (Λ + λ)^{-1/2}] S_in^T`` for every tracked layer, flattened and
    concatenated in layer order (``(B, width)``), handed to ``on_batch`` at batch end.

    As in the eigenvalue correction, tokens are rotated before the per-document product
    (``Q_S^T G Q_A = Σ_t (Q_S^T g_t)(Q_A^T a_t)^T``; the bias folds into one multiply-add); stored gradients
    (:meth:`gradients`, a replay) are rotated whole."""

    def __init__(self, specs: dict[str, LayerSpec], factors: Factors, sketch: Sketch, device: torch.device,
                 dtype: torch.dtype, on_batch: Rows, gemm_dtype: torch.dtype | None = None,
                 probes: dict[str, torch.Tensor] | None = None):
        self.specs, self.kind, self.on_batch = specs, check_strategy(factors.strategy), on_batch
        # per layer, the probes' unsketched vectors (P, out, a_dim): their exact scores are summed alongside
        self.probes = None if probes is None else {n: t.to(device, dtype) for n, t in probes.items()}
        self._norms: torch.Tensor | None = None
        self._probe: torch.Tensor | None = None
        self.dtype, self.gemm_dtype = dtype, gemm_dtype or dtype
        self.ops: dict[str, dict[str, torch.Tensor | None]] = {}
        for n, s in specs.items():
            t = factors.layer_tensors(n, device, torch.float64)
            op: dict[str, torch.Tensor | None] = {"Q_A": None, "Q_S": None, "w_bias": None, "whiten": None}
            if self.kind.rotated:
                Q_A = t["Q_A"].to(self.gemm_dtype)
                op["Q_A"], op["w_bias"] = Q_A[:s.in_features], Q_A[s.in_features] if s.bias else None
                op["Q_S"] = t["Q_S"].to(self.gemm_dtype)
            if self.kind.eigen_key is not None:
                op["whiten"] = (t[self.kind.eigen_key] + factors.damping[n]).rsqrt().to(dtype)
            op["S_out"] = None if sketch.out[n] is None else sketch.out[n].to(device, dtype)
            op["S_in"] = None if sketch.inp[n] is None else sketch.inp[n].to(device, dtype)
            op["keep"] = None if sketch.keep is None else sketch.keep[n].to(device)
            op["rank"] = sketch.size[0] if sketch.kind == "lowrank" and sketch.size is not None else None
            self.ops[n] = op
        self._pending: dict[str, torch.Tensor] = {}

    def begin_batch(self, ctx: PassContext) -> None:
        self._pending, self._norms, self._probe = {}, None, None

    def forward(self, spec: LayerSpec, a: torch.Tensor, ctx: PassContext) -> torch.Tensor:
        op = self.ops[spec.name]
        x = a.to(self.gemm_dtype)
        if op["Q_A"] is None:
            return augment(ctx.masked(x, self.gemm_dtype), spec, ctx.mask)
        flat = x.flatten(0, 1)
        rot = torch.addmm(op["w_bias"], flat, op["Q_A"]) if op["w_bias"] is not None else flat @ op["Q_A"]
        return ctx.zero_padding(rot.view(*x.shape[:2], -1))

    def backward(self, spec: LayerSpec, a: torch.Tensor, g: torch.Tensor, ctx: PassContext) -> None:
        g = ctx.masked(g, self.gemm_dtype)
        Q_S = self.ops[spec.name]["Q_S"]
        if Q_S is not None:
            g = g @ Q_S
        self._pending[spec.name] = self._finish(spec, per_document_gradient(a, g))

    def gradients(self, spec: LayerSpec, G: torch.Tensor, ctx: PassContext) -> None:
        """Stored per-document gradients (B, out, a_dim): rotated here, then as in a pass."""
        op = self.ops[spec.name]
        G = G.to(self.gemm_dtype)
        if op["Q_A"] is not None:
            Q_A = op["Q_A"] if op["w_bias"] is None else torch.cat([op["Q_A"], op["w_bias"][None]])
            G = op["Q_S"].T @ G @ Q_A
        self._pending[spec.name] = self._finish(spec, G)

    def _finish(self, spec: LayerSpec, R: torch.Tensor) -> torch.Tensor:
        """Whiten and sketch rotated per-document gradients ``R`` (B, out, a_dim) -> (B, k_out * k_in); on the
        way, each document's squared norm whole and sketched (float64, for the residual bound) and the probes'
        exact scores."""
        op = self.ops[spec.name]
        W = R.to(self.dtype)
        if op["whiten"] is not None:
            W = W * op["whiten"]
        full = W.double().square().sum(dim=(1, 2))
        if self.probes is not None:
            p = torch.einsum("bij,pij->bp", W, self.probes[spec.name]).double()
            self._probe = p if self._probe is None else self._probe + p
        if op["rank"] is not None:  # the R leading singular triplets: rows (σ u)^T then v^T, zero-padded to R
            r = op["rank"]
            U, sv, Vh = torch.linalg.svd(W, full_matrices=False)
            k = min(r, sv.shape[1])
            us = (U[:, :, :k] * sv[:, None, :k]).transpose(1, 2)
            v = Vh[:, :k, :]
            if k < r:
                us = torch.cat([us, us.new_zeros(us.shape[0], r - k, us.shape[2])], 1)
                v = torch.cat([v, v.new_zeros(v.shape[0], r - k, v.shape[2])], 1)
            kept = sv[:, :k].double().square().sum(1)
            self._norms = (torch.stack([full, kept], 1) if self._norms is None
                           else self._norms + torch.stack([full, kept], 1))
            return torch.cat([us.flatten(1), v.flatten(1)], dim=1)
        if op["keep"] is not None:
            W = W.flatten(1)[:, op["keep"]]
        if op["S_out"] is not None:
            W = op["S_out"] @ W
        if op["S_in"] is not None:
            W = W @ op["S_in"].T
        norms = torch.stack([full, W.double().square().flatten(1).sum(dim=1)], dim=1)
        self._norms = norms if self._norms is None else self._norms + norms
        return W.flatten(1)

    def end_batch(self, ctx: PassContext) -> None:
        rows = torch.cat([self._pending[n] for n in self.specs], dim=1)
        extra = {"norms": self._norms} | ({} if self._probe is None else {"probe": self._probe})
        self._pending, self._norms, self._probe = {}, None, None
        self.on_batch(list(ctx.batch.ids), rows, extra)

    def abort_batch(self) -> None:
        self._pending, self._norms, self._probe = {}, None, None


class CovarianceAccumulator(IndexAccumulator):
    """Per layer, ``Σ_d W_d W_d^T`` (out × out) and ``Σ_d W_d^T W_d`` (a_dim × a_dim) of the whitened rotated
    gradients (float64): what a ``pca`` sketch keeps the leading eigenvectors of."""

    def __init__(self, specs: dict[str, LayerSpec], factors: Factors, device: torch.device, dtype: torch.dtype,
                 gemm_dtype: torch.dtype | None = None):
        super().__init__(specs, factors, Sketch.make(specs, None), device, dtype, lambda *_: None, gemm_dtype)
        self.cov = {n: (torch.zeros(s.out_features, s.out_features, dtype=torch.float64, device=device),
                        torch.zeros(s.a_dim, s.a_dim, dtype=torch.float64, device=device)) for n, s in specs.items()}
        self.n = 0

    def _whitened(self, spec: LayerSpec, R: torch.Tensor) -> torch.Tensor:
        """The batch's rotated gradients whitened as the index stores them, in float64."""
        W = R.to(self.dtype)
        whiten = self.ops[spec.name]["whiten"]
        return (W if whiten is None else W * whiten).double()

    def _finish(self, spec: LayerSpec, R: torch.Tensor) -> torch.Tensor:
        W = self._whitened(spec, R)
        c_out, c_in = self.cov[spec.name]
        c_out += torch.einsum("bij,bkj->ik", W, W)
        c_in += torch.einsum("bij,bik->jk", W, W)
        return W.new_zeros(W.shape[0], 0)

    def end_batch(self, ctx: PassContext) -> None:
        self.n += len(ctx.batch.ids)
        self._pending = {}


def whitened_covariances(eng: Any, examples: Sequence[Example], factors: Factors,
                         progress: Progress | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the side covariances of ``examples``' whitened rotated gradients, by one pass (see
    :class:`CovarianceAccumulator`; a ``pca`` sketch is made from them)."""
    eng.check_factors(factors)
    acc = CovarianceAccumulator(eng.specs, factors, eng.device, eng.dtype, eng.runner.gemm_dtype(eng.precision))
    eng.runner.run(list(examples), acc, eng._cfg("true"), progress)
    return {n: (a.cpu(), b.cpu()) for n, (a, b) in acc.cov.items()}


class EnergyAccumulator(CovarianceAccumulator):
    """Per layer, ``Σ_d W_d ⊙ W_d`` (out × a_dim): each eigen-coordinate's whitened energy."""

    def __init__(self, specs: dict[str, LayerSpec], factors: Factors, device: torch.device, dtype: torch.dtype,
                 gemm_dtype: torch.dtype | None = None):
        IndexAccumulator.__init__(self, specs, factors, Sketch.make(specs, None), device, dtype, lambda *_: None,
                                  gemm_dtype)
        self.energy = {n: torch.zeros(s.out_features, s.a_dim, dtype=torch.float64, device=device)
                       for n, s in specs.items()}
        self.n = 0

    def _finish(self, spec: LayerSpec, R: torch.Tensor) -> torch.Tensor:
        W = self._whitened(spec, R)
        self.energy[spec.name] += W.square().sum(0)
        return W.new_zeros(W.shape[0], 0)


def pseudo_queries(docs: Sequence[Example], completion: int = 2) -> list[Example]:
    """Query-like examples from training documents: each document's last ``completion`` tokens as the target,
    the rest as the prompt. Queries are short completions that end a statement, whose whitened gradients put
    their energy elsewhere than whole documents' do (on the demo, 77% in one layer against a quarter for
    documents); of the variants tried (the end, random places, one to three tokens) the document's end matched
    the real queries' energy best (log-correlation 0.94 on the demo)."""
    out = []
    for e in docs:
        n = len(e.input_ids)
        if n >= completion + 2:
            out.append(Example(f"pseudo:{e.id}", e.input_ids, n - completion, n))
    return out


def score_energy(eng: Any, docs: Sequence[Example], factors: Factors,
                 progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Per layer, each eigen-coordinate's expected contribution to scores (out × a_dim):
    ``E_q[W_q²] · E_d[W_d²]``, the first measured on :func:`pseudo_queries` of ``docs`` (one pass), the second
    the documents' whitened energy ``Λ / (Λ + λ)`` (EK-FAC's eigenvalues are ``E_d[(Q_S^T G_d Q_A)²]``;
    without eigenvalues, measured on ``docs`` too)."""
    eng.check_factors(factors)
    kind = check_strategy(factors.strategy)
    gemm = eng.runner.gemm_dtype(eng.precision)

    def measure(examples: list[Example]) -> dict[str, torch.Tensor]:
        acc = EnergyAccumulator(eng.specs, factors, eng.device, eng.dtype, gemm)
        eng.runner.run(examples, acc, eng._cfg("true"), progress)
        return {n: e.cpu() / max(1, len(examples)) for n, e in acc.energy.items()}

    q = measure(pseudo_queries(docs))
    if kind.eigen_key is not None:
        d = {}
        for n in eng.specs:
            ev = factors.tensors[n][kind.eigen_key].double().clamp_min(0)
            d[n] = ev / (ev + factors.damping[n])
    else:
        d = measure(list(docs))
    return {n: q[n] * d[n] for n in eng.specs}


def index_vectors(eng: Any, examples: Sequence[Example], factors: Factors, sketch: Sketch,
                  out: np.ndarray | torch.Tensor | None = None, progress: Progress | None = None, *,
                  cache: GradientCache | TokenCache | None = None, probes: dict[str, torch.Tensor] | None = None,
                  stats: dict[str, np.ndarray] | None = None) -> Any:
    """Every example's index vector (rows in ``examples`` order), by one pass of ``eng`` (an
    :class:`~influence_engine.InfluenceEngine`) with the data's own labels, as scoring uses; with ``cache``
    (their gradients kept by the one-pass fit) the stored gradients are replayed instead, no pass. Written into
    ``out`` (e.g. a memory-mapped array) when given; otherwise returned as a tensor in the engine's dtype.

    ``stats`` (a dict) receives ``norms`` (N, 3) float64: per example the residual norm outside the sketch
    ``‖(I-P) W‖`` (meaningful for orthonormal sketches), the sketched norm ``‖P W‖`` and the norm of the
    rounding error of the stored row; with ``probes`` (per layer, unsketched probe vectors (P, out, a_dim)) also
    ``probe`` (N, P): the probes' exact scores against each example."""
    eng.check_factors(factors)
    position = {e.id: i for i, e in enumerate(examples)}
    if len(position) != len(examples):
        raise UserError("document ids are not unique")
    width = sum(int(np.prod(sketch.shape(s))) for s in eng.specs.values())
    if out is None:
        out = torch.zeros(len(examples), width, dtype=eng.dtype)
    norms = np.zeros((len(examples), 3))
    probe = None if probes is None else np.zeros((len(examples), next(iter(probes.values())).shape[0]))

    def keep(ids: list[str], rows: torch.Tensor, extra: dict[str, torch.Tensor]) -> None:
        index = np.asarray([position[i] for i in ids])
        r = rows.cpu()
        if isinstance(out, torch.Tensor):
            out[index] = r.to(out.dtype)
            stored = out[index].double()
        else:
            order = np.argsort(index)  # numpy fancy assignment into a memmap wants sorted indices to be cheap
            cast = r.numpy()[order].astype(out.dtype, copy=False)
            out[index[order]] = cast
            stored = torch.from_numpy(np.asarray(cast, dtype=np.float64))[np.argsort(order)]
        full, kept = extra["norms"][:, 0].cpu(), extra["norms"][:, 1].cpu()
        # ‖W‖² - ‖PW‖² cancels: a relative 1e-6 of ‖W‖² keeps the residual an upper bound at fp32 precision
        slack = 1e-6 if eng.dtype != torch.float64 else 1e-13
        norms[index, 0] = ((full - kept).clamp_min(0) + slack * full).sqrt().numpy()
        norms[index, 1] = kept.sqrt().numpy()
        norms[index, 2] = (stored - r.double()).norm(dim=1).numpy()
        if probe is not None:
            probe[index] = extra["probe"].cpu().numpy()

    acc = IndexAccumulator(eng.specs, factors, sketch, eng.device, eng.dtype, keep,
                           eng.runner.gemm_dtype(eng.precision), probes=probes)
    if cache is not None:
        cache.check_covers(list(position))
        cache.replay(eng.runner, "true", acc, eng.precision, progress=progress)
    else:
        eng.runner.run(examples, acc, eng._cfg("true"), progress)
    if stats is not None:
        stats["norms"] = norms
        if probe is not None:
            stats["probe"] = probe
    return out


def layer_blocks(specs: dict[str, LayerSpec], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Unsketched index vectors (P, width) split into per-layer blocks (P, out, a_dim)."""
    blocks, at = {}, 0
    for n, s in specs.items():
        size = s.out_features * s.a_dim
        blocks[n] = rows[:, at:at + size].reshape(-1, s.out_features, s.a_dim)
        at += size
    return blocks


# ------------------------------------------------------------------------------------------------- store
@dataclass
class Part:
    name: str
    n_docs: int


class GradientIndex:
    """An index directory: ``index.json`` (settings, fingerprints, sketch, layout), ``sketch.safetensors``, and
    ``parts/<name>.npy`` (rows) with ``parts/<name>.ids.json``. Parts are written atomically, one per shard,
    so a build resumes at the first missing part."""

    def __init__(self, directory: str | Path, meta: dict[str, Any]):
        self.directory = Path(directory)
        self.meta = meta

    # -- creation
    @classmethod
    def create(cls, directory: str | Path, eng: Any, factors: Factors, *, sketch: str | tuple[int, int] | None,
               sketch_seed: int = 0, dtype: str = "fp16", extra: dict[str, Any] | None = None,
               sample: Sequence[Example] | None = None, probes: Sequence[Example] | None = None,
               progress: Progress | None = None) -> GradientIndex:
        """Start (or reopen, when its record matches) an index for ``factors`` of ``eng``'s model. ``sketch``:
        a spec (``"16x16"``, ``"eigen:32x32"``, ``"pca:24x24"``, ``"off"``) or a random sketch's size.
        ``sample``: the documents a ``pca`` sketch is fitted on (one pass). ``probes``: examples scored exactly
        alongside the sketch while parts are built (:meth:`probe_recall`)."""
        check_strategy(factors.strategy)
        eng.check_factors(factors)
        d = Path(directory)
        spec = (("random", sketch) if isinstance(sketch, tuple) else parse_sketch_spec(sketch))
        kind, size = ("random", None) if spec is None else spec
        name = sketch_name(kind, size)
        if (d / "index.json").exists():
            old = cls.open(d)
            if old.meta.get("sketch") != name:
                raise FactorMismatchError(f"{d}: an index with other sketch is stored here "
                                          f"({str(old.meta.get('sketch'))[:60]!r})",
                                          hint="use another --out directory, or delete this one")
        covariances = energy = None
        if kind in ("pca", "top") and size is not None:
            if not sample:
                raise UserError(f"--sketch {kind}: needs documents to fit the projection on")
            if kind == "pca":
                covariances = whitened_covariances(eng, sample, factors)
            else:
                energy = score_energy(eng, sample, factors)
        sk = Sketch.make(eng.specs, size, sketch_seed, kind=kind, factors=factors, covariances=covariances,
                         energy=energy)
        layers = []
        offset = 0
        for s in eng.specs.values():
            rows, cols = sk.shape(s)
            layers.append({"name": s.name, "rows": rows, "cols": cols, "offset": offset, "out": s.out_features,
                           "in": s.a_dim})
            offset += rows * cols
        settings = factors.settings
        meta = {"format_version": FORMAT_VERSION, "strategy": factors.strategy,
                "settings": None if settings is None else settings.to_json(), "damping": factors.damping,
                "sketch": name, "sketch_seed": sketch_seed, "orthonormal": sk.orthonormal,
                "dtype": dtype, "width": offset, "layers": layers, **(extra or {})}
        if (d / "index.json").exists():
            old = cls.open(d)
            for key in ("settings", "sketch", "sketch_seed", "dtype", "width", "strategy"):
                if old.meta.get(key) != meta[key]:
                    raise FactorMismatchError(f"{d}: an index with other {key} is stored here "
                                              f"({str(old.meta.get(key))[:60]!r})",
                                              hint="use another --out directory, or delete this one")
            return old
        d.mkdir(parents=True, exist_ok=True)
        tensors = {f"{side}/{n}": t for side, store in (("out", sk.out), ("in", sk.inp), ("keep", sk.keep or {}))
                   for n, t in store.items() if t is not None}
        save_tensors(d / "sketch.safetensors", tensors, {"seed": sketch_seed})
        if probes:
            full = index_vectors(eng, probes, factors, Sketch.make(eng.specs, None)).double()
            sketched = index_vectors(eng, probes, factors, sk).double()
            save_tensors(d / "probes.safetensors", {"full": full, "sketched": sketched}, {})
            meta["probes"] = [e.id for e in probes]
        write_json_atomic(d / "index.json", meta)
        return cls(d, meta)

    @classmethod
    def open(cls, directory: str | Path) -> GradientIndex:
        d = Path(directory)
        path = d / "index.json"
        if not path.exists():
            raise UserError(f"--index {d}: no index.json here", hint="build one with `influence-audit index build`")
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: corrupt ({exc})", hint="delete the index and rebuild it") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise FactorMismatchError(f"{path}: index format {meta.get('format_version')} is not {FORMAT_VERSION}",
                                      hint="rebuild the index with this version")
        return cls(d, meta)

    @property
    def width(self) -> int:
        return int(self.meta["width"])

    @property
    def np_dtype(self) -> type:
        return STORE_DTYPES[self.meta["dtype"]]

    def sketch(self, specs: dict[str, LayerSpec]) -> Sketch:
        """The stored projections (checked against ``specs``' layers)."""
        names = [x["name"] for x in self.meta["layers"]]
        if names != list(specs):
            raise FactorMismatchError(f"{self.directory}: the index tracks other layers than this engine",
                                      hint="query with the index's own --layers")
        t, _ = load_tensors(self.directory / "sketch.safetensors")
        spec = parse_sketch_spec(self.meta["sketch"])
        kind, size = ("random", None) if spec is None else spec
        keep = {n: t[f"keep/{n}"].long() for n in names} if kind == "top" and size is not None else None
        return Sketch(size, int(self.meta["sketch_seed"]), {n: t.get(f"out/{n}") for n in names},
                      {n: t.get(f"in/{n}") for n in names}, kind, keep)

    @property
    def orthonormal(self) -> bool:
        """Whether the stored projection is orthogonal, so the residual bound holds (older indexes: unknown,
        no)."""
        return bool(self.meta.get("orthonormal", False))

    def _part_paths(self, name: str) -> tuple[Path, Path]:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"part name {name!r}: letters, digits, '.', '_' and '-' only")
        base = self.directory / "parts" / name
        return base.with_suffix(".npy"), base.with_suffix(".ids.json")

    def has_part(self, name: str) -> bool:
        rows, ids = self._part_paths(name)
        return rows.exists() and ids.exists()

    def build_part(self, name: str, eng: Any, examples: Sequence[Example], factors: Factors,
                   progress: Progress | None = None, cache: GradientCache | TokenCache | None = None) -> Part:
        """Write part ``name``: the index vectors of ``examples`` (one pass, or a replay of ``cache``), straight
        into a memory map that is renamed into place when complete. Skipped when the part exists."""
        rows_path, ids_path = self._part_paths(name)
        if self.has_part(name):
            return Part(name, len(json.loads(ids_path.read_text())))
        settings = factors.settings
        if self.meta.get("settings") is not None and settings is not None:
            settings.check_matches(self.meta["settings"], str(self.directory))
        sk = self.sketch(eng.specs)
        probes = None
        if self.meta.get("probes"):
            full, _ = load_tensors(self.directory / "probes.safetensors")
            probes = layer_blocks(eng.specs, full["full"])
        stats: dict[str, np.ndarray] = {}
        with atomic_path(rows_path) as tmp:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.np_dtype,
                                           shape=(len(examples), self.width))
            index_vectors(eng, examples, factors, sk, mm, progress, cache=cache, probes=probes, stats=stats)
            mm.flush()
            del mm
        base = rows_path.with_suffix("")
        for suffix, key in ((".norms.npy", "norms"), (".probe.npy", "probe")):
            if key in stats:
                with atomic_path(base.with_suffix(suffix)) as tmp, open(tmp, "wb") as f:
                    np.save(f, stats[key])  # a file object: np.save would add .npy to the temporary name
        write_json_atomic(ids_path, [e.id for e in examples])  # the ids mark the part done
        return Part(name, len(examples))

    def parts(self, names: Sequence[str] | None = None) -> list[Part]:
        """The parts in order (``names``, or every complete part by name)."""
        if names is None:
            names = sorted(p.name[:-len(".ids.json")] for p in (self.directory / "parts").glob("*.ids.json"))
        out = []
        for n in names:
            if not self.has_part(n):
                raise UserError(f"{self.directory}: part {n} is missing", hint="rerun the index build to finish it")
            out.append(Part(n, len(json.loads(self._part_paths(n)[1].read_text()))))
        return out

    def rows(self, part: str) -> np.ndarray:
        """Part ``part``'s rows, memory-mapped read-only."""
        return np.load(self._part_paths(part)[0], mmap_mode="r")

    def ids(self, part: str) -> list[str]:
        return json.loads(self._part_paths(part)[1].read_text())

    def norms(self, part: str) -> np.ndarray | None:
        """Part ``part``'s per-document norms (N, 3): residual outside the sketch, sketched, stored rounding
        error (None for parts written before they were kept)."""
        path = self._part_paths(part)[0].with_suffix(".norms.npy")
        return np.load(path) if path.exists() else None

    def residual_bound(self, query_norms: np.ndarray, doc_norms: np.ndarray) -> np.ndarray:
        """``|exact - index score| ≤ bound`` (Q, D) for an orthonormal sketch: Cauchy-Schwarz on the residual
        outside the sketch, ``‖q_res‖ ‖d_res‖``, plus the stored row's rounding, ``‖P q‖ ‖d̃ - P d‖``, plus
        a relative 1e-5 of ``‖q‖ ‖d‖`` for single-precision products (the search's and the exact pass's)."""
        q_res, q_kept = query_norms[:, :1], query_norms[:, 1:2]
        d_res, d_kept, d_err = doc_norms[None, :, 0], doc_norms[None, :, 1], doc_norms[None, :, 2]
        rel = 1e-12 if self.meta["dtype"] == "fp64" else 1e-5
        return (q_res * d_res + q_kept * d_err
                + rel * np.hypot(q_res, q_kept) * np.hypot(d_res, d_kept))

    def probe_recall(self, k: int = 10, within: Sequence[int] = (100,)) -> dict[str, Any] | None:
        """How well the sketch finds the probes' exact top ``k`` (scored exactly while the parts were built):
        ``recall_at_k`` (the share of the exact top k in the sketch's top k) and, for each M in ``within``, the
        share of the exact top k in the sketch's top M (what ``--refine M`` can recover). Stored in the
        metadata (``probe_recall``). None without probes."""
        if not self.meta.get("probes"):
            return None
        t, _ = load_tensors(self.directory / "probes.safetensors")
        qv = t["sketched"].double()
        exact, approx = [], []
        for p in self.parts():
            path = self._part_paths(p.name)[0].with_suffix(".probe.npy")
            if not path.exists():
                return None
            exact.append(np.load(path))
            approx.append(self.scores(torch.from_numpy(np.array(self.rows(p.name), dtype=np.float64)), qv).numpy())
        E, A = np.concatenate(exact).T, np.concatenate(approx).T
        n = E.shape[1]
        kk = min(k, n)
        top_e = np.argsort(-E, axis=1, kind="stable")[:, :kk]
        order_a = np.argsort(-A, axis=1, kind="stable")

        def share(m: int) -> float:
            return float(np.mean([len(set(te) & set(oa[:m])) / kk for te, oa in zip(top_e, order_a, strict=True)]))

        out = {"probes": len(self.meta["probes"]), "documents": n, "k": kk, f"recall_at_{k}": share(kk),
               **{f"top{k}_within_{m}": share(min(m, n)) for m in within}}
        self.meta["probe_recall"] = out
        write_json_atomic(self.directory / "index.json", self.meta)
        return out

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in (self.directory / "parts").glob("*") if p.is_file())

    # -- search
    def scores(self, X: torch.Tensor, qv: torch.Tensor) -> torch.Tensor:
        """Index scores (B, Q) of stored rows ``X`` (B, width) against query vectors ``qv`` (Q, width): their inner
        product, or for a ``lowrank`` index ``Σ_layers Σ_jk (x_j·u_k)(y_j·v_k)`` over both sides' factors."""
        spec = parse_sketch_spec(self.meta["sketch"])
        if spec is None or spec[0] != "lowrank":
            return X @ qv.T
        r, rq = spec[1]  # the documents' rank, the queries' (their leading triplets)
        B, Q = X.shape[0], qv.shape[0]
        out = X.new_zeros(B, Q)
        for lay in self.meta["layers"]:
            o, i, at = lay["out"], lay["in"], lay["offset"]
            du, dv = X[:, at:at + r * o].reshape(B * r, o), X[:, at + r * o:at + r * (o + i)].reshape(B * r, i)
            qu = qv[:, at:at + r * o].reshape(Q, r, o)[:, :rq].reshape(Q * rq, o)
            qw = qv[:, at + r * o:at + r * (o + i)].reshape(Q, r, i)[:, :rq].reshape(Q * rq, i)
            out += ((du @ qu.T) * (dv @ qw.T)).view(B, r, Q, rq).sum(dim=(1, 3))
        return out

    def query_vectors(self, eng: Any, queries: Sequence[Example], factors: Factors,
                      stats: dict[str, np.ndarray] | None = None) -> torch.Tensor:
        """The queries' vectors (Q, width): their gradients (completion given prompt) rotated, scaled by
        ``(Λ + λ)^{-1/2}`` and sketched exactly as the documents were, so ``<query, document>`` is the score.
        ``stats`` receives their ``norms`` (Q, 3), as :func:`index_vectors`."""
        return index_vectors(eng, queries, factors, self.sketch(eng.specs), stats=stats)

    def search(self, queries: torch.Tensor, top_k: int, *, parts: Sequence[str] | None = None,
               block: int | None = None, device: str | torch.device = "cpu") -> tuple[np.ndarray, list[list[str]]]:
        """Exact top ``top_k`` by inner product for each row of ``queries`` (Q, width): blocked matrix products
        over the memory-mapped parts (``block`` rows at a time: by default about 2^22 values, a few MB that stay
        in cache), a streaming top-k. Returns scores (Q, k), descending, and the ids."""
        dt = torch.float64 if self.meta["dtype"] == "fp64" else torch.float32
        block = block or max(256, 2**22 // max(self.width, 1))
        qv = queries.to(device, dt)
        topk = TopK(max(1, top_k))
        all_ids: list[str] = []
        for part in self.parts(parts):
            rows = self.rows(part.name)
            base = len(all_ids)
            all_ids += self.ids(part.name)
            for s in range(0, rows.shape[0], block):
                X = torch.from_numpy(np.array(rows[s:s + block])).to(device, dt)  # a copy: read-only map
                topk.push(self.scores(X, qv), torch.arange(base + s, base + s + X.shape[0]))
        if topk.values is None:
            return np.zeros((len(qv), 0)), [[] for _ in range(len(qv))]
        idx = topk.index.cpu().numpy()
        return topk.values.double().cpu().numpy(), [[all_ids[i] for i in row] for row in idx]

    def search_faiss(self, queries: torch.Tensor, top_k: int, *, parts: Sequence[str] | None = None,
                     hnsw_m: int = 32, ef_search: int = 256) -> tuple[np.ndarray, list[list[str]]]:
        """Approximate top ``top_k`` with a FAISS HNSW inner-product index over every part (built on first use
        and kept in the index directory as ``faiss-hnsw.index``; optional extra ``faiss-cpu``)."""
        if str(self.meta["sketch"]).startswith("lowrank"):
            raise UserError("--search faiss: not with a lowrank index (its scores are not one inner product)",
                            hint="use --search exact")
        try:
            import faiss
        except ImportError:
            raise UserError("--search faiss needs FAISS", hint="pip install 'influence-audit[index]' "
                                                             "(faiss-cpu), or use --search exact") from None
        plist = self.parts(parts)
        all_ids = [i for p in plist for i in self.ids(p.name)]
        path = self.directory / f"faiss-hnsw-{len(all_ids)}.index"
        if path.exists():
            fx = faiss.read_index(str(path))
        else:
            fx = faiss.IndexHNSWFlat(self.width, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            for p in plist:
                rows = self.rows(p.name)
                for s in range(0, rows.shape[0], 65536):
                    fx.add(np.ascontiguousarray(rows[s:s + 65536], dtype=np.float32))
            with atomic_path(path) as tmp:
                faiss.write_index(fx, str(tmp))
        fx.hnsw.efSearch = max(ef_search, top_k)
        scores, idx = fx.search(np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32), top_k)
        return scores.astype(np.float64), [[all_ids[i] for i in row if i >= 0] for row in idx]

