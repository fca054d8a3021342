"""The one pass over data that every stage shares.

Batches run forward through the model with hooks on the tracked layers; the summed objective is
back-propagated to the input embeddings (parameters are frozen, so no weight gradient is ever formed).
Each tracked layer hands its input activations ``a`` (forward) and output gradients ``g`` (backward) to an
:class:`Accumulator`. Covariances, eigenvalue corrections, query gradients and scores are accumulators.

Because the objective is a sum of per-document losses and documents do not interact, ``g`` at a
document's tokens is the gradient of that document's own loss.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .data import Batch, Example, collate, example_seed
from .errors import UserError
from .layers import LayerSpec

Progress = Callable[[int, int], None]  # (documents done, tokens done)


@dataclass
class PassContext:
    """What accumulators see of the batch being processed (on the compute device).

    ``dtype`` is what sums are kept in (float32, or float64 in fp64 mode); ``gemm_dtype`` is the operand type
    of the accumulators' large products (bfloat16 in bf16 mode: products accumulate in float32 inside the
    GEMM, and sums across tokens and batches are kept in ``dtype``). ``padded`` is False when every position
    of the batch is a real token, so masking can be skipped."""

    batch: Batch
    mask: torch.Tensor  # (B, T) bool: real (non-padding) tokens
    dtype: torch.dtype  # dtype accumulators sum in (float32 or float64)
    gemm_dtype: torch.dtype | None = None
    padded: bool = True

    def __post_init__(self) -> None:
        if self.gemm_dtype is None:
            self.gemm_dtype = self.dtype

    def masked(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x`` in ``dtype`` (default ``self.dtype``) with padding positions exactly zero; no copy when
        nothing needs doing."""
        x = x.to(dtype or self.dtype)
        if not self.padded:
            return x
        return torch.where(self.mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))

    def zero_padding(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, ...) with padding positions set to zero, in place when padded."""
        if self.padded:
            x.masked_fill_(~self.mask.view(*self.mask.shape, *([1] * (x.dim() - 2))), 0)
        return x


def aligned(n: int, device: torch.device) -> int:
    """``n`` rounded up to a multiple of 8 on CUDA, where GEMMs with odd leading dimensions (a layer's
    ``in + 1`` with its bias column) fall back to slow kernels; ``n`` elsewhere."""
    return -(-n // 8) * 8 if device.type == "cuda" else n


class Accumulator(Protocol):
    def begin_batch(self, ctx: PassContext) -> None: ...

    def forward(self, spec: LayerSpec, a: torch.Tensor, ctx: PassContext) -> Any: ...

    def backward(self, spec: LayerSpec, state: Any, g: torch.Tensor, ctx: PassContext) -> None: ...

    def end_batch(self, ctx: PassContext) -> None: ...

    def abort_batch(self) -> None: ...


class BaseAccumulator:
    """Default no-op batch bookkeeping: the forward state is the activation itself."""

    def begin_batch(self, ctx: PassContext) -> None:
        pass

    def forward(self, spec: LayerSpec, a: torch.Tensor, ctx: PassContext) -> Any:
        return a

    def backward(self, spec: LayerSpec, state: Any, g: torch.Tensor, ctx: PassContext) -> None:
        pass

    def end_batch(self, ctx: PassContext) -> None:
        pass

    def abort_batch(self) -> None:
        pass


@dataclass(frozen=True)
class PassConfig:
    """How a pass runs. ``labels``: ``true`` (the data's tokens) or ``sampled`` (from the model: the true
    Fisher). ``precision``: ``fp32``, ``fp64`` or ``bf16`` (autocast; accumulations stay in fp32)."""

    batch_size: int = 8
    labels: str = "true"
    seed: int = 0
    precision: str = "fp32"
    padding_side: str = "right"
    pad_id: int = 0
    pad_to_multiple: int = 1  # e.g. 8 or 64 on GPUs; results do not depend on it


def masked(x: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` with padding positions set to exactly zero (NaN-safe, unlike multiplying)."""
    x = x.to(dtype)
    return torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=dtype, device=x.device))


def augment(a: torch.Tensor, spec: LayerSpec, mask: torch.Tensor) -> torch.Tensor:
    """Append the bias column (ones at real tokens) when the layer has a bias."""
    if not spec.bias:
        return a
    ones = mask.unsqueeze(-1).to(a.dtype)
    return torch.cat([a, ones], dim=-1)


def _sample_targets(logits: torch.Tensor, counts: Sequence[int], ids: Sequence[str], seed: int,
                    chunk: int = 2048) -> torch.Tensor:
    """Labels drawn from the model's predictive distribution by inverse CDF, one uniform per target, seeded
    per document (so samples never depend on batching). Rows are done in chunks to bound memory."""
    u = torch.cat([torch.rand(n, generator=torch.Generator().manual_seed(example_seed(seed, i)),
                              dtype=torch.float64) for n, i in zip(counts, ids, strict=True)]).to(logits.device)
    cdf_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for s in range(0, logits.shape[0], chunk):
        cdf = torch.softmax(logits[s:s + chunk].to(cdf_dtype), dim=-1).cumsum_(-1)
        v = (u[s:s + chunk].to(cdf_dtype) * cdf[:, -1]).unsqueeze(-1)
        out[s:s + chunk] = torch.searchsorted(cdf, v).squeeze(-1)
    return out.clamp_(max=logits.shape[-1] - 1)


def objective(logits: torch.Tensor, batch: Batch, labels: str, seed: int) -> torch.Tensor:
    """Summed next-token negative log-likelihood over each document's targets."""
    select = batch.target_mask[:, 1:]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if bool(select.all()):  # every position is a target: one copy (the cast) instead of a gather then a cast
        pred = logits[:, :-1].to(dtype).reshape(-1, logits.shape[-1])
    else:
        pred = logits[:, :-1][select].to(dtype)
    if labels == "true":
        targets = batch.input_ids[:, 1:][select]
    elif labels == "sampled":
        with torch.no_grad():
            targets = _sample_targets(pred, select.sum(1).tolist(), batch.ids, seed)
    else:
        raise ValueError(f"labels must be 'true' or 'sampled', not {labels!r}")
    return F.cross_entropy(pred, targets, reduction="sum")


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class Runner:
    """Runs passes of a model over examples with an accumulator on its tracked layers."""

    def __init__(self, model: nn.Module, tracked: dict[str, nn.Module], specs: dict[str, LayerSpec],
                 device: torch.device):
        self.model = model
        self.tracked = tracked
        self.specs = specs
        self.device = device
        self._lock = threading.Lock()  # hooks live on the shared model: one pass at a time per model
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()

    def compute_dtype(self, precision: str) -> torch.dtype:
        return torch.float64 if precision == "fp64" else torch.float32

    def gemm_dtype(self, precision: str) -> torch.dtype:
        return torch.bfloat16 if precision == "bf16" else self.compute_dtype(precision)

    def run(self, examples: Sequence[Example], acc: Accumulator, cfg: PassConfig,
            progress: Progress | None = None) -> None:
        """Process every example once. Out of memory halves the batch and retries; nothing is double-counted
        because accumulators only commit at ``end_batch``."""
        with self._lock:
            self._run(examples, acc, cfg, progress)

    def _run(self, examples: Sequence[Example], acc: Accumulator, cfg: PassConfig, progress: Progress | None) -> None:
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
        bs = max(1, cfg.batch_size)
        pos = docs = tokens = 0
        while pos < len(order):
            chunk = [examples[i] for i in order[pos:pos + bs]]
            width = max(len(e.input_ids) for e in chunk)
            width = -(-width // cfg.pad_to_multiple) * cfg.pad_to_multiple
            batch = collate(chunk, pad_id=cfg.pad_id, padding_side=cfg.padding_side, pad_to=width)
            try:
                self._run_batch(batch, acc, cfg)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not _is_oom(exc):
                    raise
                acc.abort_batch()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if bs == 1:
                    raise UserError(f"out of memory on {self.device} with one document of "
                                    f"{len(chunk[0].input_ids)} tokens",
                                    hint="lower --max-length, track fewer --layers, or use a larger device") from None
                bs = max(1, bs // 2)
                continue
            pos += len(chunk)
            docs += len(chunk)
            tokens += batch.n_tokens
            if progress is not None:
                progress(docs, tokens)

    def _run_batch(self, batch: Batch, acc: Accumulator, cfg: PassConfig) -> None:
        batch = batch.to(self.device)
        padded = not bool(batch.attention_mask.all())
        ctx = PassContext(batch, batch.attention_mask, self.compute_dtype(cfg.precision),
                          self.gemm_dtype(cfg.precision), padded)
        acc.begin_batch(ctx)
        handles = []
        device_type = self.device.type

        def hook_for(spec: LayerSpec):
            def forward_hook(module, inputs, output):
                with torch.autocast(device_type, enabled=False):  # accumulators choose their own dtypes
                    state = acc.forward(spec, inputs[0].detach(), ctx)

                def grad_hook(g):
                    acc.backward(spec, state, g, ctx)

                output.register_hook(grad_hook)

            return forward_hook

        try:
            for name, module in self.tracked.items():
                handles.append(module.register_forward_hook(hook_for(self.specs[name])))
            autocast = (torch.autocast(device_type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                        else contextlib.nullcontext())
            with autocast:
                embeds = self.model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)
                out = self.model(inputs_embeds=embeds, attention_mask=batch.attention_mask.long(),
                                 position_ids=batch.position_ids, use_cache=False)
                loss = objective(out.logits, batch, cfg.labels, cfg.seed)
            del out
            torch.autograd.grad(loss, embeds)
        except BaseException:
            acc.abort_batch()
            raise
        finally:
            for h in handles:
                h.remove()
        acc.end_batch(ctx)
