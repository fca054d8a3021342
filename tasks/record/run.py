"""Recording an audit: its MLflow run, plots, HTML report, and the review hand-off (a Prefect artifact).

Plain functions: the flow's tasks (tasks/record/stages.py) wrap them; ``influence-audit sync`` calls them
directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from influence_engine.errors import first_line
from tasks.influence.candidates import planted_metrics
from tasks.influence.verify import verification_metrics
from tasks.inputs.shards import Inputs
from tasks.options import AuditParams


def run_params(p: AuditParams, inputs: Inputs | None) -> dict[str, Any]:
    params = {"model": p.model, "strategy": p.strategy, "layers": p.layers, "damping": p.damping, "fisher": p.fisher,
              "query_rank": p.query_rank, "top_k": p.top_k, "seed": p.seed, "precision": p.precision,
              "max_length": p.max_length, "n_queries": p.n_queries or "all", "sampling": p.sampling,
              "train": ",".join(p.train), "queries": p.queries, "threads": p.threads or "torch default"}
    if p.checkpoint:
        params["checkpoints"] = ",".join(p.checkpoint)
    if inputs is not None:
        params |= {"model_fingerprint": inputs.model_fingerprint, "data_fingerprint": inputs.data_fingerprint,
                   "query_fingerprint": inputs.query_fingerprint, "shard_count": len(inputs.shards),
                   "shard_size": p.shard_size, "model_dir": inputs.model_dir}
    return params


def start_run(p: AuditParams, inputs: Inputs | None, audit_id: str) -> str:
    from tasks.record.tracker import start_audit_run

    return start_audit_run(p.experiment, run_name=f"audit-{audit_id}", params=run_params(p, inputs),
                           tags={"audit.id": audit_id, "audit.dir": inputs.audit_dir if inputs else ""})


def record_results(p: AuditParams, inputs: Inputs, run_id: str, candidates_path: str, validation: dict[str, dict],
                   stage_seconds: dict[str, float], factors_cached: bool) -> dict[str, float]:
    """Plots, the HTML page, metrics and the candidate table on the audit's MLflow run; one trace per query."""
    from tasks.influence.report import plot_layer_share, plot_score_distribution, render_html_report
    from tasks.record.tracker import record_audit_results

    audit_dir = Path(inputs.audit_dir)
    cands = pl.read_parquet(candidates_path)
    scores = cands["score"]
    n_queries = cands["query_id"].n_unique()
    score_seconds = stage_seconds.get("score_shards", 0.0)
    metrics = {"documents": inputs.n_docs, "tokens": inputs.n_tokens, "truncated_documents": inputs.n_truncated,
               "queries": n_queries, "candidates": cands.height, "factors_cached": float(factors_cached),
               "score_mean": float(scores.mean() or 0.0), "score_max": float(scores.max() or 0.0),
               "score_min": float(scores.min() or 0.0), "score_std": float(scores.std() or 0.0)}
    metrics |= {f"seconds_{k}": v for k, v in stage_seconds.items()}
    if score_seconds > 0:
        metrics["scoring_tokens_per_s"] = inputs.n_tokens / score_seconds
    metrics |= planted_metrics(cands, p.planted)
    metrics |= verification_metrics(audit_dir)
    plots = [plot_score_distribution(cands, audit_dir / "plots" / "score_distribution.png"),
             plot_layer_share(cands, audit_dir / "plots" / "layer_share.png")]
    html = render_html_report(cands, audit_dir / "report.html", title=f"Influence audit {inputs.audit_id}",
                              meta={"audit id": inputs.audit_id, "MLflow run": run_id, "model": p.model,
                                    "model fingerprint": inputs.model_fingerprint[:16], "strategy": p.strategy,
                                    "layers": p.layers, "documents": str(inputs.n_docs),
                                    "queries": str(n_queries)})
    record_audit_results(run_id, candidates=cands, candidates_parquet=Path(candidates_path), metrics=metrics,
                         validation_reports=validation, plots=plots, html_report=html,
                         extra_artifacts=[audit_dir / "manifest.json"] if (audit_dir / "manifest.json").exists()
                         else [])
    from tasks.record.traces import document_texts, record_traces

    record_traces(run_id, cands, audit_id=inputs.audit_id,
                  texts=document_texts(audit_dir, cands["train_id"].unique().to_list()))
    return metrics


def finish_run(run_id: str, succeeded: bool, validation_passed: bool | None, error: str | None = None) -> None:
    from tasks.record.tracker import finish_audit_run

    finish_audit_run(run_id, succeeded=succeeded, validation_passed=validation_passed, error=error)


def open_review(p: AuditParams, inputs: Inputs, run_id: str, candidates_path: str) -> str:
    """Open the review: record marks already made in MLflow (a rerun keeps its review), start the Prefect-form
    review where a server has the ``review`` deployment, and hand people a markdown artifact with the MLflow
    addresses of the run and its traces (one per query: where reviewers mark culprits), and the top 3
    candidates per query as a Prefect table artifact."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tasks.record.tracker import tracker
    from tasks.record.ui import audit_urls, ui_base, ui_command
    from tasks.review.pull import pull_review
    from tasks.review.runs import open_review_form

    home = Path(inputs.audit_dir).parent.parent
    pulled = pull_review(home, inputs.audit_id)
    try:
        form = open_review_form(inputs.audit_id, str(home))
    except Exception as exc:  # the review in MLflow stands without the form
        form = f"Prefect-form review not started: {first_line(exc, 200)}"
    t = tracker()
    uri = t.uri
    urls = audit_urls(ui_base(uri), t.experiment_of(run_id), run_id)
    serve = ui_command(uri)
    cands = pl.read_parquet(candidates_path).filter(pl.col("rank") <= 3)
    table = cands.select("query_id", "rank", "train_id", "score").sort("query_id", "rank").to_dicts()
    create_table_artifact(key=f"audit-{inputs.audit_id}-top-candidates", table=table,
                          description=f"Influence audit {inputs.audit_id}: top 3 candidates per query")
    lines = [f"# Influence audit `{inputs.audit_id}`: review {pulled['status']}", "",
             "Candidates are a first screen, not a verdict. Review them in MLflow: open the run's traces (one per "
             "query), pick a candidate's span, add the feedback `culprit` (true, false or `unsure`).", "",
             f"- traces: {urls['traces']}", f"- run: {urls['run']} (experiment `{p.experiment}`; `candidates.json` "
             "and `report.html` are in its artifacts)",
             *([f"- serve the UI first: `{serve}`"] if serve else []),
             f"- decisions come back with `influence-audit review pull {inputs.audit_id}` (also on the `review-pull` "
             f"schedule); or decide in a terminal: `influence-audit review show {inputs.audit_id}`, then "
             "`influence-audit review submit`",
             f"- {form}",
             f"- the top 3 candidates per query are in the table artifact `audit-{inputs.audit_id}-top-candidates`"]
    return str(create_markdown_artifact(key=f"audit-{inputs.audit_id}-review", markdown="\n".join(lines),
                                        description=f"Review influence audit {inputs.audit_id}"))
