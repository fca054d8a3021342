"""The audit flow: sampled queries -> factors -> scored shards -> validated candidates -> MLflow -> review.

Composition only: every stage is a task in ``tasks/``; this module decides order and mapping.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from influence_engine.atomic import write_json_atomic
from tasks.params import AuditParams
from tasks.record import finish_run, open_review, record_results, start_run
from tasks.stages import (EngineSpec, InputValidationError, factor_dir, fit_covariance_partial, fit_lambda_partial,
                          finalize_factors, home_dir, load_and_validate_inputs, merge_and_eigendecompose,
                          merge_candidates, prepare_query_gradients, sample_query_set, score_shard,
                          validate_outputs)


@contextmanager
def _stage(name: str, seconds: dict[str, float], manifest: dict[str, Any], audit_dir: Path | None):
    t0 = time.perf_counter()
    manifest["stages"][name] = "running"
    yield
    seconds[name] = round(time.perf_counter() - t0, 3)
    manifest["stages"][name] = "done"
    if audit_dir is not None:
        write_json_atomic(audit_dir / "manifest.json", manifest | {"seconds": seconds})


@flow(name="influence_audit", log_prints=True)
def influence_audit(params: AuditParams) -> dict[str, Any]:
    """Run one influence audit; returns the audit id, MLflow run id, metrics and where results are."""
    from tasks.tracking import configure_tracking

    log = get_run_logger()
    p = params
    configure_tracking(p.tracking_uri, home_dir(p))
    seconds: dict[str, float] = {}
    manifest: dict[str, Any] = {"params": p.model_dump(), "stages": {}}
    try:
        with _stage("load_inputs", seconds, manifest, None):
            inputs = load_and_validate_inputs(p)
    except InputValidationError as exc:
        run_id = start_run(p, None, "invalid-input")
        from tasks.tracking import record_validation_failure

        record_validation_failure(run_id, exc.reports)
        finish_run(run_id, succeeded=False, validation_passed=False, error=str(exc))
        raise
    audit_dir = Path(inputs.audit_dir)
    manifest["audit_id"] = inputs.audit_id
    run_id = start_run(p, inputs, inputs.audit_id)
    manifest["mlflow_run_id"] = run_id
    spec = EngineSpec.of(p, inputs.model_dir)
    try:
        with _stage("sample_queries", seconds, manifest, audit_dir):
            queries_path = sample_query_set(p, inputs)
        fdir = factor_dir(p, inputs)
        cached = (fdir / "factors.json").exists()
        with _stage("fit_factors", seconds, manifest, audit_dir):
            if cached:
                log.info(f"reusing cached factors {fdir}")
            else:
                basis_path = None
                if p.strategy in ("kfac", "ekfac"):
                    cov = fit_covariance_partial.map(spec, inputs.shards, str(fdir)).result()
                    basis_path = merge_and_eigendecompose(cov, str(fdir))
                lambdas: list[str] = []
                if p.strategy in ("ekfac", "diagonal"):
                    lambdas = fit_lambda_partial.map(spec, inputs.shards, str(fdir),
                                                     basis_path if p.strategy == "ekfac" else None).result()
                finalize_factors(spec, p, inputs, str(fdir), basis_path, lambdas)
        with _stage("prepare_queries", seconds, manifest, audit_dir):
            prepared = prepare_query_gradients(spec, p, inputs, queries_path, str(fdir))
        with _stage("score_shards", seconds, manifest, audit_dir):
            shard_scores = score_shard.map(spec, inputs.shards, prepared, inputs.audit_dir, p.top_k).result()
        with _stage("merge_candidates", seconds, manifest, audit_dir):
            candidates = merge_candidates(spec, p, inputs, shard_scores, queries_path, prepared)
        with _stage("validate_outputs", seconds, manifest, audit_dir):
            report = validate_outputs(p, inputs, candidates, queries_path)
        validation = inputs.validation | {"candidates": report}
        passed = bool(report["success"])
        with _stage("record_mlflow", seconds, manifest, audit_dir):
            metrics = record_results(p, inputs, run_id, candidates, validation, seconds, cached)
        if not passed:
            raise RuntimeError("output validation failed: see validation/candidates.json on the MLflow run")
        with _stage("open_review", seconds, manifest, audit_dir):
            open_review(p, inputs, run_id, candidates)
        finish_run(run_id, succeeded=True, validation_passed=True)
    except BaseException as exc:
        manifest["status"] = "failed"
        write_json_atomic(audit_dir / "manifest.json", manifest | {"seconds": seconds, "error": str(exc)[:500]})
        try:
            finish_run.fn(run_id, succeeded=False, validation_passed=manifest.get("validation_passed"),
                          error=str(exc))
        except Exception:
            log.warning("could not mark the MLflow run failed; `influence-audit sync` will")
        raise
    manifest["status"] = "succeeded"
    write_json_atomic(audit_dir / "manifest.json", manifest | {"seconds": seconds})
    return {"audit_id": inputs.audit_id, "run_id": run_id, "audit_dir": inputs.audit_dir,
            "candidates": candidates, "metrics": metrics, "seconds": seconds, "factors_cached": cached}
