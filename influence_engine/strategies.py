r"""Strategies: which fitting passes each one needs and how it preconditions, written once.

Every strategy preconditions a layer's gradient ``G`` (``out × a_dim``) the same way:
rotate into its basis, divide elementwise by its (damped) eigenvalues, rotate back::

    (H + λI)^{-1} G = unrotate( rotate(G) / (eigen + λ) )

=============  ==========================  =======================  ======================================
strategy       basis (rotate)              eigenvalues ``eigen``    fitting passes
=============  ==========================  =======================  ======================================
``identity``   none                        none (no scaling)        none
``diagonal``   none                        ``E_doc[G^2]``           eigenvalue correction (unrotated)
``kfac``       ``Q_S^T G Q_A``             ``λ_S λ_A^T``            covariance
``ekfac``      ``Q_S^T G Q_A``             ``E_doc[(Q_S^T G Q_A)^2]``  covariance, then eigenvalue correction
=============  ==========================  =======================  ======================================

The engine, the flow and the CLI ask a :class:`Strategy` which passes to run (:attr:`Strategy.stages`);
:class:`~influence_engine.factors.Factors`, query preparation and the gradient index all precondition
through :meth:`Strategy.rotate`, :meth:`Strategy.scale` and :meth:`Strategy.unrotate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from .statistics import Eigenbasis, LambdaPartial

Tensors = Mapping[str, torch.Tensor]  # one layer's factor tensors: Q_A, Q_S, and the eigenvalues


@dataclass(frozen=True)
class Strategy:
    """One preconditioning strategy.

    ``covariance``: needs the covariance pass (``A``, ``S``) and its eigenbasis; ``lambdas``: needs the
    eigenvalue-correction pass; ``rotated``: works in the eigenbasis ``Q_S, Q_A``; ``eigen_key``: the name of
    its eigenvalues among a layer's factor tensors (``None``: no scaling)."""

    name: str
    covariance: bool
    lambdas: bool
    rotated: bool
    eigen_key: str | None

    @property
    def stages(self) -> tuple[str, ...]:
        """The fitting passes over the training data, in order: ``covariance`` and/or ``lambda``."""
        return (("covariance",) if self.covariance else ()) + (("lambda",) if self.lambdas else ())

    @property
    def lambda_basis(self) -> bool:
        """Whether the eigenvalue correction is fitted in the eigenbasis (EK-FAC) or unrotated (diagonal)."""
        return self.lambdas and self.rotated

    def eigenvalues(self, name: str, basis: Eigenbasis | None, lambdas: LambdaPartial | None) -> torch.Tensor | None:
        """Layer ``name``'s undamped eigenvalues (float64, ``out × a_dim``) from the fitted pieces."""
        if self.eigen_key is None:
            return None
        if self.lambdas:
            if lambdas is None or lambdas.n_docs == 0:
                raise ValueError(f"{self.name} needs fitted eigenvalue corrections")
            if lambdas.rotated != self.rotated:
                from .errors import FactorMismatchError

                raise FactorMismatchError("eigenvalue corrections were fitted for another strategy")
            return lambdas.sums[name].double().cpu() / lambdas.n_docs
        if basis is None:
            raise ValueError(f"{self.name} needs an eigenbasis")
        return basis.lambda_S[name][:, None] * basis.lambda_A[name][None, :]

    def basis_tensors(self, name: str, basis: Eigenbasis | None) -> dict[str, torch.Tensor]:
        if not self.rotated:
            return {}
        if basis is None:
            raise ValueError(f"{self.name} needs an eigenbasis")
        return {"Q_A": basis.Q_A[name], "Q_S": basis.Q_S[name]}

    # -- the maths, on tensors already on G's device and in its dtype
    def rotate(self, t: Tensors, G: torch.Tensor) -> torch.Tensor:
        """``Q_S^T G Q_A`` (or ``G``) for ``G`` of shape ``(..., out, a_dim)``."""
        return t["Q_S"].T @ G @ t["Q_A"] if self.rotated else G

    def unrotate(self, t: Tensors, R: torch.Tensor) -> torch.Tensor:
        """``Q_S R Q_A^T`` (or ``R``): back from the eigenbasis."""
        return t["Q_S"] @ R @ t["Q_A"].T if self.rotated else R

    def scale(self, t: Tensors, damping: float, R: torch.Tensor) -> torch.Tensor:
        """``R / (eigen + λ)`` elementwise (``R`` itself without eigenvalues)."""
        return R if self.eigen_key is None else R / (t[self.eigen_key] + damping)

    def precondition(self, t: Tensors, damping: float, G: torch.Tensor) -> torch.Tensor:
        """``(H + λI)^{-1} G``."""
        return self.unrotate(t, self.scale(t, damping, self.rotate(t, G)))

    def self_product(self, t: Tensors, damping: float, G: torch.Tensor) -> torch.Tensor:
        """``<G, (H + λI)^{-1} G>`` per leading index, without rotating back (rotations are orthogonal)."""
        R = self.rotate(t, G)
        return (R * self.scale(t, damping, R)).sum((-2, -1))


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("identity", covariance=False, lambdas=False, rotated=False, eigen_key=None),
    Strategy("diagonal", covariance=False, lambdas=True, rotated=False, eigen_key="diag"),
    Strategy("kfac", covariance=True, lambdas=False, rotated=True, eigen_key="eigen"),
    Strategy("ekfac", covariance=True, lambdas=True, rotated=True, eigen_key="eigen"),
)}


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name``; a one-line error naming the choices otherwise."""
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        raise UserError(f"--strategy {name!r}: choose one of {', '.join(STRATEGIES)}") from None
