"""Shared by the reliability tests (bad input, kill-and-resume, concurrency, servers down): a tiny model and
corpus built in seconds, the CLI run as a subprocess with quiet offline settings, a Prefect server on a free
127.0.0.1 port (tests/servers.py), and counters for the closing note of docs/reliability.md."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLI = str(BIN / "influence-audit")
WORDS = ("the a cat dog bird sat ran flew on under over mat rug tree big small red blue green capital of is city "
         "river north south old new").split()

# Offline and quiet: shared by every test that starts a server or the CLI as a subprocess.
OFFLINE_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
QUIET_ENV = OFFLINE_ENV | {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "OMP_NUM_THREADS": "1",
    "NO_COLOR": "1",
    "COLUMNS": "200",
}
# Settings a developer's shell may carry that would point the tests at some other server.
_DROP = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
         "INFLUENCE_AUDIT_HOME")

# Counted over the session and printed at the end (see docs/reliability.md): inputs tried, faults injected,
# results compared.
COUNTS: Counter[str] = Counter()


def env(**extra: str) -> dict[str, str]:
    """The test process's environment without settings that point at other servers, plus quiet settings."""
    out = {k: v for k, v in os.environ.items() if k not in _DROP}
    out.update(QUIET_ENV)
    out.update(extra)
    return out


# ------------------------------------------------------------------------------------------------ model, data


def build_model(out_dir: Path, *, seed: int = 0, n_embd: int = 16, vocab_size: int | None = None,
                n_positions: int = 64) -> Path:
    """A random 2-layer GPT-2 with a word-level tokenizer over WORDS (``vocab_size`` overrides the embedding
    size, e.g. smaller than the tokenizer to build a mismatched pair)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1} | {w: i + 2 for i, w in enumerate(dict.fromkeys(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size or len(fast), n_positions=n_positions, n_embd=n_embd, n_layer=2,
                     n_head=2, bos_token_id=1, eos_token_id=1, pad_token_id=1)
    model = GPT2LMHeadModel(cfg).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


def write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def corpus(n: int, *, seed: int = 0, lo: int = 4, hi: int = 14, prefix: str = "d") -> list[dict]:
    r = random.Random(seed)
    return [{"id": f"{prefix}{i:04d}", "text": " ".join(r.choice(WORDS) for _ in range(r.randint(lo, hi)))}
            for i in range(n)]


def queries(n: int, *, seed: int = 1) -> list[dict]:
    r = random.Random(seed)
    return [{"id": f"q{i}", "prompt": " ".join(r.choice(WORDS) for _ in range(3)),
             "completion": " " + " ".join(r.choice(WORDS) for _ in range(2))} for i in range(n)]


# ---------------------------------------------------------------------------------------------------- the CLI


def run_cli(args: Sequence[str], *, env_: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``influence-audit ARGS`` to completion; returns the completed process (text output)."""
    return subprocess.run([CLI, *args], env=env_ or env(), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def run_in_process(args: Sequence[str]) -> subprocess.CompletedProcess:
    """Run ``influence-audit ARGS`` through the CLI's entry point in this process (no interpreter start, no
    imports: milliseconds instead of seconds); exit code and output as a subprocess would give them. An
    exception escaping the entry point is a bug: it comes back as exit 1 with its traceback in stderr."""
    import contextlib
    import io
    import traceback

    from influence_audit import cli

    out, err = io.StringIO(), io.StringIO()
    code = 0
    argv = sys.argv
    sys.argv = ["influence-audit", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:
                err.write(traceback.format_exc())
                code = 1
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def start_cli(args: Sequence[str], *, env_: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start ``influence-audit ARGS`` in its own session, output to ``log``."""
    fh = open(log, "ab")
    try:
        return subprocess.Popen([CLI, *args], env=env_, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        fh.close()


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The non-blank lines of stderr."""
    return [line for line in proc.stderr.splitlines() if line.strip()]


def tmp_leftovers(root: Path) -> list[Path]:
    """Temporary files of the atomic writers (ours: ``.NAME.XXXX.tmp``; safetensors': ``.tmpXXXX``)."""
    if not root.exists():
        return []
    return [p for p in root.rglob(".*") if p.is_file() and (p.name.endswith(".tmp") or p.name.startswith(".tmp"))]


# ------------------------------------------------------------------------------------------------ servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 (127.0.0.1 only)
            return r.status == 200
    except OSError:
        return False


def stop(popen: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGINT to the process group we started, then SIGKILL."""
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGKILL, 10.0)):
        if popen.poll() is not None:
            break
        try:
            os.killpg(popen.pid, sig)
        except ProcessLookupError:
            break
        try:
            popen.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def audit_env(api_url: str, root: Path, **extra: str) -> dict[str, str]:
    """Environment for an audit subprocess against the shared Prefect server."""
    return env(PREFECT_API_URL=api_url, PREFECT_HOME=str(root / "client-prefect-home"), **extra)


def audit_args(model: Path, train: Path, queries_path: Path, home: Path, *extra: str, shard_size: int = 40,
               batch_size: int = 4) -> list[str]:
    """A small audit on the tiny model: fast settings, ``shard_size`` documents per shard."""
    return ["audit", "--model", str(model), "--train", str(train), "--queries", str(queries_path),
            "--output-dir", str(home), "--device", "cpu", "--max-length", "32", "--top-k", "5",
            "--query-rank", "4", "--batch-size", str(batch_size), "--shard-size", str(shard_size), *extra]


def mlflow_runs(tracking_uri: str, audit_id: str, experiment: str = "influence-audit") -> list:
    """Every MLflow run of ``experiment`` tagged ``audit.id=audit_id`` (newest first)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`audit.id` = '{audit_id}'",
                              order_by=["attributes.start_time DESC"])


def file_states(root: Path, patterns: Sequence[str] = ("*.parquet", "*.safetensors")) -> dict[str, tuple[int, str]]:
    """``{relative path: (mtime_ns, sha256)}`` of the result files under ``root`` (not temporary files)."""
    import hashlib

    out = {}
    for pattern in patterns:
        for p in root.rglob(pattern):
            if p.name.startswith(".") or "mlartifacts" in p.parts:
                continue
            out[str(p.relative_to(root))] = (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def report_counts() -> str:
    keys = ("inputs tried", "faults injected", "results compared")
    return ", ".join(f"{k}: {COUNTS[k]}" for k in keys)
