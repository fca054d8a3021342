"""The one pass over data that every stage shares.

Batches run forward through the model with hooks on the tracked layers; the summed objective is
back-propagated to the input embeddings (parameters are frozen, so no weight gradient is ever formed).
Each tracked layer hands its input activations ``a`` (forward) and output gradients ``g`` (backward) to an
:class:`Accumulator`. Covariances, eigenvalue corrections, query gradients and scores are accumulators.

Because the objective is a sum of per-document losses and documents do not interact, ``g`` at a
document's tokens is the gradient of that document's own loss.

Per-document gradients kept from an earlier pass (:class:`~influence_engine.cache.GradientCache`) go through
the same accumulators without a model pass: :meth:`Runner.replay` hands each chunk of stored gradients
``G_d = Σ_t g_t a_t^T`` to :meth:`Accumulator.gradients`, between the same ``begin_batch`` / ``end_batch``
calls a live pass makes. Kept tokens (:class:`~influence_engine.cache.TokenCache`: each token's ``a`` and ``g``,
smaller for short documents on wide layers) go through :meth:`Runner.replay_tokens`: padded batches handed to
``forward`` and ``backward`` exactly as a pass hands them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import nn

from .data import Batch, Example, collate, example_seed
from .errors import ModelError, UserError
from .experts import GatheredRows, RoutedView, gathers_rows, routed_view
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
    objective: int = 0  # which label set's backward pass is running (passes with labels like ``sampled+true``)
    n_tokens: int | None = None  # tokens a layer saw, when not the whole batch's (experts: tokens routed to it)
    # p(the data's next token) at each position that predicts a target, (B, T), 0 elsewhere; set by passes whose
    # labels include ``true``, before any backward hook runs (per-document losses come from it: quality.py)
    target_probs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.gemm_dtype is None:
            self.gemm_dtype = self.dtype

    def routed(self, view: RoutedView) -> PassContext:
        """This context for an expert layer that sees only some tokens of the batch, laid out as ``view``."""
        return replace(self, mask=view.mask, padded=True, n_tokens=view.n_tokens)

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

    def gradients(self, spec: LayerSpec, G: torch.Tensor, ctx: PassContext) -> None: ...

    def end_batch(self, ctx: PassContext) -> None: ...

    def abort_batch(self) -> None: ...


class BaseAccumulator:
    """Default no-op batch bookkeeping: the forward state is the activation itself. ``positional``: whether the
    accumulator needs every token at its position in the batch (per-token scores); otherwise a layer that sees only
    some tokens (a MoE expert) hands over just those, each document's side by side."""

    positional = False

    def begin_batch(self, ctx: PassContext) -> None:
        pass

    def forward(self, spec: LayerSpec, a: torch.Tensor, ctx: PassContext) -> Any:
        return a

    def backward(self, spec: LayerSpec, state: Any, g: torch.Tensor, ctx: PassContext) -> None:
        pass

    def gradients(self, spec: LayerSpec, G: torch.Tensor, ctx: PassContext) -> None:
        """Whole per-document gradients ``G`` (B, out, a_dim) of this batch's documents (a replay)."""
        raise NotImplementedError(f"{type(self).__name__} needs a pass over the data, not stored gradients")

    def end_batch(self, ctx: PassContext) -> None:
        pass

    def abort_batch(self) -> None:
        pass


@dataclass(frozen=True)
class PassConfig:
    """How a pass runs. ``labels``: ``true`` (the data's tokens) or ``sampled`` (from the model: the true
    Fisher), or several joined by ``+`` (one forward pass, one backward pass per label set, in that order;
    accumulators see which in ``PassContext.objective``). ``precision``: ``fp32``, ``fp64`` or ``bf16``
    (autocast; accumulations stay in fp32)."""

    batch_size: int = 8
    labels: str = "true"
    seed: int = 0
    precision: str = "fp32"
    padding_side: str = "right"
    pad_id: int = 0
    pad_to_multiple: int = 1  # e.g. 8 or 64 on GPUs; results do not depend on it


def augment(a: torch.Tensor, spec: LayerSpec, mask: torch.Tensor) -> torch.Tensor:
    """Append the bias column (ones at real tokens) when the layer has a bias."""
    if not spec.bias:
        return a
    ones = mask.unsqueeze(-1).to(a.dtype)
    return torch.cat([a, ones], dim=-1)


def _uniforms(counts: Sequence[int], ids: Sequence[str], seed: int) -> torch.Tensor:
    """One uniform per target, seeded per document (so samples never depend on batching)."""
    return torch.cat([torch.rand(n, generator=torch.Generator().manual_seed(example_seed(seed, i)),
                                 dtype=torch.float64) for n, i in zip(counts, ids, strict=True)])


def _softmax_(x: torch.Tensor) -> torch.Tensor:
    """Row softmax of ``x`` in place (no temporaries the size of ``x`` besides the row statistics)."""
    x.sub_(x.amax(-1, keepdim=True)).exp_()
    return x.div_(x.sum(-1, keepdim=True))


def _sample_from(probs: torch.Tensor, u: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Inverse-CDF draws: for row ``i`` of ``probs``, the first index whose cumulative sum reaches
    ``u[i]`` times the row's total. A running sum over the whole vocabulary is a sequential scan (slow on CPUs), so
    it is done in two levels: cumulative sums of blocks of ``block`` entries find the block, then a running
    sum inside that block alone finds the entry. Deterministic per row (never depends on the other rows)."""
    n, V = probs.shape
    full = V // block * block
    sums = probs[:, :full].reshape(n, -1, block).sum(-1)
    if full < V:
        sums = torch.cat([sums, probs[:, full:].sum(-1, keepdim=True)], dim=1)
    csum = sums.cumsum(-1)
    v = (u.to(csum.dtype) * csum[:, -1]).unsqueeze(-1)
    b = torch.searchsorted(csum, v).clamp_(max=csum.shape[1] - 1)  # (n, 1): the block where the sum reaches v
    before = torch.where(b > 0, csum.gather(1, (b - 1).clamp_(min=0)), torch.zeros((), dtype=csum.dtype,
                                                                                     device=csum.device))
    idx = b * block + torch.arange(block, device=probs.device)
    inside = probs.gather(1, idx.clamp(max=V - 1)).masked_fill_(idx >= V, 0).cumsum_(-1).add_(before)
    j = torch.searchsorted(inside, v).clamp_(max=block - 1)
    return (b * block + j).squeeze(-1).clamp_(max=V - 1)


def _sample_targets(logits: torch.Tensor, counts: Sequence[int], ids: Sequence[str], seed: int,
                    chunk: int = 2048) -> torch.Tensor:
    """Labels drawn from the model's predictive distribution by inverse CDF, one uniform per target, seeded
    per document (so samples never depend on batching); ``logits`` are the target rows, in order. The same
    arithmetic as the passes' own sampling (:class:`LogitGradient`), so other tools can be fed the same labels."""
    u = _uniforms(counts, ids, seed).to(logits.device)
    cdf_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for s in range(0, logits.shape[0], chunk):
        p = _softmax_(logits[s:s + chunk].to(cdf_dtype, copy=True))
        out[s:s + chunk] = _sample_from(p, u[s:s + chunk])
    return out


class LogitGradient:
    """``d(Σ NLL)/d logits`` of a batch, written over the logits themselves, for one or more label sets.

    The gradient of the summed next-token cross-entropy is ``softmax(logits) - onehot(target)`` at target
    positions and zero elsewhere. Computing it directly (row chunks, softmax in place in at least float32)
    instead of back-propagating a loss means no float32 copy of the logits, no saved log-softmax and no
    separate gradient buffer: the vocabulary-sized tensor of the pass is the logits alone. Sampled labels
    reuse the same softmax. With several label sets (``labels`` like ``sampled+true``) only the entries at
    the targets change between objectives (:meth:`switch`), so one softmax serves every backward pass."""

    def __init__(self, logits: torch.Tensor, batch: Batch, labels: Sequence[str], seed: int, *,
                 in_place: bool = True, chunk: int = 2048):
        for lab in labels:
            if lab not in ("true", "sampled"):
                raise ValueError(f"labels must be 'true' or 'sampled', not {lab!r}")
        B, T, V = logits.shape
        device = logits.device
        detached = logits.detach()
        self.grad = detached if in_place and detached.is_contiguous() else detached.contiguous().clone()
        flat = self.grad.view(B * T, V)
        # per row of the flattened batch (no index lists: building them would wait for the device): whether it
        # predicts a target, and its target in each label set
        select = batch.target_mask[:, 1:]
        is_row = torch.zeros(B, T, dtype=torch.bool, device=device)
        is_row[:, :-1] = select
        is_row = is_row.flatten()
        fdtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        true_targets = batch.input_ids.roll(-1, dims=1).flatten()  # row t predicts token t + 1
        if "sampled" in labels:
            u = _uniforms(select.sum(1).tolist(), batch.ids, seed).to(device)  # one per target, in row order
            if u.numel() == 0:
                u = torch.zeros(1, dtype=torch.float64, device=device)
            u_index = (is_row.cumsum(0) - 1).clamp_(min=0)  # each row's place among the targets
        self.targets = [torch.zeros_like(true_targets) if lab == "sampled" else true_targets for lab in labels]
        self.probs = [torch.zeros(B * T, dtype=fdtype, device=device) for _ in labels]
        self.is_row = is_row
        for s in range(0, B * T, chunk):
            block = flat[s:s + chunk]
            x = _softmax_(block if block.dtype == fdtype else block.to(fdtype))
            here = is_row[s:s + chunk]
            x.masked_fill_(~here.unsqueeze(1), 0)  # rows without a target (padding: maybe NaN) get no gradient
            rows = torch.arange(len(here), device=device)
            for k, lab in enumerate(labels):
                if lab == "sampled":  # every row is drawn from; rows without a target are never used
                    self.targets[k][s:s + chunk] = _sample_from(x, u[u_index[s:s + chunk]])
                self.probs[k][s:s + chunk] = x[rows, self.targets[k][s:s + chunk]]
            x[rows, self.targets[0][s:s + chunk]] = self.probs[0][s:s + chunk] - here.to(fdtype)
            if x is not block:
                block.copy_(x)
        self._flat = flat
        self.objective = 0

    def switch(self, k: int) -> torch.Tensor:
        """The gradient for label set ``k`` (after the previous one's backward pass): only the entries at the
        two sets' targets change."""
        flat, j = self._flat, self.objective
        rows = torch.arange(flat.shape[0], device=flat.device)
        flat[rows, self.targets[j]] = self.probs[j].to(flat.dtype)
        flat[rows, self.targets[k]] = (self.probs[k] - self.is_row.to(self.probs[k].dtype)).to(flat.dtype)
        self.objective = k
        return self.grad


@dataclass
class ReplayBatch:
    """What accumulators see of a chunk of stored per-document gradients: ids and token count."""

    ids: list[str]
    n_tokens: int = 0

    def __len__(self) -> int:
        return len(self.ids)


def _place(rows: torch.Tensor, mask: torch.Tensor, padded: bool) -> torch.Tensor:
    """Packed token rows (tokens, width) as a padded batch (B, T, width) with zeros at padding."""
    if not padded:
        return rows.view(*mask.shape, -1)
    out = rows.new_zeros(*mask.shape, rows.shape[-1])
    out[mask] = rows
    return out


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
        # the logits' gradient overwrites the logits, unless the model's graph keeps them for its backward
        # (a final op that saves its output): autograd then refuses, and passes fall back to a copy
        self._in_place = True
        self.gathered = gathers_rows(tracked)  # older per-expert layouts: place gathered rows (experts.py)
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

    def replay(self, ids: Sequence[str], grads: dict[str, torch.Tensor], acc: Accumulator, precision: str,
               tokens: Sequence[int] | None = None, progress: Progress | None = None, chunk: int = 64) -> None:
        """Hand stored per-document gradients (``grads[layer]``: (N, out, a_dim), rows in ``ids`` order) to
        ``acc`` a chunk of documents at a time, as a pass would hand it activations and output gradients;
        ``tokens`` (per document) only feeds the progress counts."""
        done_tokens = 0
        for s in range(0, len(ids), chunk):
            rows = list(ids[s:s + chunk])
            n_tok = sum(tokens[s:s + chunk]) if tokens is not None else 0
            ctx = PassContext(ReplayBatch(rows, n_tok), None, self.compute_dtype(precision),  # type: ignore[arg-type]
                              self.gemm_dtype(precision), padded=False)
            acc.begin_batch(ctx)
            for name, spec in self.specs.items():
                acc.gradients(spec, grads[name][s:s + chunk].to(self.device), ctx)
            acc.end_batch(ctx)
            done_tokens += n_tok
            if progress is not None:
                progress(s + len(rows), done_tokens)

    def replay_tokens(self, ids: Sequence[str], lengths: Sequence[int], a: dict[str, torch.Tensor],
                      g: dict[str, torch.Tensor], acc: Accumulator, precision: str,
                      progress: Progress | None = None, chunk: int = 16) -> None:
        """Hand stored tokens (``a[layer]``: (tokens, in), ``g[layer]``: (tokens, out), documents in ``ids`` order,
        ``lengths`` tokens each) to ``acc`` as padded batches of ``chunk`` documents: ``forward`` then
        ``backward`` per layer, between ``begin_batch`` and ``end_batch``, as a pass hands them."""
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        dtype = self.compute_dtype(precision)
        for s in range(0, len(ids), chunk):
            rows = list(ids[s:s + chunk])
            lens = torch.tensor(lengths[s:s + chunk])
            T = int(lens.max())
            mask = (torch.arange(T)[None, :] < lens[:, None]).to(self.device)
            batch = Batch(rows, torch.zeros(mask.shape, dtype=torch.long, device=self.device), mask,
                          torch.arange(T, device=self.device).expand(mask.shape),
                          torch.zeros(mask.shape, dtype=torch.bool, device=self.device), [0] * len(rows))
            padded = not bool(mask.all())
            ctx = PassContext(batch, mask, dtype, self.gemm_dtype(precision), padded)
            lo, hi = starts[s], starts[s + len(rows)]
            acc.begin_batch(ctx)
            for name, spec in self.specs.items():
                state = acc.forward(spec, _place(a[name][lo:hi].to(self.device), mask, padded), ctx)
                acc.backward(spec, state, _place(g[name][lo:hi].to(self.device), mask, padded), ctx)
            acc.end_batch(ctx)
            if progress is not None:
                progress(s + len(rows), starts[s + len(rows)])

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
                if self._in_place and "inplace operation" in str(exc):
                    self._in_place = False  # the graph saved the logits: write their gradient to a copy
                    continue
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
        labels = cfg.labels.split("+")
        acc.begin_batch(ctx)
        handles = []
        device_type = self.device.type
        storages: set[int] = set()  # of tracked outputs: a tracked head's output is the logits themselves

        recorder = GatheredRows() if self.gathered else None
        fired: set[str] = set()
        shape = tuple(ctx.mask.shape)

        def hook_for(spec: LayerSpec):
            def forward_hook(module, inputs, output):
                storages.add(output.untyped_storage().data_ptr())
                fired.add(spec.name)
                a = inputs[0].detach()
                cell: dict[str, Any] = {"ctx": ctx, "view": None}

                def start(routed: torch.Tensor | None) -> None:
                    x = a
                    if routed is not None:  # an expert: its routed tokens' rows, each document's side by side
                        view = routed_view(routed, ctx.mask, packed=not getattr(acc, "positional", False))
                        cell["ctx"], cell["view"] = ctx.routed(view), view
                        x = view.place(a)
                    elif x.dim() == 2:  # tokens flattened by the model (a MoE block's shared expert): one row each
                        x = x.view(*shape, -1)
                    with torch.autocast(device_type, enabled=False):  # accumulators choose their own dtypes
                        cell["state"] = acc.forward(spec, x, cell["ctx"])

                routed = getattr(module, "routed", None)
                if a.dim() == 2 and routed is None and a.shape[0] != shape[0] * shape[1]:
                    if recorder is None:
                        raise ModelError(f"layer {spec.name} sees {a.shape[0]} rows, not the batch's {shape[0]} x "
                                         f"{shape[1]} tokens (an expert whose routing the engine cannot see)",
                                         hint="track other --layers")
                    recorder.expect(a.shape[0], spec.name, start)  # placed when its output is scattered back
                else:
                    start(routed)

                def grad_hook(g):
                    layer_ctx = cell["ctx"]
                    if cell["view"] is not None:
                        g = cell["view"].place(g)
                        layer_ctx.objective = ctx.objective
                    elif g.dim() == 2:
                        g = g.view(*shape, -1)
                    acc.backward(spec, cell["state"], g, layer_ctx)

                output.register_hook(grad_hook)

            return forward_hook

        try:
            for name, module in self.tracked.items():
                handles.append(module.register_forward_hook(hook_for(self.specs[name])))
            autocast = (torch.autocast(device_type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                        else contextlib.nullcontext())
            with autocast:
                embeds = self.model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)
                with recorder or contextlib.nullcontext():
                    logits = self.model(inputs_embeds=embeds, attention_mask=batch.attention_mask.long(),
                                        position_ids=batch.position_ids, use_cache=False).logits
                if recorder is not None:
                    recorder.check()
                # tensor hooks do not fire on a tensor changed in place: a tracked head's output keeps its values
                in_place = self._in_place and logits.untyped_storage().data_ptr() not in storages
                grad = LogitGradient(logits, batch, labels, cfg.seed, in_place=in_place)
            if "true" in labels:
                ctx.target_probs = grad.probs[labels.index("true")].view(batch.input_ids.shape)
            # layers the model skipped this batch (an older layout's expert no token was routed to) see zeros
            idle = [self.specs[n] for n in self.tracked if n not in fired]
            none = routed_view(torch.zeros(0, dtype=torch.long, device=self.device), ctx.mask,
                               packed=not getattr(acc, "positional", False))
            empty = ctx.routed(none)
            states = {s.name: acc.forward(s, embeds.new_zeros(*none.mask.shape, s.in_features), empty) for s in idle}
            root = logits.view_as(logits)  # a view as the root, so hooks on the logits (a tracked head) still fire
            del logits
            for k in range(len(labels)):
                ctx.objective = empty.objective = k
                torch.autograd.grad(root, embeds, grad.switch(k) if k else grad.grad,
                                    retain_graph=k + 1 < len(labels))
                for s in idle:
                    acc.backward(s, states[s.name], embeds.new_zeros(*none.mask.shape, s.out_features), empty)
        except BaseException:
            acc.abort_batch()
            raise
        finally:
            for h in handles:
                h.remove()
        acc.end_batch(ctx)
