"""The audit flow: sampled queries -> factors -> scored shards -> validated candidates -> MLflow -> review.

Composition only: every stage is a task in ``tasks/influence/stages.py``; the strategy says which fitting passes run;
the manifest and the MLflow run are kept by :class:`tasks.record.bookkeeping.AuditBook`. This module decides order
and mapping.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from flows.factors import fit_factor_stages
from flows.inputs import load_input_stages
from influence_engine import Factors
from tasks.influence.index import IndexOptions, index_dir
from tasks.influence.stages import (
    build_index_part,
    create_index,
    finish_index,
    merge_candidates,
    prefilter_candidates,
    prepare_query_gradients,
    score_shard,
    search_index,
    validate_outputs,
    verify_candidates,
)
from tasks.inputs.preflight import checkpoint_specs
from tasks.inputs.stages import sample_query_set
from tasks.options import AuditParams, engine_spec, factor_settings
from tasks.paths import factor_dir
from tasks.record.bookkeeping import AuditBook
from tasks.record.stages import open_review, record_results

# Mapped tasks run in at most this many threads (the default runner's pool is unbounded): each holds one shard, so
# the flow's memory is bounded by it, not by the corpus. INFLUENCE_AUDIT_THREADS overrides.
THREADS = int(os.environ.get("INFLUENCE_AUDIT_THREADS") or min(4, os.cpu_count() or 1))


@flow(name="influence_audit", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=THREADS))
def influence_audit(params: AuditParams) -> dict[str, Any]:
    """Run one influence audit; returns the audit id, MLflow run id, metrics and where results are.

    If MLflow is unreachable the audit still runs to the end: its files stay on disk, the manifest says
    ``mlflow: pending`` and the flow ends in TrackingUnavailable; ``influence-audit sync`` records it later.
    """
    if params.mode == "quality":  # the query-free data-quality audit: flows/quality.py
        from flows.quality import quality_audit

        return quality_audit(params)
    p = params
    book = AuditBook(p, get_run_logger())

    ins = book.load_inputs(lambda: load_input_stages(p))  # plan, load mapped, check across shards
    spec, settings = engine_spec(p, ins.model_dir), factor_settings(p, ins)
    fdir = str(factor_dir(book.home, settings))
    cached = Factors.exists(fdir)
    book.manifest["factors_cached"] = cached
    with book.running():
        with book.stage("sample_queries"):
            queries = sample_query_set(p, ins)
        with book.stage("fit_factors"):
            if not cached:
                fit_factor_stages(spec, settings, ins.shards, fdir)
        with book.stage("prepare_queries"):
            prepared = prepare_query_gradients(spec, settings, queries, fdir, p.query_rank,
                                               str(Path(ins.audit_dir) / "prepared-queries.safetensors"))
        others = []  # --checkpoint: each other checkpoint's factors (cached by its own fingerprint) and queries
        if p.checkpoint:
            with book.stage("checkpoints"):
                for c_spec, c_settings in checkpoint_specs(p, settings):
                    c_dir = str(factor_dir(book.home, c_settings))
                    if not Factors.exists(c_dir):
                        fit_factor_stages(c_spec, c_settings, ins.shards, c_dir)
                    name = f"prepared-queries-{c_settings.model_fingerprint[:16]}.safetensors"
                    others.append((c_spec, prepare_query_gradients(c_spec, c_settings, queries, c_dir, p.query_rank,
                                                                   str(Path(ins.audit_dir) / name))))
        if p.use_index:  # a matching index (same model, data, factor settings) is reused; else built, per shard
            idir = str(index_dir(book.home, settings, IndexOptions(p.sketch)))
            book.manifest["index"] = idir
            with book.stage("build_index"):
                create_index(spec, settings, ins.shards, idir, fdir, IndexOptions(p.sketch))
                parts = build_index_part.map(spec, settings, ins.shards, idir, fdir, IndexOptions(p.sketch)).result()
                book.manifest["index_probe_recall"] = finish_index(idir)
            with book.stage("search_index"):
                shard_scores = [search_index(spec, settings, ins, queries, idir, fdir, parts, p.top_k, p.refine)]
        else:
            cands = None
            if p.prefilter:
                with book.stage("prefilter"):
                    cands = prefilter_candidates(p, ins, queries)
            with book.stage("score_shards"):
                shard_scores = score_shard.map(spec, ins.shards, prepared, ins.audit_dir, p.top_k, cands,
                                               unmapped(others)).result()
        with book.stage("merge_candidates"):
            candidates = merge_candidates(spec, p, ins, shard_scores, queries, prepared)
        if p.verify_k:
            with book.stage("verify_candidates"):
                verify_candidates(spec, p, ins, candidates, queries, prepared)
        with book.stage("validate_outputs"):
            report = validate_outputs(p, ins, candidates, queries)
        book.record(lambda: record_results(p, ins, book.run_id, candidates, ins.validation | {"candidates": report},
                                           book.seconds, cached), validation_passed=bool(report["success"]))
        book.open_review(lambda: open_review(p, ins, book.run_id, candidates))
    return book.result(candidates=candidates, factors_cached=cached)
