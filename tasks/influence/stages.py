"""The influence audit's engine stages as Prefect tasks: factor partials, queries, shard scoring, the index,
candidates, output checks and verification. Each body is one call of a plain function (:mod:`tasks.influence.compute`,
:mod:`tasks.influence.candidates`, ...), which reads and writes files named by what they depend on, so a rerun
with the same parameters skips what is already done."""

from __future__ import annotations

from prefect import get_run_logger, task

from influence_engine import FactorSettings
from tasks.engine import EngineSpec
from tasks.influence import candidates, compute, index, prefilter, verify
from tasks.inputs.shards import Inputs, Shard
from tasks.options import AuditParams


@task(name="plan-layer-groups")
def plan_layer_groups(spec: EngineSpec) -> list[tuple[str, ...]]:
    return compute.layer_groups(spec)


@task(name="fit-covariance-partial")
def fit_covariance_partial(spec: EngineSpec, shard: Shard, factor_dir: str,
                           layers: tuple[str, ...] | None = None) -> str:
    return compute.covariance_partial(spec, shard, factor_dir, layers)


@task(name="merge-and-eigendecompose")
def merge_and_eigendecompose(paths: list[str], factor_dir: str) -> str:
    return compute.eigenbasis(paths, factor_dir)


@task(name="fit-eigenvalue-correction-partial")
def fit_lambda_partial(spec: EngineSpec, shard: Shard, factor_dir: str, basis_path: str | None,
                       layers: tuple[str, ...] | None = None) -> str:
    return compute.lambda_partial(spec, shard, factor_dir, basis_path, layers)


@task(name="finalize-factors")
def finalize_factors(spec: EngineSpec, settings: FactorSettings, factor_dir: str, basis_path: str | None,
                     lambda_paths: list[str]) -> str:
    return compute.finalize_factors(spec, settings, factor_dir, basis_path, lambda_paths)


@task(name="prepare-query-gradients")
def prepare_query_gradients(spec: EngineSpec, settings: FactorSettings, queries_path: str, factor_dir: str,
                            rank: int, out_path: str) -> str:
    return compute.prepare_queries(spec, settings, queries_path, factor_dir, rank, out_path)


@task(name="score-shard")
def score_shard(spec: EngineSpec, shard: Shard, prepared_path: str, audit_dir: str, top_k: int,
                candidates_path: str | None = None, checkpoints: list[tuple[EngineSpec, str]] | None = None) -> str:
    return compute.score_shard(spec, shard, prepared_path, audit_dir, top_k, candidates_path, checkpoints or ())


@task(name="prefilter-candidates")
def prefilter_candidates(p: AuditParams, ins: Inputs, queries_path: str) -> str:
    return prefilter.audit_candidates(p, ins, queries_path)


@task(name="create-index")
def create_index(spec: EngineSpec, settings: FactorSettings, shards: list[Shard], directory: str, factor_dir: str,
                 options: index.IndexOptions) -> str:
    return index.create_for_shards(spec, settings, shards, directory, factor_dir, options)


@task(name="finish-index")
def finish_index(directory: str) -> dict | None:
    return index.finish_shards(directory)


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
