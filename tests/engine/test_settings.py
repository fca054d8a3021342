"""Factor settings: one frozen object, a cache key that ignores fields left at their default, field-by-field
checks; strategies declare their passes and precondition in one place."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from influence_engine import STRATEGIES, FactorMismatchError, FactorSettings, UserError, get_strategy
from influence_engine.settings import stable_key


def _settings(**kw) -> FactorSettings:
    return FactorSettings(model_fingerprint="m" * 64, data_fingerprint="d" * 64, **kw)


def test_key_ignores_fields_at_their_default_and_changes_with_any_other_value():
    base = _settings()
    assert base.key() == _settings(damping="auto", seed=0).key()
    assert _settings(damping="1e-3").key() == _settings(damping=0.001).key()  # one normal form
    keys = {base.key()} | {_settings(**{f: v}).key() for f, v in (
        ("strategy", "kfac"), ("layers", "all"), ("damping", "0.5"), ("fisher", "empirical"), ("seed", 3),
        ("max_length", 64), ("precision", "bf16"), ("on_long", "error"))}
    assert len(keys) == 9
    # a field added later with a default that keeps today's behaviour leaves existing keys unchanged
    grown = dataclasses.make_dataclass("Grown", [("new_option", str, dataclasses.field(default="old"))],
                                       bases=(FactorSettings,), frozen=True)
    assert grown(model_fingerprint="m" * 64, data_fingerprint="d" * 64).key() == base.key()
    assert stable_key({"a": 1, "b": 2}, {"b": 2}) == stable_key({"a": 1})


def test_bad_settings_are_one_line_user_errors():
    with pytest.raises(UserError, match="--strategy 'kafc'"):
        _settings(strategy="kafc")
    with pytest.raises(UserError, match="--damping"):
        _settings(damping="-1")
    with pytest.raises(UserError, match="--precision 'fp16'"):
        _settings(precision="fp16")


def test_check_names_the_first_field_that_differs_and_treats_missing_fields_as_defaults():
    s = _settings(seed=2)
    s.check_matches(s.to_json(), "here")
    stored = {k: v for k, v in s.to_json().items() if k != "on_long"}  # made before the field existed
    s.check_matches(stored, "here")
    with pytest.raises(FactorMismatchError, match=r"here: factors were made with seed=2, not 5"):
        s.replace(seed=5).check_matches(s.to_json(), "here")


def test_strategies_declare_passes_and_precondition_as_the_explicit_inverse():
    assert {n: s.stages for n, s in STRATEGIES.items()} == {
        "identity": (), "diagonal": ("lambda",), "kfac": ("covariance",), "ekfac": ("covariance", "lambda")}
    g = torch.Generator().manual_seed(0)
    out, a = 3, 4
    Q_S = torch.linalg.qr(torch.randn(out, out, generator=g, dtype=torch.float64)).Q
    Q_A = torch.linalg.qr(torch.randn(a, a, generator=g, dtype=torch.float64)).Q
    eig = torch.rand(out, a, generator=g, dtype=torch.float64) + 0.1
    G = torch.randn(2, out, a, generator=g, dtype=torch.float64)
    lam = 0.3
    for name, t, H in (
            ("ekfac", {"Q_S": Q_S, "Q_A": Q_A, "eigen": eig}, torch.kron(Q_S, Q_A) @ torch.diag(eig.flatten())
             @ torch.kron(Q_S, Q_A).T),
            ("diagonal", {"diag": eig}, torch.diag(eig.flatten())),
            ("identity", {}, None)):
        kind = get_strategy(name)
        got = kind.precondition(t, lam if H is not None else 0.0, G)
        want = G if H is None else torch.linalg.solve(H + lam * torch.eye(out * a, dtype=torch.float64),
                                                      G.reshape(2, -1).T).T.reshape(2, out, a)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(kind.self_product(t, lam if H is not None else 0.0, G),
                                   (G * want).sum((-2, -1)), rtol=1e-10, atol=1e-12)


def test_audit_identity_ignores_parameters_left_at_their_default():
    """A parameter added later, left at its default, keeps every existing audit's id; any set value counts."""
    from pydantic import create_model

    from tasks.options import AuditParams

    base = AuditParams(model="m", train=["t"], queries="q")
    grown = create_model("Grown", __base__=AuditParams, new_option=(str, "old"))
    assert grown(model="m", train=["t"], queries="q").identity() == base.identity()
    assert grown(model="m", train=["t"], queries="q", new_option="new").identity() != base.identity()
    assert AuditParams(model="m", train=["t"], queries="q", top_k=7).identity() != base.identity()
    # where results go and how they are computed are not part of what an audit is
    assert AuditParams(model="m", train=["t"], queries="q", output_dir="/x", batch_size=2, device="cpu",
                       experiment="e", tracking_uri="sqlite:///x.db").identity() == base.identity()
