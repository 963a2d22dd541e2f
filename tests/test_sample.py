from __future__ import annotations

import pytest
import torch

from igpt.generate.sample import Sampler, draw, draw_from, filter_logits, sample


@torch.no_grad()
def sample_uncached(model, n, *, prefix=None, temperature=1.0, top_k=None, top_p=None, generator=None):
    """image-gpt's run.py sampler, the reference the KV cache must equal: a full forward pass per pixel."""
    T = model.config.n_ctx
    out = torch.zeros(n, T, dtype=torch.long)
    P = 0 if prefix is None else prefix.shape[1]
    if prefix is not None:
        out[:, :P] = prefix
    for i in range(P, T):
        logits = model(out[:, :i + 1])[:, i]  # position i sees only out[:, :i] through the SOS shift
        out[:, i] = draw(logits, temperature, top_k, top_p, generator)
    return out


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


@pytest.mark.parametrize("window", [1, 3, 5])
def test_windowed_steps_and_batches_match_uncached(nano_model, window):
    # window 1 attends exactly the filled slots; 3 and 5 attend padded, masked windows of several widths
    prefix = torch.randint(0, 16, (4, 3))
    kw = {"prefix": prefix, "top_k": 5}
    a = sample(nano_model, 4, window=window, generator=torch.Generator().manual_seed(2), **kw)
    b = sample_uncached(nano_model, 4, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b)
    # two batches of 2 draw other random numbers than one batch of 4, but keep the prefix and stay valid
    c = sample(nano_model, 4, window=window, batch_size=2, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(c[:, :3], prefix) and c.min() >= 0 and c.max() < 16


def test_sampler_is_reusable_across_batches(nano_model):
    sampler = Sampler(nano_model, 3, window=4)
    first = sampler.run(generator=torch.Generator().manual_seed(7))
    sampler.run(prefix=torch.randint(0, 16, (3, 9)), generator=torch.Generator().manual_seed(1))
    again = sampler.run(generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again)  # nothing left in the cache by the second batch leaks into the third


def test_top_k_one_is_greedy_and_filtered_ids_never_drawn(nano_model):
    greedy = sample(nano_model, 3, temperature=0)
    assert torch.equal(sample(nano_model, 3, top_k=1, generator=torch.Generator().manual_seed(0)), greedy)
    assert torch.equal(sample(nano_model, 3, top_p=1e-6, generator=torch.Generator().manual_seed(0)), greedy)
    assert not torch.equal(sample(nano_model, 3, generator=torch.Generator().manual_seed(0)), greedy)


def test_draw_from_follows_the_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0]).expand(40000, 4)
    ids = draw_from(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=4).float() / len(ids)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.01, rtol=0)
    assert freq[3] == 0


def test_bf16_copy_samples_valid_ids_and_leaves_the_model_alone(nano_model):
    before = nano_model.wte.weight.clone()
    ids = sample(nano_model, 2, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (2, 16) and ids.min() >= 0 and ids.max() < 16
    assert nano_model.wte.weight.dtype == torch.float32 and torch.equal(nano_model.wte.weight, before)


def test_generator_on_another_device_and_graphs_on_cpu_are_errors(nano_model):
    with pytest.raises(ValueError, match="CUDA graphs"):
        Sampler(nano_model, 1, cuda_graph=True)
    with pytest.raises(ValueError, match="prefix ids"):
        sample(nano_model, 1, prefix=torch.full((1, 2), 99))
