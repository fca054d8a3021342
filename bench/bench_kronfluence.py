"""Side by side: influence_engine against kronfluence 1.0.1 (EK-FAC) on one model, one data set, one process.

    python bench/bench_kronfluence.py --config cpu|gpu|smoke [--out results.json] [--tiny]

Both tools see the same randomly initialised GPT-2 (ours keeps HF's ``Conv1D`` layers; kronfluence gets a
copy converted to ``nn.Linear``, checked to give the same logits), the same random token ids, the same
tracked layers (every ``mlp.c_fc`` and ``mlp.c_proj``), the same damping rule (0.1 x the mean eigenvalue of
each layer), the same true Fisher with the same sampled labels (kronfluence's task draws them with our
engine's per-document seeded sampler), the same precision and batch size. Stages alternate, ours then
kronfluence's: covariance fit, eigendecomposition, eigenvalue correction (lambda) fit, pairwise scoring
(query gradients, preconditioning, rank-``r`` compression and the pass over the training documents).

Reported per precision: tokens/s for each pass, seconds for each stage, the whole fit + score time, peak
memory (CUDA allocator peak on a GPU; peak resident set size, sampled, on a CPU), and the ratios ours /
kronfluence. The ceilings, measured in the same run: a plain training step (forward + backward with weight
gradients) and a forward + backward to activations only (no weight gradients: the hard limit for a
scorer). Agreement: per-query Spearman correlation of all scores and top-10 overlap against kronfluence's
fp32 EK-FAC scores. With ``noise_floor``, the sampling noise is shown too: kronfluence refitted with its
own ``Categorical`` label sampling, and ours refitted with another seed, each against the reference.
Growth: our scoring time and peak memory for N, 2N and 4N documents with a streaming
top-10 (memory should stay flat).

Without kronfluence installed (CI), only our side runs and the peer columns are ``null``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import gc
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from influence_engine import Example, InfluenceEngine, eigendecompose  # noqa: E402
from influence_engine.passes import _sample_targets  # noqa: E402  (the same labels for kronfluence)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402

try:  # bench-only peer; CI runs without it
    import kronfluence
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    HAVE_KRONFLUENCE = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_KRONFLUENCE = False

GiB = 2**30


# ------------------------------------------------------------------------------------------------ configs
@dataclass(frozen=True)
class Config:
    name: str
    device: str  # "cpu", "cuda" or "auto"
    layers: int
    dim: int
    heads: int
    seq: int
    vocab: int
    n_docs: int
    n_queries: int
    rank: int
    batch: dict[str, int]  # per precision
    precisions: tuple[str, ...]
    growth_docs: int  # N of the N / 2N / 4N growth check
    growth_precision: str
    train_steps: int = 5
    repeats: int = 1  # rounds of (ours, kronfluence) per stage; the best time of each is reported
    noise_floor: bool = True  # refits with other labels (kronfluence's own sampler; ours with another seed)
    full_svd_reference: bool = True  # also score kronfluence fp32 with an exact SVD of the queries (slow on GPUs)
    dense_agreement_docs: int = 0  # agreement with uncompressed queries on the first docs (0: all; -1: skip)
    profile_queries: bool = False  # a torch.profiler table of one extra query preparation (where its time goes)
    pad_to_multiple: int = 1
    one_pass: bool = False  # also time our one-pass mode (every document's gradients kept from the covariance pass)
    seed: int = 0
    notes: dict[str, str] = field(default_factory=dict)


CONFIGS = {
    # seconds, for CI: both precisions' code paths, tiny model.
    "smoke": Config("smoke", "cpu", layers=2, dim=32, heads=2, seq=16, vocab=128, n_docs=24, n_queries=3, rank=4,
                    batch={"fp32": 8, "bf16": 8}, precisions=("fp32",), growth_docs=8, growth_precision="fp32",
                    train_steps=2, one_pass=True),
    # a few minutes on two cores.
    "cpu": Config("cpu", "cpu", layers=2, dim=128, heads=2, seq=128, vocab=4096, n_docs=256, n_queries=32,
                  rank=32, batch={"fp32": 16, "bf16": 16}, precisions=("fp32", "bf16"), growth_docs=64,
                  growth_precision="fp32", train_steps=4, repeats=2, one_pass=True),
    # GPT-2-small shape on one GPU, well under 5 minutes on an H200 (the NOTES.md reference figures used
    # batch 32 in bf16 and 16 in fp32).
    "gpu": Config("gpu", "cuda", layers=12, dim=768, heads=12, seq=512, vocab=50257, n_docs=512, n_queries=32,
                  rank=32, batch={"bf16": 32, "fp32": 16}, precisions=("bf16", "fp32"), growth_docs=256,
                  growth_precision="bf16", train_steps=5, noise_floor=False, full_svd_reference=False,
                  dense_agreement_docs=128, profile_queries=True, pad_to_multiple=64),
    # bf16 only, 4x the documents: query preparation is a fixed cost, so the end-to-end scoring ratio grows with N
    "gpu-large": Config("gpu-large", "cuda", layers=12, dim=768, heads=12, seq=512, vocab=50257, n_docs=2048,
                        n_queries=32, rank=32, batch={"bf16": 32}, precisions=("bf16",), growth_docs=256,
                        growth_precision="bf16", train_steps=5, noise_floor=False, full_svd_reference=False,
                        dense_agreement_docs=128, profile_queries=False, pad_to_multiple=64),
}


def tiny(cfg: Config) -> Config:
    """The same code path at a size that runs in seconds anywhere (a dry run of the GPU configuration)."""
    return replace(cfg, name=cfg.name + "-tiny", device="auto", layers=2, dim=128, heads=2, seq=32, vocab=1000,
                   n_docs=32, n_queries=4, rank=8, batch={p: 8 for p in cfg.batch}, growth_docs=8, train_steps=2,
                   dense_agreement_docs=min(cfg.dense_agreement_docs, 16), profile_queries=cfg.profile_queries)


# ------------------------------------------------------------------------------------------ measurement
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Measure:
    """Wall time and peak memory of a block. GPU: the CUDA allocator's peak (reset at entry). CPU: the
    peak resident set size, sampled every few milliseconds by a thread (``peak_gb``), and that peak less
    the size at entry (``extra_gb``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = math.nan
        self.peak_gb: float | None = None
        self.extra_gb: float | None = None
        self._stop = threading.Event()
        self._peak = 0

    def _sample(self) -> None:
        while not self._stop.wait(0.003):
            self._peak = max(self._peak, _rss_bytes() or 0)

    def __enter__(self) -> Measure:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _rss_bytes() or 0
            self._peak = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss_bytes() or 0)
        self.peak_gb = peak / GiB
        self.extra_gb = (peak - self._base) / GiB

    def record(self, tokens: int | None = None) -> dict[str, float | None]:
        out: dict[str, float | None] = {"seconds": self.seconds, "peak_gb": self.peak_gb, "extra_gb": self.extra_gb}
        if tokens is not None:
            out["tok_s"] = tokens / self.seconds
        return out


# --------------------------------------------------------------------------------------------- the model
def build_model(cfg: Config, device: torch.device) -> GPT2LMHeadModel:
    torch.manual_seed(cfg.seed)
    gcfg = GPT2Config(vocab_size=cfg.vocab, n_positions=cfg.seq, n_embd=cfg.dim, n_layer=cfg.layers,
                      n_head=cfg.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(gcfg).to(device).eval()


def conv1d_to_linear(module: nn.Module) -> nn.Module:
    """Replace every ``Conv1D`` (weight ``(in, out)``) by the equivalent ``nn.Linear``, in place."""
    for name, child in module.named_children():
        if isinstance(child, Conv1D):
            n_in, n_out = child.weight.shape
            lin = nn.Linear(n_in, n_out).to(child.weight.device)
            with torch.no_grad():
                lin.weight.copy_(child.weight.T)
                lin.bias.copy_(child.bias)
            setattr(module, name, lin)
        else:
            conv1d_to_linear(child)
    return module


def lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum")


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def ceilings(model: nn.Module, x: torch.Tensor, batch: int, precision: str, steps: int,
             device: torch.device) -> dict[str, float]:
    """Tokens/s of a training step (forward + backward with weight gradients) and of a forward + backward
    to the input embeddings only (frozen weights: what a scorer needs at the least)."""
    n, seq = x.shape

    def rate(step: Callable[[torch.Tensor], None]) -> float:
        warm = 1
        for i in range(warm + steps):
            if i == warm:
                sync(device)
                t0 = time.perf_counter()
            s = (i * batch) % max(1, n - batch + 1)
            step(x[s:s + batch].to(device))
        sync(device)
        return steps * batch * seq / (time.perf_counter() - t0)

    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)

    def train_step(xb: torch.Tensor) -> None:
        with autocast(device, precision):
            loss = lm_loss(model, xb)
        loss.backward()
        model.zero_grad(set_to_none=True)

    out = {"train_step_tok_s": rate(train_step)}
    for p in params:
        p.requires_grad_(False)
    emb = model.get_input_embeddings()

    def fwd_bwd_act(xb: torch.Tensor) -> None:
        with autocast(device, precision):
            h = emb(xb).detach().requires_grad_(True)
            logits = model(inputs_embeds=h).logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), xb[:, 1:].reshape(-1), reduction="sum")
        torch.autograd.grad(loss, h)

    out["fwd_bwd_activations_tok_s"] = rate(fwd_bwd_act)
    for p, r in zip(params, saved, strict=True):
        p.requires_grad_(r)
    return out


# ------------------------------------------------------------------------------------------------ the tools
def examples(x: torch.Tensor, prefix: str) -> list[Example]:
    return [Example(f"{prefix}{i:06d}", tuple(row.tolist()), 1, len(row)) for i, row in enumerate(x)]


class Ours:
    """Our engine's stages, through its public API."""

    name = "ours"

    def __init__(self, model: nn.Module, cfg: Config, precision: str, device: torch.device, seed: int,
                 eng: InfluenceEngine | None = None):
        self.model = model
        self.eng = eng or InfluenceEngine(model, None, layers="mlp", precision=precision,
                                          batch_size=cfg.batch[precision], device=str(device), seed=seed,
                                          pad_to_multiple=cfg.pad_to_multiple, fingerprint="bench")
        self.rank = cfg.rank
        self.cov = self.basis = self.lam = self.queries = None
        self.timings: dict[str, float] = {}

    def covariance(self, docs: Sequence[Example]) -> None:
        self.cov = self.eng.fit_covariance(docs)

    def eigendecomposition(self) -> None:
        self.basis = eigendecompose(self.cov, device=self.eng.device)

    def lambda_fit(self, docs: Sequence[Example]) -> None:
        self.lam = self.eng.fit_lambda(docs, self.basis)

    def scores(self, docs: Sequence[Example], queries: Sequence[Example]) -> np.ndarray:
        t0 = time.perf_counter()
        factors = self.eng.finalize("ekfac", basis=self.basis, lambdas=self.lam, covariance=self.cov)
        self.queries = self.eng.prepare_queries(queries, factors, rank=self.rank)
        sync(self.eng.device)
        t1 = time.perf_counter()
        result = self.eng.score(docs, self.queries, top_k=0)
        sync(self.eng.device)
        self.timings = {"queries_seconds": t1 - t0, "score_pass_seconds": time.perf_counter() - t1}
        self.paths = dict(result.paths)
        return np.asarray(result.all_scores)

    def profile_queries(self, queries: Sequence[Example]) -> str:
        """The top operations of one query preparation, by device time where there is a GPU."""
        from torch.profiler import ProfilerActivity, profile

        factors = self.eng.finalize("ekfac", basis=self.basis, lambdas=self.lam, covariance=self.cov)
        cuda = self.eng.device.type == "cuda"
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            self.eng.prepare_queries(queries, factors, rank=self.rank)
            sync(self.eng.device)
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        return prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60)

    def dense_scores(self, docs: Sequence[Example], queries: Sequence[Example]) -> np.ndarray:
        """Scores with uncompressed queries (rank 0) on the factors already fitted."""
        factors = self.eng.finalize("ekfac", basis=self.basis, lambdas=self.lam, covariance=self.cov)
        return np.asarray(self.eng.score(docs, self.eng.prepare_queries(queries, factors, rank=0), top_k=0).all_scores)


class OursOnePass(Ours):
    """Our engine in one-pass mode: the covariance pass also keeps every document's gradients (one forward,
    a backward with sampled labels and one with the data's labels), so the eigenvalue correction and the
    scores are products on stored gradients. Scoring from stored gradients is a GEMM whose cost does not
    depend on the query rank, so queries are kept exact (rank 0): compression would only lose accuracy."""

    name = "ours_one_pass"

    def covariance(self, docs: Sequence[Example]) -> None:
        self.cov, self.cache = self.eng.fit_covariance_cached(docs)

    def lambda_fit(self, docs: Sequence[Example]) -> None:
        self.lam = self.eng.fit_lambda(docs, self.basis, cache=self.cache)

    def scores(self, docs: Sequence[Example], queries: Sequence[Example]) -> np.ndarray:
        t0 = time.perf_counter()
        factors = self.eng.finalize("ekfac", basis=self.basis, lambdas=self.lam, covariance=self.cov)
        self.queries = self.eng.prepare_queries(queries, factors, rank=0)
        sync(self.eng.device)
        t1 = time.perf_counter()
        result = self.eng.score(docs, self.queries, top_k=0, cache=self.cache)
        sync(self.eng.device)
        self.timings = {"queries_seconds": t1 - t0, "score_pass_seconds": time.perf_counter() - t1}
        self.paths = dict(result.paths)
        return np.asarray(result.all_scores)


def tracked_names(cfg: Config) -> list[str]:
    return [f"transformer.h.{i}.mlp.{n}" for i in range(cfg.layers) for n in ("c_fc", "c_proj")]


def make_kron_task(tracked: list[str], shared_labels_seed: int | None):
    """kronfluence's task: next-token NLL summed over tokens. With ``sample`` the labels are drawn from the
    model (true Fisher): by our engine's per-document seeded sampler when ``shared_labels_seed`` is set (both
    tools then fit on the same labels), else by kronfluence's usual ``Categorical(logits).sample()``."""

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            index, x = batch
            logits = model(input_ids=x).logits[:, :-1].float()
            flat = logits.reshape(-1, logits.size(-1))
            y = x[:, 1:].reshape(-1)
            if sample:
                with torch.no_grad():
                    if shared_labels_seed is None:
                        y = torch.distributions.Categorical(logits=flat.detach()).sample()
                    else:
                        ids = [f"d{int(i):06d}" for i in index]
                        y = _sample_targets(flat.detach(), [x.shape[1] - 1] * len(ids), ids, shared_labels_seed)
            return F.cross_entropy(flat, y, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return tracked

    return LMTask()


class _Rows(torch.utils.data.Dataset):
    """Rows of token ids with their index (the document id our engine derives its label seed from)."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, self.x[i]


class Kron:
    """kronfluence 1.0.1's stages with the settings of the reference script (shared/reference)."""

    name = "kronfluence"

    def __init__(self, model: nn.Module, cfg: Config, precision: str, device: torch.device, workdir: Path,
                 tag: str, seed: int, shared_labels: bool = True, full_svd: bool = False, dense: bool = False):
        self.task = make_kron_task(tracked_names(cfg), seed if shared_labels else None)
        self.model = model
        self.batch, self.n_queries, self.seed = cfg.batch[precision], cfg.n_queries, seed
        self.an = Analyzer(analysis_name="bench", model=model, task=self.task, output_dir=str(workdir),
                           cpu=device.type == "cpu", disable_tqdm=True, log_level=logging.WARNING)
        self.fa = FactorArguments(strategy="ekfac")
        self.sa = ScoreArguments(damping_factor=None, query_gradient_low_rank=None if dense else cfg.rank,
                                 query_gradient_accumulation_steps=1, use_full_svd=full_svd)
        if precision == "bf16":
            for k in ("amp_dtype", "activation_covariance_dtype", "gradient_covariance_dtype",
                      "per_sample_gradient_dtype", "lambda_dtype"):
                setattr(self.fa, k, torch.bfloat16)
            for k in ("amp_dtype", "per_sample_gradient_dtype", "score_dtype"):
                setattr(self.sa, k, torch.bfloat16)
        elif precision != "fp32":
            raise ValueError(precision)
        self.factors_name = f"f_{tag}"
        self.scores_name = f"s_{tag}" + ("_full_svd" if full_svd else "") + ("_dense" if dense else "")

    def covariance(self, docs: torch.Tensor) -> None:
        torch.manual_seed(self.seed)
        self.an.fit_covariance_matrices(factors_name=self.factors_name, dataset=_Rows(docs),
                                        per_device_batch_size=self.batch, factor_args=self.fa,
                                        overwrite_output_dir=True)

    def eigendecomposition(self) -> None:
        self.an.perform_eigendecomposition(factors_name=self.factors_name, factor_args=self.fa,
                                           overwrite_output_dir=True)

    def lambda_fit(self, docs: torch.Tensor) -> None:
        torch.manual_seed(self.seed + 1)
        self.an.fit_lambda_matrices(factors_name=self.factors_name, dataset=_Rows(docs),
                                    per_device_batch_size=self.batch, factor_args=self.fa, overwrite_output_dir=True)

    def scores(self, docs: torch.Tensor, queries: torch.Tensor) -> np.ndarray:
        self.an.compute_pairwise_scores(scores_name=self.scores_name, factors_name=self.factors_name,
                                        query_dataset=_Rows(queries), train_dataset=_Rows(docs),
                                        per_device_query_batch_size=self.n_queries,
                                        per_device_train_batch_size=self.batch, score_args=self.sa,
                                        overwrite_output_dir=True)
        return self.an.load_pairwise_scores(self.scores_name)["all_modules"].double().cpu().numpy()


# ------------------------------------------------------------------------------------------------ agreement
def _ranks(v: np.ndarray) -> np.ndarray:
    r = np.empty(len(v))
    r[np.argsort(v, kind="stable")] = np.arange(len(v))
    return r


def agreement(a: np.ndarray, b: np.ndarray, k: int = 10) -> dict[str, float]:
    """Per-query Spearman correlation over all documents, and the overlap of the top ``k``."""
    rho, overlap = [], []
    for qa, qb in zip(a, b, strict=True):
        ra, rb = _ranks(qa), _ranks(qb)
        rho.append(float(np.corrcoef(ra, rb)[0, 1]))
        kk = min(k, len(qa))
        overlap.append(len(set(np.argsort(-qa)[:kk]) & set(np.argsort(-qb)[:kk])) / kk)
    return {"spearman_mean": float(np.mean(rho)), "spearman_min": float(np.min(rho)),
            f"top{k}_overlap_mean": float(np.mean(overlap)), f"top{k}_overlap_min": float(np.min(overlap))}


# --------------------------------------------------------------------------------------------------- runs
STAGES = ("covariance", "eigendecomposition", "lambda_fit", "scores")
AGREEMENT_PAIRS = [
    # rank-r queries, as timed; kronfluence compresses with a randomized SVD (2 iterations, no oversampling)
    ("ours_bf16", "kronfluence_fp32"), ("ours_fp32", "kronfluence_fp32"), ("kronfluence_bf16", "kronfluence_fp32"),
    # the same against kronfluence with an exact SVD of its queries (the exact rank-r reference)
    ("ours_bf16", "kronfluence_fp32_full_svd"), ("ours_fp32", "kronfluence_fp32_full_svd"),
    ("kronfluence_fp32", "kronfluence_fp32_full_svd"), ("kronfluence_bf16", "kronfluence_fp32_full_svd"),
    # uncompressed queries: the factors and the precision alone
    ("ours_bf16_dense", "kronfluence_fp32_dense"), ("ours_fp32_dense", "kronfluence_fp32_dense"),
    ("ours_bf16_dense", "ours_fp32_dense"),
    # mixed precision within each tool
    ("ours_bf16", "ours_fp32"),
    # one-pass mode (exact queries, like the dense references)
    ("ours_one_pass_fp32", "kronfluence_fp32_dense"), ("ours_one_pass_bf16", "kronfluence_fp32_dense"),
    ("ours_one_pass_fp32", "ours_fp32_dense"),
    # noise floors: fits on other sampled labels
    ("kronfluence_fp32_own_labels", "kronfluence_fp32_full_svd"),
    ("ours_fp32_seed2", "ours_fp32"), ("ours_fp32_seed2", "kronfluence_fp32_full_svd"),
]


def place(active: nn.Module, models: Sequence[nn.Module | None], device: torch.device) -> None:
    """On a GPU only the active tool's model is resident, so each peak counts one model."""
    if device.type != "cuda":
        return
    for m in models:
        if m is not None and m is not active:
            m.to("cpu")
    active.to(device)


def run_precision(cfg: Config, precision: str, device: torch.device, model: nn.Module, kmodel: nn.Module | None,
                  train_x: torch.Tensor, query_x: torch.Tensor, workdir: Path, log: Callable[[str], None]):
    docs, queries = examples(train_x, "d"), examples(query_x, "q")
    tokens = int(train_x.numel())
    ours = Ours(model, cfg, precision, device, seed=cfg.seed)
    # the same engine (model, hooks), another way through it
    one = OursOnePass(model, cfg, precision, device, seed=cfg.seed, eng=ours.eng) if cfg.one_pass else None
    kron = Kron(kmodel, cfg, precision, device, workdir, precision, seed=cfg.seed) if kmodel is not None else None
    # untimed warm-up of each tool's pass at this precision (kernel selection, allocator growth)
    warm = 2 * cfg.batch[precision]
    place(model, (model, kmodel), device)
    ours.eng.fit_covariance(docs[:warm])
    if kron is not None:
        place(kmodel, (model, kmodel), device)
        kron.factors_name = f"warm_{precision}"
        kron.covariance(train_x[:warm])
        kron.factors_name = f"f_{precision}"
    res: dict[str, dict[str, Any]] = {"ours": {}, "ours_one_pass": {}, "kronfluence": {}}
    scores: dict[str, np.ndarray] = {}
    timings: dict[str, list[dict[str, float]]] = {"ours": [], "ours_one_pass": []}
    for rep in range(cfg.repeats):
        for stage in STAGES:
            for tool in (ours, one, kron):
                if tool is None:
                    continue
                place(tool.model, (model, kmodel), device)
                data = train_x if tool is kron else docs
                qdata = query_x if tool is kron else queries
                with Measure(device) as m:
                    if stage == "eigendecomposition":
                        tool.eigendecomposition()
                    elif stage == "scores":
                        scores[tool.name] = tool.scores(data, qdata)
                    else:
                        getattr(tool, stage)(data)
                rec = m.record(None if stage == "eigendecomposition" else tokens)
                best = res[tool.name].get(stage)
                if best is None or rec["seconds"] < best["seconds"]:  # best of the repeats, peak of all
                    if best is not None:
                        rec["peak_gb"] = max(rec["peak_gb"], best["peak_gb"])
                        rec["extra_gb"] = max(rec["extra_gb"], best["extra_gb"])
                    res[tool.name][stage] = rec | {"all_seconds": (best or {}).get("all_seconds", [])}
                else:
                    best["peak_gb"] = max(rec["peak_gb"], best["peak_gb"])
                    best["extra_gb"] = max(rec["extra_gb"], best["extra_gb"])
                res[tool.name][stage]["all_seconds"].append(m.seconds)
                if tool is not kron and stage == "scores":
                    timings[tool.name].append(tool.timings)
                log(f"  {precision:4s} {tool.name:13s} {stage:18s} {m.seconds:8.2f} s"
                    + ("" if stage == "eigendecomposition" else f"  {tokens / m.seconds:10.0f} tok/s")
                    + f"  peak {m.peak_gb:6.2f} GiB" + (f"  (round {rep + 1})" if cfg.repeats > 1 else ""))
    for tool in (ours, one):
        if tool is None:
            continue
        tool.timings = min(timings[tool.name], key=lambda t: t["score_pass_seconds"])
        res[tool.name]["scores"].update(tool.timings)
        res[tool.name]["score_pass_tok_s"] = tokens / tool.timings["score_pass_seconds"]
        res[tool.name]["score_paths"] = sorted(set(tool.paths.values()))
    for name in ("ours", "ours_one_pass", "kronfluence"):
        if res[name]:
            res[name]["total_seconds"] = sum(res[name][s]["seconds"] for s in STAGES)
            res[name]["peak_gb"] = max(res[name][s]["peak_gb"] for s in STAGES)
    for name in ("ours_one_pass", "kronfluence"):
        if not res[name]:
            res[name] = None
    place(model, (model, kmodel), device)
    return res, scores, ours


def ratios(r: dict[str, Any], ours: str = "ours") -> dict[str, float] | None:
    o, k = r[ours], r["kronfluence"]
    if k is None or o is None:
        return None
    return {"covariance_tok_s": o["covariance"]["tok_s"] / k["covariance"]["tok_s"],
            "lambda_tok_s": o["lambda_fit"]["tok_s"] / k["lambda_fit"]["tok_s"],
            "scores_tok_s": o["scores"]["tok_s"] / k["scores"]["tok_s"],
            "eigendecomposition_speed": k["eigendecomposition"]["seconds"] / o["eigendecomposition"]["seconds"],
            "total_time": o["total_seconds"] / k["total_seconds"],
            "peak_memory": o["peak_gb"] / k["peak_gb"]}


def growth(cfg: Config, device: torch.device, ours: Ours, log: Callable[[str], None]) -> list[dict[str, float]]:
    """Our scoring time and peak memory for N, 2N, 4N documents with a streaming top-10."""
    g = torch.Generator().manual_seed(cfg.seed + 7)
    x = torch.randint(0, cfg.vocab, (4 * cfg.growth_docs, cfg.seq), generator=g)
    docs = examples(x, "g")
    out = []
    for mult in (1, 2, 4):
        n = mult * cfg.growth_docs
        row: dict[str, Any] | None = None
        for _ in range(cfg.repeats):
            with Measure(device) as m:
                ours.eng.score(docs[:n], ours.queries, top_k=10)
            rec = {"n_docs": n, **m.record(n * cfg.seq)}
            if row is not None:
                rec["peak_gb"], rec["extra_gb"] = max(rec["peak_gb"], row["peak_gb"]), max(rec["extra_gb"],
                                                                                            row["extra_gb"])
            if row is None or rec["seconds"] < row["seconds"]:
                row = rec
        out.append(row)
        log(f"  growth {n:6d} docs  {row['seconds']:8.2f} s  {row['tok_s']:10.0f} tok/s  peak {row['peak_gb']:6.2f} "
            f"GiB  (+{row['extra_gb']:.3f})")
    return out


def warm_up(device: torch.device) -> None:
    """First-call costs (solver handles, lazily loaded kernels) out of every timed stage."""
    for dtype in (torch.float64, torch.float32):
        m = torch.randn(64, 64, dtype=dtype, device=device)
        torch.linalg.eigh(m @ m.T)
        torch.linalg.svd(m, full_matrices=False)
        torch.svd_lowrank(m, q=8)
    sync(device)


def machine(device: torch.device) -> dict[str, Any]:
    info = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": str(device), "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                                    else platform.processor() or platform.machine()),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "kronfluence": kronfluence.__version__ if HAVE_KRONFLUENCE else None}
    if device.type == "cuda":
        info["gpu_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / GiB
    return info


def run(cfg: Config, out: str | None = None, use_kronfluence: bool = True,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    device = torch.device("cuda" if (cfg.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"config {cfg.name} needs CUDA; use --tiny for a CPU dry run")
    peer = use_kronfluence and HAVE_KRONFLUENCE
    if not peer:
        log("kronfluence is not installed (or disabled): running our engine alone; peer columns are null")
    t_start = time.perf_counter()
    model = build_model(cfg, device)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    train_x = torch.randint(0, cfg.vocab, (cfg.n_docs, cfg.seq), generator=g)
    query_x = torch.randint(0, cfg.vocab, (cfg.n_queries, cfg.seq), generator=g)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"config {cfg.name}: GPT-2 {cfg.layers}x{cfg.dim}, vocab {cfg.vocab}, seq {cfg.seq}, {cfg.n_docs} docs, "
        f"{cfg.n_queries} queries at rank {cfg.rank}, {n_params / 1e6:.1f}M params, device {device}")

    result: dict[str, Any] = {"provenance": provenance(), "machine": machine(device),
                              "config": asdict(cfg) | {"precisions": list(cfg.precisions)},
                              "kronfluence_ran": peer, "ceiling": {}, "precisions": {}, "agreement": {}}
    kmodel = None
    if peer:
        kmodel = conv1d_to_linear(copy.deepcopy(model))
        with torch.no_grad():
            xb = train_x[:2].to(device)
            ref = model(input_ids=xb).logits
            diff = ((ref - kmodel(input_ids=xb).logits).abs().max() / ref.abs().max()).item()
        result["same_logits_max_rel_diff"] = diff
        if diff > 1e-3:
            raise RuntimeError(f"the Linear copy of the model disagrees with the original (max diff {diff})")
        kmodel = prepare_model(kmodel, make_kron_task(tracked_names(cfg), None))
        if device.type == "cuda":
            kmodel.to("cpu")

    for precision in cfg.precisions:
        result["ceiling"][precision] = ceilings(model, train_x, cfg.batch[precision], precision, cfg.train_steps,
                                                device)
        log(f"ceiling {precision}: " + ", ".join(f"{k} {v:.0f}" for k, v in result["ceiling"][precision].items()))

    def save(complete: bool) -> None:
        """Written after every step, so a run cut short (a GPU time limit) still leaves its figures."""
        result["complete"] = complete
        result["wall_seconds"] = time.perf_counter() - t_start
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(result, indent=1, default=float))

    save(False)
    warm_up(device)
    docs = examples(train_x, "d")
    workdir = Path(tempfile.mkdtemp(prefix="bench_kron_"))
    all_scores: dict[str, np.ndarray] = {}
    ours_by_precision: dict[str, Ours] = {}
    try:
        for precision in cfg.precisions:
            res, scores, ours = run_precision(cfg, precision, device, model, kmodel, train_x, query_x, workdir, log)
            res["ratios"] = ratios(res)
            res["ratios_one_pass"] = ratios(res, "ours_one_pass")
            ceiling = result["ceiling"][precision]["train_step_tok_s"]
            for name in ("ours", "ours_one_pass"):
                if res[name]:
                    res[name]["scores_over_train_step"] = res[name]["scores"]["tok_s"] / ceiling
            if res["kronfluence"]:
                res["kronfluence"]["scores_over_train_step"] = res["kronfluence"]["scores"]["tok_s"] / ceiling
            result["precisions"][precision] = res
            for name, sc in scores.items():
                all_scores[f"{name}_{precision}"] = sc
            save(False)
            if precision == cfg.growth_precision and cfg.profile_queries:
                try:  # diagnostics only: never let them cost the run
                    table_ = ours.profile_queries(examples(query_x, "q"))
                except Exception as exc:  # noqa: BLE001
                    table_ = f"profiling failed: {exc!r}"
                result.setdefault("profiles", {})[f"ours_query_preparation_{precision}"] = table_
                log(table_)
            if precision == cfg.growth_precision:
                rows = growth(cfg, device, ours, log)
                result["growth"] = {"precision": precision, "rows": rows,
                                    "time_ratio_4n_over_n": rows[-1]["seconds"] / rows[0]["seconds"],
                                    "peak_ratio_4n_over_n": rows[-1]["peak_gb"] / rows[0]["peak_gb"]}
                save(False)
            ours_by_precision[precision] = ours
        if cfg.dense_agreement_docs >= 0:
            # uncompressed queries: agreement of the fitted factors and precision alone, without either
            # tool's rank-r compression
            n = cfg.dense_agreement_docs or cfg.n_docs
            if peer and "kronfluence_fp32" in all_scores:
                place(kmodel, (model, kmodel), device)
                kd = Kron(kmodel, cfg, "fp32", device, workdir, "fp32", seed=cfg.seed, dense=True)
                all_scores["kronfluence_fp32_dense"] = kd.scores(train_x[:n], query_x)
                place(model, (model, kmodel), device)
            for precision, ours in ours_by_precision.items():
                all_scores[f"ours_{precision}_dense"] = ours.dense_scores(docs[:n], examples(query_x, "q"))
            log(f"  dense-query scores on {n} documents done")
        ours_by_precision.clear()
        if peer and cfg.full_svd_reference and "kronfluence_fp32" in all_scores:
            # kronfluence's default query compression is a randomized SVD (torch.svd_lowrank, 2 iterations, no
            # oversampling): rescoring with its exact SVD on the same factors gives the exact rank-r reference
            place(kmodel, (model, kmodel), device)
            k3 = Kron(kmodel, cfg, "fp32", device, workdir, "fp32", seed=cfg.seed, full_svd=True)
            all_scores["kronfluence_fp32_full_svd"] = k3.scores(train_x, query_x)
            place(model, (model, kmodel), device)
        if peer and cfg.noise_floor and "kronfluence_fp32" in all_scores:
            # kronfluence with its own label sampling (and an exact SVD): how far apart fits on other labels are
            place(kmodel, (model, kmodel), device)
            k2 = Kron(kmodel, cfg, "fp32", device, workdir, "fp32_own_labels", seed=cfg.seed + 1000,
                      shared_labels=False, full_svd=True)
            k2.covariance(train_x)
            k2.eigendecomposition()
            k2.lambda_fit(train_x)
            all_scores["kronfluence_fp32_own_labels"] = k2.scores(train_x, query_x)
            place(model, (model, kmodel), device)
        if cfg.noise_floor and "ours_fp32" in all_scores:
            o2 = Ours(model, cfg, "fp32", device, seed=cfg.seed + 1000)
            o2.covariance(docs)
            o2.eigendecomposition()
            o2.lambda_fit(docs)
            all_scores["ours_fp32_seed2"] = o2.scores(docs, examples(query_x, "q"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    for key, ref in AGREEMENT_PAIRS:
        if key in all_scores and ref in all_scores:
            result["agreement"][f"{key}_vs_{ref}"] = agreement(all_scores[key], all_scores[ref])
    save(True)
    log("")
    log(table(result))
    if out:
        log(f"wrote {out}")
    return result


def table(r: dict[str, Any]) -> str:
    """A readable summary of a result."""
    lines = [f"machine: {r['machine']['device_name']} ({r['machine']['device']}), torch {r['machine']['torch']}, "
             f"{r['machine']['date']}"]
    for p, res in r["precisions"].items():
        o, k, q = res["ours"], res["kronfluence"], res["ratios"]
        c = r["ceiling"][p]
        lines.append(f"\n{p}: training step {c['train_step_tok_s']:.0f} tok/s, forward + backward to activations "
                     f"{c['fwd_bwd_activations_tok_s']:.0f} tok/s")
        lines.append(f"  {'':26s} {'ours':>12s} {'kronfluence':>12s} {'ours/kron':>10s}")

        def row(label: str, ov: float, kv: float | None, rv: float | None, fmt: str = "{:12.0f}") -> None:
            kv_s = fmt.format(kv) if kv is not None else f"{'-':>12s}"
            rv_s = f"{rv:10.2f}" if rv is not None else f"{'-':>10s}"
            lines.append(f"  {label:26s} {fmt.format(ov)} {kv_s} {rv_s}")

        row("covariance tok/s", o["covariance"]["tok_s"], k and k["covariance"]["tok_s"],
            q and q["covariance_tok_s"])
        row("eigendecomposition s", o["eigendecomposition"]["seconds"], k and k["eigendecomposition"]["seconds"],
            q and 1 / q["eigendecomposition_speed"], "{:12.2f}")
        row("lambda tok/s", o["lambda_fit"]["tok_s"], k and k["lambda_fit"]["tok_s"], q and q["lambda_tok_s"])
        row("scores tok/s (w/ queries)", o["scores"]["tok_s"], k and k["scores"]["tok_s"], q and q["scores_tok_s"])
        row("scores / training step", o["scores_over_train_step"], k and k["scores_over_train_step"], None,
            "{:12.2f}")
        row("fit + score seconds", o["total_seconds"], k and k["total_seconds"], q and q["total_time"], "{:12.2f}")
        row("peak memory GiB", o["peak_gb"], k and k["peak_gb"], q and q["peak_memory"], "{:12.2f}")
        o1, q1 = res.get("ours_one_pass"), res.get("ratios_one_pass")
        if o1:
            lines.append("  one pass (gradients kept from the covariance pass; exact queries):")
            row("covariance + cache tok/s", o1["covariance"]["tok_s"], k and k["covariance"]["tok_s"],
                q1 and q1["covariance_tok_s"])
            row("lambda from cache s", o1["lambda_fit"]["seconds"], k and k["lambda_fit"]["seconds"],
                q1 and 1 / q1["lambda_tok_s"], "{:12.2f}")
            row("scores incl. queries s", o1["scores"]["seconds"], k and k["scores"]["seconds"],
                q1 and 1 / q1["scores_tok_s"], "{:12.2f}")
            row("fit + score seconds", o1["total_seconds"], k and k["total_seconds"], q1 and q1["total_time"],
                "{:12.2f}")
            row("peak memory GiB", o1["peak_gb"], k and k["peak_gb"], q1 and q1["peak_memory"], "{:12.2f}")
    if r["agreement"]:
        lines.append("\nagreement (per-query Spearman over all documents; top-10 overlap):")
        for key, a in r["agreement"].items():
            lines.append(f"  {key:44s} rho mean {a['spearman_mean']:.4f} min {a['spearman_min']:.4f}  "
                         f"top-10 {a['top10_overlap_mean']:.2f}")
    gr = r["growth"]
    lines.append(f"\ngrowth ({gr['precision']}, streaming top-10):")
    for row_ in gr["rows"]:
        lines.append(f"  {row_['n_docs']:6d} docs  {row_['seconds']:8.2f} s  {row_['tok_s']:10.0f} tok/s  "
                     f"peak {row_['peak_gb']:.2f} GiB (+{row_['extra_gb']:.3f})")
    lines.append(f"  4N/N: time x{gr['time_ratio_4n_over_n']:.2f}, peak x{gr['peak_ratio_4n_over_n']:.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    ap.add_argument("--out", help="write the JSON result here")
    ap.add_argument("--tiny", action="store_true", help="the configuration's code path at a tiny size")
    ap.add_argument("--no-kronfluence", action="store_true", help="run our engine alone")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: 1 on a CPU, where a shared machine makes more threads "
                         "slower and noisier; torch's default with a GPU)")
    ap.add_argument("--gram-block", type=int, default=None,
                    help="smallest column block of our blocked covariance GEMMs on this device type (0: one plain "
                         "GEMM; default: the engine's, off on GPUs)")
    args = ap.parse_args(argv)
    cfg = CONFIGS[args.config]
    if args.gram_block is not None:
        from influence_engine import factors as _factors

        device_type = "cuda" if cfg.device in ("cuda", "auto") and torch.cuda.is_available() else "cpu"
        _factors.GRAM_MIN_BLOCK[device_type] = args.gram_block or None
        cfg = replace(cfg, notes={**cfg.notes, "gram_min_block": f"{device_type}: {args.gram_block}"})
    if args.tiny:
        cfg = tiny(cfg)
    threads = args.threads or (1 if cfg.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    return run(cfg, args.out, use_kronfluence=not args.no_kronfluence)


if __name__ == "__main__":
    main()
