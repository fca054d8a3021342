"""Documents as token sequences, and batches of them.

A training document is ``text`` (every next token is a target), ``prompt`` + ``completion`` (only the
completion's tokens are targets) or chat ``messages`` (rendered with the tokenizer's chat template; only the
assistant turns' tokens are targets: a per-token mask, see :mod:`influence_engine.chat`). A query is ``prompt`` +
``completion``, or ``messages`` whose last assistant message is the completion: its measurement is
``log p(completion | prompt)``. Prompt and completion are tokenised separately and concatenated, so the
boundary between them is exact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .chat import chat_tokens
from .errors import DataError


@dataclass(frozen=True)
class Example:
    """One tokenised document. Targets are ``input_ids[target_start:]`` (each predicted from its prefix), or, when
    ``target_mask`` is given (chat rows: assistant turns only), the positions where it is True (never position 0;
    ``target_start`` is then the first of them)."""

    id: str
    input_ids: tuple[int, ...]
    target_start: int
    n_tokens_original: int
    target_mask: tuple[bool, ...] | None = None

    @property
    def truncated(self) -> bool:
        return self.n_tokens_original > len(self.input_ids)

    @property
    def n_targets(self) -> int:
        if self.target_mask is not None:
            return sum(self.target_mask)
        return len(self.input_ids) - self.target_start


@dataclass
class Batch:
    """Padded examples. ``target_mask[b, t]`` marks positions whose token is a target."""

    ids: list[str]
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) bool
    position_ids: torch.Tensor  # (B, T) long, independent of the padding side
    target_mask: torch.Tensor  # (B, T) bool
    offsets: list[int]  # index of each example's first token in its padded row

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.ids, self.input_ids.to(device), self.attention_mask.to(device),
                     self.position_ids.to(device), self.target_mask.to(device), self.offsets)


def encode(tokenizer, rows: Iterable[Mapping[str, str]], *, max_length: int,
           on_long: str = "truncate", where: str = "input") -> list[Example]:
    """Tokenise rows with ``id`` and ``text``, or ``id``, ``prompt`` and ``completion``, or ``id`` and chat
    ``messages`` (every assistant turn is a target; with ``where="queries"``, the last one only).

    Texts, prompts and completions are tokenised in batches (the same ids as one at a time). Sequences longer
    than ``max_length`` are truncated (``on_long="truncate"``: a text or a training conversation keeps its start;
    a prompt loses its start before a completion loses its end) or refused (``on_long="error"``).
    """
    if on_long not in ("truncate", "error"):
        raise ValueError(f"on_long must be 'truncate' or 'error', not {on_long!r}")
    if max_length < 2:
        raise DataError(f"--max-length {max_length}: needs at least 2 tokens (one context, one target)")
    rows = list(rows)
    texts = _batched(tokenizer, [r.get("text") for r in rows], True)
    prompts = _batched(tokenizer, [None if r.get("text") is not None else r.get("prompt") for r in rows], True)
    completions = _batched(tokenizer, [None if r.get("text") is not None else r.get("completion") for r in rows],
                           False)
    out: list[Example] = []
    for i, row in enumerate(rows):
        doc_id = row["id"]
        at = row.get("source") or f"{where} row {i + 1}"  # "file:line" when the reader recorded it
        mask: list[bool] | None = None
        if texts[i] is not None:
            ids = texts[i]
            start = 1
        elif row.get("prompt") is None and row.get("messages") is not None:
            ids, mask = chat_tokens(tokenizer, row["messages"], last_only=where == "queries",
                                    at=f"{at} (id {doc_id!r})")
            mask[0] = False  # the first token has no prefix to be predicted from
            if not any(mask):
                raise DataError(f"{at} (id {doc_id!r}): the assistant turns have no tokens",
                                hint="give non-empty assistant replies")
            start = mask.index(True)
            if where == "queries":  # the last turn runs to the end: a prompt and a completion
                mask = None
        else:
            prompt_ids, completion_ids = prompts[i], completions[i]
            if not completion_ids:
                raise DataError(f"{at} (id {doc_id!r}): completion has no tokens",
                                hint="give a non-empty completion")
            ids = prompt_ids + completion_ids
            start = len(prompt_ids)
        n_original = len(ids)
        if n_original < 2:
            raise DataError(f"{at} (id {doc_id!r}): {n_original} token(s); at least 2 are "
                            f"needed to score a next-token prediction", hint="drop or lengthen the row")
        if n_original > max_length:
            if on_long == "error":
                raise DataError(f"{at} (id {doc_id!r}): {n_original} tokens exceed "
                                f"--max-length {max_length}", hint="raise --max-length or allow truncation")
            if mask is not None:  # a conversation keeps its start
                ids, mask = ids[:max_length], mask[:max_length]
                if not any(mask):
                    raise DataError(f"{at} (id {doc_id!r}): no assistant tokens within the first {max_length} "
                                    f"tokens", hint="raise --max-length or shorten the conversation's start")
                start = mask.index(True)
            elif start > 1:
                cut = min(n_original - max_length, start - 1)  # drop the prompt's start first
                ids, start = ids[cut:], start - cut
            ids = ids[:max_length]
        out.append(Example(str(doc_id), tuple(map(int, ids)), max(1, start), n_original,
                           None if mask is None else tuple(mask)))
    return out


def _batched(tokenizer, texts: list[str | None], special: bool) -> list[list[int] | None]:
    """Token ids of each text (None stays None), in one tokenizer call: the Rust backend's directly when it
    neither truncates nor pads (what the transformers wrapper would call, without its per-text Python objects)."""
    todo = [i for i, t in enumerate(texts) if t is not None]
    out: list[list[int] | None] = [None] * len(texts)
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if todo and backend is not None and backend.truncation is None and backend.padding is None:
        batch = [texts[i] for i in todo]
        encode_fast = getattr(backend, "encode_batch_fast", backend.encode_batch)
        for i, e in zip(todo, encode_fast(batch, add_special_tokens=special), strict=True):
            out[i] = e.ids
    elif todo:
        enc = tokenizer([texts[i] for i in todo], add_special_tokens=special)["input_ids"]
        for i, ids in zip(todo, enc, strict=True):
            out[i] = list(ids)
    return out


def collate(examples: Sequence[Example], *, pad_id: int = 0, padding_side: str = "right",
            pad_to: int | None = None) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    width = max(width, pad_to or 0)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.bool)
    target = torch.zeros((n, width), dtype=torch.bool)
    positions = torch.zeros((n, width), dtype=torch.long)
    offsets = []
    for b, e in enumerate(examples):
        length = len(e.input_ids)
        off = width - length if padding_side == "left" else 0
        offsets.append(off)
        input_ids[b, off:off + length] = torch.tensor(e.input_ids, dtype=torch.long)
        attention[b, off:off + length] = True
        if e.target_mask is not None:
            target[b, off:off + length] = torch.tensor(e.target_mask, dtype=torch.bool)
        else:
            target[b, off + e.target_start:off + length] = True
        positions[b, off:off + length] = torch.arange(length)
    return Batch([e.id for e in examples], input_ids, attention, positions, target, offsets)


def example_seed(seed: int, doc_id: str) -> int:
    """A per-document seed: sampled labels depend on the document, never on its batch or shard."""
    digest = hashlib.sha256(f"{seed}\x1f{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def examples_fingerprint(examples: Sequence[Example]) -> str:
    """sha256 over the sorted ``(id, tokens, target start)`` of ``examples``: independent of their order, changed
    by any token, target or id. (The pipeline fingerprints data by text instead, before tokenising.)"""
    h = hashlib.sha256()
    for e in sorted(examples, key=lambda e: e.id):
        targets = e.target_start if e.target_mask is None else "".join("1" if m else "0" for m in e.target_mask)
        h.update(f"{len(e.id)}:{e.id}:{targets}:{','.join(map(str, e.input_ids))}\n".encode())
    return h.hexdigest()
