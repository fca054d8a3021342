"""Peak memory one scoring pass adds at a GPT-2-sized head (vocab 50,257, 512 tokens), measured on the CPU.

    python bench/head_memory.py [--precision bf16|fp32] [--batch 8]

A CPU proxy for the GPU peak: the vocabulary-sized tensors of a pass (logits, their gradient, the loss's
intermediates) dominate what a pass adds at this vocabulary. Peak resident set size above the baseline, sampled
every 2 ms, for one ``score`` pass of a 1-block, 256-wide GPT-2 (MLP layers tracked).
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from influence_engine import Example, InfluenceEngine  # noqa: E402


def rss_gib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=256, n_head=4, vocab_size=50257, n_positions=512,
                     resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    model = GPT2LMHeadModel(cfg)
    x = torch.randint(0, cfg.vocab_size, (args.batch, 512))
    docs = [Example(f"d{i}", tuple(r.tolist()), 1, 512) for i, r in enumerate(x)]
    eng = InfluenceEngine(model, None, layers="mlp", precision=args.precision, batch_size=args.batch, device="cpu",
                          fingerprint="head-memory")
    factors = eng.fit_factors(docs[:2], "ekfac")
    queries = eng.prepare_queries(docs[:2], factors, rank=8)
    gc.collect()
    base, peak, stop = rss_gib(), [0.0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_gib())
            time.sleep(0.002)

    th = threading.Thread(target=sample)
    th.start()
    eng.score(docs, queries, top_k=5)
    stop.set()
    th.join()
    logits = args.batch * 512 * cfg.vocab_size * (2 if args.precision == "bf16" else 4) / 2**30
    print(f"{args.precision} scoring pass, batch {args.batch} x 512, vocab {cfg.vocab_size}: peak RSS above baseline "
          f"{peak[0] - base:.2f} GiB (the logits alone: {logits:.2f} GiB)")


if __name__ == "__main__":
    main()
