"""Throughput of the audit's mapped stages with 1 and 2 Dask workers (prefect-dask), against the default runner.

Usage: python bench/dask_workers.py [--copies 8] [--shard-size 390] [--out results.json]
The demo corpus is replicated (new ids) to make enough shards; each configuration audits it into its own
directory, so nothing is cached between them. Reports per-stage seconds and tokens/s of the two mapped stages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=390)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from flows.runners import run_audit
    from influence_audit.demo.model import DEFAULT_CORPUS, ensure_demo_model
    from tasks.options import AuditParams

    work = Path(tempfile.mkdtemp(prefix="dask-bench-"))
    model = ensure_demo_model(work / "model", log=None)
    rows = [json.loads(line) for line in DEFAULT_CORPUS.read_text().splitlines() if line.strip()]
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"{r['id']}-c{c}", "text": r["text"]}) + "\n"
                              for c in range(args.copies) for r in rows))
    queries = DEFAULT_CORPUS.parent / "queries.jsonl"
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
               "documents": len(rows) * args.copies, "shard_size": args.shard_size, "runs": {}}
    for name, dask in (("default", None), ("dask-1", "local:1"), ("dask-2", "local:2")):
        p = AuditParams(model=str(model), train=[str(corpus)], queries=str(queries), top_k=10, max_length=128,
                        shard_size=args.shard_size, batch_size=16, output_dir=str(work / name), explain_top=1)
        t0 = time.perf_counter()
        r = run_audit(p, dask=dask)
        wall = time.perf_counter() - t0
        s = r["seconds"]
        tokens = r["metrics"]["tokens"]
        results["runs"][name] = {"wall_s": wall, "stage_seconds": s,
                                 "fit_tok_s": 2 * tokens / s["fit_factors"], "score_tok_s": tokens / s["score_shards"]}
        print(name, json.dumps(results["runs"][name]), flush=True)
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
