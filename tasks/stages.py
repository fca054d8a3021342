"""The audit's stages as Prefect tasks. Each body is one call of a plain function (tasks/inputs.py,
tasks/pipeline.py, tasks/candidates.py, tasks/record.py), which reads and writes files named by what they
depend on, so a rerun with the same parameters skips what is already done."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from influence_engine import FactorSettings, UserError

from . import candidates, index, inputs, pipeline, prefilter, record, verify
from .inputs import Inputs
from .params import AuditParams
from .pipeline import EngineSpec, Shard
from .sources import RowRange


def _retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """MLflow tasks retry unexpected failures, not user errors: TrackingUnavailable has already retried
    with backoff, and changed params or a deleted experiment will not mend themselves."""
    return not isinstance(state.data, UserError)


_MLFLOW = {"retries": 2, "retry_delay_seconds": 2, "retry_condition_fn": _retry_unless_user_error}


@task(name="plan-input-shards")
def plan_input_shards(p: AuditParams) -> inputs.Plan:
    return inputs.plan_inputs(p)


@task(name="load-and-validate-shard")
def load_and_validate_shard(spec: inputs.LoadSpec, index: int, rows: RowRange) -> dict[str, Any]:
    return inputs.load_shard(spec, index, rows)


@task(name="finish-inputs")
def finish_inputs(p: AuditParams, plan: inputs.Plan, stats: list[dict[str, Any]]) -> Inputs:
    return inputs.finish_inputs(p, plan, stats, get_run_logger())


@task(name="sample-queries")
def sample_query_set(p: AuditParams, ins: Inputs) -> str:
    return inputs.sample_query_file(p, ins)


@task(name="fit-covariance-partial")
def fit_covariance_partial(spec: EngineSpec, shard: Shard, factor_dir: str) -> str:
    return pipeline.covariance_partial(spec, shard, factor_dir)


@task(name="merge-and-eigendecompose")
def merge_and_eigendecompose(paths: list[str], factor_dir: str) -> str:
    return pipeline.eigenbasis(paths, factor_dir)


@task(name="fit-eigenvalue-correction-partial")
def fit_lambda_partial(spec: EngineSpec, shard: Shard, factor_dir: str, basis_path: str | None) -> str:
    return pipeline.lambda_partial(spec, shard, factor_dir, basis_path)


@task(name="finalize-factors")
def finalize_factors(spec: EngineSpec, settings: FactorSettings, factor_dir: str, basis_path: str | None,
                     lambda_paths: list[str]) -> str:
    return pipeline.finalize_factors(spec, settings, factor_dir, basis_path, lambda_paths)


@task(name="prepare-query-gradients")
def prepare_query_gradients(spec: EngineSpec, settings: FactorSettings, queries_path: str, factor_dir: str,
                            rank: int, out_path: str) -> str:
    return pipeline.prepare_queries(spec, settings, queries_path, factor_dir, rank, out_path)


@task(name="score-shard")
def score_shard(spec: EngineSpec, shard: Shard, prepared_path: str, audit_dir: str, top_k: int,
                candidates_path: str | None = None) -> str:
    return pipeline.score_shard(spec, shard, prepared_path, audit_dir, top_k, candidates_path)


@task(name="prefilter-candidates")
def prefilter_candidates(p: AuditParams, ins: Inputs, queries_path: str) -> str:
    return prefilter.audit_candidates(p, ins, queries_path)


@task(name="build-index-part")
def build_index_part(spec: EngineSpec, settings: FactorSettings, shard: Shard, directory: str, factor_dir: str,
                     options: index.IndexOptions) -> str:
    return index.build_shard_part(spec, settings, shard, directory, factor_dir, options)


@task(name="search-index")
def search_index(spec: EngineSpec, settings: FactorSettings, ins: Inputs, queries_path: str, directory: str,
                 factor_dir: str, parts: list[str], top_k: int, refine: int) -> str:
    return index.search_audit(spec, settings, ins.shards, queries_path, directory, factor_dir, parts, top_k, refine,
                              ins.audit_dir)


@task(name="merge-candidates")
def merge_candidates(spec: EngineSpec, p: AuditParams, ins: Inputs, shard_paths: list[str], queries_path: str,
                     prepared_path: str) -> str:
    return candidates.merge_candidates(spec, p, ins, shard_paths, queries_path, prepared_path)


@task(name="validate-outputs")
def validate_outputs(p: AuditParams, ins: Inputs, candidates_path: str, queries_path: str) -> dict:
    return candidates.validate_outputs(p, ins, candidates_path, queries_path, get_run_logger())


@task(name="verify-candidates")
def verify_candidates(spec: EngineSpec, p: AuditParams, ins: Inputs, candidates_path: str, queries_path: str,
                      prepared_path: str) -> dict[str, float]:
    return verify.verify_audit_stage(spec, p, ins, candidates_path, queries_path, prepared_path,
                                     get_run_logger().info)


@task(name="start-mlflow-run", **_MLFLOW)
def start_run(p: AuditParams, ins: Inputs | None, audit_id: str) -> str:
    return record.start_run(p, ins, audit_id)


@task(name="record-in-mlflow", **_MLFLOW)
def record_results(p: AuditParams, ins: Inputs, run_id: str, candidates_path: str, validation: dict[str, dict],
                   stage_seconds: dict[str, float], factors_cached: bool) -> dict[str, float]:
    return record.record_results(p, ins, run_id, candidates_path, validation, stage_seconds, factors_cached)


@task(name="finish-mlflow-run", **_MLFLOW)
def finish_run(run_id: str, succeeded: bool, validation_passed: bool | None, error: str | None = None) -> None:
    record.finish_run(run_id, succeeded, validation_passed, error)


@task(name="open-review")
def open_review(p: AuditParams, ins: Inputs, run_id: str, candidates_path: str) -> str:
    return record.open_review(p, ins, run_id, candidates_path)
