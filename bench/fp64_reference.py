"""Behaviour unchanged? Scores at fp64 through the CLI, saved to compare one commit with another.

A fixed matrix (tiny GPT-2 and Llama built from configs with a word-level tokenizer, MLP and all layers, four
strategies, exact and rank-2 queries, the self-influence report) is scored with ``influence-audit score --top-k 0``
(every pair) and ``influence-audit quality`` at ``--precision fp64``; ``compare`` prints the worst relative
difference between two runs. Restructuring must leave every array equal to ~1e-12.

    python bench/fp64_reference.py run --out /tmp/ref-new.npz            # with the checkout to test
    PYTHONPATH=/path/to/old/checkout python bench/fp64_reference.py run --out /tmp/ref-old.npz
    python bench/fp64_reference.py compare /tmp/ref-old.npz /tmp/ref-new.npz

Only flags that every commit since the restructure understands are used, so the same script runs on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

WORDS = ("the cat sat on a mat while dogs ran far into old green fields and birds sang over quiet blue water "
         "near tall stone walls").split()
MATRIX = [(family, layers, strategy, rank) for family in ("gpt2", "llama") for layers in ("mlp", "all")
          for strategy in ("identity", "diagonal", "kfac", "ekfac") for rank in (0,)]
MATRIX += [(family, "mlp", "ekfac", 2) for family in ("gpt2", "llama")]


def build(family: str, out: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1} | {w: i + 2 for i, w in enumerate(dict.fromkeys(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(fast), n_positions=64, n_embd=16, n_layer=2, n_head=2,
                                           bos_token_id=1, eos_token_id=1, pad_token_id=1))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(fast), hidden_size=16, intermediate_size=24,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=64, bos_token_id=1, eos_token_id=1,
                                             pad_token_id=1))
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    fast.save_pretrained(out)
    return out


def write_data(root: Path) -> tuple[Path, Path]:
    r = random.Random(0)
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps({"id": f"d{i:03d}", "text": " ".join(r.choice(WORDS) for _ in range(
        r.randint(4, 12)))}) + "\n" for i in range(40)))
    queries = root / "queries.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q{i}", "prompt": " ".join(r.choice(WORDS) for _ in range(3)),
                                           "completion": " " + " ".join(r.choice(WORDS) for _ in range(2))}) + "\n"
                               for i in range(4)))
    return train, queries


def cli(*args: str) -> None:
    exe = Path(sys.executable).with_name("influence-audit")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"influence-audit {' '.join(args)} failed:\n{proc.stderr[-2000:]}")


def run(out: Path) -> None:
    import polars as pl

    arrays: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train, queries = write_data(root)
        models = {f: build(f, root / f) for f in ("gpt2", "llama")}
        for family, layers, strategy, rank in MATRIX:
            name = f"score-{family}-{layers}-{strategy}-r{rank}"
            path = root / f"{name}.parquet"
            cli("score", "--model", str(models[family]), "--train", str(train), "--queries", str(queries), "--out",
                str(path), "--precision", "fp64", "--layers", layers, "--strategy", strategy, "--query-rank",
                str(rank), "--top-k", "0", "--max-length", "32", "--device", "cpu")
            df = pl.read_parquet(path).sort("query_id", "train_id")
            arrays[name] = df["score"].to_numpy()
            print(name, f"{len(df)} pairs", flush=True)
        for family in models:
            path = root / f"quality-{family}.parquet"
            cli("quality", "--model", str(models[family]), "--train", str(train), "--out", str(path),
                "--precision", "fp64", "--max-length", "32", "--device", "cpu")
            df = pl.read_parquet(path).sort("id")
            for col in ("self_influence", "loss"):
                if col in df.columns:
                    arrays[f"quality-{family}-{col}"] = df[col].to_numpy()
            print(f"quality-{family}", flush=True)
    np.savez(out, **arrays)
    print(f"{len(arrays)} arrays -> {out}")


def compare(a: Path, b: Path) -> float:
    x, y = np.load(a), np.load(b)
    worst, where = 0.0, ""
    for name in sorted(set(x.files) | set(y.files)):
        if name not in x.files or name not in y.files:
            print(f"{name}: only in {'the first' if name in x.files else 'the second'}")
            continue
        u, v = x[name], y[name]
        rel = float(np.max(np.abs(u - v)) / max(np.max(np.abs(u)), 1e-300)) if u.shape == v.shape else float("inf")
        if rel > worst:
            worst, where = rel, name
    print(f"{len(set(x.files) & set(y.files))} arrays compared; worst relative difference {worst:.3g} ({where})")
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = ap.parse_args()
    if args.cmd == "run":
        run(args.out)
    else:
        compare(args.a, args.b)


if __name__ == "__main__":
    main()
