"""Norm components, above all the sequence batchnorm: padding, precision, checkpointing, LoRA, decoding."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from hfx.registry import registry
from tests.conftest import tiny_config


def batchnorm(hidden=8, **kwargs):
    return registry.get("norm", "batchnorm").factory(tiny_config(norm_type="batchnorm", **kwargs), hidden)


def ragged(batch=3, seq=6, hidden=8, lengths=(6, 4, 2)):
    x = torch.randn(batch, seq, hidden) * 3 + 1.5
    mask = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]
    return x, mask


def bn_modules(model):
    return [m for m in model.modules() if hasattr(m, "running_mean")]


@pytest.mark.parametrize("name", ["layernorm", "rmsnorm"])
def test_token_norms_match_their_formula(name):
    norm = registry.get("norm", name).factory(tiny_config(layer_norm_eps=1e-6), 8)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x, mask = ragged()
    if name == "layernorm":
        expected = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
        expected = expected * norm.weight + norm.bias
    else:
        expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x, mask), expected)


def test_batchnorm_train_mode_equals_torch_batchnorm_on_real_tokens_only():
    bn = batchnorm(batchnorm_momentum=0.3).train()
    reference = nn.BatchNorm1d(8, eps=bn.eps, momentum=0.3).train()
    with torch.no_grad():
        for module in (bn, reference):
            module.weight.copy_(torch.linspace(0.5, 2.0, 8))
            module.bias.copy_(torch.linspace(-1.0, 1.0, 8))
    for step in range(3):
        x, mask = ragged()
        out = bn(x, mask)
        expected = reference(x[mask])
        torch.testing.assert_close(out[mask], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, reference.running_mean)
    torch.testing.assert_close(bn.running_var, reference.running_var)
    assert int(bn.num_batches_tracked) == 3
    bn.eval(), reference.eval()
    x, mask = ragged()
    torch.testing.assert_close(bn(x, mask)[mask], reference(x[mask]))
    torch.testing.assert_close(bn(x), reference(x.reshape(-1, 8)).reshape(x.shape))


@pytest.mark.parametrize("garbage", ["random", "inf", "nan", "huge"])
def test_batchnorm_pad_garbage_does_not_change_real_tokens(garbage):
    bn = batchnorm().train()
    x, mask = ragged()
    fill = {"random": torch.randn_like(x) * 100, "inf": torch.full_like(x, float("inf")),
            "nan": torch.full_like(x, float("nan")), "huge": torch.full_like(x, 3e38)}[garbage]
    dirty = torch.where(mask[..., None], x, fill).requires_grad_(True)
    clean = torch.where(mask[..., None], x, torch.zeros_like(x)).requires_grad_(True)
    out_dirty, out_clean = bn(dirty, mask), bn(clean, mask)
    assert torch.equal(out_dirty[mask], out_clean[mask])
    assert torch.isfinite(out_dirty[mask]).all()
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()
    # gradients of real tokens do not see the garbage either
    (g_dirty,) = torch.autograd.grad(out_dirty[mask].square().sum(), dirty)
    (g_clean,) = torch.autograd.grad(out_clean[mask].square().sum(), clean)
    assert torch.equal(g_dirty[mask], g_clean[mask])


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_batchnorm_model_padding_does_not_change_real_tokens(norm_position):
    model = AutoModelForMaskedLM.from_config(tiny_config(norm_type="batchnorm", norm_position=norm_position)).train()
    ids = torch.randint(1, 97, (3, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    other = torch.where(mask.bool(), ids, torch.randint(1, 97, ids.shape))  # different tokens under the padding
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = model(input_ids=other, attention_mask=mask).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], rtol=1e-5, atol=1e-5)
    # and the batch statistics really are batch statistics: other real tokens do change them
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] % 96) + 1
    with torch.no_grad():
        c = model(input_ids=changed, attention_mask=mask).logits
    assert not torch.allclose(a[2, 0], c[2, 0])


def test_batchnorm_statistics_are_fp32_under_bf16():
    bn = batchnorm(hidden=16).train()
    # a large common offset: summing in bf16 (8 mantissa bits) loses the per-feature variance entirely
    x32 = 256.0 + torch.randn(4, 64, 16)
    x = x32.to(torch.bfloat16)
    out = bn(x)
    assert out.dtype == torch.bfloat16
    exact = x.double().reshape(-1, 16)
    mean, var = exact.mean(0), exact.var(0, unbiased=False)
    expected = ((x.double() - mean) / torch.sqrt(var + bn.eps)).to(torch.bfloat16)
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.02, atol=0.02)
    assert out.float().std() > 0.9  # with bf16 sums the normalised output collapses or explodes
    torch.testing.assert_close(bn.running_mean, 0.1 * mean.float(), rtol=1e-5, atol=1e-5)


def test_batchnorm_running_buffers_stay_fp32_when_the_model_is_cast(tmp_path):
    model = AutoModelForCausalLM.from_config(tiny_config(norm_type="batchnorm", norm_position="pre"))
    model.to(torch.bfloat16)
    bns = bn_modules(model)
    assert bns and all(m.running_mean.dtype == torch.float32 and m.running_var.dtype == torch.float32 for m in bns)
    assert all(m.weight.dtype == torch.bfloat16 for m in bns)
    model.train()(torch.randint(1, 97, (2, 6)))
    assert all(m.running_mean.dtype == torch.float32 and int(m.num_batches_tracked) == 1 for m in bns)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for a, b in zip(bns, bn_modules(loaded)):
        assert b.running_mean.dtype == torch.float32 and torch.equal(a.running_mean, b.running_mean)
    assert loaded.model.layers[0].attention.q_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_batchnorm_running_stats_update_once_under_gradient_checkpointing(use_reentrant):
    config = tiny_config(norm_type="batchnorm", norm_position="pre")
    plain = AutoModelForCausalLM.from_config(config).train()
    ckpt = AutoModelForCausalLM.from_config(config).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    ids = torch.randint(1, 97, (3, 7))
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    for step in range(2):
        losses = []
        for model in (plain, ckpt):
            model.zero_grad()
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            losses.append(out.loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    layer_bns = [m for m in bn_modules(ckpt) if m in set(ckpt.model.layers.modules())]
    assert layer_bns and all(int(m.num_batches_tracked) == 2 for m in bn_modules(ckpt))
    for a, b in zip(bn_modules(plain), bn_modules(ckpt)):
        torch.testing.assert_close(b.running_mean, a.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(b.running_var, a.running_var, rtol=0, atol=0)
    for (name, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_frozen_batchnorm_uses_and_keeps_running_statistics():
    bn = batchnorm().train()
    for _ in range(3):
        bn(*ragged())
    bn.weight.requires_grad_(False)
    bn.bias.requires_grad_(False)
    mean, var, tracked = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    x, mask = ragged()
    train_out = bn(x, mask)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert int(bn.num_batches_tracked) == tracked
    assert torch.equal(train_out, bn.eval()(x, mask))


def test_lora_training_keeps_batchnorm_statistics_and_adapter_reproduces_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    config = tiny_config(norm_type="batchnorm", norm_position="post")
    base = AutoModelForMaskedLM.from_config(config).train()
    ids = torch.randint(1, 97, (4, 8))
    mask = torch.ones_like(ids)
    mask[3, 5:] = 0
    with torch.no_grad():
        base(input_ids=ids, attention_mask=mask)  # "pre-training": running statistics away from 0/1
    base.save_pretrained(tmp_path / "base")
    stats = {k: v.clone() for k, v in base.state_dict().items() if "running" in k or "num_batches" in k}

    lora = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    )
    lora.train()
    optimizer = torch.optim.Adam([p for p in lora.parameters() if p.requires_grad], lr=0.05)
    labels = ids.masked_fill(mask == 0, -100)
    losses = []
    for _ in range(4):
        loss = lora(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # the adapter did learn
    after = {k.replace("base_model.model.", ""): v for k, v in lora.state_dict().items() if k.replace("base_model.model.", "") in stats}
    assert after.keys() == stats.keys()
    for key, value in stats.items():
        assert torch.equal(after[key], value), key

    lora.eval()
    with torch.no_grad():
        expected = lora(input_ids=ids, attention_mask=mask).logits
        train_mode = lora.train()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(train_mode, expected, rtol=0, atol=0)  # frozen BN: same statistics in both modes
    lora.save_pretrained(tmp_path / "adapter")

    reloaded = peft.PeftModel.from_pretrained(AutoModelForMaskedLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        actual = reloaded.eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_batchnorm_causal_eval_incremental_decoding_equals_full_forward(norm_position):
    model = AutoModelForCausalLM.from_config(
        tiny_config(norm_type="batchnorm", norm_position=norm_position, position_embedding_type="rotary")
    ).train()
    with torch.no_grad():
        model(torch.randint(1, 97, (4, 10)))  # move running statistics away from their initial values
    model.eval()
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :4], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(4, 9):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_batchnorm_causal_train_mode_pools_over_future_tokens():
    """Documented, not hidden: train-mode batch statistics include later positions (docs/models.md)."""
    model = AutoModelForCausalLM.from_config(tiny_config(norm_type="batchnorm", norm_position="pre")).train()
    ids = torch.randint(1, 97, (2, 6))
    future = ids.clone()
    future[:, -1] = (ids[:, -1] % 96) + 1
    with torch.no_grad():
        a, b = model(ids).logits, model(future).logits
        assert not torch.allclose(a[:, 0], b[:, 0])  # position 0 sees a change at position 5
        model.eval()
        torch.testing.assert_close(model(ids).logits[:, :-1], model(future).logits[:, :-1])


def test_batchnorm_config_validation():
    with pytest.raises(ValueError, match="batchnorm_momentum"):
        tiny_config(norm_type="batchnorm", batchnorm_momentum=0.0)
    with pytest.raises(ValueError, match="batchnorm_eps"):
        tiny_config(norm_type="batchnorm", batchnorm_eps=-1.0)
    config = tiny_config(norm_type="batchnorm", batchnorm_momentum=0.25)
    assert config.batchnorm_momentum == 0.25 and config.to_dict()["batchnorm_eps"] == 1e-5
