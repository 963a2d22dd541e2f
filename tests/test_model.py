from __future__ import annotations

import math
import weakref

import numpy as np
import pytest
import torch

from conftest import openai_reference, randomize
from igpt.config import PRESETS, ModelConfig
from igpt.model import GPT, Norm
from igpt.objectives import ar_loss, bert_loss


def reference_logits(model: GPT, ids: torch.Tensor, bert_keep: torch.Tensor | None = None) -> torch.Tensor:
    """image-gpt's formulas (conftest.openai_reference, float64 einsums on OpenAI's own tensor layouts)
    applied to our weights, rearranged here into those layouts (reference igpt.md section 6)."""
    c, sd = model.config, {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    H, hd, d = c.n_head, c.head_dim, c.n_embd
    w = {"model/wte": sd["wte.weight"], "model/wpe": sd["wpe.weight"], "model/sos": sd["sos"],
         "model/wtet": sd["lm_head.weight"], "model/ln_f/g": sd["ln_f.weight"]}
    for i in range(c.n_layer):
        p, q = f"blocks.{i}.", f"model/h{i}/"
        for n, part in zip("qkv", np.split(sd[p + "attn.c_attn.weight"], 3)):  # rows (h, e), columns f
            w[q + f"attn/{n}_proj"] = part.reshape(H, hd, d)
        w[q + "attn/c_proj"] = sd[p + "attn.c_proj.weight"].T.reshape(H, hd, d)  # [in=(h, e), out=f]
        w[q + "mlp/c_fc/w"] = sd[p + "mlp.c_fc.weight"].T  # [in, out]
        w[q + "mlp/c_proj/w"] = sd[p + "mlp.c_proj.weight"].T
        w[q + "ln_1/g"], w[q + "ln_2/g"] = sd[p + "ln_1.weight"], sd[p + "ln_2.weight"]
    return openai_reference(w, ids, bert_keep)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_on_meta_with_exact_count(name):
    cfg = ModelConfig.from_preset(name)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == cfg.num_params()
    ids = torch.zeros(2, cfg.n_ctx, dtype=torch.long, device="meta")
    assert model(ids).shape == (2, cfg.n_ctx, 512)


def test_released_parameter_counts():
    counts = {n: ModelConfig.from_preset(n).num_params() for n in ("igpt-s", "igpt-m", "igpt-l")}
    assert counts == {"igpt-s": 76_571_648, "igpt-m": 455_157_760, "igpt-l": 1_362_250_752}
    with torch.device("meta"):
        assert GPT(ModelConfig.from_preset("igpt-s")).num_params() == 76_571_648


def test_no_biases_and_released_shapes():
    model = GPT(ModelConfig.from_preset("igpt-nano"))
    names = dict(model.named_parameters())
    assert not any("bias" in n for n in names)
    assert names["wte.weight"].shape == (512, 32) and names["lm_head.weight"].shape == (512, 32)
    assert names["wpe.weight"].shape == (64, 32) and names["sos"].shape == (32,)
    assert model.lm_head.weight is not model.wte.weight


def test_release_initialisation():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=4, n_embd=256, n_head=4, n_px=16)
    m = GPT(cfg)
    assert torch.count_nonzero(m.lm_head.weight) == 0
    assert m.wpe.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert m.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.blocks[0].attn.c_attn.weight.std().item() == pytest.approx(1 / 16, rel=0.05)
    assert m.blocks[0].attn.c_proj.weight.std().item() == pytest.approx(1 / math.sqrt(256 * 4), rel=0.05)
    assert m.blocks[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(m.blocks[1].ln_2.weight == 1)


def test_matches_reference_formulas_ar_and_bert(nano_model):
    ids = torch.randint(0, 16, (3, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(nano_model(ids).double(), reference_logits(nano_model, ids), atol=1e-4, rtol=1e-4)
    keep = torch.rand(3, 16, generator=torch.Generator().manual_seed(2)) > 0.3
    got = nano_model(ids, causal=False, keep=keep).double()
    torch.testing.assert_close(got, reference_logits(nano_model, ids, keep), atol=1e-4, rtol=1e-4)


def test_norm_is_uncentred_and_biasless():
    norm = Norm(4)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    expected = x / torch.sqrt((x ** 2).mean() + 1e-5)
    torch.testing.assert_close(norm(x), expected)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]


@pytest.mark.parametrize("t", [0, 5, 14])
def test_causality_changing_pixel_t_plus_1(nano_model, t):
    ids = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(3))
    changed = ids.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 7) % 16
    a, b = nano_model(ids), nano_model(changed)
    # logits[:, i] predicts pixel i from pixels < i: positions <= t+1 must not see pixel t+1 ...
    torch.testing.assert_close(a[:, : t + 2], b[:, : t + 2], atol=0, rtol=0)
    # ... and the position right after it must (else the test proves nothing)
    if t + 2 < 16:
        assert (a[:, t + 2] - b[:, t + 2]).abs().max() > 1e-4


def test_pixel_zero_is_predicted_from_sos_alone(nano_model):
    ids = torch.randint(0, 16, (2, 16))
    other = torch.randint(0, 16, (2, 16))
    torch.testing.assert_close(nano_model(ids)[:, 0], nano_model(other)[:, 0], atol=0, rtol=0)
    with torch.no_grad():
        nano_model.sos.add_(0.5)
    assert (nano_model(ids)[:, 0] - nano_model(other)[:, 0]).abs().max() == 0  # still input-independent


def test_bert_is_bidirectional_and_ignores_masked_content(nano_model):
    ids = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(4))
    keep = torch.ones(2, 16, dtype=torch.bool)
    keep[:, 9] = False
    changed = ids.clone()
    changed[:, 12] = (changed[:, 12] + 3) % 16
    a = nano_model(ids, causal=False, keep=keep)
    assert (a[:, :12] - nano_model(changed, causal=False, keep=keep)[:, :12]).abs().max() > 1e-4
    masked_changed = ids.clone()
    masked_changed[:, 9] = (masked_changed[:, 9] + 5) % 16
    torch.testing.assert_close(a, nano_model(masked_changed, causal=False, keep=keep), atol=0, rtol=0)


def test_gradients_reach_every_parameter(nano_config):
    torch.manual_seed(0)
    model = GPT(nano_config)  # released init: zero head, which must still pass gradient to everything below
    ids = torch.randint(0, 16, (4, 16))
    for _ in range(2):  # one step makes the zero head non-zero, then gradients flow through it
        model.zero_grad()
        ar_loss(model, ids).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bert_gradients_reach_all_but_sos(nano_model):
    ids = torch.randint(0, 16, (4, 16))
    bert_loss(nano_model.train(), ids, 0.3, torch.Generator().manual_seed(0)).backward()
    for name, p in nano_model.named_parameters():
        if name == "sos":
            assert p.grad is None
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_initial_ar_loss_is_ln_vocab():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("igpt-nano"))
    ids = torch.randint(0, 512, (3, 64))
    assert ar_loss(model, ids).item() == pytest.approx(math.log(512), abs=1e-6)


def test_block_with_zero_branches_is_identity(nano_model):
    block = nano_model.blocks[0]
    with torch.no_grad():
        block.attn.c_proj.weight.zero_()
        block.mlp.c_proj.weight.zero_()
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(block(x, True), x, atol=0, rtol=0)


def test_hidden_states_and_layer_features(nano_model):
    ids = torch.randint(0, 16, (2, 16))
    states = nano_model.hidden_states(ids)
    assert len(states) == nano_model.config.n_layer + 1
    torch.testing.assert_close(nano_model.lm_head(states[-1]), nano_model(ids))
    feats = nano_model.layer_features(ids)
    assert sorted(feats) == [0, 1, 2]
    for l in (0, 1):
        torch.testing.assert_close(feats[l], nano_model.blocks[l].ln_1(states[l]).mean(1))
    torch.testing.assert_close(feats[2], states[2].mean(1))
    only = nano_model.layer_features(ids, [1])
    torch.testing.assert_close(only[1], feats[1])
    with pytest.raises(ValueError, match="layers must lie"):
        nano_model.layer_features(ids, [3])


def test_inference_holds_one_residual_state_at_a_time():
    # a probe of every layer at 32x32 would otherwise hold n_layer + 1 states (B, T, D) per batch
    model = GPT(ModelConfig.from_preset("igpt-nano", n_layer=4)).eval()
    alive: list[weakref.ref] = []
    stale: list[int] = []

    def check(block, inputs, output):
        stale.extend(i for i, ref in enumerate(alive[:-1]) if ref() is not None)  # all but this block's input
        alive.append(weakref.ref(output))
    for b in model.blocks:
        b.register_forward_hook(check)
    ids = torch.randint(0, model.config.n_vocab, (2, model.config.n_ctx))
    with torch.no_grad():
        for run in (model.layer_features, model):
            alive.clear()
            run(ids)
            assert len(alive) == 4 and stale == [], run
        alive.clear()
        states = model.hidden_states(ids)  # asks for every state, so all of them are kept: the check sees it
        assert len(states) == 5 and stale == [0, 0, 1]


def test_activation_checkpointing_gives_same_gradients(nano_config):
    torch.manual_seed(0)
    plain = randomize(GPT(nano_config))
    ckpt = GPT(nano_config)
    ckpt.grad_checkpoint = True
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 16, (2, 16))
    for m in (plain, ckpt):
        m.train()
        ar_loss(m, ids).backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=n)


def test_cached_decoding_matches_full_forward(nano_model):
    ids = torch.randint(0, 16, (2, 16))
    full = nano_model(ids)
    cache = nano_model.new_cache(2, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(nano_model.decode_step(ids[:, :5], cache), full[:, 5], atol=1e-5, rtol=1e-5)
    for i in range(5, 15):
        torch.testing.assert_close(nano_model.decode_step(ids[:, i:i + 1], cache), full[:, i + 1],
                                   atol=1e-5, rtol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.from_preset("igpt-xxl")
    with pytest.raises(ValueError, match="exceeds n_ctx"):
        GPT(ModelConfig.from_preset("igpt-nano"))(torch.zeros(1, 65, dtype=torch.long))
