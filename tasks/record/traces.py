"""An audit's candidates as MLflow traces, where reviewers mark culprits, and the marks read back.

One trace per audited query, in the audit run's experiment, linked to the run (``mlflow.sourceRun``) and
tagged ``influence_audit.audit_id`` and ``influence_audit.query_id``:

- the root span (type CHAIN) is named by the query id alone, which makes it the trace's name (the UI's
  "Trace name" column and search); it has the query id and the prompt as input, the completion as output;
- one child span per candidate (type RETRIEVER, so MLflow renders its output as a document), named
  ``#<rank> · <score> · "<start of the text>…"`` (:func:`span_name`) so the span list reads as a ranked list,
  with the document text (up to :data:`TEXT_LIMIT` characters) and the attributes
  ``influence_audit.train_id``, ``.score``, ``.rank``, ``.layer_scores`` (per-layer breakdown, when the
  candidate was explained) and ``.counterfactual_delta`` / ``.counterfactual_delta_down`` / ``.verified`` when
  candidates.parquet has them.

A reviewer opens a trace in the MLflow UI, selects a candidate's span and adds a feedback assessment named
``culprit``: true (culprit), false (not a culprit) or the string ``unsure``, with an optional rationale; its
source id is the reviewer. :func:`read_culprit_assessments` reads them back through MLflow's search API.
A mark that cannot count (on the query's root span or the whole trace, an unreadable value) is answered on the
trace itself, where the reviewer looks: :func:`show_refusals` adds a feedback :data:`REFUSAL_NAME` beside it
(on the same span) saying why and what to do, and removes it once the mark is fixed.

Recording is idempotent: queries that already have a trace for the audit are skipped, so a rerun, ``sync``
or a retried task adds none twice. Trace export is asynchronous in MLflow: we flush and then check that
every query's trace is there, so an unreachable server is an error, not a silent gap.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import polars as pl
from prefect import task

__all__ = [
    "AUDIT_TAG",
    "PULL_SOURCE",
    "REFUSES_KEY",
    "Refusal",
    "ASSESSMENT_NAME",
    "QUERY_TAG",
    "REFUSAL_NAME",
    "REFUSED_TAG",
    "TEXT_LIMIT",
    "CulpritMark",
    "ReadMarks",
    "audit_traces",
    "document_texts",
    "parse_culprit_value",
    "read_culprit_assessments",
    "record_candidate_traces",
    "record_traces",
    "refusal",
    "show_refusals",
    "span_name",
]

AUDIT_TAG = "influence_audit.audit_id"
QUERY_TAG = "influence_audit.query_id"
REFUSED_TAG = "influence_audit.refused"  # on a trace: why one of its culprit assessments was not recorded
ASSESSMENT_NAME = "culprit"
# A feedback the pull adds beside a refused mark (same span), in the assessments pane the reviewer is looking at.
REFUSAL_NAME = "culprit not recorded"
REFUSES_KEY = "influence_audit.refuses"  # its metadata: the id of the refused assessment
PULL_SOURCE = "influence-audit review pull"
ATTR = "influence_audit."
TEXT_LIMIT = 4000  # characters of each document shown on its span (the UI shows the whole output)
_TAG_MAX = 4000


def _filter(audit_id: str) -> str:
    from tasks.record.tracker import _filter_value

    return f"tag.`{AUDIT_TAG}` = {_filter_value(audit_id)}"


def audit_traces(experiment_id: str, audit_id: str, *, include_spans: bool = False) -> list[Any]:
    """Every trace of ``audit_id`` in the experiment (MLflow ``Trace`` objects, assessments included)."""
    from tasks.record.tracker import tracker

    return tracker().search_traces(experiment_id, _filter(audit_id), include_spans=include_spans)


def _query_ids(traces: Iterable[Any]) -> set[str]:
    return {t.info.tags[QUERY_TAG] for t in traces if QUERY_TAG in t.info.tags}


def document_texts(audit_dir: str | os.PathLike[str], train_ids: Iterable[str],
                   limit: int = TEXT_LIMIT) -> dict[str, str]:
    """The text of each document (``text``, ``prompt + completion`` or the chat turns) read through the audit's
    shard manifest, cut to ``limit`` characters; documents not found are left out (their snippet stands in)."""
    from tasks.inputs.shards import documents_by_id, shards_of

    out: dict[str, str] = {}
    for tid, row in documents_by_id(shards_of(audit_dir), set(train_ids)).items():
        if row.get("messages") is not None and row.get("text") is None and row.get("prompt") is None:
            text = " | ".join(f"{m['role']}: {m['content']}" for m in row["messages"])
        else:
            text = row.get("text") or f"{row.get('prompt') or ''}{row.get('completion') or ''}"
        out[tid] = text if len(text) <= limit else text[: limit - 1] + "…"
    return out


def _number(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _candidate_attributes(row: Mapping[str, Any]) -> dict[str, Any]:
    attrs: dict[str, Any] = {f"{ATTR}train_id": str(row["train_id"]), f"{ATTR}score": float(row["score"]),
                             f"{ATTR}rank": int(row["rank"]), f"{ATTR}query_id": str(row["query_id"])}
    if row.get("layer_scores"):
        attrs[f"{ATTR}layer_scores"] = json.loads(row["layer_scores"])
    if (delta := _number(row.get("counterfactual_delta"))) is not None:
        attrs[f"{ATTR}counterfactual_delta"] = delta
    if (down := _number(row.get("counterfactual_delta_down"))) is not None:
        attrs[f"{ATTR}counterfactual_delta_down"] = down
    if row.get("verified") is not None:
        attrs[f"{ATTR}verified"] = bool(row["verified"])
    if row.get("token_strs") and row.get("token_scores"):  # the five tokens that count most
        pairs = sorted(zip(row["token_strs"], row["token_scores"], strict=True), key=lambda p: -abs(p[1]))[:5]
        attrs[f"{ATTR}top_tokens"] = [{"token": t, "score": s} for t, s in pairs]
    return attrs


def _short_score(score: float) -> str:
    """Three significant digits, no exponent for everyday magnitudes (34.7, 0.831, 1234, -0.00412)."""
    a = abs(score)
    if 1000 <= a < 1e6:
        return f"{score:.0f}"
    return f"{score:.3g}"


def span_name(rank: int, score: float, text: str, width: int = 40) -> str:
    """``#2 · 34.7 · "Dromdrai Grixrurn was born in…"``: what the span list shows for a candidate."""
    flat = " ".join(str(text).split())
    start = flat if len(flat) <= width else flat[: width - 1].rstrip() + "…"
    return f'#{rank} · {_short_score(float(score))} · "{start}"'


def _write_query(t: Any, experiment_id: str, run_id: str, audit_id: str, group: pl.DataFrame,
                 texts: Mapping[str, str]) -> None:
    first = group.row(0, named=True)
    qid = str(first["query_id"])
    root = t.start_trace(qid, span_type="CHAIN", experiment_id=experiment_id, run_id=run_id,
                              inputs={"query_id": qid, "prompt": first["query_prompt"]},
                              attributes={f"{ATTR}audit_id": audit_id, f"{ATTR}query_id": qid},
                              tags={AUDIT_TAG: audit_id, QUERY_TAG: qid})
    try:
        for row in group.sort("rank").iter_rows(named=True):
            tid = str(row["train_id"])
            text = texts.get(tid) or str(row["snippet"])
            span = t.start_span(span_name(row["rank"], row["score"], text), trace_id=root.trace_id,
                                     parent_id=root.span_id,
                                     span_type="RETRIEVER",
                                     inputs={"prompt": first["query_prompt"], "completion": first["query_completion"]},
                                     attributes=_candidate_attributes(row))
            doc = {"id": tid, "page_content": text,
                   "metadata": {"doc_uri": tid, "score": float(row["score"]), "rank": int(row["rank"])}}
            t.end_span(root.trace_id, span.span_id, outputs=[doc])
    finally:
        t.end_trace(root.trace_id, outputs={"completion": first["query_completion"]})


def record_traces(run_id: str, candidates: pl.DataFrame | str | os.PathLike[str], *, audit_id: str,
                  texts: Mapping[str, str] | None = None) -> dict[str, int]:
    """Write one trace per query of ``candidates`` that has none yet for ``audit_id``; returns the counts
    ``{"queries", "written", "existing"}``. Raises TrackingUnavailable when MLflow cannot be reached or
    the traces did not arrive (nothing is half-recorded that a rerun would not complete)."""
    from tasks.record.tracker import TrackingUnavailable, tracker

    cands = candidates if isinstance(candidates, pl.DataFrame) else pl.read_parquet(candidates)
    t = tracker()
    experiment_id = t.experiment_of(run_id)
    have = _query_ids(audit_traces(experiment_id, audit_id))
    todo = cands.filter(~pl.col("query_id").is_in(list(have)))
    for (_qid,), group in todo.sort(["query_id", "rank"]).group_by(["query_id"], maintain_order=True):
        _write_query(t, experiment_id, run_id, audit_id, group, texts or {})
    t.flush_traces()
    wanted = set(cands["query_id"].unique().to_list())
    missing = wanted - _query_ids(audit_traces(experiment_id, audit_id))
    if missing:
        raise TrackingUnavailable(f"{len(missing)} of {len(wanted)} query traces of audit {audit_id} did not reach "
                                  f"MLflow at {t.uri} (e.g. {sorted(missing)[0]})",
                                  hint="rerun the audit or `influence-audit sync` once MLflow is reachable: "
                                       "traces already written are kept")
    return {"queries": len(wanted), "written": todo["query_id"].n_unique(), "existing": len(wanted & have)}


@task(name="record-candidate-traces")
def record_candidate_traces(run_id: str, candidates_path: str, audit_id: str, audit_dir: str) -> dict[str, int]:
    """:func:`record_traces` as a Prefect task, with document texts from the audit's input shards."""
    cands = pl.read_parquet(candidates_path)
    return record_traces(run_id, cands, audit_id=audit_id,
                         texts=document_texts(audit_dir, cands["train_id"].unique().to_list()))


# ------------------------------------------------------------------------------------ reading marks


@dataclass(frozen=True)
class CulpritMark:
    """One current (valid) ``culprit`` assessment on a candidate's span."""

    assessment_id: str
    trace_id: str
    query_id: str
    train_id: str
    verdict: str  # culprit | not-culprit | unsure
    reviewer: str
    comment: str
    updated_ms: int
    span_id: str = ""


@dataclass(frozen=True)
class Refusal:
    """A ``culprit`` assessment that cannot be a decision, and why (``message`` names it and its reviewer)."""

    trace_id: str
    assessment_id: str
    span_id: str | None  # where it sits (None: on the whole trace)
    reason: str  # short: what is wrong and what to do
    message: str  # one line for the terminal and the trace tag


@dataclass(frozen=True)
class ReadMarks:
    """What :func:`read_culprit_assessments` found: the marks, the ones refused (with why) per trace."""

    marks: list[CulpritMark]
    refusals: list[Refusal]
    traces: list[Any]  # the audit's traces (MLflow Trace objects)

    @property
    def refused(self) -> dict[str, list[str]]:
        """trace id -> the refusal messages of its marks."""
        out: dict[str, list[str]] = {}
        for r in self.refusals:
            out.setdefault(r.trace_id, []).append(r.message)
        return out


def refusal(trace_id: str, assessment_id: str, span_id: str | None, who: str, reason: str) -> Refusal:
    """A :class:`Refusal` with its one-line message."""
    by = f" by {who}" if who else ""
    return Refusal(trace_id, assessment_id, span_id, reason,
                   f"culprit assessment {assessment_id}{by} not recorded: {reason}")


_TRUE = {"true", "yes", "culprit", "1"}
_FALSE = {"false", "no", "not-culprit", "not culprit", "not_culprit", "0"}


def parse_culprit_value(value: Any) -> str | None:
    """true -> ``culprit``, false -> ``not-culprit``, ``"unsure"`` -> ``unsure`` (strings such as "yes",
    "no", "culprit", "not-culprit" too, any case); None for anything else."""
    if isinstance(value, bool):
        return "culprit" if value else "not-culprit"
    if isinstance(value, (int, float)) and value in (0, 1):
        return "culprit" if value == 1 else "not-culprit"
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _TRUE:
            return "culprit"
        if v in _FALSE:
            return "not-culprit"
        if v == "unsure":
            return "unsure"
    return None


def _spans(trace: Any) -> dict[str, str]:
    """span id -> train id of the trace's candidate spans."""
    out = {}
    for span in trace.data.spans:
        tid = (span.attributes or {}).get(f"{ATTR}train_id")
        if tid is not None:
            out[span.span_id] = str(tid)
    return out


def read_culprit_assessments(experiment_id: str, audit_id: str) -> ReadMarks:
    """The audit's current ``culprit`` assessments (overridden ones are skipped: MLflow marks them invalid;
    a deleted override makes the one it replaced valid again). An assessment that cannot be a decision
    (not on a candidate's span, a value other than true / false / "unsure", no reviewer) is refused, with
    a message per trace."""
    marks: list[CulpritMark] = []
    refusals: list[Refusal] = []
    traces = audit_traces(experiment_id, audit_id, include_spans=True)
    for trace in traces:
        qid = trace.info.tags.get(QUERY_TAG)
        spans = _spans(trace)
        for a in trace.info.assessments or []:
            if a.name != ASSESSMENT_NAME or a.valid is False or a.feedback is None:
                continue
            who = (a.source.source_id or "").strip() if a.source else ""
            value = a.feedback.value if a.feedback.error is None else None
            verdict = parse_culprit_value(value)
            why = None
            if a.span_id not in spans:
                where = "the whole trace" if not a.span_id else "the query's span"
                why = (f"it is on {where}, not on a candidate: select a candidate's span (#1, #2, ...) and add "
                       "it there")
            elif verdict is None:
                why = f"value {value!r} is not true, false or \"unsure\""
            elif not who or who == "default":
                why = "it has no reviewer (source id)"
            if why is not None:
                refusals.append(refusal(trace.info.trace_id, a.assessment_id, a.span_id or None, who, why))
                continue
            marks.append(CulpritMark(a.assessment_id, trace.info.trace_id, str(qid), spans[a.span_id], verdict,
                                     who, a.rationale or "", int(a.last_update_time_ms or a.create_time_ms or 0),
                                     a.span_id))
    return ReadMarks(marks, refusals, traces)


def show_refusals(traces: Iterable[Any], refusals: Iterable[Refusal]) -> None:
    """Answer refused marks where the reviewer looks: beside each one (same span, or the whole trace) a feedback
    :data:`REFUSAL_NAME` whose value says why and what to do, and the trace's ``influence_audit.refused`` tag
    with every reason. Both go once the mark is fixed or deleted; nothing is written twice."""
    from tasks.record.tracker import tracker

    t = tracker()
    by_trace: dict[str, list[Refusal]] = {}
    for r in refusals:
        by_trace.setdefault(r.trace_id, []).append(r)
    for trace in traces:
        tid = trace.info.trace_id
        mine = by_trace.get(tid, [])
        wanted = {r.assessment_id: r for r in mine}
        for a in trace.info.assessments or []:  # our answers: keep the current ones, drop the stale
            if a.name != REFUSAL_NAME:
                continue
            refused_id = (a.metadata or {}).get(REFUSES_KEY)
            if refused_id in wanted and a.feedback is not None and a.feedback.value == wanted[refused_id].reason:
                del wanted[refused_id]
            else:
                t.delete_assessment(tid, a.assessment_id)
        for r in wanted.values():
            t.log_feedback(trace_id=tid, span_id=r.span_id, name=REFUSAL_NAME, value=r.reason,
                           rationale=r.message, source_id=PULL_SOURCE, metadata={REFUSES_KEY: r.assessment_id})
        current = trace.info.tags.get(REFUSED_TAG)
        if mine:
            text = "; ".join(r.message for r in mine)
            text = text if len(text) <= _TAG_MAX else text[: _TAG_MAX - 3] + "..."
            if text != current:
                t.set_trace_tag(tid, REFUSED_TAG, text)
        elif current is not None:
            t.delete_trace_tag(tid, REFUSED_TAG)
