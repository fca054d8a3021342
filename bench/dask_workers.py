"""Throughput of the audit's mapped stages with 1 and 2 Dask workers (prefect-dask), against the default runner.

Usage: python bench/dask_workers.py [--copies 8] [--shard-size 390] [--runners default,local:1,local:2]
                                    [--device-memory-gb GB] [--repeat 1] [--model-cache DIR]
                                    [--out results.json]
The demo corpus is replicated (new ids) to make enough shards; each configuration audits it into its own
directory, so nothing is cached between them. Reports per-stage seconds and tokens/s of the two mapped stages.
``--device-memory-gb`` (e.g. 0.0035: two groups of the demo model's four MLP layers in fp32) makes the fit run
over groups of layers, each group's passes mapped as tasks of their own (the grouped fit). ``--repeat`` runs the
runners in turn that many times (A B A B ...), so load drifting on a shared machine touches each alike. The
result records the commit, the command and the load average before and after each run (bench/provenance.py).
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
    ap.add_argument("--runners", default="default,local:1,local:2")
    ap.add_argument("--device-memory-gb", type=float, default=None)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--model-cache", default=None, help="a trained demo model's cache directory (default: train one)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from provenance import provenance

    from flows.runners import run_audit
    from influence_audit.demo.model import DEFAULT_CORPUS, ensure_demo_model
    from tasks.options import AuditParams

    work = Path(tempfile.mkdtemp(prefix="dask-bench-"))
    model = ensure_demo_model(Path(args.model_cache) if args.model_cache else work / "model", log=None)
    rows = [json.loads(line) for line in DEFAULT_CORPUS.read_text().splitlines() if line.strip()]
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"{r['id']}-c{c}", "text": r["text"]}) + "\n"
                              for c in range(args.copies) for r in rows))
    queries = DEFAULT_CORPUS.parent / "queries.jsonl"
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, "provenance": provenance(),
               "documents": len(rows) * args.copies, "shard_size": args.shard_size,
               "device_memory_gb": args.device_memory_gb, "runs": {}}
    runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    for rep in range(args.repeat):
        for runner in runners:
            name = "default" if runner == "default" else "dask-" + runner.split(":", 1)[1] if ":" in runner else runner
            p = AuditParams(model=str(model), train=[str(corpus)], queries=str(queries), top_k=10, max_length=128,
                            shard_size=args.shard_size, batch_size=16, output_dir=str(work / f"{name}-{rep}"),
                            explain_top=1, device="cpu", device_memory_gb=args.device_memory_gb)
            load0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            r = run_audit(p, dask=None if runner == "default" else runner)
            wall = time.perf_counter() - t0
            s = r["seconds"]
            tokens = r["metrics"]["tokens"]
            groups = len({x.name.rsplit("-g", 1)[-1] for x in (work / f"{name}-{rep}" / "factors").glob(
                "*/partials/cov-*-g*.safetensors")}) or 1
            run = {"wall_s": wall, "stage_seconds": s, "layer_groups": groups, "load_before": load0,
                   "load_after": os.getloadavg()[0], "fit_tok_s": 2 * groups * tokens / s["fit_factors"],
                   "score_tok_s": tokens / s["score_shards"]}
            results["runs"].setdefault(name, []).append(run)
            print(name, rep, json.dumps(run), flush=True)
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
