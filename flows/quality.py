"""The quality audit (``mode: quality``): training data -> factors -> per-shard signals -> report -> GE -> MLflow ->
review. No queries. Composition only: the stages are tasks in ``tasks/quality/stages.py``; the input and factor
stages are the influence audit's own (the corpus is streamed shard by shard, never copied or held whole); the
manifest and MLflow run are kept by :class:`tasks.record.bookkeeping.AuditBook`. Runs inside the
``influence_audit`` flow, which dispatches here by mode.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger

from flows.factors import fit_factor_stages
from flows.inputs import load_input_stages
from influence_engine import Factors
from tasks.options import AuditParams, engine_spec, factor_settings
from tasks.paths import factor_dir
from tasks.quality.stages import (
    merge_quality_report_task,
    merge_token_counts_task,
    open_quality_review_task,
    quality_shard,
    record_quality_task,
    settings_of,
    shard_token_counts_task,
    validate_quality_task,
)
from tasks.record.bookkeeping import AuditBook


def quality_audit(p: AuditParams) -> dict[str, Any]:
    """Run one quality audit (inside a flow run); returns the audit id, MLflow run id, metrics and paths.

    As the influence audit: MLflow unreachable still computes everything (manifest ``mlflow: pending``, the flow
    ends in TrackingUnavailable); failed output validation fails the run after recording it."""
    book = AuditBook(p, get_run_logger())
    settings_of(p).check()

    ins = book.load_inputs(lambda: load_input_stages(p))  # streamed shard by shard, as the influence audit
    book.manifest["mode"] = "quality"
    spec, settings = engine_spec(p, ins.model_dir), factor_settings(p, ins)
    fdir = str(factor_dir(book.home, settings))
    cached = Factors.exists(fdir)
    book.manifest["factors_cached"] = cached
    quality = settings_of(p)
    with book.running():
        with book.stage("fit_factors"):
            if not cached:
                fit_factor_stages(spec, settings, ins.shards, fdir)
        with book.stage("token_counts"):
            counts = shard_token_counts_task.map(spec, ins.shards, ins.audit_dir, quality).result()
            merge_token_counts_task(spec, ins.audit_dir, counts)
        with book.stage("quality_signals"):
            signal_paths = quality_shard.map(spec, settings, ins.shards, fdir, ins.audit_dir, quality).result()
        with book.stage("merge_report"):
            paths = merge_quality_report_task(ins, signal_paths, quality)
        with book.stage("validate_outputs"):
            report = validate_quality_task(ins, paths["report"])
        book.record(lambda: record_quality_task(p, ins, book.run_id, paths, ins.validation | {"quality_report": report},
                                                book.seconds, cached), validation_passed=bool(report["success"]))
        book.open_review(lambda: open_quality_review_task(p, ins, book.run_id, paths["candidates"]))
    return book.result(mode="quality", factors_cached=cached, **paths)
