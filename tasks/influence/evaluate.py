"""Attribution quality of a finished audit: the LDS against user-supplied retraining results, planted recall.

Retraining results (see docs/method.md, "Measuring quality"):

* the subset mask, S x N: row ``s`` marks the training documents kept in retraining run ``s`` (1/true = kept);
  columns in the audit's training order (its input files, rows in order), or in the order of ``--doc-ids``;
* the measured outputs, S x Q: each query's output on the model retrained on subset ``s``, either
  ``log p(completion | prompt)`` summed over the completion (``logprob``, what scores predict) or that
  completion's loss (``loss``, its negative: kronfluence's ``losses.pt``); columns in the audit's query order
  (``queries.parquet``), or in the order of ``--query-ids``.

Files: ``.pt`` (a tensor or numpy array saved with ``torch.save``: kronfluence's ``masks.pt`` / ``losses.pt``),
``.npy``, or ``.csv`` (numbers only, no header).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from influence_engine import PreparedQueries, UserError
from influence_engine.atomic import write_json_atomic
from influence_engine.evaluation import lds
from tasks.inputs.rows import encode_frame

SUMMARY = "evaluation.json"
Log = Callable[[str], None]


def read_matrix(path: str | Path, what: str) -> np.ndarray:
    """A 2-D array from ``.pt`` / ``.npy`` / ``.csv``; one-line UserError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file")
    try:
        if path.suffix == ".pt":
            import torch

            allowed = [np._core.multiarray._reconstruct, np.ndarray, np.dtype,
                       *{type(np.dtype(t)) for t in (bool, np.float16, np.float32, np.float64, np.int32, np.int64,
                                                     np.uint8)}]
            with torch.serialization.safe_globals(allowed):
                obj = torch.load(path, map_location="cpu", weights_only=True)
            arr = obj.detach().cpu().numpy() if isinstance(obj, torch.Tensor) else np.asarray(obj)
        elif path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif path.suffix == ".csv":
            arr = np.loadtxt(path, delimiter=",", ndmin=2)
        else:
            raise UserError(f"{what} {path}: unknown format", hint="give a .pt, .npy or .csv file")
    except UserError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{what} {path}: unreadable ({first})",
                        hint="save a 2-D tensor or numpy array (torch.save / numpy.save) or a CSV of numbers") from None
    if arr.ndim != 2:
        raise UserError(f"{what} {path}: a {arr.ndim}-D array; expected 2-D (subsets x "
                        f"{'documents' if 'mask' in what else 'queries'})")
    if arr.dtype.kind not in "biuf":
        raise UserError(f"{what} {path}: {arr.dtype} values; expected numbers")
    return arr.astype(np.float64)


def _ids(path: str | Path | None, what: str) -> list[str] | None:
    if path is None:
        return None
    try:
        ids = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{what} {path}: not a readable JSON list ({exc})") from None
    if not isinstance(ids, list) or not all(isinstance(i, (str, int)) for i in ids):
        raise UserError(f"{what} {path}: expected a JSON list of ids")
    return [str(i) for i in ids]


def all_scores(spec: Any, inputs: Any, audit_dir: Path, cands: pl.DataFrame, query_ids: list[str],
               doc_ids: list[str], log: Log, checkpoints: int = 1) -> np.ndarray:
    """Every query's score of every document (Q x N): from the candidates when they hold every pair
    (``--top-k 0``), else one scoring pass with the audit's prepared queries (the model's alone: an audit over
    several checkpoints must have kept every pair)."""
    n_pairs = cands.select("query_id", "train_id").unique().height
    if n_pairs == len(query_ids) * len(doc_ids):
        wide = cands.pivot(on="train_id", index="query_id", values="score")
        wide = wide.join(pl.DataFrame({"query_id": query_ids}), on="query_id", how="right")
        return wide.select(doc_ids).to_numpy().astype(np.float64)
    if checkpoints > 1:
        raise UserError(f"evaluate: the audit averaged {checkpoints} checkpoints but kept only each query's top "
                        f"{cands['rank'].max()}", hint="rerun the audit with --top-k 0 to evaluate it")
    log(f"evaluation: scoring all {len(doc_ids)} documents (the audit kept the top {cands['rank'].max()})")
    eng = spec.engine()
    from tasks.inputs.shards import read_shard

    train = pl.concat([read_shard(s) for s in inputs.shards], how="vertical_relaxed")
    docs = encode_frame(eng, train, "train")
    res = eng.score(docs, PreparedQueries.load(audit_dir / "prepared-queries.safetensors"), top_k=0,
                    return_all=True)
    qpos = {q: i for i, q in enumerate(res.query_ids)}
    dpos = {d: i for i, d in enumerate(res.doc_ids)}
    return res.all_scores[np.ix_([qpos[q] for q in query_ids], [dpos[d] for d in doc_ids])]


def plot_lds(per_query: np.ndarray, pred: np.ndarray, outputs: np.ndarray, query_ids: list[str], path: Path) -> Path:
    """Per-query LDS histogram beside predicted vs measured outputs of the median query."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    finite = per_query[np.isfinite(per_query)]
    a.hist(finite, bins=min(30, max(5, finite.size // 3)), color="#4477aa")
    a.axvline(float(finite.mean()) if finite.size else 0, color="k", ls="--", label=f"mean {finite.mean():.3f}")
    a.set_xlabel("LDS (Spearman over retrained subsets)")
    a.set_ylabel("queries")
    a.legend()
    if finite.size:
        order = np.argsort(np.where(np.isfinite(per_query), per_query, np.inf))
        q = int(order[finite.size // 2])
        b.scatter(pred[:, q], outputs[:, q], s=12, color="#cc6677")
        b.set_title(f"{query_ids[q]} (LDS {per_query[q]:.2f})", fontsize=9)
    b.set_xlabel("predicted: sum of kept documents' scores")
    b.set_ylabel("measured log p(completion | prompt)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def evaluation_settings(p: Any) -> dict[str, Any]:
    """The settings the evaluated scores were computed with (the audit's): recorded beside the metrics, so an LDS
    always says which Fisher, damping, layers and checkpoints it measures."""
    from influence_engine.settings import normalise_damping

    return {"strategy": p.strategy, "layers": p.layers, "damping": normalise_damping(p.damping), "fisher": p.fisher,
            "seed": p.seed, "query_rank": p.query_rank, "precision": p.precision, "max_length": p.max_length,
            "checkpoints": 1 + len(p.checkpoint), "checkpoint": ",".join(p.checkpoint)}


def evaluate_audit(home: str | Path | None, audit_id: str, *, masks: str | Path | None = None,
                   outputs: str | Path | None = None, outputs_kind: str = "logprob",
                   doc_ids: str | Path | None = None, query_ids: str | Path | None = None,
                   planted: str | Path | None = None, tracking_uri: str | None = None, n_boot: int = 2000,
                   log: Log | None = None) -> dict[str, Any]:
    """LDS (with a bootstrap interval over queries) and planted recall of a finished audit; written to
    ``evaluation.json`` and, when the audit has an MLflow run, logged there with the plot."""
    from tasks.influence.candidates import planted_metrics
    from tasks.influence.verify import load_audit
    from tasks.options import engine_spec
    from tasks.paths import resolve_home

    emit: Log = log or (lambda _m: None)
    if (masks is None) != (outputs is None):
        raise UserError("--masks and --outputs go together (the retraining subsets and their measured outputs)")
    if masks is None and planted is None:
        raise UserError("nothing to evaluate", hint="give --masks and --outputs (LDS), --planted, or both")
    if outputs_kind not in ("logprob", "loss"):
        raise UserError(f"--outputs-kind {outputs_kind!r}: choose 'logprob' or 'loss'")
    audit_dir, manifest, p, inputs = load_audit(home, audit_id)
    t0 = time.perf_counter()
    cands = pl.read_parquet(audit_dir / "candidates.parquet")
    metrics: dict[str, float] = {}
    result: dict[str, Any] = {"audit_id": audit_id}
    plots: list[Path] = []
    if masks is not None:
        M = read_matrix(masks, "--masks")
        Y = read_matrix(outputs, "--outputs")
        from tasks.inputs.shards import shard_ids

        audit_docs = shard_ids(inputs).collect()["id"].to_list()
        audit_queries = pl.read_parquet(audit_dir / "queries.parquet", columns=["id"])["id"].to_list()
        d_ids = _ids(doc_ids, "--doc-ids") or audit_docs
        q_ids = _ids(query_ids, "--query-ids") or audit_queries
        if M.shape[0] != Y.shape[0]:
            raise UserError(f"--masks has {M.shape[0]} subsets (rows) but --outputs {Y.shape[0]}",
                            hint="one row per retrained model in both files, in the same order")
        if M.shape[1] != len(d_ids):
            raise UserError(f"--masks {masks}: {M.shape[1]} columns but {len(d_ids)} training documents",
                            hint="one column per document in the audit's training order, or give --doc-ids")
        if Y.shape[1] != len(q_ids):
            raise UserError(f"--outputs {outputs}: {Y.shape[1]} columns but {len(q_ids)} queries",
                            hint="one column per query in the audit's query order, or give --query-ids")
        unknown = [d for d in d_ids if d not in set(audit_docs)][:3]
        if unknown:
            raise UserError(f"--doc-ids: {unknown} are not training documents of audit {audit_id}")
        missing = [q for q in audit_queries if q not in set(q_ids)][:3]
        if missing:
            raise UserError(f"--query-ids: the audit's queries {missing} have no measured outputs")
        keep = [i for i, q in enumerate(q_ids) if q in set(audit_queries)]
        q_ids = [q_ids[i] for i in keep]
        Y = Y[:, keep]
        if outputs_kind == "loss":
            Y = -Y
        spec = engine_spec(p, inputs.model_dir)
        S = all_scores(spec, inputs, audit_dir, cands, q_ids, d_ids, emit, 1 + len(p.checkpoint))
        res = lds(S, M, Y, n_boot=n_boot)
        metrics |= res.as_dict()
        result["lds"] = {"mean": res.mean, "ci_low": res.ci_low, "ci_high": res.ci_high, "n_subsets": res.n_subsets,
                         "n_queries": len(q_ids), "per_query": dict(zip(q_ids, map(float, res.per_query),
                                                                        strict=True)),
                         "outputs_kind": outputs_kind, "masks": str(masks), "outputs": str(outputs)}
        plots.append(plot_lds(res.per_query, M @ S.T, Y, q_ids, audit_dir / "plots" / "lds.png"))
        emit(f"evaluation: LDS {res.mean:.3f} [{res.ci_low:.3f}, {res.ci_high:.3f}] over {len(q_ids)} queries "
             f"and {res.n_subsets} retrained subsets")
    if planted is not None:
        if not Path(planted).is_file():
            raise UserError(f"--planted {planted}: no such file", hint='give JSON {"query_id": ["train_id", ...]}')
        pm = planted_metrics(cands, str(planted))
        if not pm:
            raise UserError(f"--planted {planted}: none of its queries are among the audit's candidates")
        metrics |= pm
        emit("evaluation: " + ", ".join(f"{k} {v:.3f}" for k, v in pm.items()))
    settings = evaluation_settings(p)
    result |= {"settings": settings, "metrics": metrics, "seconds": time.perf_counter() - t0}
    write_json_atomic(audit_dir / SUMMARY, result)
    run_id = manifest.get("mlflow_run_id")
    if run_id:
        from tasks.record.tracker import configure_tracking, tracker

        configure_tracking(tracking_uri or p.tracking_uri, Path(p.output_dir) if p.output_dir else resolve_home(home))
        t = tracker()
        t.log_metrics(run_id, {k: float(v) for k, v in metrics.items() if np.isfinite(v)})
        t.log_params(run_id, {f"evaluation.{k}": v for k, v in settings.items()})
        t.log_artifact(run_id, audit_dir / SUMMARY)
        for plot in plots:
            t.log_artifact(run_id, plot, "plots")
    return result | {"run_id": run_id}
