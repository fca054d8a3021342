"""Reading, checking, hashing, sharding and sampling training documents and queries.

Plain functions (no Prefect here), so the flows, the CLI and the tests share them.

Training rows have a string ``id`` and either ``text``, or ``prompt`` and ``completion``; query rows have
``id``, ``prompt`` and ``completion``. Extra columns (``fact``, ``category``, ...) are kept. Every frame
returned by :func:`read_rows` also has a ``source`` column (``"file:line"``: the 1-based JSONL line or the
Parquet row index + 1) so later errors can point at the offending input.

Every bad input raises :class:`~influence_engine.errors.DataError` with a one-line message naming the file
and the line (or column) and what to do. The happy path is vectorised (pyarrow's JSON reader, polars'
Parquet reader, polars expressions for the checks); a line-by-line Python parse only runs when the fast
reader fails, to say exactly which line is broken and why.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from influence_engine.errors import DataError, UserError

Kind = Literal["train", "queries"]

__all__ = [
    "Kind",
    "add_content_hashes",
    "check_columns",
    "content_hash",
    "data_fingerprint",
    "read_rows",
    "sample_queries",
    "shard_frame",
]

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
DIRECTORY_SUFFIXES = (".jsonl", ".parquet")
SOURCE = "source"
_CONTENT_SEP = "\x1f"
_SAMPLE_LINES = 1000
_BOM = b"\xef\xbb\xbf"
_STRING_FIELDS = {"train": ("id", "text", "prompt", "completion"), "queries": ("id", "prompt", "completion")}
_FORM_HINT = {
    "train": "training rows need a string 'id' and either 'text', or 'prompt' and 'completion'",
    "queries": "query rows need string 'id', 'prompt' and 'completion' fields",
}
_PANIC: tuple[type[BaseException], ...] = (Exception, pl.exceptions.PanicException)


# --------------------------------------------------------------------------------------------------- reading


def read_rows(paths: str | Path | Sequence[str | Path], kind: Kind) -> pl.DataFrame:
    """Read training documents (``kind="train"``) or queries (``kind="queries"``).

    ``paths`` is one path or a sequence of paths; each is a JSON-lines file (``.jsonl`` / ``.json``), a
    Parquet file (``.parquet``) or a directory, whose ``*.jsonl`` and ``*.parquet`` files are read in name
    order. Blank JSONL lines are skipped. The result has the columns ``id``, then ``text`` or ``prompt``,
    ``completion``, then any extra columns (in order of first appearance), then ``source`` (``"file:line"``).

    Raises :class:`DataError` (one line: file, line or column, and what to do) for a missing, unreadable,
    non-UTF-8, malformed or corrupt file, an unknown extension, missing columns, a null or empty
    (whitespace-only) field, a non-string id / text / prompt / completion, duplicate ids, no rows at all, or
    files that mix the ``text`` and ``prompt``/``completion`` forms.
    """
    if kind not in _STRING_FIELDS:
        raise ValueError(f"kind must be 'train' or 'queries', not {kind!r}")
    files = _expand_paths(paths)
    frames: list[tuple[Path, pl.DataFrame, tuple[str, ...]]] = []
    for path in files:
        df = _read_file(path, kind)
        if df.height == 0 and all(c == SOURCE for c in df.columns):
            continue  # an empty file says nothing about its form
        form = _check_file_frame(df, path, kind)
        frames.append((path, df, form))
    shown = ", ".join(str(p) for p in files[:3]) + (f" (+{len(files) - 3} more)" if len(files) > 3 else "")
    if not frames or sum(df.height for _, df, _ in frames) == 0:
        raise DataError(f"{shown}: no rows", hint=f"the dataset is empty; {_FORM_HINT[kind]}")
    forms = {form for _, _, form in frames}
    if len(forms) > 1:
        by_form = {form: path for path, _, form in reversed(frames)}
        described = " but ".join(f"{by_form[f]} has {'/'.join(f)}" for f in sorted(forms))
        raise DataError(f"mixed document forms: {described}",
                        hint="all files of one dataset must use 'text', or all 'prompt' and 'completion'")
    form = frames[0][2]
    df = _concat(frames, form)
    _check_duplicate_ids(df)
    extras = [c for c in df.columns if c not in ("id", *form, SOURCE)]
    return df.select(["id", *form, *extras, SOURCE])


def check_columns(paths: str | Path | Sequence[str | Path], kind: Kind, head_bytes: int = 1 << 16) -> None:
    """A quick check of every file's first rows (JSONL: its first ``head_bytes``; Parquet: its first 100 rows):
    it exists, parses, and has the columns and types ``kind`` needs, in one form across files. Raises the same
    :class:`DataError` as :func:`read_rows` would for those rows; the full read checks the rest."""
    forms: dict[tuple[str, ...], Path] = {}
    for path in _expand_paths(paths):
        if path.suffix.lower() in PARQUET_SUFFIXES:
            try:
                df = pl.scan_parquet(path).head(100).collect()
            except _PANIC as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise DataError(f"{path}: not a valid Parquet file ({first[:200]})",
                                hint="the file is corrupt or truncated: re-export it") from None
            df = df.with_columns(_source_expr(path, pl.int_range(1, df.height + 1, dtype=pl.Int64)))
        else:
            with open(path, "rb") as fh:
                data = fh.read(head_bytes + 1)
            if len(data) > head_bytes:  # whole lines only
                data = data[:data.rfind(b"\n", 0, head_bytes) + 1] or data[:0]
            if data.startswith(_BOM):
                data = data[len(_BOM):]
            df = _slow_jsonl(path, data, kind)
        if df.height == 0 and all(c == SOURCE for c in df.columns):
            continue
        forms.setdefault(_check_file_frame(df, path, kind), path)
    if len(forms) > 1:
        described = " but ".join(f"{path} has {'/'.join(f)}" for f, path in sorted(forms.items()))
        raise DataError(f"mixed document forms: {described}",
                        hint="all files of one dataset must use 'text', or all 'prompt' and 'completion'")


def _expand_paths(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    items: list[str | Path] = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not items:
        raise DataError("no input files given", hint="pass a .jsonl or .parquet file or a directory of them")
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            try:
                inner = sorted(p for p in path.iterdir()
                               if p.is_file() and p.suffix.lower() in DIRECTORY_SUFFIXES
                               and not p.name.startswith("."))
            except OSError as exc:
                raise DataError(f"{path}: cannot list directory: {exc.strerror or exc}",
                                hint="check the path and its permissions") from exc
            if not inner:
                raise DataError(f"{path}: directory has no .jsonl or .parquet files",
                                hint="put the data shards there or pass the files themselves")
            out.extend(inner)
        elif not path.exists():
            raise DataError(f"{path}: no such file or directory", hint="check the path")
        else:
            suffix = path.suffix.lower()
            if suffix not in JSONL_SUFFIXES + PARQUET_SUFFIXES:
                raise DataError(f"{path}: unknown file type {path.suffix or '(no extension)'!r}",
                                hint="use .jsonl or .json (one JSON object per line) or .parquet")
            out.append(path)
    seen: dict[Path, Path] = {}
    for path in out:
        key = path.resolve()
        if key in seen:
            raise DataError(f"{path}: the same file is given twice (also as {seen[key]})",
                            hint="pass each file or directory once")
        seen[key] = path
    return out


def _read_file(path: Path, kind: Kind) -> pl.DataFrame:
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return _read_parquet(path)
    return _read_jsonl(path, kind)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such file", hint="check the path") from exc
    except IsADirectoryError as exc:
        raise DataError(f"{path}: is a directory, not a file", hint="pass the directory itself") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read file: {exc.strerror or exc}",
                        hint="check the file's permissions") from exc


def _read_parquet(path: Path) -> pl.DataFrame:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise DataError(f"{path}: cannot read file: {exc.strerror or exc}",
                        hint="check the path and the file's permissions") from exc
    try:
        df = pl.scan_parquet(path).collect()
    except _PANIC as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a valid Parquet file ({first[:200]})",
                        hint="the file is corrupt or truncated: re-export it") from None
    if SOURCE in df.columns:
        _reserved(path)
    return df.with_columns(_source_expr(path, pl.int_range(1, df.height + 1, dtype=pl.Int64)))


def _reserved(path: Path) -> None:
    raise DataError(f"{path}: column {SOURCE!r} is reserved (it records file:line)",
                    hint=f"rename the {SOURCE!r} field in the input")


def _source_expr(path: Path, lines: pl.Expr | pl.Series) -> pl.Expr:
    line_expr = pl.lit(lines) if isinstance(lines, pl.Series) else lines
    return pl.concat_str([pl.lit(f"{path}:"), line_expr.cast(pl.String)]).alias(SOURCE)


def _read_jsonl(path: Path, kind: Kind) -> pl.DataFrame:
    data = _read_bytes(path)
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    _check_utf8(path, data)
    line_numbers, plausible, longest = _jsonl_lines(data)
    if line_numbers.size == 0:
        return pl.DataFrame({SOURCE: pl.Series([], dtype=pl.String)})
    df: pl.DataFrame | None = None
    if plausible:
        df = _fast_jsonl(data, int(line_numbers.size), longest)
    if df is None:
        return _slow_jsonl(path, data, kind)
    if SOURCE in df.columns:
        _reserved(path)
    return df.with_columns(_source_expr(path, pl.Series(line_numbers, dtype=pl.Int64)))


def _jsonl_lines(data: bytes) -> tuple[np.ndarray, bool, int]:
    """Line numbers of the non-blank lines, whether each of them looks like one object (``{`` ... ``}``),
    and the length of the longest line in bytes.

    Vectorised over the line boundaries; only lines that do not start with ``{`` and end with ``}`` (blank
    lines, padded lines, broken lines) are looked at one by one.
    """
    arr = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(arr == 10)
    starts = np.concatenate(([0], newlines + 1))
    ends = np.concatenate((newlines, [arr.size]))
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64), True, 0
    longest = int((ends - starts).max())
    nonempty = ends > starts
    last = np.where(nonempty, ends - 1, 0)
    last = np.where(nonempty & (arr[last] == 13) & (last > starts), last - 1, last)  # CRLF
    first = np.minimum(starts, arr.size - 1)
    regular = nonempty & (arr[first] == ord("{")) & (arr[last] == ord("}"))
    nonblank = regular.copy()
    plausible = True
    for i in np.flatnonzero(~regular).tolist():
        stripped = data[starts[i]:ends[i]].strip(b" \t\r")
        if stripped:
            nonblank[i] = True
            plausible = plausible and stripped[:1] == b"{" and stripped[-1:] == b"}"
    return np.flatnonzero(nonblank).astype(np.int64) + 1, plausible, longest


def _check_utf8(path: Path, data: bytes) -> None:
    """Raise DataError naming the line of the first invalid UTF-8 byte (validated by pyarrow, no copy)."""
    import pyarrow as pa

    offsets = pa.py_buffer(np.array([0, len(data)], dtype=np.int64).tobytes())
    try:
        pa.LargeStringArray.from_buffers(1, offsets, pa.py_buffer(data)).validate(full=True)
        return
    except pa.ArrowInvalid:
        pass
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{path}:{line_no}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {col})",
                        hint="re-encode the file as UTF-8") from None


def _fast_jsonl(data: bytes, n_lines: int, longest: int) -> pl.DataFrame | None:
    """Parse with pyarrow; None when it fails or does not give exactly one row per line."""
    import pyarrow as pa
    import pyarrow.json as pj

    block_size = int(min(max(1 << 22, 2 * longest + 16), (1 << 31) - 1))
    read_options = pj.ReadOptions(block_size=block_size)
    # pyarrow turns ISO-8601 strings into timestamps, slowly; fields that look like strings in the first
    # lines are declared strings up front, and anything it still turns into a timestamp is re-read as text.
    sample_end = -1
    for _ in range(_SAMPLE_LINES):
        sample_end = data.find(b"\n", sample_end + 1)
        if sample_end < 0:
            break
    sample = data if sample_end < 0 else data[: sample_end + 1]
    try:
        sample_schema = pj.read_json(io.BytesIO(sample), read_options=read_options).schema
        strings = pa.schema([pa.field(f.name, pa.string()) for f in sample_schema
                             if pa.types.is_string(f.type) or _is_temporal(f.type)])
        parse = pj.ParseOptions(explicit_schema=strings, unexpected_field_behavior="infer")
        table = pj.read_json(io.BytesIO(data), read_options=read_options, parse_options=parse)
        as_strings = _timestamps_as_strings(table.schema)
        if as_strings is not None:  # pyarrow turned ISO-8601 strings into timestamps: read them as text
            parse = pj.ParseOptions(explicit_schema=as_strings, unexpected_field_behavior="error")
            table = pj.read_json(io.BytesIO(data), read_options=read_options, parse_options=parse)
        if table.num_rows != n_lines:
            return None
        df = pl.from_arrow(table)
    except (pa.ArrowException, *_PANIC):
        return None
    if not isinstance(df, pl.DataFrame) or df.height != n_lines:
        return None
    return df


def _is_temporal(arrow_type: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_timestamp(arrow_type) or pa.types.is_date(arrow_type)
                or pa.types.is_time(arrow_type))


def _timestamps_as_strings(schema: Any) -> Any:
    """``schema`` with every (nested) timestamp / date / time type replaced by string, or None if none."""
    import pyarrow as pa

    def fix(t: Any) -> Any:
        if _is_temporal(t):
            return pa.string()
        if pa.types.is_struct(t):
            return pa.struct([f.with_type(fix(f.type)) for f in t])
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return pa.list_(t.value_field.with_type(fix(t.value_type)))
        return t

    fixed = pa.schema([f.with_type(fix(f.type)) for f in schema])
    return None if fixed.equals(schema) else fixed


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _article(json_type: str) -> str:
    return f"{'an' if json_type[0] in 'aeiou' else 'a'} {json_type}"


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _slow_jsonl(path: Path, data: bytes, kind: Kind) -> pl.DataFrame:
    """Parse line by line: raise a DataError naming the first bad line, or build the frame."""
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{line_no}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                            f"{exc.start + 1})", hint="re-encode the file as UTF-8") from None
        if not line.strip(" \t\r"):
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
        except _DuplicateKeyError as exc:
            raise DataError(f"{path}:{line_no}: key {exc.key!r} appears twice in one object",
                            hint="remove the duplicate key") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}: malformed JSON at column {exc.colno}: {exc.msg}",
                            hint="each line must be one complete JSON object") from None
        except (ValueError, RecursionError) as exc:
            raise DataError(f"{path}:{line_no}: malformed JSON: {str(exc)[:120]}",
                            hint="each line must be one complete JSON object") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line_no}: line is a JSON {_json_type(obj)}, not an object",
                            hint="each line must be one JSON object such as {\"id\": \"d1\", \"text\": ...}")
        rows.append(obj)
        lines.append(line_no)

    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    if SOURCE in columns:
        _reserved(path)
    string_fields = _STRING_FIELDS[kind]
    series: list[pl.Series] = []
    for col in columns:
        values = [row.get(col) for row in rows]
        types: dict[str, int] = {}
        for value, line_no in zip(values, lines, strict=True):
            t = _json_type(value)
            if t == "null":
                continue
            if col in string_fields and t != "string":
                raise DataError(f"{path}:{line_no}: {col} must be a string, got {t} {_short(value)}",
                                hint=f"quote it, e.g. \"{col}\": \"{_short(value)}\""
                                if t in ("number", "boolean") else f"make {col} a JSON string")
            if t == "string" and not _encodable(value):
                raise DataError(f"{path}:{line_no}: {col} contains an invalid \\u escape (lone surrogate)",
                                hint="fix the escape sequence or re-export the file as UTF-8")
            types.setdefault(t, line_no)
        if len(types) > 1:
            (t1, l1), (t2, l2) = sorted(types.items(), key=lambda kv: kv[1])[:2]
            raise DataError(f"{path}:{l2}: column {col!r} is {_article(t2)} here but {_article(t1)} at "
                            f"{path}:{l1}",
                            hint="use one JSON type per field")
        try:
            dtype = pl.String if col in string_fields else None
            series.append(pl.Series(col, values, dtype=dtype, strict=True))
        except _PANIC as exc:
            raise DataError(f"{path}: cannot load column {col!r}: {str(exc).splitlines()[0][:120]}",
                            hint="simplify that field (one JSON type, numbers within 64 bits)") from None
    if not _encodable_keys(columns):
        raise DataError(f"{path}: a field name contains an invalid \\u escape (lone surrogate)",
                        hint="fix the field names")
    lines_series = pl.Series(lines, dtype=pl.Int64)
    if not series:  # every line is {}
        return pl.DataFrame({SOURCE: lines_series}).with_columns(_source_expr(path, pl.col(SOURCE)))
    return pl.DataFrame(series).with_columns(_source_expr(path, lines_series))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _encodable_keys(keys: Iterable[str]) -> bool:
    return all(_encodable(k) for k in keys)


# ---------------------------------------------------------------------------------------------------- checks


def _check_file_frame(df: pl.DataFrame, path: Path, kind: Kind) -> tuple[str, ...]:
    """Check one file's frame; return its form: ``("text",)`` or ``("prompt", "completion")``."""
    columns = [c for c in df.columns if c != SOURCE]
    present = set(columns)
    found = ", ".join(repr(c) for c in columns) or "(none)"
    if kind == "queries":
        form: tuple[str, ...] = ("prompt", "completion")
        missing = [c for c in ("id", *form) if c not in present]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; found {found}",
                            hint=_FORM_HINT[kind])
    else:
        has_text = "text" in present
        has_pc = [c for c in ("prompt", "completion") if c in present]
        if has_text and has_pc:
            both = "/".join(map(repr, has_pc))
            raise DataError(f"{path}: has both 'text' and {both} columns; found {found}",
                            hint="use one form per dataset: 'text', or 'prompt' and 'completion'")
        form = ("text",) if has_text or not has_pc else ("prompt", "completion")
        missing = [c for c in ("id", *form) if c not in present]
        if missing:
            what = ", ".join(map(repr, missing))
            if not has_text and not has_pc:
                what = ", ".join(repr(c) for c in missing if c != "text")
                what = (what + " and " if what else "") + "'text' (or 'prompt' and 'completion')"
            raise DataError(f"{path}: missing column(s) {what}; found {found}", hint=_FORM_HINT[kind])

    for field in ("id", *form):
        col = df.get_column(field)
        if col.dtype in (pl.Categorical, pl.Enum):
            df = df.with_columns(pl.col(field).cast(pl.String))
            col = df.get_column(field)
        if col.dtype not in (pl.String, pl.Null):
            bad = df.filter(pl.col(field).is_not_null()).row(0, named=True)
            raise DataError(f"{bad[SOURCE]}: {field} must be a string, got {col.dtype} value "
                            f"{_short(_jsonable(bad[field]))} (column {field!r} has type {col.dtype})",
                            hint=f"store {field} as a string, e.g. \"{field}\": \"42\"")
    for field in ("id", *form):
        nulls = df.filter(pl.col(field).is_null())
        if nulls.height:
            raise DataError(f"{nulls[SOURCE][0]}: {field} is missing or null",
                            hint=f"every row needs a non-empty string {field!r}")
        if df.schema[field] != pl.String:
            continue
        empty = df.filter(~pl.col(field).str.contains(r"\S"))
        if empty.height:
            raise DataError(f"{empty[SOURCE][0]}: {field} is empty (blank or whitespace only)",
                            hint=f"fill in {field!r} or drop the row")
    return form


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def _concat(frames: list[tuple[Path, pl.DataFrame, tuple[str, ...]]], form: tuple[str, ...]) -> pl.DataFrame:
    if len(frames) == 1:
        return frames[0][1].with_columns(pl.col(c).cast(pl.String) for c in ("id", *form))
    seen: dict[str, tuple[pl.DataType, Path]] = {}
    for path, df, _ in frames:
        for name, dtype in df.schema.items():
            if name in ("id", *form, SOURCE) or dtype == pl.Null:
                continue
            if name in seen:
                other, other_path = seen[name]
                if dtype != other and not (dtype.is_numeric() and other.is_numeric()):
                    raise DataError(f"{path}: column {name!r} has type {dtype} but {other} in {other_path}",
                                    hint="use one type per field across all files")
            else:
                seen[name] = (dtype, path)
    parts = [df.with_columns(pl.col(c).cast(pl.String) for c in ("id", *form)) for _, df, _ in frames]
    try:
        return pl.concat(parts, how="diagonal_relaxed")
    except _PANIC as exc:
        raise DataError(f"cannot combine the files: {str(exc).splitlines()[0][:160]}",
                        hint="use the same fields with the same types in every file") from None


def _check_duplicate_ids(df: pl.DataFrame) -> None:
    dup = df.filter(pl.col("id").is_duplicated())
    if dup.height:
        first_id = dup["id"][0]
        where = dup.filter(pl.col("id") == first_id)[SOURCE].to_list()
        raise DataError(f"duplicate id {first_id!r} at {where[0]} and {where[1]}"
                        + (f" (+{len(where) - 2} more)" if len(where) > 2 else ""),
                        hint="ids must be unique across all files of a dataset")


# --------------------------------------------------------------------------------------------------- hashing


def _content(row: Mapping[str, Any]) -> str:
    prompt, completion = row.get("prompt"), row.get("completion")
    if prompt is not None and completion is not None:
        return f"{prompt}{_CONTENT_SEP}{completion}"
    text = row.get("text")
    if text is None:
        raise ValueError("row has neither 'text' nor 'prompt' and 'completion'")
    return str(text)


def content_hash(row: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of a document's content.

    The content is ``prompt + "\\x1f" + completion`` when both are present, else ``text``; ids, extra
    columns and the source location do not count.
    """
    return hashlib.sha256(_content(row).encode("utf-8")).hexdigest()


def _content_hashes(df: pl.DataFrame) -> list[str]:
    if "prompt" in df.columns and "completion" in df.columns:
        contents: Iterable[str] = (f"{p}{_CONTENT_SEP}{c}" for p, c in
                                   zip(df["prompt"].to_list(), df["completion"].to_list(), strict=True))
    elif "text" in df.columns:
        contents = df["text"].to_list()
    else:
        raise ValueError(f"frame has neither 'text' nor 'prompt' and 'completion'; columns: {df.columns}")
    return [hashlib.sha256(c.encode("utf-8")).hexdigest() for c in contents]


def add_content_hashes(df: pl.DataFrame) -> pl.DataFrame:
    """Return ``df`` with a ``content_hash`` column (see :func:`content_hash`), replacing any existing one."""
    return df.with_columns(pl.Series("content_hash", _content_hashes(df), dtype=pl.String))


def data_fingerprint(df: pl.DataFrame) -> str:
    """SHA-256 hex digest over the sorted ``(id, content hash)`` pairs of ``df``.

    Independent of row order, file paths, sharding and extra columns; changes when any document's id or
    content changes, or a document is added or removed. Uses the ``content_hash`` column when present.
    """
    hashes = df["content_hash"] if "content_hash" in df.columns else pl.Series(_content_hashes(df))
    pairs = pl.DataFrame({"id": df["id"].cast(pl.String), "h": hashes.cast(pl.String)}).sort(["id", "h"])
    lines = pairs.select(pl.concat_str([pl.col("id").str.len_bytes().cast(pl.String), pl.lit(":"),
                                        pl.col("id"), pl.lit(" "), pl.col("h")]))
    joined = lines.to_series().str.join("\n").item() if pairs.height else ""
    return hashlib.sha256((joined + "\n").encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------- sharding, sampling


def shard_frame(df: pl.DataFrame, shard_size: int) -> list[pl.DataFrame]:
    """Split ``df`` into contiguous shards of ``shard_size`` rows (the last may be shorter), in row order."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise UserError(f"shard size must be a positive integer, not {shard_size!r}",
                        hint="pass e.g. --shard-size 1000")
    return [df.slice(start, shard_size) for start in range(0, df.height, shard_size)]


def sample_queries(df: pl.DataFrame, n: int | None, *, seed: int, stratify_by: str | None) -> pl.DataFrame:
    """Choose ``n`` rows of ``df`` without replacement, deterministically for a given ``seed``.

    ``n`` None or ``>= len(df)`` returns every row. With ``stratify_by``, rows are drawn round-robin over
    the groups of that column (in a seeded random group order, each group shuffled by the seed), so group
    sizes in the sample differ by at most one unless a group runs out. The chosen rows keep their original
    order. An unknown ``stratify_by`` column raises :class:`DataError`.
    """
    if stratify_by is not None and stratify_by not in df.columns:
        available = ", ".join(repr(c) for c in df.columns if c != SOURCE)
        raise DataError(f"cannot stratify queries by {stratify_by!r}: no such column; available: {available}",
                        hint="add that field to the query file or pick another column")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise UserError(f"number of queries must be a non-negative integer, not {n!r}")
    if n is None or n >= df.height:
        return df
    rng = random.Random(seed)
    if stratify_by is None:
        chosen = rng.sample(range(df.height), n)
    else:
        groups: dict[Any, list[int]] = {}
        for i, key in enumerate(df[stratify_by].to_list()):
            groups.setdefault(_hashable(key), []).append(i)
        members = list(groups.values())
        for group in members:
            rng.shuffle(group)
        rng.shuffle(members)
        chosen = []
        depth = 0
        while len(chosen) < n:
            for group in members:
                if depth < len(group):
                    chosen.append(group[depth])
                    if len(chosen) == n:
                        break
            depth += 1
    return df[sorted(chosen)]


def _hashable(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return "NaN"
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value
