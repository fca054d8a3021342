"""The quality audit (``mode: quality``): training data -> factors -> per-shard signals -> report -> GE -> MLflow ->
review. No queries. Composition only: the stages are tasks in ``tasks/quality_stages.py`` (the factor stages are the
influence audit's own), the manifest and MLflow run are kept by :class:`tasks.bookkeeping.AuditBook`. Runs inside
the ``influence_audit`` flow, which dispatches here by mode.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger

from flows.factors import fit_factor_stages
from influence_engine import Factors
from tasks.bookkeeping import AuditBook
from tasks.inputs import engine_spec, factor_settings
from tasks.params import AuditParams
from tasks.paths import factor_dir
from tasks.quality_stages import (
    load_quality_inputs_task,
    merge_quality_report_task,
    open_quality_review_task,
    quality_shard,
    record_quality_task,
    settings_of,
    validate_quality_task,
)


def quality_audit(p: AuditParams) -> dict[str, Any]:
    """Run one quality audit (inside a flow run); returns the audit id, MLflow run id, metrics and paths.

    As the influence audit: MLflow unreachable still computes everything (manifest ``mlflow: pending``, the flow
    ends in TrackingUnavailable); failed output validation fails the run after recording it."""
    book = AuditBook(p, get_run_logger())
    ins = book.load_inputs(lambda: load_quality_inputs_task(p))
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
