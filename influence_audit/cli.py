"""`influence-audit`: one entry point for every command. Thin: parse, call tasks/flows, print.

User errors (bad files, flags, models, stale factors) print one line and exit non-zero, no traceback.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

def _quiet_libraries() -> None:
    """Keep library chatter (weight-loading bars, config warnings) off the user's terminal."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Which training documents made our language model say this? EK-FAC influence audits.")
err = Console(stderr=True)
out = Console()
if __name__ == "__main__":  # `python -m influence_audit.cli`: the command modules import this module by name
    sys.modules.setdefault("influence_audit.cli", sys.modules[__name__])


class _Bar:
    """A rich progress bar fed by the engine's (documents, tokens) callback."""

    def __init__(self, label: str, total: int):
        self.progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=err,
                                 transient=True, disable=not err.is_terminal or total < 1)
        self.task = self.progress.add_task(label, total=total, rate="")
        self.t0 = time.perf_counter()

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def __call__(self, docs: int, tokens: int) -> None:
        rate = tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.progress.update(self.task, completed=docs, rate=f"{rate:,.0f} tok/s")


ModelOpt = Annotated[Path, typer.Option("--model", help="Local Hugging Face causal LM directory, or a PEFT LoRA "
                                                        "adapter directory (its base model local).")]
TrainOpt = Annotated[list[Path], typer.Option(
    "--train", help="Training data (repeatable): JSONL/Parquet files, directories of them, quoted glob patterns "
                    "('data/**/*.parquet'), or datasets save_to_disk directories.")]
SplitOpt = Annotated[str, typer.Option(help="Split of a datasets DatasetDict directory")]
IdFieldOpt = Annotated[str, typer.Option(help="Column holding the document id (absent: ids derived as NAME#ROW)")]
TextFieldOpt = Annotated[str, typer.Option(help="Column holding the document text")]
StrategyOpt = Annotated[str, typer.Option(help="identity | diagonal | kfac | ekfac")]
LayersOpt = Annotated[str, typer.Option(help="auto (lora on a LoRA adapter, else mlp) | mlp | attention | all | lora | "
                                             "a regex on module names (see `influence-audit layers`)")]
DampingOpt = Annotated[str, typer.Option(help="'auto' (0.1 x mean eigenvalue per layer) or a number")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]
PrecisionOpt = Annotated[str, typer.Option(help="fp32 | bf16 (autocast, fp32 accumulation) | fp64")]
DeviceMemoryOpt = Annotated[float | None, typer.Option(
    help="GiB of device memory the factors may take; beyond it layers are fitted in groups, and a layer that alone "
         "exceeds it is refused before any pass (default: 80% of a GPU's free memory; none on a CPU)")]
OnLongOpt = Annotated[str, typer.Option("--on-long",
                                        help="truncate (and count) or error on sequences over --max-length")]


def _check_flags(strategy: str, damping: str, on_long: str) -> None:
    """Refuse bad flag values before any data or model is read."""
    from influence_engine import get_strategy
    from influence_engine.errors import UserError
    from influence_engine.settings import normalise_damping

    get_strategy(strategy)
    if on_long not in ("truncate", "error"):
        raise UserError(f"--on-long {on_long!r}: choose 'truncate' (and count) or 'error'")
    normalise_damping(damping)


def _check_out_file(path: Path, suffix: str) -> None:
    """``--out`` must be a new or existing file with ``suffix`` in a directory that can be written."""
    from influence_engine.errors import UserError
    from tasks.inputs import check_writable

    if path.suffix.lower() != suffix:
        raise UserError(f"--out {path}: the output must be a {suffix} file")
    if path.is_dir():
        raise UserError(f"--out {path}: is a directory", hint=f"name a {suffix} file inside it")
    check_writable(path.parent, f"--out {path}")


def _spec(model: Path, layers: str, device: str, precision: str, batch_size: int, max_length: int, seed: int,
          on_long: str, trust_remote_code: bool, device_memory_gb: float | None = None):
    from tasks.pipeline import EngineSpec

    if device_memory_gb is not None and not device_memory_gb > 0:
        raise typer.BadParameter("must be > 0", param_hint="--device-memory-gb")
    return EngineSpec(str(model.resolve()), layers, device, precision, batch_size, max_length, seed, on_long,
                      trust_remote_code, device_memory_gb)


def _warn_unknown(eng, docs, where: str) -> None:
    """A word-level tokenizer maps words it does not know to one token: say how much of the text that is."""
    unk = getattr(eng.tokenizer, "unk_token_id", None)
    if unk is None:
        return
    n_unk = sum(e.input_ids.count(unk) for e in docs)
    total = sum(len(e.input_ids) for e in docs)
    if n_unk:
        err.print(f"warning: {n_unk} of {total} {where} tokens ({n_unk / max(total, 1):.1%}) are the tokenizer's "
                  f"unknown token {eng.tokenizer.unk_token!r}: its vocabulary does not cover this text",
                  highlight=False, soft_wrap=True)


def _fit_label(strategy: str, one_pass: bool) -> str:
    return f"fitting {strategy} factors" + (" (one pass: gradients kept for scoring)" if one_pass else "")


@app.command("fit-factors")
def fit_factors(model: ModelOpt, train: TrainOpt,
                out_dir: Annotated[Path, typer.Option("--out", help="Directory for factors.safetensors + .json")],
                strategy: StrategyOpt = "ekfac", layers: LayersOpt = "auto", damping: DampingOpt = "auto",
                device: DeviceOpt = "auto", precision: PrecisionOpt = "fp32", seed: int = 0,
                batch_size: Annotated[int, typer.Option(help="Documents per batch (halved on out-of-memory)")] = 8,
                max_length: int = 512, on_long: OnLongOpt = "truncate", trust_remote_code: bool = False,
                device_memory_gb: DeviceMemoryOpt = None, split: SplitOpt = "train", id_field: IdFieldOpt = "id",
                text_field: TextFieldOpt = "text") -> None:
    """Fit (E)K-FAC factors on training documents and store them."""
    from influence_engine import get_strategy
    from tasks import pipeline
    from tasks.data import Fields, data_fingerprint, read_rows
    from tasks.engine_io import encode_frame
    from tasks.inputs import check_writable

    _check_flags(strategy, damping, on_long)
    if out_dir.exists() and not out_dir.is_dir():
        raise typer.BadParameter(f"{out_dir}: is a file, not a directory", param_hint="--out")
    check_writable(out_dir, f"--out {out_dir}")
    df = read_rows(train, "train", fields=Fields(id_field, text_field), split=split)
    eng = _spec(model, layers, device, precision, batch_size, max_length, seed, on_long, trust_remote_code,
                device_memory_gb).engine()
    docs = encode_frame(eng, df, "train")
    _warn_unknown(eng, docs, "training")
    settings = eng.factor_settings(strategy, damping, data_fingerprint=data_fingerprint(df))
    passes = len(get_strategy(strategy).stages)
    with _Bar(_fit_label(strategy, False), passes * len(docs)) as bar:
        done = [0]

        def progress(d: int, t: int) -> None:
            bar(done[0] + d, t)
            if d == len(docs):
                done[0] += d

        fitted = pipeline.fit(eng, docs, settings, out_dir=out_dir, progress=progress, notice=err.print)
    truncated = sum(e.truncated for e in docs)
    err.print(f"factors for {len(fitted.factors.specs)} layers from {len(docs)} documents"
              f"{f' ({truncated} truncated to {max_length} tokens)' if truncated else ''} -> {out_dir}",
              highlight=False, soft_wrap=True)


@app.command()
def score(model: ModelOpt, train: TrainOpt,
          queries: Annotated[Path, typer.Option(help="Queries JSONL/Parquet: id, prompt, completion")],
          out_path: Annotated[Path, typer.Option("--out", help="Output Parquet: query_id, train_id, score, rank")],
          factors: Annotated[Path | None, typer.Option(help="Factors directory (fitted and stored if empty)")] = None,
          strategy: StrategyOpt = "ekfac", layers: LayersOpt = "auto",
          top_k: Annotated[int, typer.Option(help="Candidates per query; 0 writes every pair")] = 50,
          query_rank: Annotated[int, typer.Option(help="Low-rank query compression; 0 keeps them exact")] = 32,
          damping: DampingOpt = "auto", device: DeviceOpt = "auto", precision: PrecisionOpt = "fp32",
          seed: int = 0, batch_size: int = 8, max_length: int = 512, on_long: OnLongOpt = "truncate",
          gradient_cache_gb: Annotated[float, typer.Option(
              help="When factors are fitted here (kfac, ekfac) and every document's gradients fit in this many GiB "
                   "on the device, fit and score in one pass over the data; 0 never does")] = 2.0,
          prefilter: Annotated[str | None, typer.Option(
              help="bm25:K scores only each query's K most lexically similar documents")] = None,
          trust_remote_code: bool = False, device_memory_gb: DeviceMemoryOpt = None,
          verify: Annotated[int, typer.Option(help="Counterfactual check of each query's top K candidates and K "
                                                   "random documents (columns added to --out); 0 skips")] = 0,
          verify_check: Annotated[str, typer.Option(help="tail-patch or pbrf (small models)")] = "tail-patch",
          verify_lr: Annotated[float | None, typer.Option(help="Tail-patch learning rate (default: chosen)")] = None,
          split: SplitOpt = "train", id_field: IdFieldOpt = "id", text_field: TextFieldOpt = "text") -> None:
    """Rank training documents by influence on each query's completion."""
    from tasks import pipeline
    from tasks.data import Fields, data_fingerprint, read_rows
    from tasks.engine_io import encode_frame, score_frame, write_parquet_atomic

    if top_k < 0:
        raise typer.BadParameter("must be >= 0", param_hint="--top-k")
    if gradient_cache_gb < 0:
        raise typer.BadParameter("must be >= 0", param_hint="--gradient-cache-gb")
    _check_flags(strategy, damping, on_long)
    from tasks.prefilter import parse_prefilter

    k_prefilter = parse_prefilter(prefilter)
    _check_out_file(out_path, ".parquet")
    train_df = read_rows(train, "train", fields=Fields(id_field, text_field), split=split)
    query_df = read_rows(queries, "queries")
    eng = _spec(model, layers, device, precision, batch_size, max_length, seed, on_long, trust_remote_code,
                device_memory_gb).engine()
    docs = encode_frame(eng, train_df, "train")
    qs = encode_frame(eng, query_df, "queries")
    _warn_unknown(eng, docs, "training")
    _warn_unknown(eng, qs, "query")
    t0 = time.perf_counter()
    settings = eng.factor_settings(strategy, damping, data_fingerprint=data_fingerprint(train_df))
    budget = gradient_cache_gb * 2**30
    with _Bar(_fit_label(strategy, pipeline.one_pass(eng, len(docs), settings, budget)), len(docs)) as bar:
        fitted = pipeline.fit(eng, docs, settings, out_dir=factors, cache_budget_bytes=budget, progress=bar,
                              notice=err.print)
    if k_prefilter is not None:
        from tasks.prefilter import bm25_candidates, score_candidates

        cands = bm25_candidates(train_df, query_df, k_prefilter)
        rows = score_candidates(eng, docs, eng.prepare_queries(qs, fitted.factors, rank=query_rank), cands, top_k)
        err.print(f"prefilter bm25:{k_prefilter}: {len(cands.union)} of {len(docs)} documents scored "
                  f"({cands.fraction_scored:.1%}); BM25 index {cands.seconds['bm25_index_s']:.2f} s, "
                  f"queries {cands.seconds['bm25_query_s']:.2f} s", highlight=False, soft_wrap=True)
        n_tokens = sum(len(e.input_ids) for e in docs if e.id in cands.union)
    else:
        with _Bar(f"scoring {len(qs)} queries" + (" from kept gradients" if fitted.cache else ""), len(docs)) as bar:
            result = pipeline.score(eng, docs, qs, fitted, rank=query_rank, top_k=top_k, progress=bar)
        rows, n_tokens = result.top_rows(), result.n_tokens
    write_parquet_atomic(score_frame(rows), out_path)
    if verify:
        verify_scores(eng, out_path, train_df, query_df, eng.prepare_queries(qs, fitted.factors, rank=query_rank),
                      verify, verify_check, verify_lr)
    seconds = time.perf_counter() - t0
    truncated = sum(e.truncated for e in docs) + sum(q.truncated for q in qs)
    err.print(f"{len(qs)} queries x {len(docs)} documents ({n_tokens:,} tokens scored"
              f"{f'; {truncated} truncated to {max_length}' if truncated else ''}) in {seconds:.1f} s"
              f"{' (fitted and scored in one pass over the documents)' if fitted.cache is not None else ''}"
              f" -> {out_path}", highlight=False, soft_wrap=True)


def _hide_user_error_tracebacks() -> None:
    """Prefect logs a failed task or flow with its traceback; on the terminal a user error keeps only its
    one-line message (the Prefect API's copy of the log keeps the traceback)."""
    import logging

    import httpx
    from prefect.logging.configuration import ensure_logging_setup

    from influence_engine.errors import UserError

    ensure_logging_setup()  # Prefect's handlers exist from here on (later setups are incremental)

    def one_line(record: logging.LogRecord) -> bool:  # a server that went away is not a bug either
        if record.exc_info and isinstance(record.exc_info[1], (UserError, httpx.TransportError)):
            record.exc_info, record.exc_text = None, None
        return True

    for handler in logging.getLogger().handlers:
        if one_line not in handler.filters:
            handler.addFilter(one_line)


def _run_audit(params, dask: str | None = None, cluster_class: str | None = None) -> dict:
    """Check the inputs (seconds, before Prefect or MLflow start), then run the flow with one progress line per
    stage on stderr in every mode."""
    import logging

    from tasks.inputs import preflight

    preflight(params)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    progress = logging.getLogger("influence_audit.progress")
    if not progress.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        progress.addHandler(handler)
        progress.setLevel(logging.INFO)
        progress.propagate = False
    if not os.environ.get("PREFECT_API_URL"):
        err.print("starting Prefect (a temporary local server: set PREFECT_API_URL to use a running one)...",
                  highlight=False, soft_wrap=True)
    import httpx

    from flows.runners import run_audit
    from influence_engine.errors import UserError

    _hide_user_error_tracebacks()
    try:
        return run_audit(params, dask=dask, cluster_class=cluster_class)
    except RuntimeError as exc:
        if not str(exc).startswith("Failed to reach API"):
            raise
        raise UserError(f"Prefect: {exc} (PREFECT_API_URL); nothing was computed",
                        hint="start the Prefect server, or unset PREFECT_API_URL to use a temporary local one"
                        ) from None
    except httpx.TransportError as exc:
        raise UserError(f"Prefect API at {os.environ.get('PREFECT_API_URL', '(temporary server)')} went away "
                        f"during the audit ({type(exc).__name__}: {exc}); finished stages are on disk",
                        hint="rerun the same command once it is back: finished stages are reused") from None


def _print_summary(result: dict) -> None:
    m = result["metrics"]
    out.print(f"[bold green]audit {result['audit_id']} succeeded[/]  MLflow run [bold]{result['run_id']}[/]")
    if result.get("mode") == "quality":
        out.print(f"  {int(m['documents'])} documents, {int(m['tokens']):,} tokens; {int(m['flagged'])} flagged ("
                  + ", ".join(f"{t} {int(m[f'flagged_{t}'])}" for t in ("outlier", "memorised", "near_duplicate",
                                                                         "low_quality")) + ")")
        out.print("  stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items()))
        out.print(f"  report: {result['report']}")
        return
    out.print(f"  {int(m['documents'])} documents, {int(m['tokens']):,} tokens, {int(m['queries'])} queries; "
              f"factors {'reused from cache' if result['factors_cached'] else 'fitted'}")
    out.print("  stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items()), soft_wrap=True)
    if "verified_at_10" in m:
        out.print(f"  verified_at_10 = [bold]{m['verified_at_10']:.2f}[/] vs random documents "
                  f"{m['verified_random_at_10']:.2f}   Spearman(score, delta) = {m['verify_spearman']:.2f}")
    if "planted_recall_at_10" in m:
        out.print(f"  planted_recall_at_10 = [bold]{m['planted_recall_at_10']:.3f}[/]   "
                  f"planted_mrr = {m['planted_mrr']:.3f}")
    out.print(f"  candidates: {result['candidates']}", highlight=False, soft_wrap=True)


@app.command()
def audit(model: Annotated[str, typer.Option(help="Local model directory, or models:/NAME/VERSION, runs:/ID/PATH")],
          train: TrainOpt,
          queries: Annotated[Path | None, typer.Option(
              help="Query source: JSONL/Parquet with id, prompt, completion (none in --mode quality)")] = None,
          mode: Annotated[str, typer.Option(help="influence | quality (a query-free data-quality audit: "
                                                 "docs/quality.md)")] = "influence",
          n_queries: Annotated[int | None, typer.Option(help="How many queries to sample (default all)")] = None,
          sampling: Annotated[str, typer.Option(help="random | stratified")] = "random",
          stratify_by: Annotated[str | None, typer.Option(help="Column for stratified sampling")] = None,
          strategy: StrategyOpt = "ekfac", layers: LayersOpt = "auto", top_k: int = 50, query_rank: int = 32,
          damping: DampingOpt = "auto", device: DeviceOpt = "auto", precision: PrecisionOpt = "fp32",
          batch_size: int = 8, max_length: int = 512, on_long: OnLongOpt = "truncate",
          shard_size: Annotated[int, typer.Option(help="Documents per shard (unit of mapping and resume)")] = 1000,
          seed: int = 0, explain_top: int = 5,
          output_dir: Annotated[Path | None, typer.Option(help="Audits and factor cache (./.influence-audit)")] = None,
          experiment: str = "influence-audit",
          tracking_uri: Annotated[str | None, typer.Option(help="MLflow URI (default: sqlite in --output-dir)")] = None,
          planted: Annotated[Path | None, typer.Option(help="JSON {query_id: [train ids]} of known culprits")] = None,
          dask: Annotated[str | None, typer.Option(help="Run mapped stages on Dask: local, local:N or tcp://host:port")]
          = None,
          dask_cluster_class: Annotated[str | None, typer.Option(help="e.g. dask_cuda.LocalCUDACluster for GPUs")]
          = None, device_memory_gb: DeviceMemoryOpt = None,
          verify: Annotated[int, typer.Option(help="Counterfactual check of each query's top K candidates and K "
                                                   "random documents; 0 skips")] = 0,
          verify_check: Annotated[str, typer.Option(help="tail-patch or pbrf (small models)")] = "tail-patch",
          verify_lr: Annotated[float | None, typer.Option(help="Tail-patch learning rate (default: chosen)")] = None,
          split: SplitOpt = "train", id_field: IdFieldOpt = "id", text_field: TextFieldOpt = "text",
          use_index: Annotated[bool, typer.Option(help="Score by the gradient index (built once per model, data and "
                                                       "factor settings; reused after)")] = False,
          sketch: Annotated[str, typer.Option(help="With --use-index: per-layer sketch OUTxIN, or off")] = "16x16",
          refine: Annotated[int, typer.Option(help="With --use-index: re-score the top N per query exactly")] = 100,
          prefilter: Annotated[str | None, typer.Option(help="bm25:K scores only each query's K most lexically "
                                                             "similar documents")] = None) -> None:
    """Run the full audit flow: validate, sample, fit, score, merge, validate, record in MLflow, open review."""
    from influence_engine.errors import UserError
    from tasks.params import AuditParams

    if mode not in ("influence", "quality"):
        raise UserError(f"--mode {mode!r}: choose influence or quality")
    if mode == "influence" and queries is None:
        raise UserError("--queries is required", hint="give a query file, or --mode quality for a query-free audit")
    local = not model.startswith(("models:/", "runs:/"))
    params = _params(AuditParams, model=_absolute(model) if local else model, train=[_absolute(t) for t in train],
                     mode=mode, queries=_absolute(queries) if queries else None, split=split, id_field=id_field,
                     text_field=text_field, n_queries=n_queries, sampling=sampling, stratify_by=stratify_by,
                     strategy=strategy, layers=layers, top_k=top_k, query_rank=query_rank, damping=damping,
                     device=device, device_memory_gb=device_memory_gb, precision=precision,
                     batch_size=batch_size, max_length=max_length,
                     on_long=on_long, shard_size=shard_size, seed=seed, explain_top=explain_top,
                     output_dir=_absolute(output_dir) if output_dir else None, experiment=experiment,
                     tracking_uri=tracking_uri, planted=_absolute(planted) if planted else None,
                     verify_k=verify, verify_check=verify_check, verify_lr=verify_lr,
                     use_index=use_index, sketch=sketch, refine=refine, prefilter=prefilter)
    _print_summary(_run_audit(params, dask, dask_cluster_class))


def _absolute(path: str | Path) -> str:
    """Paths as the manifest records them: absolute, so the audit can be found and rerun from anywhere (a glob
    pattern keeps its pattern)."""
    return os.path.abspath(Path(path).expanduser())


def _params(cls, **values):
    """Build the flow's parameters; a refused value is one line naming its flag."""
    from pydantic import ValidationError

    from influence_engine.errors import UserError

    try:
        return cls(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UserError(f"--{'-'.join(str(x) for x in first['loc']).replace('_', '-')}: {first['msg']}") from None


@app.command()
def demo(output_dir: Annotated[Path | None, typer.Option(help="Project data directory (./.influence-audit)")] = None,
         strategy: StrategyOpt = "ekfac", seed: int = 0) -> None:
    """The embedded demo: train a tiny GPT-2 on the shipped corpus with planted facts, then audit it."""
    from importlib import resources

    from influence_audit.demo.model import ensure_demo_model
    from tasks.params import AuditParams
    from tasks.paths import resolve_home

    data = resources.files("influence_audit.demo") / "data"
    home = resolve_home(output_dir)
    err.print("training the demo model on the shipped corpus (reused when already trained)...")
    model_dir = ensure_demo_model(home / "demo-model", seed=seed)
    err.print(f"demo model: {model_dir}", highlight=False, soft_wrap=True)
    params = AuditParams(model=str(model_dir), train=[str(data / "corpus.jsonl")], queries=str(data / "queries.jsonl"),
                         strategy=strategy, top_k=10, max_length=128, shard_size=100, seed=seed,
                         output_dir=str(home), planted=str(data / "planted.json"), verify_k=10)
    result = _run_audit(params)
    _print_summary(result)
    from influence_audit.cli_ui import print_ui
    from tasks.ui import audit_ui

    typer.echo("")
    print_ui(audit_ui(home, result["audit_id"]))


from influence_audit.cli_review import review_app  # noqa: E402

app.add_typer(review_app, name="review")


from influence_audit.cli_ops import notify_retrained, webhook_app  # noqa: E402

app.command("notify-retrained")(notify_retrained)
app.add_typer(webhook_app, name="webhook")
from influence_audit.cli_sync import sync as _sync  # noqa: E402

app.command("sync")(_sync)
from influence_audit.cli_ui import ui as _ui  # noqa: E402

app.command("ui")(_ui)
from influence_audit.cli_models import layers as _layers  # noqa: E402
from influence_audit.cli_models import plan as _plan  # noqa: E402

app.command("layers")(_layers)
app.command("plan")(_plan)
from influence_audit.cli_quality import quality as _quality  # noqa: E402

app.command("quality")(_quality)
from influence_audit.cli_verify import evaluate, verify, verify_scores  # noqa: E402

app.command("verify")(verify)
app.command("evaluate")(evaluate)
from influence_audit.cli_index import index_app  # noqa: E402

app.add_typer(index_app, name="index")


def _usage_error_types() -> tuple[type[Exception], ...]:
    """Usage errors of typer's vendored click (typer >= 0.26) and of click itself."""
    import importlib

    kinds = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            kinds.append(importlib.import_module(module).ClickException)
        except (ImportError, AttributeError):  # pragma: no cover
            pass
    return tuple(kinds)


def _show_usage_error(exc: Exception) -> None:
    """One line (plus a hint) for a bad flag or command; help text when no command was given."""
    from rich.markup import escape

    if type(exc).__name__ == "NoArgsIsHelpError":
        exc.show()  # type: ignore[attr-defined]
        return
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    err.print(f"[bold red]error:[/] {escape(exc.format_message())}{escape(hint)}",  # type: ignore[attr-defined]
              highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point: user errors print one line, no traceback, exit non-zero."""
    from rich.markup import escape

    from influence_engine.errors import UserError

    _quiet_libraries()
    interrupted = "interrupted: finished stages are kept; rerun the same command to resume"
    try:
        rc = app(standalone_mode=False)
    except UserError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err.print(interrupted)
        sys.exit(130)
    except _usage_error_types() as exc:
        _show_usage_error(exc)
        sys.exit(getattr(exc, "exit_code", 2))
    except Exception as exc:
        import click

        if isinstance(exc, (click.exceptions.Exit, typer.Exit)):
            sys.exit(exc.exit_code)
        raise
    if isinstance(rc, int) and rc:  # typer turns Ctrl-C into exit code 130 when not standalone
        if rc == 130:
            err.print(interrupted)
        sys.exit(rc)


if __name__ == "__main__":
    main()
