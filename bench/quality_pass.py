"""Time the quality audit's engine pass (self-influence, per-token split and loss per document) alone.

Fits EK-FAC factors once (cached in ``--factors``), then runs ``document_signals`` over the documents with the
per-token rotation (``--rotation tokens``: rotate each token's vectors, scale, never rotate back; what the engine
chooses by cost, ``auto``) or the whole-gradient path it replaced (``--rotation whole``: rotate each document's
gradient, scale, rotate back). Compare whole processes with farm-bench, e.g.::

    farm-bench -n 3 --vs '.venv/bin/python bench/quality_pass.py --rotation whole ...' -- \\
        .venv/bin/python bench/quality_pass.py --rotation auto ...

Prints the pass's seconds, tokens per second and the peak resident memory (ru_maxrss) of the process, with
progress lines on stderr every 30 s off a terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--corpus", type=Path, required=True, help="JSONL with id and text")
    ap.add_argument("--limit", type=int, default=0, help="first N documents only (0: all)")
    ap.add_argument("--factors", type=Path, required=True, help="factors directory (fitted here if empty)")
    ap.add_argument("--layers", default="mlp")
    ap.add_argument("--rotation", choices=("auto", "tokens", "whole"), default="auto")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from influence_audit.console import REPORT
    from influence_audit.demo.model import read_jsonl
    from influence_engine import Factors
    from influence_engine.quality import DocumentSignalAccumulator
    from tasks.engine import EngineSpec

    torch.set_num_threads(args.threads)
    rows = read_jsonl(args.corpus)
    rows = rows[: args.limit] if args.limit else rows
    eng = EngineSpec(args.model, args.layers, "cpu", "fp32", args.batch_size, args.max_length, 0).engine()
    docs = eng.encode(rows, where="train")
    if Factors.exists(args.factors):
        factors = Factors.load(args.factors, layers=list(eng.specs))
    else:
        t0 = time.perf_counter()
        factors = eng.fit_factors(docs, "ekfac")
        factors.save(args.factors)
        print(f"fitted EK-FAC factors on {len(docs)} documents in {time.perf_counter() - t0:.1f} s -> {args.factors}",
              file=sys.stderr)
    DocumentSignalAccumulator.token_rotation = {"auto": None, "tokens": True, "whole": False}[args.rotation]
    tokens = sum(len(d.input_ids) for d in docs)
    t0 = time.perf_counter()
    with REPORT.stage(f"quality pass ({args.rotation})", len(docs)) as bar:
        signals = eng.document_signals(docs, factors, bar)
    seconds = time.perf_counter() - t0
    out = {"rotation": args.rotation, "documents": len(docs), "tokens": tokens, "layers": len(eng.specs),
           "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
           "self_influence_sum": sum(s.self_influence for s in signals)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
