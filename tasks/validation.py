"""Great Expectations suites guarding the pipeline's inputs and outputs.

Three suites, each a list of real GE expectations run on an in-memory pandas frame:

* ``influence_audit.training_input``: tokenised training documents (:func:`validate_training_frame`);
* ``influence_audit.query_input``: tokenised queries (:func:`validate_query_frame`);
* ``influence_audit.candidates``: the top-k candidate list per query (:func:`validate_candidates`).

Checks that need a per-query view (rows per query, ranks without gaps) run on helper columns computed with
polars before the frame goes to GE, so every check is still a named GE expectation in the report.

Great Expectations takes seconds to import, so it is imported on first use; its ephemeral context (progress
bars off) is built once per process and shared, behind a lock, by every validation.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import polars as pl

from influence_engine.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "CANDIDATES_SUITE",
    "QUERY_SUITE",
    "TRAINING_SUITE",
    "ValidationReport",
    "validate_candidates",
    "validate_query_frame",
    "validate_training_frame",
]

TRAINING_SUITE = "influence_audit.training_input"
QUERY_SUITE = "influence_audit.query_input"
CANDIDATES_SUITE = "influence_audit.candidates"

_FLOAT_MAX = 1.7976931348623157e308
_INTEGER_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                   "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64"]
_NUMBER_DTYPES = [*_INTEGER_DTYPES, "float16", "float32", "float64", "Float32", "Float64"]
_SHOWN_VALUES = 5
# GE serialises an expectation's kwargs (value_set included) many times per validation, so
# ExpectColumnValuesToBeInSet costs O(calls x len(value_set)): ~25 s for 200k ids. Above this size the
# membership check runs on a helper column instead (the id when unknown, else null; expected null).
IN_SET_LIMIT = 10_000
_OBSERVED_KEYS = ("element_count", "unexpected_count", "unexpected_percent", "missing_count",
                  "observed_value")


# ---------------------------------------------------------------------------------------------- the report


@dataclass
class ValidationReport:
    """Outcome of one suite: overall success and one entry per expectation.

    Each entry of ``results`` is a JSON-serialisable dict with ``check`` (our short name, e.g.
    ``"id_unique"``), ``expectation`` (the GE type, e.g. ``"expect_column_values_to_be_unique"``),
    ``column`` (the column, or columns joined by ``", "``), ``success``, ``informational`` (True for checks
    that only count, such as rows over the token limit when truncating) and ``observed`` (unexpected count,
    a few unexpected values, the observed value, or the error GE reported).
    """

    suite: str
    success: bool
    results: list[dict[str, Any]] = field(default_factory=list)

    def failures(self) -> list[dict[str, Any]]:
        """The entries of the expectations that failed (warnings excluded)."""
        return [r for r in self.results if not r["success"] and r.get("severity") != "warning"]

    def warnings(self) -> list[dict[str, Any]]:
        """The entries of warning-severity expectations that did not hold."""
        return [r for r in self.results if not r["success"] and r.get("severity") == "warning"]

    def result(self, check: str) -> dict[str, Any] | None:
        """The entry for one check by its short name (e.g. ``"tokens_over_max_length"``), or None."""
        return next((r for r in self.results if r["check"] == check), None)

    def summary(self) -> str:
        """A readable multi-line summary naming each failed expectation and its unexpected values."""
        failed = self.failures()
        if failed:
            head = f"{self.suite}: FAILED, {len(failed)} of {len(self.results)} expectations failed"
        else:
            warned = len(self.warnings())
            head = f"{self.suite}: passed ({len(self.results)} expectations" + \
                (f", {warned} warning{'s' if warned > 1 else ''})" if warned else ")")
        lines = [head]
        lines += [f"  {_describe(r)}" for r in failed]
        lines += [f"  warning: {_describe(r)}" for r in self.warnings()]
        for r in self.results:
            count = r["observed"].get("unexpected_count")
            if r["success"] and r.get("informational") and count:
                lines.append(f"  note: {_describe(r)}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (for ``mlflow.log_dict``)."""
        return {"suite": self.suite, "success": self.success,
                "n_expectations": len(self.results), "n_failed": len(self.failures()),
                "n_warnings": len(self.warnings()),
                "results": [dict(r) for r in self.results]}

    def raise_if_failed(self) -> None:
        """Raise :class:`DataError` carrying the summary when the suite failed."""
        if not self.success:
            failed = self.failures()
            raise DataError(f"{self.suite}: {len(failed)} expectation(s) failed: "
                            + "; ".join(_describe(r) for r in failed))


def _describe(entry: dict[str, Any]) -> str:
    name = f"{entry['expectation']}({entry['column'] or ''})"
    obs = entry["observed"]
    if "error" in obs:
        text = f"error: {obs['error']}"
    elif obs.get("unexpected_count") is not None:
        text = f"{obs['unexpected_count']} unexpected values: {obs.get('unexpected_values', [])}"
    elif "observed_value" in obs:
        text = f"observed {obs['observed_value']}"
    else:
        text = "failed" if not entry["success"] else "ok"
    why = entry.get("why")
    return f"{name}: {text}" + (f" ({why})" if why else "")


def _jsonable(value: Any) -> Any:
    """Turn GE / numpy / pandas values into plain JSON values (non-finite floats become strings)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        try:
            return _jsonable(item())
        except (TypeError, ValueError):
            pass
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return str(value)


def _exception_message(info: Any) -> str | None:
    """GE reports exceptions either flat or keyed by metric id: return the first message."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "exception")
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message") or "exception")
    return None


# -------------------------------------------------------------------------------------------------- the GE


class _GE:
    """Lazily imported GE modules and the shared ephemeral context's batch definition."""

    def __init__(self) -> None:
        import great_expectations as gx
        import great_expectations.expectations as gxe
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.gx = gx
        self.gxe = gxe
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        source = self.context.data_sources.add_pandas("influence_audit")
        asset = source.add_dataframe_asset("frame")
        self.batch_definition = asset.add_batch_definition_whole_dataframe("whole_frame")


_LOCK = threading.RLock()
_STATE: _GE | None = None


def _ge() -> _GE:
    global _STATE
    with _LOCK:
        if _STATE is None:
            _STATE = _GE()
        return _STATE


@dataclass
class _Check:
    name: str
    expectation: Any
    why: str = ""
    informational: bool = False
    warning: bool = False  # GE severity "warning": reported, never fails the suite


def _run(suite_name: str, frame: pd.DataFrame, checks: list[_Check]) -> ValidationReport:
    ge = _ge()
    by_name = {c.name: c for c in checks}
    for check in checks:
        check.expectation.meta = {"check": check.name}
        if check.warning:
            check.expectation.severity = "warning"
    suite = ge.gx.ExpectationSuite(name=suite_name, expectations=[c.expectation for c in checks])
    with _LOCK:
        batch = ge.batch_definition.get_batch(batch_parameters={"dataframe": frame})
        outcome = batch.validate(suite)
    results: list[dict[str, Any]] = []
    for res in outcome.results:
        config = res.expectation_config
        check = by_name.get((config.meta or {}).get("check", ""))
        kwargs = config.kwargs
        if "column" in kwargs:
            column = str(kwargs["column"])
        elif "column_list" in kwargs:
            column = ", ".join(map(str, kwargs["column_list"]))
        elif "column_A" in kwargs:
            column = f"{kwargs['column_A']}, {kwargs['column_B']}"
        else:
            column = None
        raw = res.result or {}
        observed: dict[str, Any] = {k: _jsonable(raw[k]) for k in _OBSERVED_KEYS if k in raw}
        if "partial_unexpected_list" in raw:
            observed["unexpected_values"] = _jsonable(list(raw["partial_unexpected_list"])[:_SHOWN_VALUES])
        error = _exception_message(res.exception_info)
        if error:
            observed["error"] = error.splitlines()[0][:300]
        results.append({
            "check": check.name if check else config.type,
            "expectation": config.type,
            "column": column,
            "success": bool(res.success),
            "informational": bool(check and check.informational),
            "severity": str(getattr(config, "severity", None) or "critical").split(".")[-1].lower(),
            "why": check.why if check else "",
            "observed": observed,
        })
    order = {c.name: i for i, c in enumerate(checks)}
    results.sort(key=lambda r: order.get(r["check"], len(order)))
    success = all(r["success"] or r["severity"] == "warning" for r in results)
    return ValidationReport(suite=suite_name, success=success, results=results)


def _to_polars(df: pl.DataFrame | pd.DataFrame) -> pl.DataFrame:
    if isinstance(df, pl.DataFrame):
        return df
    return pl.from_pandas(df)


def _exists(ge: _GE, columns: Sequence[str]) -> list[_Check]:
    return [_Check(f"{c}_exists", ge.gxe.ExpectColumnToExist(column=c), f"column {c!r} is required")
            for c in columns]


def _non_empty_strings(ge: _GE, column: str, present: set[str]) -> list[_Check]:
    if column not in present:
        return []
    gxe = ge.gxe
    return [
        _Check(f"{column}_not_null", gxe.ExpectColumnValuesToNotBeNull(column=column),
               f"every row needs {column}"),
        _Check(f"{column}_is_string", gxe.ExpectColumnValuesToBeOfType(column=column, type_="str"),
               f"{column} must be a string"),
        _Check(f"{column}_not_empty", gxe.ExpectColumnValuesToMatchRegex(column=column, regex=r"\S"),
               f"{column} must not be empty or whitespace only"),
    ]


# ------------------------------------------------------------------------------------------- input suites


def _validate_documents(df: pl.DataFrame | pd.DataFrame, suite: str, content: tuple[str, ...], *,
                        max_length: int, truncate: bool) -> ValidationReport:
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, not {max_length}")
    ge = _ge()
    gxe = ge.gxe
    wanted = ["id", *content, "n_tokens"]
    present = set(map(str, df.columns))
    keep = [c for c in wanted if c in present]
    pdf = df.select(keep).to_pandas() if isinstance(df, pl.DataFrame) else df[keep].copy()
    checks = _exists(ge, wanted)
    if "id" in present:
        checks += _non_empty_strings(ge, "id", present)
        checks.append(_Check("id_unique", gxe.ExpectColumnValuesToBeUnique(column="id"),
                             "ids must be unique"))
    for column in content:
        checks += _non_empty_strings(ge, column, present)
    if "n_tokens" in present:
        upper = None if truncate else max_length
        checks += [
            _Check("n_tokens_not_null", gxe.ExpectColumnValuesToNotBeNull(column="n_tokens"),
                   "every row needs a token count"),
            _Check("n_tokens_is_integer",
                   gxe.ExpectColumnValuesToBeInTypeList(column="n_tokens", type_list=_INTEGER_DTYPES),
                   "n_tokens must be an integer column"),
            _Check("n_tokens_in_range",
                   gxe.ExpectColumnValuesToBeBetween(column="n_tokens", min_value=1, max_value=upper),
                   "documents need at least 1 token (longer ones are truncated)" if truncate
                   else f"documents need 1..{max_length} tokens (or truncate)"),
            _Check("tokens_over_max_length",
                   gxe.ExpectColumnValuesToBeBetween(column="n_tokens", max_value=max_length, mostly=0.0),
                   f"rows over max_length={max_length}" + (", truncated" if truncate else ""),
                   informational=True),
        ]
    return _run(suite, pdf, checks)


def validate_training_frame(df: pl.DataFrame | pd.DataFrame, *, max_length: int,
                            truncate: bool) -> ValidationReport:
    """Run the ``influence_audit.training_input`` suite on tokenised training documents.

    ``df`` has ``id``, ``text`` (or ``prompt`` and ``completion``) and ``n_tokens`` (token count before
    truncation). Expectations: the columns exist; ``id`` not null, unique, a string and not blank; the
    content columns not null, strings and not blank; ``n_tokens`` not null, an integer column, and between
    1 and ``max_length`` (only ``>= 1`` when ``truncate``). The informational check
    ``tokens_over_max_length`` always passes and reports in ``observed["unexpected_count"]`` how many rows
    exceed ``max_length`` (the rows that truncation shortens).
    """
    columns = set(map(str, df.columns))
    pair = {"prompt", "completion"} & columns
    content = ("prompt", "completion") if pair and "text" not in columns else ("text",)
    return _validate_documents(df, TRAINING_SUITE, content, max_length=max_length, truncate=truncate)


def validate_query_frame(df: pl.DataFrame | pd.DataFrame, *, max_length: int,
                         truncate: bool) -> ValidationReport:
    """Run the ``influence_audit.query_input`` suite on tokenised queries.

    Like :func:`validate_training_frame` with ``prompt`` and ``completion`` (both required, non-empty
    strings) instead of ``text``.
    """
    return _validate_documents(df, QUERY_SUITE, ("prompt", "completion"), max_length=max_length,
                               truncate=truncate)


# ------------------------------------------------------------------------------------------ output suite


def validate_candidates(cands: pl.DataFrame | pd.DataFrame, *, train_ids: Sequence[str] | pl.Series,
                        query_ids: Sequence[str] | pl.Series, k: int,
                        verified_baseline: float | None = None) -> ValidationReport:
    """Run the ``influence_audit.candidates`` suite on a candidate list.

    ``cands`` has ``query_id``, ``train_id``, ``score`` and ``rank``; ``k`` is the requested number of
    candidates per query (0 = all training documents). With ``N`` distinct training ids and
    ``K = N if k == 0 else min(k, N)``, the expectations are: the columns exist; ids not null; ``score``
    not null (no NaN) and finite (no +-Inf); ``rank`` not null, integer and between 1 and ``K``;
    ``(query_id, rank)`` unique; ranks ``1..K`` per query without gaps (``rank`` equals the helper column
    ``expected_rank``, the ordinal position of the row's rank within its query); exactly ``K`` rows per query
    (helper column ``rows_for_query``); every query present; every ``train_id`` among ``train_ids`` and
    every ``query_id`` among ``query_ids``; ``(query_id, train_id)`` unique. With ``verified_baseline`` (the
    fraction of random documents verified) and a ``verified`` column: the fraction of verified top-10 candidates
    is above it, a *warning* (GE severity ``warning``): reported, never failing the suite.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0 (0 = all), not {k}")
    ge = _ge()
    gxe = ge.gxe
    train_list = _id_list(train_ids)
    query_list = _id_list(query_ids)
    n_train = len(set(train_list))
    n_queries = len(set(query_list))
    top = n_train if k == 0 else min(k, n_train)

    frame = _to_polars(cands)
    wanted = ["query_id", "train_id", "score", "rank"]
    present = set(frame.columns)
    check_verified = verified_baseline is not None and "verified" in present and "rank" in present
    if check_verified:  # 1.0 / 0.0 for the verified top-10 candidates, null for the rest
        frame = frame.with_columns(pl.when(pl.col("rank") <= 10).then(pl.col("verified").cast(pl.Float64))
                                   .alias("verified_top10"))
    frame = frame.select([c for c in [*wanted, "verified_top10"] if c in frame.columns])
    helpers: list[pl.Expr] = []
    if "query_id" in present:
        helpers.append(pl.len().over("query_id").cast(pl.Int64).alias("rows_for_query"))
        if "rank" in present and frame.schema["rank"].is_numeric():
            helpers.append(pl.col("rank").rank("ordinal").over("query_id").cast(pl.Int64)
                           .alias("expected_rank"))
    for column, ids in (("query_id", query_list), ("train_id", train_list)):
        if column in present and len(ids) > IN_SET_LIMIT:
            known = pl.col(column).cast(pl.String).is_in(pl.Series(ids, dtype=pl.String))
            helpers.append(pl.when(known.not_()).then(pl.col(column)).alias(f"unknown_{column}"))
    frame = frame.with_columns(helpers)
    pdf = frame.to_pandas()
    cols = set(frame.columns)

    checks = _exists(ge, wanted)
    for column in ("query_id", "train_id"):
        if column in cols:
            checks.append(_Check(f"{column}_not_null", gxe.ExpectColumnValuesToNotBeNull(column=column),
                                 f"every candidate needs a {column}"))
    if "score" in cols:
        checks += [
            _Check("score_not_null", gxe.ExpectColumnValuesToNotBeNull(column="score"),
                   "scores must not be null or NaN"),
            _Check("score_is_number",
                   gxe.ExpectColumnValuesToBeInTypeList(column="score", type_list=_NUMBER_DTYPES),
                   "score must be a numeric column"),
            _Check("score_finite", gxe.ExpectColumnValuesToBeBetween(column="score", min_value=-_FLOAT_MAX,
                                                                       max_value=_FLOAT_MAX),
                   "scores must be finite (no Inf)"),
        ]
    if "rank" in cols:
        checks += [
            _Check("rank_not_null", gxe.ExpectColumnValuesToNotBeNull(column="rank"),
                   "every row needs a rank"),
            _Check("rank_is_integer",
                   gxe.ExpectColumnValuesToBeInTypeList(column="rank", type_list=_INTEGER_DTYPES),
                   "rank must be an integer column"),
            _Check("rank_in_range", gxe.ExpectColumnValuesToBeBetween(column="rank", min_value=1,
                                                                        max_value=max(top, 1)),
                   f"ranks must lie in 1..{top}"),
        ]
    if {"query_id", "rank"} <= cols:
        checks.append(_Check("query_rank_unique",
                             gxe.ExpectCompoundColumnsToBeUnique(column_list=["query_id", "rank"]),
                             "each rank appears once per query"))
    if "expected_rank" in cols:
        checks.append(_Check("ranks_contiguous",
                             gxe.ExpectColumnPairValuesToBeEqual(column_A="rank", column_B="expected_rank"),
                             "ranks must run 1, 2, 3, ... per query without gaps"))
    if "rows_for_query" in cols:
        checks.append(_Check("rows_per_query",
                             gxe.ExpectColumnValuesToBeBetween(column="rows_for_query", min_value=top,
                                                               max_value=top),
                             f"each query needs exactly {top} candidates"))
    if "query_id" in cols:
        checks += [
            _membership(ge, "query_id", query_list, "query ids must be among the queries"),
            _Check("every_query_present",
                   gxe.ExpectColumnUniqueValueCountToBeBetween(column="query_id", min_value=n_queries,
                                                               max_value=n_queries),
                   f"all {n_queries} queries need candidates"),
        ]
    if "train_id" in cols:
        checks.append(_membership(ge, "train_id", train_list,
                                  "train ids must be among the training documents"))
    if {"query_id", "train_id"} <= cols:
        checks.append(_Check("pair_unique",
                             gxe.ExpectCompoundColumnsToBeUnique(column_list=["query_id", "train_id"]),
                             "a training document appears once per query"))
    if check_verified and "verified_top10" in cols:
        checks.append(_Check("verified_above_random",
                             gxe.ExpectColumnMeanToBeBetween(column="verified_top10", min_value=verified_baseline,
                                                             strict_min=True),
                             f"more top-10 candidates verified than random documents ({verified_baseline:.2f})",
                             warning=True))
    return _run(CANDIDATES_SUITE, pdf, checks)


def _membership(ge: _GE, column: str, ids: list[str], why: str) -> _Check:
    """``column`` values must be among ``ids``: ExpectColumnValuesToBeInSet for small sets, else
    ExpectColumnValuesToBeNull on the helper column ``unknown_<column>`` (see IN_SET_LIMIT)."""
    if len(ids) > IN_SET_LIMIT:
        return _Check(f"{column}_known", ge.gxe.ExpectColumnValuesToBeNull(column=f"unknown_{column}"), why)
    return _Check(f"{column}_known", ge.gxe.ExpectColumnValuesToBeInSet(column=column, value_set=ids), why)


def _id_list(ids: Sequence[str] | pl.Series) -> list[str]:
    if isinstance(ids, pl.Series):
        return ids.cast(pl.String).to_list()
    return [str(i) for i in ids]
