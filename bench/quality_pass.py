"""Time the quality audit's engine pass (self-influence, per-token split and loss per document) alone.

Fits EK-FAC factors once (cached in ``--factors``), then runs ``document_signals`` over the documents with the
per-token rotation (``--rotation tokens``: rotate each token's vectors, scale, never rotate back; what the engine
chooses by cost, ``auto``) or the whole-gradient path it replaced (``--rotation whole``: rotate each document's
gradient, scale, rotate back). Compare whole processes with farm-bench, e.g.::

    farm-bench -n 3 --vs '.venv/bin/python bench/quality_pass.py --rotation whole ...' -- \\
        .venv/bin/python bench/quality_pass.py --rotation auto ...

Prints the pass's seconds, tokens per second and the peak resident memory (ru_maxrss) of the process, with
progress lines on stderr every 30 s off a terminal.

``--widths OUTxIN`` (e.g. ``1536x576``, SmolLM2-135M's MLP up/gate projections) times the accumulator's work per
layer alone at those widths, without a model: random orthogonal eigenbases and eigenvalues, ``--batch-size``
documents of ``--tokens`` tokens, ``--repeat`` batches of each path in turn; it prints the median seconds per batch
of each path, the ratio of each pair and checks that both give the same per-token self-influence.
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
    ap.add_argument("--widths", default=None, help="OUTxIN: time one layer's accumulator work, no model")
    ap.add_argument("--tokens", type=int, default=60, help="with --widths: tokens per document")
    ap.add_argument("--repeat", type=int, default=5, help="with --widths: batches timed per path")
    if argv is None and "--widths" in sys.argv:
        ap.set_defaults(model="-", corpus=Path("-"), factors=Path("-"))
        for a in ap._actions:
            a.required = False
    args = ap.parse_args(argv)
    if args.widths:
        return synthetic(args)
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


def synthetic(args) -> dict:
    """One layer at real widths: the accumulator's backward on random vectors, both paths, same numbers."""
    import torch

    from influence_engine.factors import Factors
    from influence_engine.layers import LayerSpec
    from influence_engine.passes import PassContext
    from influence_engine.quality import DocumentSignalAccumulator

    torch.set_num_threads(args.threads)
    n_out, n_in = (int(x) for x in args.widths.lower().split("x"))
    gen = torch.Generator().manual_seed(0)
    spec = LayerSpec("layer", "linear", n_in, n_out, False)
    Q_A, _ = torch.linalg.qr(torch.randn(n_in, n_in, generator=gen, dtype=torch.float64))
    Q_S, _ = torch.linalg.qr(torch.randn(n_out, n_out, generator=gen, dtype=torch.float64))
    eigen = torch.rand(n_out, n_in, generator=gen, dtype=torch.float64) + 0.1
    factors = Factors("ekfac", {"layer": spec}, {"layer": {"Q_A": Q_A, "Q_S": Q_S, "eigen": eigen}}, {"layer": 0.01})
    B, T = args.batch_size, args.tokens
    a = torch.randn(B, T, n_in, generator=gen)
    g = torch.randn(B, T, n_out, generator=gen)
    ctx = PassContext(batch=None, mask=torch.ones(B, T, dtype=torch.bool), dtype=torch.float32, padded=False)
    out = {"widths": args.widths, "batch": B, "tokens": T, "repeat": args.repeat, "threads": args.threads}
    per_token, times = {}, {"tokens": [], "whole": []}
    accs = {}
    for path, flag in (("tokens", True), ("whole", False)):
        DocumentSignalAccumulator.token_rotation = flag
        accs[path] = acc = DocumentSignalAccumulator(factors, [])
        acc.begin_batch(ctx)
        acc.backward(spec, a, g, ctx)  # warm-up
    for _ in range(args.repeat):  # in turn, so that the machine's load affects both alike
        for path, flag in (("tokens", True), ("whole", False)):
            DocumentSignalAccumulator.token_rotation = flag
            acc = accs[path]
            acc._token_pending = []
            t0 = time.perf_counter()
            acc.backward(spec, a, g, ctx)
            times[path].append(time.perf_counter() - t0)
            per_token[path] = acc._token_pending[-1].double()
    for path, ts in times.items():
        out[f"{path}_s_per_batch"] = round(sorted(ts)[len(ts) // 2], 4)  # the median
    out["ratios"] = [round(w / t, 2) for t, w in zip(times["tokens"], times["whole"], strict=True)]
    out["speedup_median_of_pairs"] = sorted(out["ratios"])[len(out["ratios"]) // 2]
    out["max_rel_diff"] = float((per_token["tokens"] - per_token["whole"]).abs().max()
                                / per_token["whole"].abs().max())
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
