"""The Great Expectations suites guarding an audit's inputs (the machinery is :mod:`tasks.expectations`):

* ``influence_audit.training_input``: tokenised training documents (:func:`validate_training_frame`), run per
  shard and summarised across shards (:func:`summarise_shard_reports`);
* ``influence_audit.query_input``: tokenised queries (:func:`validate_query_frame`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import polars as pl

from tasks.expectations import INTEGER_DTYPES, Check, ValidationReport, exists, ge_context, non_empty_strings, run_suite

if TYPE_CHECKING:
    import pandas as pd

TRAINING_SUITE = "influence_audit.training_input"


QUERY_SUITE = "influence_audit.query_input"


def _validate_documents(df: pl.DataFrame | pd.DataFrame, suite: str, content: tuple[str, ...], *,
                        max_length: int, truncate: bool, sources: Sequence[str] | None = None) -> ValidationReport:
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, not {max_length}")
    ge = ge_context()
    gxe = ge.gxe
    wanted = ["id", *content, "n_tokens"]
    present = set(map(str, df.columns))
    keep = [c for c in wanted if c in present]
    pdf = df.select(keep).to_pandas() if isinstance(df, pl.DataFrame) else df[keep].copy()
    checks = exists(ge, wanted)
    if "id" in present:
        checks += non_empty_strings(ge, "id", present)
        checks.append(Check("id_unique", gxe.ExpectColumnValuesToBeUnique(column="id"),
                             "ids must be unique"))
    for column in content:
        if column == "messages":  # chat rows: their structure is checked when read (tasks.data)
            if column in present:
                checks.append(Check("messages_not_null", gxe.ExpectColumnValuesToNotBeNull(column=column),
                                     "every row needs its messages"))
            continue
        checks += non_empty_strings(ge, column, present)
    if "n_tokens" in present:
        upper = None if truncate else max_length
        checks += [
            Check("n_tokens_not_null", gxe.ExpectColumnValuesToNotBeNull(column="n_tokens"),
                   "every row needs a token count"),
            Check("n_tokens_is_integer",
                   gxe.ExpectColumnValuesToBeInTypeList(column="n_tokens", type_list=INTEGER_DTYPES),
                   "n_tokens must be an integer column"),
            Check("n_tokens_in_range",
                   gxe.ExpectColumnValuesToBeBetween(column="n_tokens", min_value=1, max_value=upper),
                   "documents need at least 1 token (longer ones are truncated)" if truncate
                   else f"documents need 1..{max_length} tokens (or truncate)"),
            Check("tokens_over_max_length",
                   gxe.ExpectColumnValuesToBeBetween(column="n_tokens", max_value=max_length, mostly=0.0),
                   f"rows over max_length={max_length}" + (", truncated" if truncate else ""),
                   informational=True),
        ]
    report = run_suite(suite, pdf, checks)
    for r in report.results:  # the rows GE found, named as the reader names them (file:line)
        index = r["observed"].pop("unexpected_index", None)
        if sources is not None and index:
            r["observed"]["unexpected_rows"] = [str(sources[int(i)]) for i in index if str(i).isdigit()]
    return report


def validate_training_frame(df: pl.DataFrame | pd.DataFrame, *, max_length: int,
                            truncate: bool, sources: Sequence[str] | None = None) -> ValidationReport:
    """Run the ``influence_audit.training_input`` suite on tokenised training documents.

    ``df`` has ``id``, ``text`` (or ``prompt`` and ``completion``) and ``n_tokens`` (token count before
    truncation). Expectations: the columns exist; ``id`` not null, unique, a string and not blank; the
    content columns not null, strings and not blank; ``n_tokens`` not null, an integer column, and between
    1 and ``max_length`` (only ``>= 1`` when ``truncate``). The informational check
    ``tokens_over_max_length`` always passes and reports in ``observed["unexpected_count"]`` how many rows
    exceed ``max_length`` (the rows that truncation shortens). Chat rows (``messages``) are checked not null
    (their structure is checked when read). With ``sources`` (each row's ``file:line``), failed expectations name
    the rows they found (``observed["unexpected_rows"]``).
    """
    columns = set(map(str, df.columns))
    pair = {"prompt", "completion"} & columns
    if "messages" in columns and not pair and "text" not in columns:
        content: tuple[str, ...] = ("messages",)
    else:
        content = ("prompt", "completion") if pair and "text" not in columns else ("text",)
    return _validate_documents(df, TRAINING_SUITE, content, max_length=max_length, truncate=truncate,
                               sources=sources)


def validate_query_frame(df: pl.DataFrame | pd.DataFrame, *, max_length: int,
                         truncate: bool) -> ValidationReport:
    """Run the ``influence_audit.query_input`` suite on tokenised queries.

    Like :func:`validate_training_frame` with ``prompt`` and ``completion`` (both required, non-empty
    strings) instead of ``text``.
    """
    columns = set(map(str, df.columns))
    content = ("messages",) if "messages" in columns and "prompt" not in columns else ("prompt", "completion")
    return _validate_documents(df, QUERY_SUITE, content, max_length=max_length, truncate=truncate)


def summarise_shard_reports(reports: Sequence[tuple[str, dict[str, Any]]]) -> ValidationReport:
    """One training-input report from the per-shard reports (``(shard label, report JSON)`` pairs): each
    expectation once, its counts summed over the shards, and for a failed one the shards and rows it failed at
    (``observed["failed_in"]``: shard, rows, values)."""
    merged: dict[str, dict[str, Any]] = {}
    for label, rep in reports:
        for r in rep["results"]:
            entry = merged.setdefault(r["check"], {k: r[k] for k in ("check", "expectation", "column", "informational",
                                                                      "why")} | {"success": True, "observed": {}})
            obs, got = entry["observed"], r["observed"]
            for key in ("element_count", "unexpected_count", "missing_count"):
                if got.get(key) is not None:
                    obs[key] = obs.get(key, 0) + int(got[key])
            if "error" in got:
                obs.setdefault("error", got["error"])
            if not r["success"]:
                entry["success"] = False
                obs.setdefault("failed_in", []).append({"shard": label, "rows": got.get("unexpected_rows", []),
                                                        "values": got.get("unexpected_values", [])})
                obs.setdefault("unexpected_values", got.get("unexpected_values", []))
                obs.setdefault("unexpected_rows", got.get("unexpected_rows", []))
    results = list(merged.values())
    return ValidationReport(TRAINING_SUITE, all(r["success"] for r in results), results)
