"""``--model FILE.gguf``: a tiny Llama written with gguf's own writer (float32 tensors, llama.cpp's q/k layout,
a byte-level BPE tokenizer) converts to a Hugging Face directory holding exactly the original weights, and
``score`` on the file gives exactly the scores of ``score`` on that model saved as a directory; the conversion is
cached by the file's sha256; a missing extra and an architecture transformers cannot load get one line each."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed")
from reliability_support import corpus, queries, run_in_process, write_jsonl  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "e r"]


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode table (what a byte-level BPE's base tokens are)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py ``permute``); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path: Path, *, seed: int = 0, arch: str = "llama"):
    """A random 2-block Llama (hidden 16, MLP 24, 4 heads, 2 KV heads, untied head) as a float32 GGUF file;
    returns the model (float32, as written)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = SPECIALS + _byte_chars() + [m.replace(" ", "") for m in MERGES]
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a dropped or misplaced norm weight shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny llama")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_feed_forward_length(24)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(4)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(2):
        for hf, g in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                t = _permute(t, 4)
            elif hf == "self_attn.k_proj":
                t = _permute(t, 2)
            w.add_tensor(f"blk.{i}.{g}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    model = write_tiny_llama_gguf(root / "tiny.gguf")
    return {"root": root, "gguf": root / "tiny.gguf", "model": model,
            "train": write_jsonl(root / "train.jsonl", corpus(8)),
            "queries": write_jsonl(root / "q.jsonl", queries(2))}


def _score(world, name: str, model: str, home: Path, monkeypatch):
    out = world["root"] / f"{name}.parquet"
    monkeypatch.setenv("INFLUENCE_AUDIT_HOME", str(home))
    proc = run_in_process(["score", "--model", model, "--train", str(world["train"]), "--queries",
                           str(world["queries"]), "--out", str(out), "--precision", "fp64", "--top-k", "0",
                           "--query-rank", "0", "--factors", str(world["root"] / f"factors-{name}")])
    assert proc.returncode == 0, proc.stderr
    return pl.read_parquet(out).sort("query_id", "train_id"), proc.stderr


def test_gguf_converts_to_the_written_weights_and_scores_like_the_directory(world, monkeypatch):
    from safetensors.torch import load_file

    home = world["root"] / "home"
    from_file, err = _score(world, "file", str(world["gguf"]), home, monkeypatch)
    assert "converting tiny.gguf" in err
    converted = next((home / "model-cache").glob("gguf-tiny-*"))
    weights = load_file(str(converted / "model.safetensors"))
    for k, v in world["model"].state_dict().items():  # float32 tensors, q/k un-permuted: bit for bit
        assert torch.equal(weights[k], v), k
    # The same model saved as a directory, with the tokenizer the GGUF file defines: the same scores, bit for
    # bit (same weights, same tokens, same process and thread count).
    ref = world["root"] / "ref"
    world["model"].save_pretrained(ref)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    tok.save_pretrained(ref)
    assert tok(" the")["input_ids"] == [len(SPECIALS) + 256 + 2]  # the byte-level BPE with the file's merges
    from_dir, _ = _score(world, "dir", str(ref), home, monkeypatch)
    assert from_file["train_id"].to_list() == from_dir["train_id"].to_list()
    np.testing.assert_array_equal(from_file["score"].to_numpy(), from_dir["score"].to_numpy())
    # A second run finds the converted directory by the file's sha256: no conversion, and the same scores.
    t = time.perf_counter()
    again, err2 = _score(world, "again", str(world["gguf"]), home, monkeypatch)
    assert "converting" not in err2 and time.perf_counter() - t < 60
    np.testing.assert_array_equal(again["score"].to_numpy(), from_file["score"].to_numpy())


def test_a_missing_gguf_extra_is_one_line_naming_the_install(world, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed: `import gguf` raises ImportError
    monkeypatch.setenv("INFLUENCE_AUDIT_HOME", str(tmp_path))
    proc = run_in_process(["layers", "--model", str(world["gguf"])])
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "gguf" in lines[0] and "pip install 'influence-audit[gguf]'" in lines[0], lines
    assert "Traceback" not in proc.stderr


def test_an_architecture_transformers_cannot_load_is_one_line(world, monkeypatch, tmp_path):
    write_tiny_llama_gguf(tmp_path / "odd.gguf", arch="nosucharch")
    monkeypatch.setenv("INFLUENCE_AUDIT_HOME", str(tmp_path / "home"))
    proc = run_in_process(["layers", "--model", str(tmp_path / "odd.gguf")])
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "'nosucharch'" in lines[0] and "transformers" in lines[0], lines
    assert not (tmp_path / "home" / "model-cache").exists() or not any((tmp_path / "home" / "model-cache").iterdir())
