"""``influence-audit quality``: a query-free data-quality report of the training documents.

Registered on the main app in ``influence_audit/cli.py``; the work is in :mod:`tasks.quality`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["quality"]

err = Console(stderr=True)
out = Console()


def quality(model: Annotated[Path, typer.Option("--model", help="Local Hugging Face causal LM directory.")],
            train: Annotated[list[Path], typer.Option("--train", help="Training JSONL/Parquet file(s) or a directory")],
            out_path: Annotated[Path, typer.Option(
                "--out", help="Report Parquet: one row per document (per-token hot spots go beside it, "
                              "REPORT.tokens.parquet)")],
            factors: Annotated[Path | None, typer.Option(help="Factors directory (fitted and stored if empty)")] = None,
            strategy: Annotated[str, typer.Option(help="identity | diagonal | kfac | ekfac")] = "ekfac",
            layers: Annotated[str, typer.Option(help="auto (lora on a LoRA adapter, else mlp) | mlp | attention | "
                                                      "all | lora | a regex on module names")] = "auto",
            damping: Annotated[str, typer.Option(help="'auto' (0.1 x mean eigenvalue per layer) or a number")] = "auto",
            device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
            precision: Annotated[str, typer.Option(help="fp32 | bf16 | fp64")] = "fp32",
            seed: int = 0, batch_size: int = 8, max_length: int = 512,
            on_long: Annotated[str, typer.Option("--on-long", help="truncate (and count) or error")] = "truncate",
            cutoff: Annotated[float, typer.Option(help="Robust z-score from which an issue is flagged")] = 3.5,
            near_duplicate_threshold: Annotated[float, typer.Option(
                help="Jaccard similarity (character 5-grams) from which documents are near duplicates")] = 0.7,
            hot_spots: Annotated[int, typer.Option(help="Token positions per document in the per-token Parquet "
                                                        "(0: every token)")] = 10,
            html: Annotated[Path | None, typer.Option(help="Also write the HTML report here")] = None,
            device_memory_gb: Annotated[float | None, typer.Option(
                help="Device memory for factors in GiB (layers fitted in groups beyond it)")] = None,
            trust_remote_code: bool = False) -> None:
    """Flag outliers, memorised, near-duplicate and low-quality training documents (no queries needed)."""
    from influence_audit.cli import _Bar, _check_flags, _check_out_file, _spec, _warn_unknown
    from influence_engine.errors import UserError
    from tasks import pipeline
    from tasks.data import data_fingerprint, read_rows
    from tasks.engine_io import encode_frame, write_parquet_atomic
    from tasks.quality import QualitySettings, document_text, hot_spots_path, quality_report
    from tasks.quality_report import render_quality_html, terminal_report

    _check_flags(strategy, damping, on_long)
    _check_out_file(out_path, ".parquet")
    settings = QualitySettings(cutoff=cutoff, near_duplicate_threshold=near_duplicate_threshold, hot_spots=hot_spots)
    settings.check()
    if html is not None and html.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--html {html}: give an .html file")
    train_df = read_rows(train, "train")
    eng = _spec(model, layers, device, precision, batch_size, max_length, seed, on_long, trust_remote_code,
                device_memory_gb).engine()
    docs = encode_frame(eng, train_df, "train")
    _warn_unknown(eng, docs, "training")
    t0 = time.perf_counter()
    factor_settings = eng.factor_settings(strategy, damping, data_fingerprint=data_fingerprint(train_df))
    with _Bar(f"fitting {strategy} factors", len(docs)) as bar:
        fitted = pipeline.fit(eng, docs, factor_settings, out_dir=factors, progress=bar, notice=err.print).factors
    with _Bar("self-influence, loss and hot spots", len(docs)) as bar:
        report, hot = quality_report(eng, train_df, docs, fitted, settings, bar)
    write_parquet_atomic(report, out_path)
    tokens_path = hot_spots_path(out_path)
    write_parquet_atomic(hot, tokens_path)
    texts = {r["id"]: document_text(r) for r in train_df.select(
        [c for c in ("id", "text", "prompt", "completion") if c in train_df.columns]).iter_rows(named=True)}
    if html is not None:
        render_quality_html(report, html, title="Training-data quality report", texts=texts, hot_spots=hot,
                            meta={"model": str(model), "strategy": strategy, "layers": layers,
                                  "documents": str(report.height)})
    out.print(escape(terminal_report(report, texts)), highlight=False, soft_wrap=True)
    err.print(f"{report.height} documents in {time.perf_counter() - t0:.1f} s -> {escape(str(out_path))}, "
              f"{escape(str(tokens_path))}" + (f", {escape(str(html))}" if html else ""), highlight=False)
