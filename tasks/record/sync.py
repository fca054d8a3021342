"""``influence-audit sync``: record in MLflow what audits left on disk while MLflow was unreachable.

An audit computes everything into ``<home>/audits/<audit_id>/`` before and independently of MLflow; its
``manifest.json`` says how it ended (``status``: ``succeeded`` / ``failed``; absent while running or after a
kill) and whether MLflow has it (``mlflow``: ``pending`` / ``recorded``). :func:`sync_audits` walks the
manifests and, per audit:

* finished and succeeded, but its MLflow run is missing or not marked succeeded with a candidate table: reopens
  (or creates) the run by ``audit.id``, logs the results from the audit's files, marks it succeeded;
* failed, but MLflow shows no run or a run still ``running``: records it as failed (never as succeeded);
* unfinished (no ``status``): left alone; rerunning the same audit resumes it.

For every succeeded audit it also adds the query traces that are missing (audits recorded before traces
existed) and rewrites the run's review table and tags from the decisions on disk: ``sync`` is the one verb
from disk to MLflow, ``review pull`` the one from MLflow to disk.

Plain functions (those of :mod:`tasks.record.run`, which the flow's tasks wrap), so sync needs no Prefect server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from influence_engine.atomic import write_json_atomic
from influence_engine.errors import UserError
from tasks.paths import resolve_home

__all__ = ["SyncOutcome", "sync_audits"]


@dataclass(frozen=True)
class SyncOutcome:
    """What sync did with one audit directory."""

    audit_id: str
    action: str  # recorded | marked-failed | up-to-date | unfinished | skipped
    run_id: str | None = None
    detail: str = ""


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _inputs(manifest: dict[str, Any]):
    from tasks.inputs.shards import Inputs

    return Inputs.from_json(manifest["inputs"])


def _validation_reports(audit_dir: Path) -> dict[str, dict]:
    reports = {}
    for path in sorted((audit_dir / "validation").glob("*.json")):
        report = _read_manifest(path)
        if report is not None:
            reports[path.stem] = report
    return reports


def _run_state(run_id: str) -> tuple[str | None, bool]:
    """(``audit.status`` tag, whether the candidate table is logged) of an MLflow run."""
    from tasks.record.tracker import CANDIDATES_TABLE, tracker

    t = tracker()
    return t.tags(run_id).get("audit.status"), CANDIDATES_TABLE in t.artifact_paths(run_id)


def _record_succeeded(manifest: dict[str, Any], audit_dir: Path, params: Any) -> str:
    from tasks.record.run import finish_run, record_results, start_run

    inputs = _inputs(manifest)
    run_id = start_run(params, inputs, inputs.audit_id)
    if params.mode == "quality":
        from tasks.quality.stages import quality_paths, record_quality

        record_quality(params, inputs, run_id, quality_paths(audit_dir), _validation_reports(audit_dir),
                       dict(manifest.get("seconds") or {}), bool(manifest.get("factors_cached", False)))
        finish_run(run_id, succeeded=True, validation_passed=True)
        return run_id
    record_results(params, inputs, run_id, str(audit_dir / "candidates.parquet"), _validation_reports(audit_dir),
                      dict(manifest.get("seconds") or {}), bool(manifest.get("factors_cached", False)))
    finish_run(run_id, succeeded=True, validation_passed=True)
    return run_id


def _record_failed(manifest: dict[str, Any], audit_id: str, run_id: str | None, params: Any) -> str:
    from tasks.record.run import finish_run, start_run

    if run_id is None:
        run_id = start_run(params, _inputs(manifest) if "inputs" in manifest else None, audit_id)
    finish_run(run_id, succeeded=False, validation_passed=manifest.get("validation_passed"),
                  error=str(manifest.get("error") or "the audit failed (see its manifest.json)"))
    return run_id


def sync_one(manifest_path: Path, *, tracking_uri: str | None = None, experiment: str | None = None,
             home: Path | None = None) -> SyncOutcome:
    """Bring MLflow up to date with one audit directory (see the module docstring)."""
    from tasks.options import AuditParams
    from tasks.record.tracker import configure_tracking, find_audit_run

    audit_dir = manifest_path.parent
    manifest = _read_manifest(manifest_path)
    if manifest is None:
        return SyncOutcome(audit_dir.name, "skipped", detail=f"{manifest_path}: unreadable manifest")
    audit_id = str(manifest.get("audit_id") or audit_dir.name)
    status = manifest.get("status")
    if status not in ("succeeded", "failed"):
        return SyncOutcome(audit_id, "unfinished", manifest.get("mlflow_run_id"),
                           "not finished (running, or killed): rerun the same audit to resume it")
    params = AuditParams(**manifest["params"])
    configure_tracking(tracking_uri or params.tracking_uri, home or resolve_home(params.output_dir))
    exp = experiment or params.experiment
    if experiment and experiment != params.experiment:
        params = params.model_copy(update={"experiment": experiment})
    run_id = find_audit_run(exp, audit_id)
    state, has_table = _run_state(run_id) if run_id else (None, False)
    if status == "succeeded":
        if state == "succeeded" and has_table:
            action, detail = "up-to-date", "already recorded"
        elif "inputs" not in manifest:
            return SyncOutcome(audit_id, "skipped", run_id, "manifest predates sync: rerun the same audit "
                                                            "(finished stages are reused) to record it")
        else:
            run_id, action, detail = _record_succeeded(manifest, audit_dir, params), "recorded", "results logged"
    elif state in (None, "running"):
        run_id, action, detail = _record_failed(manifest, audit_id, run_id, params), "marked-failed", \
            "recorded as failed"
    else:
        action, detail = "up-to-date", f"already recorded as {state}"
    if manifest.get("mlflow") != "recorded" or manifest.get("mlflow_run_id") != run_id:
        write_json_atomic(manifest_path, manifest | {"mlflow": "recorded", "mlflow_run_id": run_id})
    if status == "succeeded" and run_id:
        detail += _push_review(audit_dir, audit_id, run_id, traces=params.mode != "quality")
    return SyncOutcome(audit_id, action, run_id, detail)


def _push_review(audit_dir: Path, audit_id: str, run_id: str, *, traces: bool = True) -> str:
    """Traces for audits recorded before they existed (idempotent; query audits only: a quality audit records
    none), and the review decisions on disk."""
    import polars as pl

    from tasks.record.traces import document_texts, record_traces
    from tasks.review.decisions import load_decisions, record_review_in_mlflow

    written = 0
    if traces:
        cands = pl.read_parquet(audit_dir / "candidates.parquet")
        written = record_traces(run_id, cands, audit_id=audit_id,
                                texts=document_texts(audit_dir, cands["train_id"].unique().to_list()))["written"]
    home = audit_dir.parent.parent
    n = load_decisions(home, audit_id).height
    if n:
        from tasks.record.tracker import tracker

        record_review_in_mlflow(home, audit_id, tracking_uri=tracker().uri)
    return (f"; {written} query trace(s) added" if written else "") + (f"; {n} review decision(s) pushed" if n
                                                                       else "")


def sync_audits(home: Path, *, tracking_uri: str | None = None, experiment: str | None = None,
                audit_id: str | None = None) -> list[SyncOutcome]:
    """Sync every audit under ``home/audits`` (or only ``audit_id``); MLflow errors stop the walk."""
    root = Path(home) / "audits"
    paths = sorted(root.glob("*/manifest.json"))
    if audit_id is not None:
        paths = [p for p in paths if p.parent.name == audit_id]
        if not paths:
            raise UserError(f"audit {audit_id!r}: no {root / audit_id / 'manifest.json'}",
                            hint="check --output-dir and the audit id")
    return [sync_one(p, tracking_uri=tracking_uri, experiment=experiment, home=Path(home)) for p in paths]
