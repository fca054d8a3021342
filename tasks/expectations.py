"""The Great Expectations machinery the suites share: one ephemeral context per process (imported on first use,
progress bars off, behind a lock), named checks, and :class:`ValidationReport`.

The suites themselves live with what they guard: ``influence_audit.training_input`` and
``influence_audit.query_input`` in :mod:`tasks.inputs.checks`, ``influence_audit.candidates`` in
:mod:`tasks.influence.checks`, ``influence_audit.quality_report`` in :mod:`tasks.quality.checks`. Each is a list of
real GE expectations run on an in-memory pandas frame; checks that need a per-query view run on helper columns
computed with polars first, so every check is still a named GE expectation in the report.
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


__all__ = ["Check", "GEContext", "ValidationReport", "exists", "ge_context", "id_list", "membership", "run_suite"]


FLOAT_MAX = 1.7976931348623157e308


INTEGER_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                   "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64"]


NUMBER_DTYPES = [*INTEGER_DTYPES, "float16", "float32", "float64", "Float32", "Float64"]


_SHOWN_VALUES = 5


# GE serialises an expectation's kwargs (value_set included) many times per validation, so
# ExpectColumnValuesToBeInSet costs O(calls x len(value_set)): ~25 s for 200k ids. Above this size the
# membership check runs on a helper column instead (the id when unknown, else null; expected null).
IN_SET_LIMIT = 10_000


_OBSERVED_KEYS = ("element_count", "unexpected_count", "unexpected_percent", "missing_count",
                  "observed_value")


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
        if obs.get("unexpected_rows"):
            text += f" at {', '.join(obs['unexpected_rows'])}"
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


class GEContext:
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


_STATE: GEContext | None = None


def ge_context() -> GEContext:
    global _STATE
    with _LOCK:
        if _STATE is None:
            _STATE = GEContext()
        return _STATE


@dataclass
class Check:
    name: str
    expectation: Any
    why: str = ""
    informational: bool = False
    warning: bool = False  # GE severity "warning": reported, never fails the suite


def run_suite(suite_name: str, frame: pd.DataFrame, checks: list[Check]) -> ValidationReport:
    ge = ge_context()
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
        if raw.get("partial_unexpected_index_list"):
            observed["unexpected_index"] = _jsonable(list(raw["partial_unexpected_index_list"])[:_SHOWN_VALUES])
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


def to_polars(df: pl.DataFrame | pd.DataFrame) -> pl.DataFrame:
    if isinstance(df, pl.DataFrame):
        return df
    return pl.from_pandas(df)


def exists(ge: GEContext, columns: Sequence[str]) -> list[Check]:
    return [Check(f"{c}_exists", ge.gxe.ExpectColumnToExist(column=c), f"column {c!r} is required")
            for c in columns]


def non_empty_strings(ge: GEContext, column: str, present: set[str]) -> list[Check]:
    if column not in present:
        return []
    gxe = ge.gxe
    return [
        Check(f"{column}_not_null", gxe.ExpectColumnValuesToNotBeNull(column=column),
               f"every row needs {column}"),
        Check(f"{column}_is_string", gxe.ExpectColumnValuesToBeOfType(column=column, type_="str"),
               f"{column} must be a string"),
        Check(f"{column}_not_empty", gxe.ExpectColumnValuesToMatchRegex(column=column, regex=r"\S"),
               f"{column} must not be empty or whitespace only"),
    ]


def membership(ge: GEContext, column: str, ids: list[str], why: str) -> Check:
    """``column`` values must be among ``ids``: ExpectColumnValuesToBeInSet for small sets, else
    ExpectColumnValuesToBeNull on the helper column ``unknown_<column>`` (see IN_SET_LIMIT)."""
    if len(ids) > IN_SET_LIMIT:
        return Check(f"{column}_known", ge.gxe.ExpectColumnValuesToBeNull(column=f"unknown_{column}"), why)
    return Check(f"{column}_known", ge.gxe.ExpectColumnValuesToBeInSet(column=column, value_set=ids), why)


def id_list(ids: Sequence[str] | pl.Series) -> list[str]:
    if isinstance(ids, pl.Series):
        return ids.cast(pl.String).to_list()
    return [str(i) for i in ids]
