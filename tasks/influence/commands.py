"""``fit-factors`` and ``score`` as functions that do the work and return what happened (the CLI prints it).

Both start the same way (:func:`load_corpus`): read every training document, build the engine, tokenise, and
derive the factor settings. ``score`` then fits (or reuses) factors, prepares the queries once, scores (all
documents, or a BM25 prefilter's candidates) and, with ``--verify K``, checks the top candidates
counterfactually with the same prepared queries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import polars as pl

from influence_engine import Example, FactorSettings, InfluenceEngine
from tasks.files import check_out_file, write_parquet_atomic
from tasks.influence import compute
from tasks.inputs import sources
from tasks.inputs.preflight import check_writable, resolve_model
from tasks.inputs.rows import data_fingerprint, encode_frame
from tasks.options import (
    CacheOptions,
    CheckpointOptions,
    DataOptions,
    FactorOptions,
    IndexOptions,
    ModelOptions,
    QueryOptions,
    RuntimeOptions,
    SearchOptions,
    VerifyOptions,
    engine_spec,
    fields_of,
    parse_prefilter,
)
from tasks.reporting import Reporter, Silent


@dataclass
class Corpus:
    """The training documents read and tokenised for one engine, and the settings their factors have."""

    engine: InfluenceEngine
    frame: pl.DataFrame
    docs: list[Example]
    settings: FactorSettings
    model_dir: str


def unknown_token_notice(eng: InfluenceEngine, docs: list[Example], where: str) -> str | None:
    """A word-level tokenizer maps words it does not know to one token: how much of the text that is (None when
    none is)."""
    unk = getattr(eng.tokenizer, "unk_token_id", None)
    if unk is None:
        return None
    n_unk = sum(e.input_ids.count(unk) for e in docs)
    total = sum(len(e.input_ids) for e in docs)
    if not n_unk:
        return None
    return (f"warning: {n_unk} of {total} {where} tokens ({n_unk / max(total, 1):.1%}) are the tokenizer's unknown "
            f"token {eng.tokenizer.unk_token!r}: its vocabulary does not cover this text")


def load_corpus(model: ModelOptions, data: DataOptions, factors: FactorOptions, runtime: RuntimeOptions,
                report: Reporter) -> Corpus:
    """Read every training document, build the engine, tokenise, and the factor settings for this data."""
    df = sources.read_rows(data.train, "train", fields=fields_of(data), split=data.split)
    model_dir = resolve_model(model.model)
    opts = SimpleNamespace(**(model.model_dump() | factors.model_dump() | runtime.model_dump()))
    eng = engine_spec(opts, model_dir).engine()
    docs = encode_frame(eng, df, "train")
    if note := unknown_token_notice(eng, docs, "training"):
        report.notice(note)
    settings = eng.factor_settings(factors.strategy, factors.damping, data_fingerprint=data_fingerprint(df))
    return Corpus(eng, df, docs, settings, model_dir)


def fit_label(strategy: str, one_pass: bool) -> str:
    return f"fitting {strategy} factors" + (" (one pass: gradients kept for scoring)" if one_pass else "")


@dataclass
class FitRun:
    n_layers: int
    n_docs: int
    truncated: int
    max_length: int
    out_dir: Path


def fit_factors(model: ModelOptions, data: DataOptions, factors: FactorOptions, runtime: RuntimeOptions,
                out_dir: Path, report: Reporter | None = None) -> FitRun:
    """Fit factors on the training documents and store them in ``out_dir`` (reused when stored there with the
    same settings)."""
    from influence_engine import get_strategy

    report = report or Silent()
    if out_dir.exists() and not out_dir.is_dir():
        from influence_engine.errors import UserError

        raise UserError(f"--out {out_dir}: is a file, not a directory", hint="name a directory for the factors")
    check_writable(out_dir, f"--out {out_dir}")
    corpus = load_corpus(model, data, factors, runtime, report)
    passes = len(get_strategy(factors.strategy).stages)
    n = len(corpus.docs)
    with report.stage(fit_label(factors.strategy, False), passes * n) as bar:
        done = [0]

        def progress(d: int, t: int) -> None:
            bar(done[0] + d, t)
            if d == n:
                done[0] += d

        fitted = compute.fit(corpus.engine, corpus.docs, corpus.settings, out_dir=out_dir, progress=progress,
                             notice=report.notice)
    return FitRun(len(fitted.factors.specs), n, sum(e.truncated for e in corpus.docs), factors.max_length, out_dir)


@dataclass
class ScoreRun:
    n_queries: int
    n_docs: int
    n_tokens: int
    truncated: int
    max_length: int
    seconds: float
    one_pass: bool
    out_path: Path
    prefilter: dict[str, Any] | None = None
    verification: dict[str, Any] | None = field(default=None)
    checkpoints: int = 1  # models whose scores were averaged (the model and its --checkpoint's)


def checkpoint_scores(corpus: Corpus, paths: list[str], factors: FactorOptions, runtime: RuntimeOptions,
                      trust_remote_code: bool, query_df: pl.DataFrame, query_rank: int, factors_dir: Path | None,
                      budget: float, report: Reporter) -> list[Any]:
    """Every document's scores on each other checkpoint (``--checkpoint``): its own engine, factors (stored under
    ``factors_dir/checkpoints/<fingerprint>`` when a factors directory is given) and prepared queries; one
    checkpoint in memory at a time. The checkpoints must tokenise the documents as the model does."""
    from influence_engine.errors import UserError

    results = []
    for path in paths:
        opts = SimpleNamespace(model=path, trust_remote_code=trust_remote_code, **factors.model_dump(),
                               **runtime.model_dump())
        eng = engine_spec(opts, resolve_model(path)).engine()
        docs = encode_frame(eng, corpus.frame, "train")
        if [d.input_ids for d in docs] != [d.input_ids for d in corpus.docs]:
            raise UserError(f"--checkpoint {path}: its tokenizer splits the training documents differently from "
                            f"--model's", hint="give checkpoints of the same model (same tokenizer)")
        settings = eng.factor_settings(factors.strategy, factors.damping,
                                       data_fingerprint=corpus.settings.data_fingerprint)
        out_dir = None if factors_dir is None else factors_dir / "checkpoints" / settings.model_fingerprint[:16]
        with report.stage(f"checkpoint {path}: " + fit_label(factors.strategy, compute.one_pass(
                eng, docs, settings, budget)), len(docs)) as bar:
            fitted = compute.fit(eng, docs, settings, out_dir=out_dir, cache_budget_bytes=budget, progress=bar,
                                 notice=report.notice)
        with report.stage(f"checkpoint {path}: scoring", len(docs)) as bar:
            results.append(compute.score(eng, docs, encode_frame(eng, query_df, "queries"), fitted,
                                         rank=query_rank, top_k=0, progress=bar))
        del eng, fitted
    return results


def score(model: ModelOptions, data: DataOptions, factors: FactorOptions, runtime: RuntimeOptions,
          queries: QueryOptions, search: SearchOptions, verify: VerifyOptions, *, out_path: Path,
          factors_dir: Path | None = None, gradient_cache_gb: float = 2.0, report: Reporter | None = None,
          checkpoints: CheckpointOptions | None = None) -> ScoreRun:
    """Rank the training documents by influence on each query; the scores go to ``out_path`` (Parquet). With
    ``checkpoints``, each document's score is the mean of its scores on the model and on every checkpoint."""
    from influence_engine.errors import UserError

    report = report or Silent()
    others = list(checkpoints.checkpoint) if checkpoints is not None else []
    if others and search.prefilter:
        raise UserError("--checkpoint with --prefilter: not supported (every checkpoint scores every document)",
                        hint="leave out one of the two")
    if gradient_cache_gb < 0:
        raise UserError(f"--gradient-cache-gb {gradient_cache_gb}: must be >= 0")
    if search.use_index:
        raise UserError("--use-index: score scans every document; build an index with `influence-audit index "
                        "build` and query it with `index query`, or use `audit --use-index`")
    k_prefilter = parse_prefilter(search.prefilter)
    check_out_file(out_path, ".parquet")
    query_df = sources.read_rows(queries.queries, "queries")
    corpus = load_corpus(model, data, factors, runtime, report)
    eng, docs = corpus.engine, corpus.docs
    qs = encode_frame(eng, query_df, "queries")
    if note := unknown_token_notice(eng, qs, "query"):
        report.notice(note)
    t0 = time.perf_counter()
    budget = gradient_cache_gb * 2**30
    with report.stage(fit_label(factors.strategy, compute.one_pass(eng, docs, corpus.settings, budget)),
                      len(docs)) as bar:
        fitted = compute.fit(eng, docs, corpus.settings, out_dir=factors_dir, cache_budget_bytes=budget,
                             progress=bar, notice=report.notice)
    prepared = eng.prepare_queries(qs, fitted.factors, rank=queries.query_rank)
    prefilter = None
    if k_prefilter is not None:
        from tasks.influence.prefilter import bm25_candidates, score_candidates

        cands = bm25_candidates(corpus.frame, query_df, k_prefilter)
        rows = score_candidates(eng, docs, prepared, cands, queries.top_k)
        prefilter = {"k": k_prefilter, "scored": len(cands.union), "fraction": cands.fraction_scored} | cands.seconds
        n_tokens = sum(len(e.input_ids) for e in docs if e.id in cands.union)
    else:
        with report.stage(f"scoring {len(qs)} queries" + (" from kept gradients" if fitted.cache else ""),
                          len(docs)) as bar:
            result = eng.score(docs, prepared, top_k=0 if others else queries.top_k, progress=bar,
                               cache=fitted.cache)
        if others:
            from influence_engine import CheckpointScores, checkpoint_weights

            combined = CheckpointScores(checkpoint_weights(1 + len(others)))
            combined.add(result)
            for r in checkpoint_scores(corpus, others, factors, runtime, model.trust_remote_code, query_df,
                                       queries.query_rank, factors_dir, budget, report):
                combined.add(r)
            result = combined.result(queries.top_k)
        rows, n_tokens = result.top_rows(), result.n_tokens
    write_parquet_atomic(compute.score_frame(rows), out_path)
    verification = None
    if verify.verify_k:
        from tasks.influence.verify import settings_from, verify_candidates

        verification = verify_candidates(eng, audit_dir=out_path.parent / f"{out_path.stem}.verification",
                                         candidates_path=out_path, train=corpus.frame, queries=query_df,
                                         prepared=prepared, k=verify.verify_k,
                                         settings=settings_from(verify.verify_check, verify.verify_lr),
                                         log=report.notice)
    truncated = sum(e.truncated for e in docs) + sum(q.truncated for q in qs)
    return ScoreRun(len(qs), len(docs), n_tokens, truncated, factors.max_length, time.perf_counter() - t0,
                    fitted.cache is not None, out_path, prefilter, verification, 1 + len(others))


@dataclass
class IndexBuildRun:
    documents: int
    bytes_per_document: float
    sketch: str
    dtype: str
    seconds: float
    out_dir: Path
    probe_recall: dict | None = None


def index_build(model: ModelOptions, data: DataOptions, factors: FactorOptions, runtime: RuntimeOptions,
                index: IndexOptions, cache: CacheOptions, *, out_dir: Path, factors_dir: Path | None = None,
                index_dtype: str = "auto", part_size: int = 10000, report: Reporter | None = None) -> IndexBuildRun:
    """One pass over the corpus writing each document's whitened, sketched gradient (factors fitted or reused
    first)."""
    from influence_engine.errors import UserError
    from influence_engine.index import check_strategy
    from tasks.influence import index as ix

    report = report or Silent()
    check_strategy(factors.strategy)
    options = ix.IndexOptions(sketch=index.sketch, dtype=index_dtype, probes=index.probes)
    options.check()
    if part_size < 1:
        raise UserError(f"--part-size {part_size}: must be >= 1")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: is a file, not a directory", hint="name a directory for the index")
    check_writable(out_dir, f"--out {out_dir}")
    corpus = load_corpus(model, data, factors, runtime, report)
    probes = None
    if index.probe_queries:
        from tasks.inputs.rows import encode_frame

        probes = encode_frame(corpus.engine, sources.read_rows(index.probe_queries, "queries"), "probe queries")
    t0 = time.perf_counter()
    with report.stage("fitting factors and indexing", len(corpus.docs)) as bar:
        built = ix.build(corpus.engine, corpus.docs, corpus.settings, out_dir, options=options,
                         factors_dir=factors_dir, cache_budget_bytes=cache.gradient_cache_gb * 2**30,
                         part_size=part_size, sources=[str(Path(p).resolve()) for p in data.train],
                         model_dir=corpus.model_dir, data=data.model_dump(exclude={"train"}), progress=bar,
                         notice=report.notice, probes=probes)
    size = ix.index_size(built)
    return IndexBuildRun(int(size["documents"]), size["bytes_per_document"], built.meta["sketch"],
                         built.meta["dtype"], time.perf_counter() - t0, out_dir, built.meta.get("probe_recall"))


@dataclass
class IndexQueryRun:
    n_queries: int
    times: Any
    refine: int
    seconds: float
    out_path: Path
    probe_recall: dict | None = None


def index_query(index_dir: Path, queries: QueryOptions, index: IndexOptions, runtime: RuntimeOptions, *,
                out_path: Path, model_dir: Path | None = None, search: str = "exact", trust_remote_code: bool = False,
                report: Reporter | None = None) -> IndexQueryRun:
    """New queries against an index: only the queries' gradients are computed (plus the exact re-scoring of each
    query's top ``index.refine``)."""
    from influence_engine.errors import UserError
    from tasks.influence import index as ix

    report = report or Silent()
    if queries.top_k < 1:
        raise UserError(f"--top-k {queries.top_k}: must be >= 1 for an index query")
    check_out_file(out_path, ".parquet")
    qdf = sources.read_rows(queries.queries, "queries")
    t0 = time.perf_counter()
    times = ix.QueryTimes()
    result = ix.query(index_dir, qdf, top_k=queries.top_k, refine=index.refine,
                      model_dir=str(model_dir) if model_dir else None, device=runtime.device,
                      batch_size=runtime.batch_size, search=search, trust_remote_code=trust_remote_code,
                      notice=report.notice, times=times)
    write_parquet_atomic(result, out_path)
    from influence_engine.index import GradientIndex

    return IndexQueryRun(qdf.height, times, index.refine, time.perf_counter() - t0, out_path,
                         GradientIndex.open(index_dir).meta.get("probe_recall"))
