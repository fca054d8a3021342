"""A second LDS benchmark: natural prose (no planted facts), a tiny Llama with a byte-level BPE tokenizer.

    python bench/lds_prose.py corpus --source DIR      # only to rebuild the shipped corpus (see below)
    nice -n 10 python bench/lds_prose.py model         # tokenizer + base model with 4 checkpoints (~1 min)
    nice -n 10 python bench/lds_prose.py truth         # 48 retrainings on random halves (resumes)

**Corpus** (shipped: ``bench/data/lds_prose/corpus.jsonl``, ``queries.jsonl``): passages of two consecutive
verses of the King James Version (public domain), books of Genesis and Luke (narrative prose). Made from the
text of Debian's ``bible-kjv-text`` package, printed by its ``bible`` program (package ``bible-kjv``)::

    bible -f -p DATA_DIR "Genesis 1:1-50:26" > DIR/Genesis.txt
    bible -f -p DATA_DIR "Luke 1:1-24:53" > DIR/Luke.txt

Passages (verses 1-2, 3-4, ... of each chapter; 60 to 360 characters) are shuffled with seed 0: the first
``N_QUERIES`` are queries (prompt = the first verse, completion = " " + the second), the next ``N_DOCS``
are the training documents. The queries are held out: no query passage is in the training data; their
neighbours in the same chapter often are.

**Model**: a Llama (2 blocks, hidden 96, SwiGLU MLP 256 wide, 4 heads with 2 key-value heads, rotary
positions, RMSNorm, untied head) over a byte-level BPE tokenizer of 768 tokens trained offline on the
training documents (``tokenizers``), trained with ``bench/lds_train.py``'s loop (AdamW, warmup then cosine
decay). The base (audited) model is trained on every document; checkpoints at 1/4, 1/2, 3/4 and the end
are kept (``WORK/checkpoints/step-NNNNN``; the last equals the base model).

**Ground truth**: ``--subsets`` (48) random halves (seed 0), each retrained from the same initialisation
(seed 0) with the same recipe; each query's ``log p(completion | prompt)`` measured on every retrained
model. Written under ``--work`` in kronfluence's layout (``masks.pt`` S x N bool, ``losses.pt`` S x Q
completion NLL) plus ``outputs.npy``, ``doc_ids.json``, ``queries.jsonl``; the small files are copied to
``bench/data/lds_prose/truth/`` (shipped), so ``influence-audit evaluate --kronfluence`` reads them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from lds_train import TrainRecipe, checkpoint_saver, recipe_json, train  # noqa: E402

DATA = ROOT / "bench" / "data" / "lds_prose"
WORK = ROOT / ".lds-prose"
N_QUERIES, N_DOCS = 64, 512
VOCAB = 768
EOT = "<|endoftext|>"
ARCH = {"hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256}
RECIPE = TrainRecipe(epochs=8, batch_size=16, lr=8e-3, warmup_steps=16)
CHECKPOINTS = (0.25, 0.5, 0.75, 1.0)


def _log(msg: str) -> None:
    print(f"[{_dt.datetime.now(_dt.timezone.utc):%H:%M:%S}] {msg}", flush=True)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ------------------------------------------------------------------------------------------------ corpus
def build_corpus(args: argparse.Namespace) -> None:
    src = Path(args.source)
    passages = []
    for book in ("Genesis", "Luke"):
        verses: dict[int, list[tuple[int, str]]] = {}
        for line in (src / f"{book}.txt").read_text().splitlines():
            m = re.match(r"^\S+?(\d+):(\d+) (.*)$", line.strip())
            if m:
                verses.setdefault(int(m[1]), []).append((int(m[2]), " ".join(m[3].split())))
        for ch, vs in sorted(verses.items()):
            for i in range(0, len(vs) - 1, 2):
                (v1, a), (_, b) = vs[i], vs[i + 1]
                if 60 <= len(a) + len(b) + 1 <= 360:
                    passages.append({"id": f"{book.lower()}-{ch}-{v1}", "first": a, "second": b})
    random.Random(0).shuffle(passages)
    queries = [{"id": f"q-{p['id']}", "prompt": p["first"], "completion": " " + p["second"]}
               for p in passages[:N_QUERIES]]
    docs = [{"id": p["id"], "text": p["first"] + " " + p["second"]} for p in passages[N_QUERIES: N_QUERIES + N_DOCS]]
    write_jsonl(DATA / "corpus.jsonl", docs)
    write_jsonl(DATA / "queries.jsonl", queries)
    _log(f"{len(passages)} passages: {len(docs)} documents, {len(queries)} queries -> {DATA}")


# ------------------------------------------------------------------------------------------------ model
def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B:1",
                                                       special_tokens=[(EOT, tok.token_to_id(EOT))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                   model_max_length=ARCH["max_position_embeddings"])


def make_model(vocab: int, pad_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, attention_dropout=0.0, rms_norm_eps=1e-5,
                      bos_token_id=pad_id, eos_token_id=pad_id, pad_token_id=pad_id, **ARCH)
    return lambda: LlamaForCausalLM(cfg)


def load_corpus() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    return read_jsonl(DATA / "corpus.jsonl"), read_jsonl(DATA / "queries.jsonl")


def query_logprobs(model, tokenizer, queries: list[dict[str, str]]) -> np.ndarray:
    """Summed log p(completion | prompt) per query, tokenised as the engine does."""
    out = np.zeros(len(queries))
    with torch.no_grad():
        for i, q in enumerate(queries):
            p = tokenizer(q["prompt"])["input_ids"]
            c = tokenizer(q["completion"], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p + c])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1:-1].double(), -1)
            out[i] = float(logp.gather(1, torch.tensor(c)[:, None]).sum())
    return out


def build_model(args: argparse.Namespace) -> None:
    work = Path(args.work)
    docs, queries = load_corpus()
    tok = build_tokenizer([d["text"] for d in docs])
    seqs = [tok(d["text"])["input_ids"] for d in docs]
    _log(f"tokenizer: {len(tok)} tokens; documents {min(map(len, seqs))}-{max(map(len, seqs))} tokens "
         f"({sum(map(len, seqs))} in all)")
    base = work / "base"
    ckpts = work / "checkpoints"
    shutil.rmtree(ckpts, ignore_errors=True)
    t0 = time.perf_counter()
    model, loss = train(make_model(len(tok), tok.pad_token_id), seqs, tok.pad_token_id, recipe=RECIPE,
                        seed=args.train_seed, checkpoints=CHECKPOINTS, on_checkpoint=checkpoint_saver(ckpts, tok),
                        log=_log)
    model.save_pretrained(base)
    tok.save_pretrained(base)
    lp = query_logprobs(model, tok, queries)
    (base / "bench_manifest.json").write_text(json.dumps(
        {"recipe": recipe_json(RECIPE), "arch": ARCH, "train_seed": args.train_seed, "final_loss": loss,
         "mean_query_logprob": float(lp.mean()), "seconds": time.perf_counter() - t0}, indent=1) + "\n")
    _log(f"base model: loss {loss:.3f}, mean query log p {lp.mean():.2f} ({time.perf_counter() - t0:.0f} s); "
         f"checkpoints {sorted(p.name for p in ckpts.iterdir())}")


def build_truth(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    work = Path(args.work)
    tok = AutoTokenizer.from_pretrained(work / "base", local_files_only=True)
    docs, queries = load_corpus()
    seqs = [tok(d["text"])["input_ids"] for d in docs]
    n = len(docs)
    rng = np.random.default_rng(args.seed)
    masks = np.zeros((args.subsets, n), dtype=bool)
    for s in range(args.subsets):
        masks[s, rng.permutation(n)[: int(round(args.alpha * n))]] = True
    parts = work / "subsets"
    parts.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for s in range(args.subsets):
        f = parts / f"s{s:03d}-seed{args.seed}.npy"
        if f.exists():
            continue
        t = time.perf_counter()
        model, loss = train(make_model(len(tok), tok.pad_token_id), [seqs[i] for i in np.flatnonzero(masks[s])],
                            tok.pad_token_id, recipe=RECIPE, seed=args.train_seed)
        out = query_logprobs(model, tok, queries)
        np.save(f, out)
        _log(f"subset {s + 1}/{args.subsets}: loss {loss:.3f}, mean query log p {out.mean():.2f}, "
             f"{time.perf_counter() - t:.1f} s")
    outputs = np.stack([np.load(parts / f"s{s:03d}-seed{args.seed}.npy") for s in range(args.subsets)])
    for d in (work, DATA / "truth"):
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / "outputs.npy", outputs)
        torch.save(torch.from_numpy(masks), d / "masks.pt")
        torch.save(torch.from_numpy(-outputs), d / "losses.pt")
        (d / "doc_ids.json").write_text(json.dumps([x["id"] for x in docs]))
        (d / "query_ids.json").write_text(json.dumps([q["id"] for q in queries]))
    _log(f"ground truth: {args.subsets} subsets x {n} documents, {len(queries)} queries, "
         f"{time.perf_counter() - t0:.0f} s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="phase", required=True)
    c = sub.add_parser("corpus", help="rebuild the shipped corpus from the bible program's text")
    c.add_argument("--source", required=True, help="directory with Genesis.txt and Luke.txt")
    m = sub.add_parser("model", help="tokenizer and base model with checkpoints")
    m.add_argument("--work", default=str(WORK))
    m.add_argument("--train-seed", type=int, default=0)
    t = sub.add_parser("truth", help="retrain on random halves and measure the queries (resumes)")
    t.add_argument("--work", default=str(WORK))
    t.add_argument("--subsets", type=int, default=48)
    t.add_argument("--alpha", type=float, default=0.5)
    t.add_argument("--seed", type=int, default=0, help="seed of the subset draws")
    t.add_argument("--train-seed", type=int, default=0, help="initialisation seed of every retrained model")
    args = ap.parse_args(argv)
    {"corpus": build_corpus, "model": build_model, "truth": build_truth}[args.phase](args)


if __name__ == "__main__":
    main()
