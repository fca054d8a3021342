"""The logits' gradient computed in place must be autograd's gradient of the summed next-token cross-entropy,
for the data's labels and for labels sampled from the model, in every precision, with padding and prompts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from influence_engine.data import Example, collate
from influence_engine.passes import LogitGradient, _sample_targets


def _batch(V: int, padding_side: str = "right"):
    g = torch.Generator().manual_seed(0)
    lengths, prompts = (7, 12, 3, 12), (1, 4, 1, 2)  # prompts: targets start after them
    ex = [Example(f"d{i}", tuple(torch.randint(0, V, (n,), generator=g).tolist()), p, n)
          for i, (n, p) in enumerate(zip(lengths, prompts, strict=True))]
    return collate(ex, pad_id=0, padding_side=padding_side)


def _reference(logits: torch.Tensor, batch, targets: torch.Tensor) -> torch.Tensor:
    """Autograd through the loss the passes used before: float32 (or float64) cross-entropy, summed."""
    leaf = logits.detach().clone().requires_grad_(True)
    select = batch.target_mask[:, 1:]
    pred = leaf[:, :-1][select].to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    F.cross_entropy(pred, targets, reduction="sum").backward()
    return leaf.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_gradient_and_sampled_labels_match_autograd(dtype, padding_side):
    V = 300
    batch = _batch(V, padding_side)
    B, T = batch.input_ids.shape
    logits = (3 * torch.randn(B, T, V, generator=torch.Generator().manual_seed(1))).to(dtype)
    logits[~batch.attention_mask] = float("nan")  # padding positions may hold anything
    select = batch.target_mask[:, 1:]
    true = batch.input_ids[:, 1:][select]
    counts = select.sum(1).tolist()
    sampled = _sample_targets(logits[:, :-1][select].float() if dtype == torch.bfloat16 else logits[:, :-1][select],
                              counts, batch.ids, seed=5)
    assert not torch.equal(sampled, true)  # the two label sets differ somewhere: switch() has work to do
    tol = {"rtol": 0, "atol": 1e-12 if dtype == torch.float64 else (1e-6 if dtype == torch.float32 else 1e-2)}
    lg = LogitGradient(logits.clone(), batch, ["sampled", "true"], seed=5, chunk=5)  # chunks split documents
    flat_rows = torch.zeros(B, T, dtype=torch.bool)
    flat_rows[:, :-1] = select
    torch.testing.assert_close(lg.targets[0].view(B, T)[flat_rows], sampled)  # the bench's labels, exactly
    torch.testing.assert_close(lg.grad.double(), _reference(logits, batch, sampled).double(), **tol)
    torch.testing.assert_close(lg.switch(1).double(), _reference(logits, batch, true).double(), **tol)
    torch.testing.assert_close(lg.switch(0).double(), _reference(logits, batch, sampled).double(), **tol)
    assert torch.isfinite(lg.grad).all()  # NaN padding rows got a zero gradient
    one = LogitGradient(logits.clone(), batch, ["true"], seed=5)  # in place, one chunk
    torch.testing.assert_close(one.grad.double(), _reference(logits, batch, true).double(), **tol)
