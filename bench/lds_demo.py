"""LDS on the demo: retrain the demo model on random halves of its corpus, then score every strategy against it.

    nice -n 10 python bench/lds_demo.py truth --subsets 48       # the ground truth (resumes; ~20 s a model)
    nice -n 10 python bench/lds_demo.py score --out bench/results/lds-demo.json

``truth`` trains the demo GPT-2 (influence_audit/demo/model.py's recipe, same initialisation seed, same
tokenizer) on ``--subsets`` random halves of the 390-document demo corpus and measures, on each retrained
model, ``log p(completion | prompt)`` of every query: the 24 demo queries plus one canonical query for every
other fact of the generated world (each stated by 1-3 documents). It writes, under ``--work``,
``masks.pt`` (S x N bool) and ``losses.pt`` (S x Q completion NLL) in kronfluence's layout, plus
``outputs.npy`` (S x Q log-probabilities), ``queries.jsonl`` and ``doc_ids.json``.

``score`` computes every configuration's scores on the audited (full-corpus) model, the LDS of each with a
bootstrap interval over queries, paired differences against the default, kronfluence's EK-FAC on the same
ground truth when kronfluence is installed (bench-only), and the counterfactual checks' agreement with the
retraining ground truth. Results go to one JSON file with the commit, machine and command.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from influence_audit.demo import make_corpus  # noqa: E402
from influence_audit.demo.model import (  # noqa: E402
    DEFAULT_CORPUS,
    RECIPE,
    ensure_demo_model,
    fit_demo_gpt2,
    read_jsonl,
)

WORK = ROOT / ".lds-demo"


def _log(msg: str) -> None:
    print(f"[{_dt.datetime.now(_dt.timezone.utc):%H:%M:%S}] {msg}", flush=True)


def demo_queries() -> list[dict[str, str]]:
    """The demo's 24 queries, then one canonical query (the relation's first query phrasing) per other fact."""
    queries = [{"id": q["id"], "prompt": q["prompt"], "completion": q["completion"]}
               for q in read_jsonl(DEFAULT_CORPUS.parent / "queries.jsonl")]
    seen = {q["prompt"] for q in queries}
    world = make_corpus.build_world(random.Random(1234))  # generate()'s first draw: the committed corpus's world
    for (rel_name, subject), answer in sorted(world.answers.items()):
        rel = make_corpus.RELATIONS[rel_name]
        phrasing, prompt = rel.queries[0]
        fact = rel.phrasings[phrasing].format(S=subject, A=answer)
        prompt = prompt.format(S=subject)
        if prompt in seen or not fact.startswith(prompt):
            continue
        seen.add(prompt)
        queries.append({"id": f"f-{rel_name}-{subject.lower().replace(' ', '-')}", "prompt": prompt,
                        "completion": fact[len(prompt):]})
    return queries


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


def build_truth(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_demo_model(work / "cache", log=_log)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    docs = read_jsonl(DEFAULT_CORPUS)
    queries = demo_queries()
    (work / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (work / "doc_ids.json").write_text(json.dumps([d["id"] for d in docs]))
    seqs = [tokenizer(d["text"])["input_ids"] for d in docs]
    n = len(docs)
    rng = np.random.default_rng(args.seed)
    masks = np.zeros((args.subsets, n), dtype=bool)
    for s in range(args.subsets):
        masks[s, rng.permutation(n)[: int(round(args.alpha * n))]] = True
    parts = work / "subsets"
    parts.mkdir(exist_ok=True)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for s in range(args.subsets):
        f = parts / f"s{s:03d}-seed{args.seed}.npy"
        if f.exists():
            continue
        t = time.perf_counter()
        model, loss = fit_demo_gpt2([seqs[i] for i in np.flatnonzero(masks[s])], len(tokenizer),
                                    tokenizer.pad_token_id, recipe=RECIPE, seed=args.train_seed)
        out = query_logprobs(model, tokenizer, queries)
        np.save(f, out)
        _log(f"subset {s + 1}/{args.subsets}: loss {loss:.3f}, mean query log p {out.mean():.2f}, "
             f"{time.perf_counter() - t:.1f} s")
    outputs = np.stack([np.load(parts / f"s{s:03d}-seed{args.seed}.npy") for s in range(args.subsets)])
    np.save(work / "outputs.npy", outputs)
    torch.save(masks, work / "masks.pt")
    torch.save(-outputs, work / "losses.pt")
    full = query_logprobs(__import__("transformers").AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True).eval(), tokenizer, queries)
    np.save(work / "full_outputs.npy", full)
    _log(f"ground truth: {args.subsets} subsets x {n} documents, {len(queries)} queries, "
         f"{time.perf_counter() - t0:.0f} s; full model mean query log p {full.mean():.2f}")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "note": "2-core shared CPU"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="phase", required=True)
    t = sub.add_parser("truth", help="retrain on random halves and measure the queries (resumes)")
    t.add_argument("--subsets", type=int, default=48)
    t.add_argument("--alpha", type=float, default=0.5)
    t.add_argument("--seed", type=int, default=0, help="seed of the subset draws")
    t.add_argument("--train-seed", type=int, default=0, help="initialisation seed of every retrained model")
    t.add_argument("--work", default=str(WORK))
    args = ap.parse_args(argv)
    if args.phase == "truth":
        build_truth(args)


if __name__ == "__main__":
    main()
