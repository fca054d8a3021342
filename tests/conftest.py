"""Shared fixtures: the demo model (trained once per session), quiet and offline settings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# Under pytest-xdist (scripts/test.sh runs two workers) each worker gets its own Prefect home, so the in-process
# flows' temporary servers never share one sqlite database, and computes with one torch thread (its subprocesses
# too): two workers with two threads each on two cores spin against each other (the fast set took twice the CPU).
if _worker := os.environ.get("PYTEST_XDIST_WORKER"):
    if os.environ.get("PREFECT_HOME"):
        os.environ["PREFECT_HOME"] = f"{os.environ['PREFECT_HOME']}-{_worker}"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests are grouped as the code is (engine, inputs, influence, quality, record, review, ops, cli); support modules
# (helpers, servers, ...) sit here, and a few tests share fixtures across groups by module name.
_TESTS = Path(__file__).parent
for _group in sorted(p for p in _TESTS.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
    if str(_group) not in sys.path:
        sys.path.append(str(_group))
sys.path.insert(0, str(_TESTS))

DEMO_DATA = Path(__file__).resolve().parents[1] / "influence_audit" / "demo" / "data"


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    """The demo's tiny GPT-2, trained on the shipped corpus (cached across sessions when
    INFLUENCE_AUDIT_TEST_CACHE names a directory)."""
    from filelock import FileLock

    from influence_audit.demo.model import ensure_demo_model

    cache = os.environ.get("INFLUENCE_AUDIT_TEST_CACHE")
    if cache:
        root = Path(cache)
    elif os.environ.get("PYTEST_XDIST_WORKER"):  # one model for all workers (their base temp dirs share a parent)
        root = tmp_path_factory.getbasetemp().parent / "demo-model"
    else:
        root = tmp_path_factory.mktemp("demo-model")
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".lock")):
        return ensure_demo_model(root, seed=0, log=None)


@pytest.fixture(scope="session")
def demo_data() -> Path:
    return DEMO_DATA


def pytest_unconfigure(config) -> None:
    """Prefect stops its temporary server at interpreter exit and logs it after pytest closed the captured
    streams; keep that harmless log call from printing a 'Logging error' traceback after the summary."""
    import logging

    logging.raiseExceptions = False


def pytest_collection_modifyitems(config, items) -> None:
    """Integration tests start real servers: they are slow too (``-m "not slow"`` is the fast, exact set)."""
    for item in items:
        if item.get_closest_marker("integration") is not None:
            item.add_marker(pytest.mark.slow)
