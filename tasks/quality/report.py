"""The quality audit's plots and HTML page, shown in the manner of cleanlab Datalab's ``report()``: a summary table
by issue type, then per issue type what it means, how many documents it flags and the most severe ones.

Scores here are higher = more severe (Datalab's are lower = worse). Plots use matplotlib's object API with the
Agg canvas (no pyplot state); files are written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from influence_engine.atomic import atomic_path
from tasks.influence.report import _CSS, _placeholder, _save, _templates
from tasks.quality.signals import ABOUT, ISSUE_TYPES, above_cutoff, duplicate_groups, issue_reason, snippet, summary

__all__ = ["plot_loss_vs_self_influence", "plot_self_influence", "render_quality_html", "terminal_report"]

TOP_PER_ISSUE = 10
TOP_GROUPS = 20
HOT_SHOWN = 3
_COLOURS = {"outlier": "#d7301f", "memorised": "#7b3294", "near_duplicate": "#e6a100", "low_quality": "#2b83ba"}


def plot_self_influence(report: pl.DataFrame, path: str | Path) -> Path:
    """PNG: histogram of log10 self-influence, the flagged outliers marked."""
    fig = Figure(figsize=(8, 4.2))
    ax = fig.subplots()
    si = report["self_influence"].to_numpy()
    ok = np.isfinite(si) & (si > 0)
    if ok.any():
        x = np.log10(si[ok])
        bins = np.linspace(x.min(), x.max() + 1e-9, 41)
        ax.hist(x, bins=bins, color="#9ab", edgecolor="white", label="all documents")
        out = report["outlier"].to_numpy()[ok]
        if out.any():
            ax.hist(x[out], bins=bins, color=_COLOURS["outlier"], edgecolor="white", label="flagged outlier")
        ax.set_xlabel("log10 self-influence")
        ax.set_ylabel("documents")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    else:
        _placeholder(ax, "no positive self-influence")
    ax.set_title(f"Self-influence of {report.height} documents")
    return _save(fig, path)


def plot_loss_vs_self_influence(report: pl.DataFrame, path: str | Path) -> Path:
    """PNG: loss against self-influence (log-log), documents coloured by the first issue that flags them."""
    fig = Figure(figsize=(8, 5.5))
    ax = fig.subplots()
    si, loss = report["self_influence"].to_numpy(), report["loss"].to_numpy()
    ok = np.isfinite(si) & (si > 0) & np.isfinite(loss) & (loss > 0)
    if ok.any():
        first = np.full(report.height, "", dtype=object)
        for t in reversed(ISSUE_TYPES):
            first[report[t].to_numpy()] = t
        clean = ok & (first == "")
        ax.scatter(si[clean], loss[clean], s=9, color="#9ab", alpha=0.6, label="not flagged")
        for t in ISSUE_TYPES:
            sel = ok & (first == t)
            if sel.any():
                ax.scatter(si[sel], loss[sel], s=22, color=_COLOURS[t], label=f"{t} ({int(sel.sum())})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("self-influence")
        ax.set_ylabel("loss (nats per token)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    else:
        _placeholder(ax, "no documents")
    ax.set_title("Loss vs self-influence")
    return _save(fig, path)


def _num(x: Any) -> str:
    if x is None:
        return ""
    x = float(x)
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def _flag_line(report: pl.DataFrame) -> str:
    """How many documents are flagged, and how many more are above a cut-off but left out by the bound."""
    n_flagged = report.filter(pl.any_horizontal([pl.col(t) for t in ISSUE_TYPES])).height
    n_above = int(above_cutoff(report).sum()) if report.height else 0
    line = f"{n_flagged} of {report.height} documents flagged"
    if n_above > n_flagged:
        line += (f", the most severe of {n_above} above a cut-off (at most --max-flagged of the corpus; raise it "
                 "to see the rest)")
    return line


def _issue(report: pl.DataFrame, issue: str, texts: Mapping[str, str],
           hot: Mapping[str, list[tuple[str, float]]]) -> dict[str, Any]:
    """One issue type's section of the page: its count, quality, most severe documents and (near duplicates) the
    duplicate groups."""
    top = report.sort([f"{issue}_score", "id"], descending=[True, False]).head(TOP_PER_ISSUE)
    rows = [{"id": r["id"], "flagged": bool(r[issue]), "score": r[f"{issue}_score"],
             "self_influence": _num(r["self_influence"]), "loss": _num(r["loss"]),
             "why": issue_reason(r["reason"], issue) if r[issue] else "",
             "hot": [(tok.strip() or repr(tok), share) for tok, share in hot.get(r["id"], [])[:HOT_SHOWN]],
             "text": snippet(texts.get(r["id"], ""), 240)} for r in top.iter_rows(named=True)]
    groups = None
    if issue == "near_duplicate":
        g = duplicate_groups(report)
        if g.height:
            groups = {"count": g.height, "documents": int(g["size"].sum()),
                      "rows": [{**r, "text": snippet(texts.get(r["group"], ""), 160)}
                               for r in g.head(TOP_GROUPS).iter_rows(named=True)]}
    return {"name": issue, "about": ABOUT[issue], "flagged": int(report[issue].sum()),
            "quality": 1 - float(report[f"{issue}_score"].mean() or 0.0), "rows": rows, "groups": groups}


def render_quality_html(report: pl.DataFrame, path: str | Path, *, title: str, meta: Mapping[str, str],
                        texts: Mapping[str, str], hot_spots: pl.DataFrame | None = None) -> Path:
    """One self-contained HTML page (inline CSS, no scripts or links): a ``meta`` table, the summary by issue
    type, then per issue type (most issues first) what it means, its count and its top documents, each with its
    text and its hot spots (the tokens holding most of its self-influence, from ``hot_spots``). Rendered with
    Jinja2 (``templates/quality.html.j2``, the audit report's environment), every value escaped."""
    hot: dict[str, list[tuple[str, float]]] = {}
    if hot_spots is not None:
        for r in hot_spots.sort(["id", "rank"]).iter_rows(named=True):
            hot.setdefault(r["id"], []).append((r["token"], r["share"]))
    s = summary(report).sort("num_issues", descending=True, maintain_order=True)
    page = _templates().get_template("quality.html.j2").render(
        title=title, meta={str(k): str(v) for k, v in meta.items()}, css=_CSS, flag_line=_flag_line(report),
        summary=list(s.iter_rows(named=True)), issues=[_issue(report, t, texts, hot) for t in s["issue_type"]])
    target = Path(path)
    with atomic_path(target) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return target


def terminal_report(report: pl.DataFrame, texts: Mapping[str, str], top: int = 5) -> str:
    """The same report as plain text (Datalab's ``report()`` printout), for the CLI."""
    s = summary(report).sort("num_issues", descending=True, maintain_order=True)
    lines = [f"{_flag_line(report)}. Summary by issue type:", "",
             f"  {'issue_type':<16}{'num_issues':>11}{'mean_score':>12}"]
    lines += [f"  {r['issue_type']:<16}{r['num_issues']:>11}{r['mean_score']:>12.3f}" for r in s.iter_rows(named=True)]
    for t in s.filter(pl.col("num_issues") > 0)["issue_type"].to_list():
        lines += ["", f"---------- {t} issues ----------",
                  f"Top documents (of {int(report[t].sum())} flagged):"]
        rows = report.filter(pl.col(t)).sort([f"{t}_score", "id"], descending=[True, False]).head(top)
        for r in rows.iter_rows(named=True):
            lines.append(f"  {r['id']}  score {r[f'{t}_score']:.3f}  {issue_reason(r['reason'], t)}")
            lines.append(f"      {snippet(texts.get(r['id'], ''), 110)}")
    groups = duplicate_groups(report)
    if groups.height:
        lines += ["", f"---------- duplicate groups: {groups.height} ({int(groups['size'].sum())} documents, "
                      "the first of each kept) ----------"]
        for r in groups.head(top).iter_rows(named=True):
            more = f" +{r['size'] - 4} more" if r["size"] > 4 else ""
            lines.append(f"  {r['size']} documents, similarity >= {r['similarity']:.2f}: "
                         f"{', '.join(r['members'][:4])}{more}")
            lines.append(f"      {snippet(texts.get(r['group'], ''), 110)}")
    return "\n".join(lines)
