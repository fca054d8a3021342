"""The demo corpus keeps its promises and the tiny demo model learns the planted facts, offline."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from influence_audit.demo.model import (  # noqa: E402
    DEFAULT_CORPUS,
    MANIFEST,
    ensure_demo_model,
    evaluate_queries,
    file_sha256,
    read_jsonl,
)
from scripts import demo_corpus as make_corpus  # noqa: E402  (the generator is not part of the runtime package)

pytestmark = pytest.mark.slow  # trains the demo model

DATA = DEFAULT_CORPUS.parent
TEST_EPOCHS = 15  # the default recipe trains 30; 15 already learns every planted fact


def _mentions(text: str, phrase: str) -> bool:
    return re.search(rf"\b{re.escape(phrase)}\b", text) is not None


def test_committed_corpus_is_what_the_script_makes(tmp_path: Path) -> None:
    make_corpus.main(["--out", str(tmp_path)])
    for name in ("corpus.jsonl", "queries.jsonl", "planted.json"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_corpus_shape_and_planted_documents() -> None:
    docs = {row["id"]: row["text"] for row in read_jsonl(DATA / "corpus.jsonl")}
    queries = read_jsonl(DATA / "queries.jsonl")
    planted = json.loads((DATA / "planted.json").read_text())
    assert 300 <= len(docs) <= 500
    assert all(15 <= len(t.split()) <= 40 for t in docs.values())
    assert {q["id"] for q in queries} == set(planted)
    corpus = make_corpus.generate()
    assert 12 <= len(corpus.planted_facts) <= 16
    assert {q["fact"] for q in queries} == {
        make_corpus.RELATIONS[r].phrasings[0].format(S=s, A=a) for r, s, a in corpus.planted_facts}
    for q in queries:
        assert set(q) == {"id", "prompt", "completion", "fact"}
        assert all(isinstance(v, str) for v in q.values())
        assert q["completion"].startswith(" ") and q["completion"].endswith(".")
        assert 2 <= len(planted[q["id"]]) <= 3 and set(planted[q["id"]]) <= set(docs)
    # Only the planted documents mention a planted fact's answer together with its subject.
    for _rel, subject, answer in corpus.planted_facts:
        both = sorted(i for i, t in docs.items() if _mentions(t, subject) and _mentions(t, answer))
        qids = [q["id"] for q in queries if q["completion"] == f" {answer}."]
        assert qids and all(planted[qid] == both for qid in qids), subject
        assert any(_mentions(t, subject) and not _mentions(t, answer) for t in docs.values()), subject


@pytest.fixture(scope="module")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("demo-cache")
    return ensure_demo_model(cache, seed=0, epochs=TEST_EPOCHS, log=None)


def test_model_directory_and_manifest(demo_model_dir: Path) -> None:
    manifest = json.loads((demo_model_dir / MANIFEST).read_text())
    assert manifest["seed"] == 0 and manifest["epochs"] == TEST_EPOCHS
    assert manifest["corpus_sha256"] == file_sha256(DEFAULT_CORPUS)
    assert manifest["corpus_sha256"][:16] in demo_model_dir.name
    assert manifest["train_seconds"] > 0
    assert not [p for p in demo_model_dir.parent.iterdir() if p.name.startswith(".")], "temporary dir left"


def test_reuses_a_trained_model(demo_model_dir: Path) -> None:
    messages: list[str] = []
    again = ensure_demo_model(demo_model_dir.parent, seed=0, epochs=TEST_EPOCHS, log=messages.append)
    assert again == demo_model_dir
    assert messages and "reusing" in messages[0]


def test_reloads_offline_and_learned_the_planted_facts(demo_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, local_files_only=True)
    queries = read_jsonl(DATA / "queries.jsonl")

    # The engine's query tokenization equals tokenizing the whole fact; no query word is unknown.
    for q in queries:
        joined = tok(q["prompt"])["input_ids"] + tok(q["completion"], add_special_tokens=False)["input_ids"]
        assert joined == tok(q["prompt"] + q["completion"])["input_ids"], q["id"]
        assert tok.unk_token_id not in joined, q["id"]
        assert joined[0] == tok.bos_token_id
        assert tok(q["completion"], add_special_tokens=False)["input_ids"] == tok(
            q["completion"].lstrip(), add_special_tokens=False)["input_ids"]
    assert tok.decode(tok(queries[0]["fact"])["input_ids"], skip_special_tokens=True) == queries[0]["fact"]

    metrics = evaluate_queries(model, tok, queries)
    assert metrics["first_token_accuracy"] >= 0.9, metrics
    assert metrics["mean_completion_nll"] < 0.1 * metrics["uniform_nll"], metrics


def test_refuses_a_document_longer_than_the_model(tmp_path: Path) -> None:
    from influence_audit.demo.model import train_demo_model
    from influence_engine.errors import DataError

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "doc-0", "text": "word " * 200}) + "\n")
    with pytest.raises(DataError, match="201 tokens"):
        train_demo_model(corpus, tmp_path / "model", log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]
