"""`influence-audit notify-retrained` against a real Prefect server: the event id once (stdout, for scripts), one
line on stderr naming the model path whole, however narrow the terminal."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import base_env, prefect_server

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from prefect_server(tmp_path_factory.mktemp("prefect-notify"))


def test_notify_retrained_prints_the_event_id_once_and_the_path_whole(prefect_api: str, tmp_path: Path) -> None:
    model = tmp_path / "a-rather-long-directory-name-for-models" / "support-lm-2026-12-06-retrained"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    env = base_env(PREFECT_API_URL=prefect_api, COLUMNS="40", PREFECT_HOME=str(tmp_path / "ph"))
    r = subprocess.run([str(BIN / "influence-audit"), "notify-retrained", "--model", str(model)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (event_id,) = r.stdout.split()
    assert len(event_id) == 36 and event_id.count("-") == 4  # a UUID
    assert [line for line in r.stderr.splitlines() if line.strip()] == [f"model.retrained sent for {model}"]
    assert event_id not in r.stderr
