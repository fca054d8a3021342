"""Retrain-triggered audits against real servers, and the MLflow webhook receiver.

The unmarked tests at the top run the receiver in-process (no servers, a second or two). The integration test
(``pytest -m integration``) starts a Prefect server and an MLflow server, deploys ``prefect.yaml``, runs a
process worker, then: ``influence-audit notify-retrained`` -> triggered audit -> run on the MLflow server; and
an MLflow model-version registration -> signed webhook -> receiver -> triggered audit of ``models:/NAME/1``.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tasks.ops.webhook import make_server, sign

from .conftest import BIN, DEMO_DATA, REPO, Proc, Servers, free_port, start, wait_for

SECRET = "s3cret-for-tests"
AUDIT_TIMEOUT_S = 300.0


# ------------------------------------------------------------------------ receiver, in-process (unit level)


def _delivery(body: dict[str, Any], *, secret: str = SECRET, ts: float | None = None,
              delivery_id: str | None = None) -> tuple[bytes, dict[str, str]]:
    """A request as MLflow's webhook delivery makes it (same JSON layout and headers)."""
    raw = json.dumps(body).encode()
    delivery_id = delivery_id or str(uuid.uuid4())
    stamp = str(int(time.time() if ts is None else ts))
    return raw, {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery_id,
                 "X-MLflow-Timestamp": stamp, "X-MLflow-Signature": sign(secret, delivery_id, stamp, raw)}


def _created(name: str = "lm", version: str = "3") -> dict[str, Any]:
    return {"entity": "model_version", "action": "created", "timestamp": "2026-11-28T00:00:00+00:00",
            "data": {"name": name, "version": version, "source": "runs:/abc/model", "run_id": "abc",
                     "tags": {}, "description": None}}


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[str, dict]]]]:
    """The receiver on a free port with a recording ``emit`` (so it runs without a Prefect server)."""
    emitted: list[tuple[str, dict]] = []

    def emit(model: str, *, payload: dict) -> str:
        emitted.append((model, payload))
        return f"event-{len(emitted)}"

    server = make_server("127.0.0.1", 0, SECRET, emit=emit,
                         version_exists=lambda name, version: name != "example_model")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/mlflow/webhook", emitted
    finally:
        server.shutdown()
        server.server_close()


def test_signature_matches_mlflows_own_signer() -> None:
    from mlflow.webhooks.delivery import _generate_hmac_signature

    body = json.dumps(_created())
    theirs = _generate_hmac_signature(SECRET, "d-1", "1700000000", body)
    assert sign(SECRET, "d-1", "1700000000", body.encode()) == theirs


def test_receiver_emits_for_a_signed_delivery_once(receiver) -> None:
    url, emitted = receiver
    body, headers = _delivery(_created("lm", "3"))
    r = httpx.post(url, content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "models:/lm/3"
    assert [m for m, _ in emitted] == ["models:/lm/3"]
    assert emitted[0][1]["source"] == "mlflow-webhook" and emitted[0][1]["run_id"] == "abc"
    again = httpx.post(url, content=body, headers=headers)  # MLflow retry of the same delivery
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    assert len(emitted) == 1


@pytest.mark.parametrize("case", ["wrong-secret", "no-signature", "tampered-body", "stale", "future",
                                  "bad-version"])
def test_receiver_refuses_unsigned_or_forged_deliveries(receiver, case: str) -> None:
    url, emitted = receiver
    body, headers = _delivery(_created("forged", "1"),
                              secret="not-the-secret" if case == "wrong-secret" else SECRET,
                              ts={"stale": time.time() - 3600, "future": time.time() + 3600}.get(case))
    if case == "no-signature":
        del headers["X-MLflow-Signature"]
    if case == "tampered-body":
        body = body.replace(b'"forged"', b'"other"')
    if case == "bad-version":
        headers["X-MLflow-Signature"] = "v2," + headers["X-MLflow-Signature"].split(",", 1)[1]
    r = httpx.post(url, content=body, headers=headers)
    assert r.status_code == 401, r.text
    assert "refused" in r.json()["error"]
    assert emitted == []


def test_receiver_ignores_other_events_and_test_payloads(receiver) -> None:
    url, emitted = receiver
    other = _created() | {"entity": "registered_model"}
    for payload in (other, _created("example_model", "1")):  # the second: MLflow's "test webhook" example
        body, headers = _delivery(payload)
        r = httpx.post(url, content=body, headers=headers)
        assert r.status_code == 200 and r.json()["status"] == "ignored", r.text
    body, headers = _delivery({"entity": "model_version", "action": "created", "data": {}})
    assert httpx.post(url, content=body, headers=headers).status_code == 400
    elsewhere = url.replace("/mlflow/webhook", "/elsewhere")
    assert httpx.post(elsewhere, content=body, headers=headers).status_code == 404
    assert emitted == []


def test_receiver_answers_503_when_prefect_is_unreachable() -> None:
    def emit(model: str, *, payload: dict) -> str:
        raise ConnectionError("no server")

    server = make_server("127.0.0.1", 0, SECRET, emit=emit)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        body, headers = _delivery(_created())
        url = f"http://127.0.0.1:{server.server_address[1]}/mlflow/webhook"
        r = httpx.post(url, content=body, headers=headers)
        assert r.status_code == 503  # MLflow retries 5xx
    finally:
        server.shutdown()
        server.server_close()


def test_notify_retrained_needs_a_prefect_server(tmp_path: Path) -> None:
    from .conftest import base_env

    env = base_env(PREFECT_HOME=str(tmp_path / "ph"))
    r = subprocess.run([str(BIN / "influence-audit"), "notify-retrained", "--model", str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "PREFECT_API_URL" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------- models:/ and runs:/ URIs (a sqlite MLflow store)


@pytest.fixture
def sqlite_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    import mlflow

    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("INFLUENCE_AUDIT_HOME", str(tmp_path / "home"))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        yield tmp_path / "home" / "model-cache"
    finally:
        mlflow.set_tracking_uri(previous)


def test_model_uris_resolve_to_cached_model_directories(sqlite_registry: Path, tmp_path: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    from influence_engine.errors import UserError
    from tasks.ops.model_uri import register_model_dir, resolve_model_uri

    from .conftest import build_tiny_model

    model = build_tiny_model(tmp_path / "m", seed=0)
    assert register_model_dir(model, "lm") == "models:/lm/1"
    assert register_model_dir(model, "lm") == "models:/lm/2"
    MlflowClient().set_registered_model_alias("lm", "champion", "1")
    by_version = resolve_model_uri("models:/lm/1")
    assert (Path(by_version) / "config.json").is_file()
    assert Path(by_version).is_relative_to(sqlite_registry)
    assert resolve_model_uri("models:/lm@champion") == by_version  # alias pinned to its version: same cache
    assert resolve_model_uri("models:/lm/latest") == resolve_model_uri("models:/lm/2") != by_version
    run_id = mlflow.search_runs(experiment_names=["Default"], output_format="list")[0].info.run_id
    assert (Path(resolve_model_uri(f"runs:/{run_id}/model")) / "model.safetensors").is_file()
    before = (Path(by_version) / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_uri("models:/lm/1") == by_version  # cached: no second download
    assert (Path(by_version) / "model.safetensors").stat().st_mtime_ns == before
    assert not list(sqlite_registry.glob(".download-*")), "temporary download folders left behind"
    for bad, words in (("models:/lm/9", "lm/9"), ("models:/nope/1", "nope"), ("models:/lm@gone", "gone"),
                       ("runs:/", "not a models:/")):
        with pytest.raises(UserError, match=words):
            resolve_model_uri(bad)
    with mlflow.start_run() as run:  # an artifact that is not a model directory
        mlflow.log_text("hello", "notes/readme.txt")
    with pytest.raises(UserError, match="config.json"):
        resolve_model_uri(f"runs:/{run.info.run_id}/notes")


# ----------------------------------------------------------------------------- against real servers


def _api(servers: Servers, method: str, path: str, **kw: Any) -> Any:
    r = httpx.request(method, servers.prefect_api + path, timeout=30, **kw)
    r.raise_for_status()
    return r.json()


def _run(cmd: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _flow_runs(servers: Servers, deployment_id: str) -> list[dict]:
    return _api(servers, "POST", "/flow_runs/filter",
                json={"deployments": {"id": {"any_": [deployment_id]}}, "sort": "EXPECTED_START_TIME_ASC"})


def _wait_for_new_run(servers: Servers, deployment_id: str, known: set[str], worker: Proc) -> dict:
    """The first flow run of the deployment not in ``known``, once it is in a final state."""
    found: dict[str, Any] = {}

    def done() -> bool:
        runs = [r for r in _flow_runs(servers, deployment_id) if r["id"] not in known]
        if runs:
            found.update(runs[0])
            return runs[0]["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
        return False

    wait_for(done, AUDIT_TIMEOUT_S, "the triggered audit to finish", worker, every_s=1.0)
    if found["state_type"] != "COMPLETED":
        logs = _api(servers, "POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [found["id"]]}}})
        text = "\n".join(entry["message"] for entry in logs)[-6000:]
        pytest.fail(f"triggered flow run ended {found['state_type']}: {found['state_name']}\n{text}\n"
                    f"--- worker\n{worker.tail()}")
    return found


def _seconds(a: str, b: str) -> float:
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def _mlflow_audit_run(servers: Servers, model: str) -> Any:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=servers.mlflow_uri)
    exp = client.get_experiment_by_name("influence-audit")
    assert exp is not None, "no influence-audit experiment on the MLflow server"
    runs = client.search_runs([exp.experiment_id], filter_string=f"params.model = '{model}'")
    assert len(runs) == 1, f"{len(runs)} MLflow runs for model {model}"
    return runs[0]


def _events(servers: Servers) -> list[dict]:
    page = _api(servers, "POST", "/events/filter",
                json={"filter": {"event": {"name": ["model.retrained"]}}, "limit": 50})
    return page["events"]


@pytest.mark.integration
def test_retrain_event_and_registry_webhook_trigger_audits(servers: Servers, tiny_models: tuple[Path, Path],
                                                           tmp_path: Path) -> None:
    model_a, model_b = tiny_models
    env = servers.env | {"INFLUENCE_AUDIT_REPO": str(REPO), "INFLUENCE_AUDIT_MODEL": str(model_a),
                         "INFLUENCE_AUDIT_TRAIN": str(DEMO_DATA / "corpus.jsonl"),
                         "INFLUENCE_AUDIT_QUERIES": str(DEMO_DATA / "queries.jsonl"),
                         "PREFECT_WORKER_QUERY_SECONDS": "2", "INFLUENCE_AUDIT_WEBHOOK_SECRET": SECRET}
    prefect = str(BIN / "prefect")
    t = time.monotonic()
    _run([prefect, "work-pool", "create", "influence-cpu", "--type", "process", "--overwrite"], env)
    _run([prefect, "work-pool", "create", "influence-review", "--type", "process", "--overwrite"], env)
    _run([prefect, "--no-prompt", "deploy", "--all"], env)
    print(f"\nwork pool + deploy --all: {time.monotonic() - t:.1f} s")

    deployments = {d["name"]: d for d in _api(servers, "POST", "/deployments/filter", json={})}
    assert {"scheduled-audit", "post-retrain-audit"} <= set(deployments)
    scheduled = deployments["scheduled-audit"]
    assert scheduled["work_pool_name"] == "influence-cpu"
    assert [s["schedule"]["cron"] for s in scheduled["schedules"]] == ["0 3 * * 1"]
    assert scheduled["schedules"][0]["schedule"]["timezone"] == "UTC"
    assert scheduled["parameters"]["params"]["model"] == str(model_a)  # {{ $INFLUENCE_AUDIT_MODEL }} applied
    post = deployments["post-retrain-audit"]
    automations = _api(servers, "POST", "/automations/filter", json={})
    triggers = [a["trigger"] for a in automations
                if any(act.get("deployment_id") == post["id"] for act in a["actions"])]
    assert len(triggers) == 1 and triggers[0]["expect"] == ["model.retrained"]

    worker = start("worker", [prefect, "worker", "start", "--pool", "influence-cpu", "--limit", "1"], env,
                   servers.logs)
    receiver: Proc | None = None
    try:
        # 1. a training pipeline says a model directory was retrained
        t_emit = time.monotonic()
        notify = _run([str(BIN / "influence-audit"), "notify-retrained", "--model", str(model_a)], env)
        t_sent = time.monotonic()
        event_id = notify.stdout.strip().splitlines()[-1]
        run1 = _wait_for_new_run(servers, post["id"], set(), worker)
        t_done = time.monotonic()
        assert run1["parameters"]["params"]["model"] == str(model_a)
        mrun = _mlflow_audit_run(servers, str(model_a))
        assert mrun.data.tags["audit.status"] == "succeeded", mrun.data.tags
        assert mrun.data.tags["validation.status"] == "passed", mrun.data.tags
        print(f"model.retrained (event {event_id}) -> finished audit: {t_done - t_emit:.1f} s wall "
              f"(CLI {t_sent - t_emit:.1f} s incl. start-up; flow run "
              f"{_seconds(run1['start_time'], run1['end_time']):.1f} s, started "
              f"{_seconds(run1['created'], run1['start_time']):.1f} s after the trigger created it)")

        # 2. the MLflow registry: new version -> signed webhook -> receiver -> model.retrained -> audit
        wport = free_port()
        receiver = start("webhook", [str(BIN / "influence-audit"), "webhook", "serve", "--host", "127.0.0.1",
                                     "--port", str(wport), "--secret-env", "INFLUENCE_AUDIT_WEBHOOK_SECRET"],
                         env, servers.logs)
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{wport}/health", timeout=5).status_code == 200, 120,
                 "webhook receiver", receiver)
        hook_url = f"http://127.0.0.1:{wport}/mlflow/webhook"
        forged, headers = _delivery(_created("forged-model", "1"), secret="guessed")
        assert httpx.post(hook_url, content=forged, headers=headers).status_code == 401

        import mlflow
        from mlflow import MlflowClient

        from tasks.ops.model_uri import register_model_dir

        client = MlflowClient(tracking_uri=servers.mlflow_uri)
        hook = client.create_webhook(name="influence-audit", url=hook_url, events=["model_version.created"],
                                     secret=SECRET)
        assert client.test_webhook(hook.webhook_id).success  # example payload: signed, but ignored
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(servers.mlflow_uri)
        try:
            mlflow.set_experiment("training")
            t_reg = time.monotonic()
            uri = register_model_dir(model_b, "tiny-lm")
        finally:
            mlflow.set_tracking_uri(previous)
        assert uri == "models:/tiny-lm/1"
        run2 = _wait_for_new_run(servers, post["id"], {run1["id"]}, worker)
        t_done2 = time.monotonic()
        assert run2["parameters"]["params"]["model"] == uri
        mrun2 = _mlflow_audit_run(servers, uri)
        assert mrun2.data.tags["audit.status"] == "succeeded", mrun2.data.tags
        assert mrun2.info.run_id != mrun.info.run_id
        cached = list((servers.home / "model-cache").glob("models_tiny-lm_1-*/config.json"))
        assert len(cached) == 1, "the models:/ URI was not fetched into the model cache"
        print(f"model version registered -> webhook -> finished audit: {t_done2 - t_reg:.1f} s wall "
              f"(flow run {_seconds(run2['start_time'], run2['end_time']):.1f} s)")

        # what reached Prefect: the two real events, never the forged one
        def both_events() -> bool:
            return {e["payload"].get("model") for e in _events(servers)} >= {str(model_a), uri}

        wait_for(both_events, 60, "events to be persisted")
        models = [e["payload"].get("model") for e in _events(servers)]
        assert not [m for m in models if "forged" in (m or "")], models
        assert models.count(uri) == 1, models  # one delivery, one event (test_webhook's example was ignored)

        # 3. GPU workers (docs/operations.md): the same deployment, moved into the influence-gpu pool
        worker.stop()
        _run([prefect, "work-pool", "create", "influence-gpu", "--type", "process", "--overwrite"], env)
        _run([prefect, "--no-prompt", "deploy", "-n", "post-retrain-audit", "-p", "influence-gpu"], env)
        moved = _api(servers, "GET", f"/deployments/{post['id']}")
        assert moved["work_pool_name"] == "influence-gpu"
        automations = _api(servers, "POST", "/automations/filter", json={})
        assert len([a for a in automations
                    if any(act.get("deployment_id") == post["id"] for act in a["actions"])]) == 1
    finally:
        if receiver is not None:
            receiver.stop()
        worker.stop()
