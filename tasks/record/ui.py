"""Where a reviewer goes: the MLflow UI's addresses of an audit's run and of its traces.

MLflow 3.17's UI opens in its GenAI view (a traces overview of the default experiment), so the address of
the server alone lands nowhere useful. These routes, read off the UI's router, land on the right pages:

- ``#/experiments/<exp>/runs/<run>``: the audit's run (tags, metrics, artifacts such as report.html);
- ``#/experiments/<exp>/runs/<run>/traces``: the run's traces tab, one row per audited query; clicking a
  row opens the trace, its candidate spans and the assessments pane where ``culprit`` is added;
- ``#/experiments/<exp>/traces?selectedEvaluationId=<trace id>``: one query's trace opened directly.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_PORT", "audit_urls", "mlflow_bin", "ui_base", "ui_command"]

DEFAULT_PORT = 5000


def mlflow_bin() -> str:
    """The ``mlflow`` script of this environment (beside the running Python), else plain ``mlflow``."""
    candidate = Path(sys.executable).parent / "mlflow"
    return str(candidate) if candidate.exists() else "mlflow"


def ui_base(tracking_uri: str, port: int = DEFAULT_PORT) -> str:
    """The UI's address: the tracking server itself for http(s) URIs, else a local ``mlflow ui`` on ``port``."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return f"http://127.0.0.1:{port}"


def ui_command(tracking_uri: str, port: int = DEFAULT_PORT) -> str | None:
    """The command that serves the UI for a local store (None for a tracking server: it serves its own UI)."""
    if tracking_uri.startswith(("http://", "https://")):
        return None
    return " ".join([shlex.quote(mlflow_bin()), "ui", "--backend-store-uri", shlex.quote(tracking_uri),
                     "--host", "127.0.0.1", "--port", str(port)])


def audit_urls(base: str, experiment_id: str, run_id: str, trace_ids: dict[str, str] | None = None) -> dict[str, Any]:
    """``run`` and ``traces`` addresses (and ``trace``: query id -> address, for the given trace ids)."""
    run = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    out: dict[str, Any] = {"run": run, "traces": f"{run}/traces"}
    if trace_ids:
        out["trace"] = {q: f"{base}/#/experiments/{experiment_id}/traces?selectedEvaluationId={t}"
                        for q, t in sorted(trace_ids.items())}
    return out


def audit_ui(home: str | Path | None, audit_id: str | None = None, *, tracking_uri: str | None = None,
             port: int = DEFAULT_PORT, per_query: bool = False) -> dict[str, Any]:
    """Where to review an audit (default: the newest finished one with an MLflow run): audit_id, run_id,
    tracking_uri, ``command`` (serves the UI for a local store, else None) and ``urls`` (see
    :func:`audit_urls`; ``trace`` per query with ``per_query``)."""
    from influence_engine.errors import UserError
    from tasks.paths import resolve_home
    from tasks.record.tracker import configure_tracking, tracker
    from tasks.review.decisions import _manifest, _manifests, _tracking_uri

    h = resolve_home(home)
    if audit_id is None:
        done = [(h / "audits" / a / "manifest.json", a) for a, m in _manifests(h).items()
                if m.get("status") == "succeeded" and m.get("mlflow_run_id")]
        if not done:
            raise UserError(f"no finished audit with an MLflow run in {h / 'audits'}",
                            hint="run `influence-audit demo` or `influence-audit audit ...` first")
        audit_id = max(done, key=lambda pa: pa[0].stat().st_mtime)[1]
    manifest = _manifest(h, audit_id)
    run_id = manifest.get("mlflow_run_id")
    if not run_id:
        raise UserError(f"audit {audit_id} has no MLflow run yet", hint="`influence-audit sync` records it")
    uri = configure_tracking(_tracking_uri(manifest, tracking_uri), h)
    experiment_id = tracker().experiment_of(run_id)
    trace_ids = None
    if per_query:
        from tasks.record.traces import QUERY_TAG, audit_traces

        trace_ids = {t.info.tags[QUERY_TAG]: t.info.trace_id for t in audit_traces(experiment_id, audit_id)}
    return {"audit_id": audit_id, "run_id": run_id, "tracking_uri": uri, "command": ui_command(uri, port),
            "urls": audit_urls(ui_base(uri, port), experiment_id, run_id, trace_ids)}
