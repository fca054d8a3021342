"""The audit's typed parameters: a pydantic model, so Prefect renders a form and deployments validate input."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

INFLUENCE_FIELDS = ("queries", "n_queries", "sampling", "stratify_by", "top_k", "query_rank", "explain_top", "planted",
                    "use_index", "sketch", "refine", "prefilter")


class AuditParams(BaseModel):
    """Everything an audit depends on. Same parameters and inputs = same audit id = resumable."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Local Hugging Face model directory, or models:/NAME/VERSION, runs:/ID/PATH")
    train: list[str] = Field(description="Training data: JSONL/Parquet files, directories of them, quoted glob "
                                         "patterns, or datasets save_to_disk directories", min_length=1)
    split: str = Field("train", description="The split of a datasets DatasetDict directory")
    id_field: str = Field("id", description="Column holding the document id (absent: ids derived as NAME#ROW)")
    text_field: str = Field("text", description="Column holding the document text")
    mode: Literal["influence", "quality"] = Field(
        "influence", description="influence: rank documents per query; quality: a query-free data-quality report "
                                 "(outliers, memorised, near-duplicate and low-quality documents; docs/quality.md)")
    queries: str | None = Field(None, description="Query source: JSONL/Parquet with id, prompt, completion, or id "
                                                  "and chat messages (required in influence mode)")
    n_queries: int | None = Field(None, ge=1, description="How many queries to sample (all if empty)")
    sampling: Literal["random", "stratified"] = "random"
    stratify_by: str | None = Field(None, description="Column to stratify query sampling by")
    strategy: Literal["identity", "diagonal", "kfac", "ekfac"] = "ekfac"
    layers: str = Field("auto", description="auto (lora on a LoRA adapter, else mlp) | mlp | attention | all | "
                                            "lora | regex on module names")
    top_k: int = Field(50, ge=0, description="Candidates per query (0 = every document)")
    query_rank: int = Field(32, ge=0, description="Low-rank query compression (0 = exact)")
    damping: str = Field("auto", description="'auto' (0.1 x mean eigenvalue) or a number")
    device: str = "auto"
    device_memory_gb: float | None = Field(None, gt=0, description="Device memory for factors in GiB; layers are "
                                           "fitted in groups beyond it (default: 80% of a GPU's free memory)")
    precision: Literal["fp32", "bf16", "fp64"] = "fp32"
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(512, ge=2)
    on_long: Literal["truncate", "error"] = "truncate"
    shard_size: int = Field(1000, ge=1, description="Training documents per shard (unit of mapping and resume)")
    seed: int = 0
    explain_top: int = Field(5, ge=0, description="Candidates per query given per-layer and per-token breakdowns")
    output_dir: str | None = Field(None, description="Where audits and the factor cache live "
                                                     "(default: $INFLUENCE_AUDIT_HOME or ./.influence-audit)")
    experiment: str = "influence-audit"
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                                                       "a sqlite store in the output directory)")
    planted: str | None = Field(None, description="JSON {query_id: [train ids]} of known culprits: logs "
                                                  "planted_recall_at_10")
    trust_remote_code: bool = False
    use_index: bool = Field(False, description="Score by searching the gradient index (built on first use, as a "
                                               "mapped stage; reused while model, data and factor settings match)")
    sketch: str = Field("16x16", description="The index's per-layer random projection OUTxIN, or off (exact)")
    refine: int = Field(100, ge=0, description="With use_index: re-score the top N per query exactly and rerank")
    prefilter: str | None = Field(None, description="bm25:K: score only each query's K most lexically similar "
                                                    "documents (not with use_index)")
    verify_k: int = Field(0, ge=0, description="Counterfactual check of each query's top-k candidates and k random "
                                               "documents (0 = off)")
    verify_check: Literal["tail-patch", "pbrf"] = Field("tail-patch", description="tail-patch (one optimizer "
                                                        "step; any size) or pbrf (small models)")
    verify_lr: float | None = Field(None, gt=0, description="Tail-patch learning rate (default: chosen from the "
                                                            "model's scale and recorded)")
    cutoff: float = Field(3.5, gt=0, description="quality mode: robust z-score from which an issue is flagged")
    near_duplicate_threshold: float = Field(0.7, gt=0, le=1, description="quality mode: Jaccard similarity "
                                                                         "(character 5-grams) of near duplicates")
    hot_spots: int = Field(10, ge=0, description="quality mode: token positions kept per document (0: all)")

    @model_validator(mode="after")
    def _queries_in_influence_mode(self) -> AuditParams:
        if self.mode == "influence" and not self.queries:
            raise ValueError("queries are required in influence mode (or set mode: quality)")
        return self

    @field_validator("damping")
    @classmethod
    def _damping(cls, v: str) -> str:
        if v != "auto":
            try:
                if float(v) < 0:
                    raise ValueError
            except ValueError:
                raise ValueError("damping must be 'auto' or a non-negative number") from None
        return v

    @field_validator("sketch")
    @classmethod
    def _sketch(cls, v: str) -> str:
        if not re.fullmatch(r"\s*(off|none|[1-9]\d*\s*[xX]\s*[1-9]\d*)\s*", v, flags=re.IGNORECASE):
            raise ValueError("give OUTxIN such as 16x16 (rows kept per layer side), or off")
        return v

    @field_validator("prefilter")
    @classmethod
    def _prefilter(cls, v: str | None, info: ValidationInfo) -> str | None:
        from .prefilter import parse_prefilter

        try:
            parse_prefilter(v)
        except Exception as exc:
            raise ValueError(str(exc).split(": ", 1)[-1]) from None
        if v and info.data.get("use_index"):
            raise ValueError("not with use_index (the index searches the whole corpus): choose one")
        return v

    def identity(self) -> dict:
        """The parameters that define the audit's result (not where it is written or recorded, nor how it is
        computed), without those left at their defaults: a parameter added later, left at its default, keeps
        every existing audit's id (and so its MLflow run and review). A quality audit drops the query parameters.
        Verification settings are left out: checks add to a result (``influence-audit verify`` on a finished audit
        writes into the same audit)."""
        out = self.model_dump(exclude={"output_dir", "experiment", "tracking_uri", "device", "batch_size",
                                       "device_memory_gb", "verify_k", "verify_check", "verify_lr"},
                              exclude_defaults=True)
        if self.mode == "quality":
            for key in INFLUENCE_FIELDS:
                out.pop(key, None)
        return out
