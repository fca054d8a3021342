"""Two runs of one audit on different runners agree on ids and ranks, scores within a stated tolerance: the
comparison itself must catch a changed document, a score beyond the tolerance, and allow a tie to swap."""

from __future__ import annotations

import json

import polars as pl

from tasks.influence.candidates import RUNNER_TOLERANCE, compare_candidates


def _table(scores: dict[str, float], layer: float = 1.0) -> pl.DataFrame:
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])
    return pl.DataFrame({"query_id": ["q"] * len(ranked), "train_id": [t for t, _ in ranked],
                         "score": [s for _, s in ranked], "rank": list(range(1, len(ranked) + 1)),
                         "layer_scores": [json.dumps({"h.0": s * layer}) for _, s in ranked],
                         "token_scores": [[s / 2, s / 2] for _, s in ranked]})


def test_last_bit_differences_pass_and_real_ones_fail():
    a = _table({"d1": 10.0, "d2": 5.0, "d3": 1.0})
    tiny = 10.0 * RUNNER_TOLERANCE["fp32"] / 10
    assert compare_candidates(a, _table({"d1": 10.0 + tiny, "d2": 5.0, "d3": 1.0 - tiny})) == []
    big = 10.0 * RUNNER_TOLERANCE["fp32"] * 10
    assert "score" in compare_candidates(a, _table({"d1": 10.0 + big, "d2": 5.0, "d3": 1.0}))[0]
    assert "not a tie" in compare_candidates(a, _table({"d1": 10.0, "d4": 5.0, "d3": 1.0}))[0]
    assert "layer_scores" in compare_candidates(a, _table({"d1": 10.0, "d2": 5.0, "d3": 1.0}, layer=1.1))[0]
    assert compare_candidates(a, a.head(2)) == ["3 candidates against 2"]


def test_fp64_is_held_tighter_than_fp32():
    a = _table({"d1": 10.0, "d2": 5.0})
    b = _table({"d1": 10.0 + 1e-6, "d2": 5.0})
    assert compare_candidates(a, b, "fp32") == [] and compare_candidates(a, b, "fp64") != []


def test_a_tie_within_tolerance_may_swap():
    a = _table({"d1": 10.0, "d2": 5.0, "d3": 5.0 - 1e-7})
    b = _table({"d1": 10.0, "d3": 5.0, "d2": 5.0 - 1e-7})
    assert compare_candidates(a, b) == []
