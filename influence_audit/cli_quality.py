"""``influence-audit quality``: a query-free data-quality report of the training documents.

Registered on the main app in ``influence_audit/cli.py``; the work is :func:`tasks.quality.commands.quality`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from influence_audit.console import REPORT, err, out
from influence_audit.options import Opts, takes

__all__ = ["quality"]


@takes("model", "data", "factors", "runtime", "quality")
def quality(out_path: Annotated[Path, typer.Option(
                "--out", help="Report Parquet: one row per document (per-token hot spots go beside it, "
                              "REPORT.tokens.parquet)")],
            factors: Annotated[Path | None, typer.Option(help="Factors directory (fitted and stored if empty)")] = None,
            html: Annotated[Path | None, typer.Option(help="Also write the HTML report here")] = None,
            opts: Opts = None) -> None:
    """Flag outliers, memorised, near-duplicate and low-quality training documents (no queries needed)."""
    from tasks.quality.commands import quality as run

    r = run(opts.model, opts.data, opts.factors, opts.runtime, opts.quality, out_path=out_path, factors_dir=factors,
            html=html, report=REPORT)
    out.print(escape(r.terminal), highlight=False, soft_wrap=True)
    err.print(f"{r.report.height} documents in {r.seconds:.1f} s -> {escape(str(r.out_path))}, "
              f"{escape(str(r.tokens_path))}" + (f", {escape(str(r.html))}" if r.html else ""), highlight=False)
