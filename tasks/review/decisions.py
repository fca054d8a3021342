"""The human review of an audit: people mark candidates ``culprit`` / ``not-culprit`` / ``unsure``.

Influence scores are a screen, not a verdict. Decisions go to three places:

- ``<home>/flagged_documents.parquet``: every decision of every audit, appended (schema in
  :data:`FLAGGED_SCHEMA`); a training pipeline reads it to drop or down-weight documents (docs/review.md).
- ``<home>/audits/<audit_id>/review/decisions.parquet``: the same rows for one audit.
- the audit's MLflow run: table ``review_decisions.json`` (all decisions of the audit so far) and tags
  ``review.status`` (``in-progress`` / ``done``), ``review.culprit``, ``review.not_culprit``,
  ``review.unsure`` (pairs by their latest verdict), ``review.decisions``, ``review.reviewers``.

Appends are read-append-rename under an exclusive lock (filelock) on a sidecar ``.lock`` file, so
reviewers submitting at once lose no rows. Plain functions (no engine, no torch), plus two Prefect tasks
for the review flow.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import polars as pl
from filelock import FileLock
from prefect import task
from prefect.input import RunInput
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from influence_engine.atomic import atomic_path
from influence_engine.errors import UserError
from tasks.paths import resolve_home

__all__ = [
    "FLAGGED_SCHEMA",
    "RETRACTED",
    "REVIEW_TABLE",
    "VERDICTS",
    "ReviewDecision",
    "ReviewInput",
    "ReviewInputError",
    "FORM_TOP",
    "audit_summary",
    "candidates_to_show",
    "form_text",
    "check_review",
    "latest_verdicts",
    "list_audits",
    "load_candidates",
    "load_decisions",
    "parse_decision",
    "read_decisions_file",
    "record_review_in_mlflow",
    "resolve_home",
    "review_markdown",
    "submit_review",
    "valid_decisions",
]

Verdict = Literal["culprit", "not-culprit", "unsure"]
VERDICTS: tuple[str, ...] = ("culprit", "not-culprit", "unsure")
# Recorded by `review pull` when the MLflow assessment behind a pair's latest decision is deleted: the pair is
# undecided again. Never accepted as input.
RETRACTED = "retracted"
REVIEW_TABLE = "review_decisions.json"
FLAGGED_FILE = "flagged_documents.parquet"
FLAGGED_SCHEMA: dict[str, Any] = {
    "train_id": pl.String, "content_hash": pl.String, "audit_id": pl.String, "query_id": pl.String,
    "verdict": pl.String, "reviewer": pl.String, "comment": pl.String,
    "decided_at": pl.Datetime("us", "UTC"),
}
_STATUS_TAG = "review.status"


class ReviewInputError(UserError):
    """The decisions do not fit the audit (unknown pairs, duplicates, no reviewer): nothing was written."""


class ReviewDecision(BaseModel):
    """One reviewer's verdict on one candidate (a query and a training document of the audit)."""

    model_config = ConfigDict(extra="forbid")

    query_id: str = Field(min_length=1, description="Query id, as in the candidate list")
    train_id: str = Field(min_length=1, description="Training document id, as in the candidate list")
    verdict: Verdict = Field(description="culprit | not-culprit | unsure")
    comment: str = Field("", description="Why (optional)")


class ReviewInput(RunInput):
    """What a reviewer submits: their name and at least one decision (a form in the Prefect UI)."""

    reviewer: str = Field(min_length=1, pattern=r"\S", description="Your name or handle")
    decisions: list[ReviewDecision] = Field(min_length=1, description="One entry per candidate you decided")


# ------------------------------------------------------------------------------------------ locating


def _manifests(home: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path in sorted((home / "audits").glob("*/manifest.json")):
        try:
            out[path.parent.name] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            out[path.parent.name] = {"status": "unreadable manifest"}
    return out


def _manifest(home: Path, audit_id: str) -> dict[str, Any]:
    manifests = _manifests(home)
    if audit_id not in manifests:
        known = ", ".join(manifests) or "none"
        raise UserError(f"no audit {audit_id!r} in {home / 'audits'} (known: {known})",
                        hint="`influence-audit review list --home DIR` shows the audits of a home directory")
    return manifests[audit_id]


def load_candidates(home: str | os.PathLike[str] | None, audit_id: str) -> pl.DataFrame:
    """The audit's ``candidates.parquet``; UserError for an unknown audit or one without candidates."""
    h = resolve_home(home)
    manifest = _manifest(h, audit_id)
    path = h / "audits" / audit_id / "candidates.parquet"
    if not path.exists():
        raise UserError(f"audit {audit_id} has no candidates.parquet (status: {manifest.get('status', '?')})",
                        hint="only a finished audit can be reviewed; rerun the audit to finish it")
    return pl.read_parquet(path)


def _decisions_path(home: Path, audit_id: str) -> Path:
    return home / "audits" / audit_id / "review" / "decisions.parquet"


def _empty_decisions() -> pl.DataFrame:
    return pl.DataFrame(schema=FLAGGED_SCHEMA)


def load_decisions(home: str | os.PathLike[str] | None, audit_id: str) -> pl.DataFrame:
    """All decisions recorded for the audit so far, in submission order (empty frame if none)."""
    path = _decisions_path(resolve_home(home), audit_id)
    return pl.read_parquet(path) if path.exists() else _empty_decisions()


def latest_verdicts(decisions: pl.DataFrame) -> pl.DataFrame:
    """One row per (query_id, train_id): the last decision submitted (later submissions win). A pair whose
    last row is a retraction (its MLflow assessment was deleted) is undecided again and left out."""
    latest = decisions.unique(["query_id", "train_id"], keep="last", maintain_order=True)
    return latest.filter(pl.col("verdict") != RETRACTED)


def _review_state(candidates: pl.DataFrame, decisions: pl.DataFrame) -> dict[str, Any]:
    latest = latest_verdicts(decisions)
    pairs = candidates.select("query_id", "train_id").unique()
    undecided = pairs.join(latest.select("query_id", "train_id"), on=["query_id", "train_id"], how="anti").height
    counts = {v: int((latest["verdict"] == v).sum()) for v in VERDICTS}
    return {"status": "open" if latest.is_empty() else ("done" if undecided == 0 else "in-progress"),
            "counts": counts, "decided": latest.height, "undecided": undecided,
            "reviewers": sorted(set(decisions["reviewer"].to_list()))}


def _tracking_uri(manifest: dict[str, Any], tracking_uri: str | None) -> str | None:
    return tracking_uri or (manifest.get("params") or {}).get("tracking_uri")


def _mlflow_review_status(home: Path, manifest: dict[str, Any], tracking_uri: str | None) -> str | None:
    """The run's ``review.status`` tag, or None when MLflow is not reachable (or has no such run)."""
    run_id = manifest.get("mlflow_run_id")
    uri = _tracking_uri(manifest, tracking_uri) or os.environ.get("MLFLOW_TRACKING_URI")
    if not run_id or (not uri and not (home / "mlflow.db").exists()):
        return None
    try:
        from tasks.record.tracker import configure_tracking, tracker

        configure_tracking(uri, home)
        return tracker().tags(run_id).get(_STATUS_TAG)
    except Exception:  # unreachable server, deleted run: the local state answers instead
        return None


def list_audits(home: str | os.PathLike[str] | None, *, tracking_uri: str | None = None,
                mlflow: bool = True) -> list[dict[str, Any]]:
    """Every audit under ``<home>/audits``: audit_id, status, mlflow_run_id, n_queries, n_candidates,
    review_status (the MLflow tag when reachable, else derived from the local decisions) and decisions."""
    h = resolve_home(home)
    rows = []
    for audit_id, manifest in _manifests(h).items():
        cpath = h / "audits" / audit_id / "candidates.parquet"
        cands = pl.read_parquet(cpath, columns=["query_id", "train_id"]) if cpath.exists() else None
        decisions = load_decisions(h, audit_id)
        local = (_review_state(cands, decisions)["status"] if cands is not None and
                 manifest.get("status") == "succeeded" else "none")
        remote = _mlflow_review_status(h, manifest, tracking_uri) if mlflow else None
        rows.append({"audit_id": audit_id, "status": manifest.get("status", "running"),
                     "mlflow_run_id": manifest.get("mlflow_run_id"),
                     "n_queries": cands["query_id"].n_unique() if cands is not None else 0,
                     "n_candidates": cands.height if cands is not None else 0,
                     "review_status": remote or local, "decisions": decisions.height})
    return rows


def audit_summary(home: str | os.PathLike[str] | None, audit_id: str) -> dict[str, Any]:
    """Candidates, decisions so far and the derived review state of one audit."""
    h = resolve_home(home)
    cands = load_candidates(h, audit_id)
    decisions = load_decisions(h, audit_id)
    return {"audit_id": audit_id, "manifest": _manifest(h, audit_id), "candidates": cands,
            "decisions": decisions, **_review_state(cands, decisions)}


def candidates_to_show(summary: dict[str, Any], queries: Sequence[str] = (), rows: int = 10) -> pl.DataFrame:
    """The candidates ``review show`` prints: of ``queries`` (all when empty), the top ``rows`` per query (all when
    0), each with its latest ``verdict``, ``reviewer`` and ``comment`` (empty when undecided). UserError names an
    unknown query id and the known ones."""
    cands: pl.DataFrame = summary["candidates"]
    known = cands["query_id"].unique().sort().to_list()
    unknown = [q for q in queries if q not in known]
    if unknown:
        shown = ", ".join(known[:10]) + (f" (+{len(known) - 10} more)" if len(known) > 10 else "")
        raise UserError(f"audit {summary['audit_id']} has no query {unknown[0]!r} (its queries: {shown})")
    if queries:
        cands = cands.filter(pl.col("query_id").is_in(list(queries)))
    if rows > 0:
        cands = cands.filter(pl.col("rank") <= rows)
    latest = latest_verdicts(summary["decisions"]).select("query_id", "train_id", "verdict", "reviewer", "comment")
    return cands.join(latest, on=["query_id", "train_id"], how="left").with_columns(
        pl.col("verdict", "reviewer", "comment").fill_null("")).sort(["query_id", "rank"])


# ------------------------------------------------------------------------------------------ input


def parse_decision(spec: str) -> ReviewDecision:
    """``QUERY_ID:TRAIN_ID:VERDICT[:comment]`` (the comment may contain colons; ids may not)."""
    parts = spec.split(":", 3)
    if len(parts) < 3:
        raise ReviewInputError(f"--decision {spec!r}: expected QUERY_ID:TRAIN_ID:VERDICT[:comment]",
                               hint="ids with a colon need --file decisions.jsonl")
    return _decision({"query_id": parts[0], "train_id": parts[1], "verdict": parts[2],
                      "comment": parts[3] if len(parts) == 4 else ""}, f"--decision {spec!r}")


def _decision(obj: Any, where: str) -> ReviewDecision:
    try:
        return ReviewDecision.model_validate(obj)
    except ValidationError as exc:
        e = exc.errors()[0]
        field = ".".join(str(x) for x in e["loc"]) or "row"
        got = f" (got {e['input']!r})" if field == "verdict" else ""
        msg = f"verdict must be one of {', '.join(VERDICTS)}{got}" if field == "verdict" else e["msg"]
        raise ReviewInputError(f"{where}: {field}: {msg}") from None


def read_decisions_file(path: str | os.PathLike[str]) -> list[ReviewDecision]:
    """A JSONL file of ``{"query_id", "train_id", "verdict", "comment"?}`` objects (blank lines skipped)."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ReviewInputError(f"{p}: cannot read ({exc.__class__.__name__}: {exc})") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ReviewInputError(f"{p}:{i}: not JSON ({exc})") from None
        out.append(_decision(obj, f"{p}:{i}"))
    return out


def check_review(candidates: pl.DataFrame, reviewer: str, decisions: Sequence[ReviewDecision]) -> None:
    """Raise :class:`ReviewInputError` unless the reviewer is named and every pair is a candidate, once."""
    if not reviewer or not reviewer.strip():
        raise ReviewInputError("a reviewer name is required (--reviewer NAME)")
    if not decisions:
        raise ReviewInputError("no decisions given (--decision QUERY_ID:TRAIN_ID:VERDICT or --file)")
    known = set(zip(candidates["query_id"].to_list(), candidates["train_id"].to_list(), strict=True))
    pairs = [(d.query_id, d.train_id) for d in decisions]
    unknown = [p for p in dict.fromkeys(pairs) if p not in known]
    if unknown:
        shown = ", ".join(f"{q}:{t}" for q, t in unknown[:5]) + (f" (+{len(unknown) - 5} more)"
                                                                 if len(unknown) > 5 else "")
        raise ReviewInputError(f"not candidates of this audit: {shown}",
                               hint="`influence-audit review show AUDIT` lists the query and document ids")
    seen: set[tuple[str, str]] = set()
    for p in pairs:
        if p in seen:
            raise ReviewInputError(f"{p[0]}:{p[1]} is decided twice in one submission")
        seen.add(p)


# ------------------------------------------------------------------------------------------ writing


def _locked(path: Path) -> FileLock:
    """Exclusive lock on ``<path>.lock`` (blocks until the other writer is done)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path.with_name(path.name + ".lock"))


def _append(path: Path, rows: pl.DataFrame) -> pl.DataFrame:
    """Read-append-atomic-rename (call under :func:`_locked`); returns the whole table."""
    table = pl.concat([pl.read_parquet(path), rows], how="vertical") if path.exists() else rows
    with atomic_path(path) as tmp:
        table.write_parquet(tmp)
    return table


def _content_hashes(audit_dir: Path, train_ids: Iterable[str]) -> dict[str, str]:
    from tasks.inputs.rows import content_hash  # loads the engine (torch): only for audits with copied shards

    wanted = set(train_ids)
    out: dict[str, str] = {}
    for ids in sorted((audit_dir / "inputs").glob("ids-*.parquet")):  # the shard manifest's ids and hashes
        found = pl.read_parquet(ids, columns=["id", "content_hash"]).filter(pl.col("id").is_in(list(wanted)))
        out |= dict(zip(found["id"].to_list(), found["content_hash"].to_list(), strict=True))
    for shard in sorted((audit_dir / "inputs").glob("train-*.parquet")):  # audits from before: copied shards
        cols = [c for c in pl.read_parquet_schema(shard) if c in ("id", "text", "prompt", "completion")]
        for row in pl.read_parquet(shard, columns=cols).filter(pl.col("id").is_in(list(wanted))).iter_rows(
                named=True):
            out[row["id"]] = content_hash(row)
    missing = wanted - out.keys()
    if missing:
        raise UserError(f"documents {sorted(missing)[:5]} are not in {audit_dir / 'inputs'}",
                        hint="the audit's input shards are incomplete; rerun the audit")
    return out


def _rows(audit_id: str, audit_dir: Path, reviewer: str, decisions: Sequence[ReviewDecision]) -> pl.DataFrame:
    hashes = _content_hashes(audit_dir, (d.train_id for d in decisions))
    now = datetime.now(timezone.utc)
    return pl.DataFrame({"train_id": [d.train_id for d in decisions],
                         "content_hash": [hashes[d.train_id] for d in decisions],
                         "audit_id": [audit_id] * len(decisions), "query_id": [d.query_id for d in decisions],
                         "verdict": [d.verdict for d in decisions], "reviewer": [reviewer.strip()] * len(decisions),
                         "comment": [d.comment for d in decisions], "decided_at": [now] * len(decisions)},
                        schema=FLAGGED_SCHEMA)


def _run_id(manifest: dict[str, Any], audit_id: str) -> str:
    run_id = manifest.get("mlflow_run_id")
    if not run_id:
        raise UserError(f"audit {audit_id} has no MLflow run in its manifest.json",
                        hint="rerun the audit (or `influence-audit sync`) so it is recorded in MLflow first")
    return str(run_id)


def _record(run_id: str, decisions: pl.DataFrame, state: dict[str, Any]) -> None:
    """Replace ``review_decisions.json`` (``log_table`` would append) and set the ``review.*`` tags."""
    from tasks.record.tracker import tracker

    t = tracker()
    t.replace_table(run_id, decisions.with_columns(pl.col("decided_at").dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ")),
                    REVIEW_TABLE)
    t.set_tags(run_id, {_STATUS_TAG: state["status"], "review.culprit": state["counts"]["culprit"],
                        "review.not_culprit": state["counts"]["not-culprit"],
                        "review.unsure": state["counts"]["unsure"], "review.decisions": decisions.height,
                        "review.reviewers": ",".join(state["reviewers"])})


def _check_run(run_id: str) -> None:
    from tasks.record.tracker import is_not_found, tracker

    try:
        run = tracker().run(run_id)
    except Exception as exc:
        if is_not_found(exc):
            raise UserError(f"MLflow run {run_id} not found at the tracking URI in use",
                            hint="pass --tracking-uri (or MLFLOW_TRACKING_URI) of the audit's store") from None
        raise
    if run.info.lifecycle_stage == "deleted":
        raise UserError(f"MLflow run {run_id} is deleted", hint="restore it with `mlflow runs restore`")


def record_review_in_mlflow(home: str | os.PathLike[str] | None, audit_id: str, *,
                            tracking_uri: str | None = None) -> dict[str, Any]:
    """(Re)write the audit's ``review_decisions.json`` and ``review.*`` tags from the local decisions."""
    from tasks.record.tracker import configure_tracking

    h = resolve_home(home)
    manifest = _manifest(h, audit_id)
    with _locked(_decisions_path(h, audit_id)):
        configure_tracking(_tracking_uri(manifest, tracking_uri), h)
        run_id = _run_id(manifest, audit_id)
        decisions = load_decisions(h, audit_id)
        state = _review_state(load_candidates(h, audit_id), decisions)
        if not decisions.is_empty():
            _record(run_id, decisions, state)
    return {"audit_id": audit_id, "run_id": run_id, **state}


def submit_review(home: str | os.PathLike[str] | None, audit_id: str, reviewer: str,
                  decisions: Sequence[ReviewDecision | dict[str, Any]], *,
                  tracking_uri: str | None = None) -> dict[str, Any]:
    """Validate and record one reviewer's decisions on an audit's candidates.

    Appends to ``<home>/flagged_documents.parquet`` and ``<audit>/review/decisions.parquet`` (under
    exclusive locks), then replaces the MLflow run's ``review_decisions.json`` and sets the ``review.*``
    tags. Invalid input raises :class:`ReviewInputError` and writes nothing. Returns audit_id, run_id,
    status, counts (pairs by latest verdict), decided, undecided, reviewers, submitted, flagged_path.
    """
    from tasks.record.tracker import configure_tracking

    h = resolve_home(home)
    manifest = _manifest(h, audit_id)
    audit_dir = h / "audits" / audit_id
    cands = load_candidates(h, audit_id)
    items = [d if isinstance(d, ReviewDecision) else _decision(d, f"decision {i + 1}")
             for i, d in enumerate(decisions)]
    check_review(cands, reviewer, items)
    run_id = _run_id(manifest, audit_id)
    configure_tracking(_tracking_uri(manifest, tracking_uri), h)
    _check_run(run_id)
    rows = _rows(audit_id, audit_dir, reviewer, items)
    flagged = h / FLAGGED_FILE
    # Lock order: the audit's decisions, then the home's flagged file (every writer takes them so).
    with _locked(_decisions_path(h, audit_id)):
        with _locked(flagged):
            all_decisions = _append(_decisions_path(h, audit_id), rows)
            _append(flagged, rows)
        state = _review_state(cands, all_decisions)
        try:
            _record(run_id, all_decisions, state)
        except UserError as exc:
            raise UserError(f"decisions saved in {flagged}, but not yet on the MLflow run: {exc.message}",
                            hint=f"`influence-audit sync --audit {audit_id}` records them once MLflow is back"
                            ) from exc
    return {"audit_id": audit_id, "run_id": run_id, **state, "submitted": rows.height,
            "flagged_path": str(flagged)}


# ------------------------------------------------------------------------------------------ Prefect


def review_markdown(summary: dict[str, Any], *, message: str = "", max_snippet: int = 160,
                    max_rank: int | None = None) -> str:
    """The candidate list (per query: rank, document, score, snippet, latest verdict) as markdown;
    ``max_rank`` keeps the top candidates of each query only."""
    cands: pl.DataFrame = summary["candidates"]
    if max_rank is not None and cands["rank"].max() > max_rank:
        cands = cands.filter(pl.col("rank") <= max_rank)
    latest = {(r["query_id"], r["train_id"]): r for r in latest_verdicts(summary["decisions"]).iter_rows(named=True)}
    aid = summary["audit_id"]
    lines = [f"# Review influence audit `{aid}`", ""]
    if message:
        lines += [f"> **Your last input was refused:** {message}", ""]
    lines += [f"MLflow run `{summary['manifest'].get('mlflow_run_id')}`. Review status: **{summary['status']}** "
              f"({summary['decided']} decided, {summary['undecided']} open). Scores are a screen, not a verdict.",
              "", "Resume this flow run with: your name (`reviewer`) and `decisions`, each a `query_id`, "
              "`train_id`, `verdict` (`culprit` | `not-culprit` | `unsure`) and an optional `comment`. "
              f"Or in a terminal: `influence-audit review submit {aid} --reviewer NAME "
              "--decision QUERY_ID:TRAIN_ID:VERDICT[:comment]`.", ""]
    for (qid,), group in cands.sort(["query_id", "rank"]).group_by(["query_id"], maintain_order=True):
        first = group.row(0, named=True)
        checked = "verified" in group.columns
        lines += [f"## `{qid}`", "", f"*{_md(first['query_prompt'])}* → **{_md(first['query_completion'])}**", "",
                  "| rank | train_id | score |" + (" check (Δ up / down, nats) |" if checked else "")
                  + " snippet | verdict |", "|---|---|---|" + ("---|" if checked else "") + "---|---|"]
        for r in group.iter_rows(named=True):
            d = latest.get((qid, r["train_id"]))
            verdict = f"{d['verdict']} ({_md(d['reviewer'])})" if d else ""
            check = "" if not checked else (" |" if r["verified"] is None else
                                            f" {'verified' if r['verified'] else 'not verified'} "
                                            f"{r['counterfactual_delta']:+.3g} / "
                                            f"{r['counterfactual_delta_down']:+.3g} |")
            lines.append(f"| {r['rank']} | `{r['train_id']}` | {r['score']:.4g} |{check} "
                         f"{_md(str(r['snippet'])[:max_snippet])} | {verdict} |")
        lines.append("")
    return "\n".join(lines)


def _md(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def artifact_key(audit_id: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    safe = "".join(c if c.isalnum() or c == "-" else "-" for c in audit_id.lower())
    return f"audit-{safe}-review-form"


FORM_TOP = 3  # candidates per query shown above the Prefect form (the artifact has them all)


def form_text(summary: dict[str, Any], *, message: str = "", top: int = FORM_TOP) -> str:
    """What the Prefect form shows above its fields: the review status and the top ``top`` candidates per query
    with their current verdicts."""
    return review_markdown(summary, message=message, max_rank=top) + (
        f"\n\nThe top {top} candidates of each query are shown; the full list is the artifact "
        f"`{artifact_key(summary['audit_id'])}`.")


@task(name="publish-review-form")
def publish_review_form(home: str, audit_id: str, message: str = "", form_top: int = FORM_TOP) -> str:
    """Render all candidates as a Prefect markdown artifact; returns the text shown above the input form
    (the top ``form_top`` candidates of each query)."""
    from prefect.artifacts import create_markdown_artifact

    summary = audit_summary(home, audit_id)
    create_markdown_artifact(key=artifact_key(audit_id), markdown=review_markdown(summary, message=message),
                             description=f"Review audit {audit_id}")
    return form_text(summary, message=message, top=form_top)


@task(name="check-review-input")
def check_review_input(home: str, audit_id: str, reviewer: str, decisions: list[ReviewDecision]) -> str | None:
    """None if the input fits the audit, else the reason (the flow pauses again with it)."""
    try:
        check_review(load_candidates(home, audit_id), reviewer, decisions)
    except ReviewInputError as exc:
        return str(exc)
    return None


def valid_decisions(candidates: pl.DataFrame, decisions: Sequence[ReviewDecision]) -> list[ReviewDecision]:
    """The decisions that name a candidate, each pair once (the first): what a refused form keeps."""
    known = set(zip(candidates["query_id"].to_list(), candidates["train_id"].to_list(), strict=True))
    out, seen = [], set()
    for d in decisions:
        if (d.query_id, d.train_id) in known and (d.query_id, d.train_id) not in seen:
            seen.add((d.query_id, d.train_id))
            out.append(d)
    return out


@task(name="valid-decisions")
def valid_decisions_task(home: str, audit_id: str, decisions: list[ReviewDecision]) -> list[ReviewDecision]:
    """:func:`valid_decisions` of the audit's candidates (the refused form is shown again with these)."""
    return valid_decisions(load_candidates(home, audit_id), decisions)
