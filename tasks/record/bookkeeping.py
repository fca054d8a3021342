"""One audit's record keeping, in one place: the manifest on disk and the MLflow run, kept in step with the
flow's stages, so the flow itself only orders and maps tasks.

The manifest (``audits/<id>/manifest.json``, written after every stage) holds the parameters, the inputs'
summary, each stage's state and seconds, the MLflow run id and whether MLflow has the results
(``mlflow: pending | recorded``). If MLflow is unreachable the audit still runs to the end: its files stay on
disk, the manifest says ``pending`` and the flow ends in :class:`~tasks.record.tracker.TrackingUnavailable`;
``influence-audit sync`` records it later.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from influence_engine import stable_key
from influence_engine.atomic import write_json_atomic
from influence_engine.errors import first_line
from tasks.inputs.shards import Inputs, InputValidationError
from tasks.options import AuditParams
from tasks.paths import resolve_home
from tasks.record.stages import finish_run, start_run

PROGRESS = logging.getLogger("influence_audit.progress")  # one line per stage; the CLI shows it on stderr


class AuditBook:
    """The manifest and MLflow run of one audit (``log``: the flow's logger)."""

    def __init__(self, p: AuditParams, log: Any):
        from tasks.record.tracker import configure_tracking

        self.p, self.log = p, log
        self.home = resolve_home(p.output_dir)
        self.tracking_uri = configure_tracking(p.tracking_uri, self.home)
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.manifest: dict[str, Any] = {"params": p.model_dump(), "stages": {}, "home": str(self.home)}
        self.audit_dir: Path | None = None
        self.run_id: str | None = None
        self.tracking_error: Exception | None = None
        self.metrics: dict[str, float] = {}

    # -------------------------------------------------------------------------------------------- stages
    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage and mark it running, then done (or failed, when it raises), in the manifest."""
        t0, c0 = time.perf_counter(), time.process_time()
        self.manifest["stages"][name] = "running"
        PROGRESS.info(f"{name} ...")
        try:
            yield
        except BaseException:
            self.seconds[name] = round(time.perf_counter() - t0, 3)
            self.manifest["stages"][name] = "failed"
            PROGRESS.info(f"{name} failed after {self.seconds[name]:.1f} s")
            self._write()
            raise
        self.seconds[name] = round(time.perf_counter() - t0, 3)
        self.cpu_seconds[name] = round(time.process_time() - c0, 3)  # this process's threads (not Dask workers)
        self.manifest["stages"][name] = "done"
        PROGRESS.info(f"{name} done in {self.seconds[name]:.1f} s")
        self._write()

    def _write(self, **extra: Any) -> None:
        if self.audit_dir is not None:
            timing = {"seconds": self.seconds, "cpu_seconds": self.cpu_seconds}
            write_json_atomic(self.audit_dir / "manifest.json", self.manifest | timing | extra)

    def _tracked(self, what: Callable[[], Any]) -> Any:
        """``what()``, or None when MLflow is unreachable (remembered: the flow ends saying so)."""
        from tasks.record.tracker import TrackingUnavailable

        try:
            return what()
        except TrackingUnavailable as exc:
            self.tracking_error = exc
            return None

    # ---------------------------------------------------------------------------------------------- inputs
    def load_inputs(self, load: Callable[[], Inputs]) -> Inputs:
        """Run the first stage; a refusal is recorded in MLflow (its own run per refused parameter set), then
        raised. Then the audit's run is opened (reopened on a rerun)."""
        with self.stage("load_inputs"):
            try:
                inputs = load()
            except InputValidationError as exc:
                self._record_refusal(exc)
                raise
        self.audit_dir = Path(inputs.audit_dir)
        self.manifest["audit_id"] = inputs.audit_id
        self.manifest["inputs"] = {k: v for k, v in inputs.to_json().items() if k != "validation"}
        self.run_id = self._tracked(lambda: start_run(self.p, inputs, inputs.audit_id))
        if self.tracking_error is not None:
            self.log.warning(f"{self.tracking_error}: computing the audit anyway; its results stay on disk for "
                             f"`influence-audit sync`")
        self.manifest["mlflow_run_id"] = self.run_id
        self.manifest["mlflow"] = "pending"
        return inputs

    def _record_refusal(self, exc: InputValidationError) -> None:
        from tasks.record.tracker import TrackingUnavailable, record_validation_failure

        try:
            refused = start_run(self.p, None, f"invalid-input-{stable_key(self.p.identity(), length=12)}")
            record_validation_failure(refused, exc.reports)
            finish_run(refused, succeeded=False, validation_passed=False, error=str(exc))
        except TrackingUnavailable:
            self.log.warning("MLflow is unreachable: this input validation failure is not recorded there")

    # ------------------------------------------------------------------------------------------ the body
    @contextmanager
    def running(self) -> Iterator[None]:
        """Around the stages after the inputs: on any failure the manifest and the run say so."""
        from tasks.record.run import finish_run as finish_plain

        try:
            yield
        except BaseException as exc:
            self.manifest["status"] = "failed"
            self._write(error=str(exc)[:500])
            if self.run_id is not None:
                try:
                    finish_plain(self.run_id, False, self.manifest.get("validation_passed"), str(exc))
                except Exception:
                    self.log.warning("could not mark the MLflow run failed; `influence-audit sync` will")
            raise
        self.manifest["status"] = "succeeded"
        self._write()

    def record(self, record: Callable[[], dict[str, float]], *, validation_passed: bool) -> None:
        """Record the results in MLflow (when its run exists), then fail the audit if its outputs failed
        validation (the record shows why)."""
        self.manifest["validation_passed"] = validation_passed
        if self.run_id is not None and self.tracking_error is None:
            with self.stage("record_mlflow"):
                self.metrics = self._tracked(record) or {}
        if not validation_passed:
            raise RuntimeError(f"output validation failed: see the reports in {self.audit_dir / 'validation'}")

    def open_review(self, open_review: Callable[[], Any]) -> None:
        """Hand the candidates to reviewers and end the MLflow run as succeeded."""
        if self.run_id is None or self.tracking_error is not None:
            return
        with self.stage("open_review"):
            try:
                open_review()
            except Exception as exc:  # the hand-off artifact needs the Prefect API; the results are whole
                self.manifest["review_artifact"] = f"not created: {first_line(exc, 200)}"
                self.log.warning(f"review artifact not created ({exc!r}); the MLflow run is tagged "
                                 f"review.status=open")
        if self._tracked(lambda: finish_run(self.run_id, succeeded=True, validation_passed=True) or True):
            self.manifest["mlflow"] = "recorded"

    def result(self, **extra: Any) -> dict[str, Any]:
        """The flow's return value; raises TrackingUnavailable when MLflow missed the results."""
        from tasks.record.tracker import TrackingUnavailable

        if self.tracking_error is not None:
            first = first_line(self.tracking_error, 300)
            raise TrackingUnavailable(f"audit {self.manifest['audit_id']} finished and its results are on disk in "
                                      f"{self.audit_dir}, but they are not recorded in MLflow: {first}",
                                      hint="run `influence-audit sync` once MLflow is reachable again")
        return {"audit_id": self.manifest["audit_id"], "run_id": self.run_id, "audit_dir": str(self.audit_dir),
                "metrics": self.metrics, "seconds": self.seconds, "home": str(self.home),
                "tracking_uri": self.tracking_uri} | extra
