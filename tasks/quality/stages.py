"""The quality audit's stages as Prefect tasks (the flow's ``mode: quality``; composed in ``flows/quality.py``).

Files, in the audit directory (named by what they depend on, so a rerun skips what exists)::

    shards.json, inputs/ids-*     the shards: row ranges of the sources, read in place (as an influence audit's)
    quality/counts-*.npz          per shard: token counts, shingle document frequencies, byte-bigram counts
    quality/corpus_counts.npz     the corpus's (token rarity, boilerplate shingles, character surprisal)
    quality/signals-*.parquet     per shard: self-influence, loss, text signals, MinHash signatures
    quality/hot-*.parquet         per shard: per-token self-influence hot spots
    quality_report.parquet        one row per document: scores, flags, reason, duplicate group
    hot_spots.parquet             every shard's hot spots
    candidates.parquet            review items: flagged documents keyed by issue type (query_id) and document
    validation/*.json, plots/*.png, report.html, manifest.json

Plain functions (``influence-audit sync`` calls them directly), then the Prefect tasks that wrap them (each body
is one call). The signals and the report are :mod:`tasks.quality.signals`'s, the page and plots
:mod:`tasks.quality.report`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
from prefect import get_run_logger, task

from influence_engine import Factors, FactorSettings
from influence_engine.atomic import atomic_path, write_json_atomic
from tasks.engine import EngineSpec
from tasks.files import write_parquet_atomic
from tasks.inputs.rows import encode_frame, rows_of
from tasks.inputs.shards import Inputs, Shard, read_shard, shard_ids
from tasks.options import AuditParams
from tasks.quality.signals import (
    ISSUE_TYPES,
    CorpusCounts,
    QualitySettings,
    build_report,
    document_text,
    flagged,
    review_items,
    shard_signals,
    snippet,
)
from tasks.reporting import Every, Progress

REPORT_FILE = "quality_report.parquet"
HOT_SPOTS_FILE = "hot_spots.parquet"
QUALITY_TABLE = "quality_report.json"


def settings_of(p: AuditParams) -> QualitySettings:
    return QualitySettings(cutoff=p.cutoff, near_duplicate_threshold=p.near_duplicate_threshold,
                           max_flagged=p.max_flagged, hot_spots=p.hot_spots)


def counts_path(audit_dir: str | Path, shard: Shard | None = None) -> Path:
    d = Path(audit_dir) / "quality"
    return d / ("corpus_counts.npz" if shard is None else f"counts-{shard.index:05d}-{shard.key}.npz")


def shard_token_counts(spec: EngineSpec, shard: Shard, adir: str, quality: QualitySettings | None = None) -> str:
    """The shard's counts (:class:`CorpusCounts`: tokens, shingle document frequencies, byte bigrams), which the
    text signals need over the whole corpus: read and tokenised in place, as every per-shard stage reads its
    shard."""
    path = counts_path(adir, shard)
    if not path.exists():
        from influence_engine.data import encode

        tok = spec.tokenizer()
        rows = rows_of(read_shard(shard))
        docs = encode(tok, rows, max_length=spec.max_length, on_long="truncate", where="train")
        vocab = max(len(tok), max((max(e.input_ids) for e in docs if e.input_ids), default=0) + 1)
        counts = CorpusCounts.of(docs, [document_text(r) for r in rows], vocab, quality or QualitySettings())
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            counts.save(fh)
    return str(path)


def merge_token_counts(spec: EngineSpec, adir: str, paths: list[str]) -> str:
    """The corpus's counts: the shards' summed (tokens over the model's vocabulary)."""
    path = counts_path(adir)
    if not path.exists():
        vocab_size = spec.engine().model.get_input_embeddings().num_embeddings
        total: CorpusCounts | None = None
        for x in paths:
            c = CorpusCounts.load(x)
            total = c if total is None else total + c
        assert total is not None, "no shards"
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            total.with_vocab(vocab_size).save(fh)
    return str(path)


def _signal_paths(audit_dir: str, shard: Shard) -> tuple[Path, Path]:
    d = Path(audit_dir) / "quality"
    return d / f"signals-{shard.index:05d}-{shard.key}.parquet", d / f"hot-{shard.index:05d}-{shard.key}.parquet"


def quality_shard_signals(spec: EngineSpec, settings: FactorSettings, shard: Shard, factor_dir: str, adir: str,
                          quality: QualitySettings, progress: Progress | None = None) -> str:
    """One pass over a shard: self-influence, loss and hot spots per document, plus the text signals."""
    signals_path, hot_path = _signal_paths(adir, shard)
    if not signals_path.exists():
        eng = spec.engine()
        factors = Factors.load(factor_dir, settings=settings, layers=list(eng.specs))
        df = read_shard(shard)
        docs = encode_frame(eng, df, "train")
        counts = CorpusCounts.load(counts_path(adir))
        signals, hot = shard_signals(eng, df.to_dicts(), docs, factors, counts, quality, progress)
        write_parquet_atomic(hot, hot_path)  # first: the signals file marks the shard done
        write_parquet_atomic(signals, signals_path)
    return str(signals_path)


def _texts(inputs: Inputs, ids: set[str] | None = None) -> dict[str, str]:
    """Document texts by id (only ``ids`` when given), read shard by shard; shards that hold none of ``ids`` (by
    their ids files) are not read."""
    out: dict[str, str] = {}
    for s in inputs.shards:
        if ids is not None and s.ids_path and not pl.read_parquet(s.ids_path, columns=["id"])["id"].is_in(
                list(ids)).any():
            continue
        df = read_shard(s)
        df = df.select([c for c in df.columns if c in ("id", "text", "prompt", "completion", "messages")])
        if ids is not None:
            df = df.filter(pl.col("id").is_in(list(ids)))
        out |= {r["id"]: document_text(r) for r in df.iter_rows(named=True)}
    return out


def quality_paths(audit_dir: str | Path) -> dict[str, str]:
    """The report, the hot spots and the review items of a quality audit."""
    d = Path(audit_dir)
    return {"report": str(d / REPORT_FILE), "hot_spots": str(d / HOT_SPOTS_FILE),
            "candidates": str(d / "candidates.parquet")}


def merge_quality_report(inputs: Inputs, signal_paths: list[str], settings: QualitySettings) -> dict[str, str]:
    """Combine every shard's signals into the report (the scores need the whole corpus's distribution and
    near-duplicate groups cross shards), gather the hot spots and write the review items."""
    paths = quality_paths(inputs.audit_dir)
    if Path(paths["candidates"]).exists():
        return paths
    signals = pl.concat([pl.read_parquet(x) for x in signal_paths], how="vertical")
    report = build_report(signals, settings)
    hot = pl.concat([pl.read_parquet(str(x).replace("/signals-", "/hot-")) for x in signal_paths], how="vertical")
    write_parquet_atomic(report, paths["report"])
    write_parquet_atomic(hot, paths["hot_spots"])
    texts = _texts(inputs, set(flagged(report)["id"].to_list()))
    write_parquet_atomic(review_items(report, texts), paths["candidates"])  # last: marks the stage done
    return paths


def validate_quality_outputs(inputs: Inputs, report_path: str, log: Any = None) -> dict:
    from tasks.quality.checks import validate_quality_report

    report = pl.read_parquet(report_path)
    train_ids = shard_ids(inputs).collect()["id"]
    result = validate_quality_report(report, train_ids=train_ids)
    out = result.to_json()
    write_json_atomic(Path(inputs.audit_dir) / "validation" / "quality_report.json", out)
    if not result.success and log is not None:
        log.error(result.summary())
    return out


def quality_metrics(report: pl.DataFrame, inputs: Inputs, stage_seconds: dict[str, float],
                    factors_cached: bool) -> dict[str, float]:
    n_flagged = flagged(report).height
    metrics = {"documents": inputs.n_docs, "tokens": inputs.n_tokens, "truncated_documents": inputs.n_truncated,
               "flagged": n_flagged, "flagged_fraction": n_flagged / max(report.height, 1),
               "factors_cached": float(factors_cached),
               "self_influence_median": float(report["self_influence"].median() or 0.0),
               "loss_median": float(report["loss"].median() or 0.0)}
    metrics |= {f"flagged_{t}": int(report[t].sum()) for t in ISSUE_TYPES}
    metrics |= {f"seconds_{k}": v for k, v in stage_seconds.items()}
    if stage_seconds.get("quality_signals", 0) > 0:
        metrics["quality_tokens_per_s"] = inputs.n_tokens / stage_seconds["quality_signals"]
    return metrics


def render_outputs(p: AuditParams, inputs: Inputs, run_id: str | None, paths: dict[str, str]) -> list[Path]:
    """The plots and report.html of the audit directory: [plots..., report.html]."""
    from tasks.quality.report import plot_loss_vs_self_influence, plot_self_influence, render_quality_html

    d = Path(inputs.audit_dir)
    report = pl.read_parquet(paths["report"])
    hot = pl.read_parquet(paths["hot_spots"])
    plots = [plot_self_influence(report, d / "plots" / "self_influence.png"),
             plot_loss_vs_self_influence(report, d / "plots" / "loss_vs_self_influence.png")]
    html = render_quality_html(report, d / "report.html", title=f"Training-data quality audit {inputs.audit_id}",
                               texts=_texts(inputs), hot_spots=hot,
                               meta={"audit id": inputs.audit_id, "MLflow run": run_id or "(not recorded)",
                                     "model": p.model, "model fingerprint": inputs.model_fingerprint[:16],
                                     "strategy": p.strategy, "layers": p.layers, "documents": str(inputs.n_docs),
                                     "flag cutoff (robust z)": str(p.cutoff),
                                     "near-duplicate threshold": str(p.near_duplicate_threshold),
                                     "max flagged": str(p.max_flagged)})
    return [*plots, html]


def record_quality(p: AuditParams, inputs: Inputs, run_id: str, paths: dict[str, str], validation: dict[str, dict],
                   stage_seconds: dict[str, float], factors_cached: bool) -> dict[str, float]:
    """Metrics, the review items (``candidates.json``), the whole report as the table ``quality_report.json``,
    both Parquets, validation reports, plots and report.html on the audit's MLflow run."""
    from tasks.record.tracker import record_audit_results, tracker

    report = pl.read_parquet(paths["report"])
    metrics = quality_metrics(report, inputs, stage_seconds, factors_cached)
    *plots, html = render_outputs(p, inputs, run_id, paths)
    manifest = Path(inputs.audit_dir) / "manifest.json"
    record_audit_results(run_id, candidates=pl.read_parquet(paths["candidates"]),
                         candidates_parquet=Path(paths["candidates"]), metrics=metrics,
                         validation_reports=validation, plots=plots, html_report=html,
                         extra_artifacts=[Path(paths["report"]), Path(paths["hot_spots"]),
                                          *([manifest] if manifest.exists() else [])])
    table = report.select("id", "self_influence", "loss", *[c for t in ISSUE_TYPES for c in (f"{t}_score", t)],
                          "reason", "duplicate_group")
    tracker().replace_table(run_id, table, QUALITY_TABLE)
    return metrics


def open_quality_review(p: AuditParams, inputs: Inputs, run_id: str, candidates_path: str) -> str:
    """Hand the flagged documents to people: a Prefect markdown artifact per audit, by issue type."""
    from prefect.artifacts import create_markdown_artifact

    items = pl.read_parquet(candidates_path)
    lines = [f"# Quality audit `{inputs.audit_id}`: review open", "",
             f"MLflow run `{run_id}` (experiment `{p.experiment}`): `quality_report.json`, `candidates.json` (the "
             "flagged documents by issue type) and `report.html` are in its artifacts. Flags are a screen, not a "
             "verdict.", "", f"Review in a terminal: `influence-audit review show {inputs.audit_id}`; decide with "
             f"`influence-audit review submit {inputs.audit_id} --reviewer NAME --decision ISSUE:DOC_ID:VERDICT` "
             "(ISSUE is one of " + ", ".join(ISSUE_TYPES) + ").", ""]
    for t in ISSUE_TYPES:
        rows = items.filter(pl.col("query_id") == t)
        lines += [f"## {t} ({rows.height} flagged)", ""]
        if rows.height:
            lines += ["| rank | document | score | [why] snippet |", "|---|---|---|---|"]
            for r in rows.head(20).iter_rows(named=True):
                lines.append(f"| {r['rank']} | `{r['train_id']}` | {r['score']:.3f} | "
                             f"{snippet(r['snippet'], 200).replace('|', chr(92) + '|')} |")
            lines.append("")
    return str(create_markdown_artifact(key=f"quality-{inputs.audit_id.lower()}-review", markdown="\n".join(lines),
                                        description=f"Review quality audit {inputs.audit_id}"))


# ------------------------------------------------------------------------------------------------- Prefect


@task(name="quality-token-counts-shard")
def shard_token_counts_task(spec: EngineSpec, shard: Shard, adir: str, quality: QualitySettings) -> str:
    return shard_token_counts(spec, shard, adir, quality)


@task(name="merge-token-counts")
def merge_token_counts_task(spec: EngineSpec, adir: str, paths: list[str]) -> str:
    return merge_token_counts(spec, adir, paths)


@task(name="quality-signals-shard")
def quality_shard(spec: EngineSpec, settings: FactorSettings, shard: Shard, factor_dir: str, adir: str,
                  quality: QualitySettings) -> str:
    progress = Every(get_run_logger().info, f"quality signals, shard {shard.index}", shard.n_docs)
    return quality_shard_signals(spec, settings, shard, factor_dir, adir, quality, progress)


@task(name="merge-quality-report")
def merge_quality_report_task(inputs: Inputs, signal_paths: list[str], quality: QualitySettings) -> dict[str, str]:
    return merge_quality_report(inputs, signal_paths, quality)


@task(name="validate-quality-report")
def validate_quality_task(inputs: Inputs, report_path: str) -> dict:
    return validate_quality_outputs(inputs, report_path, get_run_logger())


@task(name="record-quality-in-mlflow")
def record_quality_task(p: AuditParams, inputs: Inputs, run_id: str, paths: dict[str, str],
                        validation: dict[str, dict], stage_seconds: dict[str, float],
                        factors_cached: bool) -> dict[str, float]:
    return record_quality(p, inputs, run_id, paths, validation, stage_seconds, factors_cached)


@task(name="open-quality-review")
def open_quality_review_task(p: AuditParams, inputs: Inputs, run_id: str, candidates_path: str) -> str:
    return open_quality_review(p, inputs, run_id, candidates_path)
