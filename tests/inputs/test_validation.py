"""The Great Expectations suites (tasks.inputs.checks, tasks.influence.checks) pass good frames and name what
fails."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import pandas as pd
import polars as pl
import pytest

from influence_engine.errors import DataError
from tasks import expectations as validation
from tasks.expectations import ValidationReport
from tasks.influence.checks import CANDIDATES_SUITE, validate_candidates
from tasks.inputs.checks import QUERY_SUITE, TRAINING_SUITE, validate_query_frame, validate_training_frame


@pytest.fixture(scope="module", autouse=True)
def ge_context() -> Iterator[object]:
    """Build GE's ephemeral context once for the module (importing GE takes seconds)."""
    yield validation.ge_context()


def failed_checks(report: ValidationReport) -> set[str]:
    return {r["check"] for r in report.failures()}


def assert_fails(report: ValidationReport, check: str, expectation: str, column: str) -> dict:
    assert not report.success
    entry = report.result(check)
    assert entry is not None and not entry["success"], report.summary()
    assert entry["expectation"] == expectation and entry["column"] == column
    assert f"{expectation}({column})" in report.summary()
    json.dumps(report.to_json(), allow_nan=False)
    return entry


def training(**overrides: list) -> pl.DataFrame:
    data = {"id": ["a", "b", "c"], "text": ["alpha", "beta", "gamma"], "n_tokens": [3, 5, 8]}
    data.update(overrides)
    return pl.DataFrame(data)


def query_frame(**overrides: list) -> pl.DataFrame:
    data = {"id": ["q1", "q2"], "prompt": ["Where?", "Who?"], "completion": ["Paris", "Ada"],
            "n_tokens": [4, 4]}
    data.update(overrides)
    return pl.DataFrame(data)


# ---------------------------------------------------------------------------------------- training input


def test_good_training_frame_passes() -> None:
    report = validate_training_frame(training(), max_length=16, truncate=False)
    assert report.success and report.suite == TRAINING_SUITE, report.summary()
    assert "passed" in report.summary()
    payload = report.to_json()
    json.dumps(payload, allow_nan=False)
    assert payload["n_failed"] == 0 and payload["n_expectations"] == len(report.results)
    assert {"check", "expectation", "column", "success", "observed"} <= set(report.results[0])
    report.raise_if_failed()


def test_good_prompt_completion_training_frame_and_pandas_input() -> None:
    df = query_frame().to_pandas()
    report = validate_training_frame(df, max_length=16, truncate=False)
    assert report.success, report.summary()
    assert report.result("prompt_not_empty") is not None and report.result("text_exists") is None


def test_duplicate_id() -> None:
    report = validate_training_frame(training(id=["a", "b", "a"]), max_length=16, truncate=False)
    entry = assert_fails(report, "id_unique", "expect_column_values_to_be_unique", "id")
    assert entry["observed"]["unexpected_count"] == 2
    assert entry["observed"]["unexpected_values"] == ["a", "a"]
    assert failed_checks(report) == {"id_unique"}
    with pytest.raises(DataError, match="expect_column_values_to_be_unique"):
        report.raise_if_failed()


def test_null_text() -> None:
    report = validate_training_frame(training(text=["x", None, "z"]), max_length=16, truncate=False)
    assert_fails(report, "text_not_null", "expect_column_values_to_not_be_null", "text")
    assert failed_checks(report) == {"text_not_null"}


def test_blank_text() -> None:
    report = validate_training_frame(training(text=["x", "", " \t "]), max_length=16, truncate=False)
    entry = assert_fails(report, "text_not_empty", "expect_column_values_to_match_regex", "text")
    assert entry["observed"]["unexpected_count"] == 2


def test_numeric_id() -> None:
    report = validate_training_frame(training(id=[1, 2, 3]), max_length=16, truncate=False)
    entry = assert_fails(report, "id_is_string", "expect_column_values_to_be_of_type", "id")
    assert entry["observed"]["observed_value"] == "int64"


def test_mixed_object_ids_from_pandas() -> None:
    df = training().to_pandas()
    df["id"] = pd.Series(["a", 2, "c"], dtype=object)
    entry = assert_fails(validate_training_frame(df, max_length=16, truncate=False), "id_is_string",
                         "expect_column_values_to_be_of_type", "id")
    assert entry["observed"]["unexpected_values"] == [2]


def test_too_many_tokens_fails_without_truncation() -> None:
    df = training(n_tokens=[3, 40, 17])
    report = validate_training_frame(df, max_length=16, truncate=False)
    entry = assert_fails(report, "n_tokens_in_range", "expect_column_values_to_be_between", "n_tokens")
    assert entry["observed"]["unexpected_count"] == 2
    assert sorted(entry["observed"]["unexpected_values"]) == [17, 40]


def test_too_many_tokens_is_counted_when_truncating() -> None:
    report = validate_training_frame(training(n_tokens=[3, 40, 17]), max_length=16, truncate=True)
    assert report.success, report.summary()
    over = report.result("tokens_over_max_length")
    assert over is not None and over["informational"] and over["success"]
    assert over["observed"]["unexpected_count"] == 2
    assert "note:" in report.summary()


def test_zero_tokens_fails_even_when_truncating() -> None:
    report = validate_training_frame(training(n_tokens=[3, 0, 5]), max_length=16, truncate=True)
    assert_fails(report, "n_tokens_in_range", "expect_column_values_to_be_between", "n_tokens")


def test_missing_and_non_integer_token_counts() -> None:
    report = validate_training_frame(training().drop("n_tokens"), max_length=16, truncate=False)
    assert_fails(report, "n_tokens_exists", "expect_column_to_exist", "n_tokens")
    report = validate_training_frame(training(n_tokens=[1.5, 2.0, 3.0]), max_length=16, truncate=False)
    assert_fails(report, "n_tokens_is_integer", "expect_column_values_to_be_in_type_list", "n_tokens")


def test_missing_text_column() -> None:
    report = validate_training_frame(training().drop("text"), max_length=16, truncate=False)
    assert failed_checks(report) == {"text_exists"}


# ------------------------------------------------------------------------------------------ query input


def test_good_query_frame_passes() -> None:
    report = validate_query_frame(query_frame(), max_length=8, truncate=False)
    assert report.success and report.suite == QUERY_SUITE, report.summary()


def test_empty_prompt() -> None:
    report = validate_query_frame(query_frame(prompt=["Where?", "   "]), max_length=8, truncate=False)
    assert_fails(report, "prompt_not_empty", "expect_column_values_to_match_regex", "prompt")
    assert failed_checks(report) == {"prompt_not_empty"}


def test_null_completion_and_missing_prompt() -> None:
    report = validate_query_frame(query_frame(completion=[None, "Ada"]), max_length=8, truncate=False)
    assert_fails(report, "completion_not_null", "expect_column_values_to_not_be_null", "completion")
    report = validate_query_frame(query_frame().drop("prompt"), max_length=8, truncate=False)
    assert_fails(report, "prompt_exists", "expect_column_to_exist", "prompt")


def test_query_too_long() -> None:
    report = validate_query_frame(query_frame(n_tokens=[4, 9]), max_length=8, truncate=False)
    assert_fails(report, "n_tokens_in_range", "expect_column_values_to_be_between", "n_tokens")


# ---------------------------------------------------------------------------------------------- candidates

TRAIN_IDS = ["t1", "t2", "t3", "t4", "t5"]
QUERY_IDS = ["q1", "q2"]


def candidates(k: int = 3, **overrides: list) -> pl.DataFrame:
    data: dict[str, list] = {
        "query_id": [q for q in QUERY_IDS for _ in range(k)],
        "train_id": [TRAIN_IDS[(i + j) % 5] for i in range(len(QUERY_IDS)) for j in range(k)],
        "score": [float(10 - j) for _ in QUERY_IDS for j in range(k)],
        "rank": [j + 1 for _ in QUERY_IDS for j in range(k)],
    }
    data.update(overrides)
    return pl.DataFrame(data)


def check(cands: pl.DataFrame | pd.DataFrame, k: int = 3, **kwargs: object) -> ValidationReport:
    args: dict = {"train_ids": TRAIN_IDS, "query_ids": QUERY_IDS, "k": k}
    args.update(kwargs)
    return validate_candidates(cands, **args)


@pytest.mark.parametrize("k,rows", [(3, 3), (5, 5), (0, 5), (9, 5)])
def test_good_candidates_pass(k: int, rows: int) -> None:
    report = check(candidates(rows), k=k)
    assert report.success and report.suite == CANDIDATES_SUITE, report.summary()


def test_good_candidates_from_pandas_and_series_ids() -> None:
    report = check(candidates().to_pandas(), train_ids=pl.Series(TRAIN_IDS), query_ids=pl.Series(QUERY_IDS))
    assert report.success, report.summary()


def test_nan_score() -> None:
    report = check(candidates(score=[3.0, math.nan, 1.0, 3.0, 2.0, 1.0]))
    assert_fails(report, "score_not_null", "expect_column_values_to_not_be_null", "score")
    assert failed_checks(report) == {"score_not_null"}


@pytest.mark.parametrize("bad", [math.inf, -math.inf])
def test_infinite_score(bad: float) -> None:
    report = check(candidates(score=[3.0, 2.0, bad, 3.0, 2.0, 1.0]))
    entry = assert_fails(report, "score_finite", "expect_column_values_to_be_between", "score")
    assert entry["observed"]["unexpected_values"] == [str(bad)]
    assert failed_checks(report) == {"score_finite"}


def test_rank_gap() -> None:
    df = candidates(rank=[1, 2, 3, 1, 3, 4], score=[3.0, 2.0, 1.0, 3.0, 2.0, 1.0])
    report = check(df, k=4, train_ids=TRAIN_IDS)
    entry = assert_fails(report, "ranks_contiguous", "expect_column_pair_values_to_be_equal",
                         "rank, expected_rank")
    assert entry["observed"]["unexpected_count"] == 2
    assert "rank_in_range" not in failed_checks(report)


def test_rank_out_of_range_and_duplicate_rank() -> None:
    report = check(candidates(rank=[1, 2, 4, 1, 2, 3]))
    assert_fails(report, "rank_in_range", "expect_column_values_to_be_between", "rank")
    report = check(candidates(rank=[1, 2, 2, 1, 2, 3]))
    assert_fails(report, "query_rank_unique", "expect_compound_columns_to_be_unique", "query_id, rank")


def test_wrong_row_count_per_query() -> None:
    df = candidates().filter(~((pl.col("query_id") == "q2") & (pl.col("rank") == 3)))
    report = check(df)
    entry = assert_fails(report, "rows_per_query", "expect_column_values_to_be_between", "rows_for_query")
    assert entry["observed"]["unexpected_values"] == [2, 2]
    assert failed_checks(report) == {"rows_per_query"}


def test_missing_query() -> None:
    report = check(candidates().filter(pl.col("query_id") == "q1"))
    assert_fails(report, "every_query_present", "expect_column_unique_value_count_to_be_between", "query_id")


def test_unknown_train_id() -> None:
    df = candidates(train_id=["t1", "t2", "zz", "t2", "t3", "t4"])
    entry = assert_fails(check(df), "train_id_known", "expect_column_values_to_be_in_set", "train_id")
    assert entry["observed"]["unexpected_values"] == ["zz"]


def test_unknown_train_id_with_a_large_id_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validation, "IN_SET_LIMIT", 2)
    df = candidates(train_id=["t1", "t2", "zz", "t2", "t3", "t4"])
    entry = assert_fails(check(df), "train_id_known", "expect_column_values_to_be_null", "unknown_train_id")
    assert entry["observed"]["unexpected_values"] == ["zz"]
    assert check(candidates()).success


def test_unknown_query_id() -> None:
    df = candidates(query_id=["q1", "q1", "q1", "q9", "q9", "q9"])
    report = check(df)
    entry = assert_fails(report, "query_id_known", "expect_column_values_to_be_in_set", "query_id")
    assert entry["observed"]["unexpected_count"] == 3


def test_duplicate_pair() -> None:
    df = candidates(train_id=["t1", "t2", "t1", "t2", "t3", "t4"])
    report = check(df)
    assert_fails(report, "pair_unique", "expect_compound_columns_to_be_unique", "query_id, train_id")
    assert failed_checks(report) == {"pair_unique"}


def test_missing_column_and_bad_arguments() -> None:
    report = check(candidates().drop("rank"))
    assert_fails(report, "rank_exists", "expect_column_to_exist", "rank")
    with pytest.raises(ValueError):
        check(candidates(), k=-1)


def test_summary_lists_every_failure() -> None:
    df = candidates(score=[math.nan, 2.0, 1.0, 3.0, 2.0, 1.0], train_id=["t1", "t2", "zz", "t2", "t2", "t4"])
    summary = check(df).summary()
    lines = [line.strip() for line in summary.splitlines()]
    assert lines[0].startswith(f"{CANDIDATES_SUITE}: FAILED, 3 of ")
    assert any(ln.startswith("expect_column_values_to_not_be_null(score): 1 unexpected") for ln in lines)
    assert any(ln.startswith("expect_column_values_to_be_in_set(train_id): 1 unexpected values: ['zz']")
               for ln in lines)
    assert any(ln.startswith("expect_compound_columns_to_be_unique(query_id, train_id)") for ln in lines)
