"""Counterfactual checks of influence candidates: does up- or down-weighting a document really move a query?

An influence score predicts the first-order change of ``log p(completion | prompt)`` when a training document
is up-weighted (positive: it rises). Two checks measure the change itself, from the audited weights θs:

``tail-patch`` (any size): one optimizer step on the document alone, ``θ = θs ∓ lr P g_d`` with ``g_d`` the
    gradient of the document's summed NLL, then the queries' log-probabilities are measured and the weights
    restored exactly. ``P`` is the identity (``optimizer="sgd"``: the step measures the raw alignment of the
    document's and the query's gradients, i.e. the identity-strategy score times ``lr``), or Adam's second-moment
    preconditioner ``1 / sqrt(v)`` with ``v`` the mean squared per-document gradient over a sample of training
    documents and the document itself (``optimizer="adam"``: the step Adam would take with training-like
    statistics, a diagonal curvature estimate).
``pbrf`` (small models): the proximal Bregman response function of Bae et al. 2022, which influence functions
    approximate (Grosse et al. 2023 use it to validate EK-FAC): ``θ* = argmin_θ B(θ) ± ε L_d(θ) + λ/2 ||θ-θs||²``
    where ``B`` is the mean over a sample of training documents of the tokens' summed KL divergence from the
    audited model's predictions (the Bregman divergence of the cross-entropy in logit space), ``ε`` one
    document's weight (``1/N`` by default) and ``λ`` the damping (``0.1 x`` the mean diagonal of the true
    Fisher on the sample, like the engine's ``auto`` damping). At θs the first and last terms have zero
    gradient, so the response comes from their curvature; solved in float64 with full-batch L-BFGS.

Both update every parameter by default (what retraining changes) or only the tracked layers. The model is used
as it is (nothing is copied for ``tail-patch``); ``requires_grad`` flags and weights are restored after every
call. Documents are checked one at a time; the queries of each check run in batches.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import Batch, Example, collate, example_seed
from .errors import UserError

CHECKS = ("tail-patch", "pbrf")
OPTIMIZERS = ("sgd", "adam")
PARAMS = ("all", "tracked")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class VerifySettings:
    """How a counterfactual check runs (recorded beside its results).

    ``lr``: the tail-patch learning rate; ``None`` chooses it so that the median step over the calibration
    documents changes the updated parameters by ``relative_step`` of their norm. ``epsilon``: the PBRF
    document weight (``None``: ``1 / n_train``). ``damping``: the PBRF proximity weight (``None``: 0.1 x the
    mean diagonal of the true Fisher on the Bregman sample)."""

    check: str = "tail-patch"
    optimizer: str = "adam"
    params: str = "all"
    lr: float | None = None
    relative_step: float = 1e-3
    epsilon: float | None = None
    damping: float | None = None
    pbrf_iters: int = 60
    sample_size: int = 32
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.check not in CHECKS:
            raise UserError(f"--verify-check {self.check!r}: choose one of {', '.join(CHECKS)}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--verify-optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.params not in PARAMS:
            raise UserError(f"--verify-params {self.params!r}: choose 'all' or 'tracked'")
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"--verify-lr {self.lr}: must be positive")
        if not self.relative_step > 0:
            raise UserError(f"relative_step {self.relative_step}: must be positive")
        if self.epsilon is not None and not self.epsilon > 0:
            raise UserError(f"epsilon {self.epsilon}: must be positive")
        if self.damping is not None and self.damping < 0:
            raise UserError(f"damping {self.damping}: must be non-negative")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Deltas:
    """Measured changes of ``log p(completion | prompt)`` (nats), documents x queries, in input order."""

    doc_ids: list[str]
    query_ids: list[str]
    up: np.ndarray  # (D, Q): the document up-weighted
    down: np.ndarray  # (D, Q): the document down-weighted
    settings: dict[str, Any]  # the settings as run, with the learning rate / epsilon / damping chosen


# ------------------------------------------------------------------------------------------------ objectives
def _forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                 position_ids=batch.position_ids, use_cache=False).logits


def _target_rows(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions predicting a target (row, column) and the target tokens."""
    sel = batch.target_mask[:, 1:]
    rows, cols = sel.nonzero(as_tuple=True)
    return rows, cols, batch.input_ids[rows, cols + 1]


def summed_nll(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Per-example summed next-token NLL over the targets, shape (B,)."""
    logits = _forward(model, batch)
    rows, cols, targets = _target_rows(batch)
    logp = torch.log_softmax(logits[rows, cols].to(torch.promote_types(logits.dtype, torch.float32)), -1)
    nll = -logp.gather(1, targets[:, None])[:, 0]
    return torch.zeros(len(batch), dtype=nll.dtype, device=nll.device).index_add_(0, rows, nll)


def completion_logprobs(model: nn.Module, queries: Sequence[Example], device: torch.device,
                        batch_size: int = 8, pad_id: int = 0) -> torch.Tensor:
    """``log p(completion | prompt)`` (summed over the completion's tokens) per query, in float64."""
    out = []
    with torch.no_grad():
        for s in range(0, len(queries), batch_size):
            batch = collate(queries[s:s + batch_size], pad_id=pad_id).to(device)
            out.append(-summed_nll(model, batch).double())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ parameters
def selected_parameters(model: nn.Module, which: str, tracked: dict[str, nn.Module] | None) -> list[nn.Parameter]:
    """Every (floating-point, de-duplicated) parameter, or only those of the tracked layers."""
    if which == "tracked":
        if not tracked:
            raise UserError("--verify-params tracked: no tracked layers were given")
        seen: dict[int, nn.Parameter] = {}
        for m in tracked.values():
            for p in m.parameters(recurse=False):
                seen.setdefault(id(p), p)
        return list(seen.values())
    return [p for p in model.parameters() if torch.is_floating_point(p)]


@contextmanager
def _grad_enabled(params: Sequence[nn.Parameter]):
    """Turn on gradients for ``params`` (the engine freezes everything) and restore every flag afterwards."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)


@contextmanager
def restored(params: Sequence[nn.Parameter]):
    """Weights changed inside are put back bit for bit (copied back from a saved clone)."""
    saved = [p.detach().clone() for p in params]
    try:
        yield saved
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def _grads(model: nn.Module, params: Sequence[nn.Parameter], example: Example, device: torch.device,
           pad_id: int) -> list[torch.Tensor]:
    batch = collate([example], pad_id=pad_id).to(device)
    loss = summed_nll(model, batch).sum()
    return list(torch.autograd.grad(loss, list(params), allow_unused=True))


def _zero_none(grads: list[torch.Tensor | None], params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def _norm(ts: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in ts))


def _sample(docs: Sequence[Example], n: int, seed: int) -> list[Example]:
    order = sorted(range(len(docs)), key=lambda i: example_seed(seed, docs[i].id))
    return [docs[i] for i in order[:n]]


# ------------------------------------------------------------------------------------------------ the checks
class Verifier:
    """Counterfactual checks on a model (used in place; weights and flags restored after every call)."""

    def __init__(self, model: nn.Module, *, device: torch.device | str = "cpu", pad_id: int = 0,
                 tracked: dict[str, nn.Module] | None = None, settings: VerifySettings | None = None):
        self.model = model
        self.device = torch.device(device)
        self.pad_id = pad_id
        self.tracked = tracked
        self.settings = settings or VerifySettings()

    def _params(self) -> list[nn.Parameter]:
        return selected_parameters(self.model, self.settings.params, self.tracked)

    def logprobs(self, queries: Sequence[Example]) -> torch.Tensor:
        return completion_logprobs(self.model, queries, self.device, self.settings.batch_size, self.pad_id)

    def run(self, docs: Sequence[Example], queries: Sequence[Example], *, train_sample: Sequence[Example] = (),
            n_train: int | None = None, progress: Progress | None = None,
            pairs: Mapping[str, Collection[str]] | None = None) -> Deltas:
        """Deltas of every query for every document, up- and down-weighted. ``train_sample``: training
        documents for the Adam statistics, the learning-rate calibration and the PBRF Bregman term (default:
        ``docs``); ``n_train``: the training set's size (PBRF's default ``ε = 1/n_train``). ``pairs`` (tail-patch):
        per document id, the query ids worth measuring; the other cells are NaN and their forward passes are
        skipped (a candidate is checked against its own queries only: on a real model the queries' forward
        passes dominate the check)."""
        if not docs or not queries:
            raise UserError("nothing to verify: no documents or no queries")
        was_training = self.model.training
        self.model.eval()
        sample = _sample(list(train_sample) or list(docs), self.settings.sample_size, self.settings.seed)
        try:
            if self.settings.check == "tail-patch":
                return self._tail_patch(docs, queries, sample, progress, pairs)
            return self._pbrf(docs, queries, sample, n_train or len(train_sample) or len(docs), progress)
        finally:
            self.model.train(was_training)

    # -------------------------------------------------------------------------------------------- tail-patch
    def _tail_patch(self, docs, queries, sample, progress, pairs=None) -> Deltas:
        s = self.settings
        params = self._params()
        base = self.logprobs(queries)
        up = np.full((len(docs), len(queries)), np.nan) if pairs is not None else np.zeros((len(docs), len(queries)))
        down = up.copy()
        with _grad_enabled(params), restored(params):
            v = None
            if s.optimizer == "adam":
                v = [torch.zeros_like(p) for p in params]
                for e in sample:
                    for acc, g in zip(v, _zero_none(_grads(self.model, params, e, self.device, self.pad_id), params),
                                      strict=True):
                        acc.add_(g.pow(2))

            def step(g: list[torch.Tensor]) -> list[torch.Tensor]:
                if v is None:
                    return g
                n = len(sample) + 1  # the document's own square joins the sample's, as in Adam's running state
                return [gi / ((vi + gi.pow(2)) / n).sqrt().clamp_min(1e-30) for gi, vi in zip(g, v, strict=True)]

            lr = s.lr
            if lr is None:  # median step size over the calibration documents = relative_step x ||θ||
                sizes = [_norm(step(_zero_none(_grads(self.model, params, e, self.device, self.pad_id), params)))
                         for e in sample]
                lr = s.relative_step * _norm([p.detach() for p in params]) / max(float(np.median(sizes)), 1e-30)
            for j, doc in enumerate(docs):
                cols = list(range(len(queries)))
                if pairs is not None:
                    wanted = set(pairs.get(doc.id, ()))
                    cols = [i for i, q in enumerate(queries) if q.id in wanted]
                if not cols:  # nothing asked of this document
                    if progress is not None:
                        progress(j + 1, len(docs))
                    continue
                sub = [queries[i] for i in cols]
                d = step(_zero_none(_grads(self.model, params, doc, self.device, self.pad_id), params))
                with torch.no_grad():
                    saved = [p.detach().clone() for p in params]
                    for p, di in zip(params, d, strict=True):
                        p.sub_(lr * di)
                    up[j, cols] = (self.logprobs(sub) - base[cols]).cpu().numpy()
                    for p, sv, di in zip(params, saved, d, strict=True):
                        p.copy_(sv).add_(lr * di)
                    down[j, cols] = (self.logprobs(sub) - base[cols]).cpu().numpy()
                    for p, sv in zip(params, saved, strict=True):
                        p.copy_(sv)
                if progress is not None:
                    progress(j + 1, len(docs))
        settings = replace(s, lr=lr).to_json() | {"lr_chosen": s.lr is None,
                                                  "n_parameters": sum(p.numel() for p in params)}
        return Deltas([d.id for d in docs], [q.id for q in queries], up, down, settings)

    # -------------------------------------------------------------------------------------------------- pbrf
    def _pbrf(self, docs, queries, sample, n_train, progress) -> Deltas:
        s = self.settings
        # float64 copy: the response is O(ε), far below float32 resolution of the loss
        model = copy.deepcopy(self.model).to(self.device, torch.float64).eval()
        tracked = None
        if s.params == "tracked":
            names = {id(m): n for n, m in self.model.named_modules()}
            mods = dict(model.named_modules())
            tracked = {names[id(m)]: mods[names[id(m)]] for m in (self.tracked or {}).values()}
        for p in model.parameters():
            p.requires_grad_(False)
        params = selected_parameters(model, s.params, tracked)
        theta0 = [p.detach().clone() for p in params]
        sb = collate(sample, pad_id=self.pad_id).to(self.device)
        rows, cols, _ = _target_rows(sb)
        with torch.no_grad():
            ref = torch.log_softmax(_forward(model, sb)[rows, cols], -1)  # the audited model's predictions
        eps = s.epsilon if s.epsilon is not None else 1.0 / max(n_train, 1)
        lam = s.damping
        if lam is None:  # 0.1 x mean diagonal of the true Fisher (labels drawn from the model) on the sample
            g = torch.Generator().manual_seed(s.seed)
            total = 0.0
            with _grad_enabled(params):
                for e in sample:
                    b = collate([e], pad_id=self.pad_id).to(self.device)
                    r, c, _ = _target_rows(b)
                    logits = _forward(model, b)[r, c]
                    lab = torch.multinomial(torch.softmax(logits.detach(), -1).cpu(), 1, generator=g)[:, 0]
                    loss = nn.functional.cross_entropy(logits, lab.to(self.device), reduction="sum")
                    total += _norm(_zero_none(list(torch.autograd.grad(loss, params, allow_unused=True)),
                                              params)) ** 2
            lam = 0.1 * total / len(sample) / sum(p.numel() for p in params)
        base = completion_logprobs(model, queries, self.device, s.batch_size, self.pad_id)
        up = np.zeros((len(docs), len(queries)))
        down = np.zeros_like(up)
        iters: list[int] = []

        def solve(doc: Example, sign: float) -> torch.Tensor:
            db = collate([doc], pad_id=self.pad_id).to(self.device)
            with torch.no_grad():
                for p, t in zip(params, theta0, strict=True):
                    p.copy_(t)
            opt = torch.optim.LBFGS(params, lr=1.0, max_iter=s.pbrf_iters, history_size=20,
                                    tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe")

            def closure() -> torch.Tensor:
                opt.zero_grad(set_to_none=True)
                logp = torch.log_softmax(_forward(model, sb)[rows, cols], -1)
                bregman = (ref.exp() * (ref - logp)).sum() / len(sample)
                prox = sum(((p - t) ** 2).sum() for p, t in zip(params, theta0, strict=True))
                loss = bregman + sign * eps * summed_nll(model, db).sum() + 0.5 * lam * prox
                loss.backward()
                return loss

            with _grad_enabled(params):
                opt.step(closure)
            iters.append(int(opt.state[params[0]].get("n_iter", 0)))
            return completion_logprobs(model, queries, self.device, s.batch_size, self.pad_id) - base

        for j, doc in enumerate(docs):
            up[j] = solve(doc, +1.0).cpu().numpy()
            down[j] = solve(doc, -1.0).cpu().numpy()
            if progress is not None:
                progress(j + 1, len(docs))
        settings = replace(s, epsilon=eps, damping=lam).to_json() | {
            "epsilon_chosen": s.epsilon is None, "damping_chosen": s.damping is None,
            "n_parameters": sum(p.numel() for p in params), "lbfgs_iterations_mean": float(np.mean(iters))}
        return Deltas([d.id for d in docs], [q.id for q in queries], up, down, settings)


# ------------------------------------------------------------------------------------------------ verdicts
def noise_threshold(random_up: np.ndarray, random_down: np.ndarray) -> np.ndarray:
    """Per query: the median absolute delta of the random baseline documents (both directions). A candidate
    whose delta is no larger than what a typical random document does is not evidence either way."""
    both = np.concatenate([np.abs(random_up), np.abs(random_down)], axis=0)
    return np.median(both, axis=0) if both.size else np.zeros(random_up.shape[1])


def verified(score: np.ndarray, up: np.ndarray, down: np.ndarray, threshold: np.ndarray | float) -> np.ndarray:
    """The predicted sign holds in both directions: up-weighting moves the query the way the score says,
    down-weighting the other way, and both moves exceed the noise threshold."""
    sign = np.sign(score)
    thr = np.asarray(threshold)
    return (sign != 0) & (sign * up > thr) & (-sign * down > thr)
