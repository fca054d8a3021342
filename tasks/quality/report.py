"""The quality audit's plots and HTML page, shown in the manner of cleanlab Datalab's ``report()``: a summary table
by issue type, then per issue type what it means, how many documents it flags and the most severe ones.

Scores here are higher = more severe (Datalab's are lower = worse). Plots use matplotlib's object API with the
Agg canvas (no pyplot state); files are written atomically.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from influence_engine.atomic import atomic_path
from tasks.influence.report import _CSS, _placeholder, _save
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


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(x: Any) -> str:
    if x is None:
        return ""
    x = float(x)
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def _summary_html(report: pl.DataFrame) -> str:
    s = summary(report).sort("num_issues", descending=True, maintain_order=True)
    rows = "".join(f'<tr><td><a href="#{_e(r["issue_type"])}">{_e(r["issue_type"])}</a></td>'
                   f'<td class="num">{r["num_issues"]}</td><td class="num">{r["mean_score"]:.3f}</td></tr>'
                   for r in s.iter_rows(named=True))
    return ("<h2>Summary</h2><p>Here is a summary of the issues found in the training data "
            f"({_e(_flag_line(report))}). Scores are in [0, 1], higher = more severe; an issue's cut-off (score "
            "0.5) is set against this corpus.</p><table><thead><tr><th>issue type</th><th>num issues</th>"
            f"<th>mean score</th></tr></thead><tbody>{rows}</tbody></table>")


def _flag_line(report: pl.DataFrame) -> str:
    """How many documents are flagged, and how many more are above a cut-off but left out by the bound."""
    n_flagged = report.filter(pl.any_horizontal([pl.col(t) for t in ISSUE_TYPES])).height
    n_above = int(above_cutoff(report).sum()) if report.height else 0
    line = f"{n_flagged} of {report.height} documents flagged"
    if n_above > n_flagged:
        line += (f", the most severe of {n_above} above a cut-off (at most --max-flagged of the corpus; raise it "
                 "to see the rest)")
    return line


def _groups_html(report: pl.DataFrame, texts: Mapping[str, str]) -> str:
    groups = duplicate_groups(report)
    if groups.height == 0:
        return ""
    out = ["<h3>Duplicate groups</h3>", f"<p>{groups.height} groups of copies ({int(groups['size'].sum())} "
           "documents; the first member of each is kept, the others are flagged). Largest first:</p>",
           "<table><thead><tr><th>kept</th><th>documents</th><th>similarity</th><th>members</th><th>text</th>"
           "</tr></thead><tbody>"]
    for r in groups.head(TOP_GROUPS).iter_rows(named=True):
        out.append(f'<tr><td>{_e(r["group"])}</td><td class="num">{r["size"]}</td>'
                   f'<td class="num">{r["similarity"]:.2f}</td><td>{_e(", ".join(r["members"]))}</td>'
                   f'<td>{_e(snippet(texts.get(r["group"], ""), 160))}</td></tr>')
    out.append("</tbody></table>")
    return "\n".join(out)


def _hot_html(hot: Mapping[str, list[tuple[str, float]]], doc_id: str) -> str:
    spots = hot.get(doc_id, [])[:HOT_SHOWN]
    return ", ".join(f"<code>{_e(tok.strip() or repr(tok))}</code> {100 * share:.0f}%" for tok, share in spots)


def _issue_html(report: pl.DataFrame, issue: str, texts: Mapping[str, str],
                hot: Mapping[str, list[tuple[str, float]]]) -> str:
    flagged = report.filter(pl.col(issue))
    top = report.sort([f"{issue}_score", "id"], descending=[True, False]).head(TOP_PER_ISSUE)
    out = [f'<section id="{_e(issue)}"><h2>{_e(issue)} issues</h2>',
           f'<p><b>About this issue:</b> {_e(ABOUT[issue])}</p>',
           f"<p>Number of documents with this issue: <b>{flagged.height}</b>. Overall data quality in terms of "
           f"this issue (1 - mean score): <b>{1 - float(report[f'{issue}_score'].mean() or 0.0):.3f}</b>.</p>",
           "<p>Documents representing the most severe instances of this issue:</p>",
           "<table><thead><tr><th>id</th><th>flagged</th><th>score</th><th>self-influence</th><th>loss</th>"
           "<th>why</th><th>hot spots (share of self-influence)</th><th>text</th></tr></thead><tbody>"]
    for r in top.iter_rows(named=True):
        why = issue_reason(r["reason"], issue) if r[issue] else ""
        out.append(f'<tr><td>{_e(r["id"])}</td><td>{"yes" if r[issue] else "no"}</td>'
                   f'<td class="num">{r[f"{issue}_score"]:.3f}</td><td class="num">{_num(r["self_influence"])}</td>'
                   f'<td class="num">{_num(r["loss"])}</td><td>{_e(why)}</td><td>{_hot_html(hot, r["id"])}</td>'
                   f'<td>{_e(snippet(texts.get(r["id"], ""), 240))}</td></tr>')
    out.append("</tbody></table>")
    if issue == "near_duplicate":
        out.append(_groups_html(report, texts))
    out.append("</section>")
    return "\n".join(out)


def render_quality_html(report: pl.DataFrame, path: str | Path, *, title: str, meta: Mapping[str, str],
                        texts: Mapping[str, str], hot_spots: pl.DataFrame | None = None) -> Path:
    """One self-contained HTML page (inline CSS, no scripts or links): a ``meta`` table, the summary by issue
    type, then per issue type (most issues first) what it means, its count and its top documents, each with its
    text and its hot spots (the tokens holding most of its self-influence, from ``hot_spots``)."""
    hot: dict[str, list[tuple[str, float]]] = {}
    if hot_spots is not None:
        for r in hot_spots.sort(["id", "rank"]).iter_rows(named=True):
            hot.setdefault(r["id"], []).append((r["token"], r["share"]))
    meta_rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in meta.items())
    order = summary(report).sort("num_issues", descending=True, maintain_order=True)["issue_type"].to_list()
    page = "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f'<header><h1>{_e(title)}</h1><table class="meta"><tbody>{meta_rows}</tbody></table></header>',
        _summary_html(report),
        *[_issue_html(report, t, texts, hot) for t in order],
        "</body></html>", ""])
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
