"""Per-document signals for a query-free data-quality audit, from one pass over the documents.

For document ``d`` with per-layer gradient ``G_d = Σ_t g_t a_t^T`` (the gradient of its summed NLL):

* self-influence ``s_d = <G_d, (H + λI)^{-1} G_d>`` (as :class:`~influence_engine.scoring.SelfInfluenceAccumulator`);
* its split over token positions ``s_{d,t} = g_t^T [(H + λI)^{-1} G_d] a_t``, summed over layers: the positions
  sum to ``s_d`` exactly, so a position holding most of it is a *hot spot* (the span the model is most pulled by);
* its loss: the mean next-token NLL over its targets, ``-log p(x_{t+1} | x_{≤t})``, read from the pass's own
  softmax (:attr:`PassContext.target_probs`), so it costs nothing beyond the pass.

Neither needs ``(H + λI)^{-1} G_d`` back in the original basis. With the eigenbasis ``Q_S, Q_A`` and damped
eigenvalues ``E``, rotate each token's vectors first (``ĝ_t = Q_S^T g_t``, ``â_t = Q_A^T a_t``): the document's
rotated gradient is ``R_d = Σ_t ĝ_t â_t^T``, ``s_d = <R_d, R_d / E>`` and ``s_{d,t} = ĝ_t^T (R_d / E) â_t``. That costs
``T (out² + a_dim²)`` per document instead of the two dense products per side of rotating ``G_d`` and rotating it
back (``2 out a_dim (out + a_dim)``): ~20x less for short documents on real widths (out 1536, a_dim 576). Which way
is cheaper is decided per layer and batch; both are exact (tests/engine/test_quality_engine.py).

Position ``t``'s share comes from the layers' inputs and output gradients at ``t`` (as in :meth:`explain`), so
the token whose prediction is wrong gets its share at the position *before* it. The loss of each token is kept
beside (``token_loss[t]`` is the NLL of token ``t``, NaN for tokens that are not targets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .factors import Factors, per_document_gradient
from .layers import LayerSpec
from .passes import PassContext, augment
from .scoring import SelfInfluenceAccumulator


@dataclass
class DocumentSignals:
    """One document's engine signals: ``token_self_influence`` and ``token_loss`` have one entry per token."""

    id: str
    self_influence: float
    loss: float  # mean NLL (nats) over the document's targets
    n_targets: int
    token_ids: list[int]
    token_self_influence: np.ndarray  # float64, sums to self_influence
    token_loss: np.ndarray  # float64, NaN where the token is not a target

    def hot_spots(self, k: int) -> list[int]:
        """Positions of the ``k`` largest per-token self-influences (all positions when ``k`` is 0), by value."""
        order = np.argsort(-self.token_self_influence, kind="stable")
        return order.tolist() if k == 0 else order[:k].tolist()


class DocumentSignalAccumulator(SelfInfluenceAccumulator):
    """Self-influence per document and per token position, and the loss per document, in one pass.

    The self-influence per layer is the sum of the per-position products, so the positions add up to it
    exactly; the documents' totals go through the base class's bookkeeping (``values``). ``positional``: a layer
    that sees only some tokens (a MoE expert) hands them over at their positions, so positions add up across layers."""

    positional = True
    token_rotation: bool | None = None  # None: whichever is cheaper; True/False force a path (tests)

    def __init__(self, factors: Factors, examples: Sequence) -> None:
        super().__init__(factors)
        self._lengths = {e.id: len(e.input_ids) for e in examples}
        self._tokens = {e.id: list(e.input_ids) for e in examples}
        self._token_pending: list[torch.Tensor] = []
        self.signals: dict[str, DocumentSignals] = {}

    def begin_batch(self, ctx: PassContext) -> None:
        super().begin_batch(ctx)
        self._token_pending = []

    def _rotate_tokens(self, T: int, n_out: int, n_a: int) -> bool:
        if not self.factors.kind.rotated:
            return False
        if self.token_rotation is not None:
            return self.token_rotation
        return T * (n_out ** 2 + n_a ** 2) < 2 * n_out * n_a * (n_out + n_a)

    def backward(self, spec: LayerSpec, a, g: torch.Tensor, ctx: PassContext) -> None:
        a = augment(ctx.masked(a), spec, ctx.mask)  # (B, T, a_dim)
        g = ctx.masked(g)  # (B, T, out)
        kind, damping = self.factors.kind, self.factors.damping[spec.name]
        t = self.factors.layer_tensors(spec.name, g.device, g.dtype)
        if self._rotate_tokens(a.shape[1], g.shape[-1], a.shape[-1]):
            # Q_S^T G Q_A = Σ_t (Q_S^T g_t)(Q_A^T a_t)^T: rotate the tokens, scale, never rotate back
            a, g = a @ t["Q_A"], g @ t["Q_S"]
            PG = kind.scale(t, damping, per_document_gradient(a, g))  # (B, out, a_dim), in the eigenbasis
        else:
            PG = kind.precondition(t, damping, per_document_gradient(a, g))  # (B, out, a_dim)
        del t
        per_token = (torch.bmm(a, PG.transpose(1, 2)) * g).sum(-1)  # g_t^T (P G) a_t: (B, T)
        self._token_pending.append(per_token)
        self._pending[spec.name] = per_token.sum(1)

    def end_batch(self, ctx: PassContext) -> None:
        if ctx.target_probs is None:
            raise ValueError("the document signals need a pass on the data's own labels (labels='true')")
        B, T = ctx.mask.shape
        per_token = sum(self._token_pending).double().cpu()
        predicts = torch.zeros(B, T, dtype=torch.bool, device=ctx.mask.device)
        predicts[:, :-1] = ctx.batch.target_mask[:, 1:]  # row t predicts token t + 1
        tiny = torch.finfo(ctx.target_probs.dtype).tiny  # a probability that underflowed: a finite, huge NLL
        nll = torch.where(predicts, -ctx.target_probs.clamp(min=tiny).log(),
                          torch.zeros((), dtype=ctx.target_probs.dtype, device=ctx.mask.device)).double().cpu()
        predicts = predicts.cpu()
        super().end_batch(ctx)
        for b, doc_id in enumerate(ctx.batch.ids):
            off, n = ctx.batch.offsets[b], self._lengths[doc_id]
            rows = slice(off, off + n)
            n_targets = int(predicts[b].sum())
            token_loss = np.full(n, np.nan)
            row_nll = nll[b, rows].numpy()
            token_loss[1:] = np.where(predicts[b, rows].numpy()[:-1], row_nll[:-1], np.nan)
            self.signals[doc_id] = DocumentSignals(
                doc_id, self.values[doc_id], float(nll[b].sum()) / max(n_targets, 1), n_targets,
                self._tokens[doc_id], per_token[b, rows].numpy().copy(), token_loss)
        self._token_pending = []

    def abort_batch(self) -> None:
        super().abort_batch()
        self._token_pending = []
