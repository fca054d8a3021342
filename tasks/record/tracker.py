"""Record an influence audit in MLflow: one run per audit, reused when the same audit is rerun.

Every call goes through :class:`mlflow.MlflowClient` with an explicit run id (never the fluent
active-run stack), so the functions are safe from Prefect tasks in any thread. Calls that fail because
the tracking server or database is unreachable are retried with exponential backoff; after the last try
:class:`TrackingUnavailable` says the results are on disk and ``influence-audit sync`` records them later.

Run layout (artifacts)::

    candidates.json          table (query x candidate), shown by the MLflow UI; see record_audit_results
    candidates/<name>.parquet  the full candidate list, lossless
    validation/<suite>.json  one report per validation suite
    plots/*.png
    report.html
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

# Telemetry starts when mlflow is imported: switch it off first (no network here).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import polars as pl  # noqa: E402
import requests  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunStatus, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.protos.databricks_pb2 import (  # noqa: E402
    RESOURCE_ALREADY_EXISTS,
    TEMPORARILY_UNAVAILABLE,
    ErrorCode,
)
from mlflow.telemetry import set_telemetry_client  # noqa: E402

from influence_engine.errors import UserError, first_line  # noqa: E402

__all__ = [
    "CANDIDATES_TABLE",
    "TABLE_COLUMNS",
    "Tracker",
    "TrackingRefused",
    "TrackingUnavailable",
    "configure_tracking",
    "find_audit_run",
    "finish_audit_run",
    "record_audit_results",
    "start_audit_run",
    "tracker",
]

_log = logging.getLogger(__name__)

CANDIDATES_TABLE = "candidates.json"
TABLE_COLUMNS = ("query_id", "query_prompt", "query_completion", "train_id", "snippet", "score", "rank")
VERIFY_TABLE_COLUMNS = ("counterfactual_delta", "counterfactual_delta_down", "verified")  # when verified
AUDIT_ID_TAG = "audit.id"
REVIEW_STATUS_TAG = "review.status"
ERROR_TAG = "audit.error"
_ERROR_MAX = 500
_PARAM_MAX = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH

# Sleep before try 2, 3, ...: len + 1 tries in all. Tests set it to zeros.
_BACKOFF_S: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)

T = TypeVar("T")


class TrackingUnavailable(UserError):
    """MLflow could not be reached after retries; the audit's results are still on disk."""


# --------------------------------------------------------------------------------------- retries


def _is_transient(exc: BaseException) -> bool:
    """True for connection-type failures (server down, timeouts, a locked or unreachable database)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
            return True
        if isinstance(cur, MlflowException) and cur.error_code == ErrorCode.Name(TEMPORARILY_UNAVAILABLE):
            return True
        # The REST client raises a bare MlflowException("API request to ... failed") whose requests error is only
        # in __context__: the chain is walked, by type.
        cur = cur.__cause__ or cur.__context__
    return False


class TrackingRefused(UserError):
    """The MLflow server (with authentication) refused this account: not logged in, or no permission."""


_REFUSED_CODES = {"PERMISSION_DENIED": 403, "UNAUTHENTICATED": 401, "CUSTOMER_UNAUTHORIZED": 401}


def _refused(what: str, exc: BaseException) -> TrackingRefused | None:
    if not isinstance(exc, MlflowException) or exc.error_code not in _REFUSED_CODES:
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if _REFUSED_CODES[exc.error_code] == 401:
        return TrackingRefused(f"MLflow at {mlflow.get_tracking_uri()} refused the login "
                               f"{'of ' + repr(user) if user else '(no user name set)'} ({what})",
                               hint="set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to your MLflow account")
    return TrackingRefused(f"MLflow at {mlflow.get_tracking_uri()}: user {user!r} has no permission to {what}",
                           hint="ask an MLflow admin for a permission on the audit's experiment "
                                "(docs/operations.md, 'Reviewers and permissions')")


def _call(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` and retry connection errors with exponential backoff, then raise TrackingUnavailable; a refusal
    by an authenticating server (401, 403) is :class:`TrackingRefused` at once."""
    for attempt in range(len(_BACKOFF_S) + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if (refused := _refused(what, exc)) is not None:
                raise refused from None
            if not _is_transient(exc):
                raise
            if attempt == len(_BACKOFF_S):
                raise TrackingUnavailable(
                    f"MLflow at {mlflow.get_tracking_uri()} is unreachable ({what}, "
                    f"{attempt + 1} tries): {first_line(exc, 300)}",
                    hint="the audit results are on disk; `influence-audit sync` records them in MLflow "
                         "once the tracking server is back",
                ) from exc
            delay = _BACKOFF_S[attempt]
            _log.warning("MLflow %s failed (%s); retrying in %.1f s", what, type(exc).__name__, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


# ------------------------------------------------------------------------------------ configure


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    raw = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(raw).resolve() if raw and raw != ":memory:" else None


def _artifact_location(tracking_uri: str) -> str | None:
    """Artifact root for new experiments: beside the database for sqlite, the server's default else.

    Without it a sqlite store puts artifacts in ``./mlruns`` of whatever directory the process runs in.
    """
    db = _sqlite_path(tracking_uri)
    return (db.parent / "mlartifacts").as_uri() if db is not None else None


def configure_tracking(tracking_uri: str | None, default_dir: Path) -> str:
    """Point MLflow at ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``default_dir/mlflow.db``.

    Artifacts of a sqlite store go to ``<db dir>/mlartifacts``. Also disables telemetry and turns MLflow's own
    HTTP retries off (unless set in the environment): :func:`_call`'s backoff is the one retry policy, so an
    unreachable server fails in seconds, not minutes; returns the URI in use.
    """
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    set_telemetry_client()  # re-reads the switch: drops a client made at import
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # one retry policy: :func:`_call`'s
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri:
        default_dir = Path(default_dir).resolve()
        uri = f"sqlite:///{default_dir / 'mlflow.db'}"  # absolute path: sqlite:////abs/mlflow.db
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        (db.parent / "mlartifacts").mkdir(exist_ok=True)
        _initialise_sqlite_store(uri, db)
    mlflow.set_tracking_uri(uri)  # also exports MLFLOW_TRACKING_URI for subprocesses
    return uri


_INITIALISED: set[str] = set()


def _initialise_sqlite_store(uri: str, db: Path) -> None:
    """Create or migrate a sqlite store under an exclusive file lock: MLflow's schema migrations race when
    several audits open a fresh store at once (two processes both run ``ALTER TABLE``)."""
    if uri in _INITIALISED:
        return
    from filelock import FileLock

    with FileLock(db.parent / f".{db.name}.init.lock"):
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    _INITIALISED.add(uri)


# ------------------------------------------------------------------------------------------ runs


def _experiment_id(client: MlflowClient, name: str, *, create: bool) -> str | None:
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise UserError(f"MLflow experiment {name!r} is deleted",
                        hint="restore it (`mlflow experiments restore`) or use another experiment name")
    if exp is not None or not create:
        return exp.experiment_id if exp is not None else None
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(mlflow.get_tracking_uri()))
    except MlflowException as exc:  # created concurrently by another task
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _filter_value(value: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise UserError(f"audit id {value!r} contains both quote characters; it cannot be searched in MLflow")


def _find(client: MlflowClient, experiment: str, audit_id: str) -> str | None:
    exp_id = _experiment_id(client, experiment, create=False)
    if exp_id is None:
        return None
    runs = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{AUDIT_ID_TAG}` = {_filter_value(audit_id)}",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def find_audit_run(experiment: str, audit_id: str) -> str | None:
    """The newest (non-deleted) run of ``experiment`` tagged ``audit.id=audit_id``, or None."""
    return _call("search runs", _find, MlflowClient(), experiment, audit_id)


def _chunks(items: list[T], n: int = _BATCH) -> Iterable[list[T]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _start(experiment: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, Any]) -> str:
    client = MlflowClient()
    all_tags = {str(k): str(v) for k, v in tags.items()}
    all_tags.update({"audit.status": "running", "validation.status": "pending"})
    str_params = {str(k): str(v)[:_PARAM_MAX] for k, v in params.items()}

    run_id = _find(client, experiment, all_tags[AUDIT_ID_TAG]) if AUDIT_ID_TAG in all_tags else None
    if run_id is None:
        exp_id = _experiment_id(client, experiment, create=True)
        assert exp_id is not None
        run_id = client.create_run(exp_id, run_name=run_name).info.run_id
        all_tags[REVIEW_STATUS_TAG] = "none"
    else:  # rerun of the same audit: reopen its run; its review (status and decisions) carries on
        logged = client.get_run(run_id).data.params
        clash = {k: (logged[k], v) for k, v in str_params.items() if k in logged and logged[k] != v}
        if clash:
            k, (old, new) = next(iter(clash.items()))
            raise UserError(f"MLflow run {run_id} of audit {all_tags[AUDIT_ID_TAG]} has param {k}={old!r}, "
                            f"this rerun has {new!r}",
                            hint="params are immutable in MLflow: give the changed audit a new audit id")
        str_params = {k: v for k, v in str_params.items() if k not in logged}
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        if ERROR_TAG in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, ERROR_TAG)
    for chunk in _chunks([Param(k, v) for k, v in str_params.items()]):
        client.log_batch(run_id, params=chunk)
    for chunk in _chunks([RunTag(k, v) for k, v in all_tags.items()]):
        client.log_batch(run_id, tags=chunk)
    return run_id


def start_audit_run(experiment: str, *, run_name: str, params: Mapping[str, Any],
                    tags: Mapping[str, Any]) -> str:
    """Create (or, when ``tags`` has an ``audit.id`` already recorded, reopen) the audit's run.

    Creates the experiment if missing; logs ``params`` and ``tags`` plus ``audit.status=running``,
    ``validation.status=pending`` and, on a new run, ``review.status=none`` (a rerun keeps its review
    status: its decisions stay); returns the run id.
    """
    return _call("start run", _start, experiment, run_name, params, tags)


# --------------------------------------------------------------------------------------- results


def _table_frame(candidates: pl.DataFrame) -> Any:
    """The candidates.json table as pandas (via dicts: no pyarrow round trip needed)."""
    import pandas as pd

    missing = [c for c in TABLE_COLUMNS if c not in candidates.columns]
    if missing:
        raise ValueError(f"candidate frame lacks columns {missing}")
    columns = [*TABLE_COLUMNS, *(c for c in VERIFY_TABLE_COLUMNS if c in candidates.columns)]
    df = candidates.select(columns).sort(["query_id", "rank"], maintain_order=True)
    return pd.DataFrame(df.to_dict(as_series=False), columns=columns)


def replace_table(client: MlflowClient, run_id: str, frame: Any, name: str) -> None:
    """Log ``frame`` as the table ``name``, replacing (not appending to) a table logged before.

    ``MlflowClient.log_table`` appends to an existing artifact of the same name (it downloads, re-reads with
    type inference and concatenates). We write the file in its serialisation (``to_json(orient="split")``)
    ourselves and record it in the ``mlflow.loggedArtifacts`` tag that ``load_table`` searches by.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        frame.to_json(path, orient="split", index=False, date_format="iso")
        client.log_artifact(run_id, str(path))
    logged = json.loads(client.get_run(run_id).data.tags.get("mlflow.loggedArtifacts", "[]"))
    entry = {"path": name, "type": "table"}
    if entry not in logged:
        client.set_tag(run_id, "mlflow.loggedArtifacts", json.dumps([*logged, entry]))


def _log_table_once(client: MlflowClient, run_id: str, frame: Any) -> None:
    """Log ``frame`` as candidates.json, replacing a table logged before."""
    replace_table(client, run_id, frame, CANDIDATES_TABLE)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "suite"


def _log_path(client: MlflowClient, run_id: str, path: Path, artifact_dir: str | None) -> None:
    if path.is_dir():
        client.log_artifacts(run_id, str(path), f"{artifact_dir}/{path.name}" if artifact_dir else path.name)
    else:
        client.log_artifact(run_id, str(path), artifact_dir)


def _log_html(client: MlflowClient, run_id: str, html_report: Path) -> None:
    if html_report.name == "report.html":
        client.log_artifact(run_id, str(html_report))
        return
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "report.html"
        shutil.copyfile(html_report, dst)
        client.log_artifact(run_id, str(dst))


def record_audit_results(
    run_id: str,
    *,
    candidates: pl.DataFrame,
    candidates_parquet: Path,
    metrics: Mapping[str, float],
    validation_reports: Mapping[str, Mapping[str, Any]],
    plots: Iterable[Path],
    html_report: Path,
    extra_artifacts: Iterable[Path] = (),
) -> None:
    """Log metrics, the candidates.json table, the Parquet, validation reports, plots and report.html.

    Safe to call again for the same run (a rerun or ``sync``): the table and artifacts are replaced,
    metrics get a new point. Extra artifacts go to the artifact root under their own names.
    Note: MLflow's ``load_table`` re-reads candidates.json with pandas type inference, so an all-digit
    ``train_id`` such as ``"000123"`` comes back as the integer 123; the Parquet is lossless.
    """
    client = MlflowClient()
    for p in [candidates_parquet, html_report, *plots, *extra_artifacts]:
        if not Path(p).exists():
            raise FileNotFoundError(f"{p}: artifact to record in MLflow does not exist")
    now = int(time.time() * 1000)
    metric_list = [Metric(str(k), float(v), now, 0) for k, v in metrics.items()]
    for chunk in _chunks(metric_list, 1000):
        _call("log metrics", client.log_batch, run_id, metrics=chunk)
    frame = _table_frame(candidates)
    _call("log candidates table", _log_table_once, client, run_id, frame)
    _call("log candidates parquet", client.log_artifact, run_id, str(candidates_parquet), "candidates")
    for suite, report in validation_reports.items():
        _call(f"log validation report {suite}", client.log_dict, run_id, dict(report),
              f"validation/{_safe_name(suite)}.json")
    for plot in plots:
        _call(f"log plot {Path(plot).name}", client.log_artifact, run_id, str(plot), "plots")
    _call("log report.html", _log_html, client, run_id, Path(html_report))
    for extra in extra_artifacts:
        _call(f"log {Path(extra).name}", _log_path, client, run_id, Path(extra), None)


def _finish(run_id: str, succeeded: bool, validation_passed: bool | None, error: str | None) -> None:
    client = MlflowClient()
    tags = {"audit.status": "succeeded" if succeeded else "failed"}
    if validation_passed is not None:
        tags["validation.status"] = "passed" if validation_passed else "failed"
    if succeeded and client.get_run(run_id).data.tags.get(REVIEW_STATUS_TAG, "none") == "none":
        tags[REVIEW_STATUS_TAG] = "open"  # a rerun keeps in-progress / done
    if error:
        tags[ERROR_TAG] = error if len(error) <= _ERROR_MAX else error[:_ERROR_MAX - 3] + "..."
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    status = RunStatus.FINISHED if succeeded else RunStatus.FAILED
    client.set_terminated(run_id, status=RunStatus.to_string(status))


def finish_audit_run(run_id: str, *, succeeded: bool, validation_passed: bool | None,
                     error: str | None = None) -> None:
    """Set ``audit.status``, ``validation.status``, ``review.status=open`` (on success, unless the review
    had already started: a rerun keeps ``in-progress`` / ``done``) and
    ``audit.error`` (first 500 chars), then end the run as FINISHED or FAILED.

    ``validation_passed=None`` (validation never ran) leaves ``validation.status`` as it was.
    """
    _call("finish run", _finish, run_id, succeeded, validation_passed, error)


def record_validation_failure(run_id: str, validation_reports: Mapping[str, Mapping[str, Any]]) -> None:
    """Log the validation reports of an audit whose inputs were refused (nothing else exists to log)."""
    client = MlflowClient()
    for suite, report in validation_reports.items():
        _call(f"log validation report {suite}", client.log_dict, run_id, dict(report),
              f"validation/{_safe_name(suite)}.json")


# ------------------------------------------------------------------------------------------ the boundary
class Tracker:
    """Every MLflow call the project makes outside this module goes through one of these methods: one client,
    one retry policy (:func:`_call`: connection failures retried with backoff, then :class:`TrackingUnavailable`;
    MLflow's own HTTP retries are capped by :func:`configure_tracking`, and Prefect does not retry on top).

    ``tracking_uri`` None means the one :func:`configure_tracking` set (or ``$MLFLOW_TRACKING_URI``)."""

    def __init__(self, tracking_uri: str | None = None):
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self._uri = tracking_uri

    @property
    def uri(self) -> str:
        return self._uri or mlflow.get_tracking_uri()

    # runs
    def run(self, run_id: str) -> Any:
        return _call("read run", self.client.get_run, run_id)

    def experiment_of(self, run_id: str) -> str:
        return self.run(run_id).info.experiment_id

    def tags(self, run_id: str) -> dict[str, str]:
        return dict(self.run(run_id).data.tags)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        for chunk in _chunks(items):
            _call("set tags", self.client.log_batch, run_id, tags=chunk)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, 0) for k, v in metrics.items()]
        for chunk in _chunks(items, 1000):
            _call("log metrics", self.client.log_batch, run_id, metrics=chunk)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Params (MLflow keeps a param's first value: log only values that never change for this run)."""
        from mlflow.entities import Param

        items = [Param(str(k), str(v)) for k, v in params.items()]
        for chunk in _chunks(items, 100):
            _call("log params", self.client.log_batch, run_id, params=chunk)

    def log_artifact(self, run_id: str, path: str | Path, artifact_dir: str | None = None) -> None:
        _call(f"log {Path(path).name}", _log_path, self.client, run_id, Path(path), artifact_dir)

    def log_dict(self, run_id: str, obj: Mapping[str, Any], name: str) -> None:
        _call(f"log {name}", self.client.log_dict, run_id, dict(obj), name)

    def replace_table(self, run_id: str, frame: Any, name: str) -> None:
        """``frame`` (pandas or polars) as the table ``name``, replacing one logged before."""
        if isinstance(frame, pl.DataFrame):
            frame = frame.to_pandas()
        _call(f"log table {name}", replace_table, self.client, run_id, frame, name)

    def artifact_paths(self, run_id: str) -> set[str]:
        return {f.path for f in _call("list artifacts", self.client.list_artifacts, run_id)}

    # traces (one per audited query) and reviewers' assessments
    def search_traces(self, experiment_id: str, filter_string: str, *, include_spans: bool = False) -> list[Any]:
        return _call("search traces", mlflow.search_traces, locations=[experiment_id], filter_string=filter_string,
                     return_type="list", include_spans=include_spans)

    def start_trace(self, name: str, **kwargs: Any) -> Any:
        return _call("start trace", self.client.start_trace, name, **kwargs)

    def start_span(self, name: str, **kwargs: Any) -> Any:
        return _call("start span", self.client.start_span, name, **kwargs)

    def end_span(self, trace_id: str, span_id: str, **kwargs: Any) -> None:
        _call("end span", self.client.end_span, trace_id, span_id, **kwargs)

    def end_trace(self, trace_id: str, **kwargs: Any) -> None:
        _call("end trace", self.client.end_trace, trace_id, **kwargs)

    def flush_traces(self) -> None:
        mlflow.flush_trace_async_logging()

    def set_trace_tag(self, trace_id: str, key: str, value: str) -> None:
        _call("tag trace", mlflow.set_trace_tag, trace_id, key, value)

    def delete_trace_tag(self, trace_id: str, key: str) -> None:
        _call("untag trace", mlflow.delete_trace_tag, trace_id, key)

    def log_feedback(self, *, trace_id: str, name: str, value: Any, source_id: str, span_id: str | None = None,
                     rationale: str | None = None, metadata: Mapping[str, str] | None = None,
                     human: bool = False) -> Any:
        """A feedback assessment (source type CODE, or HUMAN with ``human``) on a trace or one of its spans."""
        from mlflow.entities import AssessmentSource

        source = AssessmentSource(source_type="HUMAN" if human else "CODE", source_id=source_id)
        return _call("log feedback", mlflow.log_feedback, trace_id=trace_id, name=name, value=value,
                     source=source, span_id=span_id, rationale=rationale, metadata=dict(metadata or {}) or None)

    def delete_assessment(self, trace_id: str, assessment_id: str) -> None:
        _call("delete assessment", mlflow.delete_assessment, trace_id=trace_id, assessment_id=assessment_id)

    # the model registry
    def model_version_by_alias(self, name: str, alias: str) -> str:
        return str(_call("read alias", self.client.get_model_version_by_alias, name, alias).version)

    def model_versions(self, name: str) -> list[Any]:
        return list(_call("search versions", self.client.search_model_versions, f"name = '{name}'"))

    def latest_versions(self, name: str, stage: str) -> list[Any]:
        return list(_call("latest versions", self.client.get_latest_versions, name, stages=[stage]))

    def model_version_exists(self, name: str, version: str) -> bool:
        try:
            _call("read version", self.client.get_model_version, name, version)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def download_artifacts(self, artifact_uri: str, dst: str | Path) -> str:
        return _call("download", mlflow.artifacts.download_artifacts, artifact_uri=artifact_uri, dst_path=str(dst))

    def register_model_dir(self, model_dir: str | Path, name: str, tags: Mapping[str, str] | None = None) -> str:
        """Log ``model_dir`` as a run's ``model`` artifact and register it as a new version of ``name``."""
        def register() -> str:
            with mlflow.start_run(run_name=f"register-{name}") as run:
                mlflow.log_artifacts(str(model_dir), "model")
            try:
                self.client.create_registered_model(name)
            except MlflowException as exc:
                if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                    raise
            mv = self.client.create_model_version(name, source=f"runs:/{run.info.run_id}/model",
                                                  run_id=run.info.run_id, tags=dict(tags or {}))
            return str(mv.version)

        return _call("register model", register)


def tracker(tracking_uri: str | None = None) -> Tracker:
    """The boundary to MLflow (see :class:`Tracker`)."""
    return Tracker(tracking_uri)


def mlflow_error(exc: BaseException) -> str | None:
    """The first line of an MLflow error's message (None for other exceptions)."""
    return exc.message.splitlines()[0] if isinstance(exc, MlflowException) and exc.message else None


def is_not_found(exc: BaseException) -> bool:
    """An MLflow lookup of something that does not exist (a deleted run, an unknown model)."""
    return isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST"
