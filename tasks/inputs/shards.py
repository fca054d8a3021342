"""The audit's inputs as plain functions: shards (row ranges of the sources, the unit of mapping and resume), the
first stage, and the query sample (the preflight that checks them in seconds is :mod:`tasks.inputs.preflight`).

The first stage streams: :func:`plan_inputs` cuts the training sources into shards (row ranges of the files or
Arrow splits, never copies); :func:`load_shard`, mapped over the shards, reads one range, checks it, hashes it,
tokenises it and validates it with Great Expectations, keeping only its ids and counts; :func:`finish_inputs`
checks ids are unique across shards (a streaming pass over the ids), summarises the shards' reports, combines the
data fingerprint from the shards' sums and writes the audit directory's shard manifest. No process holds the
corpus.

The audit id is the hash of what defines the result: the parameters that differ from their defaults (so a
parameter added later, left at its default, keeps every existing audit's id), the model's weight
fingerprint and the data and query fingerprints.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from influence_engine import (
    Example,
    InfluenceEngine,
    UserError,
    stable_key,
)
from influence_engine.atomic import atomic_path, write_json_atomic
from influence_engine.errors import DataError
from tasks.engine import EngineSpec
from tasks.files import write_parquet_atomic
from tasks.inputs.preflight import resolve_model
from tasks.inputs.rows import (
    SOURCE,
    Fields,
    add_content_hashes,
    check_same_form,
    data_fingerprint,
    encode_frame,
    fingerprint_from_sums,
    fingerprint_sum,
    rows_of,
    sample_queries,
)
from tasks.inputs.sources import RowRange, plan_ranges, read_range, read_rows, resolve_sources, source_identity
from tasks.options import AuditParams, engine_spec, fields_of
from tasks.paths import audit_dir, resolve_home


# -------------------------------------------------------------------------------------------- per shard
@dataclass(frozen=True)
class Shard:
    """A unit of mapping and resume: a range of rows of a training source (read in place, never copied).
    ``key`` (the fingerprint of its documents' ids and contents) names every file derived from it and is checked
    on every read, so a source changed under a running audit is refused. ``ids_path``: its ids and content hashes
    (Parquet ``id``, ``content_hash``, ``line``), written by the input stage."""

    index: int
    rows: RowRange
    key: str
    n_docs: int
    fields: Fields = Fields()
    ids_path: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of_file(cls, index: int, path: str, key: str, n_docs: int) -> Shard:
        """A shard that is a whole Parquet file of its own (the quality audit's copied shards, older audits')."""
        return cls(index, RowRange(path, "copied", Path(path).stem, 0, n_docs), key, n_docs)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Shard:
        if "path" in raw:  # an audit made before sources were read in place: a copied Parquet shard
            return cls.of_file(raw["index"], raw["path"], raw["key"], raw["n_docs"])
        return cls(raw["index"], RowRange(**(raw["rows"] | {"stamp": tuple(raw["rows"].get("stamp", (-1, -1)))})),
                   raw["key"], raw["n_docs"], Fields(**raw.get("fields", {})),
                   raw.get("ids_path", ""))


def read_shard(shard: Shard) -> pl.DataFrame:
    """The shard's rows, read from its source; raises a one-line :class:`DataError` when they are not the rows the
    audit read first (the source changed)."""
    hint = "rerun the audit once the data stops changing: it is then read as a new audit"
    try:
        df, _ = read_range(shard.rows, "train", shard.fields)
    except DataError as exc:
        if shard.rows.changed():
            raise DataError(f"{shard.rows.label}: the source changed during the audit (size or modification time "
                            f"differ, and its rows no longer read: {str(exc).split(': ', 1)[-1][:120]})",
                            hint=hint) from None
        raise
    key = data_fingerprint(df)[:16] if df.height else ""
    if key != shard.key:
        raise DataError(f"{shard.rows.label}: the source changed during the audit (content hash {key or 'empty'}, "
                        f"was {shard.key})", hint=hint)
    return df


def shard_docs(eng: InfluenceEngine, shard: Shard) -> list[Example]:
    return encode_frame(eng, read_shard(shard), "train")


@dataclass
class Inputs:
    audit_id: str
    audit_dir: str
    model_dir: str
    model_fingerprint: str
    data_fingerprint: str
    query_fingerprint: str
    shards: list[Shard]
    n_docs: int
    n_tokens: int
    n_truncated: int
    queries_path: str
    n_queries_available: int
    validation: dict[str, dict] = field(default_factory=dict)
    n_unknown_tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Inputs:
        raw = dict(raw)
        raw["shards"] = [Shard.from_json(s) for s in raw["shards"]]
        raw.setdefault("validation", {})
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})


class InputValidationError(UserError):
    """An input suite failed: the message is the readable summary."""

    def __init__(self, message: str, reports: dict[str, dict]):
        super().__init__(message)
        self.reports = reports


# ------------------------------------------------------------------------------------ the first stage, mapped
@dataclass(frozen=True)
class LoadSpec:
    """What loading one shard needs (small and picklable for remote workers)."""

    engine: EngineSpec
    fields: Fields
    staging: str  # where per-shard results go: home/inputs/<plan key>/
    truncate: bool


@dataclass
class Plan:
    """The training sources cut into row ranges, and where their per-shard results go."""

    spec: LoadSpec
    ranges: list[RowRange]
    sources: list[dict[str, Any]]


def _model_stamp(model_dir: str) -> list[tuple[str, int, int]]:
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(model_dir).iterdir() if f.is_file())


def plan_inputs(p: AuditParams) -> Plan:
    """Resolve the training sources and cut them into shards of ``p.shard_size`` rows (row counts from metadata;
    JSONL files are scanned once for line offsets). The per-shard results go to a directory named by the sources'
    sizes and modification times, the field mapping, the tokenizer and the token limit, so a rerun reuses them."""
    model_dir = resolve_model(p.model)
    sources = resolve_sources(p.train, p.split)
    identities = [source_identity(s) for s in sources]
    ranges = [r for s in sources for r in plan_ranges(s, p.shard_size)]
    spec = engine_spec(p, model_dir)
    fields = fields_of(p)
    key = stable_key({"sources": identities, "ranges": [r.to_json() for r in ranges], "fields": asdict(fields),
                      "model": _model_stamp(model_dir), "max_length": p.max_length, "on_long": p.on_long,
                      "format": 1}, length=16)
    staging = resolve_home(p.output_dir) / "inputs" / key
    return Plan(LoadSpec(spec, fields, str(staging), p.on_long == "truncate"), ranges, identities)


def load_shard(spec: LoadSpec, index: int, rows: RowRange) -> dict[str, Any]:
    """Read one range, check it (one-line errors), hash it, tokenise it and validate it with Great Expectations;
    write its ids (``ids-NNNNN.parquet``: id, content hash, line) and its stats and report (``shard-NNNNN.json``,
    written last: it marks the shard done). Returns the stats."""
    from influence_engine.data import encode
    from tasks.inputs.checks import validate_training_frame

    done = Path(spec.staging) / f"shard-{index:05d}.json"
    if done.exists():
        return json.loads(done.read_text())
    df, form = read_range(rows, "train", spec.fields)
    stats: dict[str, Any] = {"index": index, "label": rows.label, "rows": rows.to_json(), "form": None, "n_docs": 0,
                             "n_tokens": 0, "n_truncated": 0, "n_unknown_tokens": 0, "fingerprint_sum": "0",
                             "key": "", "ids_path": "", "validation": None}
    if form is not None and df.height:
        df = add_content_hashes(df)
        n, total = fingerprint_sum(df["id"].to_list(), df["content_hash"].to_list())
        tok = spec.engine.tokenizer()
        docs = encode(tok, rows_of(df), max_length=spec.engine.max_length, on_long=spec.engine.on_long,
                      where="train")
        unk = getattr(tok, "unk_token_id", None)
        report = validate_training_frame(
            df.with_columns(pl.Series("n_tokens", [e.n_tokens_original for e in docs], dtype=pl.Int64)),
            max_length=spec.engine.max_length, truncate=spec.truncate, sources=df[SOURCE].to_list())
        ids_path = Path(spec.staging) / f"ids-{index:05d}.parquet"
        write_parquet_atomic(df.select("id", "content_hash", pl.col(SOURCE).str.extract(r":(\d+)$").cast(pl.Int64)
                                       .alias("line")), ids_path)
        stats |= {"form": list(form), "n_docs": df.height, "n_tokens": sum(len(e.input_ids) for e in docs),
                  "n_truncated": sum(e.truncated for e in docs),
                  "n_unknown_tokens": sum(e.input_ids.count(unk) for e in docs) if unk is not None else 0,
                  "fingerprint_sum": f"{total:x}", "key": fingerprint_from_sums([(n, total)])[:16],
                  "ids_path": str(ids_path), "validation": report.to_json()}
    write_json_atomic(done, stats)
    return stats


def _check_unique_ids(stats: list[dict[str, Any]]) -> None:
    """Ids unique across all shards: one streaming pass over the ids files (never the rows)."""
    files = [s["ids_path"] for s in stats if s["ids_path"]]
    dup = (pl.scan_parquet(files).group_by("id").agg(pl.len().alias("n")).filter(pl.col("n") > 1).head(1)
           .collect(engine="streaming"))
    if not dup.height:
        return
    first_id = dup["id"][0]
    where = []
    for s in stats:
        if s["ids_path"]:
            lines = pl.scan_parquet(s["ids_path"]).filter(pl.col("id") == first_id).select("line").collect()["line"]
            where += [f"{s['rows']['path']}:{line}" for line in lines.to_list()]
    raise DataError(f"duplicate id {first_id!r} at {where[0]} and {where[1]}"
                    + (f" (+{len(where) - 2} more)" if len(where) > 2 else ""),
                    hint="ids must be unique across all files of a dataset (derived ids: pass --id-field)")


def finish_inputs(p: AuditParams, plan: Plan, stats: list[dict[str, Any]], log: Any = None) -> Inputs:
    """After every shard is loaded: one form across the sources, ids unique across shards, the training input
    report summarised over the shards (refused inputs raise :class:`InputValidationError`), the queries read,
    tokenised and validated, the data fingerprint combined from the shards' sums, the audit id; then the audit
    directory's shard manifest (``shards.json``), validation reports and ids files."""
    from tasks.inputs.checks import summarise_shard_reports, validate_query_frame

    stats = sorted(stats, key=lambda s: s["index"])
    loaded = [s for s in stats if s["n_docs"]]
    if not loaded:
        shown = ", ".join(sorted({s["rows"]["path"] for s in stats})[:3]) or ", ".join(map(str, p.train))
        raise DataError(f"{shown}: no rows", hint="the dataset is empty")
    check_same_form((s["rows"]["path"], tuple(s["form"])) for s in loaded)
    _check_unique_ids(loaded)
    train_report = summarise_shard_reports([(s["label"], s["validation"]) for s in loaded])
    eng = plan.spec.engine.engine()
    reports = {"training_input": train_report}
    queries, qdocs, q_unk = None, [], 0
    if p.queries:  # a quality audit has none
        queries = read_rows(p.queries, "queries")
        qdocs = encode_frame(eng, queries, "queries")
        unk = getattr(eng.tokenizer, "unk_token_id", None)
        q_unk = sum(e.input_ids.count(unk) for e in qdocs) if unk is not None else 0
        queries = queries.with_columns(pl.Series("n_tokens", [e.n_tokens_original for e in qdocs], dtype=pl.Int64))
        reports["query_input"] = validate_query_frame(queries, max_length=p.max_length, truncate=plan.spec.truncate)
    as_json = {k: r.to_json() for k, r in reports.items()}
    as_json["training_input"]["n_shards"] = len(loaded)
    failed = [r for r in reports.values() if not r.success]
    if failed:
        raise InputValidationError("input validation failed:\n" + "\n".join(r.summary() for r in failed), as_json)
    data_fp = fingerprint_from_sums((s["n_docs"], int(s["fingerprint_sum"], 16)) for s in loaded)
    query_fp = data_fingerprint(queries) if queries is not None else ""
    audit_id = stable_key(p.identity() | {"model_fingerprint": eng.fingerprint, "data": data_fp}
                          | ({"queries": query_fp} if queries is not None else {}), length=12)
    adir = audit_dir(resolve_home(p.output_dir), audit_id)
    for name, rep in as_json.items():
        write_json_atomic(adir / "validation" / f"{name}.json", rep)
    shards = []
    for i, s in enumerate(loaded):
        ids_path = adir / "inputs" / f"ids-{i:05d}-{s['key']}.parquet"
        if not ids_path.exists():
            _link_or_copy(Path(s["ids_path"]), ids_path)
        rows = RowRange(**(s["rows"] | {"stamp": tuple(s["rows"]["stamp"])}))
        shards.append(Shard(i, rows, s["key"], s["n_docs"], plan.spec.fields, str(ids_path)))
    write_json_atomic(adir / "shards.json", {"sources": plan.sources, "shards": [sh.to_json() for sh in shards],
                                             "stats": [{k: s[k] for k in ("label", "n_docs", "n_tokens", "n_truncated",
                                                                          "n_unknown_tokens", "key")} for s in loaded]})
    queries_all = adir / "inputs" / "queries-all.parquet"
    if queries is not None and not queries_all.exists():
        write_parquet_atomic(queries, queries_all)
    n_docs = sum(s["n_docs"] for s in loaded)
    n_tokens = sum(s["n_tokens"] for s in loaded)
    n_truncated = sum(s["n_truncated"] for s in loaded)
    n_unk = sum(s["n_unknown_tokens"] for s in loaded)
    if log is not None:
        log.info(f"audit {audit_id}: {n_docs} documents in {len(shards)} shards of {len(plan.sources)} sources, "
                 f"{n_tokens} tokens ({n_truncated} truncated)"
                 + (f", {queries.height} queries available" if queries is not None else ""))
        q_tokens = sum(len(e.input_ids) for e in qdocs)
        for what, unk_count, total in (("training", n_unk, n_tokens), ("query", q_unk, q_tokens)):
            if unk_count:
                log.warning(f"{unk_count} of {total} {what} tokens ({unk_count / max(total, 1):.1%}) are the "
                            f"tokenizer's unknown token {eng.tokenizer.unk_token!r}: its vocabulary does not cover "
                            f"this text")
    return Inputs(audit_id, str(adir), plan.spec.engine.model_dir, eng.fingerprint, data_fp, query_fp, shards,
                  n_docs, n_tokens, n_truncated, str(queries_all) if queries is not None else "",
                  queries.height if queries is not None else 0, as_json, n_unk)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def load_inputs(p: AuditParams, log: Any = None) -> Inputs:
    """The first stage in one process (plan, every shard in turn, finish): what the flow maps, for callers
    without Prefect."""
    plan = plan_inputs(p)
    return finish_inputs(p, plan, [load_shard(plan.spec, i, r) for i, r in enumerate(plan.ranges)], log)


def shard_ids(inputs: Inputs, columns: Sequence[str] = ("id",)) -> pl.LazyFrame:
    """The training documents' ids (and content hashes, lines) from the shards' ids files, lazily."""
    return pl.scan_parquet([s.ids_path for s in inputs.shards]).select(list(columns))


def sample_query_file(p: AuditParams, inputs: Inputs) -> str:
    """Seeded random or stratified sample of the query source, written beside the audit."""
    path = Path(inputs.audit_dir) / "queries.parquet"
    if not path.exists():
        df = pl.read_parquet(inputs.queries_path)
        picked = sample_queries(df, p.n_queries, seed=p.seed,
                                stratify_by=p.stratify_by if p.sampling == "stratified" else None)
        write_parquet_atomic(picked, path)
    return str(path)


def shards_of(audit_dir: str | os.PathLike[str]) -> list[Shard]:
    """An audit's shards, from its manifest (``shards.json``); none when it has no manifest."""
    path = Path(audit_dir) / "shards.json"
    if not path.exists():
        return []
    return [Shard.from_json(raw) for raw in json.loads(path.read_text())["shards"]]


def documents_by_id(shards: Sequence[Shard], wanted: set[str]) -> dict[str, dict[str, Any]]:
    """The rows of the ``wanted`` documents, read through the shards: their ids files say which shards hold them,
    and only those shards are read (each checked against its content key)."""
    out: dict[str, dict[str, Any]] = {}
    for shard in shards:
        ids = pl.read_parquet(shard.ids_path, columns=["id"])["id"] if shard.ids_path else None
        if ids is not None and not ids.is_in(list(wanted)).any():
            continue
        rows = read_shard(shard).filter(pl.col("id").is_in(list(wanted)))
        out |= {r["id"]: r for r in rows.to_dicts()}
    return out
