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


# ---- too few real tokens, 4-D masks, an all-padding shard -------------------------------------------------


def trained_batchnorm(steps=3, **kwargs):
    """A batchnorm whose running statistics have moved away from 0 / 1."""
    bn = batchnorm(**kwargs).train()
    for _ in range(steps):
        bn(*ragged())
    return bn


def by_hand(x, mean, var, bn):
    """Normalisation with given statistics, computed independently in float64."""
    out = (x.double() - mean.double()) / torch.sqrt(var.double() + bn.eps)
    return (out * bn.weight.double() + bn.bias.double()).float()


def test_batchnorm_all_padding_batches_leave_running_statistics_unchanged():
    bn = trained_batchnorm()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, 8))
    mean, var, tracked = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    assert not torch.allclose(var, torch.ones(8))
    x = torch.randn(2, 5, 8) * 4
    nothing = torch.zeros(2, 5, dtype=torch.bool)
    for _ in range(10):  # before: running_var 0.90 -> 0.31 after ten such batches (momentum 0.1 towards 0)
        out = bn(x, nothing)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert int(bn.num_batches_tracked) == tracked
    # pads are zeroed, then normalised with the running statistics: finite, and no batch statistic involved
    torch.testing.assert_close(out, by_hand(torch.zeros_like(x), mean, var, bn).expand_as(out), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["masked", "single-token-batch"])
def test_batchnorm_one_real_token_falls_back_to_running_statistics(layout):
    bn = trained_batchnorm()
    mean, var, tracked = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    if layout == "masked":
        x = torch.randn(3, 4, 8) * 2 + 1
        mask = torch.zeros(3, 4, dtype=torch.bool)
        mask[1, 2] = True
        out = bn(x, mask)[mask]
        token = x[mask]
    else:  # no mask, batch of one sequence of one token
        x = torch.randn(1, 1, 8) * 2 + 1
        out, token = bn(x).reshape(1, 8), x.reshape(1, 8)
    torch.testing.assert_close(out, by_hand(token, mean, var, bn), rtol=1e-6, atol=1e-6)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert int(bn.num_batches_tracked) == tracked


def test_batchnorm_two_real_tokens_use_and_record_their_statistics():
    bn = trained_batchnorm(batchnorm_momentum=0.25)
    mean0, var0 = bn.running_mean.clone().double(), bn.running_var.clone().double()
    x = torch.randn(2, 3, 8) * 3
    x[1, 2] = x[0, 1] + torch.linspace(1.0, 3.0, 8)  # a variance well above fp32's one-pass rounding in every channel
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[0, 1] = mask[1, 2] = True
    a, b = x[0, 1].double(), x[1, 2].double()
    mean = (a + b) / 2
    biased = ((a - mean) ** 2 + (b - mean) ** 2) / 2
    out = bn(x, mask)
    torch.testing.assert_close(out[mask], by_hand(x[mask], mean, biased, bn), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean.double(), 0.75 * mean0 + 0.25 * mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), 0.75 * var0 + 0.25 * (2 * biased), rtol=1e-6, atol=1e-6)


def causal_allowed(mask2d):
    seq = mask2d.shape[1]
    return torch.ones(seq, seq, dtype=torch.bool).tril()[None] & mask2d.bool()[:, None, :]


def additive(allowed, dtype=torch.float32):
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def packed_rows():
    """The evaluation scorer's layout: a context, two continuation blocks that see it but not each other, idle padding."""
    allowed = torch.zeros(2, 7, 7, dtype=torch.bool)
    real = torch.zeros(2, 7, dtype=torch.bool)
    # row 0: context 0-1, block 2-3, block 4-5, idle 6
    allowed[0, :2, :2] = torch.ones(2, 2, dtype=torch.bool).tril()
    for start in (2, 4):
        allowed[0, start : start + 2, :2] = True
        allowed[0, start : start + 2, start : start + 2] = torch.ones(2, 2, dtype=torch.bool).tril()
    real[0, :6] = True
    # row 1: context 0-2, one block 3, idle 4-6
    allowed[1, :3, :3] = torch.ones(3, 3, dtype=torch.bool).tril()
    allowed[1, 3, :4] = True
    real[1, :4] = True
    idle = torch.tensor([[0, 6], [1, 4], [1, 5], [1, 6]])
    allowed[idle[:, 0], idle[:, 1], idle[:, 1]] = True  # idle positions attend to themselves only
    return allowed, real


def test_real_token_mask_from_2d_3d_and_4d_masks():
    from hfx.padding_masks import real_token_mask

    lengths = torch.tensor([5, 3, 1])
    mask2d = (torch.arange(5)[None] < lengths[:, None]).long()
    real = mask2d.bool()
    bidirectional = real[:, None, :].expand(3, 5, 5)
    causal = causal_allowed(mask2d)
    packed, packed_real = packed_rows()
    cases = {
        "2-D": (mask2d, real),
        "4-D bool bidirectional": (bidirectional[:, None], real),
        "4-D additive bidirectional": (additive(bidirectional)[:, None], real),
        "4-D additive -10000 (BERT style)": ((1.0 - bidirectional.float())[:, None] * -10000.0, real),
        "4-D -inf causal": (torch.zeros(3, 1, 5, 5).masked_fill(~causal[:, None], float("-inf")), real),
        "4-D broadcast key mask (B,1,1,k)": (real[:, None, None, :], real),
        "3-D causal": (causal, real),
        "4-D per-head": (causal[:, None].expand(3, 2, 5, 5), real),
        "4-D packed rows (scorer)": (additive(packed, torch.bfloat16)[:, None], packed_real),
    }
    for name, (mask, expected) in cases.items():
        assert torch.equal(real_token_mask(mask, expected.shape[1]), expected), name
    assert real_token_mask(None, 4) is None
    # with a KV cache the current tokens are the last keys: 2 new tokens after 3 cached ones, row 1 right-padded
    step = torch.ones(2, 1, 2, 5, dtype=torch.bool)
    step[1, :, :, 4] = False
    step[1, :, 1, :] = False
    assert torch.equal(real_token_mask(step, 2), torch.tensor([[True, True], [True, False]]))
    with pytest.raises(ValueError, match=r"attention_mask must be 2-D.*got shape \(1, 1, 1, 2, 2\)"):
        real_token_mask(torch.ones(1, 1, 1, 2, 2), 2)


def test_batchnorm_statistics_under_packed_4d_mask_are_over_real_tokens_only():
    from hfx.padding_masks import real_token_mask

    bn = batchnorm(batchnorm_momentum=0.3).train()
    reference = nn.BatchNorm1d(8, eps=bn.eps, momentum=0.3).train()
    allowed, real = packed_rows()
    x = torch.randn(2, 7, 8) * 2 + 0.5
    x = torch.where(real[..., None], x, torch.full_like(x, 1e4))  # garbage in the idle positions
    out = bn(x, real_token_mask(additive(allowed)[:, None], 7))
    torch.testing.assert_close(out[real], reference(x[real]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, reference.running_mean)
    torch.testing.assert_close(bn.running_var, reference.running_var)


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
@pytest.mark.parametrize("form", ["bool", "additive"])
def test_batchnorm_model_with_4d_mask_excludes_padding_like_2d(causal, form):
    head = AutoModelForCausalLM if causal else AutoModelForMaskedLM
    model = head.from_config(tiny_config(norm_type="batchnorm", norm_position="pre")).train()
    ids = torch.randint(1, 97, (3, 8))
    mask2d = torch.ones_like(ids)
    mask2d[1, 5:] = 0
    mask2d[2, 2:] = 0
    real = mask2d.bool()
    allowed = causal_allowed(mask2d) if causal else real[:, None, :].expand(3, 8, 8)
    mask4d = allowed[:, None] if form == "bool" else additive(allowed)[:, None]
    other = torch.where(real, ids, torch.randint(1, 97, ids.shape))  # different tokens under the padding
    buffers = lambda: torch.cat([torch.cat([m.running_mean, m.running_var]) for m in bn_modules(model)])  # noqa: E731
    start = buffers()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask2d).logits
        after_2d = buffers()
        a = model(input_ids=ids, attention_mask=mask4d).logits
        after_4d = buffers()
        b = model(input_ids=other, attention_mask=mask4d).logits
    # before: 4-D masks reached the norms as "no mask", and pad garbage moved real logits (0.08 here)
    torch.testing.assert_close(a[real], b[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[real], reference[real], rtol=1e-5, atol=1e-5)
    # each update (momentum 0.1) moved the buffers by the same real-token statistics as the 2-D run
    torch.testing.assert_close(after_2d - start, (after_4d - after_2d) / 0.9, rtol=1e-4, atol=1e-5)


def _sharded_batchnorm_worker(rank, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        x, mask, bn = _sharded_inputs()
        rows = slice(2 * rank, 2 * rank + 2)
        shard = x[rows].clone().requires_grad_(True)
        out = bn(shard, mask[rows])
        loss = (out * torch.linspace(-1, 1, 8)).square()[mask[rows]].sum()
        loss.backward()
        first = dict(out=out.detach(), x_grad=shard.grad, weight_grad=bn.weight.grad, bias_grad=bn.bias.grad,
                     running_mean=bn.running_mean.clone(), running_var=bn.running_var.clone(),
                     tracked=int(bn.num_batches_tracked))
        # then every shard all padding: no process may update, and every process still joins the all-reduce
        bn(x[rows], torch.zeros(2, 5, dtype=torch.bool))
        second = dict(running_mean=bn.running_mean.clone(), running_var=bn.running_var.clone(),
                      tracked=int(bn.num_batches_tracked))
        torch.save({"first": first, "second": second}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _sharded_inputs():
    torch.manual_seed(0)
    bn = batchnorm(batchnorm_momentum=0.5).train()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, 8))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, 8))
    x = torch.randn(4, 5, 8) * 2 + 1
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[0, :5] = True
    mask[1, :2] = True  # rows 2 and 3 (all of process 1's shard) are padding
    return x, mask, bn


@pytest.mark.slow
def test_batchnorm_all_reduce_with_an_all_padding_shard(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_sharded_batchnorm_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    x, mask, bn = _sharded_inputs()
    whole = x.clone().requires_grad_(True)
    out = bn(whole, mask)
    (out * torch.linspace(-1, 1, 8)).square()[mask].sum().backward()
    reference = nn.BatchNorm1d(8, eps=bn.eps, momentum=0.5).train()
    with torch.no_grad():
        reference.weight.copy_(bn.weight)
        reference.bias.copy_(bn.bias)
    expected_real = reference(x[mask])
    torch.testing.assert_close(out[mask], expected_real, rtol=1e-5, atol=1e-5)  # the one-process side is right
    for rank, result in enumerate(ranks):
        rows = slice(2 * rank, 2 * rank + 2)
        first = result["first"]
        torch.testing.assert_close(first["out"][mask[rows]], out[rows][mask[rows]].detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(first["x_grad"], whole.grad[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(first["running_mean"], reference.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(first["running_var"], reference.running_var, rtol=1e-5, atol=1e-6)
        assert first["tracked"] == 1
        second = result["second"]
        assert torch.equal(second["running_mean"], first["running_mean"]) and torch.equal(second["running_var"], first["running_var"])
        assert second["tracked"] == 1
    assert not ranks[1]["first"]["x_grad"].any()  # padding gets no gradient ...
    for name in ("weight_grad", "bias_grad"):  # ... and the local parameter gradients add up to the one-process ones
        total = ranks[0]["first"][name] + ranks[1]["first"][name]
        torch.testing.assert_close(total, (bn.weight if name == "weight_grad" else bn.bias).grad, rtol=1e-5, atol=1e-6)
