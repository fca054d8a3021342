"""The layers hold: the engine imports no orchestration, tracking or validation package and no project layer
above it; tasks import no flows; flows import no CLI (import-linter contracts in pyproject.toml), and the engine
really loads without them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(lint).exists():
        pytest.fail("lint-imports is missing: install the test extra (pip install -e '.[test]')")
    proc = subprocess.run([lint, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_engine_runs_without_orchestration_packages_loaded():
    code = ("import sys, influence_engine as ie\n"
            "from influence_engine import engine, factors, queries, scoring, cache, settings, strategies\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'prefect', 'mlflow', 'great_expectations', 'polars', 'tasks', 'flows', 'influence_audit'})\n"
            "print(bad); sys.exit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_source_is_ruff_clean():
    """Lint as the house style says (pyproject's [tool.ruff]: also no pickle loads, unsafe YAML, exec or eval)."""
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    proc = subprocess.run([ruff, "check", "--no-cache", "influence_engine", "tasks", "flows", "influence_audit",
                           "bench", "tests", "scripts"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
