"""Influence over several checkpoints: each checkpoint scored on its own, the scores combined by weight.

TRAK (Park et al. 2023) averages attributions over models (independently trained, or checkpoints of one run):
the final weights alone are one noisy sample of what training does, and the average predicts retraining
better. SOURCE (Bae et al. 2024) splits training into segments, each ending at a checkpoint, and weighs each
segment by the learning rate its steps took; here, as a simplification, each checkpoint's influence (its own
EK-FAC factors and preconditioned query gradients) is weighted by the sum of the learning rates of the steps
in the segment that ends at it (:func:`checkpoint_weights` with ``rule="lr"``), not by SOURCE's unrolled
segment operator.

Each checkpoint is an ordinary model: its factors are fitted and cached as for any model (the cache key
holds the model fingerprint, so every checkpoint has its own entry), its queries prepared with its factors,
and the documents scored against them. :class:`CheckpointScores` adds the per-checkpoint score matrices of one
set of documents with their weights and keeps the top-k of the sum: the top-k of the combination is not a
combination of top-k lists, so each checkpoint scores every document of the batch (or shard) in hand.
Weights are normalised to sum to 1, so a combined score is in the units of one model's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .engine import ScoreResult
from .errors import UserError

WEIGHT_RULES = ("uniform", "lr")


def checkpoint_weights(n: int, rule: str = "uniform", lr_sums: Sequence[float] | None = None) -> list[float]:
    """Weights of ``n`` checkpoints summing to 1: ``uniform``, or ``lr``: proportional to ``lr_sums`` (each
    checkpoint's sum of learning rates over the steps since the previous one)."""
    if n < 1:
        raise UserError("no checkpoints to combine")
    if rule == "uniform":
        return [1.0 / n] * n
    if rule != "lr":
        raise UserError(f"checkpoint weights {rule!r}: choose one of {', '.join(WEIGHT_RULES)}")
    if lr_sums is None or len(lr_sums) != n:
        raise UserError(f"checkpoint weights 'lr' need one learning-rate sum per checkpoint ({n})")
    total = float(sum(lr_sums))
    if not all(np.isfinite(v) and v >= 0 for v in lr_sums) or total <= 0:
        raise UserError(f"checkpoint learning-rate sums {list(lr_sums)}: must be non-negative with a positive sum")
    return [float(v) / total for v in lr_sums]


class CheckpointScores:
    """The weighted sum of several checkpoints' scores of the same documents against the same queries."""

    def __init__(self, weights: Sequence[float]):
        if not weights:
            raise UserError("no checkpoints to combine")
        self.weights = [float(w) for w in weights]
        self._sum: torch.Tensor | None = None
        self._ids: tuple[list[str], list[str]] | None = None
        self._tokens = 0
        self._added = 0

    def add(self, result: ScoreResult) -> None:
        """One checkpoint's scores (in the order of ``weights``), with every pair kept (``top_k=0`` or
        ``return_all``)."""
        if self._added >= len(self.weights):
            raise UserError(f"more checkpoint results than the {len(self.weights)} weights")
        if result.all_scores is None:
            raise UserError("a checkpoint's scores must keep every document (score with top_k=0 or return_all)")
        ids = (list(result.query_ids), list(result.doc_ids))
        if self._ids is None:
            self._ids = ids
        elif ids != self._ids:
            raise UserError("checkpoints were scored on other queries or documents (ids or order differ)")
        part = torch.as_tensor(result.all_scores, dtype=torch.float64) * self.weights[self._added]
        self._sum = part if self._sum is None else self._sum + part
        self._tokens = max(self._tokens, result.n_tokens)
        self._added += 1

    def result(self, top_k: int = 50) -> ScoreResult:
        """The combined scores: the top ``top_k`` per query (0: all, sorted) and every pair."""
        if self._added != len(self.weights) or self._sum is None or self._ids is None:
            raise UserError(f"{self._added} of {len(self.weights)} checkpoints scored")
        q_ids, d_ids = self._ids
        k = self._sum.shape[1] if top_k == 0 else min(top_k, self._sum.shape[1])
        values, index = torch.sort(self._sum, dim=1, descending=True) if top_k == 0 else self._sum.topk(k, dim=1)
        return ScoreResult(q_ids, d_ids, values.numpy(), index.numpy(), self._sum.numpy(), self._tokens,
                           {"checkpoints": str(self._added)})
