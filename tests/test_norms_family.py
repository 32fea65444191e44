"""PowerNorm, Dynamic Tanh and causal BatchNorm against float64 references, padding, causality, round trips."""

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfx.registry import registry
from tests.conftest import tiny_config

NEW_NORMS = ("powernorm", "dyt", "batchnorm_causal")


@pytest.mark.parametrize("name", NEW_NORMS)
def test_found_through_the_installed_entry_point(name):
    assert registry.get("norm", name).factory.__module__ == f"hfx_norms.{name}"


def make(name, hidden=8, **fields):
    return registry.get("norm", name).factory(tiny_config(norm_type=name, **fields), hidden)


def ragged(batch=3, seq=6, hidden=8, lengths=(6, 4, 2), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, seq, hidden, generator=g) * 3 + 1.5).to(dtype)
    mask = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]
    return x, mask


def affine(norm, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(norm.bias.shape, generator=g))


def causal_lm(norm_type, **fields):
    config = tiny_config(norm_type=norm_type, norm_position="pre", is_decoder=True, position_embedding_type="rotary",
                         **fields)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


# ---------------------------------------------------------------- DyT


def test_dyt_equals_its_formula_in_float64():
    norm = make("dyt", dyt_alpha_init=0.8).double()
    affine(norm)
    x, mask = ragged()
    assert norm.alpha.item() == pytest.approx(0.8, rel=1e-7)  # stored in fp32 before .double()
    expected = torch.tanh(norm.alpha * x) * norm.weight + norm.bias
    torch.testing.assert_close(norm(x, mask), expected, rtol=1e-12, atol=1e-12)
    # per token: padding, and the rest of the batch, change nothing
    torch.testing.assert_close(norm(x[:1, :3], None), expected[:1, :3], rtol=1e-12, atol=1e-12)


def test_dyt_alpha_init_survives_model_init_and_checkpoints_keep_learned_alpha(tmp_path):
    model = causal_lm("dyt", dyt_alpha_init=0.8)
    alphas = [m.alpha for m in model.modules() if hasattr(m, "alpha_init")]
    assert len(alphas) == 2 * 2 + 1  # two norms per block, final norm
    assert all(a.item() == pytest.approx(0.8) for a in alphas)
    with torch.no_grad():
        for i, a in enumerate(alphas):
            a.fill_(0.3 + 0.1 * i)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert [a.item() for a in loaded.parameters() if a.shape == (1,)] == pytest.approx([a.item() for a in alphas])
    ids = torch.randint(0, 97, (2, 7))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


# ---------------------------------------------------------------- PowerNorm


def group_scale(x, groups, eps):
    parts = x.reshape(*x.shape[:-1], groups, -1)
    return (parts / torch.sqrt(parts.pow(2).mean(-1, keepdim=True) + eps)).reshape(x.shape)


def powernorm_reference(steps, weight, bias, eps, alpha_fwd, alpha_bkw, warmup, groups):
    """The paper's Algorithm 1 in float64, one (x, mask, grad_out) per training step; returns per-step results.

    With ``groups`` each token is first divided by its quadratic mean per channel group (exact gradient through it).
    """
    hidden = weight.shape[0]
    phi, nu, tracked = torch.ones(hidden, dtype=torch.float64), torch.zeros(hidden, dtype=torch.float64), 0
    results = []
    for raw, mask, dy in steps:
        raw = raw.clone().requires_grad_(True)
        x = group_scale(raw, groups, eps) if groups else raw
        real = x[mask]
        batch_phi = (real**2).mean(0)
        scale = torch.sqrt((batch_phi if tracked < warmup else phi) + eps)
        z = torch.where(mask[..., None], x / scale, torch.zeros_like(x))
        y = weight * z + bias
        phi = phi + (batch_phi - phi) / (tracked + 1) if tracked < warmup else alpha_fwd * phi + (1 - alpha_fwd) * batch_phi
        tracked += 1
        g = dy * weight
        grad_x = torch.where(mask[..., None], (g - nu * z) / scale, torch.zeros_like(x))
        (grad_x,) = torch.autograd.grad(x, raw, grad_x)  # through the group scaling, if any
        z, y = z.detach(), y.detach()
        gamma, lam = (z[mask] ** 2).mean(0), (g[mask] * z[mask]).mean(0)
        nu = nu * (1 - (1 - alpha_bkw) * gamma) + (1 - alpha_bkw) * lam
        results.append(dict(y=y, grad_x=grad_x, grad_weight=(dy * z).sum((0, 1)), grad_bias=dy.sum((0, 1)),
                            phi=phi.clone(), nu=nu.clone(), tracked=tracked))
    return results


@pytest.mark.parametrize("groups", [0, 1, 2])
def test_powernorm_forward_backward_and_statistics_equal_the_algorithm_over_warmup_and_after(groups):
    fields = dict(powernorm_alpha_fwd=0.8, powernorm_alpha_bkw=0.7, powernorm_warmup_steps=2, powernorm_eps=1e-5,
                  powernorm_group_scaling=groups)
    norm = make("powernorm", **fields).double().train()
    affine(norm)
    weight, bias = norm.weight.detach().clone(), norm.bias.detach().clone()
    steps = []
    for i, lengths in enumerate([(6, 4, 2), (3, 6, 1), (6, 6, 6), (2, 5, 4), (1, 1, 1)]):
        x, mask = ragged(lengths=lengths, seed=10 + i)
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(20 + i), dtype=torch.float64)
        steps.append((x, mask, dy))
    expected = powernorm_reference(steps, weight, bias, 1e-5, 0.8, 0.7, 2, groups)
    for (x, mask, dy), want in zip(steps, expected):
        norm.zero_grad()
        x = x.clone().requires_grad_(True)
        y = norm(x, mask)
        (y * dy).sum().backward()
        real = mask[..., None].expand_as(y)
        torch.testing.assert_close(y[real], want["y"][real], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(x.grad, want["grad_x"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(norm.weight.grad, want["grad_weight"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(norm.bias.grad, want["grad_bias"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(norm.running_phi, want["phi"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(norm.running_nu, want["nu"], rtol=1e-10, atol=1e-12)
        assert int(norm.num_batches_tracked) == want["tracked"]
    # eval: the running quadratic mean of the last step
    x, mask = ragged(seed=99)
    y = norm.eval()(x, mask)
    x = group_scale(x, groups, 1e-5) if groups else x
    torch.testing.assert_close(y, x / torch.sqrt(expected[-1]["phi"] + 1e-5) * weight + bias, rtol=1e-12, atol=1e-12)


def test_powernorm_after_warmup_the_forward_uses_the_previous_running_statistic():
    norm = make("powernorm", powernorm_warmup_steps=0, powernorm_group_scaling=0).double().train()
    x, mask = ragged()
    y = norm(x, mask)  # psi_{-1} = 1: the input passes unscaled (up to eps)
    torch.testing.assert_close(y[mask], x[mask] / (1 + 1e-5) ** 0.5)
    assert norm.running_phi.sub(1).abs().max() > 0.5  # ... while the statistic moved towards mean(x^2)


@pytest.mark.parametrize("garbage", [float("inf"), float("nan"), 1e6])
def test_powernorm_pad_garbage_changes_no_real_output_gradient_or_statistic(garbage):
    x, mask = ragged(dtype=torch.float32)
    results = []
    for fill in (0.0, garbage):
        norm = make("powernorm", powernorm_warmup_steps=1).train()
        affine(norm)
        outputs = []
        for _ in range(2):  # a warmup step (batch statistic) then one with the running statistic
            xi = x.masked_fill(~mask[..., None], fill).requires_grad_(True)
            y = norm(xi, mask)
            (y.square() * mask[..., None]).sum().backward()
            assert torch.isfinite(xi.grad).all()  # pad positions get a zero gradient, not nan
            outputs.append((y[mask].detach(), xi.grad[mask]))
        results.append((outputs, norm.running_phi.clone(), norm.running_nu.clone(), norm.weight.grad.clone()))
    (clean, phi0, nu0, gw0), (dirty, phi1, nu1, gw1) = results
    for (y0, g0), (y1, g1) in zip(clean, dirty):
        torch.testing.assert_close(y1, y0, rtol=0, atol=0)
        torch.testing.assert_close(g1, g0, rtol=0, atol=0)
    for a, b in ((phi0, phi1), (nu0, nu1), (gw0, gw1)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_powernorm_all_padding_batch_leaves_statistics_unchanged_and_frozen_norm_keeps_them():
    norm = make("powernorm").train()
    x, mask = ragged(dtype=torch.float32)
    norm(x, mask)
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    xi = x.clone().requires_grad_(True)
    norm(xi, torch.zeros_like(mask)).sum().backward()
    for k, v in norm.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    norm.requires_grad_(False)  # what PEFT does to the base model
    y = norm(x, mask)
    expected = group_scale(x, 1, norm.eps) * torch.rsqrt(norm.running_phi + norm.eps) * norm.weight + norm.bias
    torch.testing.assert_close(y, expected)
    for k, v in norm.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_powernorm_gradient_checkpointing_equals_plain_training_and_updates_once():
    # warmup_steps=0 makes the forward read psi_{t-1}: a replay with the advanced psi would change the gradients
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    results = []
    for checkpointing in (False, True):
        model = causal_lm("powernorm", powernorm_warmup_steps=0).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for _ in range(2):
            model.zero_grad()
            model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((grads, {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k}))
    (g0, b0), (g1, b1) = results
    assert int(b1["model.layers.0.ffn_norm.num_batches_tracked"]) == 2
    for key in b0:
        torch.testing.assert_close(b1[key], b0[key], rtol=1e-6, atol=1e-7)
    for key in g0:
        torch.testing.assert_close(g1[key], g0[key], rtol=1e-5, atol=1e-7)


def test_powernorm_statistics_stay_fp32_when_the_model_is_cast_to_bf16():
    model = causal_lm("powernorm").to(torch.bfloat16).train()
    model(torch.randint(0, 97, (2, 5))).logits.float().sum().backward()
    norm = model.model.layers[0].ffn_norm
    assert norm.running_phi.dtype == norm.running_nu.dtype == torch.float32
    assert norm.weight.dtype == torch.bfloat16 and norm.weight.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------- causal BatchNorm


def causal_bn_reference(x, mask, running_mean, running_var, eps, momentum, min_tokens, weight, bias):
    """Loop over positions in float64: statistics of position t from real tokens at positions <= t only."""
    out = torch.zeros_like(x)
    for t in range(x.shape[1]):
        seen = x[:, : t + 1][mask[:, : t + 1]]
        if seen.shape[0] >= min_tokens:
            mean, var = seen.mean(0), seen.var(0, unbiased=False)
        else:
            mean, var = running_mean, running_var
        out[:, t] = (x[:, t] - mean) / torch.sqrt(var + eps) * weight + bias
    everything = x[mask]
    new_mean = (1 - momentum) * running_mean + momentum * everything.mean(0)
    new_var = (1 - momentum) * running_var + momentum * everything.var(0, unbiased=True)
    return out, new_mean, new_var


@pytest.mark.parametrize("lengths, min_tokens", [((6, 4, 2), 2), ((6,), 2), ((5, 6, 1), 5)])
def test_batchnorm_causal_equals_a_per_position_loop_reference(lengths, min_tokens):
    # The layer computes in fp32 (as batchnorm does); the reference in float64 on the same fp32 inputs. fp32 sums of
    # E[x^2] - E[x]^2 over <= 18 tokens, then one normalisation: ~1e-6 relative, so 1e-5 leaves a margin.
    norm = make("batchnorm_causal", batchnorm_momentum=0.3, batchnorm_causal_min_tokens=min_tokens).train()
    affine(norm)
    with torch.no_grad():
        norm.running_mean.fill_(0.7)  # a non-trivial fallback (and accumulation shift)
        norm.running_var.fill_(2.5)
    x, mask = ragged(batch=len(lengths), lengths=lengths, dtype=torch.float32)
    out, new_mean, new_var = causal_bn_reference(
        x.double(), mask, norm.running_mean.double(), norm.running_var.double(), norm.eps, 0.3, min_tokens,
        norm.weight.detach().double(), norm.bias.detach().double())
    y = norm(x, mask)
    real = mask[..., None].expand_as(y)
    fp32 = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[real].double(), out[real], **fp32)
    torch.testing.assert_close(norm.running_mean.double(), new_mean, **fp32)
    torch.testing.assert_close(norm.running_var.double(), new_var, **fp32)
    # eval: running statistics, per token
    y = norm.eval()(x, mask)
    expected = (x.double() - new_mean) / torch.sqrt(new_var + norm.eps) * norm.weight.double() + norm.bias.double()
    torch.testing.assert_close(y.double(), expected, **fp32)


def test_batchnorm_causal_outputs_and_gradients_at_t_never_depend_on_later_positions():
    norm = make("batchnorm_causal").train()
    affine(norm)
    x, mask = ragged(dtype=torch.float32)
    x.requires_grad_(True)
    t = 2
    state = {k: v.clone() for k, v in norm.state_dict().items()}
    y = norm(x, mask)
    # d y[:, :t+1] / d x[:, t+1:] is exactly zero ...
    (grad,) = torch.autograd.grad((y[:, : t + 1] * torch.randn_like(y[:, : t + 1])).sum(), x)
    assert grad[:, t + 1 :].abs().max() == 0 and grad[:, : t + 1].abs().max() > 0
    # ... and changing the later tokens leaves those outputs bit-identical (from the same running statistics)
    changed = x.detach().clone()
    changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :]) * 10
    norm.load_state_dict(state)
    after = norm(changed, mask)
    torch.testing.assert_close(after[:, : t + 1], y[:, : t + 1].detach(), rtol=0, atol=0)


@pytest.mark.parametrize("norm_type, leaks", [("batchnorm_causal", False), ("batchnorm", True)])
def test_causal_lm_in_train_mode_logits_at_t_ignore_later_tokens_only_with_batchnorm_causal(norm_type, leaks):
    model = causal_lm(norm_type).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(3))
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 13) % 97
    first = model(ids).logits[:, :6]
    model.load_state_dict(state)
    second = model(changed).logits[:, :6]
    assert (first - second).abs().max().item() > 1e-4 if leaks else torch.equal(first, second)


@pytest.mark.parametrize("garbage", [float("inf"), float("nan")])
def test_batchnorm_causal_pad_garbage_changes_no_real_output_or_statistic(garbage):
    x, mask = ragged(dtype=torch.float32, lengths=(6, 3, 1))
    runs = []
    for fill in (0.0, garbage):
        norm = make("batchnorm_causal").train()
        xi = x.masked_fill(~mask[..., None], fill).requires_grad_(True)
        y = norm(xi, mask)
        (y.square() * mask[..., None]).sum().backward()
        assert torch.isfinite(xi.grad).all()
        runs.append((y[mask].detach(), xi.grad[mask], norm.running_mean.clone(), norm.running_var.clone()))
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


# ---------------------------------------------------------------- all three: models, round trips, config


@pytest.mark.parametrize("norm_type", NEW_NORMS)
def test_model_save_load_round_trip_keeps_statistics_fields_and_logits(norm_type, tmp_path):
    extra = {"dyt": {"dyt_alpha_init": 0.6}, "powernorm": {"powernorm_warmup_steps": 1},
             "batchnorm_causal": {"batchnorm_causal_min_tokens": 3}}[norm_type]
    model = causal_lm(norm_type, **extra).train()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        optimiser.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimiser.step()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for key, value in extra.items():
        assert getattr(loaded.config, key) == value
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    if norm_type != "dyt":
        buffer = "running_phi" if norm_type == "powernorm" else "running_mean"
        assert not torch.equal(getattr(loaded.model.layers[0].ffn_norm, buffer),
                               getattr(type(loaded.model.layers[0].ffn_norm)(32), buffer))
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("norm_type, field, value, valid", [
    ("powernorm", "powernorm_alpha_fwd", 1.0, "a number in [0, 1)"),
    ("powernorm", "powernorm_alpha_bkw", -0.1, "a number in [0, 1)"),
    ("powernorm", "powernorm_warmup_steps", -1, "an integer >= 0"),
    ("powernorm", "powernorm_eps", 0.0, "a finite number > 0"),
    ("powernorm", "powernorm_group_scaling", 3, "0 (off) or a divisor of hidden_size=32"),
    ("dyt", "dyt_alpha_init", 0, "a finite number > 0"),
    ("dyt", "dyt_alpha_init", True, "a finite number > 0"),
    ("batchnorm_causal", "batchnorm_causal_min_tokens", 1, "an integer >= 2"),
])
def test_invalid_fields_fail_at_config_construction_naming_valid_values(norm_type, field, value, valid):
    with pytest.raises(ValueError, match=re.escape(f"{field}={value!r} is invalid; valid values: {valid}")):
        tiny_config(norm_type=norm_type, **{field: value})
