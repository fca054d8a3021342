"""influence_engine: EK-FAC influence functions for Hugging Face causal language models, in plain PyTorch.

Knows nothing of Prefect, MLflow or Great Expectations. Start at :class:`InfluenceEngine`.
"""

__version__ = "0.1.0"

from .data import Example, encode  # noqa: E402
from .engine import Explanation, InfluenceEngine, ScoreResult, load_pretrained, model_fingerprint  # noqa: E402
from .errors import DataError, FactorMismatchError, ModelError, NumericalError, UserError  # noqa: E402
from .factors import (CovariancePartial, Eigenbasis, Factors, LambdaPartial, eigendecompose,  # noqa: E402
                      finalize, merge)
from .queries import PreparedQueries  # noqa: E402

__all__ = [
    "CovariancePartial", "DataError", "Eigenbasis", "Example", "Explanation", "FactorMismatchError", "Factors",
    "InfluenceEngine", "LambdaPartial", "ModelError", "NumericalError", "PreparedQueries", "ScoreResult",
    "UserError", "eigendecompose", "encode", "finalize", "load_pretrained", "merge", "model_fingerprint",
]
