"""The engine's public face: one object holding a model, its tracked layers and how passes run.

Typical use (the pipeline's tasks call exactly these)::

    eng = InfluenceEngine.from_pretrained("path/to/model", layers="mlp")
    docs = eng.encode(train_rows)                      # rows: dicts with id + text (or prompt/completion)
    cov = merge([eng.fit_covariance(shard) for shard in shards])
    basis = eigendecompose(cov)
    lam = merge([eng.fit_lambda(shard, basis) for shard in shards])
    factors = eng.finalize("ekfac", basis=basis, lambdas=lam, covariance=cov)
    queries = eng.prepare_queries(eng.encode(query_rows, where="queries"), factors, rank=32)
    result = eng.score(docs, queries, top_k=50)        # streaming top-k per query
    expl = eng.explain(docs[:3], queries)              # per-layer and per-token breakdowns
    signals = eng.document_signals(docs, factors)      # no queries: self-influence (per token too) and loss

Small models (every document's gradients fit in memory: ``eng.gradient_cache_bytes(len(docs))``) fit and score
with one pass over the documents instead of three::

    factors, kept = eng.fit_factors(docs, "ekfac", cache=True)
    result = eng.score(docs, eng.prepare_queries(eng.encode(query_rows, where="queries"), factors, rank=0),
                       cache=kept)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .cache import (
    CachingCovarianceAccumulator,
    GradientCache,
    TokenCache,
    TokenCachingCovarianceAccumulator,
    cache_bytes,
    keeps_tokens,
    token_cache_bytes,
)
from .data import Example, encode, examples_fingerprint
from .errors import FactorMismatchError, ModelError, UserError
from .factors import CovarianceAccumulator, Factors, LambdaAccumulator, eigendecompose, finalize
from .fusion import fuse_activations
from .layers import LayerSpec, layer_spec, track_experts
from .models import load_pretrained
from .passes import PassConfig, PassContext, Progress, Runner
from .plan import Plan, groups_within, layer_memory, make_plan, model_shape
from .presets import resolve_layers
from .quality import DocumentSignalAccumulator, DocumentSignals
from .queries import PreparedQueries, QueryAccumulator
from .scoring import ScoreAccumulator, SelfInfluenceAccumulator, TopK, check_scores
from .settings import PRECISIONS, FactorSettings
from .statistics import CovariancePartial, Eigenbasis, LambdaPartial
from .strategies import get_strategy

GPU_FACTOR_SHARE = 0.8  # of a GPU's free memory (after the model is loaded) that factors may take


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine", hint="use --device cpu")
    return dev


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the weights (names, shapes and float32 values): the same weights give the same print
    whatever their path, dtype or device."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if not torch.is_floating_point(t):
            continue
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class ScoreResult:
    """Top-k (and optionally all) scores of ``query_ids`` x the scored documents."""

    query_ids: list[str]
    doc_ids: list[str]
    top_scores: np.ndarray  # (Q, k), descending
    top_index: np.ndarray  # (Q, k) into doc_ids
    all_scores: np.ndarray | None  # (Q, N) in doc_ids order
    n_tokens: int
    paths: dict[str, str]

    def top_rows(self) -> list[dict[str, Any]]:
        """``query_id, train_id, score, rank`` rows; ties broken by document id so results are stable."""
        rows = []
        for q, qid in enumerate(self.query_ids):
            pairs = sorted(zip(self.top_scores[q].tolist(), self.top_index[q].tolist(), strict=True),
                           key=lambda p: (-p[0], self.doc_ids[p[1]]))
            rows += [{"query_id": qid, "train_id": self.doc_ids[i], "score": s, "rank": r}
                     for r, (s, i) in enumerate(pairs, start=1)]
        return rows


@dataclass
class Explanation:
    """Per-layer, per-token influence of one document on every query: ``layer_token_scores[layer]`` is
    ``(n_tokens, Q)``; sums over tokens and layers give the document's scores."""

    doc_id: str
    token_ids: list[int]
    query_ids: list[str]
    layer_token_scores: dict[str, np.ndarray]

    def per_layer(self, query: int) -> dict[str, float]:
        return {n: float(s[:, query].sum()) for n, s in self.layer_token_scores.items()}

    def per_token(self, query: int) -> np.ndarray:
        return sum(s[:, query] for s in self.layer_token_scores.values())

    def score(self, query: int) -> float:
        return float(self.per_token(query).sum())


class InfluenceEngine:
    """A model with hooks on its tracked layers, and the passes that fit factors and score documents."""

    def __init__(self, model: nn.Module, tokenizer=None, *, layers: str = "auto", device: str = "auto",
                 precision: str = "fp32", batch_size: int = 8, max_length: int = 512, seed: int = 0,
                 on_long: str = "truncate", fisher: str = "sampled", padding_side: str = "right",
                 pad_to_multiple: int = 1, fingerprint: str | None = None, fuse: bool = True,
                 device_memory_budget: int | None = None):
        if precision not in PRECISIONS:
            raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        if fisher not in ("sampled", "empirical"):
            raise UserError(f"fisher {fisher!r}: choose 'sampled' (true Fisher) or 'empirical'")
        if batch_size < 1:
            raise UserError(f"--batch-size {batch_size}: must be at least 1")
        if on_long not in ("truncate", "error"):
            raise UserError(f"--on-long {on_long!r}: choose 'truncate' (and count) or 'error'")
        self.device = resolve_device(device)
        self.precision = precision
        self.fingerprint = fingerprint or model_fingerprint(model)
        model = model.to(self.device, torch.float64 if precision == "fp64" else torch.float32)
        # the model is the engine's from here on: frozen, in eval mode and (with ``fuse``) with fused kernels for
        # activations Hugging Face computes in Python (same formula; see fusion.py)
        self.fused = fuse_activations(model) if fuse else 0
        self.model, self.tokenizer = model, tokenizer
        self.layers = resolve_layers(model, layers)
        self.tracked = track_experts(model, self.layers, precision)
        self.specs: dict[str, LayerSpec] = {n: layer_spec(n, m) for n, m in self.tracked.items()}
        self.batch_size, self.max_length, self.seed = batch_size, max_length, seed
        self.on_long, self.fisher, self.padding_side = on_long, fisher, padding_side
        self.pad_to_multiple = pad_to_multiple
        self.runner = Runner(model, self.tracked, self.specs, self.device)
        # bytes the factors may take on the device; on a GPU, 80% of what is free once the model is there (the rest
        # for batches, which halve on out-of-memory anyway)
        self.device_memory_budget = device_memory_budget
        if device_memory_budget is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            self.device_memory_budget = int(GPU_FACTOR_SHARE * free)
        if self.device_memory_budget is not None:
            self.plan().check()  # refuse now, not mid-run, when even one layer's factors cannot fit
        if tokenizer is not None:
            vocab = model.get_input_embeddings().num_embeddings
            if len(tokenizer) > vocab:
                raise ModelError(f"tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab} "
                                 f"rows: they do not belong together", hint="use the model's own tokenizer")
        pad = None if tokenizer is None else (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                              else tokenizer.eos_token_id)
        self.pad_id = int(pad or 0)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *, trust_remote_code: bool = False,
                        **kwargs: Any) -> InfluenceEngine:
        model, tokenizer = load_pretrained(path, trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, **kwargs)

    # ------------------------------------------------------------------------------------------ plumbing
    def _cfg(self, labels: str) -> PassConfig:
        return PassConfig(batch_size=self.batch_size, labels=labels, seed=self.seed, precision=self.precision,
                          padding_side=self.padding_side, pad_id=self.pad_id,
                          pad_to_multiple=self.pad_to_multiple)

    @property
    def _fit_labels(self) -> str:
        return "sampled" if self.fisher == "sampled" else "true"

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64 if self.precision == "fp64" else torch.float32

    def factor_settings(self, strategy: str = "ekfac", damping: str | float | None = "auto", *,
                        data_fingerprint: str = "") -> FactorSettings:
        """The :class:`FactorSettings` of factors this engine fits with ``strategy`` and ``damping`` on data
        whose fingerprint is ``data_fingerprint`` (empty: not recorded)."""
        return FactorSettings(self.fingerprint, data_fingerprint, strategy, self.layers,
                              "auto" if damping is None else damping, self.fisher, self.seed, self.max_length,
                              self.precision, self.on_long)

    def encode(self, rows: Iterable[Mapping[str, str]], *, where: str = "input") -> list[Example]:
        """Tokenise rows (``id`` + ``text``, or ``id`` + ``prompt`` + ``completion``)."""
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer; pass Examples directly")
        return encode(self.tokenizer, rows, max_length=self.max_length, on_long=self.on_long, where=where)

    # --------------------------------------------------------------------------------------------- factors
    def layer_groups(self) -> list[dict[str, LayerSpec]]:
        """The tracked layers in groups whose factors fit ``device_memory_budget`` together: one covariance (and
        eigenvalue-correction) pass per group, the other groups' sums on the host. One group without a budget."""
        if self.device_memory_budget is None:
            return [self.specs]
        gemm = self.runner.gemm_dtype(self.precision).itemsize
        sizes = [(n, layer_memory(s, self.dtype.itemsize, gemm, "ekfac")) for n, s in self.specs.items()]
        groups = groups_within([(n, max(m.covariance_device, m.lambda_device)) for n, m in sizes],
                               self.device_memory_budget)
        return [{n: self.specs[n] for n in g} for g in groups]

    def plan(self, *, strategy: str = "ekfac", docs: int | None = None, tokens: int | None = None,
             queries: int = 32, query_rank: int = 32) -> Plan:
        """The memory plan of this engine's layers and settings (see plan.py)."""
        n_params, hidden, blocks, vocab = model_shape(self.model)
        return make_plan(self.specs, strategy=strategy, precision=self.precision, n_params=n_params, hidden=hidden,
                         n_blocks=blocks, vocab=vocab, batch_size=self.batch_size, max_length=self.max_length,
                         queries=queries, query_rank=query_rank, fisher=self.fisher, docs=docs, tokens=tokens,
                         device_budget=self.device_memory_budget)

    def _group_runners(self, layers: Sequence[str] | None = None) -> list[tuple[Runner, dict[str, LayerSpec]]]:
        """One runner per group of layers (:meth:`layer_groups`), or one over exactly ``layers`` when given. Every
        group's runner shares the engine's lock: hooks live on the one model, so passes over it never overlap."""
        if layers is not None:
            unknown = [n for n in layers if n not in self.specs]
            if unknown or not layers:
                raise UserError(f"layer group {list(layers)[:3]}: not tracked by this engine ({unknown[:3]})")
            groups = [{n: self.specs[n] for n in layers}]
        else:
            groups = self.layer_groups()
        if len(groups) == 1 and list(groups[0]) == list(self.specs):
            return [(self.runner, self.specs)]
        out = []
        for g in groups:
            runner = Runner(self.model, {n: self.tracked[n] for n in g}, g, self.device)
            runner._lock = self.runner._lock
            out.append((runner, g))
        return out

    def fit_covariance(self, examples: Sequence[Example], progress: Progress | None = None, *,
                       layers: Sequence[str] | None = None) -> CovariancePartial:
        """Partial sums of ``a a^T`` and ``g g^T`` over these examples (add partials with ``+``); one pass per
        group of layers when they do not fit the device together (:meth:`layer_groups`). With ``layers`` (one
        group, e.g. mapped to a worker of its own) one pass over those layers alone, and the partial holds only
        them (:meth:`CovariancePartial.join` puts groups back together)."""
        parts = []
        for runner, specs in self._group_runners(layers):
            acc = CovarianceAccumulator(specs, self.device, self.dtype)
            runner.run(examples, acc, self._cfg(self._fit_labels), progress)
            parts.append(self._covariance_partial(acc))
        if len(parts) == 1:
            return parts[0]
        return CovariancePartial.join(parts)

    @staticmethod
    def _covariance_partial(acc: CovarianceAccumulator) -> CovariancePartial:
        return CovariancePartial(acc.total.specs, {n: t.cpu().double() for n, t in acc.total.A.items()},
                                 {n: t.cpu().double() for n, t in acc.total.S.items()}, acc.total.n_tokens,
                                 acc.total.n_docs, dict(acc.total.tokens))

    def _keeps_tokens(self, n_docs: int, n_tokens: int | None) -> bool:
        """Whether the one-pass fit keeps tokens rather than per-document gradients (the smaller; never for layers
        whose tokens are routed, such as experts)."""
        if n_tokens is None or self.runner.gathered or any(getattr(m, "routed", None) is not None
                                                           for m in self.tracked.values()):
            return False
        return keeps_tokens(self.specs, n_docs, n_tokens, self.runner.gemm_dtype(self.precision).itemsize,
                            self.dtype.itemsize, 2 if self.fisher == "sampled" else 1)

    def gradient_cache_bytes(self, n_docs: int, n_tokens: int | None = None) -> int:
        """Memory the one-pass fit's cache of ``n_docs`` documents (``n_tokens`` tokens in all, when known) takes on
        this engine's device: their gradients (:class:`GradientCache`) or, when smaller, their tokens
        (:class:`TokenCache`)."""
        sets = 2 if self.fisher == "sampled" else 1
        if self._keeps_tokens(n_docs, n_tokens):
            return token_cache_bytes(self.specs, n_tokens, self.dtype.itemsize, sets)
        return cache_bytes(self.specs, n_docs, self.runner.gemm_dtype(self.precision).itemsize, sets)

    def fit_covariance_cached(self, examples: Sequence[Example], progress: Progress | None = None, *,
                              keep: str = "auto") -> tuple[CovariancePartial, GradientCache | TokenCache]:
        """:meth:`fit_covariance`, keeping what :meth:`fit_lambda` and :meth:`score` need so they run no pass of
        their own (``cache=``): one forward pass, one backward pass per label set. ``keep``: ``gradients`` (each
        document's, per layer), ``tokens`` (each token's inputs and output gradients) or ``auto`` (the
        smaller). Check :meth:`gradient_cache_bytes` first: the cache lives on the engine's device."""
        objectives = ["sampled", "true"] if self.fisher == "sampled" else ["true"]
        ids = [e.id for e in examples]
        if len(set(ids)) != len(ids):
            raise UserError("document ids are not unique")
        n_tokens = sum(len(e.input_ids) for e in examples)
        if keep not in ("auto", "gradients", "tokens"):
            raise ValueError(f"keep must be auto, gradients or tokens, not {keep!r}")
        if keep == "tokens" or (keep == "auto" and self._keeps_tokens(len(ids), n_tokens)):
            acc = TokenCachingCovarianceAccumulator(self.specs, self.device, self.dtype, self.dtype, n_tokens,
                                                    objectives)
        else:
            acc = CachingCovarianceAccumulator(self.specs, self.device, self.dtype,
                                               self.runner.gemm_dtype(self.precision), len(ids), objectives)
        self.runner.run(examples, acc, replace(self._cfg("true"), labels="+".join(objectives)), progress)
        return self._covariance_partial(acc), acc.cache()

    def fit_lambda(self, examples: Sequence[Example], basis: Eigenbasis | None, progress: Progress | None = None, *,
                   cache: GradientCache | TokenCache | None = None,
                   layers: Sequence[str] | None = None) -> LambdaPartial:
        """Partial eigenvalue corrections in ``basis`` (``None``: the diagonal of the Fisher); from the
        cached gradients of these examples, without a pass, when ``cache`` is given. With ``layers``, one pass over
        those layers alone (``basis`` needs only them), as :meth:`fit_covariance`."""
        if cache is not None:
            if layers is not None:
                raise UserError("a replay from the gradient cache covers every layer at once")
            acc = LambdaAccumulator(self.specs, basis, self.device, self.dtype, self.runner.gemm_dtype(self.precision))
            self._replay(examples, cache, "fisher", acc, progress)
            total = acc.total
            return LambdaPartial(total.specs, {n: t.cpu() for n, t in total.sums.items()}, total.n_docs,
                                 total.rotated)
        sums, n_docs, mine = {}, 0, {}
        for runner, specs in self._group_runners(layers):  # one pass per group of layers that fit the device
            acc = LambdaAccumulator(specs, basis, self.device, self.dtype, self.runner.gemm_dtype(self.precision))
            runner.run(examples, acc, self._cfg(self._fit_labels), progress)
            sums |= {n: t.cpu() for n, t in acc.total.sums.items()}
            n_docs = acc.total.n_docs
            mine |= specs
        order = self.specs if layers is None else mine
        return LambdaPartial(dict(order), {n: sums[n] for n in order}, n_docs, basis is not None)

    def _replay(self, examples: Sequence[Example], cache: GradientCache | TokenCache, objective: str, acc,
                progress: Progress | None) -> None:
        """Stored gradients (or tokens) of ``examples`` for ``objective`` (``true``, ``fisher``) through ``acc``
        instead of a pass."""
        cache.check_covers([e.id for e in examples])
        tokens = {e.id: len(e.input_ids) for e in examples}
        cache.replay(self.runner, objective, acc, self.precision, [tokens[i] for i in cache.ids], progress)

    def finalize(self, settings: FactorSettings | str, *, basis: Eigenbasis | None = None,
                 lambdas: LambdaPartial | None = None, covariance: CovariancePartial | None = None,
                 damping: float | str | None = None, extra_meta: dict[str, Any] | None = None) -> Factors:
        """Assemble factors from the fitted pieces ``settings`` (or a strategy name, with ``damping``) needs."""
        if isinstance(settings, str):
            settings = self.factor_settings(settings, damping)
        elif damping is not None:
            raise ValueError("damping is part of the settings")
        self._check_settings(settings)
        meta: dict[str, Any] = {"settings": settings.to_json(), "library_version": __version__}
        if covariance is not None:
            meta |= {"covariance_tokens": covariance.n_tokens, "covariance_docs": covariance.n_docs}
        if lambdas is not None:
            meta |= {"lambda_docs": lambdas.n_docs}
        factors = finalize(settings.strategy, self.specs, basis=basis, lambdas=lambdas,
                           damping=settings.damping_value, meta=meta | (extra_meta or {}))
        # everything that uses them computes in this engine's dtype: float32 factors outside fp64 mode halve
        # the bytes stored, loaded and moved to the device (eigendecomposition and damping stay float64)
        for n, t in factors.tensors.items():  # layer by layer: never a second copy of every layer at once
            factors.tensors[n] = {k: v.to(self.dtype) for k, v in t.items()}
        return factors

    def fit_factors(self, examples: Sequence[Example], strategy: FactorSettings | str = "ekfac", *,
                    damping: float | str | None = "auto", progress: Progress | None = None,
                    cache: bool = False, keep: str = "auto") -> Factors | tuple[Factors, GradientCache | TokenCache]:
        """All of fitting in one call: the passes the strategy needs (covariances and eigenbasis, eigenvalue
        correction). ``strategy`` is a name (with ``damping``; the data fingerprint is then the examples'
        tokens') or full :class:`FactorSettings`. With ``cache`` (strategies with a covariance pass) one pass
        fits everything and the documents' gradients (or tokens: ``keep``, see :meth:`fit_covariance_cached`) are
        returned too, ready for ``score(..., cache=)``."""
        settings = strategy if isinstance(strategy, FactorSettings) else self.factor_settings(
            strategy, damping, data_fingerprint=examples_fingerprint(examples))
        kind = get_strategy(settings.strategy)
        basis = cov = lam = gc = None
        if cache and not kind.covariance:
            raise UserError(f"a gradient cache is built by the covariance pass, which strategy {kind.name!r} has not")
        if kind.covariance:
            cov, gc = self.fit_covariance_cached(examples, progress, keep=keep) if cache else (
                self.fit_covariance(examples, progress), None)
            basis = eigendecompose(cov, self.device, self.device_memory_budget)
            cov = cov.counts_only()  # the sums are spent: free them before the next pass
        if kind.lambdas:
            lam = self.fit_lambda(examples, basis if kind.lambda_basis else None, progress, cache=gc)
        factors = self.finalize(settings, basis=basis, lambdas=lam, covariance=cov)
        return (factors, gc) if cache else factors

    def _check_settings(self, settings: FactorSettings) -> None:
        mine = self.factor_settings(settings.strategy, settings.damping, data_fingerprint=settings.data_fingerprint)
        mine.check_matches(settings.to_json(), "these settings")

    def check_factors(self, factors: Factors) -> None:
        """Refuse factors made for another model or other layers."""
        settings = factors.settings
        if settings is not None and settings.model_fingerprint != self.fingerprint:
            raise FactorMismatchError("factors were fitted on another model (weights differ)",
                                      hint="refit with `influence-audit fit-factors`")
        if list(factors.specs) != list(self.specs):
            raise FactorMismatchError("factors track other layers than this engine", hint="use the same --layers")

    # ---------------------------------------------------------------------------------------------- scores
    def prepare_queries(self, examples: Sequence[Example], factors: Factors, rank: int = 32) -> PreparedQueries:
        """Preconditioned (and, above ``rank``, compressed) query gradients."""
        self.check_factors(factors)
        ids = [e.id for e in examples]
        if len(set(ids)) != len(ids):
            raise UserError("query ids are not unique")
        acc = QueryAccumulator(self.specs, factors, rank, self.dtype,  # float32 unless fp64
                               keep_factors=len(examples) > self.batch_size and len(self.layer_groups()) == 1)
        self.runner.run(examples, acc, self._cfg("true"))
        return acc.prepared(ids)

    def score(self, examples: Sequence[Example], queries: PreparedQueries, *, top_k: int = 50,
              return_all: bool = False, progress: Progress | None = None,
              cache: GradientCache | TokenCache | None = None) -> ScoreResult:
        """Score every document against every query; keep the top ``top_k`` per query (0: all). With
        ``cache`` (these documents' gradients, from :meth:`fit_covariance_cached`) no pass runs: the stored
        gradients go through the same scoring accumulator."""
        if list(queries.specs) != list(self.specs):
            raise UserError("prepared queries track other layers than this engine")
        n = len(examples)
        doc_ids = [e.id for e in examples]
        position = {d: i for i, d in enumerate(doc_ids)}
        if len(position) != n:
            raise UserError("document ids are not unique")
        keep = n if top_k == 0 else top_k
        topk = TopK(max(1, keep))
        all_scores = torch.zeros(len(queries), n, dtype=torch.float64) if (return_all or top_k == 0) else None
        tokens = 0

        def push(ctx: PassContext, layer_scores: dict[str, torch.Tensor]) -> None:
            nonlocal tokens
            scores = sum(layer_scores.values())
            check_scores(scores, layer_scores)
            index = torch.tensor([position[d] for d in ctx.batch.ids])
            if top_k:  # with every pair kept, all_scores is the result: no running top-k over the whole corpus
                topk.push(scores, index)
            if all_scores is not None:
                all_scores[:, index] = scores.T.double().cpu()
            tokens += ctx.batch.n_tokens

        tokens_per_doc = float(np.mean([len(e.input_ids) for e in examples])) if n else 1.0
        acc = ScoreAccumulator(queries, self.device, self.dtype, tokens_per_doc,
                               gemm_dtype=self.runner.gemm_dtype(self.precision), on_batch=push,
                               paths={name: "gradient" for name in self.specs}
                               if isinstance(cache, GradientCache) else None)
        if cache is not None:  # kept tokens go through forward/backward as a pass would: each layer's own path
            self._replay(examples, cache, "true", acc, progress)
            paths = {name: "cached" for name in self.specs}
        else:
            self.runner.run(examples, acc, self._cfg("true"), progress)
            paths = acc.paths
        if n == 0:
            empty = np.zeros((len(queries), 0))
            return ScoreResult(queries.ids, doc_ids, empty, empty.astype(int), None, 0, paths)
        if not top_k:
            topk.values, topk.index = torch.sort(all_scores, dim=1, descending=True)
        return ScoreResult(queries.ids, doc_ids, topk.values.double().cpu().numpy(), topk.index.cpu().numpy(),
                           None if all_scores is None else all_scores.numpy(), tokens, paths)

    def explain(self, examples: Sequence[Example], queries: PreparedQueries) -> list[Explanation]:
        """Per-layer and per-token scores of these documents against every query."""
        out: dict[str, Explanation] = {}
        by_id = {e.id: e for e in examples}

        def keep(ctx: PassContext, layer_scores: dict[str, torch.Tensor]) -> None:
            for b, doc_id in enumerate(ctx.batch.ids):
                e = by_id[doc_id]
                off = ctx.batch.offsets[b]
                sl = slice(off, off + len(e.input_ids))
                out[doc_id] = Explanation(doc_id, list(e.input_ids), list(queries.ids),
                                          {n: s[b, sl].double().cpu().numpy() for n, s in layer_scores.items()})

        acc = ScoreAccumulator(queries, self.device, self.dtype, 1.0, per_token=True, on_batch=keep)
        self.runner.run(examples, acc, self._cfg("true"))
        return [out[e.id] for e in examples]

    def self_influence(self, examples: Sequence[Example], factors: Factors,
                       progress: Progress | None = None) -> dict[str, float]:
        """``<∇L_d, (H + λI)^{-1} ∇L_d>`` per document (a common outlier screen)."""
        self.check_factors(factors)
        acc = SelfInfluenceAccumulator(factors)
        self.runner.run(examples, acc, self._cfg("true"), progress)
        return acc.values

    def document_signals(self, examples: Sequence[Example], factors: Factors,
                         progress: Progress | None = None) -> list[DocumentSignals]:
        """Self-influence (per document and per token position) and loss of each document, in one pass, in
        ``examples`` order: the engine's part of a query-free quality audit (quality.py)."""
        self.check_factors(factors)
        if len({e.id for e in examples}) != len(examples):
            raise UserError("document ids are not unique")
        acc = DocumentSignalAccumulator(factors, examples)
        self.runner.run(examples, acc, self._cfg("true"), progress)
        return [acc.signals[e.id] for e in examples]
