"""The quality report on a small crafted corpus (40 demo documents, one exact copy, one near copy, one gibberish
document): its schema and flags, the hot spots, GE refusing broken reports, the CLI's one-line errors and the
parameters of the flow's quality mode."""

from __future__ import annotations

import json
import random
import string

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from tasks.quality.signals import (
    HOT_SPOT_SCHEMA,
    ISSUE_TYPES,
    REPORT_SCHEMA,
    QualitySettings,
    build_report,
    duplicate_groups,
    quality_report,
    review_items,
    robust_z,
)

GIBBERISH_ID, COPY_ID, NEAR_ID = "junk-1", "copy-of-3", "near-of-7"


def _gibberish(seed: int = 0) -> str:
    r = random.Random(seed)
    words = ["".join(r.choice(string.ascii_lowercase) for _ in range(r.randint(3, 9))) for _ in range(24)]
    return " ".join(" ".join(words[i:i + 6]).capitalize() + "." for i in range(0, 24, 6))


@pytest.fixture(scope="module")
def crafted(demo_data, tmp_path_factory):
    """The crafted corpus, a demo model trained on it for a few epochs, and its report."""
    from influence_audit.demo.model import read_jsonl, train_demo_model
    from tasks.engine import EngineSpec

    rows = read_jsonl(demo_data / "corpus.jsonl")[:40]
    sents = rows[7]["text"].split(". ")
    near = ". ".join(sents[1:] + sents[:1]).rstrip(".") + "."  # sentences reordered
    rows += [{"id": COPY_ID, "text": rows[3]["text"]}, {"id": NEAR_ID, "text": near},
             {"id": GIBBERISH_ID, "text": _gibberish()}]
    d = tmp_path_factory.mktemp("crafted")
    path = d / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    model_dir = train_demo_model(path, d / "model", epochs=3, log=None)
    eng = EngineSpec(str(model_dir), "mlp", "cpu", "fp32", 16, 128, 0).engine()
    train = pl.DataFrame(rows)
    docs = eng.encode(rows, where="train")
    factors = eng.fit_factors(docs, "ekfac")
    report, hot = quality_report(eng, train, docs, factors, QualitySettings(hot_spots=4))
    return {"rows": rows, "path": path, "model": model_dir, "report": report, "hot": hot, "signals": eng, "docs": docs,
            "factors": factors}


def test_report_schema_and_flags_on_a_crafted_corpus(crafted):
    report, rows = crafted["report"], crafted["rows"]
    assert report.schema == pl.Schema(REPORT_SCHEMA)
    assert report["id"].to_list() == [r["id"] for r in rows]
    for t in ISSUE_TYPES:
        s = report[f"{t}_score"].to_numpy()
        assert ((0 <= s) & (s <= 1)).all()
        assert report[t].null_count() == 0
    by_id = {r["id"]: r for r in report.iter_rows(named=True)}
    original = rows[3]["id"]
    for doc in (COPY_ID, original):  # a group: the first in corpus order is kept, the copy flagged
        assert by_id[doc]["near_duplicate_score"] == 1.0 and by_id[doc]["max_similarity"] == 1.0
        assert by_id[doc]["duplicate_group"] == original and by_id[doc]["group_size"] == 2
    assert by_id[COPY_ID]["near_duplicate"] and not by_id[original]["near_duplicate"]
    assert f"exact copy of {original}" in by_id[COPY_ID]["reason"] and by_id[original]["reason"] == ""
    assert by_id[NEAR_ID]["near_duplicate"] and by_id[NEAR_ID]["duplicate_of"] == rows[7]["id"]
    assert by_id[NEAR_ID]["duplicate_group"] == by_id[rows[7]["id"]]["duplicate_group"] == rows[7]["id"]
    junk = by_id[GIBBERISH_ID]
    assert junk["low_quality"] and junk["low_quality_score"] == report["low_quality_score"].max()
    assert junk["severity"] == max(junk[f"{t}_score"] for t in ISSUE_TYPES)
    # the groups, and only they; reasons exactly for flagged documents; at most 10% flagged (4 of 43)
    assert set(report.filter(pl.col("duplicate_group").is_not_null())["id"]) == {COPY_ID, original, NEAR_ID,
                                                                                rows[7]["id"]}
    assert set(report.filter(pl.col("near_duplicate"))["id"]) == {COPY_ID, NEAR_ID}
    groups = duplicate_groups(report)
    assert groups["group"].to_list() == [original, rows[7]["id"]] or groups["group"].to_list() == [rows[7]["id"],
                                                                                                   original]
    assert {tuple(m) for m in groups["members"].to_list()} == {(original, COPY_ID), (rows[7]["id"], NEAR_ID)}
    any_flag = report.select(pl.any_horizontal([pl.col(t) for t in ISSUE_TYPES])).to_series()
    assert ((report["reason"].str.len_chars() > 0) == any_flag).all()
    assert any_flag.sum() <= 4
    # the self-influence and loss are the engine's
    eng, docs, factors = crafted["signals"], crafted["docs"], crafted["factors"]
    plain = eng.self_influence(docs[:5], factors)
    for r in report.head(5).iter_rows(named=True):
        assert r["self_influence"] == pytest.approx(plain[r["id"]], rel=1e-5)
        assert r["loss"] > 0


def test_hot_spots_are_the_largest_token_shares(crafted):
    hot, report = crafted["hot"], crafted["report"]
    assert hot.schema == pl.Schema(HOT_SPOT_SCHEMA)
    assert (hot.group_by("id").len()["len"] == 4).all() and hot["id"].n_unique() == report.height
    eng, docs, factors = crafted["signals"], crafted["docs"], crafted["factors"]
    (sig,) = eng.document_signals([docs[0]], factors)
    mine = hot.filter(pl.col("id") == docs[0].id).sort("rank")
    assert mine["position"].to_list() == sig.hot_spots(4)
    np.testing.assert_allclose(mine["share"].to_numpy(),
                               sig.token_self_influence[sig.hot_spots(4)] / sig.self_influence, rtol=1e-6)
    assert mine["token"].to_list() == [eng.tokenizer.decode([docs[0].input_ids[p]]) for p in sig.hot_spots(4)]


def test_review_items_are_keyed_by_issue_type_and_document(crafted):
    report = crafted["report"]
    items = review_items(report, {r["id"]: r["text"] for r in crafted["rows"]})
    assert set(items["query_id"]) <= set(ISSUE_TYPES)
    for t in ISSUE_TYPES:
        mine = items.filter(pl.col("query_id") == t)
        assert set(mine["train_id"]) == set(report.filter(pl.col(t))["id"])
        assert mine["rank"].to_list() == list(range(1, mine.height + 1))
        assert mine["score"].is_sorted(descending=True)


def test_validation_passes_the_report_and_refuses_broken_ones(crafted):
    from tasks.quality.checks import validate_quality_report

    report = crafted["report"]
    ids = report["id"]
    assert validate_quality_report(report, train_ids=ids).success
    broken = {
        "outlier_score_in_unit_interval": report.with_columns(pl.col("outlier_score") * 3),
        "loss_not_null": report.with_columns(pl.when(pl.col("id") == COPY_ID).then(float("nan"))
                                             .otherwise(pl.col("loss")).alias("loss")),
        "every_document_present": report.head(report.height - 1),
        "group_matches_flag": report.with_columns(pl.lit(None, dtype=pl.String).alias("duplicate_group")),
        "memorised_score_exists": report.drop("memorised_score"),
    }
    for check, frame in broken.items():
        result = validate_quality_report(frame, train_ids=ids)
        assert not result.success, check
        assert check in {r["check"] for r in result.failures()}, (check, result.summary())


def test_scores_are_squashed_robust_z_with_the_flag_at_one_half():
    x = np.array([1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 8.0])
    z = robust_z(x)
    assert np.median(z) == 0.0 and z[-1] > 3.5
    rng = np.random.default_rng(0)
    n = 30
    signals = pl.DataFrame({"id": [f"d{i}" for i in range(n)], "self_influence": rng.lognormal(0, 0.2, n),
                            "loss": rng.lognormal(-1, 0.2, n), "n_tokens": [20] * n, "n_targets": [19] * n,
                            "zlib_entropy": rng.normal(5, 0.2, n), "token_rarity": rng.normal(5, 0.2, n),
                            "compression_ratio": rng.normal(0.7, 0.02, n), "char_surprisal": rng.normal(2.5, 0.1, n),
                            "tokens_per_char": rng.normal(0.2, 0.01, n), "text_hash": [str(i) for i in range(n)],
                            "minhash": [rng.integers(0, 2**32, 128, dtype=np.uint64).tolist() for _ in range(n)]})
    signals = signals.with_columns(pl.col("minhash").cast(pl.List(pl.UInt64)))
    settings = QualitySettings(max_flagged=1.0)
    report = build_report(signals, settings)
    for t in ("outlier", "memorised", "low_quality"):
        assert ((report[f"{t}_score"] >= 0.5) == report[t]).all()
    spiked = signals.with_columns(pl.when(pl.col("id") == "d3").then(1e3).otherwise(pl.col("self_influence"))
                                  .alias("self_influence"))
    out = build_report(spiked, settings).row(3, named=True)
    assert out["outlier"] and out["outlier_score"] > 0.5 and out["reason"].startswith("outlier: self-influence")
    with pytest.raises(Exception, match="near-duplicate-threshold"):
        build_report(signals, QualitySettings(near_duplicate_threshold=1.5))


def test_quality_mode_needs_no_queries_and_influence_ids_are_unchanged():
    from tasks.options import AuditParams

    q = AuditParams(model="m", train=["t"], mode="quality")
    assert q.queries is None and q.identity()["mode"] == "quality"
    changed = AuditParams(model="m", train=["t"], mode="quality", top_k=7, cutoff=3.0).identity()
    assert "top_k" not in changed and changed["cutoff"] == 3.0  # the query parameters do not define a report
    with pytest.raises(ValidationError, match="queries are required"):
        AuditParams(model="m", train=["t"])
    influence = AuditParams(model="m", train=["t"], queries="q").identity()
    assert not {"mode", "cutoff", "near_duplicate_threshold", "hot_spots"} & set(influence)
    with pytest.raises(ValidationError):
        AuditParams(model="m", train=["t"], mode="quality", near_duplicate_threshold=0)


def test_cli_bad_flags_get_one_line_and_no_output(crafted, tmp_path, monkeypatch, capsys):
    """The real entry point, in-process (the subprocess form of these cases is tests/cli/test_cli_errors.py's)."""
    from influence_audit.cli import main

    out = tmp_path / "r.parquet"
    base = ["quality", "--model", str(crafted["model"]), "--train", str(crafted["path"])]
    cases = [
        (base + ["--out", str(tmp_path / "r.csv")], "must be a .parquet file"),
        (base + ["--out", str(out), "--near-duplicate-threshold", "1.5"], "--near-duplicate-threshold 1.5"),
        (base + ["--out", str(out), "--max-flagged", "1.5"], "--max-flagged 1.5"),
        (base + ["--out", str(out), "--strategy", "nope"], "--strategy 'nope'"),
        (["quality", "--model", str(crafted["model"]), "--train", str(tmp_path / "missing.jsonl"), "--out",
          str(out)], "missing.jsonl"),
        (["quality", "--model", str(tmp_path / "no-model"), "--train", str(crafted["path"]), "--out", str(out)],
         "no-model: no such directory"),
        (["audit", "--model", str(crafted["model"]), "--train", str(crafted["path"])], "--queries is required"),
        (["audit", "--mode", "qualty", "--model", str(crafted["model"]), "--train", str(crafted["path"])],
         "--mode 'qualty'"),
    ]
    for args, expect in cases:
        monkeypatch.setattr("sys.argv", ["influence-audit", *args])
        with pytest.raises(SystemExit) as exit_:
            main()
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert exit_.value.code == 2, (args, err)
        assert len(lines) == 1 and expect in lines[0] and "Traceback" not in err, err
        assert not out.exists()


def _synthetic_signals(n: int, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame({
        "id": [f"d{i:03d}" for i in range(n)], "self_influence": rng.lognormal(0, 0.2, n),
        "loss": rng.lognormal(-1, 0.2, n), "n_tokens": [20] * n, "n_targets": [19] * n,
        "zlib_entropy": rng.normal(5, 0.2, n), "token_rarity": rng.normal(5, 0.2, n),
        "compression_ratio": rng.normal(0.7, 0.02, n), "char_surprisal": rng.normal(2.5, 0.1, n),
        "tokens_per_char": rng.normal(0.2, 0.01, n), "text_hash": [str(i) for i in range(n)],
        "minhash": [rng.integers(0, 2**32, 128, dtype=np.uint64).tolist() for _ in range(n)]},
    ).with_columns(pl.col("minhash").cast(pl.List(pl.UInt64)))


def test_a_dirty_corpus_gets_its_worst_first_and_at_most_the_bounded_share():
    """30 of 100 documents are character noise of graded severity: with --max-flagged 0.1 exactly the 10 noisiest
    are flagged (ties by id), every one with its reason; without the bound all 30 (and nothing clean)."""
    n = 100
    signals = _synthetic_signals(n)
    noisy = list(range(0, 60, 2))  # 30 documents
    bump = np.zeros(n)
    bump[noisy] = np.linspace(2.0, 5.0, len(noisy))  # char surprisal 2.5 + bump: z from ~20 up
    signals = signals.with_columns(pl.Series("char_surprisal", signals["char_surprisal"].to_numpy() + bump))
    report = build_report(signals, QualitySettings(max_flagged=0.1))
    flagged_ids = report.filter(pl.col("low_quality"))["id"].to_list()
    assert len(flagged_ids) == 10 and report.select(pl.any_horizontal(list(ISSUE_TYPES))).to_series().sum() == 10
    worst = [f"d{i:03d}" for i in sorted(noisy, key=lambda i: -bump[i])[:10]]
    assert sorted(flagged_ids) == sorted(worst)
    assert all("character noise" in r for r in report.filter(pl.col("low_quality"))["reason"])
    unbounded = build_report(signals, QualitySettings(max_flagged=1.0))
    assert sorted(unbounded.filter(pl.col("low_quality"))["id"].to_list()) == sorted(f"d{i:03d}" for i in noisy)
    from tasks.quality.signals import above_cutoff

    assert int(above_cutoff(report).sum()) == 30
    with pytest.raises(Exception, match="--max-flagged"):
        build_report(signals, QualitySettings(max_flagged=1.5))


def test_boilerplate_shingles_do_not_make_near_duplicates():
    """Documents that share boilerplate sentences and differ in one fact are not near duplicates once shingles held
    by many documents are dropped; a real near copy (sentences reordered, a word changed) still is."""
    from tasks.quality.signals import CorpusCounts, distinctive_shingles, minhash_values, near_duplicate_groups

    boiler = ["All specifications are subject to change without notice.", "Contact the support team for details.",
              "Keep the original packaging for returns.", "Delivery usually takes three to five working days."]
    texts = [f"The model {chr(65 + i % 26)}{i} kettle was designed in city {i * 7919 % 1000}. " + " ".join(boiler)
             for i in range(60)]
    first, *rest = texts[5].split(". ")
    texts.append(". ".join([*rest[::-1], first]).replace("returns", "refunds") + ".")  # reordered, a word changed
    settings = QualitySettings()
    df = CorpusCounts.of([], texts, 1, settings).shingle_df  # documents per shingle (no tokens needed here)
    kept = distinctive_shingles(texts[0], settings, df, len(texts))
    assert kept and all(b"packaging" not in x and b"support" not in x for x in kept)
    n = len(texts)
    ids, hashes = [f"d{i:03d}" for i in range(n)], [str(i) for i in range(n)]
    plain = [minhash_values(t, settings).tolist() for t in texts]
    distinct = [distinctive_shingles(t, settings, df, n) for t in texts]
    sketches = [minhash_values(t, settings, df, n).tolist() for t in texts]
    sim, group, nearest = near_duplicate_groups(ids, hashes, plain, settings, sketches, [len(d) for d in distinct])
    assert {ids[i] for i, g in enumerate(group) if g is not None} == {"d005", f"d{n - 1:03d}"}
    assert nearest[n - 1] == "d005" and sim[n - 1] >= settings.near_duplicate_threshold
    # without the distinctive-content test most pairs are near duplicates
    _, group_all, _ = near_duplicate_groups(ids, hashes, plain, settings)
    assert sum(g is not None for g in group_all) > n // 2


def test_long_stages_report_progress_lines_off_a_terminal():
    """The flow's and the bench's progress: a plain line once the interval has passed, none at the end."""
    from tasks.reporting import Every

    said: list[str] = []
    every = Every(said.append, "quality signals, shard 3", 10, every_s=0.0)
    every(4, 400)
    every(10, 1000)
    assert len(said) == 1 and said[0].startswith("quality signals, shard 3: 4 of 10 documents, ")
    quiet = Every(said.append, "x", 10, every_s=3600.0)
    quiet(5, 10)
    assert len(said) == 1


def test_a_second_pass_reports_its_own_rate():
    """The factor fit's stage runs two passes with a pause between them (the eigendecomposition): the second
    pass's tokens/s counts from its own first report, not from the stage's start."""
    from tasks.reporting import PassRate

    rate = PassRate(t0=0.0)
    assert rate(50, 1000, 10.0) == "100 tokens/s"
    assert rate(100, 2000, 20.0) == "100 tokens/s"  # first pass done
    assert rate(10, 200, 80.0) == "a new pass"  # 60 s of eigendecomposition before this report
    assert rate(60, 1200, 90.0) == "100 tokens/s"  # (1200 - 200) / (90 - 80), not 1200 / 90
