"""Cost of tracking mixture-of-experts experts: covariance-pass tokens/s on a Mixtral-shaped model, CPU.

Tracks attention only (experts run transformers' own kernel), then every expert (each one a layer) with the packed
routed view the engine uses and with a dense (B, T, ·) view for comparison. Run:
``PYTHONPATH=$PWD OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/moe_experts.py``.
"""

from __future__ import annotations

import time

import torch
import transformers as T

import influence_engine.passes as passes
from influence_engine import Example, InfluenceEngine
from influence_engine.experts import routed_view


def main(n_docs: int = 32, length: int = 128) -> None:
    cfg = T.AutoConfig.for_model("mixtral", vocab_size=1000, hidden_size=256, intermediate_size=512,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256)
    g = torch.Generator().manual_seed(0)
    docs = [Example(f"d{i}", tuple(torch.randint(0, 1000, (length,), generator=g).tolist()), 1, length)
            for i in range(n_docs)]
    for layers, packed in (("attention", True), ("mlp", True), ("mlp", False)):
        torch.manual_seed(0)
        eng = InfluenceEngine(T.AutoModelForCausalLM.from_config(cfg), None, layers=layers, batch_size=8)
        passes.routed_view = lambda r, mask, packed=True, _p=packed: routed_view(r, mask, packed=_p)
        eng.fit_covariance(docs[:8])  # warm-up
        t0 = time.perf_counter()
        eng.fit_covariance(docs)
        rate = n_docs * length / (time.perf_counter() - t0)
        print(f"--layers {layers:9s} {len(eng.specs):3d} layers, {'packed' if packed else 'dense '} view: "
              f"{rate:,.0f} tokens/s")
    passes.routed_view = routed_view


if __name__ == "__main__":
    main()
