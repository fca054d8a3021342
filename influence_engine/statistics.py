"""The fitted statistics of EK-FAC and their files: additive partials (covariance sums, eigenvalue-correction
sums) that shards or workers fit apart and merge exactly, the eigenbasis, and the safetensors files that hold
them (written atomically, with their metadata as JSON). Plain containers: the passes that fill them are in
factors.py, the strategies that read them in strategies.py."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_path
from .errors import FactorMismatchError, NumericalError, UserError
from .layers import LayerSpec


def check_finite(name: str, what: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise NumericalError(f"layer {name}: {what} contains NaN or Inf",
                             hint="check the model for overflow (try --precision fp32) or bad weights")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"meta": json.dumps(meta, sort_keys=True)})


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
        return load_file(str(path)), meta
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except Exception as exc:
        raise UserError(f"{path}: not a readable factor file ({exc})",
                        hint="delete it and fit the factors again") from None


def load_tensors_meta(path: Path) -> dict[str, Any]:
    """The metadata of a tensor file alone (no tensors read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return json.loads((fh.metadata() or {}).get("meta", "{}"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except Exception as exc:
        raise UserError(f"{path}: not a readable factor file ({exc})", hint="delete it and fit the factors again") \
            from None


# ----------------------------------------------------------------------------------------------- partials
@dataclass
class CovariancePartial:
    """Sums of ``a a^T`` and ``g g^T`` over tokens, with counts. Partials add up exactly."""

    specs: dict[str, LayerSpec]
    A: dict[str, torch.Tensor]
    S: dict[str, torch.Tensor]
    n_tokens: int = 0
    n_docs: int = 0
    tokens: dict[str, int] = field(default_factory=dict)  # per layer, where it differs from n_tokens (experts)

    def layer_tokens(self, name: str) -> int:
        """Tokens layer ``name`` saw: the normaliser of its ``A``."""
        return self.tokens.get(name, self.n_tokens)

    def counts_only(self) -> CovariancePartial:
        """The counts without the sums: what is left to keep once the sums are eigendecomposed (on a real
        model's 90 MLP layers the float64 sums are 1.9 GB)."""
        return CovariancePartial(self.specs, {}, {}, self.n_tokens, self.n_docs, dict(self.tokens))

    @classmethod
    def zeros(cls, specs: dict[str, LayerSpec], device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float64) -> CovariancePartial:
        return cls(dict(specs),
                   {n: torch.zeros(s.a_dim, s.a_dim, dtype=dtype, device=device) for n, s in specs.items()},
                   {n: torch.zeros(s.out_features, s.out_features, dtype=dtype, device=device)
                    for n, s in specs.items()})

    def __add__(self, other: CovariancePartial) -> CovariancePartial:
        if list(self.specs) != list(other.specs):
            raise FactorMismatchError("covariance partials track different layers; they cannot be merged")
        tokens = {n: self.layer_tokens(n) + other.layer_tokens(n) for n in set(self.tokens) | set(other.tokens)}
        return CovariancePartial(self.specs, {n: self.A[n] + other.A[n].to(self.A[n]) for n in self.A},
                                 {n: self.S[n] + other.S[n].to(self.S[n]) for n in self.S},
                                 self.n_tokens + other.n_tokens, self.n_docs + other.n_docs, tokens)

    @classmethod
    def join(cls, parts: Sequence[CovariancePartial]) -> CovariancePartial:
        """Partials of disjoint groups of layers over the same documents, as one partial (layers in the parts'
        order)."""
        _check_same_documents(parts, [(p.n_tokens, p.n_docs) for p in parts])
        specs = {n: s for p in parts for n, s in p.specs.items()}
        return cls(specs, {n: p.A[n] for p in parts for n in p.A}, {n: p.S[n] for p in parts for n in p.S},
                   parts[0].n_tokens, parts[0].n_docs, {n: c for p in parts for n, c in p.tokens.items()})

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> None:
        tensors = {f"A/{n}": t for n, t in self.A.items()} | {f"S/{n}": t for n, t in self.S.items()}
        save_tensors(Path(path), tensors, {"kind": "covariance", "n_tokens": self.n_tokens, "n_docs": self.n_docs,
                                            "tokens": self.tokens,
                                            "layers": [s.to_json() for s in self.specs.values()], **(meta or {})})

    @classmethod
    def load(cls, path: str | Path) -> CovariancePartial:
        t, meta = load_tensors(Path(path))
        specs = {d["name"]: LayerSpec(**d) for d in meta["layers"]}
        return cls(specs, {n: t[f"A/{n}"] for n in specs}, {n: t[f"S/{n}"] for n in specs},
                   int(meta["n_tokens"]), int(meta["n_docs"]), {k: int(v) for k, v in meta.get("tokens", {}).items()})


def merge(partials: Iterable[Any]) -> Any:
    """Sum partials (covariance or lambda) from shards or workers."""
    it = iter(partials)
    total = next(it)
    for p in it:
        total = total + p
    return total


def _check_same_documents(parts: Sequence[Any], counts: Sequence[Any]) -> None:
    if not parts:
        raise ValueError("no partials to join")
    names = [n for p in parts for n in p.specs]
    if len(set(names)) != len(names):
        raise FactorMismatchError("layer groups overlap; their partials cannot be joined")
    if len(set(counts)) != 1:
        raise FactorMismatchError(f"layer groups' partials cover different documents ({sorted(set(counts))}); "
                                  "they cannot be joined")


def merge_groups(partials: Iterable[Any]) -> Any:
    """Partials from shards and groups of layers (each holding one group's layers, any order of shards and
    groups): summed per group in the order given (shard order, as :func:`merge`), then joined, groups in the order
    they first appear. Partials that all track the same layers are simply merged."""
    by_group: dict[tuple[str, ...], list[Any]] = {}
    for p in partials:
        by_group.setdefault(tuple(p.specs), []).append(p)
    merged = [merge(ps) for ps in by_group.values()]
    return merged[0] if len(merged) == 1 else type(merged[0]).join(merged)


@dataclass
class Eigenbasis:
    """``Q_A, λ_A, Q_S, λ_S`` per layer, from a merged :class:`CovariancePartial` (float64)."""

    specs: dict[str, LayerSpec]
    Q_A: dict[str, torch.Tensor]
    lambda_A: dict[str, torch.Tensor]
    Q_S: dict[str, torch.Tensor]
    lambda_S: dict[str, torch.Tensor]


def save_basis(basis: Eigenbasis, path: str | Path) -> None:
    tensors = {}
    for n in basis.specs:
        tensors |= {f"Q_A/{n}": basis.Q_A[n], f"lambda_A/{n}": basis.lambda_A[n], f"Q_S/{n}": basis.Q_S[n],
                    f"lambda_S/{n}": basis.lambda_S[n]}
    save_tensors(Path(path), tensors, {"kind": "eigenbasis", "layers": [s.to_json() for s in basis.specs.values()]})


def load_basis(path: str | Path, layers: Sequence[str] | None = None) -> Eigenbasis:
    """The basis stored at ``path``; with ``layers``, those layers' alone (a worker fitting one group of layers
    reads only its group's tensors)."""
    if layers is None:
        t, meta = load_tensors(Path(path))
    else:
        from safetensors import safe_open

        meta = load_tensors_meta(Path(path))
        want = set(layers)
        with safe_open(str(path), framework="pt") as fh:
            t = {k: fh.get_tensor(k) for k in fh.keys() if k.split("/", 1)[1] in want}
        meta = {**meta, "layers": [d for d in meta["layers"] if d["name"] in want]}
    specs = {d["name"]: LayerSpec(**d) for d in meta["layers"]}
    return Eigenbasis(specs, *({n: t[f"{key}/{n}"] for n in specs} for key in ("Q_A", "lambda_A", "Q_S", "lambda_S")))


@dataclass
class LambdaPartial:
    """Sums over documents of squared (rotated) per-document gradients, with the document count."""

    specs: dict[str, LayerSpec]
    sums: dict[str, torch.Tensor]  # (out, a_dim)
    n_docs: int = 0
    rotated: bool = True

    def __add__(self, other: LambdaPartial) -> LambdaPartial:
        if list(self.specs) != list(other.specs) or self.rotated != other.rotated:
            raise FactorMismatchError("eigenvalue-correction partials differ in layers or basis; cannot merge")
        return LambdaPartial(self.specs, {n: self.sums[n] + other.sums[n].to(self.sums[n]) for n in self.sums},
                             self.n_docs + other.n_docs, self.rotated)

    @classmethod
    def join(cls, parts: Sequence[LambdaPartial]) -> LambdaPartial:
        """Partials of disjoint groups of layers over the same documents, as one partial."""
        _check_same_documents(parts, [(p.n_docs, p.rotated) for p in parts])
        return cls({n: s for p in parts for n, s in p.specs.items()}, {n: p.sums[n] for p in parts for n in p.sums},
                   parts[0].n_docs, parts[0].rotated)

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> None:
        save_tensors(Path(path), {f"L/{n}": t for n, t in self.sums.items()},
                      {"kind": "lambda", "n_docs": self.n_docs, "rotated": self.rotated,
                       "layers": [s.to_json() for s in self.specs.values()], **(meta or {})})

    @classmethod
    def load(cls, path: str | Path) -> LambdaPartial:
        t, meta = load_tensors(Path(path))
        specs = {d["name"]: LayerSpec(**d) for d in meta["layers"]}
        return cls(specs, {n: t[f"L/{n}"] for n in specs}, int(meta["n_docs"]), bool(meta["rotated"]))
