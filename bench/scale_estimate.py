"""On paper: an 8B model (Llama-3-8B shape, MLP layers, EK-FAC, bf16) over a 10M-document corpus on 8 and 64 GPUs of
80 GB, from the throughput measured on one H200 (docs/performance.md, "GPU, 4x the documents": GPT-2-small shape,
bf16, seq 512; engine of e0aa35f). Prints every step of the arithmetic; nothing here is measured.

Method: FLOPs per token of each pass = the model's forward + backward to activations (4P, ../shared/NOTES.md) + the
accumulators' products, counted from the tracked layers' shapes (covariance: 2(a^2 + o^2) per layer; eigenvalue
correction, tokens rotated before the per-document product: 2(a^2 + o^2) + 2ao; scoring 32 queries at rank 32:
2 * 32 * 32 * (a + o)). The measured GPT-2-small rates turn into an effective FLOP rate per pass; the 8B passes are
assumed to run at that same rate (conservative: an 8B model's larger GEMMs use a GPU better; the "at 40% of peak"
line shows the other end). Layer groups come from the plan (influence_engine.plan) at the engine's budget of 80%
of what the fp32 weights leave free on an 80 GiB device.

Usage: python bench/scale_estimate.py [--docs 10000000] [--tokens-per-doc 512] [--gpus 8,64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math

GPT2_RATES = {"covariance": 125_153, "lambda": 123_162, "scoring": 154_000, "fwd_bwd": 181_100}  # tokens/s, H200
PEAK_BF16 = 989e12  # H100/H200 dense bf16 FLOP/s


def layer_flops(specs) -> dict[str, float]:
    cov = sum(2 * (s.a_dim ** 2 + s.out_features ** 2) for s in specs.values())
    lam = sum(2 * (s.a_dim ** 2 + s.out_features ** 2) + 2 * s.a_dim * s.out_features for s in specs.values())
    score = sum(2 * 32 * 32 * (s.a_dim + s.out_features) for s in specs.values())
    return {"covariance": cov, "lambda": lam, "scoring": score}


def shapes(cfg):
    from influence_engine.layers import layer_spec, select_layers
    from influence_engine.plan import meta_model, model_shape

    m = meta_model(cfg)
    specs = {n: layer_spec(n, x) for n, x in select_layers(m, "mlp").items()}
    return m, specs, model_shape(m)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=10_000_000)
    ap.add_argument("--tokens-per-doc", type=int, default=512)
    ap.add_argument("--gpus", default="8,64")
    ap.add_argument("--device-gib", type=float, default=80.0)
    ap.add_argument("--new-query-docs", type=int, default=3_200, help="documents re-scored exactly per new-query audit "
                    "(--refine 100 x 32 queries, measured ~3,100 on the CPU index bench)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import transformers as T

    from influence_engine.plan import make_plan

    out: dict = {"inputs": vars(args) | {"gpt2_h200_rates_tok_s": GPT2_RATES}}
    _, g_specs, (g_p, *_rest) = shapes(T.GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257))
    g_acc = layer_flops(g_specs)
    eff = {k: (4 * g_p + g_acc[k]) * GPT2_RATES[k] for k in ("covariance", "lambda", "scoring")}
    print(f"GPT-2-small: P = {g_p:,}; 4P = {4 * g_p / 1e9:.3f} GFLOP/token; accumulators (GFLOP/token): "
          + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in g_acc.items()))
    for k, v in eff.items():
        print(f"  measured {k}: {GPT2_RATES[k]:,} tok/s x {(4 * g_p + g_acc[k]) / 1e9:.3f} GFLOP = "
              f"{v / 1e12:.1f} TFLOP/s effective ({v / PEAK_BF16:.0%} of bf16 peak)")
    llama = T.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
    _, specs, (P, hidden, blocks, vocab) = shapes(llama)
    acc = layer_flops(specs)
    M = 4 * P
    tokens = args.docs * args.tokens_per_doc
    budget = int(0.8 * (args.device_gib - 4 * P / 2**30) * 2**30)  # the engine's rule: 80% of what is free
    plan = make_plan(specs, strategy="ekfac", precision="bf16", n_params=P, hidden=hidden, n_blocks=blocks,
                     vocab=vocab, batch_size=8, max_length=args.tokens_per_doc, docs=args.docs, tokens=tokens,
                     device_budget=budget)
    G = len(plan.groups)
    print(f"\n8B (Llama-3-8B shape): P = {P:,}; 4P = {M / 1e9:.1f} GFLOP/token; {len(specs)} MLP layers; accumulators"
          f" (GFLOP/token, all layers): " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in acc.items()))
    print(f"  factors on the device: covariance {plan.covariance_device / 2**30:.1f} GiB, eigenvalue correction "
          f"{plan.lambda_device / 2**30:.1f} GiB; budget on an {args.device_gib:.0f} GiB GPU after the fp32 weights "
          f"({4 * P / 2**30:.1f} GiB): {budget / 2**30:.1f} GiB -> {G} layer groups {[len(g) for g in plan.groups]}")
    print(f"  corpus: {args.docs:,} documents x {args.tokens_per_doc} tokens = {tokens:.3e} tokens")
    # each group's pass runs the whole model and its own layers' accumulators: G x model + all accumulators once
    flops = {"covariance": G * M + acc["covariance"], "lambda": G * M + acc["lambda"],
             "index build": M + acc["lambda"]}  # build: rotate and sketch per document, priced as a lambda pass
    rate = {"covariance": eff["covariance"], "lambda": eff["lambda"], "index build": eff["lambda"]}
    gpu_s = {k: flops[k] * tokens / rate[k] for k in flops}
    total = sum(gpu_s.values())
    print("\nFirst audit (fit over every document, then build the index), per token and in GPU-hours:")
    for k in flops:
        print(f"  {k}: {flops[k] / 1e9:.1f} GFLOP/token x {tokens:.3e} tokens / {rate[k] / 1e12:.1f} TFLOP/s = "
              f"{gpu_s[k] / 3600:,.0f} GPU-h")
    eig_s = 3.37 / 24 * len(specs) * ((14336 / 3072) ** 3 + (4096 / 3072) ** 3)  # GPT-2: 3.37 s for 24 layers
    print(f"  eigendecomposition (one task, layer by layer, one GPU): 3.37 s for GPT-2's 24 layers (a 3072-wide "
          f"matrix each, the 768-wide one negligible) = 0.14 s per layer, scaled by n^3 to 96 layers with a 14336- "
          f"and a 4096-wide matrix each: 96 x 0.14 s x ({(14336 / 3072) ** 3:.1f} + {(4096 / 3072) ** 3:.2f}) = "
          f"{eig_s / 60:.0f} min")
    per_shard_gb = plan.layers and sum(m.covariance_host for m in plan.layers) / 1e9
    lam_gb = sum(8 * m.out * m.a_dim for m in plan.layers) / 1e9
    out["first"] = {}
    for n in [int(x) for x in args.gpus.split(",")]:
        hours = total / n / 3600 + eig_s / 3600
        fast = hours * (min(eff.values()) / (0.4 * PEAK_BF16))
        print(f"  on {n} GPUs: {total / 3600:,.0f} GPU-h / {n} + eigendecomposition = {hours:,.1f} h "
              f"({hours / 24:.1f} days); at 40% of bf16 peak instead: {fast:,.1f} h ({fast / 24:.1f} days)")
        tb = n * (per_shard_gb + lam_gb) / 1e3
        print(f"    partials: one covariance partial ({per_shard_gb:.0f} GB float64) and one eigenvalue-correction "
              f"partial ({lam_gb:.0f} GB) per shard: with one shard per GPU, {tb:.1f} TB written and merged; with "
              f"the default --shard-size 1000 ({args.docs // 1000:,} shards), "
              f"{args.docs // 1000 * (per_shard_gb + lam_gb) / 1e6:.1f} PB")
        out["first"][n] = {"hours": hours, "hours_at_40pct": fast, "partials_tb": n * (per_shard_gb + lam_gb) / 1e3}
    # later audits: new queries through the index: query gradients, a search over the index, exact re-scoring of
    # the candidates (one scoring pass over ~3,200 documents)
    idx_bytes = 2 * 32 * 32 * len(specs)
    refine_s = (M + acc["scoring"]) * args.new_query_docs * args.tokens_per_doc / eff["scoring"]
    print(f"\nLater audits with new queries (index, sketch 32x32, fp16): {idx_bytes:,} bytes/document -> index "
          f"{idx_bytes * args.docs / 1e12:.2f} TB; search = reading it once (exact blocked search; I/O bound): "
          f"{idx_bytes * args.docs / 2e9 / 60:.0f} min at 2 GB/s by the one search task, "
          f"{idx_bytes * args.docs / 2e9 / 8 / 60:.1f} min if 8 readers shared it; refinement = "
          f"{args.new_query_docs:,} documents x {args.tokens_per_doc} tokens x {(M + acc['scoring']) / 1e9:.1f} "
          f"GFLOP / {eff['scoring'] / 1e12:.1f} TFLOP/s = {refine_s:.0f} GPU-s")
    for n in [int(x) for x in args.gpus.split(",")]:
        print(f"  on {n} GPUs: refinement {refine_s / n:.0f} s + the search (one task today) + model load")
    out["later"] = {"index_tb": idx_bytes * args.docs / 1e12, "refine_gpu_s": refine_s,
                    "search_min_one_reader_2GBps": idx_bytes * args.docs / 2e9 / 60}
    out["groups"] = G
    out["gpu_hours_first"] = total / 3600
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
    assert math.isfinite(total)


if __name__ == "__main__":
    main()
