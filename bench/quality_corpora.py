"""The quality report on corpora of different kinds, each with planted faults: recall and the share flagged.

Corpora (``--corpus``, several allowed; all built offline, seeded):

* ``demo``: the demo corpus (influence_audit/demo/data/corpus.jsonl, 390 short documents about invented countries,
  with sentences shared across documents). **The cut-offs were chosen on this one**; the others are held out.
* ``templated``: ~1,150 templated product-catalogue entries built here, each with one distinct fact, among
  boilerplate sentences that many documents share (a catalogue, a knowledge base).
* ``python``: chunks (<= ~100 words and symbols) of the Python source files of a few pure-Python packages
  installed beside the project (click, jinja2, rich, typer, pydantic, datasketch), in sorted path order;
  source code has its own boilerplate (licence headers, imports) and natural near copies.
* ``prose``: 512 short passages of real prose (bench/data/lds_prose/corpus.jsonl, King James Bible verses).

Faults planted in each (at random positions, ids that do not give them away): ``gibberish`` of four kinds (random
letters in word-like chunks, random printable characters, markup debris, encoding garbage), ``exact_duplicate``,
``near_duplicate`` (one or two words replaced and its sentences or lines reordered), and ``contradiction`` where the
corpus states facts (demo, templated): a fact stated elsewhere, here with another answer.

For each corpus: train the demo recipe's toy GPT-2 on the faulted corpus (cached by corpus and seed), fit EK-FAC on
its MLP layers, run the quality report at its defaults and measure per fault type the recall of the flags (gibberish:
flagged by any issue; duplicates: the planted copy is in a reported duplicate group, its copy flagged, whichever
member is kept; contradictions: flagged by any issue) and the share of the corpus flagged. ``--model DIR`` runs a
given model instead (the real SmolLM2; no training). Writes ``bench/results/quality-corpora-<machine>-<date>.json``
with the commit, machine and load, and prints the table.

Usage (from the repository root)::

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/quality_corpora.py \\
        --corpus demo templated python prose
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
sys.path.insert(0, str(REPO / "bench"))

from quality_faults import FACTS as DEMO_FACTS  # noqa: E402  (the demo corpus's planted-fact patterns)
from quality_faults import _near_copy, _sentences, id_maker  # noqa: E402

DEMO = REPO / "influence_audit" / "demo" / "data" / "corpus.jsonl"
PROSE = REPO / "bench" / "data" / "lds_prose" / "corpus.jsonl"
PACKAGES = ("click", "jinja2", "rich", "typer", "pydantic", "datasketch")
GIBBERISH_KINDS = ("letters", "characters", "markup", "encoding")
TOKEN = re.compile(r"'s\b|[^\w\s]|\w+")  # ~ the demo tokenizer's pieces
MAX_PIECES = 100  # the demo model has 128 positions


def _pieces(text: str) -> int:
    return len(TOKEN.findall(text))


# ----------------------------------------------------------------------------------------------- corpora
def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def templated_corpus(n: int = 1150, seed: int = 0) -> tuple[list[dict], list[tuple[str, str, str]]]:
    """Catalogue entries: per product one distinct fact (its release year and the city it was designed in) among
    boilerplate sentences shared by many entries. Returns the rows and the facts (subject, relation, answer)."""
    rng = random.Random(seed)
    syll = ["ka", "ro", "ven", "tal", "mi", "dor", "ex", "qua", "lin", "sor", "pe", "zu", "ber", "nax", "ti", "ol"]
    kinds = ["kettle", "lamp", "drill", "chair", "router", "bicycle", "speaker", "blender", "tent", "camera"]
    cities = ["Arlen", "Bosk", "Cadria", "Dunmore", "Elsby", "Farrow", "Gelt", "Harbin", "Istra", "Jorvik", "Kesh",
              "Lumen", "Marrow", "Norvale", "Ostby", "Pellam"]
    colours = ["red", "blue", "green", "black", "white", "grey", "yellow", "orange"]
    boiler = [
        "This entry is part of the product catalogue.", "All specifications are subject to change without notice.",
        "Contact the support team for more information.", "Prices include value added tax where applicable.",
        "Spare parts are available from authorised dealers.", "Please read the safety instructions before use.",
        "The warranty covers manufacturing defects for two years.", "Keep the original packaging for returns.",
        "Delivery usually takes three to five working days.", "Customer reviews are shown below the description.",
        "Images are for illustration purposes only.", "The manual can be downloaded from the support page.",
        "Recycle the packaging where facilities exist.", "Registered customers receive updates by email.",
        "Accessories are sold separately.", "This product has been tested to the relevant standards.",
    ]
    slots = ["It comes in {c1} and {c2}.", "The {k} is popular with families.", "Most buyers choose the {c1} model.",
             "The {k} fits in a small cupboard.", "A {c1} cover is included with the {k}."]
    names: set[str] = set()
    rows, facts = [], []
    while len(rows) < n:
        name = "".join(rng.choice(syll) for _ in range(rng.randint(2, 3))).capitalize() + f" {rng.randint(10, 99)}"
        if name in names:
            continue
        names.add(name)
        kind, city, year = rng.choice(kinds), rng.choice(cities), rng.randint(1980, 2024)
        fact = f"The {name} {kind} was designed in {city} and first sold in {year}."
        body = [fact, *rng.sample(boiler, rng.randint(2, 4)),
                rng.choice(slots).format(c1=rng.choice(colours), c2=rng.choice(colours), k=kind)]
        rng.shuffle(body)
        rows.append({"id": f"doc-{len(rows):05d}", "text": " ".join(body)})
        facts.append((name, kind, city))
    return rows, facts


def python_corpus(n: int = 900, seed: int = 0) -> list[dict]:
    """Chunks of consecutive lines (<= MAX_PIECES words and symbols, at least 3 non-blank lines) of the installed
    packages' Python files, taken in sorted path order, ``n`` sampled with ``seed``."""
    import importlib.util

    chunks: list[tuple[str, str]] = []
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.rglob("*.py")):
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (UnicodeDecodeError, OSError):
                continue
            cur: list[str] = []
            for line in lines:
                line = line.rstrip()
                if len(line) > 100:
                    continue
                if cur and (_pieces("\n".join([*cur, line])) > MAX_PIECES - 10 or (not line and len(cur) >= 8)):
                    text = "\n".join(cur).strip("\n")
                    if sum(1 for x in cur if x.strip()) >= 3:
                        chunks.append((f"{pkg}/{path.relative_to(root)}", text))
                    cur = []
                if line or cur:
                    cur.append(line)
    rng = random.Random(seed)
    picked = sorted(rng.sample(range(len(chunks)), min(n, len(chunks))))
    return [{"id": f"doc-{i:05d}", "text": chunks[j][1]} for i, j in enumerate(picked)]


# ----------------------------------------------------------------------------------------------- faults
def gibberish(kind: str, rng: random.Random, words: list[str]) -> str:
    if kind == "letters":  # keyboard mash in word-like chunks
        ws = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9)))
              for _ in range(rng.randint(15, 28))]
        return " ".join(" ".join(ws[i:i + 6]).capitalize() + "." for i in range(0, len(ws), 6))
    if kind == "characters":  # random printable characters
        pool = string.ascii_letters + string.digits + string.punctuation
        out = []
        while _pieces(" ".join(out)) < rng.randint(45, 80):
            out.append("".join(rng.choice(pool) for _ in range(rng.randint(2, 10))))
        return " ".join(out)
    if kind == "markup":  # scraped-page debris
        bits = ['<div class="c{}">', "</div>", "<span>", "</span>", "&nbsp;", "<br/>", "&amp;", "<td>", "</td>",
                "{{{{ item_{} }}}}", "<!-- -->", '<a href="/p?id={}">', "</a>", "&#x27;", "<li>", "</li>"]
        out = []
        while _pieces(" ".join(out)) < rng.randint(50, 85):
            b = rng.choice(bits)
            out.append(b.format(rng.randint(0, 999)) if "{" in b else b)
            if rng.random() < 0.3:
                out.append(rng.choice(words))
        return "".join(out)
    # encoding garbage: text decoded with the wrong codec, and replacement characters
    frag = ["Ã©", "â€™", "Ã¼", "Ã¶", "â€œ", "â€\x9d", "Â ", "ï»¿", "\ufffd", "Ã¨", "Ã", "Å“", "â„¢", "Ã±"]
    out = []
    while _pieces(" ".join(out)) < rng.randint(40, 70):
        w = rng.choice(words)
        cut = rng.randrange(len(w) + 1)
        out.append(w[:cut] + "".join(rng.choice(frag) for _ in range(rng.randint(1, 3))) + w[cut:])
    return " ".join(out)


def near_copy(text: str, vocab: list[str], rng: random.Random) -> str:
    """One or two words replaced, and its sentences (prose) or two of its lines (code) reordered."""
    if "\n" in text:
        lines = text.split("\n")
        i, j = rng.sample(range(len(lines)), 2)
        lines[i], lines[j] = lines[j], lines[i]
        text = "\n".join(lines)
        words = re.split(r"(\W+)", text)
        idx = [k for k, w in enumerate(words) if re.fullmatch(r"[A-Za-z_]\w*", w)]
        for k in rng.sample(idx, min(len(idx), rng.randint(1, 2))):
            words[k] = rng.choice(vocab)
        return "".join(words)
    return _near_copy(text, vocab, rng)




def contradictions(name: str, rows: list[dict], facts: list, rng: random.Random, k: int) -> list[tuple[str, str]]:
    """(text, what it contradicts) for corpora that state facts."""
    out = []
    if name == "demo":
        sentences = [s for r in rows for s in _sentences(r["text"]) if not any(re.search(p, s) for p in DEMO_FACTS)]
        stated, counts, answers = defaultdict(set), defaultdict(int), defaultdict(set)
        for r in rows:
            for j, p in enumerate(DEMO_FACTS):
                for m in re.finditer(p, r["text"]):
                    stated[(m.group(1), j)].add(m.group(2))
                    counts[(m.group(1), j, m.group(2))] += 1
                    answers[j].add(m.group(2))
        pool = sorted((s, j, a) for (s, j, a), c in counts.items() if c >= 2)
        for subject, j, answer in rng.sample(pool, k):
            wrong = rng.choice(sorted(answers[j] - stated[(subject, j)]))
            claim = DEMO_FACTS[j].replace(r"(\w+)", "{}", 2).replace("\\.", ".").format(subject, wrong)
            body = [claim, *rng.sample(sentences, 2)]
            rng.shuffle(body)
            out.append((" ".join(body), f"{subject}: {answer}, here {wrong}"))
    elif name == "templated":
        cities = sorted({c for _, _, c in facts})
        for i in rng.sample(range(len(facts)), k):
            subject, kind, city = facts[i]
            wrong = rng.choice([c for c in cities if c != city])
            year = rng.randint(1980, 2024)
            text = rows[i]["text"]
            body = [f"The {subject} {kind} was designed in {wrong} and first sold in {year}.",
                    *[s for s in _sentences(text) if not s.startswith(f"The {subject}")][:2]]
            rng.shuffle(body)
            out.append((" ".join(body), f"{subject}: {city}, here {wrong} ({rows[i]['id']})"))
    return out


def plant(name: str, rows: list[dict], facts: list, seed: int, counts: dict[str, int]) -> tuple[list[dict], dict]:
    rng = random.Random(seed + 1)
    new_id = id_maker(rng, {r["id"] for r in rows})

    words = sorted({w for r in rows for w in re.findall(r"[A-Za-z]{3,}", r["text"])})
    planted: list[dict] = []
    for j in range(counts["gibberish"]):
        kind = GIBBERISH_KINDS[j % len(GIBBERISH_KINDS)]
        planted.append({"id": new_id(), "text": gibberish(kind, rng, words), "fault": "gibberish", "kind": kind})
    for fault in ("exact_duplicate", "near_duplicate"):
        for orig in rng.sample(rows, counts[fault]):
            text = orig["text"] if fault == "exact_duplicate" else near_copy(orig["text"], words, rng)
            planted.append({"id": new_id(), "text": text, "fault": fault, "source": orig["id"]})
    for text, what in contradictions(name, rows, facts, rng, counts["contradiction"]):
        planted.append({"id": new_id(), "text": text, "fault": "contradiction", "source": what})
    out = [dict(r) for r in rows]
    faults: dict[str, list[dict]] = defaultdict(list)
    for p in planted:
        assert _pieces(p["text"]) <= MAX_PIECES + 20, p
        out.insert(rng.randrange(len(out) + 1), {"id": p["id"], "text": p["text"]})
        faults[p["fault"]].append({k: v for k, v in p.items() if k != "text"})
    return out, dict(faults)


def build(name: str, seed: int, base_docs: int = 0) -> tuple[list[dict], dict]:
    facts: list = []
    if name == "demo":
        rows = read_jsonl(DEMO)
    elif name == "templated":
        rows, facts = templated_corpus(seed=seed)
    elif name == "python":
        rows = python_corpus(seed=seed)
    elif name == "prose":
        rows = read_jsonl(PROSE)
    else:
        raise SystemExit(f"unknown corpus {name}")
    if base_docs:
        keep = set(range(min(base_docs, len(rows))))
        facts = [f for i, f in enumerate(facts) if i in keep]
        rows = rows[:base_docs]
    big = len(rows) > 800
    counts = {"gibberish": 20 if big else 16, "exact_duplicate": 10 if big else 8,
              "near_duplicate": 10 if big else 8, "contradiction": 10 if facts or name == "demo" else 0}
    return plant(name, rows, facts, seed, counts)


# ----------------------------------------------------------------------------------------------- measuring
def measure(report, faults: dict) -> dict:
    import polars as pl

    from tasks.quality.signals import ISSUE_TYPES, above_cutoff

    flagged = set(report.filter(pl.any_horizontal([pl.col(t) for t in ISSUE_TYPES]))["id"].to_list())
    by = {r["id"]: r for r in report.iter_rows(named=True)}
    rows = {}
    for fault, items in faults.items():
        found = []
        for it in items:
            i = it["id"]
            if fault in ("exact_duplicate", "near_duplicate"):
                g = by[i]["duplicate_group"]
                ok = g is not None and g == by[it["source"]]["duplicate_group"] and (
                    i in flagged or it["source"] in flagged)
            else:
                ok = i in flagged
            found.append(ok)
        row = {"n": len(items), "recall": sum(found) / max(len(items), 1),
               "flagged_by": {t: sum(bool(by[it["id"]][t]) for it in items) for t in ISSUE_TYPES}}
        if fault == "gibberish":
            row["missed"] = [it["kind"] for it, ok in zip(items, found, strict=True) if not ok]
        rows[fault] = row
    dup = [it for f in ("exact_duplicate", "near_duplicate") for it in faults.get(f, [])]
    planted = {it["id"] for items in faults.values() for it in items} | {it["source"] for it in dup}
    return {"documents": report.height, "flagged": len(flagged), "flagged_fraction": len(flagged) / report.height,
            "above_cutoff": int(above_cutoff(report).sum()),
            "flagged_per_issue": {t: int(report[t].sum()) for t in ISSUE_TYPES},
            "flagged_not_planted": len(flagged - planted),
            "recall": rows,
            "duplicates_recall": (sum(rows[f]["recall"] * rows[f]["n"] for f in ("exact_duplicate", "near_duplicate")
                                      if f in rows) / max(len(dup), 1))}


def _epochs(spec: str | None, name: str) -> int | None:
    """``--epochs``: one number for every corpus, or ``name=N,name=N``."""
    if not spec:
        return None
    if "=" not in spec:
        return int(spec)
    return next((int(v) for k, v in (x.split("=") for x in spec.split(",")) if k == name), None)


def run_corpus(name: str, args, log) -> dict:
    import numpy as np
    import polars as pl

    from influence_audit.demo.model import ensure_demo_model
    from influence_engine import DocumentSignals
    from influence_engine.data import encode
    from tasks.engine import EngineSpec
    from tasks.quality.signals import (
        CorpusCounts,
        QualitySettings,
        build_report,
        document_text,
        signal_frame,
    )
    from tasks.reporting import Every

    rows, faults = build(name, args.seed, args.base_docs)
    d = args.out_dir / (name + (f"-{args.base_docs}" if args.base_docs else ""))
    d.mkdir(parents=True, exist_ok=True)
    path = d / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (d / "faults.json").write_text(json.dumps(faults, indent=1))
    log(f"[{name}] {len(rows)} documents, planted " + ", ".join(f"{k} {len(v)}" for k, v in faults.items()))
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if args.model:
        model_dir, model_label = Path(args.model), f"{Path(args.model).name} (layers {args.layers})"
    else:
        epochs = _epochs(args.epochs, name)
        model_dir = ensure_demo_model(d / "model", path, seed=args.seed, epochs=epochs, log=log)
        model_label = f"toy GPT-2 (demo recipe, {epochs or 30} epochs)"
    seconds["train_model"] = time.perf_counter() - t0
    eng_path = d / f"engine-{model_dir.name}.parquet"  # the engine's part, cached: text signals are cheap
    settings = QualitySettings() if args.max_flagged is None else QualitySettings(max_flagged=args.max_flagged)
    spec = EngineSpec(str(model_dir), args.layers, "cpu", "fp32", 8, args.max_length, args.seed)
    if eng_path.exists() and not args.recompute:
        cached = pl.read_parquet(eng_path)
        engine_signals = [DocumentSignals(r["id"], r["self_influence"], r["loss"], r["n_targets"], [],
                                          np.zeros(0), np.zeros(0)) for r in cached.iter_rows(named=True)]
        tok = spec.tokenizer()
        docs = encode(tok, rows, max_length=args.max_length, on_long="truncate", where="train")
        vocab = len(tok)
        log(f"[{name}] engine signals reused from {eng_path}")
    else:
        t0 = time.perf_counter()
        eng = spec.engine()
        docs = eng.encode(rows, where="train")
        factors = eng.fit_factors(docs, "ekfac")
        seconds["fit_factors"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        progress = Every(lambda s: log(f"[{name}] {s}"), "quality pass", len(docs))
        engine_signals = eng.document_signals(docs, factors, progress)
        seconds["quality_pass"] = time.perf_counter() - t0
        vocab = eng.model.get_input_embeddings().num_embeddings
        pl.DataFrame({"id": [x.id for x in engine_signals],
                      "self_influence": [x.self_influence for x in engine_signals],
                      "loss": [x.loss for x in engine_signals],
                      "n_targets": [x.n_targets for x in engine_signals]}).write_parquet(eng_path)
    t0 = time.perf_counter()
    counts = CorpusCounts.of(docs, [document_text(r) for r in rows], vocab, settings)
    signals = signal_frame(engine_signals, rows, docs, counts, settings)
    seconds["text_signals"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = build_report(signals, settings)
    seconds["report"] = time.perf_counter() - t0
    report.write_parquet(d / f"report-{model_dir.name}.parquet")
    out = {"corpus": name, "model": model_label, "role": "tuning" if name == "demo" else "held out",
           **measure(report, faults), "seconds": seconds}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", nargs="+", default=["demo", "templated", "python", "prose"])
    ap.add_argument("--model", default=None, help="a model directory to audit instead of training the toy model")
    ap.add_argument("--epochs", default=None, help="toy model epochs, N or corpus=N,corpus=N (default: the demo "
                                                    "recipe's 30)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--layers", default="mlp", help="tracked layers (a preset or a regular expression)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-docs", type=int, default=0, help="the first N documents of each corpus only (0: all)")
    ap.add_argument("--recompute", action="store_true", help="recompute the engine signals even if cached")
    ap.add_argument("--out-dir", type=Path, default=REPO / ".influence-audit" / "bench-quality-corpora")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--max-flagged", type=float, default=None,
                    help="the largest share of the corpus flagged (default: the CLI's)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from provenance import provenance

    torch.set_num_threads(1)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = [run_corpus(name, args, log) for name in args.corpus]
    print(f"\n{'corpus':<10} {'role':<9} {'docs':>5} {'flagged':>8} {'gibberish':>9} {'exact dup':>9} "
          f"{'near dup':>8} {'dups':>5} {'contra':>6}  flagged per issue")
    for r in results:
        rec = r["recall"]

        def f(k: str, rec: dict = rec) -> str:
            return f"{rec[k]['recall']:.2f}" if k in rec and rec[k]["n"] else "-"
        print(f"{r['corpus']:<10} {r['role']:<9} {r['documents']:>5} {r['flagged_fraction']:>8.1%} "
              f"{f('gibberish'):>9} {f('exact_duplicate'):>9} {f('near_duplicate'):>8} "
              f"{r['duplicates_recall']:>5.2f} {f('contradiction'):>6}  {r['flagged_per_issue']}")
    result = {"benchmark": "quality_corpora", "provenance": provenance(),
              "machine": f"2-core shared CPU ({os.cpu_count()} visible cores), no GPU, torch {torch.__version__}, "
                         "1 thread", "load_average": os.getloadavg(), "results": results}
    args.results.mkdir(parents=True, exist_ok=True)
    tag = f"-{args.tag}" if args.tag else ""
    out = args.results / f"quality-corpora-cpu-2core-{datetime.now(timezone.utc):%Y-%m-%d}{tag}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    main()
