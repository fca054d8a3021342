"""Attribution quality against retraining: the linear datamodeling score (LDS) with a bootstrap interval.

Park et al. 2023 (TRAK) define the LDS: retrain the model on S random subsets of the training data (a mask
``M``, S x N, true where a document was kept) and measure each query's output on each retrained model
(``Y``, S x Q). An attribution ``τ`` (Q x N) predicts the output of subset ``s`` for query ``q`` as the sum of
the kept documents' attributions, ``(M τ^T)[s, q]``; the LDS of query ``q`` is the Spearman correlation over
subsets between prediction and measurement, and the reported LDS is its mean over queries. Our scores predict
``log p(completion | prompt)`` (positive: keeping the document raises it), so ``Y`` holds log-probabilities;
losses (kronfluence's ``losses.pt``) are negated first.

Plain numpy (and scipy's ranks); nothing here trains or runs a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``x`` with the same column of ``y`` (both S x Q); NaN where a
    column is constant."""
    rx = rankdata(np.asarray(x, dtype=np.float64), axis=0)
    ry = rankdata(np.asarray(y, dtype=np.float64), axis=0)
    rx -= rx.mean(0)
    ry -= ry.mean(0)
    den = np.sqrt((rx ** 2).sum(0) * (ry ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(0) / np.where(den > 0, den, 1.0), np.nan)


@dataclass(frozen=True)
class LDS:
    """The mean LDS over queries, its bootstrap interval, and the per-query values."""

    mean: float
    ci_low: float
    ci_high: float
    per_query: np.ndarray  # (Q,), NaN for queries whose measured outputs do not vary
    n_subsets: int

    def as_dict(self) -> dict[str, float]:
        return {"lds": self.mean, "lds_ci_low": self.ci_low, "lds_ci_high": self.ci_high}


def bootstrap_mean(values: np.ndarray, *, n_boot: int = 2000, level: float = 0.95,
                   seed: int = 0) -> tuple[float, float, float]:
    """Mean of the finite ``values`` and a percentile bootstrap interval (resampling the values)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(1)
    a = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def lds(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray, *, n_boot: int = 2000,
        level: float = 0.95, seed: int = 0) -> LDS:
    """LDS of ``scores`` (Q x N) against retraining results: ``masks`` (S x N, kept documents) and ``outputs``
    (S x Q, the measured log p(completion | prompt) of each query on the model retrained on each subset).
    The interval resamples queries."""
    scores, masks, outputs = (np.asarray(a, dtype=np.float64) for a in (scores, masks, outputs))
    if masks.ndim != 2 or outputs.ndim != 2 or scores.ndim != 2:
        raise ValueError("scores, masks and outputs must be 2-D")
    if masks.shape[0] != outputs.shape[0]:
        raise ValueError(f"masks have {masks.shape[0]} subsets but outputs {outputs.shape[0]}")
    if scores.shape != (outputs.shape[1], masks.shape[1]):
        raise ValueError(f"scores are {scores.shape}; expected (queries, documents) = "
                         f"({outputs.shape[1]}, {masks.shape[1]})")
    per_query = spearman_rows(masks @ scores.T, outputs)
    mean, low, high = bootstrap_mean(per_query, n_boot=n_boot, level=level, seed=seed)
    return LDS(mean, low, high, per_query, masks.shape[0])


def paired_difference(a: np.ndarray, b: np.ndarray, *, n_boot: int = 2000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float, float]:
    """Mean per-query difference of two LDS vectors on the same queries and its bootstrap interval: two
    methods are told apart when this interval excludes zero (tighter than comparing the two intervals)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return bootstrap_mean(d, n_boot=n_boot, level=level, seed=seed)
