"""The Great Expectations suite ``influence_audit.candidates``: the top-k candidate list per query before it is
recorded (:func:`validate_candidates`; the machinery is :mod:`tasks.expectations`). Checks that need a per-query
view (rows per query, ranks without gaps) run on helper columns computed with polars first, so every check is
still a named GE expectation in the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import polars as pl

from tasks import expectations
from tasks.expectations import (
    FLOAT_MAX,
    INTEGER_DTYPES,
    NUMBER_DTYPES,
    Check,
    ValidationReport,
    exists,
    ge_context,
    id_list,
    membership,
    run_suite,
    to_polars,
)

if TYPE_CHECKING:
    import pandas as pd

CANDIDATES_SUITE = "influence_audit.candidates"


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
    ge = ge_context()
    gxe = ge.gxe
    train_list = id_list(train_ids)
    query_list = id_list(query_ids)
    n_train = len(set(train_list))
    n_queries = len(set(query_list))
    top = n_train if k == 0 else min(k, n_train)

    frame = to_polars(cands)
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
        if column in present and len(ids) > expectations.IN_SET_LIMIT:
            known = pl.col(column).cast(pl.String).is_in(pl.Series(ids, dtype=pl.String))
            helpers.append(pl.when(known.not_()).then(pl.col(column)).alias(f"unknown_{column}"))
    frame = frame.with_columns(helpers)
    pdf = frame.to_pandas()
    cols = set(frame.columns)

    checks = exists(ge, wanted)
    for column in ("query_id", "train_id"):
        if column in cols:
            checks.append(Check(f"{column}_not_null", gxe.ExpectColumnValuesToNotBeNull(column=column),
                                 f"every candidate needs a {column}"))
    if "score" in cols:
        checks += [
            Check("score_not_null", gxe.ExpectColumnValuesToNotBeNull(column="score"),
                   "scores must not be null or NaN"),
            Check("score_is_number",
                   gxe.ExpectColumnValuesToBeInTypeList(column="score", type_list=NUMBER_DTYPES),
                   "score must be a numeric column"),
            Check("score_finite", gxe.ExpectColumnValuesToBeBetween(column="score", min_value=-FLOAT_MAX,
                                                                       max_value=FLOAT_MAX),
                   "scores must be finite (no Inf)"),
        ]
    if "rank" in cols:
        checks += [
            Check("rank_not_null", gxe.ExpectColumnValuesToNotBeNull(column="rank"),
                   "every row needs a rank"),
            Check("rank_is_integer",
                   gxe.ExpectColumnValuesToBeInTypeList(column="rank", type_list=INTEGER_DTYPES),
                   "rank must be an integer column"),
            Check("rank_in_range", gxe.ExpectColumnValuesToBeBetween(column="rank", min_value=1,
                                                                        max_value=max(top, 1)),
                   f"ranks must lie in 1..{top}"),
        ]
    if {"query_id", "rank"} <= cols:
        checks.append(Check("query_rank_unique",
                             gxe.ExpectCompoundColumnsToBeUnique(column_list=["query_id", "rank"]),
                             "each rank appears once per query"))
    if "expected_rank" in cols:
        checks.append(Check("ranks_contiguous",
                             gxe.ExpectColumnPairValuesToBeEqual(column_A="rank", column_B="expected_rank"),
                             "ranks must run 1, 2, 3, ... per query without gaps"))
    if "rows_for_query" in cols:
        checks.append(Check("rows_per_query",
                             gxe.ExpectColumnValuesToBeBetween(column="rows_for_query", min_value=top,
                                                               max_value=top),
                             f"each query needs exactly {top} candidates"))
    if "query_id" in cols:
        checks += [
            membership(ge, "query_id", query_list, "query ids must be among the queries"),
            Check("every_query_present",
                   gxe.ExpectColumnUniqueValueCountToBeBetween(column="query_id", min_value=n_queries,
                                                               max_value=n_queries),
                   f"all {n_queries} queries need candidates"),
        ]
    if "train_id" in cols:
        checks.append(membership(ge, "train_id", train_list,
                                  "train ids must be among the training documents"))
    if {"query_id", "train_id"} <= cols:
        checks.append(Check("pair_unique",
                             gxe.ExpectCompoundColumnsToBeUnique(column_list=["query_id", "train_id"]),
                             "a training document appears once per query"))
    if check_verified and "verified_top10" in cols:
        checks.append(Check("verified_above_random",
                             gxe.ExpectColumnMeanToBeBetween(column="verified_top10", min_value=verified_baseline,
                                                             strict_min=True),
                             f"more top-10 candidates verified than random documents ({verified_baseline:.2f})",
                             warning=True))
    return run_suite(CANDIDATES_SUITE, pdf, checks)
