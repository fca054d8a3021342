"""Tests for tasks.inputs.rows: readers, precise DataErrors, hashing, sharding and sampling."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from influence_engine.errors import DataError, UserError
from tasks.inputs.rows import add_content_hashes, content_hash, data_fingerprint, sample_queries, shard_frame
from tasks.inputs.sources import read_rows


def write_lines(path: Path, lines: list[str | bytes], *, end: bytes = b"\n") -> Path:
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + end for ln in lines))
    return path


def row(doc_id: object, text: object = "some text", **extra: object) -> str:
    return json.dumps({"id": doc_id, "text": text, **extra})


def qrow(doc_id: object, prompt: object = "Q?", completion: object = "A.", **extra: object) -> str:
    return json.dumps({"id": doc_id, "prompt": prompt, "completion": completion, **extra})


def read_error(paths: object, kind: str = "train") -> str:
    with pytest.raises(DataError) as info:
        read_rows(paths, kind)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message, "DataError messages are one line"
    return message


# ------------------------------------------------------------------------------------------ good input


def test_jsonl_text_rows_keep_extras_and_sources(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "train.jsonl",
                       [row("a", "alpha", fact="f1"), "", "   ", row("b", "beta", fact="f2")])
    df = read_rows(path, "train")
    assert df.columns == ["id", "text", "fact", "source"]
    assert df.rows() == [("a", "alpha", "f1", f"{path}:1"), ("b", "beta", "f2", f"{path}:4")]


def test_jsonl_prompt_completion_rows_column_order(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "t.jsonl",
                       [json.dumps({"category": "c", "completion": "A", "id": "x", "prompt": "Q"})])
    df = read_rows(path, "train")
    assert df.columns == ["id", "prompt", "completion", "category", "source"]
    assert df.row(0) == ("x", "Q", "A", "c", f"{path}:1")


def test_queries_read(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "q.json", [qrow("q1", fact="paris"), qrow("q2", fact="rome")])
    df = read_rows(str(path), "queries")
    assert df.columns == ["id", "prompt", "completion", "fact", "source"]
    assert df["id"].to_list() == ["q1", "q2"]


def test_parquet_reads_with_row_sources(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pl.DataFrame({"text": ["x", "y"], "id": ["a", "b"], "n": [1, 2]}).write_parquet(path)
    df = read_rows(path, "train")
    assert df.columns == ["id", "text", "n", "source"]
    assert df["source"].to_list() == [f"{path}:1", f"{path}:2"]


def test_categorical_parquet_ids_are_strings(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pl.DataFrame({"id": ["a", "b"], "text": ["x", "y"]}).with_columns(
        pl.col("id").cast(pl.Categorical)).write_parquet(path)
    assert read_rows(path, "train")["id"].dtype == pl.String


def test_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (row("a") + "\r\n\r\n" + row("b") + "\r\n").encode())
    df = read_rows(path, "train")
    assert df["id"].to_list() == ["a", "b"]
    assert df["source"].to_list() == [f"{path}:1", f"{path}:3"]


def test_last_line_without_newline_and_unicode(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    text = "naïve \u2028 line sep \x00 nul \"quoted\" \\ 😀"
    path.write_bytes((row("a") + "\n" + json.dumps({"id": "b", "text": text}, ensure_ascii=False)).encode())
    assert read_rows(path, "train")["text"].to_list() == ["some text", text]


def test_date_like_strings_stay_strings(tmp_path: Path) -> None:
    rows = [{"id": "2020-01-01", "text": "2021-02-03 04:05:06", "date": "2020-01-01",
             "meta": {"at": ["1999-12-31"]}},
            {"id": "1999-12-31", "text": "1999-12-31", "date": "2020-01-02", "meta": {"at": []}}]
    df = read_rows(write_lines(tmp_path / "dates.jsonl", [json.dumps(r) for r in rows]), "train")
    assert df.drop("source").to_dicts() == rows
    assert df.schema["date"] == pl.String


def test_directory_of_shards_in_name_order(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    write_lines(shards / "b.jsonl", [row("b1"), row("b2")])
    pl.DataFrame({"id": ["a1"], "text": ["t"]}).write_parquet(shards / "a.parquet")
    write_lines(shards / "c.jsonl", [row("c1", fact="x")])
    write_lines(shards / ".hidden.jsonl", ["garbage"])
    (shards / "README.md").write_text("ignored")
    (shards / "notes.json").write_text("not a shard: only .jsonl and .parquet in directories")
    df = read_rows(shards, "train")
    assert df["id"].to_list() == ["a1", "b1", "b2", "c1"]
    assert df["fact"].to_list() == [None, None, None, "x"]
    assert df["source"][0] == f"{shards / 'a.parquet'}:1"
    assert df["source"][3] == f"{shards / 'c.jsonl'}:1"


def test_list_of_paths(tmp_path: Path) -> None:
    one = write_lines(tmp_path / "1.jsonl", [row("a")])
    two = write_lines(tmp_path / "2.jsonl", [row("b")])
    assert read_rows([two, str(one)], "train")["id"].to_list() == ["b", "a"]


def test_large_file_error_on_last_line_is_located(tmp_path: Path) -> None:
    lines = [row(f"d{i}", f"text {i}") for i in range(20_000)] + ['{"id": "x", "text": ']
    path = write_lines(tmp_path / "big.jsonl", lines)
    assert f"big.jsonl:{len(lines)}:" in read_error(path)
    path = write_lines(tmp_path / "big2.jsonl", [row(f"d{i}") for i in range(20_000)] + [row(123)])
    assert "big2.jsonl:20001: id must be a string" in read_error(path)
    df = read_rows(write_lines(tmp_path / "ok.jsonl", lines[:-1]), "train")
    assert df.height == 20_000 and df["source"][-1].endswith("ok.jsonl:20000")


# ------------------------------------------------------------------------------------------- bad input

BAD_JSONL = [
    ("malformed", [row("a"), '{"id": "b", "text": "unterminated'], ["malformed.jsonl:2", "malformed JSON"]),
    ("array_line", [row("a"), "[1, 2]"], ["array_line.jsonl:2", "not an object"]),
    ("null_line", [row("a"), "null"], ["null_line.jsonl:2", "not an object"]),
    ("scalar_line", [row("a"), "", "42"], ["scalar_line.jsonl:3", "not an object"]),
    ("two_objects", [row("a") + " " + row("b")], ["two_objects.jsonl:1", "malformed JSON"]),
    ("object_over_lines", ['{"id": "a",', '"text": "x"}'], ["object_over_lines.jsonl:1", "malformed"]),
    ("missing_text_column", [json.dumps({"id": "a", "body": "x"})],
     ["missing_text_column.jsonl", "'text'", "found 'id', 'body'"]),
    ("missing_id_column", [json.dumps({"prompt": "x", "completion": "y"})],
     ["missing_id_column.jsonl", "'id'", "found 'prompt'"]),  # queries need ids; training rows get derived ones
    ("missing_completion", [json.dumps({"id": "a", "prompt": "x"})],
     ["missing_completion.jsonl", "'completion'"]),
    ("null_text", [row("a"), row("b", None)], ["null_text.jsonl:2", "text", "null"]),
    ("absent_text_key", [row("a"), "", json.dumps({"id": "b"})], ["absent_text_key.jsonl:3", "text"]),
    ("empty_text", [row("a"), row("b", "")], ["empty_text.jsonl:2", "text", "empty"]),
    ("blank_text", [row("a"), row("b", " \t\n ")], ["blank_text.jsonl:2", "text", "empty"]),
    ("empty_prompt", [qrow("a"), qrow("b", prompt="  ")], ["empty_prompt.jsonl:2", "prompt", "empty"]),
    ("null_completion", [qrow("a", completion=None)], ["null_completion.jsonl:1", "completion"]),
    ("empty_id", [row("a"), row(" ")], ["empty_id.jsonl:2", "id", "empty"]),
    ("null_id", [row(None)], ["null_id.jsonl:1", "id"]),
    ("numeric_ids", [row(1), row(2)], ["numeric_ids.jsonl:1", "id must be a string"]),
    ("mixed_ids", [row("a"), row("b"), row(3)], ["mixed_ids.jsonl:3", "id must be a string", "number"]),
    ("numeric_first_id", [row(1), row("b")], ["numeric_first_id.jsonl:1", "id must be a string"]),
    ("float_id", [row("a"), row(1.5)], ["float_id.jsonl:2", "id must be a string"]),
    ("bool_id", [row(True)], ["bool_id.jsonl:1", "id must be a string"]),
    ("list_text", [row("a"), row("b", [1, 2])], ["list_text.jsonl:2", "text must be a string", "array"]),
    ("object_text", [row("a", {"t": 1})], ["object_text.jsonl:1", "text must be a string"]),
    ("number_text", [row("a", 5)], ["number_text.jsonl:1", "text must be a string"]),
    ("duplicate_ids", [row("a"), row("b"), row("a", "other")],
     ["duplicate id 'a'", "duplicate_ids.jsonl:1", "duplicate_ids.jsonl:3"]),
    ("only_blank_lines", ["", "  ", "\t"], ["only_blank_lines.jsonl", "no rows"]),
    ("empty_file", [], ["empty_file.jsonl", "no rows"]),
    ("both_forms", [json.dumps({"id": "a", "text": "t", "prompt": "p", "completion": "c"})],
     ["both_forms.jsonl", "both 'text'"]),
    ("forms_mixed_in_file", [row("a"), qrow("b")], ["forms_mixed_in_file.jsonl", "both 'text'"]),
    ("duplicate_key", ['{"id": "a", "id": "b", "text": "x"}'],
     ["duplicate_key.jsonl:1", "'id' appears twice"]),
    ("lone_surrogate", ['{"id": "a", "text": "bad \\ud800 escape"}'], ["lone_surrogate.jsonl:1", "text"]),
    ("extra_mixed_types", [row("a", fact=1), row("b", fact="x")],
     ["extra_mixed_types.jsonl:2", "'fact'", "extra_mixed_types.jsonl:1"]),
    ("reserved_source", [row("a", source="web")], ["reserved_source.jsonl", "'source'", "reserved"]),
    ("nan_constant", ['{"id": "a", "text": NaN}'], ["nan_constant.jsonl:1", "text"]),
]


@pytest.mark.parametrize("name,lines,expected", BAD_JSONL, ids=[c[0] for c in BAD_JSONL])
def test_bad_jsonl_raises_located_data_error(tmp_path: Path, name: str, lines: list[str],
                                             expected: list[str]) -> None:
    path = write_lines(tmp_path / f"{name}.jsonl", lines)
    kind = "queries" if name in ("empty_prompt", "null_completion", "missing_id_column") else "train"
    message = read_error(path, kind)
    for part in expected:
        assert part in message, (part, message)


def test_non_utf8_line_is_located(tmp_path: Path) -> None:
    latin1 = '{"id": "b", "text": "café"}'.encode("latin-1")
    path = write_lines(tmp_path / "latin1.jsonl", [row("a"), "", latin1])
    message = read_error(path)
    assert "latin1.jsonl:3" in message and "UTF-8" in message


def test_queries_need_prompt_and_completion(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "q.jsonl", [row("q1")])
    message = read_error(path, "queries")
    assert "q.jsonl" in message and "'prompt'" in message and "'completion'" in message
    assert "found 'id', 'text'" in message


def test_missing_file_and_unknown_extension(tmp_path: Path) -> None:
    assert "nope.jsonl" in read_error(tmp_path / "nope.jsonl") and "no such file" in read_error(
        tmp_path / "nope.jsonl")
    csv = tmp_path / "data.csv"
    csv.write_text("id,text\n")
    message = read_error(csv)
    assert "data.csv" in message and "unknown file type" in message
    message = read_error([write_lines(tmp_path / "ok.jsonl", [row("a")]), tmp_path / "gone.parquet"])
    assert "gone.parquet" in message


def test_empty_directory_and_no_paths(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "no .jsonl or .parquet files" in read_error(tmp_path / "empty")
    assert "no input files" in read_error([])


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "locked.jsonl", [row("a")])
    path.chmod(0)
    try:
        message = read_error(path)
    finally:
        path.chmod(0o644)
    assert "locked.jsonl" in message and "cannot read" in message


def test_read_permission_error_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_lines(tmp_path / "denied.jsonl", [row("a")])

    import builtins

    real_open = builtins.open

    def deny(file, *args, **kwargs):  # root ignores chmod: refuse this one file as the OS would
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    message = read_error(path)
    assert "denied.jsonl" in message and "Permission denied" in message


def test_same_file_twice(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "a.jsonl", [row("a")])
    assert "given twice" in read_error([path, tmp_path / "." / "a.jsonl"])
    assert "given twice" in read_error([tmp_path, path])


@pytest.mark.parametrize("damage", ["random", "truncated", "empty"])
def test_corrupt_parquet(tmp_path: Path, damage: str) -> None:
    good = tmp_path / "good.parquet"
    pl.DataFrame({"id": ["a", "b"], "text": ["x", "y"]}).write_parquet(good)
    data = good.read_bytes()
    bad = tmp_path / "bad.parquet"
    bad.write_bytes({"random": os.urandom(300), "truncated": data[: len(data) // 2], "empty": b""}[damage])
    message = read_error(bad)
    assert "bad.parquet" in message and "Parquet" in message


def test_parquet_bad_columns_and_values(tmp_path: Path) -> None:
    path = tmp_path / "ints.parquet"
    pl.DataFrame({"id": [1, 2], "text": ["x", "y"]}).write_parquet(path)
    message = read_error(path)
    assert "ints.parquet:1" in message and "id must be a string" in message and "Int64" in message

    path = tmp_path / "nulls.parquet"
    pl.DataFrame({"id": ["a", "b", "c"], "text": ["x", None, "z"]}).write_parquet(path)
    assert "nulls.parquet:2: text" in read_error(path)

    path = tmp_path / "cols.parquet"
    pl.DataFrame({"id": ["a"], "body": ["x"]}).write_parquet(path)
    message = read_error(path)
    assert "cols.parquet" in message and "'text'" in message and "found 'id', 'body'" in message


def test_mixed_forms_across_files(tmp_path: Path) -> None:
    a = write_lines(tmp_path / "a.jsonl", [row("a")])
    b = write_lines(tmp_path / "b.jsonl", [qrow("b")])
    message = read_error([a, b])
    assert "mixed document forms" in message and "a.jsonl" in message and "b.jsonl" in message


def test_duplicate_ids_across_files_name_both(tmp_path: Path) -> None:
    a = write_lines(tmp_path / "a.jsonl", [row("x"), row("dup")])
    b = tmp_path / "b.parquet"
    pl.DataFrame({"id": ["y", "z", "dup"], "text": ["1", "2", "3"]}).write_parquet(b)
    message = read_error([a, b])
    assert f"{a}:2" in message and f"{b}:3" in message and "'dup'" in message


def test_extra_column_type_conflict_across_files(tmp_path: Path) -> None:
    a = write_lines(tmp_path / "a.jsonl", [row("a", fact=1)])
    b = write_lines(tmp_path / "b.jsonl", [row("b", fact="x")])
    message = read_error([a, b])
    assert "'fact'" in message and "a.jsonl" in message and "b.jsonl" in message


def test_empty_files_among_shards_are_fine_but_all_empty_is_not(tmp_path: Path) -> None:
    a = write_lines(tmp_path / "a.jsonl", [])
    b = write_lines(tmp_path / "b.jsonl", [row("b")])
    assert read_rows([a, b], "train")["id"].to_list() == ["b"]
    assert "no rows" in read_error([a, write_lines(tmp_path / "c.jsonl", [""])])


def test_kind_must_be_known(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        read_rows(write_lines(tmp_path / "a.jsonl", [row("a")]), "documents")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ property-based

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=8)
NON_STRINGS = JSON_VALUES.filter(lambda v: not isinstance(v, str))
# content with at least one character that is not whitespace under any definition
TEXTS = st.builds(lambda a, b: a + "x" + b, st.text(max_size=20), st.text(max_size=20))


@st.composite
def garbage_line(draw: st.DrawFn, index: int, valid_ids: list[str]) -> bytes:
    """One malformed line (it may, for random bytes, turn out blank)."""
    choice = draw(st.sampled_from(["json_value", "missing_key", "wrong_type", "bytes", "non_utf8",
                                   "blank_field", "duplicate_id"]))
    # A row without an id is malformed only once the file has rows with ids: a file with no id at all is valid,
    # its ids derived from where rows live (`FILE#ROW`, docs/pipeline.md).
    if choice == "json_value":
        value = draw(JSON_VALUES.filter(lambda v: not isinstance(v, dict) or ("id" not in v and (
            bool(valid_ids) or "text" not in v))))
        return json.dumps(value).encode()
    if choice == "missing_key":
        no_id = [{"text": "t"}] if valid_ids else []
        return json.dumps(draw(st.sampled_from([{"id": f"g{index}"}, *no_id, {}]))).encode()
    if choice == "wrong_type":
        bad = draw(NON_STRINGS)
        obj = draw(st.sampled_from([{"id": bad, "text": "t"}, {"id": f"g{index}", "text": bad}]))
        return json.dumps(obj).encode()
    if choice == "bytes":
        return draw(st.binary(min_size=1, max_size=30))
    if choice == "non_utf8":
        good = json.dumps({"id": f"g{index}", "text": "abc"}).encode()
        cut = draw(st.integers(1, len(good) - 1))
        return good[:cut] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"])) + good[cut:]
    if choice == "blank_field":
        return json.dumps({"id": f"g{index}", "text": draw(st.sampled_from(["", " ", "\t\n", "\u3000 "]))}
                          ).encode()
    if not valid_ids:
        return b"[]"
    return json.dumps({"id": draw(st.sampled_from(valid_ids)), "text": "dup"}).encode()


def is_blank(raw: bytes, first: bool) -> bool:
    if first and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    return all(not piece.strip(b" \t\r") for piece in raw.split(b"\n"))


@st.composite
def jsonl_documents(draw: st.DrawFn) -> tuple[list[bytes], list[tuple[str, str, int]], bool]:
    """Lines of a JSONL file, the valid rows (id, text, line) and whether any non-blank garbage was added."""
    n = draw(st.integers(1, 12))
    lines: list[bytes] = []
    valid: list[tuple[str, str, int]] = []
    broken = False
    for i in range(n):
        what = draw(st.sampled_from(["valid", "valid", "valid", "blank", "garbage"]))
        if what == "blank":
            lines.append(draw(st.sampled_from([b"", b"  ", b"\t", b"\r"])))
        elif what == "valid":
            text = draw(TEXTS)
            obj = {"id": f"d{i}-{draw(st.text(max_size=4))}", "text": text}
            line_no = sum(ln.count(b"\n") + 1 for ln in lines) + 1
            lines.append(json.dumps(obj, ensure_ascii=draw(st.booleans())).encode())
            valid.append((obj["id"], text, line_no))
        else:
            raw = draw(garbage_line(i, [v[0] for v in valid]))
            broken = broken or not is_blank(raw, first=not lines)
            lines.append(raw)
    return lines, valid, broken


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=jsonl_documents())
def test_jsonl_reader_returns_exact_rows_or_data_error(tmp_path: Path, doc: tuple) -> None:
    lines, valid, broken = doc
    path = tmp_path / "prop.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    try:
        df = read_rows(path, "train")
    except DataError as exc:
        assert "prop.jsonl" in str(exc)
        assert broken or not valid, f"valid input refused: {exc}"
        return
    assert not broken, "malformed input accepted"
    assert df["id"].to_list() == [v[0] for v in valid]
    assert df["text"].to_list() == [v[1] for v in valid]
    assert df["source"].to_list() == [f"{path}:{v[2]}" for v in valid]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(TEXTS, min_size=1, max_size=10),
       facts=st.lists(st.text(max_size=6), min_size=10, max_size=10), crlf=st.booleans(),
       ascii_only=st.booleans())
def test_valid_jsonl_round_trips(tmp_path: Path, texts: list[str], facts: list[str], crlf: bool,
                                 ascii_only: bool) -> None:
    path = tmp_path / "ok.jsonl"
    rows = [{"id": f"id-{i}", "text": t, "fact": facts[i]} for i, t in enumerate(texts)]
    write_lines(path, [json.dumps(r, ensure_ascii=ascii_only) for r in rows], end=b"\r\n" if crlf else b"\n")
    df = read_rows(path, "train")
    assert df.drop("source").to_dicts() == rows


ANY_KEY = st.sampled_from(["id", "text", "prompt", "completion", "fact"]) | st.text(max_size=3)
ANY_LINE = st.one_of(
    st.dictionaries(ANY_KEY, JSON_VALUES | st.text(min_size=1), max_size=5).map(
        lambda o: json.dumps(o).encode()),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=20),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(ANY_LINE, max_size=8), kind=st.sampled_from(["train", "queries"]))
@example(lines=[b'{"":[false,0]}'], kind="train")  # a list polars cannot type: once a TypeError, not a DataError
def test_arbitrary_lines_give_a_frame_or_data_error(tmp_path: Path, lines: list[bytes], kind: str) -> None:
    path = tmp_path / "any.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        df = read_rows(path, kind)  # type: ignore[arg-type]
    except DataError as exc:
        assert "any.jsonl" in str(exc)
        return
    assert df.columns[0] == "id" and df.columns[-1] == "source" and df.height >= 1


# ------------------------------------------------------------------------------------------- hashing


def test_content_hash_definitions() -> None:
    assert content_hash({"text": "hello"}) == hashlib.sha256(b"hello").hexdigest()
    assert content_hash({"prompt": "Q", "completion": "A"}) == hashlib.sha256(b"Q\x1fA").hexdigest()
    assert content_hash({"id": "1", "text": "x"}) == content_hash({"id": "2", "text": "x", "fact": "f"})


def test_add_content_hashes_matches_per_row(tmp_path: Path) -> None:
    df = read_rows(write_lines(tmp_path / "q.jsonl", [qrow("a", "p1", "c1"), qrow("b", "p2", "c2")]),
                   "queries")
    hashed = add_content_hashes(df)
    assert hashed["content_hash"].to_list() == [content_hash(r) for r in df.to_dicts()]


def test_fingerprint_independent_of_order_split_and_format(tmp_path: Path) -> None:
    rows = [row(f"d{i}", f"text {i}") for i in range(10)]
    whole = read_rows(write_lines(tmp_path / "all.jsonl", rows), "train")
    split_dir = tmp_path / "split"
    split_dir.mkdir()
    write_lines(split_dir / "b.jsonl", rows[:4][::-1])
    pl.DataFrame([json.loads(r) for r in rows[4:]]).write_parquet(split_dir / "a.parquet")
    split = read_rows(split_dir, "train")
    fp = data_fingerprint(whole)
    assert data_fingerprint(split) == fp
    assert data_fingerprint(whole.sample(fraction=1.0, shuffle=True, seed=3)) == fp
    assert data_fingerprint(add_content_hashes(whole)) == fp
    assert data_fingerprint(whole.with_columns(pl.lit("x").alias("fact"))) == fp


def test_fingerprint_changes_with_content_or_ids(tmp_path: Path) -> None:
    df = pl.DataFrame({"id": ["a", "b"], "text": ["x", "y"]})
    fp = data_fingerprint(df)
    assert data_fingerprint(df.with_columns(pl.Series("text", ["x", "z"]))) != fp
    assert data_fingerprint(df.with_columns(pl.Series("id", ["a", "c"]))) != fp
    assert data_fingerprint(df.head(1)) != fp
    # swapping contents between ids is a different dataset
    assert data_fingerprint(df.with_columns(pl.Series("text", ["y", "x"]))) != fp


# ---------------------------------------------------------------------------------- sharding, sampling


def test_shard_frame_contiguous() -> None:
    df = pl.DataFrame({"id": [str(i) for i in range(10)]})
    shards = shard_frame(df, 4)
    assert [s.height for s in shards] == [4, 4, 2]
    assert pl.concat(shards)["id"].to_list() == df["id"].to_list()
    assert [s.height for s in shard_frame(df, 10)] == [10]
    assert [s.height for s in shard_frame(df, 100)] == [10]
    assert shard_frame(df.head(0), 3) == []
    with pytest.raises(UserError):
        shard_frame(df, 0)


def queries(n: int, groups: int) -> pl.DataFrame:
    return pl.DataFrame({"id": [f"q{i}" for i in range(n)], "prompt": ["p"] * n, "completion": ["c"] * n,
                         "fact": [f"f{i % groups}" for i in range(n)]})


def test_sample_all_rows_when_n_missing_or_large() -> None:
    df = queries(5, 2)
    assert sample_queries(df, None, seed=0, stratify_by=None).equals(df)
    assert sample_queries(df, 5, seed=0, stratify_by=None).equals(df)
    assert sample_queries(df, 50, seed=0, stratify_by="fact").equals(df)
    assert sample_queries(df, 0, seed=0, stratify_by=None).height == 0


def test_sample_is_seeded_and_keeps_order() -> None:
    df = queries(100, 1)
    a = sample_queries(df, 10, seed=1, stratify_by=None)
    assert a.equals(sample_queries(df, 10, seed=1, stratify_by=None))
    assert not a.equals(sample_queries(df, 10, seed=2, stratify_by=None))
    idx = [int(i[1:]) for i in a["id"]]
    assert idx == sorted(idx) and len(set(idx)) == 10


@pytest.mark.parametrize("n", [1, 3, 7, 12, 30])
def test_stratified_sample_is_even(n: int) -> None:
    df = queries(90, 3).vstack(queries(10, 1).with_columns(
        pl.format("extra{}", pl.col("id")).alias("id"), pl.lit("rare").alias("fact")))
    sample = sample_queries(df, n, seed=7, stratify_by="fact")
    assert sample.height == n and sample["id"].n_unique() == n
    counts = Counter(sample["fact"].to_list())
    expected_groups = min(n, 4)
    assert len(counts) == expected_groups
    assert max(counts.values()) - min(counts.values()) <= 1
    assert sample.equals(sample_queries(df, n, seed=7, stratify_by="fact"))
    positions = {i: p for p, i in enumerate(df["id"].to_list())}
    assert [positions[i] for i in sample["id"]] == sorted(positions[i] for i in sample["id"])


def test_stratified_sample_fills_from_other_groups_when_one_runs_out() -> None:
    df = pl.DataFrame({"id": [f"q{i}" for i in range(12)], "fact": ["small"] * 2 + ["big"] * 10})
    counts = Counter(sample_queries(df, 8, seed=0, stratify_by="fact")["fact"].to_list())
    assert counts == {"small": 2, "big": 6}


def test_stratify_unknown_column() -> None:
    with pytest.raises(DataError) as info:
        sample_queries(queries(4, 2), 2, seed=0, stratify_by="topic")
    assert "'topic'" in str(info.value) and "'fact'" in str(info.value)
