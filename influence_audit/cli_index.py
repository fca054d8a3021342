"""`influence-audit index build | query`: new queries against a corpus without another pass over it.

Thin: the work is in :mod:`tasks.index` (and the maths in :mod:`influence_engine.index`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

index_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                        rich_markup_mode=None,
                        help="A gradient index: one pass over the corpus, then new queries in seconds.")
err = Console(stderr=True)

SketchOpt = Annotated[str, typer.Option(help="Per-layer two-sided random projection OUTxIN (e.g. 16x16), or off "
                                             "(exact scores; large)")]


@index_app.command("build")
def build(model: Annotated[Path, typer.Option("--model", help="Local Hugging Face causal LM directory.")],
          train: Annotated[list[Path], typer.Option("--train", help="Training JSONL/Parquet file(s) or a directory.")],
          out_dir: Annotated[Path, typer.Option("--out", help="Index directory (a build resumes there)")],
          factors: Annotated[Path | None, typer.Option(
              help="Factors directory (fitted and stored if empty; default OUT/factors)")] = None,
          strategy: Annotated[str, typer.Option(help="ekfac | kfac | diagonal | identity")] = "ekfac",
          layers: Annotated[str, typer.Option(help="mlp | attention | all | a regex on module names")] = "mlp",
          sketch: SketchOpt = "16x16",
          index_dtype: Annotated[str, typer.Option(help="auto (fp64 with --precision fp64, else fp16) | fp16 | fp32 "
                                                        "| fp64")] = "auto",
          damping: str = "auto", device: str = "auto",
          precision: Annotated[str, typer.Option(help="fp32 | bf16 | fp64")] = "fp32", seed: int = 0,
          batch_size: int = 8, max_length: int = 512, on_long: str = "truncate",
          part_size: Annotated[int, typer.Option(help="Documents per index part (unit of resume)")] = 10000,
          gradient_cache_gb: Annotated[float, typer.Option(
              help="When factors are fitted here and every document's gradients fit in this many GiB, fit and "
                   "index in one pass; 0 never does")] = 2.0,
          trust_remote_code: bool = False) -> None:
    """One pass over the corpus: each document's whitened, sketched EK-FAC gradient, memory-mapped."""
    from influence_audit.cli import _Bar, _check_flags, _spec, _warn_unknown
    from influence_engine.index import check_strategy
    from tasks import index as ix
    from tasks.data import data_fingerprint, read_rows
    from tasks.engine_io import encode_frame
    from tasks.inputs import check_writable

    _check_flags(strategy, damping, on_long)
    check_strategy(strategy)
    options = ix.IndexOptions(sketch=sketch, dtype=index_dtype)
    options.check()
    if part_size < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--part-size")
    if out_dir.exists() and not out_dir.is_dir():
        raise typer.BadParameter(f"{out_dir}: is a file, not a directory", param_hint="--out")
    check_writable(out_dir, f"--out {out_dir}")
    df = read_rows(train, "train")
    eng = _spec(model, layers, device, precision, batch_size, max_length, seed, on_long, trust_remote_code).engine()
    docs = encode_frame(eng, df, "train")
    _warn_unknown(eng, docs, "training")
    settings = eng.factor_settings(strategy, damping, data_fingerprint=data_fingerprint(df))
    t0 = time.perf_counter()
    with _Bar("fitting factors and indexing", len(docs)) as bar:
        index = ix.build(eng, docs, settings, out_dir, options=options, factors_dir=factors,
                         cache_budget_bytes=gradient_cache_gb * 2**30, part_size=part_size,
                         sources=[str(p.resolve()) for p in train], model_dir=str(model.resolve()), progress=bar,
                         notice=err.print)
    size = ix.index_size(index)
    err.print(f"indexed {int(size['documents'])} documents ({size['bytes_per_document']:,.0f} bytes each, sketch "
              f"{index.meta['sketch']}, {index.meta['dtype']}) in {time.perf_counter() - t0:.1f} s -> {out_dir}",
              highlight=False, soft_wrap=True)


@index_app.command("query")
def query(index: Annotated[Path, typer.Option("--index", help="Index directory (from `index build`)")],
          queries: Annotated[Path, typer.Option(help="Queries JSONL/Parquet: id, prompt, completion")],
          out_path: Annotated[Path, typer.Option("--out", help="Output Parquet: query_id, train_id, score, rank, "
                                                               "index_score, refined")],
          top_k: Annotated[int, typer.Option(help="Documents per query")] = 50,
          refine: Annotated[int, typer.Option(help="Re-score the top M per query with the full EK-FAC (exact) and "
                                                   "rerank; 0 keeps the index's scores")] = 0,
          model: Annotated[Path | None, typer.Option(help="The model, if not where the index says (fingerprint "
                                                          "checked)")] = None,
          search: Annotated[str, typer.Option(help="exact (blocked products) | faiss (HNSW, approximate)")] = "exact",
          device: str = "auto", batch_size: int = 8, trust_remote_code: bool = False) -> None:
    """Score new queries against an index: only the queries' gradients are computed."""
    from influence_audit.cli import _check_out_file
    from tasks import index as ix
    from tasks.data import read_rows
    from tasks.engine_io import write_parquet_atomic

    if top_k < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--top-k")
    if refine < 0:
        raise typer.BadParameter("must be >= 0", param_hint="--refine")
    _check_out_file(out_path, ".parquet")
    qdf = read_rows(queries, "queries")
    t0 = time.perf_counter()
    times = ix.QueryTimes()
    result = ix.query(index, qdf, top_k=top_k, refine=refine, model_dir=str(model) if model else None,
                      device=device, batch_size=batch_size, search=search, trust_remote_code=trust_remote_code,
                      notice=err.print, times=times)
    write_parquet_atomic(result, out_path)
    err.print(f"{qdf.height} queries: gradients {times.queries:.2f} s, search {times.search:.2f} s"
              + (f", refined {times.refined_docs} documents exactly in {times.refine:.2f} s" if refine else "")
              + f" (total {time.perf_counter() - t0:.1f} s) -> {out_path}", highlight=False, soft_wrap=True)
