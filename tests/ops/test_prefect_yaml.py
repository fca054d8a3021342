"""prefect.yaml checked offline: names, entrypoint, schedule, trigger spec (pydantic, as `prefect deploy`
does), and that the trigger's parameters, rendered for a model.retrained event the way the server renders
them, are valid AuditParams for the event's model."""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import TypeAdapter

REPO = Path(__file__).resolve().parents[2]
ENV = {"INFLUENCE_AUDIT_MODEL": "models:/lm@champion", "INFLUENCE_AUDIT_TRAIN": "/data/train",
       "INFLUENCE_AUDIT_QUERIES": "/data/queries.jsonl"}


@pytest.fixture
def deployments(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    """The deployments as `prefect deploy` sees them after its environment templating."""
    from prefect.utilities.templating import apply_values

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    return {d["name"]: apply_values(d, {}, remove_notset=False) for d in doc["deployments"]}


def _render(parameters: dict[str, Any], model: str) -> dict[str, Any]:
    """Render trigger parameters for the model.retrained event `notify-retrained` sends for ``model``, exactly
    as the server's RunDeployment action renders them."""
    from prefect.server.events.actions import RunDeployment
    from prefect.server.events.schemas.events import ReceivedEvent
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    params = copy.deepcopy(parameters)
    RunDeployment._upgrade_v1_templates(params)
    from tasks.ops.events import retrained_event

    sent = retrained_event(model)
    event = ReceivedEvent(id=sent.id, event=sent.event, occurred=datetime.now(timezone.utc),
                          resource=dict(sent.resource.root), payload=sent.payload)
    ctx = HydrationContext(raise_on_error=True, render_jinja=True, jinja_context={"event": event})
    return hydrate(params, ctx)


def test_deployments_run_the_audit_flow(deployments: dict[str, dict[str, Any]]) -> None:
    from tasks.options import AuditParams

    assert set(deployments) == {"scheduled-audit", "post-retrain-audit", "quality-audit", "review", "review-pull"}
    for name in ("scheduled-audit", "post-retrain-audit", "quality-audit"):
        d = deployments[name]
        assert d["entrypoint"] == "flows/audit.py:influence_audit"
        assert d["work_pool"]["name"] == "influence-cpu"
        assert (REPO / d["entrypoint"].split(":")[0]).is_file()
        params = AuditParams.model_validate(d["parameters"]["params"])  # env placeholders were applied
        assert params.model == ENV["INFLUENCE_AUDIT_MODEL"] and params.train == [ENV["INFLUENCE_AUDIT_TRAIN"]]
    quality = AuditParams.model_validate(deployments["quality-audit"]["parameters"]["params"])
    assert quality.mode == "quality" and quality.queries is None
    (spec,) = deployments["quality-audit"]["schedules"]
    from prefect.client.schemas.schedules import CronSchedule

    assert CronSchedule(cron=spec["cron"], timezone=spec["timezone"]).timezone == "UTC"


def test_flow_signature_takes_params() -> None:
    import inspect

    from flows.audit import influence_audit

    assert list(inspect.signature(influence_audit.fn).parameters) == ["params"]


def test_scheduled_audit_is_weekly_utc(deployments: dict[str, dict[str, Any]]) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    (spec,) = deployments["scheduled-audit"]["schedules"]
    schedule = CronSchedule(cron=spec["cron"], timezone=spec["timezone"])
    assert schedule.timezone == "UTC"
    assert spec.get("active", True)
    fields = schedule.cron.split()
    assert fields[2:4] == ["*", "*"] and fields[4] not in ("*",), "weekly: one day of the week"


@pytest.fixture(params=["local", "models:/lm/3", "runs:/0a1b/model"])
def model(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A model as `notify-retrained` is given it: a local directory (with spaces and dots in its path) or a URI."""
    if request.param != "local":
        return request.param
    local = tmp_path / "models" / "run 7" / "lm.v2"
    local.mkdir(parents=True)
    (local / "config.json").write_text("{}")
    return str(local)


def test_post_retrain_trigger_takes_the_model_from_the_event(deployments: dict[str, dict[str, Any]],
                                                             model: str) -> None:
    from prefect.events import DeploymentEventTrigger, DeploymentTriggerTypes

    from tasks.options import AuditParams

    (spec,) = deployments["post-retrain-audit"]["triggers"]
    trigger = TypeAdapter(DeploymentTriggerTypes).validate_python(spec)
    assert isinstance(trigger, DeploymentEventTrigger)
    assert trigger.expect == {"model.retrained"}
    assert trigger.enabled
    rendered = _render(trigger.parameters or {}, model)
    params = AuditParams.model_validate(rendered["params"])
    assert params.model == model
    assert params.train == [ENV["INFLUENCE_AUDIT_TRAIN"]] and params.queries == ENV["INFLUENCE_AUDIT_QUERIES"]


def test_trigger_matches_what_notify_retrained_sends(deployments: dict[str, dict[str, Any]], model: str) -> None:
    """The event `notify-retrained` (and the webhook receiver) sends fires the trigger, and the parameters the
    trigger renders from that very event name the model."""
    from prefect.events import DeploymentTriggerTypes
    from prefect.events.schemas.events import Resource

    from tasks.ops.events import retrained_event
    from tasks.options import AuditParams

    (spec,) = deployments["post-retrain-audit"]["triggers"]
    trigger = TypeAdapter(DeploymentTriggerTypes).validate_python(spec)
    event = retrained_event(model)
    assert event.event in trigger.expect
    assert trigger.match.matches(event.resource)
    assert not trigger.match.matches(Resource({"prefect.resource.id": "dataset.x"}))
    rendered = _render(trigger.parameters or {}, model)
    assert AuditParams.model_validate(rendered["params"]).model == event.payload["model"]


def test_pull_step_sets_the_working_directory() -> None:
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (step,) = doc["pull"]
    directory = step["prefect.deployments.steps.set_working_directory"]["directory"]
    assert directory == "{{ $INFLUENCE_AUDIT_REPO }}"


def test_review_deployments(deployments: dict[str, dict[str, Any]]) -> None:
    """`review` (the Prefect-form review each audit starts, by this name) and `review-pull` (every minute), in a
    pool of their own (never queued behind an audit), the pull one run at a time (a due run while one is going is
    cancelled, not queued)."""
    import importlib
    import inspect

    from prefect.client.schemas.schedules import IntervalSchedule

    from tasks.review.runs import REVIEW_DEPLOYMENT

    review, pull = deployments["review"], deployments["review-pull"]
    for d in (review, pull):
        path, name = d["entrypoint"].split(":")
        fl = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        assert d["work_pool"]["name"] == "influence-review"
        if d is review:
            assert REVIEW_DEPLOYMENT == f"{fl.name}/review"
            assert "audit_id" in inspect.signature(fl.fn).parameters
    assert "schedules" not in review
    (spec,) = pull["schedules"]
    assert IntervalSchedule(interval=spec["interval"]).interval.total_seconds() == 60
    audit_pools = {d["work_pool"]["name"] for n, d in deployments.items() if n not in ("review", "review-pull")}
    assert audit_pools == {"influence-cpu"}  # no audit shares the review pool
    from prefect.cli.deploy._models import DeploymentConfig
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    limit = ConcurrencyLimitConfig.model_validate(pull["concurrency_limit"])
    assert (limit.limit, limit.collision_strategy) == (1, ConcurrencyLimitStrategy.CANCEL_NEW)
    DeploymentConfig.model_validate({k: v for k, v in pull.items()})  # as `prefect deploy` reads it


def test_gpu_pool_example_renders_one_pinned_worker_per_requested_gpu(monkeypatch: pytest.MonkeyPatch,
                                                                      model: str) -> None:
    """deploy/prefect-gpu.yaml: its job variables, rendered through the process work pool's own base job template,
    give the flow run CUDA_VISIBLE_DEVICES for the requested GPUs; the flow's `--dask local` then starts one worker
    per GPU, worker i pinned to device i; the trigger's parameters are valid for the flow."""
    import asyncio
    import importlib
    import inspect

    from prefect.events import DeploymentTriggerTypes
    from prefect.utilities.templating import apply_values
    from prefect.workers.process import ProcessJobConfiguration, ProcessWorker

    from flows.runners import local_cluster, visible_devices
    from tasks.options import AuditParams

    for k, v in (ENV | {"INFLUENCE_AUDIT_GPUS": "0,1,2,3,4,5,6,7"}).items():
        monkeypatch.setenv(k, v)
    doc = yaml.safe_load((REPO / "deploy" / "prefect-gpu.yaml").read_text())
    (d,) = [apply_values(x, {}, remove_notset=False) for x in doc["deployments"]]
    path, name = d["entrypoint"].split(":")
    fl = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
    assert list(inspect.signature(fl.fn).parameters) == ["params", "dask"]
    assert d["parameters"]["dask"] == "local"
    params = AuditParams.model_validate(d["parameters"]["params"])
    assert params.model == ENV["INFLUENCE_AUDIT_MODEL"] and params.device == "auto" and params.use_index

    pool = d["work_pool"]
    assert pool["name"] == "influence-gpu"
    job = ProcessJobConfiguration.from_template_and_values(ProcessWorker.get_default_base_job_template(),
                                                           pool["job_variables"])
    if inspect.isawaitable(job):
        job = asyncio.run(job)
    env = job.env
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7" and env["HF_HUB_OFFLINE"] == "1"
    cls, kwargs = local_cluster(None, visible_devices(env))
    assert cls == "flows.dask_cluster.PinnedLocalCluster" and kwargs["n_workers"] == 8
    assert [e["CUDA_VISIBLE_DEVICES"] for e in kwargs["worker_envs"]] == [str(i) for i in range(8)]

    (spec,) = d["triggers"]
    trigger = TypeAdapter(DeploymentTriggerTypes).validate_python(spec)
    rendered = _render(trigger.parameters or {}, model)
    assert AuditParams.model_validate(rendered["params"]).model == model and rendered["dask"] == "local"
