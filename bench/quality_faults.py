"""Planted-fault benchmark of the query-free quality audit (``influence-audit quality``).

Injects faults into the demo corpus (influence_audit/demo/data/corpus.jsonl), retrains the demo model on the
faulted corpus (influence_audit/demo/model.py's recipe), runs the quality report and prints, per fault type, the
recall within the top 10% of its issue score and the recall of the flags (a document counts as found when any
issue flags it), the share of the corpus flagged, and the time of each step. Faults (seeded, placed at random
positions, ids that do not give them away):

* ``gibberish``: strings of random letters in word-like chunks (scraped junk, keyboard mash);
* ``exact_duplicate``: a copy of an existing document;
* ``near_duplicate``: a copy with one or two words replaced and its sentences reordered;
* ``contradiction``: a document stating a relation fact that other documents state (capital, language)
  with another answer, among two ordinary sentences from other documents.

Usage (from the repository root; about 5 minutes on a 2-core shared CPU)::

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/quality_faults.py [--out-dir DIR]

Results are written to ``bench/results/quality_faults-<date>.json`` with the commit, machine and command.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import string
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CORPUS = REPO / "influence_audit" / "demo" / "data" / "corpus.jsonl"
FAULT_ISSUE = {"gibberish": ("low_quality", "memorised"), "exact_duplicate": ("near_duplicate",),
               "near_duplicate": ("near_duplicate",), "contradiction": ("outlier",)}
COUNTS = {"gibberish": 15, "exact_duplicate": 8, "near_duplicate": 8, "contradiction": 10}
FACTS = (r"The capital of (\w+) is (\w+)\.", r"The people of (\w+) speak (\w+)\.")


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.)\s+", text.strip()) if s]


def _gibberish(rng: random.Random) -> str:
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9)))
             for _ in range(rng.randint(15, 30))]
    out, i = [], 0
    while i < len(words):  # sentences of 4-8 "words"
        n = rng.randint(4, 8)
        chunk = words[i:i + n]
        out.append(chunk[0].capitalize() + " " + " ".join(chunk[1:]) + ".")
        i += n
    return " ".join(out)


def _near_copy(text: str, vocab: list[str], rng: random.Random) -> str:
    sents = _sentences(text)
    rng.shuffle(sents)
    words = " ".join(sents).split(" ")
    for _ in range(rng.randint(1, 2)):
        j = rng.randrange(len(words))
        tail = "." if words[j].endswith(".") else ""
        words[j] = rng.choice(vocab) + tail
    return " ".join(words)


def id_maker(rng: random.Random, taken: set[str]):
    """A function giving fresh ``doc-NNNNN`` ids (drawn from ``rng``) that no row in ``taken`` has, each once."""

    def new_id() -> str:
        while True:
            i = f"doc-{rng.randrange(10_000, 99_999):05d}"
            if i not in taken:
                taken.add(i)
                return i

    return new_id


def plant_faults(rows: list[dict], seed: int = 0) -> tuple[list[dict], dict[str, list[str]], dict[str, str]]:
    """The faulted corpus (faults at random positions), the fault ids per type, and for copies their source."""
    rng = random.Random(seed)
    new_id = id_maker(rng, {r["id"] for r in rows})

    vocab = sorted({w for r in rows for w in re.findall(r"[a-z]{3,}", r["text"])})
    sentences = [s for r in rows for s in _sentences(r["text"])
                 if not any(re.search(p, s) for p in FACTS)]
    stated: dict[tuple[str, int], set[str]] = defaultdict(set)  # (subject, relation) -> answers
    counts: dict[tuple[str, int, str], int] = defaultdict(int)
    answers: dict[int, set[str]] = defaultdict(set)
    for r in rows:
        for k, p in enumerate(FACTS):
            for m in re.finditer(p, r["text"]):
                stated[(m.group(1), k)].add(m.group(2))
                counts[(m.group(1), k, m.group(2))] += 1
                answers[k].add(m.group(2))
    # facts stated at least twice elsewhere: the contradiction has something to contradict
    facts = sorted((s, k, a) for (s, k, a), n in counts.items() if n >= 2)
    faults: dict[str, list[str]] = {t: [] for t in COUNTS}
    source: dict[str, str] = {}
    planted: list[dict] = []
    for _ in range(COUNTS["gibberish"]):
        planted.append({"id": new_id(), "text": _gibberish(rng), "fault": "gibberish"})
    for kind in ("exact_duplicate", "near_duplicate"):
        for orig in rng.sample(rows, COUNTS[kind]):
            text = orig["text"] if kind == "exact_duplicate" else _near_copy(orig["text"], vocab, rng)
            planted.append({"id": new_id(), "text": text, "fault": kind, "source": orig["id"]})
    for subject, k, answer in rng.sample(facts, COUNTS["contradiction"]):
        wrong = rng.choice(sorted(answers[k] - stated[(subject, k)]))
        claim = FACTS[k].replace(r"(\w+)", "{}", 2).replace("\\.", ".").format(subject, wrong)
        body = [claim, *rng.sample(sentences, 2)]
        rng.shuffle(body)
        planted.append({"id": new_id(), "text": " ".join(body), "fault": "contradiction",
                        "source": f"{subject}: {answer} (stated {counts[(subject, k, answer)]}x), here {wrong}"})
    out = [dict(r) for r in rows]
    for p in planted:
        out.insert(rng.randrange(len(out) + 1), {"id": p["id"], "text": p["text"]})
        faults[p["fault"]].append(p["id"])
        if "source" in p:
            source[p["id"]] = p["source"]
    return out, faults, source


def recall_table(report, faults: dict[str, list[str]], top_fraction: float = 0.1) -> list[dict]:
    """Per fault type: recall within the top ``top_fraction`` of its issue score(s), and recall of the flags."""
    import polars as pl

    from tasks.quality.signals import ISSUE_TYPES

    n = report.height
    top_n = max(1, round(top_fraction * n))
    flagged_any = report.filter(pl.any_horizontal([pl.col(t) for t in ISSUE_TYPES]))["id"].to_list()
    flagged_any = set(flagged_any)
    top = {t: set(report.sort(f"{t}_score", descending=True, maintain_order=True).head(top_n)["id"].to_list())
           for t in ISSUE_TYPES}
    rows = []
    for kind, ids in faults.items():
        issues = FAULT_ISSUE[kind]
        in_top = sum(any(i in top[t] for t in issues) for i in ids)
        found = sum(i in flagged_any for i in ids)
        by_issue = {t: sum(i in set(report.filter(pl.col(t))["id"].to_list()) for i in ids) for t in ISSUE_TYPES}
        top_by = {t: sum(i in top[t] for i in ids) for t in ISSUE_TYPES}
        rows.append({"fault": kind, "n": len(ids), "issue": "/".join(issues),
                     "recall_top_10pct": in_top / len(ids), "recall_flagged": found / len(ids),
                     "flagged_by": by_issue, "in_top_10pct_of": top_by})
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=REPO / ".influence-audit" / "bench-quality")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategy", default="ekfac")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import polars as pl
    import torch

    from influence_audit.demo.model import ensure_demo_model, read_jsonl
    from tasks.engine import EngineSpec
    from tasks.quality.signals import QualitySettings, quality_report

    torch.set_num_threads(1)
    rows = read_jsonl(CORPUS)
    corpus, faults, source = plant_faults(rows, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in corpus), encoding="utf-8")
    (args.out_dir / "faults.json").write_text(json.dumps({"faults": faults, "source": source}, indent=1))
    print(f"corpus: {len(rows)} documents + {sum(map(len, faults.values()))} planted faults "
          f"({', '.join(f'{k} {len(v)}' for k, v in faults.items())}) -> {path}")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    reused = any((args.out_dir / "model").glob("demo-gpt2-*/demo_manifest.json"))
    model_dir = ensure_demo_model(args.out_dir / "model", path, seed=args.seed)
    seconds["train_model"] = time.perf_counter() - t0
    train = pl.DataFrame(corpus)
    t0 = time.perf_counter()
    eng = EngineSpec(str(model_dir), "mlp", "cpu", "fp32", 16, 128, args.seed).engine()
    docs = eng.encode(train.to_dicts(), where="train")
    factors = eng.fit_factors(docs, args.strategy)
    seconds["fit_factors"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    report, hot = quality_report(eng, train, docs, factors, QualitySettings())
    seconds["quality_pass_and_report"] = time.perf_counter() - t0
    report.write_parquet(args.out_dir / "report.parquet")
    hot.write_parquet(args.out_dir / "hot_spots.parquet")
    table = recall_table(report, faults)
    from tasks.quality.signals import ISSUE_TYPES

    flagged_ids = set(report.filter(pl.any_horizontal([pl.col(t) for t in ISSUE_TYPES]))["id"].to_list())
    flagged = len(flagged_ids)
    planted_or_source = {i for v in faults.values() for i in v} | {s for s in source.values() if s.startswith("doc-")}
    others = sorted(flagged_ids - planted_or_source)
    per_issue = {t: int(report[t].sum()) for t in ISSUE_TYPES}
    print(f"\n{'fault':<16} {'n':>3}  {'issue':<24} {'recall@top10%':>13} {'flagged':>8}  flagged by / in top 10% of")
    for r in table:
        print(f"{r['fault']:<16} {r['n']:>3}  {r['issue']:<24} {r['recall_top_10pct']:>13.2f} "
              f"{r['recall_flagged']:>8.2f}  {r['flagged_by']} / {r['in_top_10pct_of']}")
    print(f"\nflagged: {flagged} of {report.height} documents ({flagged / report.height:.1%}); per issue {per_issue}")
    print(f"flagged besides the planted faults and the originals of planted copies: {len(others)} {others}")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
          + (" (model reused from an earlier run)" if reused else ""))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from provenance import provenance

    result = {"benchmark": "quality_faults", "provenance": provenance(),
              "machine": f"2-core shared CPU ({os.cpu_count()} visible cores), torch {torch.__version__}, 1 thread",
              "documents": report.height, "planted": {k: len(v) for k, v in faults.items()},
              "strategy": args.strategy, "flagged": flagged, "flagged_fraction": flagged / report.height,
              "flagged_per_issue": per_issue, "flagged_others": others, "recall": table, "seconds": seconds,
              "model_reused": reused}
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"quality_faults-{datetime.now(timezone.utc):%Y%m%d}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    main()
