"""The engine against exact references in float64: plain autograd, an explicit Gauss-Newton matrix."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import autograd_gradients, random_examples, tiny_gpt2, tiny_llama
from torch import nn
from torch.func import functional_call, jacrev

from influence_engine import Example, InfluenceEngine
from influence_engine.data import collate
from influence_engine.layers import layer_spec


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads.values()])


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama], ids=["gpt2-conv1d", "llama-linear"])
def test_identity_equals_autograd_gradient_dot_products(make_model):
    model = make_model()
    eng = InfluenceEngine(model, None, layers="mlp", precision="fp64", batch_size=3)
    docs = random_examples(7)
    queries = random_examples(3, prefix="q", prompt=True, seed=1)
    factors = eng.fit_factors(docs, "identity")
    result = eng.score(docs, eng.prepare_queries(queries, factors, rank=0), top_k=0)
    names = list(eng.specs)
    ref = np.array([[float(_flat(autograd_gradients(model, names, q)) @ _flat(autograd_gradients(model, names, d)))
                     for d in docs] for q in queries])
    np.testing.assert_allclose(result.all_scores, ref, rtol=1e-6, atol=1e-9 * np.abs(ref).max())


def test_sign_positive_score_means_upweighting_raises_completion_logprob():
    """With identity preconditioning the score is the first-order effect of one SGD step on the document."""
    model = tiny_gpt2(seed=3)
    eng = InfluenceEngine(model, None, layers="mlp", precision="fp64")
    docs = random_examples(5, seed=4)
    query = random_examples(1, prefix="q", prompt=True, seed=5)
    result = eng.score(docs, eng.prepare_queries(query, eng.fit_factors(docs, "identity"), rank=0), top_k=0)

    def completion_logprob(m) -> float:
        b = collate(query)
        logits = m(input_ids=b.input_ids).logits[:, :-1]
        sel = b.target_mask[:, 1:]
        return -float(nn.functional.cross_entropy(logits[sel], b.input_ids[:, 1:][sel], reduction="sum"))

    names = list(eng.specs)
    modules = dict(model.named_modules())
    base = completion_logprob(model)
    lr = 1e-6
    for j, doc in enumerate(docs):
        step = autograd_gradients(model, names, doc)
        with torch.no_grad():
            for n in names:
                spec, m = layer_spec(n, modules[n]), modules[n]
                gw = step[n][:, : spec.in_features]
                m.weight -= lr * (gw.T if spec.kind == "conv1d" else gw)
                if spec.bias:
                    m.bias -= lr * step[n][:, -1]
            change = completion_logprob(model) - base
            for n in names:  # undo
                spec, m = layer_spec(n, modules[n]), modules[n]
                gw = step[n][:, : spec.in_features]
                m.weight += lr * (gw.T if spec.kind == "conv1d" else gw)
                if spec.bias:
                    m.bias += lr * step[n][:, -1]
        assert change / lr == pytest.approx(result.all_scores[0, j], rel=1e-3)


class OneLayerLM(nn.Module):
    """Fixed token features -> one Linear layer -> logits. With zero weights the prediction is the same for
    every input, so over the full cross product of inputs and labels the empirical Fisher is exactly A ⊗ S."""

    def __init__(self, features: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.emb = nn.Embedding.from_pretrained(features)
        self.head = nn.Linear(features.shape[1], features.shape[0]).double()
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.emb

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, use_cache=None):
        if inputs_embeds is None:
            inputs_embeds = self.emb(input_ids)
        return SimpleNamespace(logits=self.head(inputs_embeds))


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_kfac_matches_exact_influence_where_kfac_is_exact(strategy):
    torch.manual_seed(0)
    V, d = 5, 3
    model = OneLayerLM(torch.randn(V, d, dtype=torch.float64), torch.randn(V, dtype=torch.float64))
    docs = [Example(f"x{x}y{y}", (x, y), 1, 2) for x in range(V) for y in range(V)]
    queries = [Example("q0", (1, 3), 1, 2), Example("q1", (4, 0), 1, 2)]
    damping = 0.05
    eng = InfluenceEngine(model, None, layers="head", precision="fp64", fisher="empirical", batch_size=4)
    factors = eng.fit_factors(docs, strategy, damping=damping)
    scores = eng.score(docs, eng.prepare_queries(queries, factors, rank=0), top_k=0).all_scores

    grads = {e.id: _flat(autograd_gradients(model, ["head"], e)) for e in docs + queries}
    D = torch.stack([grads[e.id] for e in docs])
    fisher = D.T @ D / len(docs)
    inv = torch.linalg.inv(fisher + damping * torch.eye(fisher.shape[0], dtype=torch.float64))
    exact = torch.stack([grads[q.id] for q in queries]) @ inv @ D.T
    np.testing.assert_allclose(scores, exact.numpy(), rtol=1e-6, atol=1e-9)


def _ggn(model, names, example: Example) -> torch.Tensor:
    """Σ_t J_t^T (diag p_t - p_t p_t^T) J_t over the example's targets, for the tracked parameters."""
    modules = dict(model.named_modules())
    keys, shapes = [], []
    for n in names:
        keys += [f"{n}.weight"] + ([f"{n}.bias"] if modules[n].bias is not None else [])
    params = dict(model.named_parameters())
    base = {k: params[k].detach() for k in keys}
    shapes = [base[k].shape for k in keys]
    sizes = [base[k].numel() for k in keys]
    b = collate([example])
    sel = b.target_mask[:, 1:]

    def logits_of(flat):
        chunks = torch.split(flat, sizes)
        p = {k: c.view(s) for k, c, s in zip(keys, chunks, shapes, strict=True)}
        out = functional_call(model, p, args=(), kwargs={"input_ids": b.input_ids})
        return out.logits[:, :-1][sel]

    flat0 = torch.cat([base[k].reshape(-1) for k in keys])
    J = jacrev(logits_of)(flat0)  # (n, V, P)
    probs = torch.softmax(logits_of(flat0), -1)
    H = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    # reorder parameters into the engine's (out, in + bias) layout per layer
    G = torch.einsum("nvp,nvw,nwq->pq", J, H, J)
    perm = _engine_order(model, names)
    return G[perm][:, perm]


def _engine_order(model, names) -> torch.Tensor:
    """Index map from flat HF parameters (weight then bias, per layer) to the engine's gradient layout."""
    modules = dict(model.named_modules())
    order, offset = [], 0
    for n in names:
        spec = layer_spec(n, modules[n])
        w = torch.arange(spec.in_features * spec.out_features).view(
            (spec.in_features, spec.out_features) if spec.kind == "conv1d" else (spec.out_features, spec.in_features))
        w = w.T if spec.kind == "conv1d" else w
        cols = [w + offset]
        offset += w.numel()
        if spec.bias:
            cols.append((torch.arange(spec.out_features) + offset)[:, None])
            offset += spec.out_features
        order.append(torch.cat(cols, dim=1).reshape(-1))
    return torch.cat(order)


def test_kfac_and_ekfac_approximate_exact_influence_better_than_identity():
    model = tiny_gpt2(seed=1, vocab=11, n_embd=4, n_layer=1)
    names = ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    docs = random_examples(24, vocab=11, lo=4, hi=7, seed=2)
    queries = random_examples(4, vocab=11, prefix="q", prompt=True, seed=3)
    model.requires_grad_(False)
    ggn = sum(_ggn(model, names, e) for e in docs) / len(docs)
    damping = 0.1 * float(torch.diagonal(ggn).mean())
    grads = {e.id: _flat(autograd_gradients(model, names, e)) for e in docs + queries}
    D = torch.stack([grads[e.id] for e in docs])
    Qg = torch.stack([grads[q.id] for q in queries])
    exact = (Qg @ torch.linalg.solve(ggn + damping * torch.eye(ggn.shape[0], dtype=torch.float64), D.T)).numpy()

    eng = InfluenceEngine(model, None, layers="mlp", precision="fp64", batch_size=8)
    # More sampled labels per document give a less noisy true Fisher: refit on copies with other ids.
    fit_docs = [Example(f"{e.id}#{k}", e.input_ids, 1, len(e.input_ids)) for k in range(8) for e in docs]
    corr = {}
    for strategy in ("identity", "kfac", "ekfac"):
        factors = eng.fit_factors(fit_docs, strategy)
        s = eng.score(docs, eng.prepare_queries(queries, factors, rank=0), top_k=0).all_scores
        corr[strategy] = np.mean([np.corrcoef(s[i], exact[i])[0, 1] for i in range(len(queries))])
    print("correlation with exact influence:", corr)
    assert corr["kfac"] > corr["identity"] + 0.02, corr
    assert corr["ekfac"] > corr["identity"] + 0.02, corr
    assert corr["ekfac"] > 0.9, corr
