"""The factor-fitting stages as the flows map them: the passes the strategy declares, shard by shard, then
the merge (called inside a flow run; the influence audit and the quality audit both fit this way)."""

from __future__ import annotations

from collections.abc import Sequence

from influence_engine import FactorSettings, get_strategy
from tasks.engine import EngineSpec
from tasks.influence.stages import (
    finalize_factors,
    fit_covariance_partial,
    fit_lambda_partial,
    merge_and_eigendecompose,
    plan_layer_groups,
)
from tasks.inputs.shards import Shard


def fit_factor_stages(spec: EngineSpec, settings: FactorSettings, shards: Sequence[Shard], factor_dir: str) -> str:
    """Covariance partials (mapped) and their eigendecomposition, eigenvalue-correction partials (mapped), as
    the strategy needs them, then the finalised factors in ``factor_dir``.

    When the layers' factors do not fit one device together (several layer groups: ``--device-memory-gb``, or
    80% of a GPU's free memory, as the first worker to plan sees it), each pass is mapped over every (shard,
    group) pair, shard by shard: on a runner with several workers, the groups of a shard run on different workers
    at once, each holding the model and its own group's sums. The merge adds each group's partials in shard
    order and joins the groups: the same sums as one process fitting the groups one after another."""
    kind = get_strategy(settings.strategy)
    if not (kind.covariance or kind.lambdas):
        return finalize_factors(spec, settings, factor_dir, None, [])
    groups: list[tuple[str, ...] | None] = list(plan_layer_groups.submit(spec).result())
    if len(groups) == 1:
        groups = [None]  # every layer in one pass: the partials' names stay those of an ungrouped fit
    pairs = [(shard, g) for shard in shards for g in groups]
    on_shards, on_groups = [s for s, _ in pairs], [g for _, g in pairs]
    basis = None
    if kind.covariance:
        basis = merge_and_eigendecompose(
            fit_covariance_partial.map(spec, on_shards, factor_dir, on_groups).result(), factor_dir)
    lambdas = fit_lambda_partial.map(spec, on_shards, factor_dir, basis if kind.lambda_basis else None,
                                     on_groups).result() if kind.lambdas else []
    return finalize_factors(spec, settings, factor_dir, basis, lambdas)
