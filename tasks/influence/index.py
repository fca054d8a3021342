"""The gradient index as plain functions (the CLI's ``index build`` / ``index query`` and the flow's tasks).

Build: factors (reused or fitted), then one pass over the documents writing their whitened, sketched gradients
as parts (one per shard in the flow, one per ``part_size`` documents on the CLI), each written atomically so a
build resumes where it stopped. Query: the queries' gradients only, a top-``max(top_k, refine)`` search, then
(``refine``) the candidates re-scored with the full EK-FAC (full-rank queries, no sketch) by a pass over the
candidates alone, and reranked: the reported scores of refined documents are exact.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from influence_engine import Example, FactorMismatchError, Factors, FactorSettings, InfluenceEngine, UserError
from influence_engine.index import GradientIndex, check_strategy, parse_sketch_spec, sketch_name, store_dtype
from tasks.engine import EngineSpec
from tasks.influence.compute import Fitted, fit
from tasks.inputs.rows import Fields, encode_frame
from tasks.inputs.shards import Shard, shard_docs

Progress = Callable[[int, int], None]
Notice = Callable[[str], None]
DocsFor = Callable[[set[str]], list[Example]]  # the training documents with these ids, tokenised

INDEX_SCHEMA = {"query_id": pl.String, "train_id": pl.String, "score": pl.Float64, "rank": pl.Int64,
                "index_score": pl.Float64, "refined": pl.Boolean}
SEARCHES = ("exact", "faiss")


@dataclass(frozen=True)
class IndexOptions:
    """How an index is built and searched: ``sketch`` (``OUTxIN`` per layer, or ``off``), stored ``dtype``
    (``auto``: fp64 for fp64 passes, else fp16), ``search`` (``exact`` or ``faiss``)."""

    sketch: str = "lowrank:4x2"  # tasks/options.py's DEFAULT_SKETCH
    dtype: str = "auto"
    search: str = "exact"
    probes: int = 8
    sample_docs: int = 1000

    def check(self) -> None:
        parse_sketch_spec(self.sketch)
        if self.probes < 0 or self.sample_docs < 1:
            raise UserError("--probes must be >= 0 and the pca sample >= 1 document")
        store_dtype("fp32", self.dtype)
        if self.search not in SEARCHES:
            raise UserError(f"--search {self.search!r}: choose exact or faiss")


def index_dir(home: Path, settings: FactorSettings, options: IndexOptions) -> Path:
    """Where the flow keeps the index of these factor settings (model and data fingerprints included)."""
    spec = parse_sketch_spec(options.sketch)
    name = "off" if spec is None else sketch_name(*spec).replace(":", "-")
    return home / "index" / f"{settings.key()}-{name}-{store_dtype(settings.precision, options.dtype)}"


def spread(docs: Sequence[Example], n: int) -> list[Example]:
    """``n`` documents evenly spread over ``docs`` (all of them when fewer): a deterministic sample."""
    if n >= len(docs):
        return list(docs)
    return [docs[int(i)] for i in np.linspace(0, len(docs) - 1, n).round().astype(int)]


def open_index(directory: str | Path, eng: InfluenceEngine, factors: Factors, options: IndexOptions,
               extra: dict[str, Any] | None = None, docs: Sequence[Example] = (),
               probes: Sequence[Example] | None = None) -> GradientIndex:
    """Create (or reopen) the index. ``docs``: where a ``pca`` sketch's sample and the default probes come from
    (``options.probes`` training documents, evenly spread, as queries) unless ``probes`` are given."""
    if probes is None and options.probes and docs:
        probes = [Example(f"probe:{e.id}", e.input_ids, 1, len(e.input_ids))
                  for e in spread(docs, options.probes)]
    return GradientIndex.create(directory, eng, factors, sketch=options.sketch, sketch_seed=eng.seed,
                                dtype=store_dtype(eng.precision, options.dtype), extra=extra,
                                sample=spread(docs, options.sample_docs), probes=probes)


# ------------------------------------------------------------------------------------------------ build
def build(eng: InfluenceEngine, docs: Sequence[Example], settings: FactorSettings, out_dir: str | Path, *,
          options: IndexOptions, factors_dir: str | Path | None = None, cache_budget_bytes: float = 0,
          part_size: int = 10000, sources: Sequence[str] = (), model_dir: str = "",
          data: dict[str, str] | None = None, progress: Progress | None = None,
          notice: Notice | None = None, probes: Sequence[Example] | None = None) -> GradientIndex:
    """Fit (or reuse) factors, then write every document's index vector. With every document's gradients
    within ``cache_budget_bytes`` the factors' one pass keeps them and the index is written from them (no
    further pass); otherwise one pass, ``part_size`` documents per part. ``data``: how the sources were read
    (``split``, ``id_field``, ``text_field``), recorded so ``--refine`` reads them the same way."""
    check_strategy(settings.strategy)
    options.check()
    out = Path(out_dir)
    fdir = Path(factors_dir) if factors_dir is not None else out / "factors"
    fitted: Fitted = fit(eng, docs, settings, out_dir=fdir, cache_budget_bytes=cache_budget_bytes,
                         progress=progress, notice=notice)
    index = open_index(out, eng, fitted.factors, options, {
        "model_dir": model_dir, "train": list(sources), "data": dict(data or {}), "factors_dir": str(fdir.resolve()),
        "n_docs": len(docs)}, docs=docs, probes=probes)
    if fitted.cache is not None:
        index.build_part("part-00000", eng, docs, fitted.factors, progress, cache=fitted.cache)
    else:
        for i, s in enumerate(range(0, len(docs), part_size)):
            index.build_part(f"part-{i:05d}", eng, docs[s:s + part_size], fitted.factors, progress)
    index.probe_recall()
    return index


def part_name(shard: Shard) -> str:
    return f"shard-{shard.index:05d}-{shard.key}"


def create_for_shards(spec: EngineSpec, settings: FactorSettings, shards: Sequence[Shard], directory: str,
                      factor_dir: str, options: IndexOptions) -> str:
    """The flow's index, created once before its parts are mapped (a ``pca`` sketch and the probes come from the
    first shard's documents), so every part is written with the same projection and probes."""
    if not (Path(directory) / "index.json").exists():
        eng = spec.engine()
        factors = Factors.load(factor_dir, settings=settings, layers=list(eng.specs))
        open_index(directory, eng, factors, options, {"factors_dir": factor_dir, "model_dir": spec.model_dir},
                   docs=shard_docs(eng, shards[0]) if shards else ())
    return directory


def finish_shards(directory: str) -> dict[str, Any] | None:
    """After every part: the probes' recall, stored in the index's metadata."""
    index = GradientIndex.open(directory)
    return index.meta.get("probe_recall") or index.probe_recall()


def build_shard_part(spec: EngineSpec, settings: FactorSettings, shard: Shard, directory: str, factor_dir: str,
                     options: IndexOptions) -> str:
    """The flow's mapped stage: one shard's part of the index (skipped when written)."""
    index = GradientIndex.open(directory) if (Path(directory) / "index.json").exists() else None
    if index is None or not index.has_part(part_name(shard)):
        eng = spec.engine()
        factors = Factors.load(factor_dir, settings=settings, layers=list(eng.specs))
        docs = shard_docs(eng, shard)
        index = open_index(directory, eng, factors, options, {"factors_dir": factor_dir, "model_dir": spec.model_dir},
                           docs=docs)
        index.build_part(part_name(shard), eng, docs, factors)
    return part_name(shard)


# ------------------------------------------------------------------------------------------------ query
@dataclass
class QueryTimes:
    queries: float = 0.0
    search: float = 0.0
    refine: float = 0.0
    refined_docs: int = 0
    candidates: int = 0  # the union of every query's top ``refine`` (what refinement re-scores without the bound)
    certified: int = 0  # queries whose refined top k is provably the exact top k of the whole index


def prune_candidates(index: GradientIndex, query_norms: np.ndarray | None, scores: np.ndarray, ids: list[list[str]],
                     top_k: int, refine: int) -> tuple[list[list[str]], int]:
    """Per query, the candidates (its top ``refine`` from the index) that can still be in its exact top
    ``top_k``: with an orthonormal sketch ``|exact - index| ≤ b`` (:meth:`GradientIndex.residual_bound`), so a
    candidate whose upper bound ``s + b`` is below the ``top_k``-th largest lower bound ``s - b`` cannot be, and
    is not re-scored. Also counts the queries whose result is certified for the whole index: every document
    outside the candidates is bounded by the next index score plus the largest bound. Without the bound (random
    sketch, older index) every candidate is kept."""
    cands = [row[:refine] for row in ids]
    if query_norms is None or not index.orthonormal:
        return cands, 0
    parts = index.parts()
    norms = [index.norms(p.name) for p in parts]
    if any(n is None for n in norms):
        return cands, 0
    at = {d: i for i, d in enumerate(i for p in parts for i in index.ids(p.name))}
    dn = np.concatenate(norms)
    worst = index.residual_bound(query_norms, dn).max(axis=1)  # (Q,) the largest bound over every document
    kept, certified = [], 0
    for q, row in enumerate(cands):
        s = np.asarray(scores[q][:len(row)], dtype=np.float64)
        b = index.residual_bound(query_norms[q:q + 1], dn[[at[d] for d in row]])[0]
        if len(row) <= top_k:
            kept.append(row)
            continue
        low = np.sort(s - b)[::-1][top_k - 1]
        kept.append([d for d, up in zip(row, s + b, strict=True) if up >= low])
        nxt = scores[q][len(row)] if len(scores[q]) > len(row) else -np.inf
        certified += int(nxt + worst[q] < low)
    return kept, certified


def search_and_refine(eng: InfluenceEngine, index: GradientIndex, factors: Factors, queries: Sequence[Example], *,
                      top_k: int, refine: int = 0, docs_for: DocsFor | None = None, search: str = "exact",
                      parts: Sequence[str] | None = None, times: QueryTimes | None = None,
                      prune: bool = True) -> pl.DataFrame:
    """Top ``top_k`` documents per query from the index; with ``refine`` the top ``refine`` candidates of each
    query are re-scored exactly (full EK-FAC, full-rank queries) by a pass over those documents alone
    (``docs_for``), reranked, and the top ``top_k`` kept (``refined`` true). With ``prune`` (and an orthonormal
    sketch) candidates that the residual bound shows cannot reach the top ``top_k`` are not re-scored
    (:func:`prune_candidates`): the result is the same."""
    if top_k < 1:
        raise UserError(f"--top-k {top_k}: the index returns at least one document per query")
    if refine < 0:
        raise UserError(f"--refine {refine}: must be 0 (no refinement) or a positive number of candidates")
    times = times or QueryTimes()
    t0 = time.perf_counter()
    qstats: dict[str, np.ndarray] = {}
    qv = index.query_vectors(eng, queries, factors, stats=qstats)
    times.queries = time.perf_counter() - t0
    k = max(top_k, refine) + (1 if refine and prune else 0)  # one more: the next score bounds the rest
    t0 = time.perf_counter()
    scores, ids = (index.search_faiss(qv, k, parts=parts) if search == "faiss"
                   else index.search(qv, k, parts=parts, device=eng.device))
    times.search = time.perf_counter() - t0
    rows: list[dict[str, Any]] = []
    if not refine:
        for q, e in enumerate(queries):
            found = zip(scores[q][:top_k], ids[q][:top_k], strict=False)  # FAISS may find fewer than k
            rows += [{"query_id": e.id, "train_id": d, "score": float(s), "rank": r, "index_score": float(s),
                      "refined": False} for r, (s, d) in enumerate(found, 1)]
        return pl.DataFrame(rows, schema=INDEX_SCHEMA)
    if docs_for is None:
        raise ValueError("refinement needs the documents")
    t0 = time.perf_counter()
    times.candidates = len({d for row in ids for d in row[:refine]})
    kept, times.certified = prune_candidates(index, qstats.get("norms") if prune else None, scores, ids, top_k,
                                             refine)
    wanted = {d for row in kept for d in row}
    docs = docs_for(wanted)
    exact = eng.score(docs, eng.prepare_queries(queries, factors, rank=0), top_k=0).all_scores
    column = {e.id: j for j, e in enumerate(docs)}
    for q, e in enumerate(queries):
        cands = kept[q]
        approx = dict(zip(ids[q], scores[q].tolist(), strict=False))
        ranked = sorted(((float(exact[q, column[d]]), d) for d in cands), key=lambda p: (-p[0], p[1]))[:top_k]
        rows += [{"query_id": e.id, "train_id": d, "score": s, "rank": r, "index_score": approx[d],
                  "refined": True} for r, (s, d) in enumerate(ranked, 1)]
    times.refine = time.perf_counter() - t0
    times.refined_docs = len(docs)
    return pl.DataFrame(rows, schema=INDEX_SCHEMA)


def docs_from_frame(eng: InfluenceEngine, df: pl.DataFrame) -> DocsFor:
    """``docs_for`` over an in-memory training frame (tokenising only the documents asked for)."""
    def docs_for(ids: set[str]) -> list[Example]:
        picked = df.filter(pl.col("id").is_in(list(ids)))
        missing = len(ids) - picked.height
        if missing:
            raise UserError(f"{missing} indexed documents are not in the training data any more",
                            hint="rebuild the index (`influence-audit index build`)")
        return encode_frame(eng, picked, "train")
    return docs_for


def docs_from_shards(eng: InfluenceEngine, shards: Iterable[Shard]) -> DocsFor:
    """``docs_for`` over the flow's shards."""
    def docs_for(ids: set[str]) -> list[Example]:
        return [e for s in shards for e in shard_docs(eng, s) if e.id in ids]
    return docs_for


def engine_for_index(index: GradientIndex, *, model_dir: str | None = None, device: str = "auto",
                     batch_size: int = 8, trust_remote_code: bool = False) -> tuple[InfluenceEngine, Factors]:
    """The engine and factors an index was built with (``model_dir`` to point elsewhere); refuses a model whose
    weights differ from the index's."""
    if index.meta.get("settings") is None:
        raise UserError(f"{index.directory}: the index records no factor settings", hint="rebuild it")
    settings = FactorSettings.from_json(index.meta["settings"])
    model = model_dir or index.meta.get("model_dir")
    if not model:
        raise UserError(f"{index.directory}: the index records no model directory", hint="give --model")
    spec = EngineSpec(str(Path(model).resolve()), settings.layers, device, settings.precision, batch_size,
                      settings.max_length, settings.seed, settings.on_long, trust_remote_code,
                      fisher=settings.fisher)
    eng = spec.engine()
    if eng.fingerprint != settings.model_fingerprint:
        raise FactorMismatchError(f"--model {model}: other weights than the index was built for "
                                  f"({eng.fingerprint[:12]}, not {settings.model_fingerprint[:12]})",
                                  hint="rebuild the index for this model, or give the model it was built with")
    factors = Factors.load(index.meta["factors_dir"], settings=settings, layers=list(eng.specs))
    return eng, factors


def query(index_path: str | Path, queries: pl.DataFrame, *, top_k: int = 50, refine: int = 0,
          model_dir: str | None = None, device: str = "auto", batch_size: int = 8, search: str = "exact",
          trust_remote_code: bool = False, notice: Notice | None = None,
          times: QueryTimes | None = None) -> pl.DataFrame:
    """``influence-audit index query``: load what the index records, check it, search, refine."""
    if search not in SEARCHES:
        raise UserError(f"--search {search!r}: choose exact or faiss")
    index = GradientIndex.open(index_path)
    eng, factors = engine_for_index(index, model_dir=model_dir, device=device, batch_size=batch_size,
                                    trust_remote_code=trust_remote_code)
    qs = encode_frame(eng, queries, "queries")
    docs_for = None
    if refine:
        from tasks.inputs.rows import data_fingerprint
        from tasks.inputs.sources import read_rows

        sources = index.meta.get("train") or []
        if not sources:
            raise UserError(f"{index.directory}: the index records no training files to refine from",
                            hint="query without --refine, or rebuild with `influence-audit index build`")
        how = index.meta.get("data") or {}
        train = read_rows(sources, "train", fields=Fields(how.get("id_field", "id"), how.get("text_field", "text")),
                          split=how.get("split", "train"))
        if data_fingerprint(train) != index.meta["settings"]["data_fingerprint"]:
            raise FactorMismatchError(f"{', '.join(sources)[:200]}: the training data changed since the index "
                                      f"was built", hint="rebuild the index (`influence-audit index build`)")
        docs_for = docs_from_frame(eng, train)
    return search_and_refine(eng, index, factors, qs, top_k=top_k, refine=refine, docs_for=docs_for,
                             search=search, times=times)


def index_size(index: GradientIndex) -> dict[str, float]:
    n = sum(p.n_docs for p in index.parts())
    size = index.nbytes()
    return {"documents": n, "bytes": size, "bytes_per_document": size / max(n, 1),
            "width": index.width, "itemsize": int(np.dtype(index.np_dtype).itemsize)}


def search_audit(spec: EngineSpec, settings: FactorSettings, shards: Sequence[Shard], queries_path: str,
                 directory: str, factor_dir: str, parts: Sequence[str], top_k: int, refine: int, audit_dir: str) -> str:
    """The flow's scoring by the index: search every shard's part, refine from the shards, write one score file
    (the merge stage takes it as it takes the shards' files)."""
    from influence_engine.atomic import write_json_atomic
    from tasks.files import write_parquet_atomic

    path = Path(audit_dir) / "scores" / "index-search.parquet"
    if not path.exists():
        eng = spec.engine()
        factors = Factors.load(factor_dir, settings=settings, layers=list(eng.specs))
        index = GradientIndex.open(directory)
        qs = encode_frame(eng, pl.read_parquet(queries_path), "queries")
        times = QueryTimes()
        k = top_k or sum(s.n_docs for s in shards)  # 0: every document
        frame = search_and_refine(eng, index, factors, qs, top_k=k, refine=refine,
                                  docs_for=docs_from_shards(eng, shards), parts=parts, times=times)
        write_parquet_atomic(frame.select("query_id", "train_id", "score", "rank"), path)
        write_json_atomic(path.with_suffix(".json"), {"index": directory, "query_gradients_s": times.queries,
                                                      "search_s": times.search, "refine_s": times.refine,
                                                      "refined_documents": times.refined_docs})
    return str(path)
