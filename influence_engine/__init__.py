"""influence_engine: EK-FAC influence functions for Hugging Face causal language models, in plain PyTorch.

Knows nothing of Prefect, MLflow or Great Expectations. Start at :class:`InfluenceEngine`.
Names are imported lazily, so ``influence_engine.errors`` and ``influence_engine.atomic`` load without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "GradientCache": "cache", "TokenCache": "cache",
    "CheckpointScores": "checkpoints", "checkpoint_weights": "checkpoints",
    "Example": "data", "encode": "data",
    "Explanation": "engine", "InfluenceEngine": "engine", "ScoreResult": "engine", "load_pretrained": "models",
    "model_fingerprint": "engine",
    "DataError": "errors", "FactorMismatchError": "errors", "ModelError": "errors", "NumericalError": "errors",
    "UserError": "errors",
    "Factors": "factors", "eigendecompose": "factors", "finalize": "factors",
    "CovariancePartial": "statistics", "Eigenbasis": "statistics", "LambdaPartial": "statistics",
    "merge": "statistics", "merge_groups": "statistics",
    "PreparedQueries": "queries",
    "DocumentSignals": "quality",
    "FactorSettings": "settings", "stable_key": "settings",
    "STRATEGIES": "strategies", "Strategy": "strategies", "get_strategy": "strategies",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .cache import GradientCache, TokenCache  # noqa: F401
    from .checkpoints import CheckpointScores, checkpoint_weights  # noqa: F401
    from .data import Example, encode  # noqa: F401
    from .engine import Explanation, InfluenceEngine, ScoreResult, model_fingerprint  # noqa: F401
    from .errors import DataError, FactorMismatchError, ModelError, NumericalError, UserError  # noqa: F401
    from .factors import Factors, eigendecompose, finalize  # noqa: F401
    from .models import load_pretrained  # noqa: F401
    from .quality import DocumentSignals  # noqa: F401
    from .queries import PreparedQueries  # noqa: F401
    from .settings import FactorSettings, stable_key  # noqa: F401
    from .statistics import CovariancePartial, Eigenbasis, LambdaPartial, merge, merge_groups  # noqa: F401
    from .strategies import STRATEGIES, Strategy, get_strategy  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'influence_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
