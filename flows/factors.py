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
)
from tasks.inputs.shards import Shard


def fit_factor_stages(spec: EngineSpec, settings: FactorSettings, shards: Sequence[Shard], factor_dir: str) -> str:
    """Covariance partials (mapped) and their eigendecomposition, eigenvalue-correction partials (mapped), as
    the strategy needs them, then the finalised factors in ``factor_dir``."""
    kind = get_strategy(settings.strategy)
    basis = None
    if kind.covariance:
        basis = merge_and_eigendecompose(fit_covariance_partial.map(spec, shards, factor_dir).result(), factor_dir)
    lambdas = fit_lambda_partial.map(spec, shards, factor_dir, basis if kind.lambda_basis else None
                                     ).result() if kind.lambdas else []
    return finalize_factors(spec, settings, factor_dir, basis, lambdas)
