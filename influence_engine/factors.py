r"""Curvature factors: the (E)K-FAC approximation of the Gauss-Newton Hessian, layer by layer.

Symbols (Grosse et al. 2023, section 2.2), per tracked layer with input ``a`` (bias column appended) and
output pseudo-gradient ``g`` (from labels sampled from the model, so the Fisher is the true Fisher):

* ``A = Σ_tok a a^T / n_tokens`` and ``S = Σ_tok g g^T / n_docs``: activation and gradient covariances.
  ``n_tokens`` is the layer's own count: every real token for a dense layer, the tokens routed to it for a
  mixture-of-experts expert (see experts.py).
  K-FAC approximates the layer's per-document Fisher ``E_doc[vec(G) vec(G)^T]`` as ``A ⊗ S`` (treating
  tokens as independent, ``Σ_t a_t a_t^T ⊗ g_t g_t^T ≈ (Σ_t a_t a_t^T / T) ⊗ Σ_t g_t g_t^T``), so K-FAC and
  EK-FAC eigenvalues are on the same scale.
* ``Q_A, Q_S``: their eigenbases (``eigh`` in float64); ``λ_A, λ_S`` their eigenvalues.
* ``Λ = E_doc[(Q_S^T G Q_A)^2]``: EK-FAC's eigenvalue correction, the mean of squared per-document
  gradients ``G = Σ_t g_t a_t^T`` rotated into the eigenbasis (K-FAC uses ``λ_S λ_A^T`` instead).
* ``λ``: damping per layer, ``0.1 × mean(Λ)`` (``auto``), ``X × mean(Λ)`` (``auto:X``) or a given number.

The preconditioned gradient is ``Q_S [(Q_S^T G Q_A) / (Λ + λ)] Q_A^T``. Strategy ``diagonal`` uses
``E_doc[G^2]`` elementwise without rotation; ``identity`` is no preconditioning (gradient dot products).

Fitting is split into additive partials (sums plus counts) so that shards or workers can be fitted apart
and merged exactly: ``CovariancePartial`` then ``LambdaPartial``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import write_json_atomic
from .errors import FactorMismatchError, NumericalError, UserError
from .layers import LayerSpec
from .passes import BaseAccumulator, PassContext, aligned, augment
from .settings import FactorSettings, damping_rule
from .statistics import CovariancePartial, Eigenbasis, LambdaPartial, check_finite, load_tensors, save_tensors
from .strategies import Strategy, get_strategy

FORMAT_VERSION = 2  # 2: meta["settings"] holds the FactorSettings



def eigendecompose(cov: CovariancePartial, device: torch.device | str | None = None,
                   device_budget: int | None = None, dtype: torch.dtype = torch.float64) -> Eigenbasis:
    """Eigendecompose the mean covariances (negative round-off eigenvalues clipped to 0), one layer at a time;
    the result is float64.

    ``dtype``: what ``eigh`` runs in (the means are formed in float64 either way). Keep float64: float32 halves
    the stage on CPUs (a 1536² ``eigh``: 0.24 s against 0.49 s on two cores), but on SmolLM2-135M's MLP layers
    at the default damping it moved the ranking (Spearman 0.944, top-10 overlap 0.79 against float64's:
    ``bench/real_model.py ours --eigh fp32``): small damping makes the small-eigenvalue directions count, and
    float32 gets those wrong.

    ``device``: where ``eigh`` runs (default the CPU); a GPU is many times faster at GPT-2 widths. A layer whose
    matrices and eigenvectors in float64 (``16 max(in, out)^2`` bytes) exceed ``device_budget`` runs on the CPU.
    The result is on the CPU either way."""
    if cov.n_tokens == 0:
        raise UserError("no tokens were seen while fitting covariances", hint="the training data is empty")
    device = torch.device(device) if device is not None else torch.device("cpu")
    out = Eigenbasis(cov.specs, {}, {}, {}, {})
    for n, spec in cov.specs.items():
        big = device_budget is not None and 16 * max(spec.a_dim, spec.out_features) ** 2 > device_budget
        for key, mat, count, qs, ls in (("A", cov.A[n], max(1, cov.layer_tokens(n)), out.Q_A, out.lambda_A),
                                        ("S", cov.S[n], cov.n_docs, out.Q_S, out.lambda_S)):
            m = mat.to("cpu" if big else device, torch.float64) / count
            check_finite(n, f"covariance {key}", m)
            m = 0.5 * (m + m.T)
            vals, vecs = torch.linalg.eigh(m.to(dtype))
            ls[n], qs[n] = vals.double().clamp_min(0.0).cpu(), vecs.double().cpu()
    return out



# ------------------------------------------------------------------------------------------- accumulators
# Smallest column block of a blocked ``x^T x`` per device type (None: one plain GEMM). Splitting the columns into
# k blocks and computing only the blocks on and above the diagonal does k(k+1)/2 of k^2 products: 3/4 of the
# multiply-adds at k = 2, 2/3 at k = 3. It once paid on CPU (GPT-2 widths, 2k-token batches, 256-column blocks),
# but with torch 2.14 on this 2-core machine it does not: CPU time 17 ms blocked vs 10.5 ms plain for a
# 176 x 1536 batch (8 short documents: SmolLM2-135M's MLP widths), equal at 2048 x 768, and under load (other
# processes on the cores) the 21 small products and block copies took 5-10x the wall time of one GEMM: the
# covariance pass on the real model was mostly spent there (bench/real_model.py, docs/performance.md). Off on
# every device; on GPUs small blocks leave streaming multiprocessors idle.
GRAM_MIN_BLOCK: dict[str, int | None] = {"cpu": None, "cuda": None}


def gram(x: torch.Tensor) -> torch.Tensor:
    """``x^T x`` for ``x`` (n, d), computing only the blocks on and above the diagonal where that pays (torch has
    no symmetric rank-k update)."""
    d = x.shape[1]
    block = GRAM_MIN_BLOCK.get(x.device.type)
    k = 1 if block is None else d // block
    if k < 2:
        return x.T @ x
    edges = [round(i * d / k) for i in range(k + 1)]
    out = torch.empty(d, d, dtype=x.dtype, device=x.device)
    for i in range(k):
        xi = x[:, edges[i]:edges[i + 1]]
        for j in range(i, k):
            blk = xi.T @ x[:, edges[j]:edges[j + 1]]
            out[edges[i]:edges[i + 1], edges[j]:edges[j + 1]] = blk
            if j > i:
                out[edges[j]:edges[j + 1], edges[i]:edges[i + 1]] = blk.T
    return out


class CovarianceAccumulator(BaseAccumulator):
    """Accumulates ``Σ a a^T`` (forward) and ``Σ g g^T`` (backward) over real tokens.

    With a bias, ``a`` is ``[x, 1]``: its block ``x x^T`` is the GEMM; the bias row ``Σ x`` and corner
    (the token count) are filled in without ever concatenating the ones column."""

    def __init__(self, specs: dict[str, LayerSpec], device: torch.device, dtype: torch.dtype = torch.float64):
        # running sums on the device in ``dtype``: float32 outside fp64 mode (half the memory of float64, which
        # for GPT-2-small's MLP layers is 1.9 GB); partials leave the device in float64
        self.total = CovariancePartial.zeros(specs, device, dtype)
        self.specs = specs
        self._pending: list[tuple[dict[str, torch.Tensor], str, torch.Tensor, torch.Tensor | None]] = []
        self._tokens: dict[str, int] = {}  # this batch's per-layer counts, for layers that see part of it

    def begin_batch(self, ctx: PassContext) -> None:
        self._pending = []
        self._tokens = {}

    def forward(self, spec: LayerSpec, a: torch.Tensor, ctx: PassContext) -> None:
        self._add_activations(spec, ctx.masked(a, ctx.gemm_dtype), ctx)

    def backward(self, spec: LayerSpec, state: Any, g: torch.Tensor, ctx: PassContext) -> None:
        self._add_gradients(spec, ctx.masked(g, ctx.gemm_dtype))

    def _add_activations(self, spec: LayerSpec, x: torch.Tensor, ctx: PassContext) -> None:
        """This batch's ``Σ x x^T`` (and bias row) from masked inputs ``x`` (B, T, in); committed at batch end."""
        flat = x.flatten(0, 1)
        col = flat.sum(0, dtype=ctx.dtype) if spec.bias else None
        if ctx.n_tokens is not None:
            self._tokens[spec.name] = ctx.n_tokens
        self._pending.append((self.total.A, spec.name, gram(flat), col))

    def _add_gradients(self, spec: LayerSpec, g: torch.Tensor) -> None:
        """This batch's ``Σ g g^T`` from masked output gradients ``g`` (B, T, out); committed at batch end."""
        self._pending.append((self.total.S, spec.name, gram(g.flatten(0, 1)), None))

    def end_batch(self, ctx: PassContext) -> None:
        n_tokens = ctx.batch.n_tokens
        for store, name, value, col in self._pending:
            acc = store[name]
            if col is None:
                acc += value.to(acc.dtype)
            else:
                n = self.specs[name].in_features
                col = col.to(acc.dtype)
                acc[:n, :n] += value.to(acc.dtype)
                acc[n, :n] += col
                acc[:n, n] += col
                acc[n, n] += self._tokens.get(name, n_tokens)
        for name, count in self._tokens.items():
            self.total.tokens[name] = self.total.tokens.get(name, 0) + count
        self._pending = []
        self._tokens = {}
        self.total.n_tokens += n_tokens
        self.total.n_docs += len(ctx.batch)

    def abort_batch(self) -> None:
        self._pending = []
        self._tokens = {}


def per_document_gradient(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``G_b = Σ_t g_{b,t} a_{b,t}^T`` for each document: ``(B, out, a_dim)``."""
    return torch.bmm(g.transpose(1, 2), a)


class LambdaAccumulator(BaseAccumulator):
    """Accumulates ``Σ_doc (Q_S^T G Q_A)^2`` (or ``Σ_doc G^2`` without a basis, for ``diagonal``).

    Tokens are rotated before the per-document product: ``Q_S^T G Q_A = Σ_t (Q_S^T g_t)(Q_A^T a_t)^T``.
    With a bias, ``a_t^T Q_A = x_t^T Q_A[:in] + Q_A[in]``: one fused multiply-add, no ones column."""

    def __init__(self, specs: dict[str, LayerSpec], basis: Eigenbasis | None, device: torch.device,
                 dtype: torch.dtype, gemm_dtype: torch.dtype | None = None):
        self.specs = specs
        self.device = device
        self.gemm_dtype = gemm_dtype or dtype
        self.basis = None
        self.width = {n: aligned(s.a_dim, device) for n, s in specs.items()}
        if basis is not None:
            self.basis = {}
            for n, s in specs.items():
                Q_A = torch.zeros(s.a_dim, self.width[n], dtype=torch.float64)
                Q_A[:, :s.a_dim] = basis.Q_A[n]
                Q_A = Q_A.to(device, self.gemm_dtype)
                self.basis[n] = (Q_A[:s.in_features], Q_A[s.in_features] if s.bias else None,
                                 basis.Q_S[n].to(device, self.gemm_dtype))
        self.total = LambdaPartial(dict(specs), {n: torch.zeros(s.out_features, s.a_dim, dtype=torch.float64,
                                                                  device=device) for n, s in specs.items()},
                                   0, rotated=basis is not None)
        self._pending: dict[str, torch.Tensor] = {}

    def begin_batch(self, ctx: PassContext) -> None:
        self._pending = {}

    def forward(self, spec: LayerSpec, a: torch.Tensor, ctx: PassContext) -> torch.Tensor:
        x = a.to(self.gemm_dtype)
        if self.basis is None:
            return augment(ctx.masked(x, self.gemm_dtype), spec, ctx.mask)
        W, w_bias, _ = self.basis[spec.name]
        flat = x.flatten(0, 1)
        rot = torch.addmm(w_bias, flat, W) if w_bias is not None else flat @ W
        return ctx.zero_padding(rot.view(*x.shape[:2], -1))

    def backward(self, spec: LayerSpec, a: torch.Tensor, g: torch.Tensor, ctx: PassContext) -> None:
        g = ctx.masked(g, self.gemm_dtype)
        if self.basis is not None:
            g = g @ self.basis[spec.name][2]
        self._add(spec, per_document_gradient(a, g), ctx)

    def gradients(self, spec: LayerSpec, G: torch.Tensor, ctx: PassContext) -> None:
        """Stored per-document gradients: rotated here (``Q_S^T G Q_A``), then summed as in a pass."""
        G = G.to(self.gemm_dtype)
        if self.basis is not None:
            W, w_bias, Q_S = self.basis[spec.name]
            Q_A = W if w_bias is None else torch.cat([W, w_bias[None]])  # (a_dim, width)
            G = Q_S.T @ G @ Q_A
        self._add(spec, G, ctx)

    def _add(self, spec: LayerSpec, R: torch.Tensor, ctx: PassContext) -> None:
        """This batch's ``Σ_doc R_d^2`` from (rotated) per-document gradients ``R`` (B, out, width)."""
        self._pending[spec.name] = R.to(ctx.dtype).square_().sum(0)

    def end_batch(self, ctx: PassContext) -> None:
        for name, value in self._pending.items():
            self.total.sums[name] += value[:, :self.specs[name].a_dim].double()
        self._pending = {}
        self.total.n_docs += len(ctx.batch)

    def abort_batch(self) -> None:
        self._pending = {}


# ------------------------------------------------------------------------------------------------ factors
@dataclass
class Factors:
    """Finalised factors for one strategy: everything needed to precondition gradients.

    ``meta["settings"]`` holds the :class:`~influence_engine.settings.FactorSettings` they were fitted with
    (when fitted through an engine); :meth:`load` checks it field by field against the settings asked for."""

    strategy: str
    specs: dict[str, LayerSpec]
    tensors: dict[str, dict[str, torch.Tensor]]  # layer -> {"Q_A","Q_S","eigen"} or {"diag"} or {}
    damping: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> Strategy:
        return get_strategy(self.strategy)

    @property
    def settings(self) -> FactorSettings | None:
        stored = self.meta.get("settings")
        return None if stored is None else FactorSettings.from_json(stored)

    def layer_tensors(self, name: str, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Layer ``name``'s factor tensors on ``device`` in ``dtype``."""
        return {k: v.to(device, dtype) for k, v in self.tensors[name].items()}

    # -- maths (see strategies.py)
    def precondition(self, name: str, G: torch.Tensor) -> torch.Tensor:
        """``(H + λI)^{-1} G`` for gradients ``G`` of shape ``(..., out, a_dim)`` of layer ``name``."""
        return self.kind.precondition(self.layer_tensors(name, G.device, G.dtype), self.damping[name], G)

    def self_product(self, name: str, G: torch.Tensor) -> torch.Tensor:
        """``<G, (H + λI)^{-1} G>`` per leading index: self-influence without forming the inverse."""
        return self.kind.self_product(self.layer_tensors(name, G.device, G.dtype), self.damping[name], G)

    def with_damping(self, damping: float | str) -> Factors:
        """The same factors with another damping (``auto``, ``auto:X`` or a number; see :func:`layer_damping`):
        no refit, the eigenvalues are kept. The recorded settings say the new damping."""
        kind = self.kind
        damp = {n: 0.0 if kind.eigen_key is None else layer_damping(damping, self.tensors[n][kind.eigen_key].double())
                for n in self.specs}
        meta = dict(self.meta)
        if meta.get("settings") is not None:
            meta["settings"] = FactorSettings.from_json(meta["settings"]).replace(damping=damping).to_json()
        return Factors(self.strategy, self.specs, self.tensors, damp, meta)

    # -- store
    def save(self, directory: str | Path) -> Path:
        """Write ``factors.safetensors`` and ``factors.json`` (metadata) atomically."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        flat = {f"{layer}/{key}": v for layer, ts in self.tensors.items() for key, v in ts.items()}
        meta = {**self.meta, "format_version": FORMAT_VERSION, "strategy": self.strategy,
                "layers": [s.to_json() for s in self.specs.values()], "damping": self.damping}
        save_tensors(d / "factors.safetensors", flat, {"strategy": self.strategy})
        write_json_atomic(d / "factors.json", meta)
        return d

    @staticmethod
    def exists(directory: str | Path) -> bool:
        return (Path(directory) / "factors.json").exists()

    @classmethod
    def load(cls, directory: str | Path, *, settings: FactorSettings | None = None,
             layers: Sequence[str] | None = None) -> Factors:
        """Load factors, refusing them (one line naming the field) if they were fitted with other
        :class:`FactorSettings` than ``settings`` or track other ``layers``."""
        d = Path(directory)
        meta_path = d / "factors.json"
        if not meta_path.exists():
            raise UserError(f"{d}: no factors.json here", hint="run `influence-audit fit-factors` first")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{meta_path}: corrupt ({exc})", hint="delete the directory and refit") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise FactorMismatchError(f"{meta_path}: format version {meta.get('format_version')} is not "
                                      f"{FORMAT_VERSION}", hint="refit the factors with this version")
        if settings is not None:
            settings.check_matches(meta.get("settings") or {}, str(d))
        names = [s["name"] for s in meta["layers"]]
        if layers is not None and list(layers) != names:
            missing = sorted(set(layers) - set(names))
            raise FactorMismatchError(
                f"{d}: factors track other layers ({len(names)}, e.g. {names[0]}) than the {len(list(layers))} "
                f"asked for" + (f" (missing e.g. {missing[0]})" if missing else ""),
                hint="use the same --layers or refit")
        flat, _ = load_tensors(d / "factors.safetensors")
        specs = {s["name"]: LayerSpec(**s) for s in meta["layers"]}
        tensors: dict[str, dict[str, torch.Tensor]] = {n: {} for n in specs}
        for key, v in flat.items():
            layer, sub = key.rsplit("/", 1)
            if not torch.isfinite(v).all():
                raise NumericalError(f"{d / 'factors.safetensors'}: layer {layer}: stored factor {sub} contains NaN "
                                     f"or Inf", hint="the stored factors are corrupt: delete the directory and refit")
            tensors[layer][sub] = v
        return cls(meta["strategy"], specs, tensors, {k: float(v) for k, v in meta["damping"].items()}, meta)


def layer_damping(damping: float | str | None, eigen: torch.Tensor) -> float:
    """λ of one layer whose eigenvalues are ``eigen``: ``"auto"`` is 0.1 x their mean, ``"auto:X"`` X x their
    mean, a number is itself."""
    rule, value = damping_rule(damping)
    if rule == "absolute":
        return value
    lam = value * float(eigen.mean())
    return lam if lam > 0 else 1e-8  # a layer that saw no signal: keep the inverse finite


def finalize(strategy: str, specs: dict[str, LayerSpec], *, basis: Eigenbasis | None = None,
             lambdas: LambdaPartial | None = None, damping: float | str | None = "auto",
             meta: dict[str, Any] | None = None) -> Factors:
    """Assemble :class:`Factors` from the fitted pieces a strategy needs and choose damping per layer
    (:func:`layer_damping`)."""
    kind = get_strategy(strategy)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    damp: dict[str, float] = {}
    for n in specs:
        tensors[n] = kind.basis_tensors(n, basis)
        eigen = kind.eigenvalues(n, basis, lambdas)
        if eigen is None:
            damp[n] = 0.0
            continue
        check_finite(n, "eigenvalues", eigen)
        tensors[n][kind.eigen_key] = eigen
        damp[n] = layer_damping(damping, eigen)
    return Factors(strategy, dict(specs), tensors, damp, dict(meta or {}))
