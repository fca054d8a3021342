"""The index benchmark runs end to end at a smoke size and writes finite figures (no timing asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a benchmark end to end

ROOT = Path(__file__).resolve().parents[2]


def test_index_bench_smoke(tmp_path):
    out = tmp_path / "index.json"
    args = ["--sizes", "300", "--queries", "3", "--refine", "20", "--sketches", "4x4", "--sketch", "8x8,top:200",
            "--planted", "2", "--search-docs", "2000", "--repeat", "2", "--out", str(out)]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "index_bench.py"), *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["complete"] and r["machine"]["commit"]
    (size,) = r["sizes"]
    assert set(size["sketches"]) == {"4x4", "8x8", "top:200"}
    for info in size["sketches"].values():
        for key in ("build_s", "query_s", "bytes_per_document", "speedup_vs_rescan"):
            assert math.isfinite(info[key]) and info[key] > 0, key
        assert info["pruned_equals_unpruned"] and info["refined_documents"] <= info["refined_documents_no_prune"]
        assert 0 <= info["probe_recall"]["recall_at_10"] <= 1 and info["probe_recall"]["probes"] == 8
        assert math.isfinite(info["model_160k"]["speedup"]) and info["search_scale"]["documents"] == 2000
        assert -1 <= info["agreement"]["spearman_mean"] <= 1
        assert info["planted_recall_at_10"]["exact"] >= 0
