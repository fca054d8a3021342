"""The first stage as both audit kinds map it: plan the shards, load and validate each (mapped), finish across
them. Called inside a flow run."""

from __future__ import annotations

from tasks.inputs.shards import Inputs
from tasks.inputs.stages import finish_inputs, load_and_validate_shard, plan_input_shards
from tasks.options import AuditParams


def load_input_stages(p: AuditParams) -> Inputs:
    plan = plan_input_shards(p)
    return finish_inputs(p, plan, load_and_validate_shard.map(plan.spec, range(len(plan.ranges)),
                                                               plan.ranges).result())
