"""One training loop for the LDS benchmarks: the demo recipe (AdamW, linear warmup then cosine decay to 5%,
gradient clipping at 1, no dropout, no weight decay), with checkpoints saved along the way.

It is ``influence_audit.demo.model.fit_demo_gpt2``'s loop step for step (same initialisation seed handling, same
batch order generator, same schedule), so that the demo model's checkpoints can be saved without changing the
demo: ``bench/lds_demo.py checkpoints`` checks that the last checkpoint's weights equal the demo model's
(same fingerprint). It also trains the prose benchmark's Llama (``bench/lds_prose.py``). Besides the weights,
each checkpoint records the learning rates of the steps since the previous one (SOURCE-style segment weights).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class TrainRecipe:
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-2
    warmup_steps: int = 20
    betas: tuple[float, float] = (0.9, 0.98)
    clip: float = 1.0


def batches(seqs: list[list[int]], batch_size: int, gen: torch.Generator,
            pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The demo's batching: a seeded permutation per epoch, right padding, padded labels -100."""
    order = torch.randperm(len(seqs), generator=gen).tolist()
    for start in range(0, len(order), batch_size):
        chunk = [seqs[i] for i in order[start: start + batch_size]]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, s in enumerate(chunk):
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        yield ids, mask, ids.masked_fill(mask == 0, -100)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train(make_model: Callable[[], nn.Module], seqs: Sequence[Sequence[int]], pad_id: int, *,
          recipe: TrainRecipe = TrainRecipe(), seed: int = 0, checkpoints: Sequence[float] = (),
          on_checkpoint: Callable[[nn.Module, dict[str, Any]], None] | None = None,
          log: Callable[[str], None] | None = None, num_threads: int = 1) -> tuple[nn.Module, float]:
    """Train ``make_model()`` (built under ``torch.manual_seed(seed)``) on ``seqs``; returns the model in eval
    mode and the last epoch's mean token loss. ``checkpoints``: fractions of training (0 < f <= 1) after whose
    step ``on_checkpoint(model, info)`` is called (model in eval mode, then back to training); ``info`` has the
    step, the fraction, the epoch and ``segment_lr_sum``, the sum of learning rates of the steps since the
    previous checkpoint (or the start)."""
    emit = log or (lambda _m: None)
    seqs = [list(s) for s in seqs]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=recipe.betas, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(seqs) / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs

    def lr_factor(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        frac = (step - recipe.warmup_steps) / max(total - recipe.warmup_steps, 1)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(seed)
    at = {max(1, min(total, round(f * total))): f for f in checkpoints}
    step, lr_sum, epoch_loss = 0, 0.0, float("nan")
    with torch_threads(max(1, num_threads)):
        model.train()
        for epoch in range(recipe.epochs):
            tot_loss, tot_tok = 0.0, 0
            for ids, mask, labels in batches(seqs, recipe.batch_size, gen, pad_id):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
                lr_sum += opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                step += 1
                n_tok = int((labels[:, 1:] != -100).sum())
                tot_loss += loss.item() * n_tok
                tot_tok += n_tok
                if step in at and on_checkpoint is not None:
                    model.eval()
                    on_checkpoint(model, {"step": step, "total_steps": total, "fraction": at[step],
                                          "epoch": epoch + 1, "segment_lr_sum": lr_sum})
                    model.train()
                    lr_sum = 0.0
            epoch_loss = tot_loss / max(tot_tok, 1)
            if (epoch + 1) % 5 == 0 or epoch + 1 == recipe.epochs:
                emit(f"  epoch {epoch + 1}/{recipe.epochs}: loss {epoch_loss:.4f}")
    model.eval()
    return model, epoch_loss


def checkpoint_saver(root: Path, tokenizer, extra: dict[str, Any] | None = None
                     ) -> Callable[[nn.Module, dict[str, Any]], None]:
    """An ``on_checkpoint`` that saves each checkpoint as a Hugging Face directory ``root/step-NNNNN`` (with the
    tokenizer and a ``checkpoint.json`` holding ``info``)."""
    def save(model: nn.Module, info: dict[str, Any]) -> None:
        d = Path(root) / f"step-{info['step']:05d}"
        d.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        (d / "checkpoint.json").write_text(json.dumps(info | (extra or {}), indent=1) + "\n")
    return save


def recipe_json(recipe: TrainRecipe) -> dict[str, Any]:
    return asdict(recipe)
