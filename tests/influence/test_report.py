"""Plots and HTML page of tasks.influence.report, on a small hand-made candidate list."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest

from tasks.influence.report import layer_shares, plot_layer_share, plot_score_distribution, render_html_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_candidates() -> pl.DataFrame:
    """2 queries x 3 candidates; ranks 1 and 2 of each query explained."""
    rows = []
    docs = {
        "q1": [("doc-a", 0.9), ("doc-b", 0.4), ("doc-c", -0.1)],
        "q2": [("doc-d", 1.5), ("doc-e", 0.2), ("doc-f", 0.05)],
    }
    for q, cands in docs.items():
        for rank, (doc, score) in enumerate(cands, start=1):
            explained = rank <= 2
            tokens = ["The", " cat", " <b>sat</b>", " on", " mat"]
            raw = [0.5, -0.2, 0.3, 0.1, 0.3]
            token_scores = [score * t for t in raw]  # sums to score
            rows.append({
                "query_id": q,
                "query_prompt": f"Prompt for {q}: where did the cat sit?",
                "query_completion": f"On the mat & the rug ({q})",
                "train_id": doc,
                "score": score,
                "rank": rank,
                "snippet": "<script>alert(1)</script> harmless text" if doc == "doc-b" else f"text of {doc}",
                "layer_scores": json.dumps({"layers.0.mlp": 0.3 * score, "layers.1.mlp": -0.7 * score})
                if explained else None,
                "token_strs": tokens if explained else None,
                "token_scores": token_scores if explained else None,
            })
    return pl.DataFrame(rows, schema={
        "query_id": pl.String, "query_prompt": pl.String, "query_completion": pl.String,
        "train_id": pl.String, "score": pl.Float64, "rank": pl.Int64, "snippet": pl.String,
        "layer_scores": pl.String, "token_strs": pl.List(pl.String), "token_scores": pl.List(pl.Float64),
    })


def assert_png(path: Path, min_bytes: int = 5_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes
    assert not list(path.parent.glob(f".{path.name}.*.tmp")), "atomic temp file left behind"


def test_score_distribution_png(tmp_path: Path) -> None:
    out = plot_score_distribution(make_candidates(), tmp_path / "plots" / "scores.png")
    assert out == tmp_path / "plots" / "scores.png"
    assert_png(out)


def test_layer_share_png_and_values(tmp_path: Path) -> None:
    cands = make_candidates()
    shares = layer_shares(cands)
    assert list(shares) == ["layers.0.mlp", "layers.1.mlp"]
    assert shares["layers.0.mlp"] == pytest.approx(0.3)
    assert shares["layers.1.mlp"] == pytest.approx(0.7)
    assert_png(plot_layer_share(cands, tmp_path / "layers.png"))


def test_plots_with_nothing_to_show(tmp_path: Path) -> None:
    empty = make_candidates().clear()
    unexplained = make_candidates().with_columns(pl.lit(None, pl.String).alias("layer_scores"))
    assert layer_shares(unexplained) == {}
    assert_png(plot_score_distribution(empty, tmp_path / "a.png"), 2_000)
    assert_png(plot_layer_share(unexplained, tmp_path / "b.png"), 2_000)


def test_html_report(tmp_path: Path) -> None:
    cands = make_candidates()
    out = render_html_report(cands, tmp_path / "report.html", title="Audit <demo>",
                             meta={"model": "tiny-gpt", "strategy": "ekfac", "mlflow run": "abc123"})
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    # escaped, never raw
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<title>Audit &lt;demo&gt;</title>" in page
    assert "&lt;b&gt;sat&lt;/b&gt;" in page
    # meta, prompt and completion
    for text in ("tiny-gpt", "ekfac", "abc123", "Prompt for q1: where did the cat sit?"):
        assert text in page
    assert "On the mat &amp; the rug (q1)" in page
    assert "On the mat &amp; the rug (q2)" in page
    # every candidate in a table row; tokens only for the 4 explained ones
    for doc in "abcdef":
        assert f"<td>doc-{doc}</td>" in page
    spans = re.findall(r'<span class="tok" style="background:rgba\(([\d,.]+)\)" title="([^"]+)">', page)
    assert len(spans) == 4 * 5
    assert ("34,160,70,0.850", "+0.45") in spans  # doc-a's strongest token, positive: full green
    assert any(rgba.startswith("215,48,39,") and title.startswith("-") for rgba, title in spans)
    assert page.count("Top 5 tokens by |influence|") == 4
    # self-contained: no external references of any kind
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<(link|script|img|iframe)\b", page)
    assert not list(tmp_path.glob(".report.html.*.tmp"))


def test_html_report_rejects_mismatched_tokens(tmp_path: Path) -> None:
    cands = make_candidates().with_columns(
        pl.when(pl.col("token_strs").is_not_null()).then(pl.lit(["x"], pl.List(pl.String)))
        .otherwise(None).alias("token_strs"))
    with pytest.raises(ValueError, match="tokens but"):
        render_html_report(cands, tmp_path / "r.html", title="t", meta={})
    assert not (tmp_path / "r.html").exists()
