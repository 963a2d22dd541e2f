from __future__ import annotations

import pytest
import torch

from igpt.sample import filter_logits, sample, sample_uncached


@pytest.mark.parametrize("kw", [{}, {"top_k": 3}, {"top_p": 0.7, "temperature": 0.8}])
def test_cached_equals_uncached_token_for_token(nano_model, kw):
    a = sample(nano_model, 3, generator=torch.Generator().manual_seed(5), **kw)
    b = sample_uncached(nano_model, 3, generator=torch.Generator().manual_seed(5), **kw)
    assert a.shape == (3, 16)
    assert torch.equal(a, b)


def test_prefix_is_kept_and_completion_matches_uncached(nano_model):
    prefix = torch.randint(0, 16, (2, 8))
    a = sample(nano_model, 2, prefix=prefix, generator=torch.Generator().manual_seed(1))
    b = sample_uncached(nano_model, 2, prefix=prefix, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[:, :8], prefix) and torch.equal(a, b)


def test_temperature_zero_is_greedy(nano_model):
    ids = sample(nano_model, 2, temperature=0)
    logits = nano_model(ids)
    assert torch.equal(ids, logits.argmax(-1))


def test_filters_never_emit_filtered_ids():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    top3 = torch.topk(logits, 3, dim=-1).indices
    filtered = filter_logits(logits, top_k=3)
    allowed = torch.isfinite(filtered)
    assert allowed.sum(-1).tolist() == [3] * 4
    assert torch.all(allowed.gather(1, top3))
    probs = logits.softmax(-1)
    nucleus = torch.isfinite(filter_logits(logits, top_p=0.5))
    for row in range(4):
        kept = probs[row][nucleus[row]]
        assert kept.sum() >= 0.5 and kept.sum() - kept.min() < 0.5  # smallest set reaching 0.5


def test_bad_arguments(nano_model):
    with pytest.raises(ValueError, match="temperature"):
        sample(nano_model, 1, temperature=-1)
    with pytest.raises(ValueError, match="prefix"):
        sample(nano_model, 2, prefix=torch.zeros(3, 4, dtype=torch.long))
