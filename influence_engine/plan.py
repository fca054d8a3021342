r"""A memory plan before the run: what each stage holds, per layer and in total, on the device and on the host.

Per tracked layer with ``a = in + bias`` and ``o = out`` (``b`` bytes per value of the engine's dtype: 4, or 8 in
fp64; ``g`` of its GEMM dtype: 2 in bf16):

* covariance pass: running sums ``A`` (``a²``) and ``S`` (``o²``) on the device in ``b``; the partial leaves in
  float64 (``8 (a² + o²)`` on the host).
* eigendecomposition: one layer at a time, each of ``A`` and ``S`` with its eigenvectors in float64 on the device
  (``16 max(a, o)²`` at the peak; on the host for a layer that does not fit the budget); the basis ``Q_A, Q_S``
  (and eigenvalues) in float64 on the host.
* eigenvalue correction: ``Q_A, Q_S`` in ``g`` and the sums ``Λ`` (``o a``) in float64 on the device.
* stored factors: ``Q_A, Q_S, Λ`` in ``b`` (EK-FAC; K-FAC the same, diagonal ``o a``, identity nothing).
* scoring: prepared queries, ``Q r (o + a)`` values at rank ``r`` (``Q o a`` kept whole).

A batch's memory is an estimate: the model's saved activations for the backward pass (``34 B T h`` half-precision
values per block, Korthikanti et al. 2022, without attention scores: fused attention keeps none), the logits and
their gradient (``B T V``), and the tracked layers' inputs held from forward to backward. The gradient cache is
exact (:func:`~influence_engine.cache.cache_bytes`).

When the factors of every tracked layer do not fit the device budget at once, the covariance and
eigenvalue-correction passes run over groups of layers (one pass per group, the other layers' sums on the host)
and eigendecomposition goes layer by layer; only a layer whose own factors exceed the budget cannot run, and
:meth:`Plan.check` says so before any pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .cache import cache_bytes
from .errors import UserError
from .layers import LayerSpec

_FIT_PASSES = {"identity": 0, "diagonal": 1, "kfac": 1, "ekfac": 2}


def gib(n: float) -> str:
    """Bytes in the largest unit that keeps the number readable."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class LayerMemory:
    """Bytes one tracked layer takes in each stage (device and host)."""

    name: str
    a_dim: int
    out: int
    covariance_device: int
    covariance_host: int
    eigen_device: int
    basis_host: int
    lambda_device: int
    factors_host: int

    @property
    def device_peak(self) -> int:
        """The most this layer alone needs on the device in a pass (its eigendecomposition runs on the host
        when it does not fit)."""
        return max(self.covariance_device, self.lambda_device)


def layer_memory(spec: LayerSpec, itemsize: int, gemm_itemsize: int, strategy: str) -> LayerMemory:
    a, o = spec.a_dim, spec.out_features
    curvature = strategy in ("kfac", "ekfac")
    factors = {"identity": 0, "diagonal": o * a * itemsize,
               "kfac": (a * a + o * o + o * a) * itemsize, "ekfac": (a * a + o * o + o * a) * itemsize}[strategy]
    return LayerMemory(
        spec.name, a, o,
        covariance_device=(a * a + o * o) * itemsize if curvature else 0,
        covariance_host=8 * (a * a + o * o) if curvature else 0,
        eigen_device=16 * max(a, o) ** 2 if curvature else 0,
        basis_host=8 * (a * a + o * o + a + o) if curvature else 0,
        lambda_device=((a * a + o * o) * gemm_itemsize if strategy == "ekfac" else 0) + 8 * o * a
        if strategy in ("ekfac", "diagonal") else 0,
        factors_host=factors)


@dataclass
class Plan:
    """Memory per stage and the tokens each pass processes, for one model, layer selection and data size."""

    strategy: str
    precision: str
    layers: list[LayerMemory]
    model_bytes: int
    batch_bytes: int
    batch_size: int
    max_length: int
    queries: int
    query_rank: int
    query_bytes: int
    gradient_cache_bytes: int | None = None
    docs: int | None = None
    tokens: int | None = None
    device_budget: int | None = None  # bytes the factors may take on the device (None: no limit)
    groups: list[list[str]] = field(default_factory=list)

    @property
    def covariance_device(self) -> int:
        return sum(m.covariance_device for m in self.layers)

    @property
    def lambda_device(self) -> int:
        return sum(m.lambda_device for m in self.layers)

    @property
    def fit_passes(self) -> int:
        return _FIT_PASSES[self.strategy]

    def too_large(self) -> list[LayerMemory]:
        """Layers whose own factors exceed the device budget: these cannot be fitted at all."""
        if self.device_budget is None:
            return []
        return [m for m in self.layers if m.device_peak > self.device_budget]

    def check(self) -> None:
        """Refuse, before any pass, when even one layer's factors cannot fit the device budget."""
        big = self.too_large()
        if big:
            worst = max(big, key=lambda m: m.device_peak)
            raise UserError(f"layer {worst.name} needs {gib(worst.device_peak)} on the device for its factors "
                            f"(A {worst.a_dim} x {worst.a_dim}, S {worst.out} x {worst.out}); the budget is "
                            f"{gib(self.device_budget or 0)} ({len(big)} of {len(self.layers)} layers do not fit)",
                            hint="track fewer or smaller --layers (e.g. a regex), use --strategy diagonal, or "
                                 "a larger device")

    def lines(self, per_layer: int = 8) -> list[str]:
        """The plan as text: per stage, device and host, total and the largest layers."""
        L = self.layers
        out = [f"{len(L)} tracked layers, strategy {self.strategy}, precision {self.precision}, "
               f"batch {self.batch_size} x {self.max_length} tokens"]
        if self.tokens is not None:
            fit = self.fit_passes * max(1, len(self.groups))
            out.append(f"data: {self.docs:,} documents, {self.tokens:,} tokens; {fit + 1} passes over them "
                       f"({fit} to fit, 1 to score): {(fit + 1) * self.tokens:,} tokens to process"
                       + (f" (or {self.tokens:,} in one pass when the gradient cache fits)"
                          if self.strategy in ("kfac", "ekfac") and len(self.groups) <= 1 else ""))
        out.append(f"model weights (device): {gib(self.model_bytes)}; one batch (device, estimate): "
                   f"{gib(self.batch_bytes)}")
        stages = [("covariance pass", sum(m.covariance_device for m in L), sum(m.covariance_host for m in L)),
                  ("eigendecomposition (one layer at a time)", max((m.eigen_device for m in L if self.device_budget
                                                                    is None or m.eigen_device <= self.device_budget),
                                                                   default=0),
                   sum(m.basis_host for m in L)),
                  ("eigenvalue correction", sum(m.lambda_device for m in L), sum(8 * m.out * m.a_dim for m in L)
                   if self.strategy in ("ekfac", "diagonal") else 0),
                  ("stored factors (on the device while queries are prepared)",
                   sum(m.factors_host for m in L) if len(self.groups) <= 1 else max(
                       (m.factors_host for m in L), default=0), sum(m.factors_host for m in L)),
                  (f"prepared queries ({self.queries} at rank {self.query_rank or 'full'})", self.query_bytes, 0)]
        for label, dev, host in stages:
            out.append(f"  {label}: device {gib(dev)}, host {gib(host)}")
        if self.gradient_cache_bytes is not None:
            out.append(f"  gradient cache ({self.docs:,} documents, one-pass fit and score): device "
                       f"{gib(self.gradient_cache_bytes)}")
        if self.device_budget is not None:
            out.append(f"device budget for factors: {gib(self.device_budget)}: "
                       + (f"{len(self.groups)} group(s) of layers, one covariance and one eigenvalue-correction "
                          f"pass each" if not self.too_large() else f"{len(self.too_large())} layer(s) do not fit"))
        biggest = sorted(L, key=lambda m: -m.device_peak)[:per_layer]
        out.append(f"largest layers of {len(L)} (device peak in a pass; covariance device / host; eigh device; "
                   f"stored factors):")
        for m in biggest:
            out.append(f"  {m.name} (a {m.a_dim}, out {m.out}): {gib(m.device_peak)}; {gib(m.covariance_device)} / "
                       f"{gib(m.covariance_host)}; {gib(m.eigen_device)}; {gib(m.factors_host)}")
        return out


def groups_within(sizes: Sequence[tuple[str, int]], budget: int | None) -> list[list[str]]:
    """Consecutive layers packed into groups whose total fits ``budget`` (one group when there is no budget); a
    layer larger than the budget gets a group of its own (and :meth:`Plan.check` refuses it)."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if budget is not None and groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return [g for g in groups if g]


def batch_bytes(*, batch_size: int, max_length: int, hidden: int, n_blocks: int, vocab: int, itemsize: int,
                tracked_inputs: int) -> int:
    """Estimated device bytes of one batch's forward and backward pass (see the module docstring)."""
    tokens = batch_size * max_length
    activations = 34 * tokens * hidden * n_blocks * itemsize // 2
    logits = 2 * tokens * vocab * max(itemsize, 4)
    return activations + logits + tokens * tracked_inputs * itemsize


def make_plan(specs: dict[str, LayerSpec], *, strategy: str = "ekfac", precision: str = "fp32",
              n_params: int, hidden: int, n_blocks: int, vocab: int, batch_size: int = 8, max_length: int = 512,
              queries: int = 32, query_rank: int = 32, fisher: str = "sampled", docs: int | None = None,
              tokens: int | None = None, device_budget: int | None = None) -> Plan:
    """The plan for these tracked layers and settings (no model needed: shapes and counts only)."""
    if strategy not in _FIT_PASSES:
        raise UserError(f"--strategy {strategy!r}: choose one of {', '.join(_FIT_PASSES)}")
    itemsize = 8 if precision == "fp64" else 4
    gemm = 2 if precision == "bf16" else itemsize
    layers = [layer_memory(s, itemsize, gemm, strategy) for s in specs.values()]
    q_bytes = sum(queries * itemsize * (query_rank * (s.out_features + s.a_dim) if query_rank and query_rank < min(
        s.out_features, s.a_dim) else s.out_features * s.a_dim) for s in specs.values())
    plan = Plan(strategy, precision, layers, model_bytes=n_params * (8 if precision == "fp64" else 4),
                batch_bytes=batch_bytes(batch_size=batch_size, max_length=max_length, hidden=hidden,
                                        n_blocks=n_blocks, vocab=vocab, itemsize=itemsize,
                                        tracked_inputs=sum(s.in_features for s in specs.values())),
                batch_size=batch_size, max_length=max_length, queries=queries, query_rank=query_rank,
                query_bytes=q_bytes, docs=docs, tokens=tokens, device_budget=device_budget)
    if docs is not None:
        plan.gradient_cache_bytes = cache_bytes(specs, docs, gemm, 2 if fisher == "sampled" else 1)
    stage = [(m.name, max(m.covariance_device, m.lambda_device)) for m in layers]
    plan.groups = groups_within(stage, device_budget)
    return plan


def model_shape(model) -> tuple[int, int, int, int]:
    """``(parameters, hidden size, decoder blocks, vocabulary)`` of a (possibly meta-device) transformers model."""
    cfg = getattr(model, "config", None)

    def get(*names: str) -> int:
        return next((int(getattr(cfg, n)) for n in names if getattr(cfg, n, None) is not None), 0)

    n_params = sum(p.numel() for p in model.parameters())
    hidden = get("hidden_size", "n_embd", "d_model")
    blocks = get("num_hidden_layers", "n_layer", "num_layers")
    vocab = get("vocab_size") or model.get_input_embeddings().num_embeddings
    return n_params, hidden, blocks, vocab


def meta_model(source, *, trust_remote_code: bool = False):
    """A transformers causal LM with the shapes of ``source`` (a model or LoRA adapter directory, or a config) on the
    meta device: no weights are read or allocated, so an 8B-parameter model costs nothing to plan. A LoRA adapter's
    layers are injected from its ``adapter_config.json``; fused experts are expanded (experts.py)."""
    import json
    from pathlib import Path

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    from .errors import ModelError
    from .experts import expand_experts
    from .lora import base_model_dir, is_adapter_dir

    adapter = None
    if isinstance(source, PretrainedConfig):
        cfg = source
    else:
        path = Path(source)
        if is_adapter_dir(path):
            adapter, path = path, base_model_dir(path)
        if not (path / "config.json").is_file():
            raise ModelError(f"--model {path}: no config.json", hint="give a local Hugging Face model directory")
        cfg = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
        if adapter is not None:
            from peft import LoraConfig, inject_adapter_in_model

            raw = json.loads((adapter / "adapter_config.json").read_text())
            known = set(LoraConfig.__dataclass_fields__)
            inject_adapter_in_model(LoraConfig(**{k: v for k, v in raw.items() if k in known}), model)
    expand_experts(model)
    return model


def plan_for(source, layers: str = "auto", *, trust_remote_code: bool = False, **settings) -> Plan:
    """The plan of a model or adapter directory (or a config) from its config alone (:func:`meta_model`);
    ``settings`` are :func:`make_plan`'s (strategy, precision, batch_size, ..., device_budget)."""
    from .layers import layer_spec, select_layers
    from .presets import resolve_layers

    model = meta_model(source, trust_remote_code=trust_remote_code)
    specs = {n: layer_spec(n, m) for n, m in select_layers(model, resolve_layers(model, layers)).items()}
    n_params, hidden, blocks, vocab = model_shape(model)
    return make_plan(specs, n_params=n_params, hidden=hidden, n_blocks=blocks, vocab=vocab, **settings)
