"""Documents as token sequences, and batches of them.

A training document is ``text`` (every next token is a target) or ``prompt`` + ``completion`` (only the
completion's tokens are targets). A query is always ``prompt`` + ``completion``: its measurement is
``log p(completion | prompt)``. Prompt and completion are tokenised separately and concatenated, so the
boundary between them is exact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import DataError


@dataclass(frozen=True)
class Example:
    """One tokenised document. Targets are ``input_ids[target_start:]`` (each predicted from its prefix)."""

    id: str
    input_ids: tuple[int, ...]
    target_start: int
    n_tokens_original: int

    @property
    def truncated(self) -> bool:
        return self.n_tokens_original > len(self.input_ids)

    @property
    def n_targets(self) -> int:
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
    """Tokenise rows with ``id`` and ``text``, or ``id``, ``prompt`` and ``completion``.

    Sequences longer than ``max_length`` are truncated (``on_long="truncate"``: a text keeps its start; a
    prompt loses its start before a completion loses its end) or refused (``on_long="error"``).
    """
    if on_long not in ("truncate", "error"):
        raise ValueError(f"on_long must be 'truncate' or 'error', not {on_long!r}")
    if max_length < 2:
        raise DataError(f"--max-length {max_length}: needs at least 2 tokens (one context, one target)")
    out: list[Example] = []
    for i, row in enumerate(rows):
        doc_id = row["id"]
        at = row.get("source") or f"{where} row {i + 1}"  # "file:line" when the reader recorded it
        if "text" in row and row.get("text") is not None:
            ids = list(tokenizer(row["text"])["input_ids"])
            start = 1
        else:
            prompt_ids = list(tokenizer(row["prompt"])["input_ids"])
            completion_ids = list(tokenizer(row["completion"], add_special_tokens=False)["input_ids"])
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
            if start > 1:
                cut = min(n_original - max_length, start - 1)  # drop the prompt's start first
                ids, start = ids[cut:], start - cut
            ids = ids[:max_length]
        out.append(Example(str(doc_id), tuple(int(t) for t in ids), max(1, start), n_original))
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
        h.update(f"{len(e.id)}:{e.id}:{e.target_start}:{','.join(map(str, e.input_ids))}\n".encode())
    return h.hexdigest()
