"""Chat rows: a conversation rendered with the tokenizer's chat template, with the assistant's tokens as targets.

Which tokens belong to an assistant turn is found exactly, without asking the template to mark them (few
templates do): for assistant message k, the conversation up to message k rendered with the generation prompt
(``before``) and the conversation through message k (``through``) are prefixes of the whole rendering; the
characters between their ends are the turn (its content and whatever the template closes the turn with, e.g. an
end-of-turn token). A fast tokenizer maps characters to tokens by its offsets (a token is a target when it starts
inside a turn); a slow one must tokenise each prefix to a prefix of the whole conversation's tokens. A template
that renders earlier turns differently once later ones follow is refused (the turns would not be exact).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import DataError, first_line

__all__ = ["chat_tokens"]


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool, at: str) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # the template's own refusal (roles out of order, ...)
        raise DataError(f"{at}: the chat template refuses these messages ({first_line(exc, 160)})",
                        hint="fix the conversation's roles or order for this model's template") from None
    if not isinstance(text, str):
        raise DataError(f"{at}: the chat template did not render text", hint="check the tokenizer's chat_template")
    return text


def chat_tokens(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *, last_only: bool = False,
                at: str = "input") -> tuple[list[int], list[bool]]:
    """Token ids of ``messages`` rendered with the chat template and, per token, whether it is a target (inside an
    assistant turn; with ``last_only``, inside the last assistant turn only: a chat query's completion).

    Raises :class:`DataError` naming ``at`` when the tokenizer has no chat template (the fix: give it one), when
    the template is not prefix-stable, or when the turn boundaries cannot be mapped to tokens exactly.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{at}: chat rows (messages) need a chat template, and this model's tokenizer has none",
                        hint="set tokenizer.chat_template and save_pretrained it into the model directory, or give "
                             "text / prompt+completion rows")
    msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    turns = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    if last_only:
        turns = turns[-1:]
    whole = _render(tokenizer, msgs, False, at)
    spans: list[tuple[str, str]] = []
    for k in turns:
        before = _render(tokenizer, msgs[:k], True, at) if k else ""
        through = _render(tokenizer, msgs[:k + 1], False, at)
        if not (whole.startswith(through) and through.startswith(before) and len(through) > len(before)):
            raise DataError(f"{at}: the chat template renders message {k} differently once later messages follow, "
                            f"so its tokens cannot be located exactly",
                            hint="use a template whose rendering of a conversation's start does not change")
        spans.append((before, through))
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        bounds = [(len(b), len(t)) for b, t in spans]
        mask = [any(a <= start < z for a, z in bounds) and end > start for start, end in enc["offset_mapping"]]
        return ids, mask
    ids = list(tokenizer(whole, add_special_tokens=False)["input_ids"])
    mask = [False] * len(ids)
    for before, through in spans:
        b = list(tokenizer(before, add_special_tokens=False)["input_ids"]) if before else []
        t = list(tokenizer(through, add_special_tokens=False)["input_ids"])
        if ids[:len(b)] != b or ids[:len(t)] != t:
            raise DataError(f"{at}: the tokens of the conversation's start differ from those of the whole "
                            f"conversation (the tokenizer merges across a turn boundary)",
                            hint="use the model's fast tokenizer (tokenizer.json), which maps characters to tokens")
        mask[len(b):len(t)] = [True] * (len(t) - len(b))
    return ids, mask
