"""One pass with a gradient cache must give what three passes give: covariances, eigenvalue corrections,
scores (float64, tight tolerances), for every strategy that has a covariance pass, both Fishers, padding."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from helpers import fp64_engine, random_examples, tiny_gpt2, tiny_llama

from influence_engine import GradientCache, UserError, eigendecompose


@pytest.fixture(scope="module")
def setup():
    model = tiny_gpt2(seed=3)
    docs = random_examples(13, lo=3, hi=12, seed=9)
    queries = random_examples(3, prefix="q", prompt=True, seed=10)
    return model, docs, queries


def _engine(model, **kw):
    return fp64_engine(model, **{"batch_size": 4, **kw})


@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_one_cached_pass_equals_three_passes(setup, strategy, fisher):
    model, docs, queries = setup
    eng = _engine(model, fisher=fisher, padding_side="left")
    ref_factors = eng.fit_factors(docs, strategy)
    factors, cache = eng.fit_factors(docs, strategy, cache=True)
    for n in eng.specs:
        for key, t in ref_factors.tensors[n].items():
            torch.testing.assert_close(factors.tensors[n][key], t, rtol=1e-9, atol=1e-12)
        assert factors.damping[n] == pytest.approx(ref_factors.damping[n], rel=1e-9)
    assert (cache.sampled is None) == (fisher == "empirical")
    assert cache.nbytes == eng.gradient_cache_bytes(len(docs))
    for rank in (0, 2):
        prepared = eng.prepare_queries(queries, factors, rank=rank)
        ref = eng.score(docs, prepared, top_k=0).all_scores
        cached = eng.score(docs, prepared, top_k=0, cache=cache)
        np.testing.assert_allclose(cached.all_scores, ref, rtol=1e-9, atol=1e-12)
        assert set(cached.paths.values()) == {"cached"}
        top = eng.score(docs, prepared, top_k=4, cache=cache)
        np.testing.assert_allclose(top.top_scores, np.sort(ref, axis=1)[:, ::-1][:, :4], rtol=1e-9, atol=1e-12)


def test_cached_true_gradients_are_autograd_gradients(setup):
    """The cache's ``true`` rows are each document's loss gradient (plain autograd, one document at a time)."""
    from helpers import autograd_gradients

    model, docs, _ = setup
    eng = _engine(model)
    _, cache = eng.fit_covariance_cached(docs)
    row = {d: i for i, d in enumerate(cache.ids)}
    for e in docs[:4]:
        ref = autograd_gradients(model, list(eng.specs), e)
        for n in eng.specs:
            torch.testing.assert_close(cache.true[n][row[e.id]], ref[n], rtol=1e-9, atol=1e-12)


def test_llama_cache_and_shards(tmp_path):
    """Caches are per shard like partials: lambda partials from two shards' caches add up to one pass's."""
    from influence_engine import merge

    model = tiny_llama(seed=4)
    docs = random_examples(9, lo=3, hi=10, seed=5)
    eng = _engine(model, batch_size=3)
    cov = eng.fit_covariance(docs)
    basis = eigendecompose(cov)
    ref = eng.fit_lambda(docs, basis)
    parts = []
    for shard in (docs[:4], docs[4:]):
        _, c = eng.fit_covariance_cached(shard)
        c.save(tmp_path / "c.safetensors")
        c = GradientCache.load(tmp_path / "c.safetensors")
        parts.append(eng.fit_lambda(shard, basis, cache=c))
    total = merge(parts)
    for n in eng.specs:
        torch.testing.assert_close(total.sums[n], ref.sums[n], rtol=1e-9, atol=1e-12)
    with pytest.raises(UserError, match="other documents"):
        eng.fit_lambda(docs, basis, cache=c)


def test_cli_score_in_one_pass_equals_three_passes(tmp_path, monkeypatch, capsys):
    """`influence-audit score` fits and scores in one pass when the gradients fit (the default budget), and
    writes the scores three passes give (`--gradient-cache-gb 0`)."""
    import polars as pl
    from reliability_support import build_model, corpus, queries, write_jsonl

    from influence_audit import cli

    model = build_model(tmp_path / "model", seed=0)
    train = write_jsonl(tmp_path / "train.jsonl", corpus(14))
    qs = write_jsonl(tmp_path / "queries.jsonl", queries(3))
    frames, logs = [], []
    for extra in ([], ["--gradient-cache-gb", "0"]):
        out = tmp_path / f"scores{len(extra)}.parquet"
        monkeypatch.setattr(sys, "argv", ["influence-audit", "score", "--model", str(model), "--train", str(train),
                                          "--queries", str(qs), "--out", str(out), "--device", "cpu", "--top-k", "0",
                                          *extra])
        try:
            cli.main()
        except SystemExit as exc:
            assert exc.code in (0, None), capsys.readouterr().err
        logs.append(capsys.readouterr().err)
        frames.append(pl.read_parquet(out).sort("query_id", "train_id"))
    assert "one pass" in logs[0] and "one pass" not in logs[1]
    assert frames[0].select("query_id", "train_id").equals(frames[1].select("query_id", "train_id"))
    # The two modes sum the same products in another order; at the default relative damping (auto:1e-4) the
    # smallest eigendirections amplify fp32 rounding, so scores near zero move by ~1e-6 of the query's largest
    # |score| (seen: 2.8e-4 on a query whose largest is 173). 1e-5 of each query's largest keeps a 6x margin and
    # still fails on any real difference between the modes.
    for (q,), one in frames[0].group_by(["query_id"]):
        three = frames[1].filter(pl.col("query_id") == q)
        scale = float(np.abs(three["score"].to_numpy()).max())
        np.testing.assert_allclose(one["score"].to_numpy(), three["score"].to_numpy(), rtol=0, atol=1e-5 * scale,
                                   err_msg=f"query {q}")


def test_out_of_memory_in_the_second_backward_loses_nothing(setup, monkeypatch):
    """An out-of-memory error after the first backward pass has written a batch's gradients and covariance
    products: the batch is halved and redone, and nothing is counted twice or left half-written."""
    from influence_engine.cache import CachingCovarianceAccumulator

    model, docs, _ = setup
    eng = _engine(model, batch_size=8)
    ref_cov, ref_cache = eng.fit_covariance_cached(docs)
    original = CachingCovarianceAccumulator.backward
    sizes = []

    def backward(self, spec, x, g, ctx):
        sizes.append(g.shape[0])
        if ctx.objective == 1 and g.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated in the second backward pass)")
        return original(self, spec, x, g, ctx)

    monkeypatch.setattr(CachingCovarianceAccumulator, "backward", backward)
    cov, cache = eng.fit_covariance_cached(docs)
    assert 8 in sizes and 4 in sizes and max(sizes[-4:]) <= 2
    assert (cov.n_tokens, cov.n_docs) == (ref_cov.n_tokens, ref_cov.n_docs)
    for n in eng.specs:
        torch.testing.assert_close(cov.A[n], ref_cov.A[n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cov.S[n], ref_cov.S[n], rtol=1e-12, atol=1e-12)
        row = {d: i for i, d in enumerate(cache.ids)}
        order = [row[d] for d in ref_cache.ids]
        torch.testing.assert_close(cache.true[n][order], ref_cache.true[n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cache.sampled[n][order], ref_cache.sampled[n], rtol=1e-12, atol=1e-12)
    assert sorted(cache.ids) == sorted(e.id for e in docs)


def test_cli_falls_back_to_three_passes_when_the_gradients_do_not_fit(tmp_path, monkeypatch, capsys):
    """The one-pass budget is only an estimate: if keeping the gradients runs out of device memory, `score`
    says so and fits in separate passes."""
    from reliability_support import build_model, corpus, queries, write_jsonl

    import influence_engine.cache as cache_mod
    from influence_audit import cli

    def no_room(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated: the gradient cache)")

    monkeypatch.setattr(cache_mod.CachingCovarianceAccumulator, "__init__", no_room)
    model = build_model(tmp_path / "model", seed=0)
    out = tmp_path / "scores.parquet"
    monkeypatch.setattr(sys, "argv", ["influence-audit", "score", "--model", str(model), "--train",
                                      str(write_jsonl(tmp_path / "train.jsonl", corpus(6))), "--queries",
                                      str(write_jsonl(tmp_path / "queries.jsonl", queries(2))), "--out", str(out),
                                      "--device", "cpu"])
    try:
        cli.main()
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr().err
    err = capsys.readouterr().err
    assert "do not fit on the device" in err and "one pass over the documents" not in err
    assert out.exists()


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_one_pass_keeping_tokens_equals_three_passes(setup, strategy, fisher, padding_side):
    """Kept tokens (each token's layer inputs and output gradients, replayed through the accumulators' forward and
    backward) give the three passes' factors and scores, at every query rank, with the top-k."""
    from influence_engine import TokenCache
    from influence_engine.cache import token_cache_bytes

    model, docs, queries = setup
    eng = _engine(model, fisher=fisher, padding_side=padding_side)
    ref_factors = eng.fit_factors(docs, strategy)
    factors, cache = eng.fit_factors(docs, strategy, cache=True, keep="tokens")
    assert isinstance(cache, TokenCache) and sorted(cache.lengths) == sorted(len(e.input_ids) for e in docs)
    for n in eng.specs:
        for key, t in ref_factors.tensors[n].items():
            torch.testing.assert_close(factors.tensors[n][key], t, rtol=1e-9, atol=1e-12)
        assert factors.damping[n] == pytest.approx(ref_factors.damping[n], rel=1e-9)
    assert (cache.sampled is None) == (fisher == "empirical")
    n_tokens = sum(len(e.input_ids) for e in docs)
    assert cache.nbytes == token_cache_bytes(eng.specs, n_tokens, 8, 2 if fisher == "sampled" else 1)
    for rank in (0, 2):
        prepared = eng.prepare_queries(queries, factors, rank=rank)
        ref = eng.score(docs, prepared, top_k=0).all_scores
        cached = eng.score(docs, prepared, top_k=0, cache=cache)
        np.testing.assert_allclose(cached.all_scores, ref, rtol=1e-9, atol=1e-12)
        top = eng.score(docs, prepared, top_k=4, cache=cache)
        np.testing.assert_allclose(top.top_scores, np.sort(ref, axis=1)[:, ::-1][:, :4], rtol=1e-9, atol=1e-12)
    with pytest.raises(UserError, match="other documents"):
        eng.score(docs[:5], prepared, top_k=0, cache=cache)


def test_tokens_are_kept_where_they_are_much_smaller_than_gradients():
    """SmolLM2-135M's MLP layers (576 -> 1536 -> 576, 90 of them) with 60 documents of 20 tokens keep tokens
    (1/19 of the gradients' bytes); the tiny test model's documents keep gradients."""
    from influence_engine.cache import cache_bytes, keeps_tokens, token_cache_bytes
    from influence_engine.layers import LayerSpec

    real = {}
    for b in range(30):
        for name, (i, o) in {"gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}.items():
            n = f"model.layers.{b}.mlp.{name}"
            real[n] = LayerSpec(n, "linear", i, o, False)
    assert keeps_tokens(real, 60, 1200, 4, 4, 1)
    assert token_cache_bytes(real, 1200, 4, 1) * 18 < cache_bytes(real, 60, 4, 1)
    assert token_cache_bytes(real, 1200, 4, 1) < 2**30  # within the default 2 GiB one-pass budget
    eng = _engine(tiny_gpt2(seed=3))
    assert not keeps_tokens(eng.specs, 13, 13 * 8, 8, 8, 2)
