"""Chat rows: rendered with the tokenizer's chat template, only the assistant turns are targets (found by
rendering prefixes, not by template markers), a chat query's last assistant message is its completion, and the
engine's passes honour the per-token mask (scores add up over turns)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from reliability_support import WORDS, build_model, write_jsonl

from influence_engine import DataError
from influence_engine.chat import chat_tokens
from influence_engine.data import Example, collate, encode

SPECIAL = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")
CHAT = [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": "a dog ran"},
        {"role": "user", "content": "big red"}, {"role": "assistant", "content": "on the mat"}]
# <|user|> the cat sat <|end|> <|assistant|> a dog ran <|end|> <|user|> big red <|end|> <|assistant|> on the mat <|end|>
TURN_1, TURN_2 = range(6, 10), range(15, 19)


def _tokenizer(template: str | None = TEMPLATE):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1} | {w: i + 2 for i, w in enumerate(dict.fromkeys([*WORDS, *SPECIAL]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    fast.chat_template = template
    return fast


class _Slow:
    """The same tokenizer seen as a slow one (no offsets): the prefix-token method must agree."""

    is_fast = False

    def __init__(self, fast):
        self._fast = fast
        self.chat_template = fast.chat_template

    def apply_chat_template(self, *args, **kwargs):
        return self._fast.apply_chat_template(*args, **kwargs)

    def __call__(self, text, **kwargs):
        return {"input_ids": self._fast(text, **kwargs)["input_ids"]}


def test_assistant_turns_are_the_targets_fast_and_slow():
    tok = _tokenizer()
    ids, mask = chat_tokens(tok, CHAT)
    assert tok.convert_ids_to_tokens(ids)[TURN_1.start:TURN_1.stop] == ["a", "dog", "ran", "<|end|>"]
    assert [i for i, m in enumerate(mask) if m] == [*TURN_1, *TURN_2]
    assert chat_tokens(_Slow(tok), CHAT) == (ids, mask)
    assert [i for i, m in enumerate(chat_tokens(tok, CHAT, last_only=True)[1]) if m] == list(TURN_2)


def test_examples_collate_the_mask_and_queries_become_prompt_and_completion():
    tok = _tokenizer()
    (doc,) = encode(tok, [{"id": "c", "messages": CHAT}], max_length=64, where="train")
    assert doc.target_start == TURN_1.start and doc.n_targets == 8
    batch = collate([doc, Example("t", (1, 2, 3), 1, 3)], padding_side="left")
    off = batch.offsets[0]
    assert batch.target_mask[0, off:].tolist() == list(doc.target_mask)
    (query,) = encode(tok, [{"id": "q", "messages": CHAT}], max_length=64, where="queries")
    assert query.target_mask is None and query.target_start == TURN_2.start and query.input_ids == doc.input_ids
    (short,) = encode(tok, [{"id": "c", "messages": CHAT}], max_length=12, where="train")
    assert [i for i, m in enumerate(short.target_mask) if m] == list(TURN_1) and short.truncated
    with pytest.raises(DataError, match="no assistant tokens within the first 5 tokens"):
        encode(tok, [{"id": "c", "messages": CHAT}], max_length=5, where="train")


def test_no_template_and_unstable_templates_are_one_line_errors():
    with pytest.raises(DataError, match=r"f\.jsonl:3 \(id 'c'\): chat rows .* need a chat template.*"
                                        r"tokenizer\.chat_template"):
        encode(_tokenizer(None), [{"id": "c", "messages": CHAT, "source": "f.jsonl:3"}], max_length=64)
    unstable = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}{% if loop.last %} <|end|>{% endif %} "
                "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
    with pytest.raises(DataError, match="renders message 1 differently once later messages follow"):
        chat_tokens(_tokenizer(unstable), CHAT)


def test_bad_chat_rows_are_located(tmp_path):
    from tasks.inputs.sources import read_rows

    good = {"id": "a", "messages": CHAT}
    cases = {
        "no_assistant": ({"id": "b", "messages": CHAT[:1]}, "no_assistant.jsonl:2: messages has no assistant turn"),
        "null_role": ({"id": "b", "messages": [{"role": None, "content": "x"}, CHAT[1]]},
                      "null_role.jsonl:2: messages[0].role is missing or null"),
        "empty": ({"id": "b", "messages": []}, "empty.jsonl:2: messages is missing, null or empty"),
        "not_list": ({"id": "b", "messages": "hello"}, "not_list.jsonl:1: messages has type String"),
    }
    for name, (bad, expected) in cases.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", [bad] if name == "not_list" else [good, bad])
        with pytest.raises(DataError) as info:
            read_rows(path, "train")
        assert expected in str(info.value), str(info.value)
    path = write_jsonl(tmp_path / "q.jsonl", [{"id": "q", "messages": CHAT[:3]}])
    with pytest.raises(DataError, match=r"q\.jsonl:1: the last message is not the assistant's"):
        read_rows(path, "queries")


@pytest.fixture(scope="module")
def chat_engine(tmp_path_factory):
    from influence_engine import InfluenceEngine

    model_dir = build_model(tmp_path_factory.mktemp("chat") / "model", vocab_size=64)
    _tokenizer().save_pretrained(model_dir)
    return InfluenceEngine.from_pretrained(model_dir, device="cpu", precision="fp64", max_length=64)


def test_engine_scores_add_up_over_assistant_turns(chat_engine):
    """Influence is linear in the training document's gradient: the score of a conversation is the sum of the
    scores of its turns alone, and the last turn alone equals the same tokens as prompt + completion."""
    eng = chat_engine
    (doc,) = eng.encode([{"id": "c", "messages": CHAT}], where="train")
    n = len(doc.input_ids)
    only = [Example(name, doc.input_ids, turn.start, n, tuple(i in turn for i in range(n)))
            for name, turn in (("t1", TURN_1), ("t2", TURN_2))]
    tail = Example("tail", doc.input_ids, TURN_2.start, n)
    qs = eng.encode([{"id": "q", "prompt": "the cat", "completion": " sat on the mat"}], where="queries")
    factors = eng.fit_factors([doc, *only], "identity")
    prepared = eng.prepare_queries(qs, factors, rank=0)
    scores = {r["train_id"]: r["score"] for r in eng.score([doc, *only, tail], prepared, top_k=0).top_rows()}
    assert scores["c"] == pytest.approx(scores["t1"] + scores["t2"], rel=1e-10, abs=1e-12)
    assert scores["t2"] == pytest.approx(scores["tail"], rel=1e-12, abs=1e-14)
    assert abs(scores["t1"]) > 1e-8 and abs(scores["t2"]) > 1e-8


def test_chat_rows_through_score(chat_engine, tmp_path):
    """Chat training rows and a chat query through `influence-audit score`; the chat query scores as its prompt
    and completion spelled out."""
    from reliability_support import run_in_process

    model = Path(chat_engine.model.name_or_path)
    train = write_jsonl(tmp_path / "chat.jsonl", [{"id": f"c{i}", "messages": [CHAT[0], {"role": "assistant",
                                                  "content": " ".join(WORDS[i:i + 3])}]} for i in range(8)])
    out = {}
    for name, query in (("chat", {"id": "q", "messages": CHAT}),
                        ("plain", {"id": "q", "prompt": "<|user|> the cat sat <|end|> <|assistant|> a dog ran <|end|> "
                                   "<|user|> big red <|end|> <|assistant|>", "completion": " on the mat <|end|>"})):
        qpath = write_jsonl(tmp_path / f"{name}-q.jsonl", [query])
        proc = run_in_process(["score", "--model", str(model), "--train", str(train), "--queries", str(qpath),
                               "--out", str(tmp_path / f"{name}.parquet"), "--device", "cpu", "--precision", "fp64",
                               "--max-length", "64", "--top-k", "0", "--query-rank", "0"])
        assert proc.returncode == 0, proc.stderr
        out[name] = pl.read_parquet(tmp_path / f"{name}.parquet")
    assert out["chat"].select("train_id", "rank").equals(out["plain"].select("train_id", "rank"))
    assert (out["chat"]["score"] - out["plain"]["score"]).abs().max() < 1e-12
