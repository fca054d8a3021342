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
from influence_engine.errors import UserError
from tasks.engine_io import settings_key
from tasks.params import AuditParams
from tasks.record import finish_run, open_review, record_results, start_run
from tasks.stages import (
    EngineSpec,
    InputValidationError,
    factor_dir,
    finalize_factors,
    fit_covariance_partial,
    fit_lambda_partial,
    home_dir,
    inputs_json,
    load_and_validate_inputs,
    merge_and_eigendecompose,
    merge_candidates,
    prepare_query_gradients,
    sample_query_set,
    score_shard,
    validate_outputs,
)
from tasks.verify import verify_stage


def _retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """MLflow tasks retry unexpected failures, not user errors: TrackingUnavailable has already retried
    with backoff, and changed params or a deleted experiment will not mend themselves."""
    return not isinstance(state.data, UserError)


start_run = start_run.with_options(retry_condition_fn=_retry_unless_user_error)
record_results = record_results.with_options(retry_condition_fn=_retry_unless_user_error)
finish_run = finish_run.with_options(retry_condition_fn=_retry_unless_user_error)


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
    """Run one influence audit; returns the audit id, MLflow run id, metrics and where results are.

    If MLflow is unreachable the audit still runs to the end: its files stay on disk, the manifest says
    ``mlflow: pending`` and the flow ends in TrackingUnavailable; ``influence-audit sync`` records it later.
    """
    from tasks.tracking import TrackingUnavailable, configure_tracking

    log = get_run_logger()
    p = params
    configure_tracking(p.tracking_uri, home_dir(p))
    seconds: dict[str, float] = {}
    manifest: dict[str, Any] = {"params": p.model_dump(), "stages": {}}
    try:
        with _stage("load_inputs", seconds, manifest, None):
            inputs = load_and_validate_inputs(p)
    except InputValidationError as exc:
        from tasks.tracking import record_validation_failure

        try:  # one run per refused parameter set (a shared id would clash on params)
            refused = start_run(p, None, f"invalid-input-{settings_key(p.identity())[:12]}")
            record_validation_failure(refused, exc.reports)
            finish_run(refused, succeeded=False, validation_passed=False, error=str(exc))
        except TrackingUnavailable:
            log.warning("MLflow is unreachable: this input validation failure is not recorded there")
        raise
    audit_dir = Path(inputs.audit_dir)
    manifest["audit_id"] = inputs.audit_id
    manifest["inputs"] = {k: v for k, v in inputs_json(inputs).items() if k != "validation"}
    tracking_error: TrackingUnavailable | None = None
    run_id: str | None = None
    try:
        run_id = start_run(p, inputs, inputs.audit_id)
    except TrackingUnavailable as exc:
        tracking_error = exc
        log.warning(f"{exc}: computing the audit anyway; its results stay on disk for `influence-audit sync`")
    manifest["mlflow_run_id"] = run_id
    manifest["mlflow"] = "pending"
    spec = EngineSpec.of(p, inputs.model_dir)
    try:
        with _stage("sample_queries", seconds, manifest, audit_dir):
            queries_path = sample_query_set(p, inputs)
        fdir = factor_dir(p, inputs)
        cached = (fdir / "factors.json").exists()
        manifest["factors_cached"] = cached
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
        if p.verify_k:
            with _stage("verify_candidates", seconds, manifest, audit_dir):
                verify_stage(spec, p, inputs, candidates, queries_path, prepared)
        with _stage("validate_outputs", seconds, manifest, audit_dir):
            report = validate_outputs(p, inputs, candidates, queries_path)
        validation = inputs.validation | {"candidates": report}
        passed = bool(report["success"])
        manifest["validation_passed"] = passed
        metrics: dict[str, float] = {}
        if run_id is not None:
            try:
                with _stage("record_mlflow", seconds, manifest, audit_dir):
                    metrics = record_results(p, inputs, run_id, candidates, validation, seconds, cached)
            except TrackingUnavailable as exc:
                tracking_error = exc
        if not passed:
            raise RuntimeError("output validation failed: see validation/candidates.json in the audit directory")
        if tracking_error is None and run_id is not None:
            try:
                with _stage("open_review", seconds, manifest, audit_dir):
                    try:
                        open_review(p, inputs, run_id, candidates)
                    except Exception as exc:  # the hand-off artifact needs the Prefect API; the results are whole
                        manifest["review_artifact"] = f"not created: {str(exc).splitlines()[0][:200]}"
                        log.warning(f"review artifact not created ({exc!r}); the MLflow run is tagged "
                                    f"review.status=open")
                finish_run(run_id, succeeded=True, validation_passed=True)
                manifest["mlflow"] = "recorded"
            except TrackingUnavailable as exc:
                tracking_error = exc
    except BaseException as exc:
        manifest["status"] = "failed"
        write_json_atomic(audit_dir / "manifest.json", manifest | {"seconds": seconds, "error": str(exc)[:500]})
        if run_id is not None:
            try:
                finish_run.fn(run_id, succeeded=False, validation_passed=manifest.get("validation_passed"),
                              error=str(exc))
            except Exception:
                log.warning("could not mark the MLflow run failed; `influence-audit sync` will")
        raise
    manifest["status"] = "succeeded"
    write_json_atomic(audit_dir / "manifest.json", manifest | {"seconds": seconds})
    if tracking_error is not None:
        first = str(tracking_error).splitlines()[0][:300]
        raise TrackingUnavailable(f"audit {inputs.audit_id} finished and its results are on disk in {audit_dir}, "
                                  f"but they are not recorded in MLflow: {first}",
                                  hint="run `influence-audit sync` once MLflow is reachable again")
    return {"audit_id": inputs.audit_id, "run_id": run_id, "audit_dir": inputs.audit_dir,
            "candidates": candidates, "metrics": metrics, "seconds": seconds, "factors_cached": cached}
