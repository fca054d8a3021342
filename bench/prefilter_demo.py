"""The BM25 prefilter on the demo corpus: planted recall@10 with and without it, the fraction of the corpus
scored, and the library's index build and query times (on the demo corpus and on synthetic corpora of the index
bench's sizes).

    nice -n 10 python bench/prefilter_demo.py --out bench/results/prefilter-demo-cpu-2core-2026-11-30.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import commit  # noqa: E402

from influence_audit.demo.model import ensure_demo_model
from influence_engine import InfluenceEngine
from tasks.influence.candidates import planted_metrics
from tasks.influence.compute import score_frame
from tasks.influence.prefilter import bm25_candidates, score_candidates
from tasks.inputs.rows import data_fingerprint, encode_frame
from tasks.inputs.sources import read_rows


def main() -> dict[str, Any]:
    p = argparse.ArgumentParser()
    p.add_argument("--model-cache", default=".influence-audit/demo-model")
    p.add_argument("--ks", default="10,20,50,100")
    p.add_argument("--synthetic", default="10000,40000,160000")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    data = Path(str(resources.files("influence_audit.demo") / "data"))
    result: dict[str, Any] = {"machine": {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                          "commit": commit(), "machine": "2-core shared CPU",
                                          "load_average_start": os.getloadavg()},
                              "command": "python bench/prefilter_demo.py " + " ".join(
                                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)}
    model_dir = ensure_demo_model(Path(args.model_cache), seed=0, log=None)
    train = read_rows(data / "corpus.jsonl", "train")
    queries = read_rows(data / "queries.jsonl", "queries")
    eng = InfluenceEngine.from_pretrained(model_dir, layers="mlp", device="cpu", max_length=128, batch_size=8)
    docs = encode_frame(eng, train, "train")
    qs = encode_frame(eng, queries, "queries")
    settings = eng.factor_settings("ekfac", "auto", data_fingerprint=data_fingerprint(train))
    factors = eng.fit_factors(docs, settings)
    prepared = eng.prepare_queries(qs, factors, rank=32)  # the audit's default query rank
    t0 = time.perf_counter()
    full = eng.score(docs, prepared, top_k=10)
    rows: list[dict[str, Any]] = [{"prefilter": "none", "documents_scored": len(docs), "fraction_scored": 1.0,
                                   "score_s": time.perf_counter() - t0,
                                   **planted_metrics(score_frame(full.top_rows()), str(data / "planted.json"))}]
    for k in [int(x) for x in args.ks.split(",")]:
        cands = bm25_candidates(train, queries, k)
        t0 = time.perf_counter()
        scored = score_candidates(eng, docs, prepared, cands, top_k=10)
        bm25_hits = planted_metrics(pl.DataFrame([{"query_id": q, "train_id": d, "rank": r}
                                                  for q, ids in cands.by_query.items()
                                                  for r, d in enumerate(ids, 1)]), str(data / "planted.json"))
        rows.append({"prefilter": f"bm25:{k}", "documents_scored": len(cands.union),
                     "fraction_scored": cands.fraction_scored, "fraction_per_query": k / len(docs),
                     "score_s": time.perf_counter() - t0, **cands.seconds,
                     "bm25_alone_recall_at_10": bm25_hits.get("planted_recall_at_10"),
                     **planted_metrics(score_frame(scored), str(data / "planted.json"))})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps(rows[0]), flush=True)
    result["demo"] = rows
    words = sorted({w for t in train["text"].to_list() for w in t.split()})
    result["synthetic"] = []
    rng = random.Random(0)
    for n in [int(x) for x in args.synthetic.split(",") if x]:
        syn = pl.DataFrame({"id": [f"s{i}" for i in range(n)],
                            "text": [" ".join(rng.choice(words) for _ in range(24)) for _ in range(n)]})
        c = bm25_candidates(syn, queries.head(32), 100)
        result["synthetic"].append({"documents": n, "queries": min(32, queries.height), "k": 100, **c.seconds})
        print(json.dumps(result["synthetic"][-1]), flush=True)
    result["machine"]["load_average_end"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
