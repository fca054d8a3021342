"""Reading, checking, hashing, sharding and sampling training documents and queries.

Plain functions (no Prefect here), so the flows, the CLI and the tests share them.

Training rows have a string ``id`` and either ``text``, or ``prompt`` and ``completion``; query rows have
``id``, ``prompt`` and ``completion``. Extra columns (``fact``, ``category``, ...) are kept. Every frame
returned by :func:`tasks.inputs.sources.read_rows` also has a ``source`` column (``"file:line"``: the 1-based
JSONL line or the Parquet row index + 1) so later errors can point at the offending input.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from influence_engine import Example, InfluenceEngine
from influence_engine.errors import DataError, UserError, first_line

Kind = Literal["train", "queries"]


__all__ = [
    "Fields",
    "Kind",
    "add_content_hashes",
    "content_hash",
    "data_fingerprint",
    "sample_queries",
    "shard_frame",
]


JSONL_SUFFIXES = (".jsonl", ".json")


PARQUET_SUFFIXES = (".parquet",)


DIRECTORY_SUFFIXES = (".jsonl", ".parquet")


SOURCE = "source"


MESSAGES = "messages"


_CONTENT_SEP = "\x1f"


_SAMPLE_LINES = 1000


_BOM = b"\xef\xbb\xbf"


STRING_FIELDS = {"train": ("id", "text", "prompt", "completion"), "queries": ("id", "prompt", "completion")}


FORM_HINT = {
    "train": "training rows need a string 'id' (or none: ids are derived) and either 'text', or 'prompt' and "
             "'completion', or 'messages' (chat)",
    "queries": "query rows need string 'id', 'prompt' and 'completion' fields (or 'id' and chat 'messages')",
}


_PANIC: tuple[type[BaseException], ...] = (Exception, pl.exceptions.PanicException)


@dataclass(frozen=True)
class Fields:
    """Which input columns hold the id and the text (``--id-field``, ``--text-field``).

    Without the id column (and ``id`` left at its default), ids are derived: ``NAME#N`` (see
    :mod:`tasks.sources`). ``prompt``, ``completion`` and ``messages`` keep their names."""

    id: str = "id"
    text: str = "text"

    def apply(self, df: pl.DataFrame, path: Path, kind: Kind, name: str) -> pl.DataFrame:
        """``df`` with its id and text columns named ``id`` and ``text`` (ids derived when absent)."""
        for field, flag, target in ((self.id, "--id-field", "id"), (self.text, "--text-field", "text")):
            if field == target:
                continue
            if field not in df.columns:
                if target == "text" and ({"prompt", "completion", MESSAGES} & set(df.columns)):
                    continue
                found = ", ".join(repr(c) for c in df.columns if c != SOURCE) or "(none)"
                raise DataError(f"{path}: missing column {field!r} ({flag} {field}); found {found}",
                                hint=f"pass the column that holds the {target} with {flag}")
            if target in df.columns:
                raise DataError(f"{path}: has both {field!r} ({flag}) and {target!r} columns",
                                hint=f"drop or rename the {target!r} column, or leave {flag} at its default")
            df = df.rename({field: target})
        if "id" not in df.columns and self.id == "id" and kind == "train":
            number = pl.col(SOURCE).str.extract(r":(\d+)$")
            label = name.replace(":", "_")  # the review commands split QUERY_ID:TRAIN_ID:VERDICT on ':'
            df = df.with_columns(pl.concat_str([pl.lit(f"{label}#"), number]).alias("id"))
        return df


def check_same_form(forms: Iterable[tuple[str, tuple[str, ...]]]) -> tuple[str, ...]:
    """The one form of a dataset's files (``(where, form)`` pairs); files that mix forms raise :class:`DataError`."""
    first: dict[tuple[str, ...], str] = {}
    for where, form in forms:
        first.setdefault(form, where)
    if len(first) > 1:
        described = " but ".join(f"{where} has {'/'.join(f)}" for f, where in sorted(first.items()))
        raise DataError(f"mixed document forms: {described}",
                        hint="all files of one dataset must use 'text', or all 'prompt' and 'completion', or all "
                             "'messages'")
    if not first:
        raise DataError("no rows", hint="the dataset is empty")
    return next(iter(first))


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


def _reserved(path: Path) -> None:
    raise DataError(f"{path}: column {SOURCE!r} is reserved (it records file:line)",
                    hint=f"rename the {SOURCE!r} field in the input")


def _source_expr(path: Path, lines: pl.Expr | pl.Series) -> pl.Expr:
    line_expr = pl.lit(lines) if isinstance(lines, pl.Series) else lines
    return pl.concat_str([pl.lit(f"{path}:"), line_expr.cast(pl.String)]).alias(SOURCE)


def parse_jsonl(path: Path, data: bytes, kind: Kind, start_line: int = 1) -> pl.DataFrame:
    """Parse JSON-lines ``data`` (whole lines of ``path``, the first of them line ``start_line``) into a frame with
    a ``source`` column; a bad line raises :class:`DataError` naming ``path:line``."""
    _check_utf8(path, data, start_line)
    line_numbers, plausible, longest = _jsonl_lines(data)
    if line_numbers.size == 0:
        return pl.DataFrame({SOURCE: pl.Series([], dtype=pl.String)})
    df: pl.DataFrame | None = None
    if plausible:
        df = _fast_jsonl(data, int(line_numbers.size), longest)
    if df is None:
        return _slow_jsonl(path, data, kind, start_line)
    if SOURCE in df.columns:
        _reserved(path)
    return df.with_columns(_source_expr(path, pl.Series(line_numbers + (start_line - 1), dtype=pl.Int64)))


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


def _check_utf8(path: Path, data: bytes, start_line: int = 1) -> None:
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
        line_no = data.count(b"\n", 0, exc.start) + start_line
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


def _slow_jsonl(path: Path, data: bytes, kind: Kind, start_line: int = 1) -> pl.DataFrame:
    """Parse line by line: raise a DataError naming the first bad line, or build the frame."""
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    for line_no, raw in enumerate(data.split(b"\n"), start=start_line):
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
    string_fields = STRING_FIELDS[kind]
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
            raise DataError(f"{path}: cannot load column {col!r}: {first_line(exc, 120)}",
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


def _check_file_frame(df: pl.DataFrame, path: Path, kind: Kind) -> tuple[str, ...]:
    """Check one file's frame; return its form: ``("text",)`` or ``("prompt", "completion")``."""
    columns = [c for c in df.columns if c != SOURCE]
    present = set(columns)
    found = ", ".join(repr(c) for c in columns) or "(none)"
    has_messages = MESSAGES in present and not ({"text", "prompt", "completion"} & present)
    if kind == "queries" and has_messages:
        form: tuple[str, ...] = (MESSAGES,)
        if "id" not in present:
            raise DataError(f"{path}: missing column(s) 'id'; found {found}", hint=FORM_HINT[kind])
    elif kind == "queries":
        form = ("prompt", "completion")
        missing = [c for c in ("id", *form) if c not in present]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; found {found}",
                            hint=FORM_HINT[kind])
    elif has_messages:
        form = (MESSAGES,)
        if "id" not in present:
            raise DataError(f"{path}: missing column(s) 'id'; found {found}", hint=FORM_HINT[kind])
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
            raise DataError(f"{path}: missing column(s) {what}; found {found}", hint=FORM_HINT[kind])

    if form == (MESSAGES,):
        _check_string_column(df, "id")
        _check_messages(df, kind)
        return form
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


def _check_string_column(df: pl.DataFrame, field: str) -> None:
    col = df.get_column(field)
    if col.dtype not in (pl.String, pl.Null, pl.Categorical):
        bad = df.filter(pl.col(field).is_not_null()).row(0, named=True)
        raise DataError(f"{bad[SOURCE]}: {field} must be a string, got {col.dtype} value "
                        f"{_short(_jsonable(bad[field]))}",
                        hint=f"store {field} as a string, e.g. \"{field}\": \"42\"")
    nulls = df.filter(pl.col(field).is_null())
    if nulls.height:
        raise DataError(f"{nulls[SOURCE][0]}: {field} is missing or null",
                        hint=f"every row needs a non-empty string {field!r}")
    empty = df.filter(~pl.col(field).cast(pl.String).str.contains(r"\S"))
    if empty.height:
        raise DataError(f"{empty[SOURCE][0]}: {field} is empty (blank or whitespace only)",
                        hint=f"fill in {field!r} or drop the row")


_MESSAGES_HINT = "messages must be a list of {\"role\": ..., \"content\": ...} objects with string values"


def _check_messages(df: pl.DataFrame, kind: Kind) -> None:
    """Chat rows: a non-empty list of ``{role, content}`` string pairs with at least one assistant turn (for a query:
    the last message is the assistant's, its completion)."""
    dtype = df.schema[MESSAGES]
    fields = {f.name: f.dtype for f in dtype.inner.fields} if isinstance(dtype, pl.List) and \
        isinstance(dtype.inner, pl.Struct) else {}
    if dtype != pl.Null and not (fields.keys() >= {"role", "content"}
                                 and all(fields[k] in (pl.String, pl.Null) for k in ("role", "content"))):
        bad = df.filter(pl.col(MESSAGES).is_not_null())
        where = bad[SOURCE][0] if bad.height else str(df[SOURCE][0])
        raise DataError(f"{where}: messages has type {dtype}, not a list of {{role, content}} strings",
                        hint=_MESSAGES_HINT)
    nulls = df.filter(pl.col(MESSAGES).is_null() | (pl.col(MESSAGES).list.len() == 0))
    if nulls.height:
        raise DataError(f"{nulls[SOURCE][0]}: messages is missing, null or empty", hint=_MESSAGES_HINT)
    turns = (df.select(SOURCE, MESSAGES).with_row_index("_row").explode(MESSAGES)
             .with_columns(pl.int_range(pl.len()).over("_row").alias("_turn"),
                           pl.col(MESSAGES).struct.field("role").alias("_role"),
                           pl.col(MESSAGES).struct.field("content").alias("_content")))
    for field in ("role", "content"):
        bad = turns.filter(pl.col(f"_{field}").is_null() | ((field == "role") & ~pl.col("_role").str.contains(r"\S")))
        if bad.height:
            raise DataError(f"{bad[SOURCE][0]}: messages[{bad['_turn'][0]}].{field} is missing or null",
                            hint=_MESSAGES_HINT)
    per_row = turns.group_by("_row", maintain_order=True).agg(
        pl.col(SOURCE).first(), (pl.col("_role") == "assistant").any().alias("any"),
        pl.col("_role").last().alias("last"))
    none = per_row.filter(~pl.col("any"))
    if none.height:
        raise DataError(f"{none[SOURCE][0]}: messages has no assistant turn (only assistant turns are targets)",
                        hint="add the assistant's reply, or drop the row")
    if kind == "queries":
        last = per_row.filter(pl.col("last") != "assistant")
        if last.height:
            raise DataError(f"{last[SOURCE][0]}: the last message is not the assistant's (a chat query's last "
                            f"assistant message is its completion)", hint="end each query with the assistant's reply")
    empty = turns.filter((pl.col("_role") == "assistant") & ~pl.col("_content").str.contains(r"\S"))
    if empty.height:
        raise DataError(f"{empty[SOURCE][0]}: messages[{empty['_turn'][0]}] (assistant) content is empty",
                        hint="fill in the reply or drop the row")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def concat_frames(frames: list[tuple[Path, pl.DataFrame, tuple[str, ...]]], form: tuple[str, ...]) -> pl.DataFrame:
    if len(frames) == 1:
        return frames[0][1].with_columns(pl.col(c).cast(pl.String) for c in ("id", *form) if c != MESSAGES)
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
    strings = [c for c in ("id", *form) if c != MESSAGES]
    parts = [df.with_columns(pl.col(c).cast(pl.String) for c in strings) for _, df, _ in frames]
    try:
        return pl.concat(parts, how="diagonal_relaxed")
    except _PANIC as exc:
        raise DataError(f"cannot combine the files: {first_line(exc, 160)}",
                        hint="use the same fields with the same types in every file") from None


def check_duplicate_ids(df: pl.DataFrame) -> None:
    dup = df.filter(pl.col("id").is_duplicated())
    if dup.height:
        first_id = dup["id"][0]
        where = dup.filter(pl.col("id") == first_id)[SOURCE].to_list()
        raise DataError(f"duplicate id {first_id!r} at {where[0]} and {where[1]}"
                        + (f" (+{len(where) - 2} more)" if len(where) > 2 else ""),
                        hint="ids must be unique across all files of a dataset (derived ids: pass --id-field)")


def _chat_content(messages: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))


def _content(row: Mapping[str, Any]) -> str:
    prompt, completion = row.get("prompt"), row.get("completion")
    if prompt is not None and completion is not None:
        return f"{prompt}{_CONTENT_SEP}{completion}"
    text = row.get("text")
    if text is None and row.get(MESSAGES) is not None:
        return _chat_content(row[MESSAGES])
    if text is None:
        raise ValueError("row has neither 'text' nor 'prompt' and 'completion' nor 'messages'")
    return str(text)


def content_hash(row: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of a document's content.

    The content is ``prompt + "\\x1f" + completion`` when both are present, else ``text``, else (chat rows) the
    compact JSON of the ``[role, content]`` pairs; ids, extra columns and the source location do not count.
    """
    return hashlib.sha256(_content(row).encode("utf-8")).hexdigest()


def _content_hashes(df: pl.DataFrame) -> list[str]:
    if "prompt" in df.columns and "completion" in df.columns:
        contents: Iterable[str] = (f"{p}{_CONTENT_SEP}{c}" for p, c in
                                   zip(df["prompt"].to_list(), df["completion"].to_list(), strict=True))
    elif "text" in df.columns:
        contents = df["text"].to_list()
    elif MESSAGES in df.columns:
        contents = (_chat_content(m) for m in df[MESSAGES].to_list())
    else:
        raise ValueError(f"frame has neither 'text' nor 'prompt' and 'completion'; columns: {df.columns}")
    return [hashlib.sha256(c.encode("utf-8")).hexdigest() for c in contents]


def add_content_hashes(df: pl.DataFrame) -> pl.DataFrame:
    """Return ``df`` with a ``content_hash`` column (see :func:`content_hash`), replacing any existing one."""
    return df.with_columns(pl.Series("content_hash", _content_hashes(df), dtype=pl.String))


_MOD = 1 << 256


def fingerprint_sum(ids: Iterable[str], hashes: Iterable[str]) -> tuple[int, int]:
    """The streaming part of :func:`data_fingerprint`: ``(number of documents, sum of their pair digests mod
    2**256)``. Sums of disjoint parts add up (mod 2**256) to the whole's, in any order."""
    total = n = 0
    for doc_id, h in zip(ids, hashes, strict=True):
        digest = hashlib.sha256(f"{len(doc_id.encode())}:{doc_id} {h}".encode()).digest()
        total += int.from_bytes(digest, "big")
        n += 1
    return n, total % _MOD


def fingerprint_from_sums(parts: Iterable[tuple[int, int]]) -> str:
    """The data fingerprint of a corpus from its parts' :func:`fingerprint_sum` values."""
    n = total = 0
    for count, part in parts:
        n += count
        total = (total + part) % _MOD
    return hashlib.sha256(f"influence-audit-data-v2 {n} {total:064x}".encode()).hexdigest()


def data_fingerprint(df: pl.DataFrame) -> str:
    """SHA-256 hex digest of the multiset of ``(id, content hash)`` pairs of ``df``.

    Computed by streaming: each pair's digest is summed mod 2**256 (:func:`fingerprint_sum`), so shards are
    fingerprinted apart and combined (:func:`fingerprint_from_sums`) without holding the corpus or sorting it.
    Independent of row order, file paths, sharding and extra columns; changes when any document's id or content
    changes, or a document is added or removed. Uses the ``content_hash`` column when present.
    """
    hashes = df["content_hash"] if "content_hash" in df.columns else pl.Series(_content_hashes(df))
    return fingerprint_from_sums([fingerprint_sum(df["id"].cast(pl.String).to_list(),
                                                  hashes.cast(pl.String).to_list())])


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


def rows_of(df: pl.DataFrame) -> list[dict[str, Any]]:
    cols = [c for c in ("id", "text", "prompt", "completion", "messages", "source") if c in df.columns]
    return df.select(cols).to_dicts()


def encode_frame(eng: InfluenceEngine, df: pl.DataFrame, where: str) -> list[Example]:
    return eng.encode(rows_of(df), where=where)
