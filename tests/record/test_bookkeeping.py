"""The audit's manifest follows its stages: running, then done, or failed when the stage raises (never left
"running" after a failure)."""

from __future__ import annotations

import json
import logging

import pytest

from tasks.options import AuditParams
from tasks.record.bookkeeping import AuditBook


def test_a_stage_that_raises_is_marked_failed(tmp_path):
    p = AuditParams(model="m", train=["t.jsonl"], queries="q.jsonl", output_dir=str(tmp_path),
                    tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    book = AuditBook(p, logging.getLogger("test"))
    book.audit_dir = tmp_path / "audit"
    with book.stage("fine"):
        pass
    with pytest.raises(ValueError, match="boom"), book.stage("broken"):
        raise ValueError("boom")
    manifest = json.loads((book.audit_dir / "manifest.json").read_text())
    assert manifest["stages"] == {"fine": "done", "broken": "failed"}
    assert set(manifest["seconds"]) == {"fine", "broken"}
