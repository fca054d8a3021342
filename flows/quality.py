"""The quality audit (``mode: quality``): training data -> factors -> per-shard signals -> report -> GE -> MLflow ->
review. No queries. Composition only: every stage is a task in ``tasks/quality_stages.py`` (factor stages are the
influence audit's own). Runs inside the ``influence_audit`` flow, which dispatches here by mode.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import get_run_logger

from influence_engine.atomic import write_json_atomic
from tasks.params import AuditParams
from tasks.quality_stages import (
    load_quality_inputs,
    merge_quality_report,
    open_quality_review,
    quality_result,
    quality_shard,
    record_quality,
    settings_of,
    validate_quality_outputs,
)
from tasks.record import finish_run, start_run
from tasks.stages import (
    EngineSpec,
    factor_dir,
    finalize_factors,
    fit_covariance_partial,
    fit_lambda_partial,
    home_dir,
    inputs_json,
    merge_and_eigendecompose,
)


@contextmanager
def _stage(name: str, seconds: dict[str, float], manifest: dict[str, Any], audit_dir: Path):
    t0 = time.perf_counter()
    manifest["stages"][name] = "running"
    yield
    seconds[name] = round(time.perf_counter() - t0, 3)
    manifest["stages"][name] = "done"
    write_json_atomic(audit_dir / "manifest.json", manifest | {"seconds": seconds})


def quality_audit(p: AuditParams) -> dict[str, Any]:
    """Run one quality audit (call inside a flow run); returns the audit id, MLflow run id, metrics and paths.

    Like the influence audit: MLflow unreachable still computes everything (manifest ``mlflow: pending``, the flow
    ends in TrackingUnavailable); failed output validation fails the run after recording it."""
    from tasks.tracking import TrackingUnavailable, configure_tracking

    log = get_run_logger()
    configure_tracking(p.tracking_uri, home_dir(p))
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    inputs = load_quality_inputs(p)
    seconds["load_inputs"] = round(time.perf_counter() - t0, 3)
    audit_dir = Path(inputs.audit_dir)
    manifest: dict[str, Any] = {"params": p.model_dump(), "mode": "quality", "audit_id": inputs.audit_id,
                                "inputs": {k: v for k, v in inputs_json(inputs).items() if k != "validation"},
                                "stages": {"load_inputs": "done"}, "mlflow": "pending"}
    run_id: str | None = None
    tracking_error: TrackingUnavailable | None = None
    try:
        run_id = start_run(p, inputs, inputs.audit_id)
    except TrackingUnavailable as exc:
        tracking_error = exc
        log.warning(f"{exc}: computing the quality audit anyway; its results stay on disk")
    manifest["mlflow_run_id"] = run_id
    spec = EngineSpec.of(p, inputs.model_dir)
    settings = settings_of(p)
    try:
        fdir = factor_dir(p, inputs)
        cached = (fdir / "factors.json").exists()
        manifest["factors_cached"] = cached
        with _stage("fit_factors", seconds, manifest, audit_dir):
            if not cached:
                basis_path = None
                if p.strategy in ("kfac", "ekfac"):
                    cov = fit_covariance_partial.map(spec, inputs.shards, str(fdir)).result()
                    basis_path = merge_and_eigendecompose(cov, str(fdir))
                lambdas: list[str] = []
                if p.strategy in ("ekfac", "diagonal"):
                    lambdas = fit_lambda_partial.map(spec, inputs.shards, str(fdir),
                                                     basis_path if p.strategy == "ekfac" else None).result()
                finalize_factors(spec, p, inputs, str(fdir), basis_path, lambdas)
        with _stage("quality_signals", seconds, manifest, audit_dir):
            signal_paths = quality_shard.map(spec, inputs.shards, str(fdir), inputs.audit_dir, p.strategy,
                                             settings).result()
        with _stage("merge_report", seconds, manifest, audit_dir):
            paths = merge_quality_report(inputs, signal_paths, settings)
        with _stage("validate_outputs", seconds, manifest, audit_dir):
            report = validate_quality_outputs(inputs, paths["report"])
        passed = bool(report["success"])
        manifest["validation_passed"] = passed
        metrics: dict[str, float] = {}
        if run_id is not None:
            try:
                with _stage("record_mlflow", seconds, manifest, audit_dir):
                    metrics = record_quality(p, inputs, run_id, paths, inputs.validation | {"quality_report": report},
                                             seconds, cached)
            except TrackingUnavailable as exc:
                tracking_error = exc
        if not passed:
            raise RuntimeError("output validation failed: see validation/quality_report.json in the audit directory")
        if tracking_error is None and run_id is not None:
            with _stage("open_review", seconds, manifest, audit_dir):
                try:
                    open_quality_review(p, inputs, run_id, paths["candidates"])
                except Exception as exc:  # the hand-off artifact needs the Prefect API; the results are whole
                    manifest["review_artifact"] = f"not created: {str(exc).splitlines()[0][:200]}"
                    log.warning(f"review artifact not created ({exc!r}); the MLflow run is tagged review.status=open")
            finish_run(run_id, succeeded=True, validation_passed=True)
            manifest["mlflow"] = "recorded"
    except BaseException as exc:
        manifest["status"] = "failed"
        write_json_atomic(audit_dir / "manifest.json", manifest | {"seconds": seconds, "error": str(exc)[:500]})
        if run_id is not None:
            try:
                finish_run.fn(run_id, succeeded=False, validation_passed=manifest.get("validation_passed"),
                              error=str(exc))
            except Exception:
                log.warning("could not mark the MLflow run failed")
        raise
    manifest["status"] = "succeeded"
    write_json_atomic(audit_dir / "manifest.json", manifest | {"seconds": seconds})
    if tracking_error is not None:
        raise TrackingUnavailable(f"quality audit {inputs.audit_id} finished and its results are on disk in "
                                  f"{audit_dir}, but they are not recorded in MLflow: "
                                  f"{str(tracking_error).splitlines()[0][:300]}")
    return quality_result(inputs, run_id, paths, metrics, seconds, cached)
