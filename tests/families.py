"""Tiny random models of many transformers families, built offline from configs, and plain-autograd references
for any tracked layer (Linear, Conv1D, an expert of fused 3-D experts, a LoRA layer)."""

from __future__ import annotations

import copy

import torch
import transformers as T
from torch import nn

from influence_engine import Example
from influence_engine.data import collate
from influence_engine.experts import ExpertLinear

VOCAB = 23
COMMON = dict(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              intermediate_size=12, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts=4, num_experts_per_tok=2)

# model_type -> config overrides (dense families, then mixture-of-experts)
FAMILIES: dict[str, dict] = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {"head_dim": 4}, "gemma": {"head_dim": 4},
    "gemma2": {"head_dim": 4}, "phi3": {}, "olmo2": {}, "granite": {}, "cohere": {}, "stablelm": {},
    "gpt_neox": {}, "starcoder2": {}, "falcon": {}, "bloom": {}, "gptj": {"rotary_dim": 2},
    "codegen": {"rotary_dim": 2},
    "gpt2": {}, "gpt_bigcode": {}, "opt": {"ffn_dim": 12, "word_embed_proj_dim": 8}, "phi": {}, "mpt": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {**MOE, "moe_intermediate_size": 6, "shared_expert_intermediate_size": 10},
    "qwen3_moe": {**MOE, "moe_intermediate_size": 6, "head_dim": 4},
    "olmoe": MOE,
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
# relative tolerance where the model itself computes in float32 inside a float64 model (MPT: attention softmax)
RTOL = {"mpt": 1e-5}


def tiny_model(model_type: str, seed: int = 0) -> nn.Module:
    """A float64 random model of ``model_type`` in eval mode (fused experts run eagerly: float64)."""
    torch.manual_seed(seed)
    cfg = T.AutoConfig.for_model(model_type, **COMMON, **FAMILIES[model_type])
    for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout", "attention_dropout", "dropout"):
        if hasattr(cfg, k):
            setattr(cfg, k, 0.0)
    model = T.AutoModelForCausalLM.from_config(cfg).double().eval()
    if hasattr(model, "set_experts_implementation") and model_type in MOE_FAMILIES:
        model.set_experts_implementation("eager")
    return model


def tiny_lora(seed: int = 0, base_type: str = "llama"):
    """(base model, adapted model): a LoRA adapter with random, non-zero ``lora_B`` on attention and MLP layers."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model(base_type, seed)
    torch.manual_seed(seed + 1)
    cfg = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, init_lora_weights=False,
                     target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    adapted = get_peft_model(copy.deepcopy(base), cfg).double().eval()
    return base, adapted


def _param_view(model: nn.Module, name: str, module: nn.Module) -> list[tuple[str, object]]:
    """(parameter name, how to turn its gradient into the layer's ``(out, in)`` / ``(out,)`` blocks)."""
    if isinstance(module, ExpertLinear):
        owner = name.rsplit(".", 2)[0]
        e, t = module.index, module.transposed
        out = [(f"{owner}.{module.param}", lambda g: g[e].T if t else g[e])]
        if module.bias is not None:
            out.append((f"{owner}.{module.param}_bias", lambda g: g[e]))
        return out
    conv = type(module).__name__ == "Conv1D"
    out = [(f"{name}.weight", (lambda g: g.T) if conv else (lambda g: g))]
    if getattr(module, "bias", None) is not None:
        out.append((f"{name}.bias", lambda g: g))
    return out


def reference_gradients(ref: nn.Module, layers: dict[str, nn.Module], example: Example,
                        prefix: str = "") -> dict[str, torch.Tensor]:
    """Per-layer ``(out, in + bias)`` gradient of one example's summed NLL by plain autograd on ``ref``'s parameters
    (``ref`` is an untouched copy of the engine's model: its own forward, its own fused experts).
    ``prefix``: what to put before a layer name to find its parameters in ``ref`` (a PEFT wrapper's)."""
    params = dict(ref.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    b = collate([example])
    logits = ref(input_ids=b.input_ids, attention_mask=b.attention_mask.long()).logits
    sel = b.target_mask[:, 1:]
    loss = nn.functional.cross_entropy(logits[:, :-1][sel], b.input_ids[:, 1:][sel], reduction="sum")
    names = list(params)
    grads = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True), strict=True))
    for p in params.values():
        p.requires_grad_(False)
    out = {}
    for name, module in layers.items():
        blocks = []
        for pname, view in _param_view(ref, name, module):
            g = grads[prefix + pname]
            g = torch.zeros_like(params[prefix + pname]) if g is None else g
            g = view(g)
            blocks.append(g if g.dim() == 2 else g[:, None])
        out[name] = torch.cat(blocks, dim=1)
    return out


def reference_covariances(ref: nn.Module, layers: dict[str, nn.Module], examples: list[Example],
                          prefix: str = "") -> tuple[dict, dict, dict]:
    """Exact K-FAC sums by hooks on ``ref`` (one example at a time, true labels): ``A = Σ a a^T`` over the tokens a
    layer sees (bias column appended), ``S = Σ g g^T`` of its output gradients, and its token count. An expert's
    tokens, inputs and output gradients come from its fused module's own forward (inputs, routing, output)."""
    modules = dict(ref.named_modules())
    A = {n: 0 for n in layers}
    S = {n: 0 for n in layers}
    count = {n: 0 for n in layers}
    fused = {n.rsplit(".", 2)[0] for n, m in layers.items() if isinstance(m, ExpertLinear)}
    for example in examples:
        seen: dict[str, tuple] = {}
        handles = []

        def capture(name, seen=seen):
            def hook(module, args, kwargs, output):
                if isinstance(output, torch.Tensor) and output.requires_grad:
                    output.retain_grad()
                seen[name] = (tuple(args) + tuple(kwargs.values()), output)
            return hook

        for n in set(layers) - {m for m in layers if isinstance(layers[m], ExpertLinear)} | fused:
            handles.append(modules[prefix + n].register_forward_hook(capture(n), with_kwargs=True))
        b = collate([example])
        emb = ref.get_input_embeddings()(b.input_ids).detach().requires_grad_(True)
        logits = ref(inputs_embeds=emb, attention_mask=b.attention_mask.long()).logits
        sel = b.target_mask[:, 1:]
        nn.functional.cross_entropy(logits[:, :-1][sel], b.input_ids[:, 1:][sel], reduction="sum").backward()
        for h in handles:
            h.remove()
        for n, m in layers.items():
            if n not in seen and not isinstance(m, ExpertLinear):
                continue  # an older layout's expert no token of this example was routed to: not called
            if isinstance(m, ExpertLinear):
                a, g = _expert_rows(modules[prefix + n.rsplit(".", 2)[0]], m, *seen[n.rsplit(".", 2)[0]])
            else:
                (x,), y = seen[n][0][:1], seen[n][1]
                a, g = x.reshape(-1, x.shape[-1]), y.grad.reshape(-1, y.shape[-1])
            a = a.detach()
            if m.bias is not None:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
            A[n] = A[n] + a.T @ a
            S[n] = S[n] + g.T @ g
            count[n] += a.shape[0]
    return A, S, count


def _expert_rows(owner: nn.Module, layer: ExpertLinear, inputs: tuple, output: torch.Tensor):
    """Inputs and output gradients of one expert's projection at the tokens routed to it, from its fused module's
    forward (hidden states, top-k indices and weights) and the gradient of that module's output."""
    hidden, top_k_index, top_k_weights = inputs[:3]
    e = layer.index
    token, pos = torch.where(top_k_index == e)
    x = hidden[token].detach()
    w_up = getattr(owner, "gate_up_proj" if hasattr(owner, "gate_up_proj") else "up_proj")[e].detach()
    w_down = owner.down_proj[e].detach()
    g_down = output.grad[token] * top_k_weights[token, pos, None].detach()  # the routing weight scales the output
    if layer.param == "down_proj":
        u = (x @ w_up.T).requires_grad_(True)
        h = owner._apply_gate(u) if hasattr(owner, "_apply_gate") else owner.act_fn(u)
        return h.detach(), g_down
    u = (x @ w_up.T).requires_grad_(True)
    h = owner._apply_gate(u) if hasattr(owner, "_apply_gate") else owner.act_fn(u)
    (g_up,) = torch.autograd.grad(h, u, g_down @ w_down)
    return x, g_up


class _OldExpert(nn.Module):
    """transformers 4's ``MixtralBlockSparseTop2MLP``: one expert as three Linear layers."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, inner, bias=False)
        self.w2 = nn.Linear(inner, hidden, bias=False)
        self.w3 = nn.Linear(hidden, inner, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class OldSparseMoeBlock(nn.Module):
    """transformers 4's ``MixtralSparseMoeBlock`` (per-expert Linear layers, a Linear router ``gate``), with the
    weights of a fused transformers-5 block: the same function, laid out the old way."""

    def __init__(self, fused_block: nn.Module):
        super().__init__()
        experts = fused_block.experts
        E, two_inner, hidden = experts.gate_up_proj.shape
        self.top_k = fused_block.top_k
        self.gate = nn.Linear(hidden, E, bias=False)
        self.experts = nn.ModuleList(_OldExpert(hidden, two_inner // 2) for _ in range(E))
        with torch.no_grad():
            self.gate.weight.copy_(fused_block.gate.weight)
            for e, ex in enumerate(self.experts):
                w_gate, w_up = experts.gate_up_proj[e].chunk(2, dim=0)
                ex.w1.weight.copy_(w_gate)
                ex.w3.weight.copy_(w_up)
                ex.w2.weight.copy_(experts.down_proj[e])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        B, T, H = hidden_states.shape
        hidden_states = hidden_states.view(-1, H)
        routing = nn.functional.softmax(self.gate(hidden_states), dim=1, dtype=torch.float)
        routing, selected = torch.topk(routing, self.top_k, dim=-1)
        routing = (routing / routing.sum(dim=-1, keepdim=True)).to(hidden_states.dtype)
        final = torch.zeros_like(hidden_states)
        mask = nn.functional.one_hot(selected, num_classes=len(self.experts)).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            idx, top_x = torch.where(mask[e])
            if top_x.numel() == 0:  # as transformers 4 did: an expert without tokens is not called
                continue
            out = expert(hidden_states[None, top_x].reshape(-1, H)) * routing[top_x, idx, None]
            final.index_add_(0, top_x, out.to(hidden_states.dtype))
        return final.view(B, T, H)


def tiny_old_moe(seed: int = 0, experts: int = 4) -> nn.Module:
    """A tiny Mixtral whose MoE blocks use the older per-expert ``nn.Linear`` layout."""
    torch.manual_seed(seed)
    cfg = T.AutoConfig.for_model("mixtral", **COMMON, num_local_experts=experts, num_experts_per_tok=2)
    model = T.AutoModelForCausalLM.from_config(cfg).double().eval()
    model.set_experts_implementation("eager")
    for layer in model.model.layers:
        layer.mlp = OldSparseMoeBlock(layer.mlp).double()
    return model
