"""The data-aware sketches (eigen, pca), the residual bound, bound-pruned refinement and build-time probe recall,
against the engine's exact scores (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import exact_scores, fp64_engine, random_examples, tiny_gpt2

from influence_engine import Example, UserError
from influence_engine.index import GradientIndex, Sketch, parse_sketch_spec, whitened_covariances
from tasks.influence.index import IndexOptions, QueryTimes, open_index, prune_candidates, search_and_refine, spread


@pytest.fixture(scope="module")
def setup():
    eng = fp64_engine(tiny_gpt2(seed=5), batch_size=4)
    docs = random_examples(23, seed=6)
    queries = random_examples(4, prefix="q", prompt=True, seed=7)
    factors = eng.fit_factors(docs, "ekfac")
    return eng, docs, queries, factors, exact_scores(eng, docs, queries, factors)


def _index(path, eng, docs, factors, sketch, dtype="fp64", parts=2):
    index = GradientIndex.create(path, eng, factors, sketch=sketch, dtype=dtype, sample=docs)
    step = -(-len(docs) // parts)
    for i in range(parts):
        index.build_part(f"p{i}", eng, docs[i * step:(i + 1) * step], factors)
    return index


def _scores(index, eng, queries, factors) -> np.ndarray:
    rows = np.concatenate([index.rows(p.name) for p in index.parts()]).astype(np.float64)
    return index.query_vectors(eng, queries, factors).double().numpy() @ rows.T


def test_sketch_specs():
    assert parse_sketch_spec("16x8") == ("random", (16, 8))
    assert parse_sketch_spec("eigen:32") == ("eigen", (32, 32))
    assert parse_sketch_spec("PCA:4x6") == ("pca", (4, 6))
    assert parse_sketch_spec("off") is None
    assert parse_sketch_spec("top:4096") == ("top", (4096, 0))
    assert parse_sketch_spec("lowrank:8") == ("lowrank", (8, 8))
    assert parse_sketch_spec("lowrank:4x2") == ("lowrank", (4, 2))
    for bad in ("16", "eigen:", "pca:0x3", "svd:4x4", "top:0", "top:4x4", "lowrank:2x3"):
        with pytest.raises(UserError, match="--sketch"):
            parse_sketch_spec(bad)


def test_full_rank_top_sketch_gives_the_exact_scores(setup, tmp_path):
    """Every coordinate kept (in the order of the eigen-grid): the index score is the exact one; fewer kept, the
    width is what was asked for."""
    eng, docs, queries, factors, ref = setup
    total = sum(s.out_features * s.a_dim for s in eng.specs.values())
    index = _index(tmp_path / "ix", eng, docs, factors, f"top:{10 * total}")
    assert index.width == total
    np.testing.assert_allclose(_scores(index, eng, queries, factors), ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    assert _index(tmp_path / "small", eng, docs, factors, "top:37").width == 37


def test_full_rank_lowrank_index_gives_the_exact_scores(setup, tmp_path):
    """Every singular triplet kept (rank 9 covers the tiny model's layers): the factored score is the exact one;
    at rank 1 it is the product of the leading triplets, searched like the rest."""
    eng, docs, queries, factors, ref = setup
    index = _index(tmp_path / "ix", eng, docs, factors, "lowrank:9")
    assert index.width == 9 * sum(s.out_features + s.a_dim for s in eng.specs.values())
    rows = torch.from_numpy(np.concatenate([index.rows(p.name) for p in index.parts()]))
    got = index.scores(rows, index.query_vectors(eng, queries, factors)).T.numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9 * np.abs(ref).max())
    scores, ids = index.search(index.query_vectors(eng, queries, factors), top_k=4)
    order = np.argsort(-ref, axis=1)[:, :4]
    assert ids == [[docs[j].id for j in row] for row in order]
    one = _index(tmp_path / "one", eng, docs, factors, "lowrank:3x1")
    assert not one.orthonormal
    r1 = one.scores(torch.from_numpy(np.concatenate([one.rows(p.name) for p in one.parts()])),
                    one.query_vectors(eng, queries, factors)).T.numpy()
    # by hand: each layer's whitened gradient W (one.sketch off); the query's leading triplet, the documents' three
    full = GradientIndex.create(tmp_path / "full", eng, factors, sketch=None, dtype="fp64")
    full.build_part("all", eng, docs, factors)
    from influence_engine.index import layer_blocks
    wd = layer_blocks(eng.specs, torch.from_numpy(np.array(full.rows("all"))))
    wq = layer_blocks(eng.specs, full.query_vectors(eng, queries, factors))

    def trunc(W, k):
        U, sv, Vh = torch.linalg.svd(W, full_matrices=False)
        return (U[..., :k] * sv[..., None, :k]) @ Vh[..., :k, :]
    by_hand = sum(trunc(wq[n], 1).flatten(1) @ trunc(wd[n], 3).flatten(1).T for n in eng.specs).numpy()
    np.testing.assert_allclose(r1, by_hand, rtol=1e-8, atol=1e-10 * np.abs(by_hand).max())


def test_top_sketch_keeps_the_coordinates_of_largest_score_energy(setup):
    from influence_engine.index import pseudo_queries, score_energy

    eng, docs, _, factors, _ = setup
    pq = pseudo_queries(docs)
    assert pq and all(len(e.input_ids) - e.target_start == 2 and e.target_start >= 1 for e in pq)
    energy = score_energy(eng, docs, factors)
    sk = Sketch.make(eng.specs, (50, 0), kind="top", energy=energy)
    kept = torch.cat([energy[n].flatten()[sk.keep[n]] for n in eng.specs])
    dropped = torch.cat([energy[n].flatten()[np.setdiff1d(np.arange(energy[n].numel()), sk.keep[n].numpy())]
                         for n in eng.specs])
    assert len(kept) == 50 and kept.min() >= dropped.max()


@pytest.mark.parametrize("kind", ["eigen", "pca"])
def test_full_rank_data_aware_sketch_gives_the_exact_scores(setup, kind, tmp_path):
    """At full rank each side is an orthonormal rotation (kept, not skipped): the index score is the exact one."""
    eng, docs, queries, factors, ref = setup
    index = _index(tmp_path / "ix", eng, docs, factors, f"{kind}:64x64")
    sk = index.sketch(eng.specs)
    for n, s in eng.specs.items():
        for S, dim in ((sk.out[n], s.out_features), (sk.inp[n], s.a_dim)):
            assert S is not None and S.shape == (dim, dim)
            torch.testing.assert_close(S @ S.T, torch.eye(dim, dtype=torch.float64), rtol=0, atol=1e-12)
    if kind == "pca":  # a real rotation, not the identity: the test would pass by accident otherwise
        assert any((sk.out[n] - torch.eye(sk.out[n].shape[0], dtype=torch.float64)).abs().max() > 0.1
                   for n in eng.specs)
    got = _scores(index, eng, queries, factors)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())


def test_pca_keeps_the_leading_eigenvectors_of_the_whitened_covariances(setup):
    eng, docs, _, factors, _ = setup
    cov = whitened_covariances(eng, docs, factors)
    sk = Sketch.make(eng.specs, (3, 2), kind="pca", covariances=cov)
    for n in eng.specs:
        for S, C in ((sk.out[n], cov[n][0]), (sk.inp[n], cov[n][1])):
            top = torch.linalg.eigvalsh(C).flip(0)[:S.shape[0]]
            torch.testing.assert_close(torch.diag(S @ C @ S.T), top, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("sketch", "dtype"), [("eigen:3x4", "fp64"), ("pca:3x4", "fp64"), ("eigen:3x4", "fp16"),
                                               ("pca:20x8", "fp16"), ("top:40", "fp64"), ("top:300", "fp16")])
def test_residual_bound_holds_for_every_pair(setup, sketch, dtype, tmp_path):
    eng, docs, queries, factors, ref = setup
    index = _index(tmp_path / "ix", eng, docs, factors, sketch, dtype)
    assert index.orthonormal
    stats: dict = {}
    qv = index.query_vectors(eng, queries, factors, stats=stats)
    rows = np.concatenate([index.rows(p.name) for p in index.parts()]).astype(np.float64)
    got = qv.double().numpy() @ rows.T
    bound = index.residual_bound(stats["norms"], np.concatenate([index.norms(p.name) for p in index.parts()]))
    gap = np.abs(ref - got)
    assert np.all(gap <= bound)
    assert np.median(gap / bound) > 0.01  # and it is not vacuous


def test_random_sketch_has_no_bound(setup, tmp_path):
    eng, docs, queries, factors, _ = setup
    index = _index(tmp_path / "ix", eng, docs, factors, "3x4")
    assert not index.orthonormal
    stats: dict = {}
    index.query_vectors(eng, queries, factors, stats=stats)
    scores, ids = index.search(index.query_vectors(eng, queries, factors), 10)
    kept, certified = prune_candidates(index, stats["norms"], scores, ids, 3, 10)
    assert kept == [row[:10] for row in ids] and certified == 0


@pytest.mark.parametrize("sketch", ["eigen:2x3", "pca:6x6", "pca:30x20", "eigen:28x30", "top:30", "top:1000"])
@pytest.mark.parametrize("dtype", ["fp64", "fp16"])
def test_pruned_refinement_never_drops_a_true_top_k_document(setup, sketch, dtype, tmp_path):
    """Pruned and unpruned refinement return the same documents; with every document a candidate that is the
    exact top k; near full rank the bound is tight enough to skip documents, and certifies the result."""
    eng, docs, queries, factors, ref = setup
    index = _index(tmp_path / "ix", eng, docs, factors, sketch, dtype)
    by_id = {e.id: e for e in docs}

    def docs_for(ids):
        return [by_id[d] for d in sorted(ids)]

    for refine in (6, 12, len(docs)):
        t_on, t_off = QueryTimes(), QueryTimes()
        on = search_and_refine(eng, index, factors, queries, top_k=3, refine=refine, docs_for=docs_for,
                               times=t_on, prune=True)
        off = search_and_refine(eng, index, factors, queries, top_k=3, refine=refine, docs_for=docs_for,
                                times=t_off, prune=False)
        assert on["train_id"].to_list() == off["train_id"].to_list()
        np.testing.assert_allclose(on["score"].to_numpy(), off["score"].to_numpy(), rtol=1e-12)
        assert t_on.refined_docs <= t_off.refined_docs == t_on.candidates
        if refine == len(docs):
            top = [[docs[j].id for j in np.argsort(-ref[q], kind="stable")[:3]] for q in range(len(queries))]
            assert on["train_id"].to_list() == [d for row in top for d in row]
    if sketch in ("pca:30x20", "eigen:28x30", "top:1000"):  # near full rank: small residuals
        assert t_on.refined_docs < t_on.candidates
        assert t_on.certified > 0


def test_probe_recall_is_measured_at_build_and_probes_are_scored_exactly(setup, tmp_path):
    eng, docs, _, factors, _ = setup
    probes = [Example(f"probe:{e.id}", e.input_ids, 1, len(e.input_ids)) for e in spread(docs, 4)]
    assert [e.id for e in probes] == ["probe:d0", "probe:d7", "probe:d15", "probe:d22"]
    index = open_index(tmp_path / "off", eng, factors, IndexOptions(sketch="off", dtype="fp64", probes=4),
                       docs=docs)
    assert index.meta["probes"] == [e.id for e in probes]
    index.build_part("a", eng, docs[:10], factors)
    index.build_part("b", eng, docs[10:], factors)
    exact = np.concatenate([np.load(tmp_path / "off" / "parts" / f"{p}.probe.npy") for p in "ab"])
    np.testing.assert_allclose(exact.T, exact_scores(eng, docs, probes, factors), rtol=1e-10)
    rec = index.probe_recall(k=10, within=(15,))
    assert rec == {"probes": 4, "documents": 23, "k": 10, "recall_at_10": 1.0, "top10_within_15": 1.0}
    assert GradientIndex.open(tmp_path / "off").meta["probe_recall"] == rec

    small = open_index(tmp_path / "small", eng, factors, IndexOptions(sketch="eigen:1x1", dtype="fp64", probes=4),
                       docs=docs)
    small.build_part("all", eng, docs, factors)
    rec = small.probe_recall(k=10, within=(23,))
    assert 0 <= rec["recall_at_10"] < 1 and rec["top10_within_23"] == 1.0
