"""Exactness on real weights: the first two blocks of SmolLM2-135M-Instruct (hidden 576, MLP 1536, GQA with 3 KV
heads, the real 49,152-token vocabulary and tied head) in float64, on a few short real sentences.

- identity preconditioning equals plain autograd gradient dot products on every MLP layer of the slice;
- EK-FAC and K-FAC on one small layer (block 1's ``k_proj``, 192 x 576) equal their explicit construction from
  autograd: the covariances A (mean over tokens of a a^T) and S (Σ_tokens g g^T per document) from hooks, their
  eigendecomposition with ``torch.linalg.eigh``, for EK-FAC the eigenvalue correction
  Λ = mean_d (Q_S^T G_d Q_A)^2 from autograd per-document weight gradients G_d, and the score
  Σ (Q_S^T G_q Q_A) ⊙ (Q_S^T G_d Q_A) / (Λ + λ), with λ = X x mean(Λ) (``auto:X``). K-FAC's reference is the damped
  Kronecker-factored Gauss-Newton matrix: q^T (S ⊗ A + λ I)^-1 d, solved densely (``torch.linalg.solve``)
  in orthonormal bases of the spans of the training tokens' a and g (QR; no eigendecomposition).

The model is ``$INFLUENCE_AUDIT_REAL_MODEL`` (a Hugging Face directory) or /work/models/smollm2-135m-instruct;
without either the tests are skipped. Slow: loading the real weights and float64 passes take ~a minute.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import autograd_gradients

from influence_engine import InfluenceEngine
from influence_engine.data import collate

pytestmark = pytest.mark.slow

_DIR = os.environ.get("INFLUENCE_AUDIT_REAL_MODEL") or "/work/models/smollm2-135m-instruct"
if not (Path(_DIR) / "config.json").is_file():
    pytest.skip(f"no real model: set INFLUENCE_AUDIT_REAL_MODEL to a Hugging Face directory of SmolLM2-135M "
                f"(looked at {_DIR})", allow_module_level=True)

DOCS = [{"id": "d0", "text": "Git stores each commit as a snapshot."},
        {"id": "d1", "text": "A mutex lets one thread in at a time."},
        {"id": "d2", "text": "TCP retransmits lost segments."},
        {"id": "d3", "text": "The softmax turns scores into probabilities."},
        {"id": "d4", "text": "A hash table needs a good hash."}]
QUERIES = [{"id": "q0", "prompt": "What does Git store?", "completion": " Snapshots."},
           {"id": "q1", "prompt": "What does a mutex do?", "completion": " It serialises threads."}]
SMALL = "model.layers.1.self_attn.k_proj"


@pytest.fixture(scope="module")
def real():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(_DIR, num_hidden_layers=2, dtype=torch.float64,
                                                 local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(_DIR, local_files_only=True)
    assert model.config.hidden_size == 576 and model.config.vocab_size == 49152 and len(model.model.layers) == 2
    model.requires_grad_(False)
    return model, tok


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads.values()])


def test_identity_on_real_weights_equals_autograd_gradient_dot_products(real):
    model, tok = real
    eng = InfluenceEngine(model, tok, layers="mlp", precision="fp64", batch_size=3)
    assert len(eng.specs) == 6
    docs, qs = eng.encode(DOCS), eng.encode(QUERIES, where="queries")
    result = eng.score(docs, eng.prepare_queries(qs, eng.fit_factors(docs, "identity"), rank=0), top_k=0)
    names = list(eng.specs)
    D = torch.stack([_flat(autograd_gradients(model, names, d)) for d in docs])
    Q = torch.stack([_flat(autograd_gradients(model, names, q)) for q in qs])
    ref = (Q @ D.T).numpy()
    # float64 throughout; the two differ only in summation order (batched GEMMs against one autograd backward)
    np.testing.assert_allclose(result.all_scores, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())


def _tokens_a_g(model, name: str, example) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's inputs a_t (every token) and output gradients g_t = d(Σ NLL)/d(output_t), by a hook."""
    module = dict(model.named_modules())[name]
    seen = {}

    def hook(mod, inputs, output):
        seen["a"] = inputs[0].detach()
        output.retain_grad()
        seen["out"] = output

    h = module.register_forward_hook(hook)
    try:
        b = collate([example])
        with torch.enable_grad():
            emb = model.get_input_embeddings()(b.input_ids).requires_grad_(True)  # a graph through the frozen model
            logits = model(inputs_embeds=emb).logits
            sel = b.target_mask[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1][sel], b.input_ids[:, 1:][sel], reduction="sum")
            loss.backward()
    finally:
        h.remove()
    return seen["a"][0], seen["out"].grad[0]


@pytest.mark.parametrize("damping", ["auto:0.0001", "auto:0.1"])
def test_ekfac_and_kfac_on_a_real_layer_equal_their_explicit_construction(real, damping):
    model, tok = real
    eng = InfluenceEngine(model, tok, layers=SMALL, precision="fp64", batch_size=2, fisher="empirical")
    assert list(eng.specs) == [SMALL]
    docs, qs = eng.encode(DOCS), eng.encode(QUERIES, where="queries")
    x = float(damping.split(":")[1])

    # explicit covariances from hooks: A = Σ_t a a^T / tokens, S = Σ_t g g^T / documents
    ag = [_tokens_a_g(model, SMALL, d) for d in docs]
    n_tokens = sum(a.shape[0] for a, _ in ag)
    A = sum(a.T @ a for a, _ in ag) / n_tokens
    S = sum(g.T @ g for _, g in ag) / len(docs)
    lam_A, Q_A = torch.linalg.eigh(A)
    lam_S, Q_S = torch.linalg.eigh(S)
    G = {e.id: autograd_gradients(model, [SMALL], e)[SMALL] for e in docs + qs}  # (192, 576) by plain autograd
    for d, (a, g) in zip(docs, ag, strict=True):  # the hooks' tokens give autograd's gradient (Σ_t g_t a_t^T)
        torch.testing.assert_close(g.T @ a, G[d.id], rtol=1e-10, atol=1e-14)

    def rot(M):
        return Q_S.T @ M @ Q_A

    # EK-FAC: eigenvalue correction from autograd per-document gradients
    Lam = sum(rot(G[d.id]) ** 2 for d in docs) / len(docs)
    lam = x * float(Lam.mean())
    ref = np.array([[float((rot(G[q.id]) * rot(G[d.id]) / (Lam + lam)).sum()) for d in docs] for q in qs])
    got = eng.score(docs, eng.prepare_queries(qs, eng.fit_factors(docs, "ekfac", damping=damping), rank=0),
                    top_k=0).all_scores
    np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-10 * np.abs(ref).max())

    # K-FAC: the damped Kronecker-factored GGN (S ⊗ A + λ I)^-1 as a dense matrix. Its 110,592 unknowns are too
    # many to form, but every document's gradient lies in span(g) x span(a) of the training tokens, where S and A
    # live too: in orthonormal bases of those spans (QR of the tokens' vectors, no eigendecomposition) the system
    # is (S' ⊗ A' + λ I) X' = B' with a few hundred unknowns, and outside them X = B / λ = 0.
    U_S = torch.linalg.qr(torch.cat([g for _, g in ag]).T).Q  # (192, tokens)
    U_A = torch.linalg.qr(torch.cat([a for a, _ in ag]).T).Q  # (576, tokens)
    S_, A_ = U_S.T @ S @ U_S, U_A.T @ A @ U_A
    lam_k = x * float(torch.outer(lam_S.clamp_min(0), lam_A.clamp_min(0)).mean())
    dense = torch.kron(S_, A_) + lam_k * torch.eye(S_.shape[0] * A_.shape[0], dtype=torch.float64)
    for d in docs:  # the documents' gradients are inside the spans
        torch.testing.assert_close(U_S @ (U_S.T @ G[d.id] @ U_A) @ U_A.T, G[d.id], rtol=1e-9, atol=1e-12)
    B = torch.stack([(U_S.T @ G[d.id] @ U_A).reshape(-1) for d in docs], dim=1)
    X = torch.linalg.solve(dense, B)
    ref_k = np.array([((U_S.T @ G[q.id] @ U_A).reshape(-1) @ X).numpy() for q in qs])
    got_k = eng.score(docs, eng.prepare_queries(qs, eng.fit_factors(docs, "kfac", damping=damping), rank=0),
                      top_k=0).all_scores
    # The dense damped system at auto:1e-4 is ill-conditioned (cond ~ 1e4-1e6): with torch's 2 threads a score
    # near zero moved by 2e-10 of the largest (seen: 7.3e-8 on 327); 1e-9 of the largest keeps a 4x margin and
    # is still ~1e5 times tighter than any fp32 path.
    np.testing.assert_allclose(got_k, ref_k, rtol=1e-7, atol=1e-9 * np.abs(ref_k).max())


def test_one_pass_keeping_tokens_on_real_widths_equals_three_passes(real):
    """At real widths the one-pass fit keeps tokens (a 576 x 1536 layer's gradient is 886k values; a short
    document's tokens are a few tens of thousands), and gives the three passes' EK-FAC scores."""
    from influence_engine import TokenCache

    model, tok = real
    eng = InfluenceEngine(model, tok, layers="mlp", precision="fp64", batch_size=2, fisher="empirical")
    docs, qs = eng.encode(DOCS), eng.encode(QUERIES, where="queries")
    n_tokens = sum(len(e.input_ids) for e in docs)
    assert eng.gradient_cache_bytes(len(docs), n_tokens) * 10 < eng.gradient_cache_bytes(len(docs))
    ref_factors = eng.fit_factors(docs, "ekfac")
    factors, cache = eng.fit_factors(docs, "ekfac", cache=True)
    assert isinstance(cache, TokenCache) and cache.nbytes == eng.gradient_cache_bytes(len(docs), n_tokens)
    prepared = eng.prepare_queries(qs, ref_factors, rank=0)
    ref = eng.score(docs, prepared, top_k=0).all_scores
    np.testing.assert_allclose(eng.score(docs, prepared, top_k=0, cache=cache).all_scores, ref, rtol=1e-9,
                               atol=1e-12 * np.abs(ref).max())
    one = eng.score(docs, eng.prepare_queries(qs, factors, rank=0), top_k=0).all_scores
    np.testing.assert_allclose(one, ref, rtol=1e-7, atol=1e-10 * np.abs(ref).max())
