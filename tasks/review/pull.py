"""``review pull``: reviewers' ``culprit`` assessments in MLflow become decisions, exactly as ``review submit``
records them (the audit's ``review/decisions.parquet``, ``<home>/flagged_documents.parquet``, the run's
``review_decisions.json`` table and ``review.*`` tags).

Per candidate (query, document), the assessment that counts is the latest-updated valid one (an assessment
edited in the UI overrides the old one, which MLflow marks invalid). A pull compares that with what the
previous pull recorded (``review/mlflow_marks.json``) and appends a decision row only for pairs whose mark is
new or changed, so pulling twice records nothing twice. A pair whose mark was deleted gets a ``retracted``
row (undecided again) when that mark was still the pair's latest decision; a later ``review submit`` for the
pair stays in force. Assessments that cannot be decisions are refused: the pull reports them and tags
their trace ``influence_audit.refused`` with the reason, so nothing a reviewer marked is dropped silently.

The rows are appended before the state file is rewritten: a crash in between makes the next pull append
the same decisions again (harmless: the latest row per pair is unchanged), never lose one.

A cheap watermark comes first where it pays (``if_changed``, the ``review-pull`` deployment every minute): one
search of the audit's traces without their spans gives the ids, validity and update times of its ``culprit``
assessments; when they hash to the watermark the last pull stored, nothing changed and nothing else is read
(no spans, no candidates, no locks, no MLflow writes).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl
from prefect import task

from influence_engine.atomic import write_json_atomic
from tasks.paths import resolve_home
from tasks.record.traces import (
    ASSESSMENT_NAME,
    CulpritMark,
    audit_traces,
    read_culprit_assessments,
    refusal,
    show_refusals,
)
from tasks.review.decisions import (
    FLAGGED_FILE,
    FLAGGED_SCHEMA,
    RETRACTED,
    _append,
    _content_hashes,
    _decisions_path,
    _locked,
    _manifest,
    _manifests,
    _record,
    _review_state,
    _run_id,
    _tracking_uri,
    load_candidates,
    load_decisions,
)
from tasks.review.runs import refresh_forms

__all__ = ["MARKS_FILE", "marks_watermark", "pull_review", "pull_reviews", "pull_reviews_task"]

MARKS_FILE = "mlflow_marks.json"
_SEP = "\x1f"


def _marks_path(home: Path, audit_id: str) -> Path:
    return home / "audits" / audit_id / "review" / MARKS_FILE


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def marks_watermark(traces: Iterable[Any]) -> str:
    """A hash of the audit's traces and of their ``culprit`` assessments (id, validity, last update): it changes
    whenever a mark is added, edited (overridden), deleted, or a trace is added."""
    traces = list(traces)
    marks = sorted((a.assessment_id, a.valid is not False, int(a.last_update_time_ms or a.create_time_ms or 0))
                   for t in traces for a in (t.info.assessments or []) if a.name == ASSESSMENT_NAME)
    return hashlib.sha256(json.dumps([sorted(t.info.trace_id for t in traces), marks]).encode()).hexdigest()[:32]


def _effective(marks: list[CulpritMark]) -> dict[str, dict[str, Any]]:
    """pair key -> the latest-updated mark on that pair (ties: the larger assessment id, for a stable answer)."""
    out: dict[str, CulpritMark] = {}
    for m in marks:
        key = f"{m.query_id}{_SEP}{m.train_id}"
        cur = out.get(key)
        if cur is None or (m.updated_ms, m.assessment_id) > (cur.updated_ms, cur.assessment_id):
            out[key] = m
    return {k: {"assessment_id": m.assessment_id, "verdict": m.verdict, "reviewer": m.reviewer,
                "comment": m.comment, "updated_ms": m.updated_ms} for k, m in out.items()}


def _same(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    fields = ("assessment_id", "verdict", "reviewer", "comment")
    return a is not None and b is not None and all(a.get(f) == b.get(f) for f in fields)


def _latest_rows(decisions: pl.DataFrame) -> dict[str, dict[str, Any]]:
    latest = decisions.unique(["query_id", "train_id"], keep="last", maintain_order=True)
    return {f"{r['query_id']}{_SEP}{r['train_id']}": r for r in latest.iter_rows(named=True)}


def _changes(before: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]],
             decisions: pl.DataFrame) -> list[dict[str, Any]]:
    """Decision rows (query_id, train_id, verdict, reviewer, comment) for the marks that changed."""
    latest = _latest_rows(decisions)
    rows = []
    for key in sorted(set(before) | set(now), key=lambda k: (now.get(k) or before[k])["updated_ms"]):
        qid, tid = key.split(_SEP, 1)
        old, new = before.get(key), now.get(key)
        if new is not None and not _same(old, new):
            rows.append({"query_id": qid, "train_id": tid, "verdict": new["verdict"], "reviewer": new["reviewer"],
                         "comment": new["comment"]})
        elif new is None and old is not None:
            last = latest.get(key)
            if last is not None and (last["verdict"], last["reviewer"], last["comment"]) == (
                    old["verdict"], old["reviewer"], old["comment"]):
                rows.append({"query_id": qid, "train_id": tid, "verdict": RETRACTED, "reviewer": old["reviewer"],
                             "comment": f"culprit assessment {old['assessment_id']} deleted in MLflow"})
    return rows


def _frame(audit_id: str, audit_dir: Path, rows: list[dict[str, Any]]) -> pl.DataFrame:
    hashes = _content_hashes(audit_dir, (r["train_id"] for r in rows))
    now = datetime.now(timezone.utc)
    return pl.DataFrame([{"train_id": r["train_id"], "content_hash": hashes[r["train_id"]], "audit_id": audit_id,
                          "query_id": r["query_id"], "verdict": r["verdict"], "reviewer": r["reviewer"],
                          "comment": r["comment"], "decided_at": now} for r in rows], schema=FLAGGED_SCHEMA)


def pull_review(home: str | os.PathLike[str] | None, audit_id: str, *,
                tracking_uri: str | None = None, if_changed: bool = False) -> dict[str, Any]:
    """Record the audit's current ``culprit`` assessments from MLflow as decisions (see the module docstring).

    Returns audit_id, run_id, traces (how many the audit has), marks (current assessments), recorded
    (decision rows appended), retracted (of those, retractions), refused (messages), and the review state
    (status, counts, decided, undecided, reviewers), as ``review submit`` does. With ``if_changed``, an audit
    whose marks match the last pull's watermark returns at once: audit_id, run_id, ``unchanged: True``,
    recorded 0, refused [].
    """
    from tasks.record.tracker import configure_tracking, tracker

    h = resolve_home(home)
    manifest = _manifest(h, audit_id)
    audit_dir = h / "audits" / audit_id
    run_id = _run_id(manifest, audit_id)
    configure_tracking(_tracking_uri(manifest, tracking_uri), h)
    state_path = _marks_path(h, audit_id)
    before = _read_state(state_path)
    known_exp = before.get("experiment_id") if before.get("run_id") == run_id else None
    experiment_id = str(known_exp or tracker().experiment_of(run_id))
    if if_changed:
        if before.get("watermark") and before.get("watermark") == marks_watermark(
                audit_traces(experiment_id, audit_id)):
            return {"audit_id": audit_id, "run_id": run_id, "unchanged": True, "recorded": 0, "retracted": 0,
                    "refused": []}
    cands = load_candidates(h, audit_id)
    read = read_culprit_assessments(experiment_id, audit_id)
    known = set(zip(cands["query_id"].to_list(), cands["train_id"].to_list(), strict=True))
    marks, refusals = [], list(read.refusals)
    for m in read.marks:
        if (m.query_id, m.train_id) in known:
            marks.append(m)
        else:
            refusals.append(refusal(m.trace_id, m.assessment_id, m.span_id or None, m.reviewer,
                                    f"{m.query_id}:{m.train_id} is not a candidate of audit {audit_id}"))
    now = _effective(marks)
    flagged = h / FLAGGED_FILE
    with _locked(_decisions_path(h, audit_id)):
        decisions = load_decisions(h, audit_id)
        rows = _changes(dict(_read_state(state_path).get("pairs") or {}), now, decisions)  # again, locked
        if rows:
            frame = _frame(audit_id, audit_dir, rows)
            with _locked(flagged):
                decisions = _append(_decisions_path(h, audit_id), frame)
                _append(flagged, frame)
        write_json_atomic(state_path, {"audit_id": audit_id, "run_id": run_id, "experiment_id": experiment_id,
                                       "pairs": now,
                                       "watermark": marks_watermark(read.traces)})
        state = _review_state(cands, decisions)
        if rows:
            _record(run_id, decisions, state)
    show_refusals(read.traces, refusals)
    if rows:
        refresh_forms(h, audit_id)
    messages = [r.message for r in refusals]
    return {"audit_id": audit_id, "run_id": run_id, "traces": len(read.traces), "marks": len(marks),
            "recorded": len(rows), "retracted": sum(r["verdict"] == RETRACTED for r in rows), "refused": messages,
            "flagged_path": str(flagged), **state}


def pull_reviews(home: str | os.PathLike[str] | None, *, tracking_uri: str | None = None,
                 audit_id: str | None = None, if_changed: bool = False) -> list[dict[str, Any]]:
    """:func:`pull_review` for ``audit_id``, else for every succeeded audit with an MLflow run; an audit that
    fails to pull (MLflow unreachable, run deleted) gets ``{"audit_id", "error"}`` and the others go on."""
    from influence_engine.errors import UserError

    h = resolve_home(home)
    if audit_id is not None:
        return [pull_review(h, audit_id, tracking_uri=tracking_uri, if_changed=if_changed)]
    out: list[dict[str, Any]] = []
    for aid, manifest in _manifests(h).items():
        if manifest.get("status") != "succeeded" or not manifest.get("mlflow_run_id"):
            continue
        try:
            out.append(pull_review(h, aid, tracking_uri=tracking_uri, if_changed=if_changed))
        except UserError as exc:
            out.append({"audit_id": aid, "error": str(exc)})
    return out


@task(name="pull-review")
def pull_reviews_task(home: str | None = None, audit_id: str | None = None,
                      tracking_uri: str | None = None, if_changed: bool = True) -> list[dict[str, Any]]:
    """:func:`pull_reviews` as a Prefect task (the ``review-pull`` deployment): audits whose marks did not change
    since the last pull are skipped after one cheap search."""
    return pull_reviews(home, tracking_uri=tracking_uri, audit_id=audit_id, if_changed=if_changed)
