"""The Great Expectations suite ``influence_audit.quality_report``: the quality audit's report before it is recorded.

Same machinery as :mod:`tasks.inputs.checks` (one shared ephemeral context, named checks, a
:class:`~tasks.inputs.checks.ValidationReport`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import polars as pl

from tasks.expectations import (
    FLOAT_MAX,
    NUMBER_DTYPES,
    Check,
    ValidationReport,
    exists,
    ge_context,
    id_list,
    membership,
    run_suite,
)
from tasks.quality.signals import ISSUE_TYPES

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["QUALITY_SUITE", "validate_quality_report"]

QUALITY_SUITE = "influence_audit.quality_report"


def validate_quality_report(report: pl.DataFrame | pd.DataFrame, *,
                            train_ids: Sequence[str] | pl.Series) -> ValidationReport:
    """Run the ``influence_audit.quality_report`` suite.

    Expectations: the columns exist (``id``, ``self_influence``, ``loss``, ``<type>_score`` and ``<type>`` per
    issue type, ``reason``, ``duplicate_group``); ``id`` not null, unique, among ``train_ids`` and every training
    document present (row count); ``self_influence`` and ``loss`` not null, numeric, finite and non-negative
    (a preconditioned squared norm, an NLL; rounding may take a self-influence a hair below zero, so its lower
    bound is tested relative to the largest); every score not null, in [0, 1]; every flag not null and boolean;
    ``reason`` not null, and non-empty exactly when a flag is set (helper column ``reason_matches_flags``);
    every flagged ``near_duplicate`` belongs to a ``duplicate_group`` that is not itself (the group's kept document,
    its smallest id, is not flagged; members left out by ``max_flagged`` keep their group: helper column
    ``group_matches_flag``).
    """
    ge = ge_context()
    gxe = ge.gxe
    frame = report if isinstance(report, pl.DataFrame) else pl.from_pandas(report)
    ids = id_list(train_ids)
    flags = list(ISSUE_TYPES)
    wanted = ["id", "self_influence", "loss", *[c for t in flags for c in (f"{t}_score", t)], "reason",
              "duplicate_group"]
    present = set(frame.columns)
    frame = frame.select([c for c in wanted if c in present])
    helpers = []
    if {"reason", *flags} <= present:
        any_flag = pl.any_horizontal([pl.col(t).fill_null(False) for t in flags])
        has_reason = pl.col("reason").fill_null("").str.len_chars() > 0
        helpers.append((any_flag == has_reason).alias("reason_matches_flags"))
    if {"duplicate_group", "near_duplicate"} <= present:
        copy = pl.col("duplicate_group").is_not_null() & (pl.col("duplicate_group") != pl.col("id"))
        helpers.append((~pl.col("near_duplicate").fill_null(False) | copy.fill_null(False))
                       .alias("group_matches_flag"))
    frame = frame.with_columns(helpers)
    cols = set(frame.columns)
    pdf = frame.to_pandas()
    checks = exists(ge, wanted)
    if "id" in cols:
        checks += [Check("id_not_null", gxe.ExpectColumnValuesToNotBeNull(column="id"), "every row needs an id"),
                   Check("id_unique", gxe.ExpectColumnValuesToBeUnique(column="id"), "one row per document"),
                   membership(ge, "id", ids, "ids must be among the training documents"),
                   Check("every_document_present",
                          gxe.ExpectTableRowCountToEqual(value=len(set(ids))),
                          f"all {len(set(ids))} training documents need a row")]
    si_floor = 0.0
    if "self_influence" in cols and frame.height and frame["self_influence"].dtype.is_numeric():
        top = frame["self_influence"].abs().max()
        si_floor = -1e-6 * float(top) if top is not None and float(top) < FLOAT_MAX else 0.0
    for column, low in (("self_influence", si_floor), ("loss", 0.0)):
        if column in cols:
            checks += [
                Check(f"{column}_not_null", gxe.ExpectColumnValuesToNotBeNull(column=column),
                       f"{column} must not be null or NaN"),
                Check(f"{column}_is_number",
                       gxe.ExpectColumnValuesToBeInTypeList(column=column, type_list=NUMBER_DTYPES),
                       f"{column} must be numeric"),
                Check(f"{column}_finite_non_negative",
                       gxe.ExpectColumnValuesToBeBetween(column=column, min_value=low, max_value=FLOAT_MAX),
                       f"{column} must be finite and non-negative"),
            ]
    for t in flags:
        if f"{t}_score" in cols:
            checks += [Check(f"{t}_score_not_null", gxe.ExpectColumnValuesToNotBeNull(column=f"{t}_score"),
                              "every document needs a score"),
                       Check(f"{t}_score_in_unit_interval",
                              gxe.ExpectColumnValuesToBeBetween(column=f"{t}_score", min_value=0.0, max_value=1.0),
                              "scores lie in [0, 1]")]
        if t in cols:
            checks += [Check(f"{t}_not_null", gxe.ExpectColumnValuesToNotBeNull(column=t), "every flag is set"),
                       Check(f"{t}_is_boolean", gxe.ExpectColumnValuesToBeInTypeList(column=t, type_list=["bool"]),
                              "flags are booleans")]
    if "reason" in cols:
        checks.append(Check("reason_not_null", gxe.ExpectColumnValuesToNotBeNull(column="reason"),
                             "reason is a string (empty when nothing is flagged)"))
    for helper, why in (("reason_matches_flags", "a flagged document says why; an unflagged one has no reason"),
                        ("group_matches_flag", "a flagged near duplicate is a copy in a duplicate group")):
        if helper in cols:
            checks.append(Check(helper, gxe.ExpectColumnValuesToBeInSet(column=helper, value_set=[True]), why))
    return run_suite(QUALITY_SUITE, pdf, checks)
