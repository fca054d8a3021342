"""Plots and a self-contained HTML page for an audit's candidate list.

Input is the candidate list (one row per query x candidate: ``query_id``, ``query_prompt``,
``query_completion``, ``train_id``, ``score``, ``rank``, ``snippet``, ``layer_scores`` (JSON, null when not
explained), ``token_strs`` / ``token_scores`` (null when not explained)). Plots use matplotlib's
object API with the Agg canvas (no pyplot state), so they are safe from worker threads. Every file is
written through :func:`influence_engine.atomic.atomic_path`.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import polars as pl
from jinja2 import Environment, FileSystemLoader, select_autoescape
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from influence_engine.atomic import atomic_path

__all__ = ["layer_shares", "plot_layer_share", "plot_score_distribution", "render_html_report"]

TOP_TOKENS = 5


def _save(fig: Figure, path: str | Path) -> Path:
    FigureCanvasAgg(fig)
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return target


def _placeholder(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _finite(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def plot_score_distribution(cands: pl.DataFrame, path: str | Path) -> Path:
    """PNG: histogram of candidate scores (left) and mean score per rank with the min-max band (right)."""
    fig = Figure(figsize=(11, 4.2))
    ax_hist, ax_rank = fig.subplots(1, 2)
    scores = _finite(cands["score"].to_list()) if cands.height else []
    n_queries = cands["query_id"].n_unique() if cands.height else 0
    if scores:
        ax_hist.hist(scores, bins=min(40, max(5, len(scores) // 2)), color="#4a7ab5", edgecolor="white")
        ax_hist.axvline(0.0, color="0.3", lw=0.8, ls="--")
        ax_hist.set_xlabel("influence score")
        ax_hist.set_ylabel("candidates")
        by_rank = (
            cands.filter(pl.col("score").is_finite())
            .group_by("rank")
            .agg(pl.col("score").mean().alias("mean"), pl.col("score").min().alias("lo"),
                 pl.col("score").max().alias("hi"))
            .sort("rank")
        )
        ranks = by_rank["rank"].to_list()
        ax_rank.fill_between(ranks, by_rank["lo"].to_list(), by_rank["hi"].to_list(), color="#4a7ab5",
                             alpha=0.2, label="min-max over queries")
        ax_rank.plot(ranks, by_rank["mean"].to_list(), marker="o", ms=3, color="#1f3f73", label="mean")
        ax_rank.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_rank.set_xlabel("rank (1 = most influential)")
        ax_rank.set_ylabel("influence score")
        ax_rank.legend(loc="upper right", fontsize=8)
    else:
        _placeholder(ax_hist, "no candidates")
        _placeholder(ax_rank, "no candidates")
    ax_hist.set_title(f"Candidate scores ({len(scores)} candidates, {n_queries} queries)")
    ax_rank.set_title("Score by rank")
    for ax in (ax_hist, ax_rank):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def layer_shares(cands: pl.DataFrame) -> dict[str, float]:
    """Mean over explained candidates of |layer score| / sum |layer scores|, layers in model order."""
    totals: dict[str, float] = {}
    n = 0
    if "layer_scores" not in cands.columns:
        return {}
    for raw in cands["layer_scores"].to_list():
        if not raw:
            continue
        layers = {str(k): abs(float(v)) for k, v in json.loads(raw).items()
                  if v is not None and math.isfinite(float(v))}
        denom = sum(layers.values())
        if denom <= 0:
            continue
        n += 1
        for name, value in layers.items():
            totals[name] = totals.get(name, 0.0) + value / denom
    return {name: total / n for name, total in totals.items()} if n else {}


def plot_layer_share(cands: pl.DataFrame, path: str | Path) -> Path:
    """PNG: horizontal bars, per layer, of its mean share of the explained candidates' influence."""
    shares = layer_shares(cands)
    explained = cands.filter(pl.col("layer_scores").is_not_null()).height if shares else 0
    fig = Figure(figsize=(8, max(3.0, 0.28 * len(shares) + 1.4)))
    ax = fig.subplots()
    if shares:
        names = list(shares)
        ax.barh(range(len(names)), [100.0 * shares[k] for k in names], color="#5b9a68")
        ax.set_yticks(range(len(names)), labels=names, fontsize=8 if len(names) > 20 else 9)
        ax.invert_yaxis()  # first layer on top
        ax.set_xlabel("share of |influence| (%), mean over explained candidates")
        ax.grid(axis="x", alpha=0.3)
    else:
        _placeholder(ax, "no explained candidates")
    ax.set_title(f"Influence share by layer ({explained} explained candidates)")
    return _save(fig, path)


# ------------------------------------------------------------------------------------------ HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:1100px;
 color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.2rem;border-bottom:1px solid #ccc;padding-bottom:.2rem;margin-top:2.5rem}
table{border-collapse:collapse;width:100%;margin:.6rem 0}
th,td{border:1px solid #ddd;padding:.3rem .5rem;text-align:left;vertical-align:top;font-size:.9rem}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.meta{width:auto}table.meta th{width:12rem}
pre{white-space:pre-wrap;word-break:break-word;background:#f7f7f7;padding:.5rem;margin:.3rem 0;
 border-radius:4px;font-size:.88rem}
pre.completion{background:#eef4ff;border-left:4px solid #4a7ab5}
.label{font-weight:600;font-size:.85rem;color:#555;margin-top:.6rem}
.tokens{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-word;
 line-height:1.7;font-size:.85rem;border:1px solid #e3e3e3;padding:.5rem;border-radius:4px}
.tok{border-radius:2px}
details{margin:.5rem 0 1rem}summary{cursor:pointer;font-weight:600}
ol.top li{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85rem}
.muted{color:#777}
"""


def _fmt(score: Any) -> str:
    if score is None:
        return ""
    x = float(score)
    return f"{x:+.4g}" if math.isfinite(x) else str(x)


def _token_colour(score: float, scale: float) -> str:
    alpha = 0.0 if scale <= 0 or not math.isfinite(score) else min(1.0, abs(score) / scale) * 0.85
    rgb = "34,160,70" if score >= 0 else "215,48,39"
    return f"rgba({rgb},{alpha:.3f})"


def _explained(query_id: str, r: dict[str, Any]) -> dict[str, Any] | None:
    """A candidate's tokens shaded by influence and its top tokens by |influence| (None if not explained)."""
    tokens, scores = r.get("token_strs"), r.get("token_scores")
    if not tokens or scores is None:
        return None
    if len(tokens) != len(scores):
        raise ValueError(f"query {query_id}, document {r.get('train_id')}: "
                         f"{len(tokens)} tokens but {len(scores)} token scores")
    values = [float("nan") if s is None else float(s) for s in scores]
    scale = max((abs(x) for x in values if math.isfinite(x)), default=0.0)
    top = sorted(((i, t, x) for i, (t, x) in enumerate(zip(tokens, values, strict=True)) if math.isfinite(x)),
                 key=lambda p: -abs(p[2]))[:TOP_TOKENS]
    return r | {"tokens": [{"text": t, "score": x, "colour": _token_colour(x, scale)}
                           for t, x in zip(tokens, values, strict=True)],
                "top": [{"index": i, "text": t, "score": x} for i, t, x in top]}


@functools.lru_cache(maxsize=1)
def _templates() -> Environment:
    env = Environment(loader=FileSystemLoader(Path(__file__).parents[1] / "templates"),
                      autoescape=select_autoescape(["html", "j2"], default=True), keep_trailing_newline=True)
    env.filters["fmt"] = _fmt
    env.filters["repr"] = repr
    return env


def render_html_report(cands: pl.DataFrame, path: str | Path, *, title: str,
                       meta: Mapping[str, str]) -> Path:
    """Write one self-contained HTML page (inline CSS, no scripts, no links) for the candidate list.

    Header: ``title`` and a ``meta`` table; then per query (in first-appearance order): prompt,
    completion, candidate table by rank, and each explained candidate's tokens shaded by influence
    (green positive, red negative, value in the title attribute) with its top 5 tokens by |score|.
    Rendered with Jinja2 (``templates/report.html.j2``), every value escaped.
    """
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in cands.iter_rows(named=True):
        grouped.setdefault(str(row["query_id"]), []).append(row)
    queries = []
    for qid, rows in grouped.items():
        rows = sorted(rows, key=lambda r: (r.get("rank") is None, r.get("rank")))
        explained = [e for e in (_explained(qid, r) for r in rows) if e is not None]
        queries.append({"id": qid, "prompt": rows[0].get("query_prompt"),
                        "completion": rows[0].get("query_completion"), "rows": rows, "explained": explained})
    page = _templates().get_template("report.html.j2").render(
        title=title, meta={str(k): str(v) for k, v in meta.items()}, queries=queries, css=_CSS,
        top_tokens=TOP_TOKENS)
    target = Path(path)
    with atomic_path(target) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return target
