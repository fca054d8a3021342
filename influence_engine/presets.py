r"""What the layer presets mean on each model family.

``mlp``, ``attention`` and ``all`` name the same part of every model: the feed-forward projections of each
decoder block (for mixture-of-experts blocks: every expert's projections and any shared expert), its attention
projections, and every Linear layer but the output head. Module names mostly say which is which (``mlp.``,
``feed_forward.``, ``self_attn.`` ...); where they do not, a small table per ``model_type`` does (OPT keeps
``fc1``/``fc2`` directly under the decoder layer). For a family neither knows, the presets fall back to the
model's structure: the repeated blocks of its largest ``ModuleList``, their Linear layers under an attention-like
child for ``attention``, the others for ``mlp``.

Never tracked by a preset: routers (a MoE block's ``gate``/``router`` and Qwen2-MoE's ``shared_expert_gate``:
they choose experts, they are not experts) and the output head. With a LoRA adapter loaded (``lora.py``) the
presets mean the base model's layers; preset ``lora`` means the adapter's ``lora_A``/``lora_B`` layers.
A regular expression on module names picks anything trackable, routers included.
"""

from __future__ import annotations

import re

from torch import nn

MLP = re.compile(r"(^|\.)(mlp|feed_forward|ffn|ff|block_sparse_moe|moe)\.")
ATTENTION = re.compile(r"(^|\.)(attn|attention|self_attn|self_attention)\.")
ROUTER = re.compile(r"(^|\.)(gate|router|shared_expert_gate|gating)$|(^|\.)router\.")
LORA = re.compile(r"(^|\.)lora_(A|B)\.")
OUTPUT_HEAD = re.compile(r"(^|\.)(lm_head|embed_out|output)$")

# model_type -> {preset: pattern} where names alone do not say (checked against transformers 5.24 models)
FAMILY: dict[str, dict[str, re.Pattern[str]]] = {
    "opt": {"mlp": re.compile(r"\.layers\.\d+\.(fc1|fc2)(\.base_layer)?$")},  # fc1/fc2 directly under the decoder layer
    "xglm": {"mlp": re.compile(r"\.layers\.\d+\.(fc1|fc2)(\.base_layer)?$")},
    "biogpt": {"mlp": re.compile(r"\.layers\.\d+\.(fc1|fc2)(\.base_layer)?$")},
    "gptj": {"mlp": re.compile(r"\.mlp\.(fc_in|fc_out)(\.base_layer)?$")},
    "codegen": {"mlp": re.compile(r"\.mlp\.(fc_in|fc_out)(\.base_layer)?$")},
    "gpt2": {"mlp": re.compile(r"\.mlp\.(c_fc|c_proj)(\.base_layer)?$")},
    "mpt": {"mlp": re.compile(r"\.ffn\.(up_proj|down_proj)(\.base_layer)?$")},
}
PRESETS = ("mlp", "attention", "all", "lora")
_ATTENTION_CHILD = re.compile(r"(attn|attention|self_attn|self_attention|mixer|mha)", re.IGNORECASE)


def _blocks(model: nn.Module) -> tuple[str, list[str]]:
    """The decoder blocks: the children of the largest ModuleList of same-type modules (``prefix``, names)."""
    best: tuple[str, list[str]] = ("", [])
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best[1]) and len({type(c) for c in m}) == 1:
            if any(isinstance(x, nn.Linear) for x in m[0].modules()):
                best = (name, [f"{name}.{i}" for i in range(len(m))])
    return best


def structural(candidates: dict[str, nn.Module], model: nn.Module, preset: str) -> dict[str, nn.Module]:
    """``mlp``/``attention`` by structure: the trackable layers of each decoder block, split by whether their path
    inside the block passes through an attention-like child."""
    _, blocks = _blocks(model)
    chosen = {}
    for n, m in candidates.items():
        block = next((b for b in blocks if n.startswith(b + ".")), None)
        if block is None:
            continue
        inside = n[len(block) + 1:]
        is_attention = any(_ATTENTION_CHILD.search(part) for part in inside.split(".")[:-1])
        if is_attention == (preset == "attention"):
            chosen[n] = m
    return chosen


def preset_layers(model: nn.Module, candidates: dict[str, nn.Module], preset: str) -> dict[str, nn.Module]:
    """The layers preset ``preset`` tracks among ``candidates`` (every trackable module, by name, model order)."""
    if preset == "lora":
        return {n: m for n, m in candidates.items() if LORA.search(n)}
    base = {n: m for n, m in candidates.items() if not LORA.search(n) and not ROUTER.search(n)
            and not OUTPUT_HEAD.search(n)}
    if preset == "all":
        return base
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILY.get(model_type or "", {})
    pattern = family.get(preset) or (MLP if preset == "mlp" else ATTENTION)
    chosen = {n: m for n, m in base.items() if pattern.search(n)}
    return chosen or structural(base, model, preset)


def resolve_layers(model: nn.Module, layers: str) -> str:
    """``auto``: the adapter's layers (``lora``) when a LoRA adapter is loaded, else ``mlp``."""
    if layers != "auto":
        return layers
    return "lora" if any(LORA.search(n) for n, _ in model.named_modules()) else "mlp"
