"""Real servers for the integration tests: a Prefect server and an MLflow server on 127.0.0.1 (free ports),
telemetry off, state in a temporary directory, stopped by PID (SIGINT, then SIGKILL) afterwards."""

from __future__ import annotations

import json
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
from reliability_support import _DROP, OFFLINE_ENV, free_port  # noqa: F401 (free_port re-exported)

REPO = Path(__file__).resolve().parents[2]
DEMO_DATA = REPO / "influence_audit" / "demo" / "data"
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


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """A Prefect server and an MLflow server (with webhooks to loopback http allowed), started in parallel."""
    root = tmp_path_factory.mktemp("servers")
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


def build_tiny_model(out_dir: Path, seed: int) -> Path:
    """A random 2-layer GPT-2, word-level tokenizer over the demo texts: seconds to build, audits fast."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    rows = [json.loads(line) for f in ("corpus.jsonl", "queries.jsonl")
            for line in (DEMO_DATA / f).read_text().splitlines() if line.strip()]
    texts = [r.get("text") or r.get("prompt", "") + r.get("completion", "") for r in rows]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                   pad_token="<eos>")
    eos = fast.convert_tokens_to_ids("<eos>")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(fast), n_positions=512, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=eos, eos_token_id=eos))
    model.save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny models with different weights: 'before' and 'after' a retraining."""
    root = tmp_path_factory.mktemp("models")
    return build_tiny_model(root / "tiny-a", 0), build_tiny_model(root / "tiny-b", 1)
