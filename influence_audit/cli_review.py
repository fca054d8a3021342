"""`influence-audit review ...`: list audits, show candidates, submit decisions, pull the MLflow UI's marks.

Thin: every rule lives in :mod:`tasks.review.decisions`; errors are UserErrors (one line, non-zero exit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from influence_audit.console import err, out
from influence_audit.options import AuditArg, Opts, audit_id_of, takes

review_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                         rich_markup_mode=None,
                         help="Human review of audit candidates: culprit / not-culprit / unsure.")
WHERE = {"output": ("output_dir", "tracking_uri")}


@review_app.command("list")
@takes(fields=WHERE)
def list_cmd(opts: Opts = None) -> None:
    """Audits and their review status."""
    home, tracking_uri = opts.output.output_dir, opts.output.tracking_uri
    from tasks.paths import resolve_home
    from tasks.review.decisions import list_audits

    rows = list_audits(home, tracking_uri=tracking_uri)
    if not rows:
        err.print(f"no audits in {resolve_home(home) / 'audits'}", highlight=False, soft_wrap=True)
        return
    wide = out.width >= 110  # the 32-character MLflow run id fits
    table = Table(box=box.SIMPLE)
    for name in ("audit", "status", "queries", "candidates", "review", "decisions") + (("MLflow run",) if wide else ()):
        table.add_column(name, no_wrap=True)
    for r in rows:
        table.add_row(r["audit_id"], r["status"], str(r["n_queries"]), str(r["n_candidates"]), r["review_status"],
                      str(r["decisions"]), *([r["mlflow_run_id"] or ""] if wide else []))
    out.print(table)


@review_app.command("show")
@takes("audit_ref", fields=WHERE)
def show_cmd(audit_id: AuditArg = None,
             query: Annotated[list[str] | None, typer.Option(
                 "--query", help="Only this query id (repeatable; default: every query)")] = None,
             rows: Annotated[int, typer.Option(help="Candidates per query, from rank 1 (0: all)")] = 10,
             snippet_chars: Annotated[int | None, typer.Option(
                 help="Characters of each snippet (default: what fits the terminal's width on one line)")] = None,
             opts: Opts = None) -> None:
    """Candidates per query (rank, document, score, verdict so far; the snippet below) with the decisions so far.
    Ids are printed whole; lines fit the terminal (80 columns too)."""
    audit_id, home = audit_id_of(audit_id, opts), opts.output.output_dir
    from rich.markup import escape

    from tasks.review.decisions import audit_summary, candidates_to_show

    s = audit_summary(home, audit_id)
    shown = candidates_to_show(s, query or (), rows)
    width = max(out.width, 40)
    say = lambda text: out.print(text, highlight=False, soft_wrap=True)  # noqa: E731 (one place for the style)
    say(f"[bold]audit {audit_id}[/]: review [bold]{s['status']}[/] ({s['decided']} decided, {s['undecided']} "
        f"open; reviewers: {escape(', '.join(s['reviewers']) or '-')})")
    say(f"MLflow run {s['manifest'].get('mlflow_run_id')}")
    total = s["candidates"].group_by("query_id").len()
    per_query = dict(zip(total["query_id"].to_list(), total["len"].to_list(), strict=True))
    id_width = max([len(t) for t in shown["train_id"].to_list()] or [8])
    for (qid,), group in shown.group_by(["query_id"], maintain_order=True):
        first = group.row(0, named=True)
        say("")
        say(f"[bold]{escape(qid)}[/]  ({group.height} of {per_query[qid]} candidates)")
        say(escape(_cut(f"{first['query_prompt']!r} -> {first['query_completion']!r}", width)))
        for r in group.iter_rows(named=True):
            check = "" if "verified" not in group.columns or r["verified"] is None else (
                f"  {'verified' if r['verified'] else 'not verified'} {r['counterfactual_delta']:+.3g}/"
                f"{r['counterfactual_delta_down']:+.3g}")
            verdict = f"  {r['verdict']} ({r['reviewer']})" if r["verdict"] else ""
            say(escape(f"#{r['rank']:<3} {r['train_id']:<{id_width}}  {r['score']:>10.4g}{check}{verdict}"))
            limit = width - 5 if snippet_chars is None else snippet_chars
            say(escape("     " + _cut(" ".join(str(r["snippet"]).split()), limit)))
            if r["comment"]:
                say(escape("     comment: " + _cut(r["comment"], width - 14)))


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 1)] + "…"


@review_app.command("submit")
@takes("audit_ref", fields=WHERE)
def submit_cmd(audit_id: AuditArg = None, *,
               reviewer: Annotated[str, typer.Option("--reviewer", help="Your name or handle")],
               decision: Annotated[list[str] | None, typer.Option(
                   "--decision", help="QUERY_ID:TRAIN_ID:VERDICT[:comment], verdict culprit | not-culprit | unsure "
                                      "(repeatable)")] = None,
               file: Annotated[Path | None, typer.Option(
                   "--file", help="JSONL: {query_id, train_id, verdict, comment?} per line")] = None,
               opts: Opts = None) -> None:
    """Record decisions: flagged-documents Parquet, the audit's decisions, its MLflow run."""
    audit_id = audit_id_of(audit_id, opts)
    home, tracking_uri = opts.output.output_dir, opts.output.tracking_uri
    from tasks.review.decisions import parse_decision, read_decisions_file
    from tasks.review.runs import submit_decisions

    decisions = [parse_decision(spec) for spec in decision or []]
    if file is not None:
        decisions += read_decisions_file(file)
    r = submit_decisions(home, audit_id, reviewer, decisions, tracking_uri=tracking_uri)
    c = r["counts"]
    out.print(f"recorded {r['submitted']} decision(s) on audit {audit_id} (MLflow run {r['run_id']}): review "
              f"[bold]{r['status']}[/], {c['culprit']} culprit, {c['not-culprit']} not-culprit, {c['unsure']} unsure, "
              f"{r['undecided']} open -> {r['flagged_path']}")


@review_app.command("pull")
@takes("audit_ref", fields=WHERE)
def pull_cmd(audit_id: Annotated[str | None, typer.Argument(help="Audit id (default: every finished audit)")] = None,
             opts: Opts = None) -> None:
    """Record the culprit assessments made in the MLflow UI as decisions (changed or deleted ones too)."""
    audit_id = audit_id_of(audit_id, opts, required=False)
    home, tracking_uri = opts.output.output_dir, opts.output.tracking_uri
    from rich.markup import escape

    from influence_engine.errors import UserError
    from tasks.review.pull import pull_reviews

    results = pull_reviews(home, tracking_uri=tracking_uri, audit_id=audit_id)
    if not results:
        err.print("no finished audit with an MLflow run to pull")
    for r in results:
        if "error" in r:
            err.print(f"audit {escape(r['audit_id'])}: not pulled: {escape(r['error'])}", highlight=False,
                      soft_wrap=True)
            continue
        c = r["counts"]
        extra = f" ({r['retracted']} retracted)" if r["retracted"] else ""
        out.print(f"audit {r['audit_id']}: {r['recorded']} decision(s) recorded{extra} from {r['marks']} culprit "
                  f"mark(s) on {r['traces']} trace(s): review {r['status']}, {c['culprit']} culprit, "
                  f"{c['not-culprit']} not-culprit, {c['unsure']} unsure, {r['undecided']} open",
                  highlight=False, soft_wrap=True)
        for msg in r["refused"]:
            err.print(f"  refused: {escape(msg)}", highlight=False, soft_wrap=True)
    failed = [r for r in results if "error" in r]
    if failed:
        raise UserError(f"{len(failed)} of {len(results)} audit(s) not pulled (see above)")


@review_app.command("sync", hidden=True)
@takes("audit_ref", fields=WHERE)
def sync_cmd(audit_id: AuditArg = None, opts: Opts = None) -> None:
    """Rewrite the MLflow run's review table and tags from the decisions on disk (now part of
    `influence-audit sync`, the one verb from disk to MLflow)."""
    audit_id = audit_id_of(audit_id, opts)
    home, tracking_uri = opts.output.output_dir, opts.output.tracking_uri
    from tasks.review.decisions import record_review_in_mlflow

    r = record_review_in_mlflow(home, audit_id, tracking_uri=tracking_uri)
    out.print(f"audit {audit_id}: review {r['status']} recorded on MLflow run {r['run_id']}")
