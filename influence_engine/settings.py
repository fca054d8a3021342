"""What fitted factors depend on, in one frozen object: hashed for the cache key, checked on reuse.

Factors are a function of the model's weights, the training data and these settings. Two fits with equal
:class:`FactorSettings` give the same factors (up to floating-point rounding), so the settings' :meth:`key`
names a cache directory, and factors stored with other settings are refused naming the field that differs
(as kronfluence saves and checks its arguments).

Keys stay stable as the project grows: only fields that differ from their default go into the hash, so a
field added later with a default that reproduces the old behaviour leaves every existing key unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .errors import FactorMismatchError, UserError
from .strategies import get_strategy

PRECISIONS = ("fp32", "fp64", "bf16")
FISHERS = ("sampled", "empirical")
ON_LONG = ("truncate", "error")


def stable_key(values: Mapping[str, Any], defaults: Mapping[str, Any] | None = None, length: int = 16) -> str:
    """sha256 (hex, ``length`` characters) of ``values`` without the entries equal to their default."""
    kept = {k: v for k, v in values.items() if defaults is None or k not in defaults or defaults[k] != v}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:length]


AUTO_DAMPING_SCALE = 0.1  # ``auto``: 0.1 x each layer's mean eigenvalue (kronfluence's default too)


def normalise_damping(damping: str | float | None) -> str:
    """One normal form per damping: ``"auto"`` (0.1 x each layer's mean eigenvalue), ``"auto:X"`` (X x the mean
    eigenvalue; ``auto:0.1`` is ``auto``) or an absolute number as ``repr(float)``, so ``1e-3`` and ``0.001`` are
    the same setting."""
    if damping is None or damping == "auto":
        return "auto"
    if isinstance(damping, str) and damping.strip().lower().startswith("auto"):
        text = damping.strip().lower()
        try:
            if not text.startswith("auto:"):
                raise ValueError
            scale = float(text[5:])
        except ValueError:
            raise UserError(f"--damping {damping!r}: give 'auto', 'auto:X' (X times each layer's mean eigenvalue, "
                            f"e.g. auto:0.01) or a non-negative number such as 1e-3") from None
        if not scale > 0 or scale == float("inf"):  # also refuses NaN
            raise UserError(f"--damping {damping!r}: the factor X of auto:X must be a positive number")
        return "auto" if scale == AUTO_DAMPING_SCALE else f"auto:{scale!r}"
    try:
        value = float(damping)
    except (TypeError, ValueError):
        raise UserError(f"--damping {damping!r}: give 'auto', 'auto:X' or a non-negative number such as 1e-3"
                        ) from None
    if not value >= 0 or value == float("inf"):  # also refuses NaN
        raise UserError(f"--damping {damping!r}: must be 'auto', 'auto:X' or a non-negative number")
    return repr(value)


def damping_rule(damping: str | float | None) -> tuple[str, float]:
    """``("relative", X)`` for ``auto`` / ``auto:X`` (λ = X x a layer's mean eigenvalue), ``("absolute", λ)``
    for a number."""
    normal = normalise_damping(damping)
    if normal == "auto":
        return "relative", AUTO_DAMPING_SCALE
    if normal.startswith("auto:"):
        return "relative", float(normal[5:])
    return "absolute", float(normal)


@dataclass(frozen=True)
class FactorSettings:
    """Everything fitted factors depend on besides the code: model and data fingerprints, strategy, layer
    selection, damping, how the Fisher's labels are drawn, their seed, tokenisation length and truncation,
    and the precision of the passes."""

    model_fingerprint: str
    data_fingerprint: str
    strategy: str = "ekfac"
    layers: str = "mlp"
    damping: str = "auto"
    fisher: str = "sampled"
    seed: int = 0
    max_length: int = 512
    precision: str = "fp32"
    on_long: str = "truncate"

    def __post_init__(self) -> None:
        get_strategy(self.strategy)
        object.__setattr__(self, "damping", normalise_damping(self.damping))
        for name, allowed in (("precision", PRECISIONS), ("fisher", FISHERS), ("on_long", ON_LONG)):
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: choose one of "
                                f"{', '.join(allowed)}")

    @property
    def damping_value(self) -> str | float:
        """``"auto"``, ``"auto:X"`` or the number, as :func:`~influence_engine.factors.finalize` takes it."""
        return self.damping if self.damping.startswith("auto") else float(self.damping)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FactorSettings:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def key(self) -> str:
        """A 16-character cache key; stable under new fields left at their defaults."""
        defaults = {f.name: f.default for f in fields(self) if f.default is not dataclasses.MISSING}
        return stable_key(self.to_json(), defaults)

    def replace(self, **changes: Any) -> FactorSettings:
        return dataclasses.replace(self, **changes)

    def check_matches(self, stored: Mapping[str, Any], where: str) -> None:
        """Refuse factors stored with other settings, naming the first field that differs. Fields the stored
        record lacks (made before the field existed) count as their default."""
        for f in fields(self):
            want = getattr(self, f.name)
            had = stored.get(f.name, f.default)
            if f.name == "damping" and had is not dataclasses.MISSING:
                had = normalise_damping(had)
            if had == want:
                continue
            hint = "use another --factors directory, or delete this one to refit"
            if f.name.endswith("fingerprint"):
                what = "another model (other weights)" if f.name == "model_fingerprint" else "other training data"
                raise FactorMismatchError(f"{where}: factors were fitted on {what}: {f.name} {str(had)[:12]}, "
                                          f"not {str(want)[:12]}", hint=hint)
            raise FactorMismatchError(f"{where}: factors were made with {f.name}={had!r}, not {want!r}", hint=hint)
