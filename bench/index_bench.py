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

    nice -n 10 python bench/index_bench.py --sizes 10000,40000,160000 --out bench/results/index-cpu.json
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
from influence_engine.index import GradientIndex, parse_sketch
from tasks.influence.index import QueryTimes, search_and_refine


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


def build(eng: InfluenceEngine, docs: list[Example], factors, sketch: str, root: Path, part_size: int):
    d = root / f"index-{sketch}"
    shutil.rmtree(d, ignore_errors=True)
    index = GradientIndex.create(d, eng, factors, sketch=parse_sketch(sketch), sketch_seed=0, dtype="fp16")
    t0, c0 = time.perf_counter(), time.process_time()
    for i, s in enumerate(range(0, len(docs), part_size)):
        index.build_part(f"part-{i:05d}", eng, docs[s:s + part_size], factors)
    return index, time.perf_counter() - t0, time.process_time() - c0


def all_index_scores(index: GradientIndex, qv: torch.Tensor) -> np.ndarray:
    out = [torch.from_numpy(np.array(index.rows(p.name))).float() @ qv.float().T for p in index.parts()]
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"machine": machine(), "command": " ".join(["python", "bench/index_bench.py",
                                                                          *args.argv]),
                              "config": {k: v for k, v in vars(args).items() if k != "argv"}, "sizes": []}
    m = model(args.dim, args.layers, args.vocab)
    eng = InfluenceEngine(m, None, layers="mlp", device="cpu", precision="fp32", batch_size=args.batch_size)
    queries = examples(args.queries, args.query_seq, args.vocab, seed=10_000, prefix="q", prompt=args.query_seq // 2)
    root = Path(tempfile.mkdtemp(prefix="index_bench_", dir=args.workdir))

    def save() -> None:
        result["machine"]["load_average_end"] = os.getloadavg()
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))

    try:
        for i, n in enumerate(args.sizes):
            docs, planted = plant(examples(n, args.seq, args.vocab, seed=1, prefix="d"), queries, args.planted, seed=2)
            by_id = {e.id: e for e in docs}
            doc_ids = [e.id for e in docs]
            row: dict[str, Any] = {"documents": n, "tokens": n * args.seq, "load_average": os.getloadavg()}
            t0, c0 = time.perf_counter(), time.process_time()
            factors = eng.fit_factors(docs[:args.factor_docs] if args.factor_docs else docs, "ekfac")
            row["fit_factors_s"], row["fit_factors_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
            print(f"[{n}] factors in {row['fit_factors_s']:.1f} s", flush=True)

            t0, c0 = time.perf_counter(), time.process_time()
            # a streaming top 100, as an audit rescans (top_k=0 would keep every pair in the streaming top-k, whose
            # merge then grows with N per batch); return_all keeps the exact scores for the agreement figures
            exact = eng.score(docs, eng.prepare_queries(queries, factors, rank=0), top_k=100,
                              return_all=True).all_scores
            row["rescan_s"], row["rescan_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
            print(f"[{n}] rescan (exact, rank 0) in {row['rescan_s']:.1f} s", flush=True)

            row["sketches"] = {}
            for sketch in (args.sketches if i == 0 else args.sketch):
                index, build_s, build_cpu_s = build(eng, docs, factors, sketch, root, args.part_size)
                info: dict[str, Any] = {"build_s": build_s, "build_cpu_s": build_cpu_s, "bytes": index.nbytes(),
                                        "bytes_per_document": index.nbytes() / n, "width": index.width}
                qv = index.query_vectors(eng, queries, factors)
                times = QueryTimes()
                t0, c0 = time.perf_counter(), time.process_time()
                frame = search_and_refine(eng, index, factors, queries, top_k=10, refine=args.refine,
                                          docs_for=lambda ids, m=by_id: [m[d] for d in sorted(ids)], times=times)
                info["query_s"], info["query_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
                info |= {"query_gradients_s": times.queries, "search_s": times.search, "refine_s": times.refine,
                         "refined_documents": times.refined_docs, "refine": args.refine}
                refined = {q: frame.filter(frame["query_id"] == q).sort("rank")["train_id"].to_list()
                           for q in [e.id for e in queries]}
                t0 = time.perf_counter()
                search_and_refine(eng, index, factors, queries, top_k=10, refine=0)
                info["query_no_refine_s"] = time.perf_counter() - t0
                info["speedup_vs_rescan"] = row["rescan_s"] / info["query_s"]
                info["speedup_vs_rescan_cpu"] = row["rescan_cpu_s"] / info["query_cpu_s"]
                info["agreement"] = agreement(index, qv, exact, doc_ids, refined, [e.id for e in queries])
                if planted:
                    top_exact = {e.id: [doc_ids[j] for j in np.argsort(-exact[k])[:10]]
                                 for k, e in enumerate(queries)}
                    info["planted_recall_at_10"] = {
                        "exact": float(np.mean([overlap(top_exact[q], planted[q]) for q in planted])),
                        "index_refined": float(np.mean([overlap(refined[q], planted[q]) for q in planted]))}
                row["sketches"][sketch] = info
                print(f"[{n}] sketch {sketch}: build {build_s:.1f} s, {info['bytes_per_document']:.0f} B/doc, "
                      f"query {info['query_s']:.2f} s ({info['speedup_vs_rescan']:.1f}x wall, "
                      f"{info['speedup_vs_rescan_cpu']:.1f}x CPU), "
                      + json.dumps(info["agreement"] | info.get("planted_recall_at_10", {})), flush=True)
                shutil.rmtree(index.directory, ignore_errors=True)
                save()
            result["sizes"].append(row)
            save()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["complete"] = True
    save()
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,40000,160000")
    p.add_argument("--sketch", default="16x16,32x32", help="the sketches measured at every size")
    p.add_argument("--sketches", default="8x8,16x16,32x32,64x64", help="sketch sizes compared at the first size")
    p.add_argument("--refine", type=int, default=100)
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
