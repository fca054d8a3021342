"""Presets, LoRA adapter directories, fp64 on MoE, and the memory plan (figures from configs, the device budget)."""

from __future__ import annotations

import json
import re

import numpy as np
import polars as pl
import pytest
import torch
import transformers as T
from families import tiny_model
from helpers import random_examples, tiny_gpt2
from reliability_support import build_model, corpus, queries, write_jsonl

from influence_engine import InfluenceEngine, ModelError, UserError
from influence_engine.layers import layer_spec, select_layers
from influence_engine.models import load_pretrained
from influence_engine.plan import make_plan, meta_model, model_shape

GIB = 2**30


def _plan(cfg, layers: str = "mlp", **kw):
    m = meta_model(cfg)
    specs = {n: layer_spec(n, x) for n, x in select_layers(m, layers).items()}
    n_params, hidden, blocks, vocab = model_shape(m)
    return make_plan(specs, n_params=n_params, hidden=hidden, n_blocks=blocks, vocab=vocab, **kw), n_params


def test_plan_figures_from_configs_gpt2_small_and_llama3_8b():
    """Computed on the meta device from configs alone: nothing is downloaded or allocated."""
    p, n = _plan(T.GPT2Config(), docs=1000, tokens=200_000)
    assert n == 124_439_808 and len(p.layers) == 24
    # c_fc: a = 768 + 1, out 3072; c_proj: a = 3072 + 1, out 768; running sums in float32
    per_block = (769**2 + 3072**2) + (3073**2 + 768**2)
    assert p.covariance_device == 12 * per_block * 4
    assert sum(m.covariance_host for m in p.layers) == 12 * per_block * 8
    assert p.gradient_cache_bytes == 1000 * 2 * 4 * 12 * (3072 * 769 + 768 * 3073)

    llama = T.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
    p, n = _plan(llama, device_budget=80 * GIB)
    assert n == 8_030_261_248 and len(p.layers) == 96
    assert p.covariance_device == 32 * 3 * (4096**2 + 14336**2) * 4  # 79.5 GiB
    assert p.layers[0].eigen_device == 16 * 14336**2
    assert len(p.groups) == 2 and not p.too_large()
    p, _ = _plan(llama, device_budget=GIB)
    with pytest.raises(UserError, match=r"needs 1\.3 GiB on the device .*budget is 1\.0 GiB \(96 of 96"):
        p.check()


def test_factors_over_groups_of_layers_equal_one_pass_and_one_layer_too_large_is_refused():
    docs = random_examples(6)
    qs = random_examples(2, prefix="q", prompt=True, seed=1)
    scores = []
    for budget in (None, 18_000):  # bytes: groups of one or two layers of the tiny GPT-2
        eng = InfluenceEngine(tiny_gpt2(), None, layers="all", precision="fp64", device_memory_budget=budget)
        scores.append(eng.score(docs, eng.prepare_queries(qs, eng.fit_factors(docs, "ekfac"), rank=0),
                                top_k=0).all_scores)
        groups = eng.layer_groups()
    assert len(groups) == 6 and sum(len(g) for g in groups) == 8
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-12)
    with pytest.raises(UserError, match=r"layer transformer\.h\.0\.mlp\.c_proj needs .* budget is 1000 B"):
        InfluenceEngine(tiny_gpt2(), None, layers="all", precision="fp64", device_memory_budget=1000)


def test_one_group_per_call_joins_into_the_grouped_fit_exactly():
    """What a worker fitting one group of layers makes (``layers=``), joined with the other groups' and merged per
    group over two shards in shard order, is exactly the grouped fit of one process (the same sums in the same
    order); joining refuses overlapping groups and groups over different documents."""
    from influence_engine import CovariancePartial, FactorMismatchError, eigendecompose, merge, merge_groups

    docs = random_examples(8)
    halves = [docs[:4], docs[4:]]
    eng = InfluenceEngine(tiny_gpt2(), None, layers="all", precision="fp64", device_memory_budget=18_000)
    groups = [list(g) for g in eng.layer_groups()]
    assert len(groups) > 2
    whole = merge(eng.fit_covariance(h) for h in halves)
    parts = [eng.fit_covariance(h, layers=g) for h in halves for g in groups]  # shard-major, as the flow maps
    assert list(parts[0].specs) == groups[0]
    joined = merge_groups(parts)
    assert list(joined.specs) == list(eng.specs) and (joined.n_tokens, joined.n_docs) == (whole.n_tokens, 8)
    for n in eng.specs:
        assert torch.equal(joined.A[n], whole.A[n]) and torch.equal(joined.S[n], whole.S[n])
    basis = eigendecompose(whole)
    lam_whole = merge(eng.fit_lambda(h, basis) for h in halves)
    lam = merge_groups(eng.fit_lambda(h, basis, layers=g) for g in groups for h in halves)  # group-major too
    assert list(lam.specs) == list(eng.specs) and lam.n_docs == 8
    assert all(torch.equal(lam.sums[n], lam_whole.sums[n]) for n in eng.specs)
    with pytest.raises(FactorMismatchError, match="overlap"):
        CovariancePartial.join([parts[0], parts[0]])
    with pytest.raises(FactorMismatchError, match="different documents"):
        CovariancePartial.join([parts[0], eng.fit_covariance(docs, layers=groups[1])])
    with pytest.raises(UserError, match="not tracked"):
        eng.fit_covariance(docs, layers=["nope"])


def test_groups_fitted_from_two_threads_at_once_do_not_see_each_others_layers():
    """The default runner maps (shard, group) pairs over threads of one process, on one engine: each group's runner
    hooks its own layers of the shared model, so their passes must not overlap (they share the engine's lock)."""
    from concurrent.futures import ThreadPoolExecutor

    docs = random_examples(8)
    eng = InfluenceEngine(tiny_gpt2(), None, layers="all", precision="fp64", device_memory_budget=18_000)
    groups = [list(g) for g in eng.layer_groups()]
    alone = [eng.fit_covariance(docs, layers=g) for g in groups]
    with ThreadPoolExecutor(len(groups)) as pool:
        together = list(pool.map(lambda g: eng.fit_covariance(docs, layers=g), groups * 3))
    for a, b in zip(alone * 3, together, strict=True):
        assert list(a.specs) == list(b.specs) and a.n_tokens == b.n_tokens
        assert all(torch.equal(a.A[n], b.A[n]) and torch.equal(a.S[n], b.S[n]) for n in a.specs)


def test_presets_mean_the_same_on_every_family():
    """OPT's fc1/fc2 under the decoder layer and GPT-J's fc_in/fc_out are its MLP; routers and the head never count;
    a family without names falls back to the decoder blocks' structure."""
    opt = tiny_model("opt")
    assert [n.split(".")[-1] for n in select_layers(opt, "mlp")] == ["fc1", "fc2"] * 2
    assert [n.split(".")[-1] for n in select_layers(tiny_model("gptj"), "mlp")] == ["fc_in", "fc_out"] * 2
    qwen = tiny_model("qwen2_moe")
    eng = InfluenceEngine(qwen, None, precision="fp64")
    assert eng.layers == "mlp" and not any("gate." in n or n.endswith("_gate") for n in eng.specs)
    assert "model.layers.0.mlp.shared_expert.up_proj" in eng.specs
    # structure only: rename OPT's decoder layers' children so that no name says which is which
    for layer in opt.model.decoder.layers:
        layer.mixer, layer.ff_in, layer.ff_out = layer.self_attn, layer.fc1, layer.fc2
        del layer.self_attn, layer.fc1, layer.fc2
    assert [n.split(".")[-1] for n in select_layers(opt, "mlp")] == ["ff_in", "ff_out"] * 2
    assert {n.split(".")[4] for n in select_layers(opt, "attention")} == {"mixer"}


def test_fp64_on_untracked_fused_experts_switches_them_to_eager():
    """grouped_mm refuses float64: experts not tracked run transformers' eager loop instead."""
    torch.manual_seed(0)
    cfg = T.AutoConfig.for_model("qwen3_moe", vocab_size=23, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=4, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=6)
    model = T.AutoModelForCausalLM.from_config(cfg)  # default experts implementation
    eng = InfluenceEngine(model, None, layers="attention", precision="fp64")
    docs = random_examples(3)
    result = eng.score(docs, eng.prepare_queries(docs, eng.fit_factors(docs, "identity"), rank=0), top_k=0)
    assert np.isfinite(result.all_scores).all()


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """A tiny GPT-2 with a tokenizer and a LoRA adapter on its Conv1D layers (non-zero lora_B) saved beside it."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("lora")
    base_dir = build_model(root / "base")
    base = T.AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(3)
    cfg = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["c_attn", "c_fc"],
                     fan_in_fan_out=True)
    get_peft_model(base, cfg).save_pretrained(root / "adapter")
    return base_dir, root / "adapter"


def test_adapter_directory_loads_its_local_base_and_tracks_the_adapter(adapter_dirs):
    base_dir, adapter = adapter_dirs
    eng = InfluenceEngine.from_pretrained(adapter, precision="fp64")
    assert eng.layers == "lora" and len(eng.specs) == 2 * 2 * 2
    plain = InfluenceEngine.from_pretrained(base_dir, precision="fp64")
    assert plain.layers == "mlp" and plain.fingerprint != eng.fingerprint
    # the plan reads the adapter's config only: the same layers, shapes from the meta device
    assert [n for n, m in select_layers(meta_model(adapter), "lora").items()] == list(eng.specs)


def test_the_audit_reads_an_adapter_without_a_tokenizer_with_its_base_models(adapter_dirs):
    """The audit's input stage tokenises with the model directory's tokenizer alone (no weights): an adapter that
    ships no tokenizer (what peft saves) uses its base model's."""
    from tasks.engine import _tokenizer

    base_dir, adapter = adapter_dirs
    assert not (adapter / "tokenizer_config.json").exists()
    ids = _tokenizer(str(adapter), False)("a b c")["input_ids"]
    assert ids == _tokenizer(str(base_dir), False)("a b c")["input_ids"] and ids


def test_adapter_with_missing_base_is_one_line(adapter_dirs, tmp_path):
    _, adapter = adapter_dirs
    broken = tmp_path / "adapter"
    broken.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text()) | {"base_model_name_or_path": "org/not-here"}
    (broken / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"base model 'org/not-here' is not a local model directory") as exc:
        load_pretrained(broken)
    assert "\n" not in str(exc.value)


def test_cli_scores_an_adapter_and_prints_its_layers_and_plan(adapter_dirs, tmp_path):
    from typer.testing import CliRunner

    from influence_audit.cli import app

    _, adapter = adapter_dirs
    train = write_jsonl(tmp_path / "train.jsonl", corpus(12))
    runner = CliRunner()
    qs = write_jsonl(tmp_path / "q.jsonl", queries(2))
    out = tmp_path / "scores.parquet"
    res = runner.invoke(app, ["score", "--model", str(adapter), "--train", str(train), "--queries", str(qs),
                              "--out", str(out), "--device", "cpu", "--top-k", "3"])
    assert res.exit_code == 0, res.output
    assert pl.read_parquet(out).height == 2 * 3
    res = runner.invoke(app, ["layers", "--model", str(adapter)])
    assert res.exit_code == 0, res.output
    assert "default --layers auto = lora" in res.output
    assert re.search(r"transformer\.h\.N\.mlp\.c_fc\.lora_B\.default  x2  linear 64 x 2", res.output)
    res = runner.invoke(app, ["plan", "--model", str(adapter), "--train", str(train), "--max-length", "16"])
    assert res.exit_code == 0, res.output
    assert "8 tracked layers, strategy ekfac" in res.output
    assert re.search(r"data: 12 documents, \d+ tokens; 3 passes", res.output)
    res = runner.invoke(app, ["plan", "--model", str(adapter), "--device-memory-gb", "0.000001"])
    assert res.exit_code == 1 and "layer(s) do not fit" in res.output


def test_audit_inputs_accept_an_adapter_and_resolve_its_layers(adapter_dirs):
    """The flow's engine and factor settings track the adapter by default (the same layers the engine resolves)."""
    from tasks.inputs.preflight import resolve_model
    from tasks.options import AuditParams, engine_spec

    base, adapter = adapter_dirs
    model_dir = resolve_model(str(adapter))
    p = AuditParams(model=model_dir, train=["."], queries=".")
    assert p.layers == "auto"
    assert engine_spec(p, model_dir).layers == "lora" and engine_spec(p, str(base)).layers == "mlp"
    assert engine_spec(p.model_copy(update={"layers": "attention"}), model_dir).layers == "attention"


def test_score_and_audit_refuse_a_layer_larger_than_the_device_budget_before_any_pass(adapter_dirs, tmp_path):
    """One line with the plan's numbers; score before any pass (no output), audit in its preflight (before Prefect
    starts or any model is loaded)."""
    from typer.testing import CliRunner

    from influence_audit.cli import app
    from tasks.inputs.preflight import preflight
    from tasks.options import AuditParams

    base, _ = adapter_dirs
    train = write_jsonl(tmp_path / "train.jsonl", corpus(4))
    qs = write_jsonl(tmp_path / "q.jsonl", queries(1))
    out = tmp_path / "scores.parquet"
    res = CliRunner().invoke(app, ["score", "--model", str(base), "--train", str(train), "--queries", str(qs),
                                   "--out", str(out), "--device", "cpu", "--device-memory-gb", "1e-6"])
    assert isinstance(res.exception, UserError) and not out.exists()
    assert re.match(r"layer transformer\.h\.\d\.mlp\.c_\w+ needs [\d.]+ KiB on the device for its factors .*the "
                    r"budget is 1\.0 KiB \(4 of 4 layers do not fit\)", str(res.exception)), str(res.exception)
    p = AuditParams(model=str(base), train=[str(train)], queries=str(qs), device_memory_gb=1e-6)
    with pytest.raises(UserError, match=r"needs [\d.]+ KiB on the device .* \(4 of 4 layers do not fit\)"):
        preflight(p)
    assert p.identity() == AuditParams(model=str(base), train=[str(train)], queries=str(qs)).identity()
