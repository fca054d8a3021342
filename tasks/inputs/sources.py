"""Training data as teams keep it, read in row ranges: files, directories, glob patterns and ``datasets`` directories.

A ``--train`` argument is resolved into *sources* (:func:`resolve_sources`):

* a JSONL (``.jsonl`` / ``.json``) or Parquet file;
* a directory: its ``*.jsonl`` and ``*.parquet`` files in name order (not recursive: use a glob for that), or,
  when it holds ``dataset_dict.json`` / ``state.json``, a directory written by ``datasets``'
  ``DatasetDict.save_to_disk`` (one split, ``--split``, default ``train``) or ``Dataset.save_to_disk``;
* a quoted glob pattern (``'data/**/*.parquet'``), its matching files in name order.

A source is cut into :class:`RowRange` s (:func:`plan_ranges`): rows of a Parquet file or an Arrow split (counted
from metadata), or lines of a JSONL file (with their byte offsets, found by one streaming pass over its bytes).
A range is read on its own (:func:`read_range`), so no process ever holds more than a range; ``datasets``
directories are memory-mapped Arrow, never loaded whole.

Field mapping (:class:`~tasks.inputs.rows.Fields`): ``--id-field`` / ``--text-field`` name the columns that hold the
id and the text. Without an id column, a document's id is derived from where it lives: ``NAME#N``, where NAME is
the file's path relative to the ``--train`` argument (a file given directly: its name; a directory: the
directory's name, ``/``, the file's name; a glob: the path under the pattern's fixed prefix; a ``datasets``
directory: its name, ``/``, the split) and N the row's 1-based line (JSONL) or row (Parquet, Arrow) number, as
in the ``source`` column. Such ids are stable while the files stay where they are, contain no ``:`` (so the
review commands' ``QUERY_ID:TRAIN_ID:VERDICT`` accepts them) and are unique unless two arguments have files of
the same relative name (then the id check names both; pass an ``--id-field``).
"""

from __future__ import annotations

import functools
import glob
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from influence_engine.errors import DataError, first_line
from tasks.inputs.rows import (
    _BOM,
    _PANIC,
    FORM_HINT,
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    SOURCE,
    STRING_FIELDS,
    Fields,
    Kind,
    _check_file_frame,
    _expand_paths,
    _reserved,
    _source_expr,
    check_duplicate_ids,
    check_same_form,
    concat_frames,
    parse_jsonl,
)

__all__ = ["RowRange", "Source", "plan_ranges", "read_range", "resolve_sources", "source_identity"]

_GLOB = set("*?[")
_CHUNK = 1 << 24  # bytes per read while counting JSONL lines


@dataclass(frozen=True)
class Source:
    """One file, or one split of a ``datasets`` directory; ``name`` labels its derived ids."""

    path: str
    form: str  # "jsonl" | "parquet" | "arrow"
    name: str
    split: str | None = None


@dataclass(frozen=True)
class RowRange:
    """Rows ``[start, stop)`` of a source (JSONL: lines, 0-based, with their byte offsets; ``byte_stop`` -1 = end
    of file). A shard of the audit is one of these: a reference into the source, not a copy."""

    path: str
    form: str  # jsonl | parquet | arrow | copied (a Parquet shard written by an audit, its source column kept)
    name: str
    start: int
    stop: int
    byte_start: int = 0
    byte_stop: int = -1
    split: str | None = None
    stamp: tuple[int, int] = (-1, -1)  # the source's (size, mtime_ns) when planned

    def changed(self) -> bool:
        """Whether the source's size or modification time differs from when the range was planned."""
        try:
            ident = source_identity(self)
        except DataError:
            return True
        return self.stamp != (-1, -1) and (ident["size"], ident["mtime_ns"]) != tuple(self.stamp)

    @property
    def label(self) -> str:
        """``file:first-last`` for messages (1-based lines / rows, as in the ``source`` column)."""
        where = self.path if self.split is None or self.form != "arrow" else f"{self.path}[{self.split}]"
        return f"{where}:{self.start + 1}-{self.stop}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------- resolving


def _is_glob(text: str) -> bool:
    return any(c in _GLOB for c in text)


def _datasets_kind(path: Path) -> str | None:
    if (path / "dataset_dict.json").is_file():
        return "dict"
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return "dataset"
    return None


def resolve_sources(specs: str | Path | Sequence[str | Path], split: str = "train") -> list[Source]:
    """The sources named by ``--train`` arguments (files, directories, quoted glob patterns, ``datasets``
    directories), in order. Raises :class:`DataError` for a missing path, a pattern matching nothing, an unknown
    file type, an unknown split, or the same file twice."""
    items: list[str | Path] = [specs] if isinstance(specs, (str, Path)) else list(specs)
    if not items:
        raise DataError("no input files given", hint="pass a .jsonl or .parquet file, a directory of them, a quoted "
                                                     "glob pattern or a datasets save_to_disk directory")
    out: list[Source] = []
    for item in items:
        text = os.path.expanduser(str(item))
        path = Path(text)
        if _is_glob(text) and not path.exists():
            out.extend(_glob_sources(text))
        elif path.is_dir() and _datasets_kind(path):
            out.append(_datasets_source(path, split))
        else:
            for file in _expand_paths([path]):
                form = "parquet" if file.suffix.lower() in PARQUET_SUFFIXES else "jsonl"
                name = f"{path.name}/{file.name}" if path.is_dir() else file.name
                out.append(Source(str(file), form, name))
    seen: dict[str, str] = {}
    for source in out:
        key = str(Path(source.path).resolve()) + f"[{source.split}]"
        if key in seen:
            raise DataError(f"{source.path}: the same file is given twice (also as {seen[key]})",
                            hint="pass each file, directory or pattern once")
        seen[key] = source.path
    return out


def _glob_sources(pattern: str) -> list[Source]:
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if _is_glob(part))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    suffixes = JSONL_SUFFIXES + PARQUET_SUFFIXES
    matches = sorted(m for m in glob.glob(pattern, recursive=True)
                     if Path(m).is_file() and Path(m).suffix.lower() in suffixes and not Path(m).name.startswith("."))
    if not matches:
        raise DataError(f"{pattern}: the pattern matches no .jsonl or .parquet files",
                        hint="check the pattern (quote it so the shell does not expand it)")
    return [Source(m, "parquet" if Path(m).suffix.lower() in PARQUET_SUFFIXES else "jsonl",
                   Path(os.path.relpath(m, root)).as_posix()) for m in matches]


def _datasets_source(path: Path, split: str) -> Source:
    if _datasets_kind(path) == "dataset":
        return Source(str(path), "arrow", path.name, None)
    try:
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}/dataset_dict.json: unreadable ({exc})",
                        hint="save the dataset again with DatasetDict.save_to_disk") from None
    if split not in splits:
        raise DataError(f"{path}: no split {split!r} (splits: {', '.join(splits)})", hint="pass --split NAME")
    return Source(str(path), "arrow", f"{path.name}/{split}", split)


@functools.lru_cache(maxsize=16)
def _arrow(path: str, split: str | None, stamp: tuple) -> Any:
    """The memory-mapped ``datasets.Dataset`` of a directory (one split of a DatasetDict); cached per process and
    per state of its files (``stamp``)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_from_disk(path)
    except Exception as exc:  # corrupt or foreign directory
        first = first_line(exc, 200)
        raise DataError(f"{path}: not a readable datasets directory ({first})",
                        hint="save it again with save_to_disk") from None
    return ds[split] if split is not None else ds


def _arrow_files(source_path: str, split: str | None) -> list[Path]:
    root = Path(source_path) / split if split is not None else Path(source_path)
    return sorted(root.glob("*.arrow"))


def _stamp(source_path: str, form: str, split: str | None) -> tuple:
    files = _arrow_files(source_path, split) if form == "arrow" else [Path(source_path)]
    try:
        return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    except OSError as exc:
        raise DataError(f"{source_path}: cannot read: {exc.strerror or exc}", hint="check the path") from None


def source_identity(source: Source | RowRange) -> dict[str, Any]:
    """What says a source is unchanged without reading it: its files' sizes and modification times."""
    stamp = _stamp(source.path, source.form, source.split)
    return {"path": source.path, "form": source.form, "split": source.split,
            "size": sum(s for _, s, _ in stamp), "mtime_ns": max((m for _, _, m in stamp), default=0)}


def arrow_dataset(source: Source | RowRange) -> Any:
    return _arrow(source.path, source.split, _stamp(source.path, "arrow", source.split))


# ----------------------------------------------------------------------------------------------- planning


def plan_ranges(source: Source, shard_size: int | None) -> list[RowRange]:
    """Cut a source into ranges of ``shard_size`` rows (JSONL: lines; None: one range for the whole source).
    Parquet and Arrow row counts come from metadata; a JSONL file is read once, in chunks, for its line offsets."""
    ident = source_identity(source)
    stamp = (ident["size"], ident["mtime_ns"])
    if source.form == "parquet":
        n = _parquet_rows(source.path)
    elif source.form == "arrow":
        n = arrow_dataset(source).num_rows
    elif shard_size is None:
        return [RowRange(source.path, source.form, source.name, 0, -1, stamp=stamp)]
    else:
        return [replace(r, stamp=stamp) for r in _jsonl_ranges(source, shard_size)]
    step = shard_size or max(n, 1)
    return [RowRange(source.path, source.form, source.name, a, min(a + step, n), split=source.split, stamp=stamp)
            for a in range(0, n, step)]


def _parquet_rows(path: str) -> int:
    import pyarrow.parquet as pq

    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except OSError as exc:
        if isinstance(exc, PermissionError) or not Path(path).exists():
            raise DataError(f"{path}: cannot read file: {exc.strerror or exc}",
                            hint="check the path and the file's permissions") from None
        raise DataError(f"{path}: not a valid Parquet file ({first_line(exc, 200)})",
                        hint="the file is corrupt or truncated: re-export it") from None
    except Exception as exc:
        raise DataError(f"{path}: not a valid Parquet file ({first_line(exc, 200)})",
                        hint="the file is corrupt or truncated: re-export it") from None


def _jsonl_ranges(source: Source, shard_size: int) -> list[RowRange]:
    """Every ``shard_size`` lines, the byte offset where the next line starts (one pass, ``_CHUNK`` bytes at a
    time; lines are counted by their newlines, a last line without one included)."""
    bounds = [0]
    lines = 0
    offset = 0
    last = b"\n"
    try:
        with open(source.path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                ends = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
                # ends[i] closes line lines + 1 + i (1-based); a range ends after every shard_size-th line
                for i in range((-(lines + 1)) % shard_size, len(ends), shard_size):
                    bounds.append(offset + int(ends[i]) + 1)
                lines += len(ends)
                offset += len(chunk)
                last = chunk[-1:]
    except OSError as exc:
        raise DataError(f"{source.path}: cannot read file: {exc.strerror or exc}",
                        hint="check the path and the file's permissions") from None
    if offset and last != b"\n":
        lines += 1
    if bounds[-1] != offset:
        bounds.append(offset)
    out = []
    for j in range(len(bounds) - 1):
        a = j * shard_size
        out.append(RowRange(source.path, "jsonl", source.name, a, min(a + shard_size, lines), bounds[j], bounds[j + 1]))
    return out


# ----------------------------------------------------------------------------------------------- reading


def read_range(rows: RowRange, kind: Kind, fields: Fields | None = None,
               head: int | None = None) -> tuple[pl.DataFrame, tuple[str, ...] | None]:
    """The rows of ``rows`` as a checked frame (``id``, the content columns, extras, ``source``) and its form
    (None when the range has no rows). ``head`` reads only its first rows (a quick check). Raises the one-line
    :class:`DataError` s of :func:`tasks.inputs.rows.read_rows`."""
    fields = fields or Fields()
    path = Path(rows.path)
    if rows.form == "jsonl":
        df = _read_jsonl_range(rows, kind, head)
    elif rows.form in ("parquet", "copied"):
        df = _read_parquet_range(rows, head)
    else:
        df = _read_arrow_range(rows, head)
    if df.height == 0 and all(c == SOURCE for c in df.columns):
        return df, None
    df = fields.apply(df, path, kind, rows.name)
    return df, _check_file_frame(df, path, kind)


def _read_jsonl_range(rows: RowRange, kind: Kind, head: int | None) -> pl.DataFrame:
    path = Path(rows.path)
    try:
        with open(path, "rb") as fh:
            fh.seek(rows.byte_start)
            want = -1 if rows.byte_stop < 0 else rows.byte_stop - rows.byte_start
            if head is not None:
                want = min(want if want >= 0 else 1 << 16, 1 << 16)
            data = fh.read(want)
            more = head is not None and bool(fh.read(1))
    except OSError as exc:
        raise DataError(f"{path}: cannot read file: {exc.strerror or exc}",
                        hint="check the file's permissions") from None
    if more:  # whole lines only
        data = data[:data.rfind(b"\n") + 1]
    if rows.byte_start == 0 and data.startswith(_BOM):
        data = data[len(_BOM):]
    return parse_jsonl(path, data, kind, start_line=rows.start + 1)


def _read_parquet_range(rows: RowRange, head: int | None) -> pl.DataFrame:
    path = Path(rows.path)
    n = rows.stop - rows.start if head is None else min(head, rows.stop - rows.start)
    try:
        with open(path, "rb"):
            pass
        df = pl.scan_parquet(path).slice(rows.start, n).collect()
    except OSError as exc:
        raise DataError(f"{path}: cannot read file: {exc.strerror or exc}",
                        hint="check the path and the file's permissions") from None
    except _PANIC as exc:
        first = first_line(exc)
        raise DataError(f"{path}: not a valid Parquet file ({first[:200]})",
                        hint="the file is corrupt or truncated: re-export it") from None
    if rows.form == "copied" and SOURCE in df.columns:
        return df.select([c for c in df.columns if c not in (SOURCE, "content_hash")] + [SOURCE])
    if SOURCE in df.columns:
        _reserved(path)
    return df.with_columns(_source_expr(path, pl.int_range(rows.start + 1, rows.start + df.height + 1, dtype=pl.Int64)))


def _read_arrow_range(rows: RowRange, head: int | None) -> pl.DataFrame:
    ds = arrow_dataset(rows)
    stop = rows.stop if head is None else min(rows.stop, rows.start + head)
    table = ds.with_format("arrow")[rows.start:stop]
    df = pl.from_arrow(table)
    assert isinstance(df, pl.DataFrame)
    where = Path(rows.path) if rows.split is None else Path(f"{rows.path}[{rows.split}]")
    if SOURCE in df.columns:
        _reserved(where)
    return df.with_columns(_source_expr(where, pl.int_range(rows.start + 1, rows.start + df.height + 1,
                                                            dtype=pl.Int64)))


def read_rows(paths: str | Path | Sequence[str | Path], kind: Kind, *, fields: Fields | None = None,
              split: str = "train") -> pl.DataFrame:
    """Read training documents (``kind="train"``) or queries (``kind="queries"``), all of them, into one frame
    (for the commands that hold the documents; the audit reads range by range, see :mod:`tasks.inputs.sources`).

    ``paths`` is one ``--train`` argument or a sequence of them: JSON-lines files (``.jsonl`` / ``.json``),
    Parquet files, directories of them (read in name order), quoted glob patterns, or ``datasets`` directories
    (``split``). Blank JSONL lines are skipped. ``fields`` maps the id and text columns. The result has the
    columns ``id``, then ``text``, or ``prompt``, ``completion``, or ``messages``, then any extra columns (in order
    of first appearance), then ``source`` (``"file:line"``).

    Raises :class:`DataError` (one line: file, line or column, and what to do) for a missing, unreadable,
    non-UTF-8, malformed or corrupt file, an unknown extension, missing columns, a null or empty
    (whitespace-only) field, a non-string id / text / prompt / completion, malformed chat messages, duplicate
    ids, no rows at all, or files that mix the forms.
    """
    pass

    if kind not in STRING_FIELDS:
        raise ValueError(f"kind must be 'train' or 'queries', not {kind!r}")
    sources = resolve_sources(paths, split)
    frames: list[tuple[Path, pl.DataFrame, tuple[str, ...]]] = []
    for source in sources:
        for rows in plan_ranges(source, None):
            df, form = _read_checked(rows, kind, fields)
            if form is not None:
                frames.append((Path(rows.path), df, form))
    shown = ", ".join(s.path for s in sources[:3]) + (f" (+{len(sources) - 3} more)" if len(sources) > 3 else "")
    if not frames or sum(df.height for _, df, _ in frames) == 0:
        raise DataError(f"{shown}: no rows", hint=f"the dataset is empty; {FORM_HINT[kind]}")
    form = check_same_form((str(path), f) for path, _, f in frames)
    df = concat_frames(frames, form)
    check_duplicate_ids(df)
    extras = [c for c in df.columns if c not in ("id", *form, SOURCE)]
    return df.select(["id", *form, *extras, SOURCE])


def _read_checked(rows: Any, kind: Kind, fields: Fields | None, head: int | None = None
                  ) -> tuple[pl.DataFrame, tuple[str, ...] | None]:
    pass

    return read_range(rows, kind, fields, head)


def check_columns(paths: str | Path | Sequence[str | Path], kind: Kind, head_rows: int = 100, *,
                  fields: Fields | None = None, split: str = "train") -> None:
    """A quick check of every source's first rows (JSONL: its first 64 KiB; Parquet, Arrow: its first
    ``head_rows`` rows): it exists, parses, and has the columns and types ``kind`` needs, in one form across
    files. Raises the same :class:`DataError` as :func:`read_rows` would for those rows; the full read checks the
    rest."""
    pass

    forms: list[tuple[str, tuple[str, ...]]] = []
    for source in resolve_sources(paths, split):
        if source.form == "jsonl":
            rows = RowRange(source.path, "jsonl", source.name, 0, -1)
        else:
            ranges = plan_ranges(source, None)
            if not ranges:
                continue
            rows = ranges[0]
        _, form = _read_checked(rows, kind, fields, head=head_rows)
        if form is not None:
            forms.append((source.path, form))
    if forms:
        check_same_form(forms)
