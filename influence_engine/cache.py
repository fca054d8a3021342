"""Per-document gradients kept from the covariance pass: fit and score with one pass over the data.

Fitting EK-FAC and scoring normally take three passes over the training data: covariances, then (once their
eigenbases exist) the eigenvalue correction, then (once queries are preconditioned) the scores. Each pass is
a forward and a backward pass of the model. When every document's gradient of every tracked layer fits in
memory (small models, small shards), the covariance pass can keep them instead: one forward pass, then one
backward pass with labels sampled from the model (the covariances, and the per-document gradients
``G̃_d`` the eigenvalue correction squares) and one with the data's own labels (the gradients ``G_d`` that
scores contract with queries). The eigenvalue correction ``Σ_d (Q_S^T G̃_d Q_A)^2`` and the scores
``<P_q, G_d>`` are then products on stored gradients, no further pass over the data: the stored gradients
are replayed through the same accumulators a pass feeds (:meth:`~influence_engine.passes.Runner.replay`).

The results are those of the three passes (same labels, same sums; only floating-point rounding differs).
Size: ``n_docs × Σ_layers out × (in + 1)`` values, twice with the sampled (true) Fisher, once with the
empirical one, in the pass's GEMM dtype (bfloat16 in bf16 mode, which is what the score pass itself rounds
per-document gradients to). :func:`cache_bytes` says how much before anything runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .factors import CovarianceAccumulator
from .layers import LayerSpec
from .passes import PassContext
from .statistics import load_tensors, save_tensors


def cache_bytes(specs: dict[str, LayerSpec], n_docs: int, itemsize: int, sets: int = 2) -> int:
    """Bytes a :class:`GradientCache` of ``n_docs`` documents takes (``sets``: 2 with the sampled Fisher)."""
    return n_docs * sets * itemsize * sum(s.out_features * s.a_dim for s in specs.values())


def token_cache_bytes(specs: dict[str, LayerSpec], n_tokens: int, itemsize: int, sets: int = 2) -> int:
    """Bytes a :class:`TokenCache` of ``n_tokens`` tokens takes: each token's input and, per label set (``sets``),
    output gradient, at every layer."""
    return n_tokens * itemsize * sum(s.in_features + sets * s.out_features for s in specs.values())


def keeps_tokens(specs: dict[str, LayerSpec], n_docs: int, n_tokens: int, gemm_itemsize: int, itemsize: int,
                 sets: int) -> bool:
    """Whether the one-pass fit keeps tokens (:class:`TokenCache`) rather than per-document gradients
    (:class:`GradientCache`): tokens when they take at most half the bytes (replaying a stored gradient is one
    product per document; replaying tokens redoes the per-token work of a pass). Short documents on wide layers
    keep tokens (SmolLM2-135M's MLP layers, 22-token documents: 46k values per layer and document instead of
    886k); long documents on narrow layers keep gradients."""
    return 2 * token_cache_bytes(specs, n_tokens, itemsize, sets) <= cache_bytes(specs, n_docs, gemm_itemsize, sets)


class _Kept:
    """What both caches share: their documents (``ids``), the tensors they hold (:meth:`_tensor_sets`) and the
    refusal to stand in for a pass over other documents."""

    ids: list[str]

    def _tensor_sets(self) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self._tensor_sets() for t in s.values())

    def check_covers(self, ids: Sequence[str]) -> None:
        """Refuse to stand in for a pass over other documents than those it holds."""
        if sorted(ids) != sorted(self.ids):
            raise UserError(f"the gradient cache holds {len(self.ids)} other documents than the {len(ids)} "
                            f"asked for", hint="build the cache from the same documents")


@dataclass
class GradientCache(_Kept):
    """Each document's gradient per tracked layer, ``(N, out, a_dim)``, rows in ``ids`` order: ``true``
    from the data's labels (for scores) and ``sampled`` from labels drawn from the model (for the eigenvalue
    correction; ``None`` with the empirical Fisher, where the two are the same). Replayed through the
    accumulators of the passes they stand in for (:meth:`~influence_engine.passes.Runner.replay`)."""

    ids: list[str]
    specs: dict[str, LayerSpec]
    true: dict[str, torch.Tensor]
    sampled: dict[str, torch.Tensor] | None = None

    def _tensor_sets(self) -> list[dict[str, torch.Tensor]]:
        return [self.true] + ([self.sampled] if self.sampled is not None else [])

    def fisher_gradients(self) -> dict[str, torch.Tensor]:
        return self.sampled if self.sampled is not None else self.true

    def replay(self, runner, objective: str, acc, precision: str, tokens: Sequence[int] | None = None,
               progress=None) -> None:
        """The stored gradients of ``objective`` (``true`` or ``fisher``) through ``acc``, as a pass would."""
        grads = self.true if objective == "true" else self.fisher_gradients()
        runner.replay(self.ids, grads, acc, precision, tokens, progress)

    def save(self, path: str | Path) -> None:
        tensors = {f"true/{n}": t for n, t in self.true.items()}
        if self.sampled is not None:
            tensors |= {f"sampled/{n}": t for n, t in self.sampled.items()}
        save_tensors(Path(path), tensors, {"kind": "gradient-cache", "ids": self.ids,
                                            "sampled": self.sampled is not None,
                                            "layers": [s.to_json() for s in self.specs.values()]})

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> GradientCache:
        t, meta = load_tensors(Path(path))
        specs = {d["name"]: LayerSpec(**d) for d in meta["layers"]}
        true = {n: t[f"true/{n}"].to(device) for n in specs}
        sampled = {n: t[f"sampled/{n}"].to(device) for n in specs} if meta["sampled"] else None
        return cls(list(meta["ids"]), specs, true, sampled)


class CachingCovarianceAccumulator(CovarianceAccumulator):
    """Covariances from the pass's first backward (the Fisher's labels), plus every document's gradient from
    each backward: ``objectives`` names them in order (``("sampled", "true")`` or ``("true",)``). Gradients are
    written straight into preallocated rows, in the order the pass processes documents; a batch that is
    aborted (out of memory) is simply written again."""

    def __init__(self, specs: dict[str, LayerSpec], device: torch.device, dtype: torch.dtype,
                 gemm_dtype: torch.dtype, n_docs: int, objectives: Sequence[str]):
        super().__init__(specs, device, dtype)
        self.objectives = list(objectives)
        self.ids: list[str] = []
        self.store = {o: {n: torch.empty(n_docs, s.out_features, s.a_dim, dtype=gemm_dtype, device=device)
                          for n, s in specs.items()} for o in self.objectives}

    def forward(self, spec: LayerSpec, a: torch.Tensor, ctx: PassContext) -> torch.Tensor:
        x = ctx.masked(a, ctx.gemm_dtype)
        self._add_activations(spec, x, ctx)
        return x  # kept for the per-document gradients

    def backward(self, spec: LayerSpec, x: torch.Tensor, g: torch.Tensor, ctx: PassContext) -> None:
        g = ctx.masked(g, ctx.gemm_dtype)
        if ctx.objective == 0:
            self._add_gradients(spec, g)
        rows = self.store[self.objectives[ctx.objective]][spec.name][len(self.ids):len(self.ids) + g.shape[0]]
        n_in = spec.in_features
        torch.bmm(g.transpose(1, 2), x, out=rows[:, :, :n_in])
        if spec.bias:
            torch.sum(g, 1, out=rows[:, :, n_in])

    def end_batch(self, ctx: PassContext) -> None:
        super().end_batch(ctx)
        self.ids += ctx.batch.ids

    def cache(self) -> GradientCache:
        return GradientCache(list(self.ids), dict(self.specs), self.store["true"], self.store.get("sampled"))


@dataclass
class TokenCache(_Kept):
    """What a pass hands the accumulators, kept per token: every tracked layer's inputs ``a_t`` and output
    gradients ``g_t`` (``true`` from the data's labels; ``sampled`` from labels drawn from the model, ``None``
    with the empirical Fisher), packed ``(tokens, width)`` with documents in ``ids`` order, ``lengths`` tokens
    each. A document costs ``T (in + out)`` values per layer instead of the ``out (in + 1)`` of its gradient:
    far less for short documents on wide layers. Replayed as padded batches through the accumulators'
    ``forward`` and ``backward`` (:meth:`~influence_engine.passes.Runner.replay_tokens`): the same calls, on the
    same values, as the pass it stands in for, without the model."""

    ids: list[str]
    specs: dict[str, LayerSpec]
    lengths: list[int]
    a: dict[str, torch.Tensor]
    true: dict[str, torch.Tensor]
    sampled: dict[str, torch.Tensor] | None = None

    def _tensor_sets(self) -> list[dict[str, torch.Tensor]]:
        return [self.a, self.true] + ([self.sampled] if self.sampled is not None else [])

    def replay(self, runner, objective: str, acc, precision: str, tokens: Sequence[int] | None = None,
               progress=None) -> None:
        """The stored tokens with the gradients of ``objective`` (``true`` or ``fisher``) through ``acc``."""
        g = self.true if objective == "true" or self.sampled is None else self.sampled
        runner.replay_tokens(self.ids, self.lengths, self.a, g, acc, precision, progress)


class TokenCachingCovarianceAccumulator(CovarianceAccumulator):
    """Covariances from the pass's first backward (the Fisher's labels), keeping every real token's layer inputs
    and, from each backward, its output gradients (a :class:`TokenCache`), in ``store_dtype`` (the pass's
    summing dtype: what accumulators are handed, exactly). Rows are written at the batch's offset and committed
    at ``end_batch``; an aborted batch is simply written again."""

    def __init__(self, specs: dict[str, LayerSpec], device: torch.device, dtype: torch.dtype,
                 store_dtype: torch.dtype, n_tokens: int, objectives: Sequence[str]):
        super().__init__(specs, device, dtype)
        self.objectives = list(objectives)
        self.ids: list[str] = []
        self.lengths: list[int] = []
        self.offset = 0
        self.a = {n: torch.empty(n_tokens, s.in_features, dtype=store_dtype, device=device) for n, s in specs.items()}
        self.g = {o: {n: torch.empty(n_tokens, s.out_features, dtype=store_dtype, device=device)
                      for n, s in specs.items()} for o in self.objectives}
        self._n = 0

    def begin_batch(self, ctx: PassContext) -> None:
        super().begin_batch(ctx)
        self._n = int(ctx.mask.sum())

    def _rows(self, x: torch.Tensor, ctx: PassContext) -> torch.Tensor:
        return x[ctx.mask] if ctx.padded else x.flatten(0, 1)

    def forward(self, spec: LayerSpec, a: torch.Tensor, ctx: PassContext) -> None:
        self._add_activations(spec, ctx.masked(a, ctx.gemm_dtype), ctx)
        self.a[spec.name][self.offset:self.offset + self._n] = self._rows(a, ctx)

    def backward(self, spec: LayerSpec, state, g: torch.Tensor, ctx: PassContext) -> None:
        if ctx.objective == 0:
            self._add_gradients(spec, ctx.masked(g, ctx.gemm_dtype))
        store = self.g[self.objectives[ctx.objective]][spec.name]
        store[self.offset:self.offset + self._n] = self._rows(g, ctx)

    def end_batch(self, ctx: PassContext) -> None:
        super().end_batch(ctx)
        self.ids += ctx.batch.ids
        self.lengths += [int(n) for n in ctx.mask.sum(1).tolist()]
        self.offset += self._n

    def cache(self) -> TokenCache:
        return TokenCache(list(self.ids), dict(self.specs), list(self.lengths), self.a, self.g["true"],
                          self.g.get("sampled"))
