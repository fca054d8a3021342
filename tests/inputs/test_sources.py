"""Training data as teams keep it: JSONL, Parquet parts, glob patterns and ``datasets`` directories read in row
ranges, with field mapping, derived ids, one-line errors located in later ranges, the streaming first stage (ids
unique across shards, fingerprint combined from the shards', a changed source refused), and identical scores
whatever the form."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from reliability_support import build_model, corpus, queries, run_in_process, write_jsonl

from influence_engine import DataError
from tasks.inputs.rows import Fields, data_fingerprint
from tasks.inputs.sources import plan_ranges, read_range, read_rows, resolve_sources

ROWS = corpus(60, seed=3)


def _forms(root: Path, df: pl.DataFrame) -> dict[str, object]:
    """The same documents as one JSONL file, three Parquet parts (a directory and a glob), a datasets Dataset
    directory and a DatasetDict directory (split train, beside a test split)."""
    import datasets

    jsonl = write_jsonl(root / "train.jsonl", df.to_dicts())
    (root / "parts").mkdir()
    for i in range(3):
        df.slice(i * 20, 20).write_parquet(root / "parts" / f"part-{i}.parquet")
    datasets.Dataset.from_polars(df).save_to_disk(str(root / "hf"))
    datasets.DatasetDict({"train": datasets.Dataset.from_polars(df),
                          "test": datasets.Dataset.from_polars(df.head(3))}).save_to_disk(str(root / "hfdict"))
    return {"jsonl": jsonl, "dir": root / "parts", "glob": str(root / "parts" / "*.parquet"), "dataset": root / "hf",
            "datasetdict": root / "hfdict"}


@pytest.fixture(scope="module")
def forms(tmp_path_factory) -> dict[str, object]:
    return _forms(tmp_path_factory.mktemp("forms"), pl.DataFrame(ROWS))


@pytest.mark.parametrize("form", ["jsonl", "dir", "glob", "dataset", "datasetdict"])
def test_every_form_reads_the_same_documents(forms, form):
    df = read_rows(forms[form], "train")
    assert df.select("id", "text").equals(pl.DataFrame(ROWS).select("id", "text"))
    assert df["source"][0].endswith(":1") and df["source"][-1].endswith(":20" if form in ("dir", "glob") else ":60")


def test_datasetdict_split_and_unknown_split(forms):
    assert read_rows(forms["datasetdict"], "train", split="test")["id"].to_list() == [r["id"] for r in ROWS[:3]]
    with pytest.raises(DataError, match=r"no split 'dev' \(splits: train, test\).*--split"):
        read_rows(forms["datasetdict"], "train", split="dev")


def test_glob_matching_nothing_is_one_line(tmp_path):
    with pytest.raises(DataError, match="matches no .jsonl or .parquet files"):
        read_rows(str(tmp_path / "nothing" / "*.parquet"), "train")


def test_ranges_of_a_jsonl_file_are_exactly_its_rows(tmp_path):
    """Blank lines, CRLF, a BOM and a last line without newline: the ranges' rows, in order, are the file's."""
    lines = [json.dumps(r) for r in ROWS[:23]]
    lines[4] = ""
    lines[9] = "   "
    data = "\ufeff" + "\r\n".join(lines)
    path = tmp_path / "odd.jsonl"
    path.write_text(data, encoding="utf-8")
    whole = read_rows(path, "train")
    for size in (1, 4, 7, 23, 100):
        ranges = plan_ranges(resolve_sources(path)[0], size)
        assert [r.start for r in ranges] == list(range(0, 23, size))
        parts = [read_range(r, "train")[0] for r in ranges]
        assert pl.concat([p for p in parts if p.height]).equals(whole), size


def test_bad_row_in_a_later_range_names_its_line(tmp_path):
    rows = [json.dumps(r) for r in ROWS[:50]]
    rows[44] = json.dumps({"id": "x44", "text": 7})
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    ranges = plan_ranges(resolve_sources(path)[0], 10)
    read_range(ranges[0], "train")
    with pytest.raises(DataError, match=r"bad\.jsonl:45: text must be a string"):
        read_range(ranges[4], "train")
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text("\n".join(json.dumps(r) for r in ROWS[:30]) + "\n{oops\n")
    with pytest.raises(DataError, match=r"malformed\.jsonl:31: malformed JSON"):
        read_range(plan_ranges(resolve_sources(malformed)[0], 10)[3], "train")


def test_field_mapping_and_derived_ids(tmp_path):
    from tasks.review.decisions import parse_decision

    (tmp_path / "parts").mkdir()
    body = pl.DataFrame({"doc": [r["id"] for r in ROWS], "body": [r["text"] for r in ROWS]})
    body.slice(0, 30).write_parquet(tmp_path / "parts" / "a.parquet")
    body.slice(30).write_parquet(tmp_path / "parts" / "b.parquet")
    mapped = read_rows(tmp_path / "parts", "train", fields=Fields(id="doc", text="body"))
    assert mapped.select("id", "text").equals(pl.DataFrame(ROWS).select("id", "text"))
    derived = read_rows(tmp_path / "parts", "train", fields=Fields(text="body"))
    assert derived["id"][0] == "parts/a.parquet#1" and derived["id"][-1] == "parts/b.parquet#30"
    assert read_rows(str(tmp_path / "parts" / "*.parquet"), "train", fields=Fields(text="body"))["id"][0] == \
        "a.parquet#1"
    assert read_rows(tmp_path / "parts", "train", fields=Fields(text="body"))["id"].equals(derived["id"])  # stable
    decision = parse_decision(f"q1:{derived['id'][5]}:culprit")
    assert decision.train_id == "parts/a.parquet#6"
    with pytest.raises(DataError, match=r"a\.parquet: missing column 'title' \(--text-field title\); found 'doc'"):
        read_rows(tmp_path / "parts", "train", fields=Fields(text="title"))
    with pytest.raises(DataError, match=r"missing column 'key' \(--id-field key\)"):
        read_rows(tmp_path / "parts", "train", fields=Fields(id="key", text="body"))
    (tmp_path / "other" / "parts").mkdir(parents=True)
    body.slice(0, 3).write_parquet(tmp_path / "other" / "parts" / "a.parquet")
    with pytest.raises(DataError, match=r"duplicate id 'parts/a\.parquet#1' at .*parts/a\.parquet:1 and "
                                        r".*other/parts/a\.parquet:1.*--id-field"):
        read_rows([tmp_path / "parts", tmp_path / "other" / "parts"], "train", fields=Fields(text="body"))


# ------------------------------------------------------------------------------ the streaming first stage


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"root": root, "model": build_model(root / "model", seed=0),
            "queries": write_jsonl(root / "q.jsonl", queries(3))}


def _params(tiny, train, home, **kw):
    from tasks.options import AuditParams

    return AuditParams(model=str(tiny["model"]), train=[str(t) for t in train], queries=str(tiny["queries"]),
                       output_dir=str(home), max_length=32, device="cpu", **({"shard_size": 7} | kw))


def test_streamed_inputs_equal_the_whole_read(tiny, forms, tmp_path):
    from tasks.inputs.shards import load_inputs, read_shard

    whole = read_rows(forms["jsonl"], "train")
    fps = set()
    for form in ("jsonl", "dir", "dataset"):
        ins = load_inputs(_params(tiny, [forms[form]], tmp_path / form))
        fps.add(ins.data_fingerprint)
        assert ins.n_docs == 60 and all(s.n_docs <= 7 for s in ins.shards)
        got = pl.concat([read_shard(s) for s in ins.shards])
        assert got.select("id", "text").equals(whole.select("id", "text"))
        manifest = json.loads((Path(ins.audit_dir) / "shards.json").read_text())
        assert [s["rows"]["start"] for s in manifest["shards"]][:2] == [0, 7]
        assert sum(s["n_docs"] for s in manifest["shards"]) == 60
        report = json.loads((Path(ins.audit_dir) / "validation" / "training_input.json").read_text())
        assert report["success"] and report["n_shards"] == len(ins.shards)
    assert fps == {data_fingerprint(whole)}


def test_duplicate_ids_across_shards_and_changed_sources_are_refused(tiny, tmp_path):
    from tasks.inputs.shards import load_inputs, read_shard

    rows = corpus(30, seed=1)
    rows[25]["id"] = rows[2]["id"]
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    with pytest.raises(DataError, match=rf"duplicate id '{rows[2]['id']}' at .*dup\.jsonl:3 and .*dup\.jsonl:26"):
        load_inputs(_params(tiny, [path], tmp_path / "h1"))
    path = write_jsonl(tmp_path / "ok.jsonl", corpus(30, seed=1))
    ins = load_inputs(_params(tiny, [path], tmp_path / "h2"))
    changed = corpus(30, seed=1)
    changed[10]["text"] = "the cat ran"
    write_jsonl(path, changed)
    read_shard(ins.shards[0])
    with pytest.raises(DataError, match=r"ok\.jsonl:8-14: the source changed during the audit"):
        read_shard(ins.shards[1])


def test_failed_expectations_name_the_shard_and_row():
    from tasks.inputs.checks import summarise_shard_reports, validate_training_frame

    good = pl.DataFrame({"id": ["a", "b"], "text": ["x y", "y z"], "n_tokens": [2, 2]})
    bad = pl.DataFrame({"id": ["c", "c"], "text": ["x", "y"], "n_tokens": [1, 0]})
    reports = [("f.jsonl:1-2", validate_training_frame(good, max_length=8, truncate=True,
                                                        sources=["f.jsonl:1", "f.jsonl:2"]).to_json()),
               ("f.jsonl:3-4", validate_training_frame(bad, max_length=8, truncate=True,
                                                        sources=["f.jsonl:3", "f.jsonl:4"]).to_json())]
    summary = summarise_shard_reports(reports)
    assert not summary.success
    failed = {r["check"]: r for r in summary.failures()}
    assert set(failed) == {"id_unique", "n_tokens_in_range"}
    assert failed["n_tokens_in_range"]["observed"]["failed_in"] == [
        {"shard": "f.jsonl:3-4", "rows": ["f.jsonl:4"], "values": [0]}]
    assert failed["n_tokens_in_range"]["observed"]["element_count"] == 4
    assert "at f.jsonl:4" in summary.summary()


def test_scores_are_identical_whatever_the_form(tiny, forms, tmp_path):
    out = {}
    for form in ("jsonl", "dir", "glob", "dataset", "datasetdict"):
        path = tmp_path / f"{form}.parquet"
        proc = run_in_process(["score", "--model", str(tiny["model"]), "--train", str(forms[form]), "--queries",
                               str(tiny["queries"]), "--out", str(path), "--device", "cpu", "--max-length", "32",
                               "--top-k", "0", "--strategy", "ekfac", "--query-rank", "0"])
        assert proc.returncode == 0, proc.stderr
        out[form] = pl.read_parquet(path)
    for form, df in out.items():
        assert df.equals(out["jsonl"]), form
    assert out["jsonl"].height == 3 * 60
