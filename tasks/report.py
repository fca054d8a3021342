"""Plots and a self-contained HTML page for an audit's candidate list.

Input is the candidate list (one row per query x candidate: ``query_id``, ``query_prompt``,
``query_completion``, ``train_id``, ``score``, ``rank``, ``snippet``, ``layer_scores`` (JSON, null when not
explained), ``token_strs`` / ``token_scores`` (null when not explained)). Plots use matplotlib's
object API with the Agg canvas (no pyplot state), so they are safe from worker threads. Every file is
written through :func:`influence_engine.atomic.atomic_path`.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl
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


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(score: Any) -> str:
    if score is None:
        return ""
    x = float(score)
    return f"{x:+.4g}" if math.isfinite(x) else str(x)


def _token_colour(score: float, scale: float) -> str:
    alpha = 0.0 if scale <= 0 or not math.isfinite(score) else min(1.0, abs(score) / scale) * 0.85
    rgb = "34,160,70" if score >= 0 else "215,48,39"
    return f"rgba({rgb},{alpha:.3f})"


def _tokens_html(tokens: Sequence[str], scores: Sequence[float]) -> str:
    finite = [abs(float(s)) for s in scores if s is not None and math.isfinite(float(s))]
    scale = max(finite, default=0.0)
    spans = []
    for tok, s in zip(tokens, scores, strict=True):
        x = float("nan") if s is None else float(s)
        spans.append(f'<span class="tok" style="background:{_token_colour(x, scale)}" '
                     f'title="{_e(_fmt(x))}">{_e(tok)}</span>')
    return f'<div class="tokens">{"".join(spans)}</div>'


def _top_tokens_html(tokens: Sequence[str], scores: Sequence[float]) -> str:
    pairs = [(i, t, float(s)) for i, (t, s) in enumerate(zip(tokens, scores, strict=True))
             if s is not None and math.isfinite(float(s))]
    pairs.sort(key=lambda p: -abs(p[2]))
    items = "".join(f"<li><code>{_e(repr(t))}</code> (token {i}): {_e(_fmt(s))}</li>"
                    for i, t, s in pairs[:TOP_TOKENS])
    return f'<div class="label">Top {TOP_TOKENS} tokens by |influence|</div><ol class="top">{items}</ol>'


def _query_html(rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    out = [
        f'<section class="query" id="q-{_e(first["query_id"])}">',
        f'<h2>Query {_e(first["query_id"])}</h2>',
        '<div class="label">Prompt</div>',
        f'<pre class="prompt">{_e(first.get("query_prompt"))}</pre>',
        '<div class="label">Completion</div>',
        f'<pre class="completion">{_e(first.get("query_completion"))}</pre>',
        "<table><thead><tr><th>rank</th><th>train id</th><th>score</th><th>snippet</th></tr></thead><tbody>",
    ]
    for r in rows:
        out.append(f'<tr><td class="num">{_e(r.get("rank"))}</td><td>{_e(r.get("train_id"))}</td>'
                   f'<td class="num">{_e(_fmt(r.get("score")))}</td><td>{_e(r.get("snippet"))}</td></tr>')
    out.append("</tbody></table>")
    for r in rows:
        tokens, scores = r.get("token_strs"), r.get("token_scores")
        if not tokens or scores is None:
            continue
        if len(tokens) != len(scores):
            raise ValueError(f"query {first['query_id']}, document {r.get('train_id')}: "
                             f"{len(tokens)} tokens but {len(scores)} token scores")
        out.append(f'<details open><summary>#{_e(r.get("rank"))} {_e(r.get("train_id"))} '
                   f'(score {_e(_fmt(r.get("score")))}): token influence</summary>')
        out.append(_tokens_html(tokens, scores))
        out.append(_top_tokens_html(tokens, scores))
        out.append("</details>")
    out.append("</section>")
    return "\n".join(out)


def render_html_report(cands: pl.DataFrame, path: str | Path, *, title: str,
                       meta: Mapping[str, str]) -> Path:
    """Write one self-contained HTML page (inline CSS, no scripts, no links) for the candidate list.

    Header: ``title`` and a ``meta`` table; then per query (in first-appearance order): prompt,
    completion, candidate table by rank, and each explained candidate's tokens shaded by influence
    (green positive, red negative, value in the title attribute) with its top 5 tokens by |score|.
    """
    queries: dict[str, list[dict[str, Any]]] = {}
    for row in cands.iter_rows(named=True):
        queries.setdefault(str(row["query_id"]), []).append(row)
    meta_rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in meta.items())
    sections = [_query_html(sorted(rows, key=lambda r: (r.get("rank") is None, r.get("rank"))))
                for rows in queries.values()]
    toc = "".join(f'<li><a href="#q-{_e(q)}">{_e(q)}</a> ({len(rows)} candidates)</li>'
                  for q, rows in queries.items())
    page = "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{_e(title)}</h1><table class=\"meta\"><tbody>{meta_rows}</tbody></table></header>",
        f"<nav><div class=\"label\">Queries</div><ul>{toc}</ul></nav>" if queries
        else '<p class="muted">No candidates.</p>',
        *sections,
        "</body></html>",
        "",
    ])
    target = Path(path)
    with atomic_path(target) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return target
