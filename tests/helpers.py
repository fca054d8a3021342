"""Tiny models, examples and plain-autograd references for the engine's tests."""

from __future__ import annotations

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from influence_engine import Example, InfluenceEngine
from influence_engine.data import collate
from influence_engine.layers import layer_spec


def tiny_gpt2(seed: int = 0, vocab: int = 23, n_embd: int = 8, n_layer: int = 2) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=n_embd, n_layer=n_layer, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).double().eval()


def tiny_llama(seed: int = 0, vocab: int = 23) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).double().eval()


def random_examples(n: int, vocab: int = 23, lo: int = 3, hi: int = 9, seed: int = 0, prefix: str = "d",
                    prompt: bool = False) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        ids = tuple(torch.randint(0, vocab, (length,), generator=g).tolist())
        start = int(torch.randint(1, length, (1,), generator=g)) if prompt else 1
        out.append(Example(f"{prefix}{i}", ids, start, length))
    return out


def autograd_gradients(model, tracked_names, example: Example) -> dict[str, torch.Tensor]:
    """Per-layer (out, in + bias) gradient of one example's summed NLL, by plain autograd on the weights."""
    model = model.double()
    modules = dict(model.named_modules())
    params = []
    for n in tracked_names:
        m = modules[n]
        params += [m.weight] + ([m.bias] if m.bias is not None else [])
    for p in params:
        p.requires_grad_(True)
    b = collate([example])
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask.long()).logits
    sel = b.target_mask[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1][sel], b.input_ids[:, 1:][sel], reduction="sum")
    grads = torch.autograd.grad(loss, params)
    for p in params:
        p.requires_grad_(False)
    out, k = {}, 0
    for n in tracked_names:
        spec = layer_spec(n, modules[n])
        gw = grads[k]
        k += 1
        gw = gw.T if spec.kind == "conv1d" else gw
        if spec.bias:
            gw = torch.cat([gw, grads[k][:, None]], dim=1)
            k += 1
        out[n] = gw
    return out


def fp64_engine(model, **kw) -> InfluenceEngine:
    """An engine in float64 on the MLP layers (unless told otherwise), for exact comparisons."""
    kw.setdefault("layers", "mlp")
    return InfluenceEngine(model, None, precision="fp64", **kw)


def exact_scores(eng, docs, queries, factors) -> np.ndarray:
    """Every (query, document) score with exact (rank-0) queries: the reference sketched and indexed scores meet."""
    return eng.score(docs, eng.prepare_queries(queries, factors, rank=0), top_k=0).all_scores
