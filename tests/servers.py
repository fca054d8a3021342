"""Every server the tests start, in one place: a Prefect server and an MLflow server on free 127.0.0.1 ports,
telemetry off, state in a temporary directory, stopped by process group (SIGINT, then SIGKILL) afterwards.

``prefect_server(root)`` (the Prefect API URL) and ``servers(root)`` (Prefect and MLflow together, for the
integration tests) are generators for fixtures; the fixtures themselves are in tests/conftest.py (``prefect_api``,
module-scoped) and tests/integration/conftest.py (``servers``, session-scoped)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from reliability_support import _DROP, OFFLINE_ENV, free_port

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 180.0  # two shared cores: the servers usually answer in 10-20 s
QUIET_ENV = OFFLINE_ENV


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROP}
    env.update(QUIET_ENV)
    env.update(extra)
    return env


@dataclass
class Proc:
    """A subprocess we started, in its own process group, with its output in a log file."""

    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGINT to the group (servers spawn children), then SIGKILL if it has not exited."""
        if not self.alive():
            return
        pgid = self.popen.pid  # start_new_session: the group id is our child's pid
        for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            try:
                self.popen.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # leftovers of the group (e.g. uvicorn workers) after the leader exited
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start(name: str, cmd: list[str], env: dict[str, str], log_dir: Path, cwd: Path | None = None) -> Proc:
    log = log_dir / f"{name}.log"
    fh = open(log, "ab")
    popen = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    fh.close()
    return Proc(name, popen, log)


def wait_for(check: Callable[[], bool], timeout_s: float, what: str, *procs: Proc,
             every_s: float = 0.5) -> float:
    """Poll ``check`` until it is true; fail early if one of ``procs`` died. Returns the seconds waited."""
    t0 = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - t0
        except (httpx.HTTPError, OSError):
            pass
        for p in procs:
            if not p.alive():
                pytest.fail(f"{p.name} exited with {p.popen.returncode} while waiting for {what}:\n"
                            f"{p.tail()}")
        if time.monotonic() - t0 > timeout_s:
            logs = "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs)
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{logs}")
        time.sleep(every_s)


def http_ok(url: str) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=5).status_code == 200


@dataclass
class Servers:
    prefect_api: str
    mlflow_uri: str
    home: Path  # INFLUENCE_AUDIT_HOME of the workers
    logs: Path
    env: dict[str, str]  # for every process that talks to the servers


def servers(root: Path) -> Iterator[Servers]:
    """A Prefect server and an MLflow server (with webhooks to loopback http allowed), started in parallel."""
    logs = root / "logs"
    logs.mkdir()
    pport, mport = free_port(), free_port()
    prefect_env = base_env(PREFECT_HOME=str(root / "prefect-home"))
    mlflow_env = base_env(MLFLOW_WEBHOOK_ALLOWED_SCHEMES="http,https",
                          MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS="true")
    prefect = start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                       "--port", str(pport), "--no-ui"], prefect_env, logs)
    mlflow = start("mlflow-server", [str(BIN / "mlflow"), "server", "--backend-store-uri",
                                     f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root",
                                     str(root / "art"), "--host", "127.0.0.1", "--port", str(mport),
                                     "--workers", "1"], mlflow_env, logs)
    try:
        t_p = wait_for(http_ok(f"http://127.0.0.1:{pport}/api/health"), START_TIMEOUT_S, "prefect server",
                       prefect)
        t_m = wait_for(http_ok(f"http://127.0.0.1:{mport}/health"), START_TIMEOUT_S, "mlflow server", mlflow)
        print(f"\nprefect server healthy after {t_p:.1f} s, mlflow server after {t_m:.1f} s more")
        env = base_env(PREFECT_HOME=str(root / "client-home"), PREFECT_API_URL=f"http://127.0.0.1:{pport}/api",
                       MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mport}",
                       INFLUENCE_AUDIT_HOME=str(root / "audit-home"))
        yield Servers(env["PREFECT_API_URL"], env["MLFLOW_TRACKING_URI"], root / "audit-home", logs, env)
    finally:
        mlflow.stop()
        prefect.stop()


AUTH_ADMIN = ("admin", "admin-pass-3f9c1e")


def mlflow_auth_server(root: Path, timeout_s: float = START_TIMEOUT_S) -> Iterator[str]:
    """``mlflow server --app-name basic-auth`` on a free 127.0.0.1 port, configured as docs/operations.md says
    (no permission by default, our authorization function naming reviewers, admin :data:`AUTH_ADMIN`); yields its
    URI. The server imports ``tasks`` from this checkout (PYTHONPATH)."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ini = root / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                   f"database_uri = sqlite:///{root / 'basic_auth.db'}\nadmin_username = {AUTH_ADMIN[0]}\n"
                   "authorization_function = tasks.record.reviewer_auth:authenticate\n")
    repo = Path(__file__).resolve().parents[1]
    env = base_env(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD=AUTH_ADMIN[1],
                   MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret-key-0123456789",
                   PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = start("mlflow-auth-server", [str(BIN / "mlflow"), "server", "--app-name", "basic-auth",
                                        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                                        "--default-artifact-root", str(root / "art"), "--host", "127.0.0.1",
                                        "--port", str(port), "--workers", "1"], env, root)
    try:
        wait_for(http_ok(f"http://127.0.0.1:{port}/health"), timeout_s, "mlflow basic-auth server", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def prefect_server(root: Path, timeout_s: float = START_TIMEOUT_S) -> Iterator[str]:
    """A Prefect server on a free 127.0.0.1 port, state under ``root``; yields its API URL."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                    str(port), "--no-ui"], base_env(PREFECT_HOME=str(root / "prefect-home")), root)
    try:
        wait_for(http_ok(f"http://127.0.0.1:{port}/api/health"), timeout_s, "prefect server", proc)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        proc.stop()
