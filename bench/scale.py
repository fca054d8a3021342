"""How the audit grows with the corpus: 10k .. 640k documents in 16 Parquet parts through `influence-audit audit`.

Usage (from the repository root, with PYTHONPATH=$PWD):
    nice -n 10 .venv/bin/python bench/scale.py [--sizes 10000 40000 160000 640000] [--parts 16]
        [--shard-size 10000] [--work DIR] [--out bench/results/scale-....json]

A tiny random GPT-2 (one layer, 16-dim, a word-level tokenizer) keeps the engine's share small, so what is
measured is the pipeline around it. Documents are 6-18 random words (~12 tokens). One `prefect server` is
started for all sizes (its memory is reported apart); each size is a fresh output directory (nothing cached),
run as the real CLI in a subprocess. Per size: wall and CPU seconds per stage (CPU: the audit process's threads),
documents/s of the non-engine stages (inputs, candidates, output validation), and the peak resident memory of
the audit's own processes (the CLI process and its children, sampled every 0.2 s with psutil: the largest sum),
and of the Prefect server.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the a cat dog bird sat ran flew on under over mat rug tree big small red blue green capital of is city "
         "river north south old new far near long short high low warm cold fast slow deep wide").split()
ENGINE_STAGES = ("fit_factors", "prepare_queries", "score_shards")
NON_ENGINE = ("load_inputs", "merge_candidates", "validate_outputs")


def build_model(out: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1} | {w: i + 2 for i, w in enumerate(dict.fromkeys(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(fast), n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=1,
                     eos_token_id=1, pad_token_id=1)
    GPT2LMHeadModel(cfg).eval().save_pretrained(out)
    fast.save_pretrained(out)
    return out


def write_corpus(out: Path, n: int, parts: int, seed: int = 0) -> Path:
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    lengths = rng.integers(6, 19, n)
    picks = rng.integers(0, len(words), (n, 18))
    texts = [" ".join(words[row[:k]]) for row, k in zip(picks, lengths, strict=True)]
    df = pl.DataFrame({"id": [f"d{i:08d}" for i in range(n)], "text": texts, "topic": rng.integers(0, 50, n)})
    out.mkdir(parents=True, exist_ok=True)
    step = -(-n // parts)
    for i in range(parts):
        df.slice(i * step, step).write_parquet(out / f"part-{i:05d}-of-{parts:05d}.parquet")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prefect(home: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env | {"PREFECT_HOME": str(home)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("prefect server did not start")


def tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """(RSS of the process and all its descendants, number of processes)."""
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total, len(procs)


def run_size(n: int, args: argparse.Namespace, work: Path, model: Path, queries: Path, env: dict[str, str],
             server: psutil.Process) -> dict:
    data = write_corpus(work / f"data-{n}", n, args.parts)
    home = work / f"home-{n}"
    cmd = [str(Path(sys.executable).parent / "influence-audit"), "audit", "--model", str(model), "--train", str(data),
           "--queries", str(queries), "--output-dir", str(home), "--device", "cpu", "--max-length", "32",
           "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size), "--top-k", "10",
           "--n-queries", "4", "--query-rank", "4", "--explain-top", "1"]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    ps = psutil.Process(proc.pid)
    peak = peak_procs = server_peak = 0
    while proc.poll() is None:
        rss, count = tree_rss(ps)
        peak, peak_procs = max(peak, rss), max(peak_procs, count)
        server_peak = max(server_peak, tree_rss(server)[0])
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    output = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"audit of {n} documents failed:\n{output[-3000:]}")
    (audit_dir,) = (home / "audits").iterdir()
    manifest = json.loads((audit_dir / "manifest.json").read_text())
    seconds, cpu = manifest["seconds"], manifest.get("cpu_seconds", {})
    shards = len(manifest["inputs"]["shards"])
    rates = {s: n / seconds[s] for s in NON_ENGINE if seconds.get(s)}
    per_cpu = {s: n / cpu[s] for s in NON_ENGINE if cpu.get(s)}
    return {"documents": n, "tokens": manifest["inputs"]["n_tokens"], "shards": shards, "wall_seconds": wall,
            "stage_seconds": seconds, "stage_cpu_seconds": cpu,
            "non_engine_seconds": sum(seconds.get(s, 0) for s in NON_ENGINE),
            "engine_seconds": sum(seconds.get(s, 0) for s in ENGINE_STAGES),
            "docs_per_s": rates, "docs_per_cpu_s": per_cpu, "peak_rss_mib": peak / 2**20,
            "peak_processes": peak_procs, "prefect_server_peak_rss_mib": server_peak / 2**20,
            "load_average_before": load0, "load_average_after": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000, 160_000, 640_000])
    ap.add_argument("--parts", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--work", default=None, help="scratch directory (default: a new temporary one, removed)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="scale-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    model = build_model(work / "model")
    queries = work / "queries.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q{i}", "prompt": " ".join(WORDS[i:i + 4]),
                                           "completion": " " + " ".join(WORDS[i + 4:i + 7])}) + "\n"
                               for i in range(4)))
    server, url = start_prefect(work / "prefect-home", env)
    env |= {"PREFECT_API_URL": url, "PREFECT_HOME": str(work / "client-prefect-home")}
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
               "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                        text=True).stdout.strip(),
               "command": " ".join(sys.argv), "parts": args.parts, "shard_size": args.shard_size, "runs": []}
    try:
        for n in args.sizes:
            r = run_size(n, args, work, model, queries, env, psutil.Process(server.pid))
            results["runs"].append(r)
            print(f"{n:>8} docs  {r['shards']:>3} shards  wall {r['wall_seconds']:7.1f} s  "
                  + "  ".join(f"{k} {v:.1f}" for k, v in r["stage_seconds"].items())
                  + f"  peak {r['peak_rss_mib']:.0f} MiB  server {r['prefect_server_peak_rss_mib']:.0f} MiB"
                  + f"  load {r['load_average_before'][0]:.1f}", flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=1))
            shutil.rmtree(work / f"data-{n}", ignore_errors=True)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
