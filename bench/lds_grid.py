"""Defaults chosen on two LDS benchmarks, and influence over checkpoints.

    python bench/lds_grid.py demo-checkpoints            # the demo model's checkpoints (its training replayed)
    nice python bench/lds_grid.py grid --out bench/results/lds-grid.json
    python bench/lds_grid.py table bench/results/lds-grid.json

Benchmarks (ground truth built first, see each script):

* ``demo``: ``bench/lds_demo.py truth`` (the demo GPT-2, 390 templated documents with planted facts, 172
  queries, 48 retrainings; work directory ``.lds-demo``);
* ``prose``: ``bench/lds_prose.py model`` and ``truth`` (a tiny Llama with a byte-level BPE tokenizer, 512
  passages of natural prose, 64 held-out queries, 48 retrainings; ground truth shipped in
  ``bench/data/lds_prose/truth``, models in ``.lds-prose``).

``grid`` computes, on each benchmark, the LDS (bootstrap interval over queries) of the engine's EK-FAC on the
MLP layers for every damping (``auto:X``: X x each layer's mean eigenvalue; absolute numbers) and Fisher
(``sampled``: labels drawn from the model, seeds 0-2; ``empirical``: the data's labels), kronfluence's EK-FAC
on the same layers with its default damping (0.1 x mean eigenvalue, as our ``auto``), each row's paired
difference to kronfluence, the agreement of rankings between Fisher seeds, CPU seconds (this process, one
thread), and the LDS of scores averaged over 1, 2 and 4 checkpoints of the audited model's training (uniform
and learning-rate weights). Results: one JSON file with the commit, machine, load and command.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from provenance import provenance  # noqa: E402

DEMO_WORK = ROOT / ".lds-demo"
PROSE_WORK = ROOT / ".lds-prose"
DAMPINGS = ("auto:0.0001", "auto:0.001", "auto:0.01", "auto", "auto:1.0", "1e-05", "0.0001", "0.001", "0.01")
DEFAULT = {"fisher": "sampled", "damping": "auto"}


def _log(msg: str) -> None:
    print(f"[{_dt.datetime.now(_dt.timezone.utc):%H:%M:%S}] {msg}", flush=True)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _load_masks(path: Path) -> np.ndarray:
    with torch.serialization.safe_globals([np._core.multiarray._reconstruct, np.ndarray, np.dtype,
                                           type(np.dtype(bool))]):
        m = torch.load(path, weights_only=True)
    return np.asarray(m, dtype=np.float64)


def _checkpoints(root: Path, final: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The saved checkpoints, the last (the end of training: the audited model itself) as ``final``, whose
    scores the grid has already computed."""
    out = [(d, json.loads((d / "checkpoint.json").read_text())) for d in sorted(root.glob("step-*"))]
    return [(final, info) if info["fraction"] == 1.0 else (d, info) for d, info in out]


def load_bench(name: str) -> dict[str, Any]:
    """Model, tokenizer, documents, queries, masks, outputs and checkpoints of one benchmark."""
    from transformers import AutoTokenizer

    if name == "demo":
        from influence_audit.demo.model import DEFAULT_CORPUS

        model_dir = next((DEMO_WORK / "cache").glob("demo-gpt2-*-seed0"))
        docs, queries = _read_jsonl(DEFAULT_CORPUS), _read_jsonl(DEMO_WORK / "queries.jsonl")
        masks, outputs = _load_masks(DEMO_WORK / "masks.pt"), np.load(DEMO_WORK / "outputs.npy")
        ckpt_root, max_length = DEMO_WORK / "checkpoints", 128
    elif name == "prose":
        data = ROOT / "bench" / "data" / "lds_prose"
        model_dir = PROSE_WORK / "base"
        docs, queries = _read_jsonl(data / "corpus.jsonl"), _read_jsonl(data / "queries.jsonl")
        masks, outputs = _load_masks(data / "truth" / "masks.pt"), np.load(data / "truth" / "outputs.npy")
        ckpt_root, max_length = PROSE_WORK / "checkpoints", 256
    else:
        raise SystemExit(f"unknown benchmark {name!r}")
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return {"name": name, "model_dir": model_dir, "tokenizer": tok, "docs": docs, "queries": queries,
            "masks": masks, "outputs": outputs, "checkpoints": _checkpoints(ckpt_root, model_dir),
            "max_length": max_length}


# ------------------------------------------------------------------------------------------------ ours
class Fits:
    """The engine's factors per (model, Fisher, seed), fitted once with the one-pass gradient cache; damping
    and query rank varied on them. Times are CPU seconds of this (one-thread) process."""

    def __init__(self, bench: dict[str, Any]):
        self.bench = bench
        self._fits: dict[tuple, Any] = {}  # the latest fit only: a gradient cache is ~1.5 GB on the demo
        self._scores: dict[tuple, tuple[np.ndarray, float, float]] = {}

    def fit(self, model_dir: Path, fisher: str, seed: int = 0):
        from transformers import AutoModelForCausalLM

        from influence_engine import InfluenceEngine

        key = (str(model_dir), fisher, seed)
        if key not in self._fits:
            self._fits.clear()
            c0 = time.process_time()
            model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
            eng = InfluenceEngine(model, self.bench["tokenizer"], layers="mlp", precision="fp32", fisher=fisher,
                                  seed=seed, max_length=self.bench["max_length"], batch_size=16, device="cpu")
            docs = eng.encode(self.bench["docs"], where="train")
            qs = eng.encode(self.bench["queries"], where="queries")
            factors, gc = eng.fit_factors(docs, "ekfac", cache=True)
            self._fits[key] = (eng, docs, qs, factors, gc, time.process_time() - c0)
        return self._fits[key]

    def scores(self, model_dir: Path | None = None, fisher: str = "sampled", damping: str = "auto", seed: int = 0,
               rank: int = 32) -> tuple[np.ndarray, float, float]:
        """Q x N scores, the fit's CPU seconds and the scoring's (memoised)."""
        model_dir = model_dir or self.bench["model_dir"]
        key = (str(model_dir), fisher, damping, seed, rank)
        if key not in self._scores:
            eng, docs, qs, factors, gc, fit_s = self.fit(model_dir, fisher, seed)
            c0 = time.process_time()
            prepared = eng.prepare_queries(qs, factors.with_damping(damping), rank=rank)
            res = eng.score(docs, prepared, top_k=0, return_all=True, cache=gc)
            self._scores[key] = (np.asarray(res.all_scores), fit_s, time.process_time() - c0)
        return self._scores[key]


def kron(bench: dict[str, Any], fisher: str = "sampled", damping: str = "auto") -> tuple[np.ndarray, float]:
    """kronfluence's EK-FAC on the MLP layers, exact queries; by default its own label sampling and its default
    damping (0.1 x mean eigenvalue); CPU seconds of the whole analysis."""
    from lds_demo import kron_scores

    c0 = time.process_time()
    S, _ = kron_scores(bench, "mlp", None, empirical=fisher == "empirical", damping=damping)
    return S, time.process_time() - c0


def agreement(a: np.ndarray, b: np.ndarray, k: int = 10) -> dict[str, float]:
    """How alike two score matrices rank documents: mean per-query Spearman over documents, and the mean
    overlap of the top-k."""
    from influence_engine.evaluation import spearman_rows

    rho = float(np.nanmean(spearman_rows(a.T, b.T)))
    ta, tb = np.argsort(-a, 1)[:, :k], np.argsort(-b, 1)[:, :k]
    overlap = float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tb, strict=True)]))
    return {"spearman": rho, f"top{k}_overlap": overlap}


def run_bench(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from influence_engine import checkpoint_weights
    from influence_engine.evaluation import lds, paired_difference

    bench = load_bench(name)
    M, Y = bench["masks"], bench["outputs"]
    fits = Fits(bench)
    rows: list[dict[str, Any]] = []
    per_query: dict[str, np.ndarray] = {}
    mats: dict[str, np.ndarray] = {}

    def record(row_name: str, S: np.ndarray, **info: Any) -> dict[str, Any]:
        res = lds(S, M, Y)
        per_query[row_name] = res.per_query
        mats[row_name] = S
        row = {"name": row_name, **info, "lds": res.mean, "lds_ci": [res.ci_low, res.ci_high]}
        rows.append(row)
        _log(f"{name} {row_name:44s} LDS {res.mean:.3f} [{res.ci_low:.3f}, {res.ci_high:.3f}]"
             + (f"  cpu {info.get('cpu_fit', 0) + info.get('cpu_score', 0):.1f} s" if "cpu_fit" in info else ""))
        return row

    kron_name = "kronfluence ekfac mlp (damping 0.1 x mean)"
    try:
        import kronfluence  # noqa: F401
    except ImportError:
        _log("kronfluence is not installed: no comparison rows")
    else:
        S, sec = kron(bench)
        record(kron_name, S, tool="kronfluence", cpu_total=sec)
        for setting in args.kron_settings:
            fisher, damping = setting.split(",")
            S, sec = kron(bench, fisher, damping)
            record(f"kronfluence ekfac mlp, fisher {fisher}, damping {damping}", S, tool="kronfluence",
                   fisher=fisher, damping=damping, cpu_total=sec)
    for fisher in ("sampled", "empirical"):
        for damping in DAMPINGS:
            S, fit_s, sc_s = fits.scores(fisher=fisher, damping=damping)
            record(f"fisher {fisher}, damping {damping}", S, fisher=fisher, damping=damping, seed=0,
                   cpu_fit=fit_s, cpu_score=sc_s)
    # the sampled Fisher's labels: other seeds, and how far rankings move with the seed
    stability = []
    for seed in (1, 2):
        for damping in args.seed_dampings:
            base = mats[f"fisher sampled, damping {damping}"]
            S, fit_s, sc_s = fits.scores(fisher="sampled", damping=damping, seed=seed)
            record(f"fisher sampled, damping {damping}, seed {seed}", S, fisher="sampled", damping=damping,
                   seed=seed, cpu_fit=fit_s, cpu_score=sc_s)
            stability.append({"damping": damping, "seeds": [0, seed], **agreement(base, S)})
            _log(f"{name} seed 0 vs {seed} at {damping}: {stability[-1]}")
    # checkpoints: 1 (final), 2 (half-way, final), 4 (quarters); uniform and learning-rate weights
    ckpts = bench["checkpoints"]
    ckpt_rows = []
    if len(ckpts) >= 4:
        for setting in args.checkpoint_settings:
            fisher, damping = setting.split(",")
            for d, _ in ckpts[:4]:  # one fit per checkpoint, in turn
                fits.scores(model_dir=d, fisher=fisher, damping=damping)
            for n in (1, 2, 4):
                chosen = {1: ckpts[3:4], 2: [ckpts[1], ckpts[3]], 4: ckpts[:4]}[n]  # final; half-way + final; all
                lr_sums = _segment_lr_sums(ckpts, chosen)
                mats_n, cpu = [], 0.0
                for d, _ in chosen:
                    S, fit_s, sc_s = fits.scores(model_dir=d, fisher=fisher, damping=damping)
                    mats_n.append(S / np.abs(S).mean() if args.normalise else S)
                    cpu += fit_s + sc_s
                for rule in ("uniform", "lr") if n > 1 else ("uniform",):
                    w = checkpoint_weights(n, rule, lr_sums)
                    S = sum(wi * Si for wi, Si in zip(w, mats_n, strict=True))
                    row = record(f"{n} checkpoint(s), {rule}, fisher {fisher}, damping {damping}", S, fisher=fisher,
                                 damping=damping, checkpoints=[c[1]["step"] for c in chosen], weights=w,
                                 cpu_total=cpu)
                    ckpt_rows.append(row["name"])
    else:
        _log(f"{name}: {len(ckpts)} checkpoints found; run the checkpoint step first")
    if kron_name in per_query:
        for r in rows:
            if r["name"] != kron_name:
                r["minus_kronfluence"] = list(paired_difference(per_query[r["name"]], per_query[kron_name]))
    default_name = f"fisher {DEFAULT['fisher']}, damping {DEFAULT['damping']}"
    for r in rows:
        if r["name"] != default_name:
            r["minus_default"] = list(paired_difference(per_query[r["name"]], per_query[default_name]))
    np.savez(Path(args.work_dir) / f"lds-grid-{name}-per-query.npz",
             **{k.replace(" ", "_").replace(",", ""): v for k, v in per_query.items()})
    return {"ground_truth": {"subsets": int(M.shape[0]), "documents": int(M.shape[1]), "queries": int(Y.shape[1]),
                             "alpha": float(M.mean())},
            "model": bench["model_dir"].name, "model_fingerprint": _fingerprint(bench["model_dir"]),
            "rows": rows, "seed_stability": stability,
            "checkpoint_rows": ckpt_rows}


def _fingerprint(model_dir: Path) -> str:
    from transformers import AutoModelForCausalLM

    from influence_engine import model_fingerprint

    return model_fingerprint(AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True))[:16]


def _segment_lr_sums(all_ckpts: list[tuple[Path, dict[str, Any]]], chosen: list[tuple[Path, dict[str, Any]]]
                     ) -> list[float]:
    """Each chosen checkpoint's learning-rate sum over the steps since the previous chosen one (segments merge
    when checkpoints between them are left out)."""
    out, acc = [], 0.0
    chosen_steps = {c[1]["step"] for c in chosen}
    for _, info in all_ckpts:
        acc += info["segment_lr_sum"]
        if info["step"] in chosen_steps:
            out.append(acc)
            acc = 0.0
    return out


def run_grid(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"bench": "lds_grid", **provenance(), "machine_note": args.machine,
                           "benchmarks": {}}
    for name in args.benches:
        out["benchmarks"][name] = run_bench(name, args)
        out["load_after_" + name] = os.getloadavg()
    out["choice"] = choose(out["benchmarks"])
    out["wall_seconds"] = time.perf_counter() - t0
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=float) + "\n")
    _log(f"wrote {path}; choice {out['choice'].get('best')}")


def choose(benches: dict[str, Any]) -> dict[str, Any]:
    """The grid row (Fisher, damping; seed 0, final model) with the largest mean paired LDS gain over kronfluence
    across the benchmarks, among rows whose paired interval is above zero on every benchmark."""
    cands: dict[str, list[list[float]]] = {}
    for b in benches.values():
        for r in b["rows"]:
            if r.get("seed", None) == 0 and "checkpoints" not in r and "minus_kronfluence" in r:
                cands.setdefault(r["name"], []).append(r["minus_kronfluence"])
    full = {k: v for k, v in cands.items() if len(v) == len(benches)}
    ranked = sorted(full, key=lambda k: -float(np.mean([d[0] for d in full[k]])))
    above = [k for k in ranked if all(d[1] > 0 for d in full[k])]
    return {"rule": "largest mean paired gain over kronfluence across benchmarks; paired interval above zero on "
                    "each", "ranking": [[k, float(np.mean([d[0] for d in full[k]]))] for k in ranked],
            "best": above[0] if above else None}


# ------------------------------------------------------------------------------------------------ demo checkpoints
def demo_checkpoints(args: argparse.Namespace) -> None:
    """Replay the demo model's training (the demo recipe, seed 0) with bench/lds_train.py's loop, saving four
    checkpoints, and check that the last one is the demo model (same weight fingerprint)."""
    from lds_train import TrainRecipe, checkpoint_saver, train
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from influence_audit.demo.model import DEFAULT_CORPUS, RECIPE, read_jsonl
    from influence_engine import model_fingerprint

    model_dir = next((DEMO_WORK / "cache").glob("demo-gpt2-*-seed0"))
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    seqs = [tok(d["text"])["input_ids"] for d in read_jsonl(DEFAULT_CORPUS)]
    cfg = GPT2Config(vocab_size=len(tok), n_positions=RECIPE.n_positions, n_embd=RECIPE.n_embd,
                     n_layer=RECIPE.n_layer, n_head=RECIPE.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    recipe = TrainRecipe(epochs=RECIPE.epochs, batch_size=RECIPE.batch_size, lr=RECIPE.lr,
                         warmup_steps=RECIPE.warmup_steps)
    root = DEMO_WORK / "checkpoints"
    model, loss = train(lambda: GPT2LMHeadModel(cfg), seqs, tok.pad_token_id, recipe=recipe, seed=0,
                        checkpoints=(0.25, 0.5, 0.75, 1.0), on_checkpoint=checkpoint_saver(root, tok), log=_log)
    want = model_fingerprint(AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True))
    got = model_fingerprint(model)
    _log(f"demo checkpoints in {root}: final loss {loss:.4f}; final weights "
         + ("equal the demo model's" if got == want else f"DIFFER from the demo model's ({got[:12]} vs {want[:12]})"))
    if got != want:
        raise SystemExit(1)


def combine(args: argparse.Namespace) -> None:
    """One result from several ``grid`` runs (one benchmark each): benchmarks side by side, the choice remade
    across all of them."""
    parts = [json.loads(Path(f).read_text()) for f in args.parts]
    out = {"bench": "lds_grid", "parts": [{k: p[k] for k in ("commit", "command", "date", "host") if k in p}
                                          for p in parts], "benchmarks": {}}
    for p in parts:
        out["benchmarks"] |= p["benchmarks"]
    out["choice"] = choose(out["benchmarks"])
    Path(args.out).write_text(json.dumps(out, indent=1, default=float) + "\n")
    _log(f"wrote {args.out}; choice {out['choice']['best']}")


def ensemble(args: argparse.Namespace) -> None:
    """TRAK-style ensembles: scores averaged over the audited model and independently trained models (other
    initialisation seeds, same data and recipe: ``bench/lds_prose.py model --train-seed N --work DIR``), with
    the final checkpoints' rows as reference; paired differences against kronfluence's per-query LDS saved by a
    ``grid`` run (``--per-query``)."""
    from influence_engine.evaluation import lds, paired_difference

    torch.set_num_threads(1)
    bench = load_bench(args.bench)
    M, Y = bench["masks"], bench["outputs"]
    kron_pq = np.load(args.per_query)["kronfluence_ekfac_mlp_(damping_0.1_x_mean)"]
    fits = Fits(bench)
    models = [bench["model_dir"], *map(Path, args.models)]
    mats, cpu, rows = [], 0.0, []
    for d in models:
        S, fit_s, sc_s = fits.scores(model_dir=d, fisher=args.fisher, damping=args.damping)
        mats.append(S)
        cpu += fit_s + sc_s
        res = lds(sum(mats) / len(mats), M, Y)
        diff = paired_difference(res.per_query, kron_pq)
        rows.append({"models": len(mats), "lds": res.mean, "lds_ci": [res.ci_low, res.ci_high],
                     "minus_kronfluence": list(diff), "cpu_total": cpu, "model": str(d.resolve().relative_to(ROOT))})
        _log(f"{args.bench} ensemble of {len(mats)} model(s), fisher {args.fisher}, damping {args.damping}: LDS "
             f"{res.mean:.3f} [{res.ci_low:.3f}, {res.ci_high:.3f}], minus kronfluence {diff[0]:+.3f} "
             f"[{diff[1]:+.3f}, {diff[2]:+.3f}], cpu {cpu:.1f} s")
    out = {"bench": "lds_grid ensemble", **provenance(), "benchmark": args.bench, "fisher": args.fisher,
           "damping": args.damping, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1, default=float) + "\n")


# ------------------------------------------------------------------------------------------------ table
def print_table(args: argparse.Namespace) -> None:
    d = json.loads(Path(args.json).read_text())
    names = list(d["benchmarks"])
    by = {b: {r["name"]: r for r in d["benchmarks"][b]["rows"]} for b in names}
    order = list(dict.fromkeys(n for b in names for n in by[b]))

    def cell(r: dict[str, Any] | None, key: str) -> str:
        if r is None:
            return "-"
        if key == "lds":
            return f"{r['lds']:.3f} ({r['lds_ci'][0]:.3f}, {r['lds_ci'][1]:.3f})"
        v = r.get(key)
        return f"{v[0]:+.3f} ({v[1]:+.3f}, {v[2]:+.3f})" if v else "-"

    head = "| setting | " + " | ".join(f"{b}: LDS (95% CI) | {b}: minus kronfluence (paired 95% CI)" for b in names)
    print(head + " |")
    print("|---" * (1 + 2 * len(names)) + "|")
    for n in order:
        print(f"| {n} | " + " | ".join(f"{cell(by[b].get(n), 'lds')} | {cell(by[b].get(n), 'minus_kronfluence')}"
                                     for b in names) + " |")
    print()
    print("choice:", d["choice"]["best"])
    for b in names:
        for s in d["benchmarks"][b]["seed_stability"]:
            print(f"{b}: sampled Fisher seeds {s['seeds']} at {s['damping']}: Spearman {s['spearman']:.3f}, "
                  f"top-10 overlap {s['top10_overlap']:.2f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="phase", required=True)
    sub.add_parser("demo-checkpoints", help="the demo model's training replayed with four checkpoints")
    g = sub.add_parser("grid", help="damping x Fisher grid, kronfluence, seeds and checkpoints on the benchmarks")
    g.add_argument("--benches", nargs="+", default=["demo", "prose"])
    g.add_argument("--out", default=str(ROOT / "bench" / "results" / "lds-grid.json"))
    g.add_argument("--seed-dampings", nargs="*", default=["auto", "auto:0.001"])
    g.add_argument("--checkpoint-settings", nargs="*", default=["sampled,auto", "empirical,auto:0.001"],
                   help="FISHER,DAMPING pairs to average over checkpoints")
    g.add_argument("--kron-settings", nargs="*", default=["empirical,auto:0.001"],
                   help="FISHER,DAMPING pairs for kronfluence besides its defaults")
    g.add_argument("--normalise", action="store_true", help="scale each checkpoint's scores to mean |score| 1")
    g.add_argument("--work-dir", default=str(ROOT / ".lds-prose"))
    g.add_argument("--machine", default="2-core shared CPU")
    e = sub.add_parser("ensemble", help="scores averaged over independently trained models")
    e.add_argument("--bench", default="prose")
    e.add_argument("--models", nargs="+", required=True, help="other models' directories")
    e.add_argument("--fisher", default="empirical")
    e.add_argument("--damping", default="auto:0.0001")
    e.add_argument("--per-query", required=True, help="a grid run's per-query LDS file (.npz)")
    e.add_argument("--out", required=True)
    c = sub.add_parser("combine", help="benchmarks of several grid results side by side; the choice across all")
    c.add_argument("parts", nargs="+")
    c.add_argument("--out", required=True)
    t = sub.add_parser("table", help="print a grid result as a markdown table")
    t.add_argument("json")
    args = ap.parse_args(argv)
    {"demo-checkpoints": demo_checkpoints, "grid": run_grid, "combine": combine, "ensemble": ensemble,
     "table": print_table}[args.phase](args)


if __name__ == "__main__":
    main()
