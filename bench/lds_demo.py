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

from influence_audit.demo.model import (  # noqa: E402
    DEFAULT_CORPUS,
    RECIPE,
    ensure_demo_model,
    fit_demo_gpt2,
    read_jsonl,
)
from scripts import demo_corpus as make_corpus  # noqa: E402  (the generator is not part of the runtime package)

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


# ------------------------------------------------------------------------------------------------ scoring
def load_truth(work: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    model_dir = next((work / "cache").glob("demo-gpt2-*-seed0"))
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    queries = read_jsonl(work / "queries.jsonl")
    docs = read_jsonl(DEFAULT_CORPUS)
    outputs = np.load(work / "outputs.npy")
    with torch.serialization.safe_globals([np._core.multiarray._reconstruct, np.ndarray, np.dtype,
                                           type(np.dtype(bool))]):
        masks = torch.load(work / "masks.pt", weights_only=True)
    return {"model_dir": model_dir, "tokenizer": tok, "queries": queries, "docs": docs,
            "outputs": outputs, "masks": np.asarray(masks, dtype=np.float64)}


def fresh_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()


class Scorer:
    """Our engine on the audited model: factors fitted once per (strategy, layers, fisher, seed), then damping
    and query rank varied on them; all Q x N scores."""

    def __init__(self, truth: dict[str, Any], precision: str = "fp32"):
        self.truth, self.precision = truth, precision
        self._fits: dict[tuple, Any] = {}

    def fit(self, strategy: str, layers: str, fisher: str, seed: int):
        from influence_engine import InfluenceEngine

        key = (strategy, layers, fisher, seed)
        if key not in self._fits:
            t0 = time.perf_counter()
            eng = InfluenceEngine(fresh_model(self.truth["model_dir"]), self.truth["tokenizer"], layers=layers,
                                  precision=self.precision, fisher=fisher, seed=seed, max_length=128,
                                  batch_size=16, device="cpu")
            docs = eng.encode(self.truth["docs"], where="train")
            qs = eng.encode(self.truth["queries"], where="queries")
            cached = strategy in ("kfac", "ekfac")
            fitted = eng.fit_factors(docs, strategy, cache=cached)
            factors, gc = fitted if cached else (fitted, None)
            self._fits[key] = (eng, docs, qs, factors, gc, time.perf_counter() - t0)
        return self._fits[key]

    def scores(self, strategy: str = "ekfac", layers: str = "mlp", fisher: str = "sampled", seed: int = 0,
               damping_scale: float = 0.1, rank: int = 32) -> tuple[np.ndarray, float]:
        eng, docs, qs, factors, gc, fit_s = self.fit(strategy, layers, fisher, seed)
        t0 = time.perf_counter()
        base = dict(factors.damping)
        if strategy != "identity":
            factors.damping = {n: v * damping_scale / 0.1 for n, v in base.items()}
        try:
            prepared = eng.prepare_queries(qs, factors, rank=rank)
            res = eng.score(docs, prepared, top_k=0, return_all=True, cache=gc)
        finally:
            factors.damping = base
        return np.asarray(res.all_scores), fit_s + time.perf_counter() - t0


def kron_scores(truth: dict[str, Any], layers: str, rank: int | None, seed: int = 0, *, empirical: bool = False,
                damping: str = "auto") -> tuple[np.ndarray, float]:
    """kronfluence 1.0.1's EK-FAC on the same model (Conv1D converted to Linear), documents and queries; labels
    sampled by kronfluence itself (``empirical``: the data's labels, its ``use_empirical_fisher``); its default
    damping (0.1 x mean eigenvalue; ``damping`` ``auto:X``: X x the mean eigenvalue, through its heuristic's
    scale; a number: that absolute damping)."""
    import logging
    import tempfile

    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_kronfluence import conv1d_to_linear

    tok = truth["tokenizer"]
    model = conv1d_to_linear(fresh_model(truth["model_dir"]))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    tracked = [n for n in names if ".mlp." in n] if layers == "mlp" else names  # "all": every Linear, head too

    def rows(items: list[dict[str, str]], query: bool) -> torch.utils.data.TensorDataset:
        seqs, labels = [], []
        for it in items:
            if query:
                p, c = tok(it["prompt"])["input_ids"], tok(it["completion"], add_special_tokens=False)["input_ids"]
                ids, start = p + c, len(p)
            else:
                ids, start = tok(it["text"])["input_ids"], 1
            seqs.append(ids)
            labels.append([-100] * start + ids[start:])
        width = max(len(x) for x in seqs)
        x = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
        y = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
        return torch.utils.data.TensorDataset(x, y)

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(input_ids=x).logits[:, :-1].float()
            flat = logits.reshape(-1, logits.size(-1))
            target = y[:, 1:].reshape(-1)
            keep = target != -100
            flat, target = flat[keep], target[keep]
            if sample:
                with torch.no_grad():
                    target = torch.distributions.Categorical(logits=flat.detach()).sample()
            return F.cross_entropy(flat, target, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return tracked

    import kronfluence.factor.config as kconfig

    from influence_engine.settings import damping_rule

    rule, value = damping_rule(damping)
    kconfig.HEURISTIC_DAMPING_SCALE = value if rule == "relative" else 0.1
    damping_factor = None if rule == "relative" else value
    task = LMTask()
    model = prepare_model(model, task)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        an = Analyzer(analysis_name="lds", model=model, task=task, output_dir=tmp, cpu=True, disable_tqdm=True,
                      log_level=logging.WARNING)
        torch.manual_seed(seed)
        an.fit_all_factors(factors_name="f", dataset=rows(truth["docs"], False), per_device_batch_size=16,
                           factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=empirical),
                           overwrite_output_dir=True)
        an.compute_pairwise_scores(scores_name="s", factors_name="f", query_dataset=rows(truth["queries"], True),
                                   train_dataset=rows(truth["docs"], False), per_device_query_batch_size=32,
                                   per_device_train_batch_size=16,
                                   score_args=ScoreArguments(damping_factor=damping_factor,
                                                             query_gradient_low_rank=rank),
                                   overwrite_output_dir=True)
        scores = an.load_pairwise_scores("s")["all_modules"].double().cpu().numpy()
    kconfig.HEURISTIC_DAMPING_SCALE = 0.1
    return scores, time.perf_counter() - t0


def run_scores(args: argparse.Namespace) -> None:
    from influence_engine.evaluation import lds, paired_difference

    torch.set_num_threads(1)
    work = Path(args.work)
    truth = load_truth(work)
    M, Y = truth["masks"], truth["outputs"]
    demo_q = np.array([not q["id"].startswith("f-") for q in truth["queries"]])
    scorer = Scorer(truth)
    _, docs0, *_ = scorer.fit("ekfac", "mlp", "sampled", 0)
    n_targets = np.array([d.n_targets for d in docs0], dtype=np.float64)
    rows: list[dict[str, Any]] = []
    per_query: dict[str, np.ndarray] = {}

    def record(name: str, S: np.ndarray, seconds: float, **settings: Any) -> None:
        res = lds(S, M, Y)
        demo = lds(S[demo_q], M, Y[:, demo_q])
        per_query[name] = res.per_query
        row = {"name": name, **settings, "lds": res.mean, "lds_ci": [res.ci_low, res.ci_high],
               "lds_demo_queries": demo.mean, "lds_demo_queries_ci": [demo.ci_low, demo.ci_high], "seconds": seconds}
        if n_targets is not None:  # per-token: each document's score over its number of targets
            tok = lds(S / n_targets[None, :], M, Y)
            row["lds_per_token"], row["lds_per_token_ci"] = tok.mean, [tok.ci_low, tok.ci_high]
        rows.append(row)
        _log(f"{name:38s} LDS {res.mean:.3f} [{res.ci_low:.3f}, {res.ci_high:.3f}]  demo queries {demo.mean:.3f}"
             + (f"  per-token {row['lds_per_token']:.3f}" if "lds_per_token" in row else "") + f" ({seconds:.1f} s)")

    grid: list[tuple[str, dict[str, Any]]] = [("default (ekfac, mlp, rank 32)", {})]
    grid += [(f"strategy {s}", {"strategy": s}) for s in ("identity", "diagonal", "kfac")]
    grid += [(f"layers {lay}", {"layers": lay}) for lay in ("attention", "all", "mlp|lm_head", ".")]
    grid += [(f"damping {d} x mean eigenvalue", {"damping_scale": d}) for d in (0.001, 0.01, 1.0)]
    grid += [("fisher empirical", {"fisher": "empirical"})]
    grid += [(f"query rank {r}", {"rank": r}) for r in (0, 8, 64)]
    grid += [(f"seed {s}", {"seed": s}) for s in (1, 2)]
    grid += [(f"damping {d} x mean eigenvalue", {"damping_scale": d}) for d in (1e-4, 1e-5)]
    grid += [("all layers + head, rank 0", {"layers": ".", "rank": 0}),
             ("all layers + head, damping 0.01", {"layers": ".", "damping_scale": 0.01}),
             ("all layers + head, damping 0.001", {"layers": ".", "damping_scale": 0.001}),
             ("mlp + head, damping 0.001", {"layers": "mlp|lm_head", "damping_scale": 0.001}),
             ("all (no head), damping 0.001", {"layers": "all", "damping_scale": 0.001}),
             ("fisher empirical, damping 0.001", {"fisher": "empirical", "damping_scale": 0.001}),
             ("all layers + head, fisher empirical, damping 0.001",
              {"layers": ".", "fisher": "empirical", "damping_scale": 0.001}),
             ("mlp, damping 0.01, rank 0", {"damping_scale": 0.01, "rank": 0}),
             ("mlp, damping 0.001, seed 1", {"damping_scale": 0.001, "seed": 1})]
    for name, kw in grid:
        if args.only and not any(o in name for o in args.only):
            continue
        S, sec = scorer.scores(**kw)
        record(name, S, sec, **kw)
    kron = []
    try:
        import kronfluence  # noqa: F401
    except ImportError:
        _log("kronfluence is not installed: its rows are skipped")
    else:
        for layers, rank in (("mlp", None), ("mlp", 32), ("all", None)):
            if args.only and "kron" not in args.only:
                continue
            S, sec = kron_scores(truth, layers, rank)
            record(f"kronfluence ekfac {layers} rank {rank or 0}", S, sec, tool="kronfluence", layers=layers,
                   rank=rank or 0)
            kron.append(rows[-1]["name"])
    for key, ref in (("minus_default", "default (ekfac, mlp, rank 32)"),
                     ("minus_kronfluence_mlp", "kronfluence ekfac mlp rank 0"),
                     ("minus_kronfluence_all", "kronfluence ekfac all rank 0")):
        if ref in per_query:
            for r in rows:
                if r["name"] != ref:
                    r[key] = list(paired_difference(per_query[r["name"]], per_query[ref]))
    np.savez(work / "lds_per_query.npz", **{k.replace(" ", "_"): v for k, v in per_query.items()})
    out = {"bench": "lds_demo", "commit": git_commit(), "machine": machine(),
           "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "ground_truth": {"subsets": int(M.shape[0]), "documents": int(M.shape[1]), "alpha": float(M.mean()),
                            "queries": int(Y.shape[1]), "demo_queries": int(demo_q.sum()),
                            "measure": "log p(completion | prompt), summed", "retrain": "demo recipe, init seed 0"},
           "rows": rows}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=float) + "\n")
    _log(f"wrote {path}")


def run_checks(args: argparse.Namespace) -> None:
    """Which counterfactual check agrees with retraining? For the demo queries, per-query Spearman over a set of
    documents (each query's top candidates and random ones) between a check's delta and the retraining
    ground truth's effect of keeping the document (mean output of subsets with it minus without it); and the LDS
    of the tail-patch deltas used as attributions over every document."""
    from influence_engine.evaluation import bootstrap_mean, lds, spearman_rows
    from influence_engine.verify import Verifier, VerifySettings

    torch.set_num_threads(1)
    work = Path(args.work)
    truth = load_truth(work)
    M, Y = truth["masks"], truth["outputs"]
    kept = M.astype(bool)
    effect = np.stack([Y[kept[:, d]].mean(0) - Y[~kept[:, d]].mean(0) for d in range(M.shape[1])], axis=1)  # Q x N
    scorer = Scorer(truth)
    S, _ = scorer.scores()
    eng, docs, qs, *_ = scorer.fit("ekfac", "mlp", "sampled", 0)
    demo = [i for i, q in enumerate(truth["queries"]) if not q["id"].startswith("f-")]
    rng = np.random.default_rng(1)
    chosen = sorted({int(j) for i in demo for j in np.argsort(-S[i])[: args.top]} |
                    {int(j) for j in rng.choice(len(docs), args.random, replace=False)})
    sample = [docs[int(j)] for j in rng.choice(len(docs), 32, replace=False)]
    qd = [qs[i] for i in demo]
    _log(f"checks: {len(chosen)} documents x {len(qd)} demo queries")
    rows: dict[str, Any] = {}
    saved: dict[str, np.ndarray] = {}

    def agree(name: str, up: np.ndarray, down: np.ndarray | None, seconds: float, extra: dict | None = None) -> None:
        e = effect[np.ix_(demo, chosen)].T  # D x Q
        rho = spearman_rows(up, e)
        m, lo, hi = bootstrap_mean(rho)
        # LDS restricted to the checked documents: predict each subset's output from the checked documents it kept
        # (the others add the same noise for every method)
        r = lds(up.T, M[:, chosen], Y[:, demo])
        row = {"spearman_with_retraining": [m, lo, hi], "restricted_lds": [r.mean, r.ci_low, r.ci_high],
               "seconds": seconds} | (extra or {})
        saved[name] = up
        if down is not None:
            sym = spearman_rows((up - down) / 2, e)
            row["spearman_symmetric"] = list(bootstrap_mean(sym))
            row["up_down_opposite_fraction"] = float(np.mean(np.sign(up) == -np.sign(down)))
        rows[name] = row
        _log(f"{name:34s} Spearman with retraining {m:.3f} [{lo:.3f}, {hi:.3f}]; restricted LDS {r.mean:.3f} "
             f"[{r.ci_low:.3f}, {r.ci_high:.3f}] ({seconds:.0f} s)")

    agree("influence score (default)", S[np.ix_(demo, chosen)].T, None, 0.0)
    variants = [("tail-patch sgd", VerifySettings(optimizer="sgd")),
                ("tail-patch adam", VerifySettings(optimizer="adam")),
                ("tail-patch sgd, tracked layers", VerifySettings(optimizer="sgd", params="tracked")),
                ("tail-patch adam, tracked layers", VerifySettings(optimizer="adam", params="tracked")),
                ("pbrf", VerifySettings(check="pbrf", pbrf_iters=args.pbrf_iters, sample_size=args.pbrf_sample))]
    for name, st in variants:
        if args.skip_pbrf and st.check == "pbrf":
            continue
        t0 = time.perf_counter()
        d = Verifier(eng.model, device="cpu", pad_id=eng.pad_id, tracked=eng.tracked, settings=st).run(
            [docs[j] for j in chosen], qd, train_sample=sample, n_train=len(docs))
        agree(name, d.up, d.down, time.perf_counter() - t0, {"settings": d.settings})
    # tail-patch deltas of every document as attributions: their LDS beside the scores'
    lds_rows = {}
    for name, st in (("tail-patch sgd", VerifySettings(optimizer="sgd")),
                     ("tail-patch adam", VerifySettings(optimizer="adam"))):
        if not args.lds_all:
            break
        t0 = time.perf_counter()
        d = Verifier(eng.model, device="cpu", pad_id=eng.pad_id, tracked=eng.tracked, settings=st).run(
            docs, qd, train_sample=sample, n_train=len(docs))
        for label, A in (("up", d.up.T), ("symmetric", (d.up - d.down).T / 2)):
            r = lds(A, M, Y[:, demo])  # the 24 demo queries (the default scores reach 0.505 on them)
            lds_rows[f"{name} ({label})"] = {"lds": r.mean, "lds_ci": [r.ci_low, r.ci_high],
                                             "seconds": time.perf_counter() - t0}
            _log(f"LDS of {name} deltas ({label}): {r.mean:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]")
    np.savez(work / "check_deltas.npz", chosen=np.array(chosen), **{k.replace(" ", "_"): v for k, v in saved.items()})
    out = {"bench": "lds_demo checks", "commit": git_commit(), "machine": machine(),
           "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "documents": len(chosen), "queries": len(qd), "subsets": int(M.shape[0]),
           "agreement": rows, "lds_of_deltas": lds_rows}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=float) + "\n")
    _log(f"wrote {path}")


def print_table(args: argparse.Namespace) -> None:
    """The score results as a markdown table (for docs/method.md)."""
    d = json.loads(Path(args.json).read_text())

    def kron(r: dict[str, Any]) -> str:
        if r.get("tool") == "kronfluence":
            return "-"
        lay = r.get("layers", "mlp")
        key = "minus_kronfluence_mlp" if lay == "mlp" else "minus_kronfluence_all" if lay == "." else None
        v = r.get(key) if key else None
        return f"{v[0]:+.3f} ({v[1]:+.3f}, {v[2]:+.3f})" if v else "-"
    print("| setting | LDS (95% CI) | minus default (95% CI) | minus kronfluence, same layers (95% CI) "
          "| 24 demo queries | per-token |")
    print("|---|---|---|---|---|---|")
    for r in d["rows"]:
        diff = r.get("minus_default")
        print(f"| {r['name']} | {r['lds']:.3f} ({r['lds_ci'][0]:.3f}, {r['lds_ci'][1]:.3f}) | "
              + (f"{diff[0]:+.3f} ({diff[1]:+.3f}, {diff[2]:+.3f})" if diff else "-") + " | "
              + kron(r) + f" | {r['lds_demo_queries']:.3f} | {r.get('lds_per_token', float('nan')):.3f} |")


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
    sc = sub.add_parser("score", help="LDS of every configuration (and kronfluence's, when installed)")
    sc.add_argument("--work", default=str(WORK))
    sc.add_argument("--out", default=str(ROOT / "bench" / "results" / "lds-demo.json"))
    sc.add_argument("--only", nargs="*", help="run only the rows whose name contains one of these")
    ck = sub.add_parser("checks", help="agreement of the counterfactual checks with retraining")
    ck.add_argument("--work", default=str(WORK))
    ck.add_argument("--out", default=str(ROOT / "bench" / "results" / "lds-demo-checks.json"))
    ck.add_argument("--top", type=int, default=5, help="top candidates per demo query")
    ck.add_argument("--random", type=int, default=20, help="random documents")
    ck.add_argument("--pbrf-iters", type=int, default=30)
    ck.add_argument("--pbrf-sample", type=int, default=16)
    ck.add_argument("--skip-pbrf", action="store_true")
    ck.add_argument("--lds-all", action="store_true",
                    help="also the LDS of tail-patch deltas over every document (demo queries)")
    tb = sub.add_parser("table", help="print a score results file as a markdown table")
    tb.add_argument("json")
    args = ap.parse_args(argv)
    if args.phase == "truth":
        build_truth(args)
    elif args.phase == "score":
        run_scores(args)
    elif args.phase == "checks":
        run_checks(args)
    elif args.phase == "table":
        print_table(args)


if __name__ == "__main__":
    main()
