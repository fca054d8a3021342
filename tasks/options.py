"""Every option, declared once: name, type, default, help and validation, in groups.

The groups are pydantic models. :class:`AuditParams` (the flow's parameters, a form in the Prefect UI, validated by
deployments) is all of them together; the CLI builds each command's flags from the groups that command takes
(``influence_audit/options.py``), so an option added here appears, with the same flag, default and help, on every
command that takes its group; the engine spec and the factor settings are built from the same values
(:func:`engine_spec`, :func:`factor_settings`).

A field's flag is ``--`` + its name with dashes, unless its ``cli`` metadata names another (``verify_k`` is
``--verify``) or adds aliases. Validation that the engine owns (strategies, damping, Fisher, precision) is asked
of the engine, so it is written once.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from influence_engine.errors import UserError

if TYPE_CHECKING:  # imported where used: the CLI reads these declarations without loading torch
    from influence_engine import FactorSettings
    from tasks.engine import EngineSpec
    from tasks.inputs.rows import Fields

__all__ = [
    "GROUPS", "AuditOptions", "AuditRef", "AuditParams", "CacheOptions", "DataOptions", "FactorOptions", "IndexOptions",
    "ModelOptions", "OutputOptions",
    "QualityOptions", "QueryOptions", "RuntimeOptions", "SamplingOptions", "SearchOptions", "VerifyOptions",
    "engine_spec", "factor_settings", "fields_of", "flag_of", "parse_prefilter",
]


def option(default: Any = ..., help: str = "", *, flag: str | None = None, aliases: tuple[str, ...] = (),
           metavar: str | None = None, **constraints: Any) -> Any:
    """A declared option: pydantic's ``Field`` with its help text and, for the CLI, its flag (default: the field
    name with dashes) and aliases."""
    cli = {k: v for k, v in (("flag", flag), ("aliases", list(aliases)), ("metavar", metavar)) if v}
    return Field(default, description=help, json_schema_extra={"cli": cli} if cli else None, **constraints)


def flag_of(model: type[BaseModel], name: str) -> str:
    """The CLI flag of field ``name`` (``--top-k``)."""
    extra = model.model_fields[name].json_schema_extra or {}
    cli = extra.get("cli", {}) if isinstance(extra, dict) else {}
    return cli.get("flag") or "--" + name.replace("_", "-")


DEFAULT_DAMPING = "auto:0.0001"  # chosen by the paired LDS gain over kronfluence on both benchmarks (issue 25)
DEFAULT_FISHER = "empirical"
# chosen on the demo and the held-out corpus (docs/performance.md, the index section; issue 23)
DEFAULT_SKETCH = "lowrank:4x2"


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------------------------------- groups
class ModelOptions(_Group):
    """Which model."""

    model: str = option(help="A Hugging Face causal LM directory, a PEFT LoRA adapter directory (its base model "
                             "local), a .gguf file, or an MLflow URI: models:/NAME/VERSION, models:/NAME@ALIAS, "
                             "runs:/ID/PATH", metavar="DIR|FILE|URI")
    trust_remote_code: bool = option(False, help="Run the model repository's own Python code (only for models you "
                                                 "trust)")


class CheckpointOptions(_Group):
    """Other checkpoints of the model, whose influence is averaged with the model's (TRAK-style ensembles)."""

    checkpoint: list[str] = option([], metavar="DIR|URI", help="Another checkpoint of the same model (repeatable; "
                                   "a directory or an MLflow URI, as --model): each is fitted (factors cached by its "
                                   "own weights) and scored on its own, and the scores are averaged with the "
                                   "model's")


class DataOptions(_Group):
    """Which training documents, and how to read them."""

    train: list[str] = option(help="Training data (repeatable): JSONL/Parquet files, directories of them, quoted "
                                   "glob patterns ('data/**/*.parquet'), or datasets save_to_disk directories",
                              min_length=1, metavar="DATA")
    split: str = option("train", help="The split of a datasets DatasetDict directory")
    id_field: str = option("id", help="Column holding the document id (absent: ids derived as NAME#ROW)")
    text_field: str = option("text", help="Column holding the document text")


class FactorOptions(_Group):
    """What the factors (and so the scores) depend on, besides the model and the data."""

    strategy: Literal["identity", "diagonal", "kfac", "ekfac"] = option(
        "ekfac", help="Hessian approximation: identity | diagonal | kfac | ekfac")
    layers: str = option("auto", help="auto (lora on a LoRA adapter, else mlp) | mlp | attention | all | lora | a "
                                      "regex on module names (see `influence-audit layers`)")
    # defaults chosen on two LDS benchmarks (docs/method.md, "Defaults chosen on two benchmarks"); FactorSettings
    # keeps its own defaults (auto, sampled) as the cache-key baseline, so these are recorded in every new key
    damping: str = option(DEFAULT_DAMPING, help="auto:X (X x the mean eigenvalue of each layer; auto = auto:0.1, "
                                                "kronfluence's rule) or one number for every layer")
    fisher: Literal["sampled", "empirical"] = option(
        DEFAULT_FISHER, help="empirical (the data's own labels: no seed dependence) | sampled (labels drawn from the "
                             "model: the Gauss-Newton Hessian, seeded by --seed)")
    precision: Literal["fp32", "bf16", "fp64"] = option("fp32", help="fp32 | bf16 (autocast, fp32 accumulation) | "
                                                                     "fp64")
    max_length: int = option(512, ge=2, help="Tokens per document and query")
    on_long: Literal["truncate", "error"] = option("truncate", help="truncate (and count) or error on sequences "
                                                                    "over --max-length")
    seed: int = option(0, help="Seed of the sampled Fisher labels and of query sampling")

    @field_validator("damping")
    @classmethod
    def _damping(cls, v: str) -> str:
        from influence_engine.settings import normalise_damping

        try:
            normalise_damping(v)
        except UserError as exc:
            raise ValueError(str(exc).split(": ", 1)[-1]) from None
        return v


class RuntimeOptions(_Group):
    """How the work runs (never what it computes)."""

    device: str = option("auto", help="auto | cpu | cuda | cuda:N")
    batch_size: int = option(8, ge=1, help="Documents per batch (halved on out-of-memory)")
    device_memory_gb: float | None = option(
        None, gt=0, help="GiB of device memory the factors may take; beyond it layers are fitted in groups, and a "
                         "layer that alone exceeds it is refused before any pass (default: 80% of a GPU's free "
                         "memory; none on a CPU)")
    threads: int | None = option(
        None, ge=1, help="CPU threads torch uses in each process that computes (default: torch's own, one per "
                         "core); 1 is often faster on a shared or busy machine. Never changes what is computed "
                         "beyond the last bits of a sum")


class QueryOptions(_Group):
    """What is asked: the queries and how many candidates each gets."""

    queries: str | None = option(None, help="Queries: JSONL/Parquet with id, prompt, completion, or id and chat "
                                            "messages ending with the assistant's reply", metavar="FILE")
    top_k: int = option(50, ge=0, help="Candidates per query (0 = every document)")
    query_rank: int = option(32, ge=0, help="Low-rank query compression (0 = exact)")


class SamplingOptions(_Group):
    """Which of the queries an audit takes, and what it explains and measures."""

    n_queries: int | None = option(None, ge=1, help="How many queries to sample (default: all)")
    sampling: Literal["random", "stratified"] = option("random", help="random | stratified")
    stratify_by: str | None = option(None, help="Column to stratify query sampling by")
    explain_top: int = option(5, ge=0, help="Candidates per query given per-layer and per-token breakdowns")
    planted: str | None = option(None, help="JSON {query_id: [train ids]} of known culprits: planted_recall_at_10 "
                                            "and planted_mrr", metavar="FILE")


class IndexOptions(_Group):
    """The gradient index: how documents are sketched, how the index measures its own recall, and how many of a
    query's best are re-scored exactly."""

    sketch: str = option(DEFAULT_SKETCH, help="The index's projection: top:M (the M eigen-coordinates over all layers "
                                              "of largest expected score energy), OUTxIN (random Kronecker sketch per "
                                              "layer), eigen:OUTxIN | pca:OUTxIN (leading directions per layer side), "
                                              "or off (exact)")
    refine: int = option(100, ge=0, help="Re-score each query's top N from the index exactly and rerank (0: the "
                                         "index's scores); candidates the residual bound rules out are skipped")
    probes: int = option(8, ge=0, help="Training documents (evenly spread) scored exactly at build as probe queries: "
                                       "the sketch's recall@10 on them is stored and printed by `index query`")
    probe_queries: str | None = option(None, help="Probe queries (prompt/completion rows) to measure the index's "
                                                  "recall with, instead of training documents", metavar="FILE")

    @field_validator("sketch")
    @classmethod
    def _sketch(cls, v: str) -> str:  # influence_engine.index.parse_sketch_spec's grammar (without importing torch)
        n, nxn = r"[1-9]\d*", r"[1-9]\d*\s*[xX]\s*[1-9]\d*"
        kinds = rf"off|none|top\s*:\s*{n}|lowrank\s*:\s*({nxn}|{n})|{nxn}|(eigen|pca)\s*:\s*({nxn}|{n})"
        if not re.fullmatch(rf"\s*({kinds})\s*", v, flags=re.IGNORECASE):
            raise ValueError("give lowrank:R[xQ] (each layer at rank R, queries at Q), top:M (coordinates kept), "
                             "OUTxIN such as 16x16 (a random sketch), eigen:OUTxIN, pca:OUTxIN, or off")
        return v


class SearchOptions(_Group):
    """How candidates are found: a full scan (default), the gradient index, or a lexical prefilter."""

    use_index: bool = option(False, help="Score by searching the gradient index (built on first use, as a mapped "
                                         "stage; reused while model, data and factor settings match)")
    prefilter: str | None = option(None, help="bm25:K scores only each query's K most lexically similar "
                                              "documents (not with the index)")

    @field_validator("prefilter")
    @classmethod
    def _prefilter(cls, v: str | None) -> str | None:
        try:
            parse_prefilter(v)
        except UserError as exc:
            raise ValueError(str(exc).split(": ", 1)[-1]) from None
        return v

    @model_validator(mode="after")
    def _one_search(self) -> Any:
        if self.prefilter and self.use_index:
            raise ValueError("prefilter: not with use_index (the index searches the whole corpus): choose one")
        return self


class VerifyOptions(_Group):
    """The counterfactual check of the top candidates."""

    verify_k: int = option(0, ge=0, flag="--verify", metavar="K",
                           help="Counterfactual check of each query's top K candidates and K random documents (0 = "
                                "off)")
    verify_check: Literal["tail-patch", "pbrf"] = option(
        "tail-patch", help="tail-patch (one optimizer step on the document; any size) or pbrf (proximal Bregman "
                           "response; small models)")
    verify_lr: float | None = option(None, gt=0, help="Tail-patch learning rate (default: chosen from the model's "
                                                      "scale and recorded)")
    verify_params: Literal["all", "tracked"] = option("all", help="Tail-patch: all parameters (what retraining "
                                                                 "changes) or the tracked layers only")
    verify_optimizer: Literal["adam", "sgd"] = option("adam", help="Tail-patch step: adam (preconditioned by training "
                                                                   "gradients' second moments) or sgd")


class CacheOptions(_Group):
    """Keeping every document's gradients (one pass over the data instead of two or three)."""

    gradient_cache_gb: float = option(2.0, ge=0, help="When factors are fitted here (kfac, ekfac) and every "
                                                     "document's gradients fit in this many GiB on the device, fit "
                                                     "and score (or index) in one pass over the data; 0 never does")


class QualityOptions(_Group):
    """The query-free data-quality report."""

    cutoff: float = option(3.5, gt=0, help="Robust z-score from which an issue is flagged")
    near_duplicate_threshold: float = option(0.7, gt=0, le=1, help="Similarity (character 5-grams) from which "
                                                                   "documents are near duplicates")
    max_flagged: float = option(0.15, ge=0, le=1, help="Largest share of the corpus flagged, most severe first "
                                                      "(1: every document above a cut-off)")
    hot_spots: int = option(10, ge=0, help="Token positions kept per document in the per-token report (0: all)")


class AuditOptions(_Group):
    """What kind of audit, and its unit of mapping and resume."""

    mode: Literal["influence", "quality"] = option(
        "influence", help="influence (rank documents per query) | quality (a query-free data-quality report: "
                          "docs/quality.md)")
    shard_size: int = option(1000, ge=1, help="Training documents per shard (unit of mapping and resume)")


class OutputOptions(_Group):
    """Where results go."""

    output_dir: str | None = option(None, aliases=("--home",), metavar="DIR",
                                    help="Where audits, the factor cache and the default MLflow store live "
                                         "(default: $INFLUENCE_AUDIT_HOME or ./.influence-audit)")
    experiment: str = option("influence-audit", help="MLflow experiment")
    tracking_uri: str | None = option(None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or a sqlite "
                                                 "store in the output directory)")


class AuditRef(_Group):
    """Which finished audit a command works on."""

    audit: str | None = option(None, aliases=("--audit-id",), metavar="ID", help="Audit id (see `review list`)")


GROUPS: dict[str, type[_Group]] = {
    "model": ModelOptions, "checkpoints": CheckpointOptions, "data": DataOptions, "factors": FactorOptions,
    "runtime": RuntimeOptions,
    "queries": QueryOptions, "sampling": SamplingOptions, "search": SearchOptions, "index": IndexOptions,
    "verify": VerifyOptions, "cache": CacheOptions,
    "quality": QualityOptions, "audit": AuditOptions, "output": OutputOptions, "audit_ref": AuditRef,
}

# what a quality audit does not depend on: left out of its identity
INFLUENCE_FIELDS = (*QueryOptions.model_fields, *SamplingOptions.model_fields, *SearchOptions.model_fields,
                    *IndexOptions.model_fields)
# how an audit is run or where it is written, not what it computes: left out of every audit's identity
NOT_IDENTITY = (*OutputOptions.model_fields, *RuntimeOptions.model_fields, *VerifyOptions.model_fields)


class AuditParams(OutputOptions, QualityOptions, VerifyOptions, IndexOptions, SearchOptions, SamplingOptions,
                  QueryOptions,
                  RuntimeOptions, FactorOptions, AuditOptions, DataOptions, CheckpointOptions, ModelOptions):
    """Everything an audit depends on (every group). Same parameters and inputs = same audit id = resumable."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _queries_in_influence_mode(self) -> AuditParams:
        if self.mode == "influence" and not self.queries:
            raise ValueError("queries are required in influence mode (or set mode: quality)")
        return self

    def identity(self) -> dict:
        """The parameters that define the audit's result (not where it is written or recorded, nor how it is
        computed), without those left at their defaults: a parameter added later, left at its default, keeps
        every existing audit's id (and so its MLflow run and review). A quality audit drops the query parameters.
        Verification settings are left out: checks add to a result (``influence-audit verify`` on a finished audit
        writes into the same audit)."""
        out = self.model_dump(exclude=set(NOT_IDENTITY), exclude_defaults=True)
        if self.mode == "quality":
            for key in INFLUENCE_FIELDS:
                out.pop(key, None)
        return out


# ----------------------------------------------------------------------------------- what is built from them
def fields_of(p: DataOptions) -> Fields:
    """The column mapping (``--id-field`` / ``--text-field``) the training data is read with."""
    from tasks.inputs.rows import Fields

    return Fields(p.id_field, p.text_field)


class FingerprintedInputs(Protocol):
    """What the factor settings need of an audit's inputs (:class:`tasks.inputs.shards.Inputs` has it)."""

    model_dir: str
    model_fingerprint: str
    data_fingerprint: str


class _EngineGroups(Protocol):  # FactorOptions + RuntimeOptions + ModelOptions.trust_remote_code
    layers: str
    device: str
    precision: str
    batch_size: int
    max_length: int
    seed: int
    on_long: str
    fisher: str
    trust_remote_code: bool
    device_memory_gb: float | None
    threads: int | None


def engine_spec(p: _EngineGroups, model_dir: str) -> EngineSpec:
    """How to build the engine for these options on the model in ``model_dir`` (a local directory or file)."""
    from influence_engine.lora import layers_for
    from tasks.engine import EngineSpec

    return EngineSpec(model_dir, layers_for(model_dir, p.layers), p.device, p.precision, p.batch_size,
                      p.max_length, p.seed, p.on_long, p.trust_remote_code, p.device_memory_gb, p.fisher,
                      p.threads)


def factor_settings(p: FactorOptions, inputs: FingerprintedInputs) -> FactorSettings:
    """What the factors of an audit with these options on these inputs depend on (the cache key)."""
    from influence_engine import FactorSettings
    from influence_engine.lora import layers_for

    return FactorSettings(inputs.model_fingerprint, inputs.data_fingerprint, p.strategy,
                          layers_for(inputs.model_dir, p.layers), p.damping, fisher=p.fisher, seed=p.seed,
                          max_length=p.max_length, precision=p.precision, on_long=p.on_long)


def parse_prefilter(text: str | None) -> int | None:
    """``bm25:K`` -> K; empty or ``none`` -> None (every document is scored)."""
    if text is None or str(text).strip().lower() in ("", "none", "off"):
        return None
    m = re.fullmatch(r"\s*bm25\s*:\s*(\d+)\s*", str(text))
    if not m or int(m.group(1)) < 1:
        raise UserError(f"--prefilter {text!r}: give bm25:K, e.g. bm25:1000 (the K most lexically similar "
                        f"documents per query are scored)")
    return int(m.group(1))

