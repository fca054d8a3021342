"""The verification stage: counterfactual checks of each query's top candidates against random documents.

For each query's top-``k`` candidates and ``k`` random training documents (the same for every query: the
baseline), :class:`influence_engine.verify.Verifier` measures the change of ``log p(completion | prompt)`` when
the document is up-weighted and when it is down-weighted. A candidate is ``verified`` when both changes have
the sign its score predicts and both exceed the query's noise threshold (the median absolute change of the
random documents). Writes, in the audit directory:

* ``candidates.parquet`` again, with ``counterfactual_delta`` (nats, up-weighting), ``counterfactual_delta_down``
  and ``verified`` (null below rank ``k``);
* ``verification.parquet``: every checked pair (``kind`` = ``candidate`` or ``random``), with its score;
* ``verification.json``: the metrics (``verified_at_10``, ``verified_random_at_10``, ``verify_spearman``), the
  noise thresholds, the check's settings as run (learning rate chosen, ...) and its seconds.

A rerun with the same settings reuses ``verification.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from influence_engine import InfluenceEngine, PreparedQueries, UserError
from influence_engine.atomic import write_json_atomic
from influence_engine.data import example_seed
from influence_engine.evaluation import spearman_rows
from influence_engine.verify import Verifier, VerifySettings, noise_threshold, verified
from tasks.files import write_parquet_atomic
from tasks.inputs.rows import encode_frame

VERIFY_COLUMNS = ("counterfactual_delta", "counterfactual_delta_down", "verified")
SUMMARY = "verification.json"
PAIRS = "verification.parquet"
Log = Callable[[str], None]


def random_baseline(train_ids: Sequence[str], k: int, seed: int) -> list[str]:
    """``k`` training documents drawn by a seeded hash of their ids (the same whatever the row order)."""
    return sorted(train_ids, key=lambda i: example_seed(seed + 7919, i))[:k]


def _spearman_per_query(pairs: pl.DataFrame) -> float:
    values = []
    for _, g in pairs.group_by("query_id"):
        if g.height >= 3:
            r = spearman_rows(g["score"].to_numpy()[:, None], g["counterfactual_delta"].to_numpy()[:, None])[0]
            if np.isfinite(r):
                values.append(r)
    return float(np.mean(values)) if values else float("nan")


def verify_candidates(eng: InfluenceEngine, *, audit_dir: str | Path, candidates_path: str | Path,
                      train: pl.DataFrame, queries: pl.DataFrame, prepared: PreparedQueries, k: int = 10,
                      settings: VerifySettings | None = None, log: Log | None = None) -> dict[str, Any]:
    """Check the top-``k`` candidates of every query and ``k`` random documents; write the files above and
    return the summary (``verification.json``'s content)."""
    settings = settings or VerifySettings()
    if k < 1:
        raise UserError(f"--verify {k}: check at least one candidate per query (0 turns verification off)")
    emit: Log = log or (lambda _m: None)
    audit_dir = Path(audit_dir)
    summary_path = audit_dir / SUMMARY
    request = {"k": k, "settings": settings.to_json()}
    if summary_path.exists():
        old = json.loads(summary_path.read_text())
        if old.get("request") == request and "verified" in pl.read_parquet_schema(candidates_path):
            emit("verification: reusing the finished check")
            return old
    t0 = time.perf_counter()
    cands = pl.read_parquet(candidates_path).drop([c for c in VERIFY_COLUMNS if c in
                                                   pl.read_parquet_schema(candidates_path)])
    top = cands.filter(pl.col("rank") <= k).select("query_id", "train_id", "score", "rank")
    train_ids = train["id"].to_list()
    baseline = random_baseline(train_ids, min(k, len(train_ids)), settings.seed)
    checked = sorted(set(top["train_id"].to_list()) | set(baseline))
    by_id = {r["id"]: r for r in train.filter(pl.col("id").is_in(checked)).to_dicts()}
    docs = encode_frame(eng, pl.DataFrame([by_id[i] for i in checked]), "train")
    qs = encode_frame(eng, queries, "queries")
    q_ids = [q.id for q in qs]
    sample_ids = set(random_baseline(train_ids, settings.sample_size, settings.seed + 1))
    sample = encode_frame(eng, train.filter(pl.col("id").is_in(list(sample_ids))), "train")

    # the random documents' scores (candidates have theirs)
    base_docs = [d for d in docs if d.id in set(baseline)]
    res = eng.score(base_docs, prepared, top_k=0, return_all=True)
    q_pos = {q: i for i, q in enumerate(res.query_ids)}
    d_pos = {d: i for i, d in enumerate(res.doc_ids)}
    random_rows = [{"query_id": q, "train_id": d, "score": float(res.all_scores[q_pos[q], d_pos[d]]), "rank": None}
                   for q in q_ids for d in baseline]

    # what is measured: each candidate against the queries it is a candidate for, each random document against all
    measured: dict[str, set[str]] = {d: set(q_ids) for d in baseline}
    for q, d in zip(top["query_id"], top["train_id"], strict=True):
        measured.setdefault(d, set()).add(q)
    n_pairs = sum(len(v) for v in measured.values())
    emit(f"verification: {settings.check} ({settings.optimizer if settings.check == 'tail-patch' else 'L-BFGS'}, "
         f"{settings.params} parameters) on {len(docs)} documents x {len(qs)} queries ({n_pairs} pairs)")
    deltas = Verifier(eng.model, device=eng.device, pad_id=eng.pad_id, tracked=eng.tracked,
                      settings=settings).run(docs, qs, train_sample=sample, n_train=len(train_ids), pairs=measured)
    di = {d: i for i, d in enumerate(deltas.doc_ids)}
    qi = {q: i for i, q in enumerate(deltas.query_ids)}

    pairs = pl.concat([top.with_columns(pl.lit("candidate").alias("kind")),
                       pl.DataFrame(random_rows, schema={"query_id": pl.String, "train_id": pl.String,
                                                         "score": pl.Float64, "rank": pl.Int64})
                       .with_columns(pl.lit("random").alias("kind"))], how="vertical_relaxed")
    up = np.array([deltas.up[di[d], qi[q]] for q, d in zip(pairs["query_id"], pairs["train_id"], strict=True)])
    down = np.array([deltas.down[di[d], qi[q]] for q, d in zip(pairs["query_id"], pairs["train_id"], strict=True)])
    is_random = (pairs["kind"] == "random").to_numpy()
    thresholds = {}
    for q in q_ids:
        rows = is_random & (pairs["query_id"] == q).to_numpy()
        thresholds[q] = float(noise_threshold(up[rows][:, None], down[rows][:, None])[0])
    thr = np.array([thresholds[q] for q in pairs["query_id"]])
    ok = verified(pairs["score"].to_numpy(), up, down, thr)
    pairs = pairs.with_columns(pl.Series("counterfactual_delta", up), pl.Series("counterfactual_delta_down", down),
                               pl.Series("verified", ok), pl.Series("noise_threshold", thr))
    at = min(10, k)
    cand10 = pairs.filter((pl.col("kind") == "candidate") & (pl.col("rank") <= at))
    rand10 = pairs.filter(pl.col("kind") == "random").group_by("query_id", maintain_order=True).head(at)
    metrics = {"verified_at_10": float(cand10["verified"].mean()),
               "verified_random_at_10": float(rand10["verified"].mean()),
               "verify_spearman": _spearman_per_query(pairs),
               "verify_spearman_candidates": _spearman_per_query(pairs.filter(pl.col("kind") == "candidate")),
               "verify_seconds": time.perf_counter() - t0}
    write_parquet_atomic(pairs, audit_dir / PAIRS)
    joined = cands.join(pairs.filter(pl.col("kind") == "candidate").select("query_id", "train_id", *VERIFY_COLUMNS),
                        on=["query_id", "train_id"], how="left")
    write_parquet_atomic(joined, candidates_path)
    summary = {"request": request, "metrics": metrics, "settings": deltas.settings, "k": k, "checked_at": at,
               "random_documents": baseline, "noise_thresholds": thresholds, "n_documents_checked": len(docs)}
    write_json_atomic(summary_path, summary)
    emit(f"verification: verified_at_10 {metrics['verified_at_10']:.2f} vs random "
         f"{metrics['verified_random_at_10']:.2f}, Spearman(score, delta) {metrics['verify_spearman']:.2f}, "
         f"{metrics['verify_seconds']:.1f} s")
    return summary


def verification_metrics(audit_dir: str | Path) -> dict[str, float]:
    """The verification metrics of an audit (empty when it was not verified)."""
    path = Path(audit_dir) / SUMMARY
    if not path.exists():
        return {}
    return {k: float(v) for k, v in json.loads(path.read_text())["metrics"].items()}


def settings_from(check: str, lr: float | None, params: str = "all", optimizer: str = "adam",
                  seed: int = 0, batch_size: int = 8) -> VerifySettings:
    """Verification settings from flags / flow parameters."""
    return VerifySettings(check=check, lr=lr, params=params, optimizer=optimizer, seed=seed, batch_size=batch_size)


# ------------------------------------------------------------------------------------------------ the stage
def verify_audit_dir(spec: Any, inputs: Any, candidates_path: str, queries_path: str, prepared_path: str, *,
                     k: int, settings: VerifySettings, log: Log | None = None) -> dict[str, Any]:
    """:func:`verify_candidates` on an audit's files (its shards, sampled queries and prepared queries)."""
    from tasks.inputs.shards import read_shard

    train = pl.concat([read_shard(s) for s in inputs.shards], how="vertical_relaxed")
    return verify_candidates(spec.engine(), audit_dir=inputs.audit_dir, candidates_path=candidates_path,
                             train=train, queries=pl.read_parquet(queries_path),
                             prepared=PreparedQueries.load(prepared_path), k=k, settings=settings, log=log)


def verify_audit_stage(spec: Any, p: Any, inputs: Any, candidates_path: str, queries_path: str,
                       prepared_path: str, log: Log | None = None) -> dict[str, float]:
    """The flow's verification stage (AuditParams ``verify_k`` > 0): the metrics."""
    settings = settings_from(p.verify_check, p.verify_lr, p.verify_params, p.verify_optimizer, seed=p.seed,
                             batch_size=p.batch_size)
    return verify_audit_dir(spec, inputs, candidates_path, queries_path, prepared_path, k=p.verify_k,
                            settings=settings, log=log)["metrics"]


# ------------------------------------------------------------------------------------- an existing audit
def load_audit(home: str | Path | None, audit_id: str) -> tuple[Path, dict[str, Any], Any, Any]:
    """An audit's directory, manifest, parameters (AuditParams) and inputs (tasks.inputs.shards.Inputs), from its
    manifest."""
    from tasks.inputs.shards import Inputs
    from tasks.options import AuditParams
    from tasks.paths import resolve_home
    from tasks.review.decisions import _manifest

    h = resolve_home(home)
    manifest = _manifest(h, audit_id)
    audit_dir = h / "audits" / audit_id
    if not (audit_dir / "candidates.parquet").exists() or "inputs" not in manifest:
        raise UserError(f"audit {audit_id} has no candidates yet (status: {manifest.get('status', '?')})",
                        hint="finish the audit first (rerun the same `influence-audit audit` command)")
    return audit_dir, manifest, AuditParams(**manifest["params"]), Inputs.from_json(manifest["inputs"])


def record_verification(run_id: str, audit_dir: Path, report: dict[str, Any]) -> None:
    """Metrics, the candidates table (with the verification columns), verification.json and the validation
    report on the audit's MLflow run."""
    from tasks.record.tracker import CANDIDATES_TABLE, _table_frame, tracker

    t = tracker()
    t.log_metrics(run_id, {k: v for k, v in verification_metrics(audit_dir).items() if np.isfinite(v)})
    cands = pl.read_parquet(audit_dir / "candidates.parquet")
    t.replace_table(run_id, _table_frame(cands), CANDIDATES_TABLE)
    t.log_artifact(run_id, audit_dir / "candidates.parquet", "candidates")
    t.log_artifact(run_id, audit_dir / SUMMARY)
    t.log_dict(run_id, report, "validation/candidates.json")


def verify_existing_audit(home: str | Path | None, audit_id: str, *, k: int, settings: VerifySettings,
                          tracking_uri: str | None = None, log: Log | None = None) -> dict[str, Any]:
    """Verify a finished audit's candidates, re-validate them and record the result on its MLflow run (when it
    has one). Returns the summary plus ``validation`` (the candidate suite's report) and ``run_id``."""
    from tasks.influence.checks import validate_candidates
    from tasks.options import engine_spec
    from tasks.paths import resolve_home

    audit_dir, manifest, p, inputs = load_audit(home, audit_id)
    spec = engine_spec(p, inputs.model_dir)
    prepared = audit_dir / "prepared-queries.safetensors"
    summary = verify_audit_dir(spec, inputs, str(audit_dir / "candidates.parquet"), str(audit_dir / "queries.parquet"),
                               str(prepared), k=k, settings=settings, log=log)
    cands = pl.read_parquet(audit_dir / "candidates.parquet")
    from tasks.inputs.shards import shard_ids

    train_ids = shard_ids(inputs).collect()["id"]
    report = validate_candidates(cands, train_ids=train_ids, query_ids=pl.read_parquet(
        audit_dir / "queries.parquet", columns=["id"])["id"], k=p.top_k,
        verified_baseline=summary["metrics"]["verified_random_at_10"])
    out = report.to_json()
    write_json_atomic(audit_dir / "validation" / "candidates.json", out)
    run_id = manifest.get("mlflow_run_id")
    if run_id:
        from tasks.record.tracker import configure_tracking

        configure_tracking(tracking_uri or p.tracking_uri, Path(p.output_dir) if p.output_dir else resolve_home(home))
        record_verification(run_id, audit_dir, out)
    return summary | {"validation": out, "validation_summary": report.summary(), "run_id": run_id}
