"""Every family the engine supports, checked against plain autograd in float64.

Tiny random models (two blocks, width 8) of each family in ``families.FAMILIES`` (dense, mixture-of-experts with
fused experts) and a LoRA adapter, built offline from configs. For each, with every layer preset ``all`` tracks:

* identity: scores are the dot products of per-document gradients from ``torch.autograd.grad`` on an untouched
  copy of the model (its own forward, its own fused experts);
* K-FAC: the covariance sums ``Σ a a^T``, ``Σ g g^T`` and per-layer token counts equal sums over hooks on that copy
  (for an expert: the tokens routed to it, its inputs and the routing-weighted gradient of its output);
* EK-FAC: the eigenvalue correction equals ``Σ_d (Q_S^T G_d Q_A)^2`` of the autograd gradients, and scores equal
  ``<Q_S [(Q_S^T G_q Q_A) / (Λ + λ)] Q_A^T, G_d>`` built from those gradients.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from families import (
    FAMILIES,
    MOE_FAMILIES,
    RTOL,
    reference_covariances,
    reference_gradients,
    tiny_lora,
    tiny_model,
    tiny_old_moe,
)
from helpers import random_examples

from influence_engine import InfluenceEngine, eigendecompose
from influence_engine.experts import ExpertLinear
from influence_engine.layers import select_layers
from influence_engine.lora import unwrap

DOCS = random_examples(5, vocab=23, lo=3, hi=7, seed=11)
QUERIES = random_examples(2, vocab=23, lo=3, hi=7, prefix="q", prompt=True, seed=12)


def _check_family(ref: torch.nn.Module, model: torch.nn.Module, layers: str = "all", prefix: str = "",
                  rtol: float = 1e-9) -> InfluenceEngine:
    eng = InfluenceEngine(model, None, layers=layers, precision="fp64", fisher="empirical", batch_size=2)
    tracked = dict(eng.tracked)
    grads = {e.id: reference_gradients(ref, tracked, e, prefix) for e in DOCS + QUERIES}

    # identity: per-document gradient dot products
    ident = eng.score(DOCS, eng.prepare_queries(QUERIES, eng.fit_factors(DOCS, "identity"), rank=0), top_k=0)
    flat = {k: torch.cat([g.reshape(-1) for g in v.values()]) for k, v in grads.items()}
    ref_scores = np.array([[float(flat[q.id] @ flat[d.id]) for d in DOCS] for q in QUERIES])
    np.testing.assert_allclose(ident.all_scores, ref_scores, rtol=max(rtol, 1e-7),
                               atol=1e-10 * np.abs(ref_scores).max())

    # K-FAC factors: covariance sums and per-layer token counts
    cov = eng.fit_covariance(DOCS)
    A, S, count = reference_covariances(ref, tracked, DOCS, prefix)
    for n in tracked:
        assert cov.layer_tokens(n) == count[n], n
        torch.testing.assert_close(cov.A[n], A[n], rtol=rtol, atol=1e-12)
        torch.testing.assert_close(cov.S[n], S[n], rtol=rtol, atol=1e-12)

    # EK-FAC: eigenvalue correction and scores from the autograd gradients in the engine's basis
    basis = eigendecompose(cov)
    lam = eng.fit_lambda(DOCS, basis)
    for n in tracked:
        want = sum((basis.Q_S[n].T @ grads[d.id][n] @ basis.Q_A[n]) ** 2 for d in DOCS)
        torch.testing.assert_close(lam.sums[n], want, rtol=rtol, atol=1e-14)
    factors = eng.finalize("ekfac", basis=basis, lambdas=lam, covariance=cov, damping=1e-3)
    scores = eng.score(DOCS, eng.prepare_queries(QUERIES, factors, rank=0), top_k=0).all_scores
    want = np.zeros_like(scores)
    for i, q in enumerate(QUERIES):
        for n in tracked:
            Q_S, Q_A = basis.Q_S[n], basis.Q_A[n]
            P = Q_S @ ((Q_S.T @ grads[q.id][n] @ Q_A) / (lam.sums[n] / len(DOCS) + 1e-3)) @ Q_A.T
            want[i] += [float((P * grads[d.id][n]).sum()) for d in DOCS]
    np.testing.assert_allclose(scores, want, rtol=max(rtol, 1e-7), atol=1e-10 * np.abs(want).max())
    return eng


# close variants of a family checked in the fast suite (Llama- or GPT-2-like blocks): the slow suite checks them
VARIANTS = {"mistral", "qwen2", "gemma", "granite", "cohere", "stablelm", "codegen", "gpt_bigcode"}


@pytest.mark.parametrize("model_type", [pytest.param(t, marks=pytest.mark.slow) if t in VARIANTS else t
                                        for t in FAMILIES])
def test_family_matches_autograd(model_type):
    ref = tiny_model(model_type)
    eng = _check_family(ref, copy.deepcopy(ref), rtol=RTOL.get(model_type, 1e-9))
    assert select_layers(eng.model, "mlp") and select_layers(eng.model, "attention")
    if model_type in MOE_FAMILIES:  # every expert is a layer; routers never are
        experts = [n for n, m in eng.tracked.items() if isinstance(m, ExpertLinear)]
        assert len(experts) == 2 * 2 * 4, experts
        cov = eng.fit_covariance(DOCS)  # each token goes to its top 2 of 4 experts: counts add up to 2 per token
        tokens = sum(len(d.input_ids) for d in DOCS)
        assert sum(cov.layer_tokens(n) for n in experts if ".layers.0." in n and "down" in n) == 2 * tokens
        assert all(0 < cov.layer_tokens(n) < tokens for n in experts)
        # per-expert, per-token explanations (rows at their tokens' positions) add up to the scores
        prepared = eng.prepare_queries(QUERIES, eng.fit_factors(DOCS, "ekfac", damping=1e-3), rank=0)
        scores = eng.score(DOCS, prepared, top_k=0).all_scores
        for j, ex in enumerate(eng.explain(DOCS, prepared)):
            assert set(ex.layer_token_scores) == set(eng.specs)
            np.testing.assert_allclose([ex.score(q) for q in range(len(QUERIES))], scores[:, j], rtol=1e-9)
        assert not any(n.endswith(("gate", "router", "shared_expert_gate")) for n in eng.tracked)


def test_lora_adapter_matches_autograd():
    """The adapter's lora_A/lora_B layers (the default on an adapter) with non-zero lora_B, and base layers by
    --layers, against autograd on the PEFT model itself."""
    _, adapted = tiny_lora()
    eng = _check_family(adapted, unwrap(copy.deepcopy(adapted)), layers="auto", prefix="base_model.model.")
    assert eng.layers == "lora" and len(eng.specs) == 2 * 4 * 2
    assert all(".lora_A." in n or ".lora_B." in n for n in eng.specs)
    base = _check_family(adapted, unwrap(copy.deepcopy(adapted)), layers="mlp", prefix="base_model.model.")
    assert all("lora" not in n for n in base.specs) and any(n.endswith("up_proj.base_layer") for n in base.specs)


def test_older_per_expert_linear_layout_matches_autograd():
    """transformers 4's layout: each expert three nn.Linear layers called on its gathered tokens, the output
    scattered back with index_add_ (whose indices place the rows). With 8 experts some get no token in a batch."""
    ref = tiny_old_moe(experts=8)
    eng = _check_family(ref, copy.deepcopy(ref), layers="mlp")
    assert len(eng.specs) == 2 * 8 * 3 and not any(n.endswith(".gate") for n in eng.specs)
    cov = eng.fit_covariance(DOCS)
    tokens = sum(len(d.input_ids) for d in DOCS)
    assert sum(cov.layer_tokens(n) for n in eng.specs if ".layers.0." in n and n.endswith("w2")) == 2 * tokens
