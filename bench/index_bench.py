"""The gradient index against rescanning: build time, bytes per document, new-query time, agreement.

For each corpus size (random tokens, a tiny random GPT-2, MLP layers, fp32, EK-FAC):

1. fit factors (covariance and eigenvalue-correction passes, timed but not part of either side);
2. build the index (one pass; per sketch size at the first corpus size, the main sketch at every size);
3. 32 new queries by **rescanning**: prepare the queries (exact, rank 0) and score every document (a pass,
   streaming top 100); these are also the exact scores the index is compared with;
4. the same 32 queries by the **index**: their gradients, an exact blocked top-k search of the memory-mapped
   index, and ``--refine`` (the top M per query re-scored exactly by a pass over those documents alone).

The model is loaded once and documents are tokenised up front (process start excluded on both sides).
Agreement: per-query Spearman correlation between the index's scores and the exact ones over all documents,
and top-10 overlap with the exact top 10, with and without refinement.

``--corpus demo`` / ``--corpus heldout`` measure a real corpus instead of random tokens, with the user-facing
factor defaults (EK-FAC, empirical Fisher, damping auto:0.0001, MLP layers): the demo's 390 documents and 24
queries with the trained demo GPT-2, or ``bench/data/index_heldout`` (1,200 documents of varied prose, 24
queries; ``bench/index_corpus.py``) with the same recipe trained on it (20 epochs; both models cached under
``--model-cache``). Each sketch is built with its build-time probe recall (8 training documents as probes), and
refinement reports the documents it re-scored with the residual bound's pruning and without it.
``--repeat N`` times every query N times and keeps the median.

    nice -n 10 python bench/index_bench.py --sizes 10000,40000,160000 --out bench/results/index-cpu.json
    nice -n 10 python bench/index_bench.py --corpus heldout --sketches 16x16,eigen:32x32,pca:32x32
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from scipy.stats import spearmanr
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import commit  # noqa: E402

from influence_engine import Example, InfluenceEngine
from influence_engine.index import GradientIndex
from tasks.influence.index import IndexOptions, QueryTimes, open_index, search_and_refine

DEFAULT_DAMPING, DEFAULT_FISHER = "auto:0.0001", "empirical"  # tasks/options.py's user-facing defaults


def model(dim: int, layers: int, vocab: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=dim, n_layer=layers, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def examples(n: int, seq: int, vocab: int, seed: int, prefix: str, prompt: int = 0) -> list[Example]:
    x = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))
    return [Example(f"{prefix}{i:07d}", tuple(r.tolist()), max(1, prompt), seq) for i, r in enumerate(x)]


def plant(docs: list[Example], queries: list[Example], per_query: int,
          seed: int) -> tuple[list[Example], dict[str, list[str]]]:
    """Copy each query's tokens (prompt and completion) into ``per_query`` random documents at a random place:
    documents that teach the query's completion, as an audit looks for. Without them (``per_query`` 0) no
    document stands out and the exact top 10 is a near-tie among thousands."""
    if not per_query:
        return docs, {}
    g = np.random.default_rng(seed)
    docs = list(docs)
    picks = g.choice(len(docs), size=(len(queries), per_query), replace=False)
    for q, row in zip(queries, picks, strict=True):
        for j in row:
            toks = list(docs[j].input_ids)
            at = int(g.integers(0, max(1, len(toks) - len(q.input_ids) + 1)))
            toks[at:at + len(q.input_ids)] = q.input_ids
            docs[j] = Example(docs[j].id, tuple(toks[:len(docs[j].input_ids)]), 1, len(docs[j].input_ids))
    return docs, {q.id: [docs[j].id for j in row] for q, row in zip(queries, picks, strict=True)}


def machine() -> dict[str, Any]:
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_start": os.getloadavg(), "python": platform.python_version(),
            "platform": platform.platform(), "torch": torch.__version__, "transformers": transformers.__version__,
            "machine": "2-core shared CPU (other sessions running)"}


def overlap(a: list[str], b: list[str]) -> float:
    return len(set(a) & set(b)) / max(len(b), 1)


def build(eng: InfluenceEngine, docs: list[Example], factors, sketch: str, root: Path, part_size: int,
          probes: int = 8, sample_docs: int = 1000):
    """The index as ``index build`` makes it (sketch fitted on a sample for pca, probes scored alongside)."""
    d = root / f"index-{sketch.replace(':', '-')}"
    shutil.rmtree(d, ignore_errors=True)
    t0, c0 = time.perf_counter(), time.process_time()
    index = open_index(d, eng, factors, IndexOptions(sketch=sketch, dtype="fp16", probes=probes,
                                                     sample_docs=sample_docs), docs=docs)
    for i, s in enumerate(range(0, len(docs), part_size)):
        index.build_part(f"part-{i:05d}", eng, docs[s:s + part_size], factors)
    index.probe_recall()
    return index, time.perf_counter() - t0, time.process_time() - c0


def all_index_scores(index: GradientIndex, qv: torch.Tensor) -> np.ndarray:
    out = [index.scores(torch.from_numpy(np.array(index.rows(p.name))).float(), qv.float()) for p in index.parts()]
    return torch.cat(out).T.double().numpy()


def agreement(index: GradientIndex, qv: torch.Tensor, exact: np.ndarray, doc_ids: list[str],
              refined: dict[str, list[str]] | None, query_ids: list[str]) -> dict[str, float]:
    approx = all_index_scores(index, qv)
    rho = [float(spearmanr(approx[q], exact[q]).statistic) for q in range(len(exact))]
    top_exact = [[doc_ids[j] for j in np.argsort(-exact[q])[:10]] for q in range(len(exact))]
    top_index = [[doc_ids[j] for j in np.argsort(-approx[q])[:10]] for q in range(len(exact))]
    out = {"spearman_mean": float(np.mean(rho)), "spearman_min": float(np.min(rho)),
           "top10_overlap_index": float(np.mean([overlap(a, b) for a, b in zip(top_index, top_exact, strict=True)]))}
    if refined is not None:
        out["top10_overlap_refined"] = float(np.mean([overlap(refined[q], top_exact[i])
                                                      for i, q in enumerate(query_ids)]))
    return out


def median_time(fn, repeat: int) -> tuple[float, float, Any]:
    """Median wall and CPU seconds of ``repeat`` calls of ``fn`` (and its last result)."""
    walls, cpus, out = [], [], None
    for _ in range(max(1, repeat)):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return float(np.median(walls)), float(np.median(cpus)), out


def measure_sketch(args, eng, docs, queries, factors, sketch, root, exact, rescan_s, rescan_cpu_s,
                   planted) -> dict[str, Any]:
    by_id = {e.id: e for e in docs}
    doc_ids = [e.id for e in docs]
    n = len(docs)
    index, build_s, build_cpu_s = build(eng, docs, factors, sketch, root, args.part_size, args.probes,
                                        args.sample_docs)
    info: dict[str, Any] = {"build_s": build_s, "build_cpu_s": build_cpu_s, "bytes": index.nbytes(),
                            "bytes_per_document": index.nbytes() / n, "width": index.width,
                            "probe_recall": index.meta.get("probe_recall")}
    qv = index.query_vectors(eng, queries, factors)
    out: dict[str, Any] = {}
    for prune in (True, False):
        times = QueryTimes()

        def one(times=times, prune=prune):
            return search_and_refine(eng, index, factors, queries, top_k=10, refine=args.refine,
                                     docs_for=lambda ids, m=by_id: [m[d] for d in sorted(ids)], times=times,
                                     prune=prune)
        wall, cpu, frame = median_time(one, args.repeat)
        refined = {q: frame.filter(frame["query_id"] == q).sort("rank")["train_id"].to_list()
                   for q in [e.id for e in queries]}
        out[prune] = refined
        key = "" if prune else "_no_prune"
        info |= {f"query_s{key}": wall, f"query_cpu_s{key}": cpu, f"refined_documents{key}": times.refined_docs,
                 f"refine_s{key}": times.refine}
        if prune:
            info |= {"query_gradients_s": times.queries, "search_s": times.search, "candidates": times.candidates,
                     "certified_queries": times.certified, "refine": args.refine}
    info["pruned_equals_unpruned"] = out[True] == out[False]
    if args.search_docs:
        info["search_scale"] = search_scale(index, qv, args.search_docs, args.repeat, root)
        info["model_160k"] = extrapolate(info, getattr(args, "rescan_score_s", rescan_s), n, len(queries),
                                         args.refine, 160_000)
    wall, _, _ = median_time(lambda: search_and_refine(eng, index, factors, queries, top_k=10, refine=0), args.repeat)
    info["query_no_refine_s"] = wall
    info["speedup_vs_rescan"] = rescan_s / info["query_s"]
    info["speedup_vs_rescan_cpu"] = rescan_cpu_s / info["query_cpu_s"]
    info["agreement"] = agreement(index, qv, exact, doc_ids, out[True], [e.id for e in queries])
    if planted:
        top_exact = {e.id: [doc_ids[j] for j in np.argsort(-exact[k])[:10]] for k, e in enumerate(queries)}
        def recall(found: list[str], culprits: list[str]) -> float:
            return len(set(found) & set(culprits)) / min(10, len(culprits))
        info["planted_recall_at_10"] = {
            "exact": float(np.mean([recall(top_exact[q], planted[q]) for q in planted if q in top_exact])),
            "index_refined": float(np.mean([recall(out[True][q], planted[q]) for q in planted if q in out[True]]))}
    print(f"[{n}] sketch {sketch}: build {build_s:.1f} s, {info['bytes_per_document']:.0f} B/doc, "
          f"query {info['query_s']:.2f} s ({info['speedup_vs_rescan']:.1f}x wall, "
          f"{info['speedup_vs_rescan_cpu']:.1f}x CPU), refined {info['refined_documents']} of "
          f"{info['candidates']} candidates ({info['refined_documents_no_prune']} unpruned), "
          f"probe recall {json.dumps(info['probe_recall'])}, "
          + json.dumps(info["agreement"] | info.get("planted_recall_at_10", {})), flush=True)
    shutil.rmtree(index.directory, ignore_errors=True)
    return info


def search_scale(index: GradientIndex, qv: torch.Tensor, n: int, repeat: int, root: Path) -> dict[str, float]:
    """The exact search's time over ``n`` rows of this index's width (random fp16 values: the search's cost does
    not depend on them), memory-mapped like a built index: its per-document cost at a size beyond the corpus."""
    d = root / "scale"
    shutil.rmtree(d, ignore_errors=True)
    (d / "parts").mkdir(parents=True)
    (d / "index.json").write_text((index.directory / "index.json").read_text())
    mm = np.lib.format.open_memmap(d / "parts" / "x.npy", mode="w+", dtype=np.float16, shape=(n, index.width))
    g = np.random.default_rng(0)
    for s in range(0, n, 4096):
        mm[s:s + 4096] = g.standard_normal((min(4096, n - s), index.width), dtype=np.float32)
    mm.flush()
    del mm
    (d / "parts" / "x.ids.json").write_text(json.dumps([f"x{i}" for i in range(n)]))
    big = GradientIndex.open(d)
    wall, cpu, _ = median_time(lambda: big.search(qv, 101), repeat)
    shutil.rmtree(d, ignore_errors=True)
    return {"documents": n, "search_s": wall, "search_cpu_s": cpu, "search_per_document_s": wall / n}


def extrapolate(info: dict[str, Any], rescan_s: float, n: int, n_queries: int, refine: int,
                target: int) -> dict[str, Any]:
    """New-query time at ``target`` documents from measured per-document costs: rescanning is linear in N
    (``rescan_s / n`` per document); the index query is the queries' gradients (fixed), the search (per document,
    measured at ``search_scale``'s size) and the refinement (per refined document, times the most it can
    re-score: every query's ``refine`` candidates distinct)."""
    per_rescan = rescan_s / n  # the scoring pass alone: the queries' preparation (fixed) is left out
    per_search = info["search_scale"]["search_per_document_s"]
    per_refined = info["refine_s_no_prune"] / max(1, info["refined_documents_no_prune"])
    refined = min(target, n_queries * refine)
    index_s = info["query_gradients_s"] + target * per_search + refined * per_refined
    return {"documents": target, "rescan_per_document_s": per_rescan, "search_per_document_s": per_search,
            "refine_per_document_s": per_refined, "refined_documents": refined, "rescan_s": target * per_rescan,
            "index_query_s": index_s, "speedup": target * per_rescan / index_s}


def corpus_engine(args) -> tuple[InfluenceEngine, list[Example], list[Example], dict[str, list[str]]]:
    """The demo's or the held-out corpus, its trained model (cached) and the user-facing factor defaults."""
    from importlib import resources

    from influence_audit.demo.model import ensure_demo_model
    from tasks.inputs.rows import encode_frame
    from tasks.inputs.sources import read_rows

    if args.corpus == "demo":
        data, epochs = Path(str(resources.files("influence_audit.demo") / "data")), None
    else:
        data, epochs = Path(__file__).resolve().parent / "data" / "index_heldout", 20
    model_dir = ensure_demo_model(Path(args.model_cache), data / "corpus.jsonl", epochs=epochs, log=None)
    eng = InfluenceEngine.from_pretrained(model_dir, layers="mlp", device="cpu", max_length=128,
                                          batch_size=args.batch_size, fisher=DEFAULT_FISHER)
    docs = encode_frame(eng, read_rows(data / "corpus.jsonl", "train"), "train")
    queries = encode_frame(eng, read_rows(data / "queries.jsonl", "queries"), "queries")
    planted = json.loads((data / "planted.json").read_text())
    return eng, docs, queries, planted


def run_corpus(args: argparse.Namespace, result: dict[str, Any], root: Path, save) -> None:
    eng, docs, queries, planted = corpus_engine(args)
    n = len(docs)
    row: dict[str, Any] = {"corpus": args.corpus, "documents": n, "queries": len(queries),
                           "tokens": sum(len(e.input_ids) for e in docs), "load_average": os.getloadavg(),
                           "damping": DEFAULT_DAMPING, "fisher": DEFAULT_FISHER}
    settings = eng.factor_settings("ekfac", DEFAULT_DAMPING)
    t0 = time.perf_counter()
    factors = eng.fit_factors(docs, settings)
    row["fit_factors_s"] = time.perf_counter() - t0
    row["prepare_queries_s"], _, prepared = median_time(lambda: eng.prepare_queries(queries, factors, rank=0),
                                                         args.repeat)
    row["rescan_score_s"], _, res = median_time(lambda: eng.score(docs, prepared, top_k=100, return_all=True),
                                                args.repeat)
    row["rescan_s"], row["rescan_cpu_s"], res = median_time(
        lambda: eng.score(docs, eng.prepare_queries(queries, factors, rank=0), top_k=100, return_all=True),
        args.repeat)
    args.rescan_score_s = row["rescan_score_s"]
    exact = res.all_scores
    print(f"[{args.corpus} {n}] factors {row['fit_factors_s']:.1f} s, rescan {row['rescan_s']:.2f} s", flush=True)
    row["sketches"] = {}
    for sketch in args.sketches:
        row["sketches"][sketch] = measure_sketch(args, eng, docs, queries, factors, sketch, root, exact,
                                                 row["rescan_s"], row["rescan_cpu_s"], planted)
        result["sizes"] = [row]
        save()


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"machine": machine(), "command": " ".join(["python", "bench/index_bench.py",
                                                                          *args.argv]),
                              "config": {k: v for k, v in vars(args).items() if k != "argv"}, "sizes": []}
    root = Path(tempfile.mkdtemp(prefix="index_bench_", dir=args.workdir))

    def save() -> None:
        result["machine"]["load_average_end"] = os.getloadavg()
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))

    try:
        if args.corpus != "random":
            run_corpus(args, result, root, save)
        else:
            run_random(args, result, root, save)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["complete"] = True
    save()
    return result


def run_random(args: argparse.Namespace, result: dict[str, Any], root: Path, save) -> None:
    m = model(args.dim, args.layers, args.vocab)
    eng = InfluenceEngine(m, None, layers="mlp", device="cpu", precision="fp32", batch_size=args.batch_size,
                          fisher=DEFAULT_FISHER)
    queries = examples(args.queries, args.query_seq, args.vocab, seed=10_000, prefix="q", prompt=args.query_seq // 2)
    for i, n in enumerate(args.sizes):
        docs, planted = plant(examples(n, args.seq, args.vocab, seed=1, prefix="d"), queries, args.planted, seed=2)
        row: dict[str, Any] = {"documents": n, "tokens": n * args.seq, "load_average": os.getloadavg(),
                               "damping": DEFAULT_DAMPING, "fisher": DEFAULT_FISHER}
        t0, c0 = time.perf_counter(), time.process_time()
        fit_docs = docs[:args.factor_docs] if args.factor_docs else docs
        factors = eng.fit_factors(fit_docs, eng.factor_settings("ekfac", DEFAULT_DAMPING))
        row["fit_factors_s"], row["fit_factors_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        print(f"[{n}] factors in {row['fit_factors_s']:.1f} s", flush=True)
        # a streaming top 100, as an audit rescans (top_k=0 would keep every pair in the streaming top-k, whose
        # merge then grows with N per batch); return_all keeps the exact scores for the agreement figures
        row["rescan_s"], row["rescan_cpu_s"], res = median_time(
            lambda docs=docs, factors=factors: eng.score(docs, eng.prepare_queries(queries, factors, rank=0), top_k=100,
                                                         return_all=True), args.repeat)
        exact = res.all_scores
        del res
        print(f"[{n}] rescan (exact, rank 0) in {row['rescan_s']:.1f} s", flush=True)
        row["sketches"] = {}
        for sketch in (args.sketches if i == 0 else args.sketch):
            row["sketches"][sketch] = measure_sketch(args, eng, docs, queries, factors, sketch, root, exact,
                                                     row["rescan_s"], row["rescan_cpu_s"], planted)
            save()
        result["sizes"].append(row)
        save()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default="random", choices=("random", "demo", "heldout"),
                   help="random tokens at --sizes (a random tiny GPT-2), or a real corpus with its trained model")
    p.add_argument("--model-cache", default=".influence-audit/demo-model")
    p.add_argument("--sizes", default="10000,40000,160000")
    p.add_argument("--sketch", default="16x16,32x32", help="the sketches measured at every size")
    p.add_argument("--sketches", default="8x8,16x16,32x32,64x64", help="sketch sizes compared at the first size")
    p.add_argument("--refine", type=int, default=100)
    p.add_argument("--repeat", type=int, default=1, help="time each query (and the rescan) N times, keep the median")
    p.add_argument("--probes", type=int, default=8, help="training documents scored exactly at build (probe recall)")
    p.add_argument("--sample-docs", type=int, default=1000, help="documents a pca sketch is fitted on")
    p.add_argument("--search-docs", type=int, default=0,
                   help="also time the exact search over this many random rows of each sketch's width, and model the "
                        "new-query time at 160k documents from the per-document costs (0: off)")
    p.add_argument("--planted", type=int, default=0, help="documents per query holding its tokens (0: none)")
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--factor-docs", type=int, default=0,
                   help="fit factors on the first N documents only (0: all); timings of the rest do not depend on it")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--seq", type=int, default=24)
    p.add_argument("--query-seq", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--part-size", type=int, default=20000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None)
    raw = argv if argv is not None else __import__("sys").argv[1:]
    args = p.parse_args(raw)
    args.argv = raw
    args.sizes = [int(x) for x in args.sizes.split(",")]
    args.sketches = [x for x in args.sketches.split(",") if x]
    args.sketch = [x for x in args.sketch.split(",") if x]
    args.sketches += [x for x in args.sketch if x not in args.sketches]
    return run(args)


if __name__ == "__main__":
    main()
