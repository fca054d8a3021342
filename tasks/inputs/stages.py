"""The input stage as Prefect tasks: plan the shards, load and validate each (mapped), finish (checks across
shards), sample the queries. Each body is one call of a plain function in :mod:`tasks.inputs.shards`."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from tasks.inputs import shards as inputs
from tasks.inputs.shards import Inputs
from tasks.inputs.sources import RowRange
from tasks.options import AuditParams


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
