"""`influence-audit index build | query`: new queries against a corpus without another pass over it.

Thin: the work is :func:`tasks.influence.commands.index_build` / :func:`~tasks.influence.commands.index_query`
(and the maths :mod:`influence_engine.index`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from influence_audit.console import REPORT, err
from influence_audit.options import Opts, takes

index_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                        rich_markup_mode=None,
                        help="A gradient index: one pass over the corpus, then new queries in seconds.")


@index_app.command("build")
@takes("model", "data", "factors", "runtime", "cache", fields={"index": ("sketch", "probes", "probe_queries")})
def build(out_dir: Annotated[Path, typer.Option("--out", help="Index directory (a build resumes there)")],
          factors: Annotated[Path | None, typer.Option(
              help="Factors directory (fitted and stored if empty; default OUT/factors)")] = None,
          index_dtype: Annotated[str, typer.Option(help="auto (fp64 with --precision fp64, else fp16) | fp16 | fp32 "
                                                        "| fp64")] = "auto",
          part_size: Annotated[int, typer.Option(help="Documents per index part (unit of resume)")] = 10000,
          opts: Opts = None) -> None:
    """One pass over the corpus: each document's whitened, sketched EK-FAC gradient, memory-mapped."""
    from tasks.influence.commands import index_build

    r = index_build(opts.model, opts.data, opts.factors, opts.runtime, opts.index, opts.cache, out_dir=out_dir,
                    factors_dir=factors, index_dtype=index_dtype, part_size=part_size, report=REPORT)
    err.print(f"indexed {r.documents} documents ({r.bytes_per_document:,.0f} bytes each, sketch {r.sketch}, "
              f"{r.dtype}) in {r.seconds:.1f} s -> {r.out_dir}", highlight=False, soft_wrap=True)
    if r.probe_recall:
        err.print(recall_line(r.probe_recall), highlight=False, soft_wrap=True)


def recall_line(rec: dict) -> str:
    """The index's own recall, measured on its probes at build."""
    at_k = next(v for key, v in rec.items() if key.startswith("recall_at_"))
    within = ", ".join(f"{v:.2f} within its top {key.rsplit('_', 1)[1]}" for key, v in rec.items()
                       if key.startswith("top") and "_within_" in key)
    return (f"index recall on {rec['probes']} probe queries (measured at build): recall@{rec['k']} {at_k:.2f}"
            + (f"; of the exact top {rec['k']}, {within}" if within else ""))


@index_app.command("query")
@takes(fields={"queries": ("queries", "top_k"), "index": ("refine",), "runtime": ("device", "batch_size"),
               "model": ("trust_remote_code",)}, required=("queries",))
def query(index: Annotated[Path, typer.Option("--index", help="Index directory (from `index build`)")],
          out_path: Annotated[Path, typer.Option("--out", help="Output Parquet: query_id, train_id, score, rank, "
                                                               "index_score, refined")],
          model: Annotated[Path | None, typer.Option(help="The model, if not where the index says (fingerprint "
                                                          "checked)")] = None,
          search: Annotated[str, typer.Option(help="exact (blocked products) | faiss (HNSW, approximate)")] = "exact",
          opts: Opts = None) -> None:
    """Score new queries against an index: only the queries' gradients are computed."""
    from tasks.influence.commands import index_query

    r = index_query(index, opts.queries, opts.index, opts.runtime, out_path=out_path, model_dir=model, search=search,
                    trust_remote_code=opts.model.trust_remote_code, report=REPORT)
    t = r.times
    err.print(f"{r.n_queries} queries: gradients {t.queries:.2f} s, search {t.search:.2f} s"
              + (f", refined {t.refined_docs} documents exactly in {t.refine:.2f} s (of {t.candidates} candidates; "
                 f"{t.certified} of {r.n_queries} top lists certified exact)" if r.refine else "")
              + f" (total {r.seconds:.1f} s) -> {r.out_path}", highlight=False, soft_wrap=True)
    err.print(recall_line(r.probe_recall) if r.probe_recall else "index recall: not measured (no probes at build)",
              highlight=False, soft_wrap=True)
