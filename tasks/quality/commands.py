"""``influence-audit quality`` as a function: the report of every training document, returned for printing."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from influence_engine.errors import UserError
from tasks.files import check_out_file, write_parquet_atomic
from tasks.influence import compute
from tasks.influence.commands import load_corpus
from tasks.options import DataOptions, FactorOptions, ModelOptions, QualityOptions, RuntimeOptions
from tasks.quality.report import render_quality_html, terminal_report
from tasks.quality.signals import QualitySettings, document_text, hot_spots_path, quality_report
from tasks.reporting import Reporter, Silent


@dataclass
class QualityRun:
    report: pl.DataFrame
    out_path: Path
    tokens_path: Path
    html: Path | None
    terminal: str
    seconds: float


def quality_settings(q: QualityOptions) -> QualitySettings:
    settings = QualitySettings(cutoff=q.cutoff, near_duplicate_threshold=q.near_duplicate_threshold,
                               max_flagged=q.max_flagged, hot_spots=q.hot_spots)
    settings.check()
    return settings


def quality(model: ModelOptions, data: DataOptions, factors: FactorOptions, runtime: RuntimeOptions,
            quality_options: QualityOptions, *, out_path: Path, factors_dir: Path | None = None,
            html: Path | None = None, report: Reporter | None = None) -> QualityRun:
    """Fit (or reuse) factors, then per document its signals and issues; writes the report Parquet, the per-token
    hot spots beside it and, with ``html``, the HTML page."""
    report = report or Silent()
    check_out_file(out_path, ".parquet")
    settings = quality_settings(quality_options)
    if html is not None and html.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--html {html}: give an .html file")
    corpus = load_corpus(model, data, factors, runtime, report)
    t0 = time.perf_counter()
    with report.stage(f"fitting {factors.strategy} factors", len(corpus.docs)) as bar:
        fitted = compute.fit(corpus.engine, corpus.docs, corpus.settings, out_dir=factors_dir, progress=bar,
                             notice=report.notice).factors
    with report.stage("self-influence, loss and hot spots", len(corpus.docs)) as bar:
        frame, hot = quality_report(corpus.engine, corpus.frame, corpus.docs, fitted, settings, bar)
    write_parquet_atomic(frame, out_path)
    tokens_path = hot_spots_path(out_path)
    write_parquet_atomic(hot, tokens_path)
    texts = {r["id"]: document_text(r) for r in corpus.frame.select(
        [c for c in ("id", "text", "prompt", "completion") if c in corpus.frame.columns]).iter_rows(named=True)}
    if html is not None:
        render_quality_html(frame, html, title="Training-data quality report", texts=texts, hot_spots=hot,
                            meta={"model": model.model, "strategy": factors.strategy, "layers": factors.layers,
                                  "documents": str(frame.height)})
    return QualityRun(frame, out_path, tokens_path, html, terminal_report(frame, texts), time.perf_counter() - t0)
