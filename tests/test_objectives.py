from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from igpt.objectives import ar_loss, bert_loss, masked_loss, mean_loss, nats_to_bits, sample_keep_mask


def test_keep_mask_rate_and_seed():
    keep = sample_keep_mask((256, 1024), 0.15, torch.Generator().manual_seed(0))
    assert keep.dtype == torch.bool
    assert abs((~keep).float().mean().item() - 0.15) < 0.005
    again = sample_keep_mask((256, 1024), 0.15, torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)
    assert not torch.equal(keep, sample_keep_mask((256, 1024), 0.15, torch.Generator().manual_seed(1)))


def test_masked_loss_averages_per_example_over_masked_positions():
    V = 5
    logits = torch.randn(2, 4, V)
    ids = torch.randint(0, V, (2, 4))
    keep = torch.tensor([[False, True, True, True], [False, False, False, True]])
    ce = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    expected = (ce[0, 0] + ce[1, :3].mean()) / 2  # example 1 has 3 masked positions, weighted per example
    torch.testing.assert_close(masked_loss(logits, ids, keep), expected)


def test_masked_loss_skips_examples_without_masks():
    logits = torch.randn(2, 3, 4)
    ids = torch.randint(0, 4, (2, 3))
    keep = torch.tensor([[True, True, True], [False, True, True]])
    ce = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    torch.testing.assert_close(masked_loss(logits, ids, keep), ce[1, 0])


def test_bert_loss_uses_unmasked_context(nano_model):
    ids = torch.randint(0, 16, (2, 16))
    keep = torch.ones(2, 16, dtype=torch.bool)
    keep[:, 3] = False
    logits = nano_model(ids, causal=False, keep=keep)
    expected = F.cross_entropy(logits[:, 3].float(), ids[:, 3])
    torch.testing.assert_close(bert_loss(nano_model, ids, keep=keep), expected)


def test_mean_loss_weights_batches_by_images_and_fixes_bert_masks(nano_model):
    a, b = torch.randint(0, 16, (3, 16)), torch.randint(0, 16, (1, 16))
    result = mean_loss(nano_model, [a, b], "ar")
    expected = (ar_loss(nano_model, a).item() * 3 + ar_loss(nano_model, b).item()) / 4
    assert result["images"] == 4 and result["loss"] == pytest.approx(expected, rel=1e-6)
    assert result["bits"] == pytest.approx(nats_to_bits(expected), rel=1e-6)
    first, again = mean_loss(nano_model, [a], "bert", 0.5, seed=3), mean_loss(nano_model, [a], "bert", 0.5, seed=3)
    assert first["loss"] == again["loss"] != mean_loss(nano_model, [a], "bert", 0.5, seed=4)["loss"]
    with pytest.raises(ValueError, match="no batches"):
        mean_loss(nano_model, [], "ar")
    assert nats_to_bits(math.log(512)) == pytest.approx(9.0)
