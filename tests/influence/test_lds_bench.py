"""The LDS benchmarks' own pieces: the prose benchmark measures what the engine scores (prompt and completion
tokenised apart equal the text tokenised whole), the training loop's checkpoints (the last is the trained model;
segment learning rates add up to the schedule's), and the shipped ground truth reads as kronfluence's format."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import lds_prose  # noqa: E402
from lds_train import TrainRecipe, train  # noqa: E402


def test_prose_queries_tokenise_as_the_engine_splits_them():
    docs, queries = lds_prose.load_corpus()
    assert len(docs) == lds_prose.N_DOCS and len(queries) == lds_prose.N_QUERIES
    assert not {q["id"][2:] for q in queries} & {d["id"] for d in docs}  # queries are held out
    tok = lds_prose.build_tokenizer([d["text"] for d in docs])
    assert len(tok) == lds_prose.VOCAB
    for q in queries:
        split = tok(q["prompt"])["input_ids"] + tok(q["completion"], add_special_tokens=False)["input_ids"]
        assert split == tok(q["prompt"] + q["completion"])["input_ids"]
        assert split[0] == tok.bos_token_id and len(split) <= lds_prose.ARCH["max_position_embeddings"]
    assert tok.decode(tok(docs[0]["text"], add_special_tokens=False)["input_ids"]) == docs[0]["text"]


def test_checkpoints_end_at_the_trained_model_and_split_the_learning_rates():
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 17, (int(n),), generator=g).tolist() for n in torch.randint(3, 9, (10,), generator=g)]
    cfg = GPT2Config(vocab_size=17, n_positions=16, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    recipe = TrainRecipe(epochs=3, batch_size=4, lr=1e-2, warmup_steps=2)
    saved = []
    model, _ = train(lambda: GPT2LMHeadModel(cfg), seqs, 0, recipe=recipe, checkpoints=(0.5, 1.0),
                     on_checkpoint=lambda m, info: saved.append(({k: v.clone() for k, v in m.state_dict().items()},
                                                                 info)))
    total = math.ceil(len(seqs) / recipe.batch_size) * recipe.epochs
    assert [info["step"] for _, info in saved] == [round(total / 2), total]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(saved[-1][0][k], v, rtol=0, atol=0)
    # the lr of every step, summed per segment: warmup (step+1)/W, then cosine to 5%
    lrs = [recipe.lr * ((s + 1) / recipe.warmup_steps if s < recipe.warmup_steps else
                        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (s - recipe.warmup_steps)
                                                          / (total - recipe.warmup_steps)))) for s in range(total)]
    half = round(total / 2)
    assert saved[0][1]["segment_lr_sum"] == pytest.approx(sum(lrs[:half]), rel=1e-12)
    assert saved[1][1]["segment_lr_sum"] == pytest.approx(sum(lrs[half:]), rel=1e-12)


def test_shipped_prose_ground_truth_reads_as_kronfluence_files():
    truth = ROOT / "bench" / "data" / "lds_prose" / "truth"
    if not (truth / "masks.pt").exists():
        pytest.skip("ground truth not built yet (bench/lds_prose.py truth)")
    from tasks.influence.evaluate import read_matrix

    M = read_matrix(truth / "masks.pt", "--masks")
    L = read_matrix(truth / "losses.pt", "--outputs")
    assert M.shape == (L.shape[0], lds_prose.N_DOCS) and L.shape[1] == lds_prose.N_QUERIES and M.shape[0] >= 40
    assert set(np.unique(M)) == {0.0, 1.0} and (M.sum(1) == lds_prose.N_DOCS // 2).all()
    np.testing.assert_allclose(L, -np.load(truth / "outputs.npy"))
    assert (L > 0).all()  # completion NLLs
