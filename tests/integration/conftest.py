"""Fixtures of the integration tests: real servers (started by tests/servers.py) and tiny models."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from reliability_support import free_port  # noqa: F401 (re-exported to the integration tests)
from servers import (  # noqa: F401 (re-exported to the integration tests)
    BIN,
    QUIET_ENV,
    START_TIMEOUT_S,
    Proc,
    Servers,
    base_env,
    http_ok,
    start,
    wait_for,
)
from servers import servers as start_servers

REPO = Path(__file__).resolve().parents[2]
DEMO_DATA = REPO / "influence_audit" / "demo" / "data"


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """A Prefect server and an MLflow server for the whole session (tests/servers.py)."""
    yield from start_servers(tmp_path_factory.mktemp("servers"))


def build_tiny_model(out_dir: Path, seed: int) -> Path:
    """A random 2-layer GPT-2, word-level tokenizer over the demo texts: seconds to build, audits fast."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    rows = [json.loads(line) for f in ("corpus.jsonl", "queries.jsonl")
            for line in (DEMO_DATA / f).read_text().splitlines() if line.strip()]
    texts = [r.get("text") or r.get("prompt", "") + r.get("completion", "") for r in rows]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                   pad_token="<eos>")
    eos = fast.convert_tokens_to_ids("<eos>")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(fast), n_positions=512, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=eos, eos_token_id=eos))
    model.save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny models with different weights: 'before' and 'after' a retraining."""
    root = tmp_path_factory.mktemp("models")
    return build_tiny_model(root / "tiny-a", 0), build_tiny_model(root / "tiny-b", 1)
