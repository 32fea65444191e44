"""ffn_type="moe": routed top-k experts plus shared experts, dispatched through transformers' ExpertsInterface.

References are a per-token python loop in float64 and the Switch / z-loss formulas written out by hand.
fp32 tolerance: unit roundoff 2**-24 times dot products of length <= 64 through two projections and the routing
weights gives ~1e-5 of the output's magnitude; outputs here are O(0.1..1).
"""

import math

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoModelForCausalLM

import hfx
from hfx_ffn.dense import DenseFeedForward
from hfx_ffn.moe import MoEFeedForward, MlpExperts, SwiGLUExperts, TopKRouter
from tests.conftest import tiny_config

IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def test_moe_is_found_through_its_installed_entry_point():
    from hfx.registry import registry

    assert registry.get("ffn", "moe").factory.__module__ == "hfx_ffn.moe"
FP32_TOL = 1e-5


def moe_config(**overrides):
    base = dict(ffn_type="moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    base.update(overrides)
    return tiny_config(**base)


def initialised_moe(config, implementation="eager"):
    config._experts_implementation = implementation
    module = MoEFeedForward(config)
    torch.manual_seed(1)
    for param in module.parameters():
        torch.nn.init.normal_(param, std=0.3)  # larger than the model init, so routing is far from ties
    return module


def loop_reference(module, x):
    """Float64, one token at a time, straight from the definition."""
    config_type = "swiglu" if isinstance(module.experts, SwiGLUExperts) else "mlp"
    params = {name: p.detach().double() for name, p in module.named_parameters()}
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        token = x[t].double()
        probs = torch.softmax(params["router.weight"] @ token, dim=-1)
        chosen = sorted(range(module.num_experts), key=lambda e: -probs[e].item())[: module.top_k]
        weights = probs[chosen]
        if module.norm_topk_prob:
            weights = weights / weights.sum()
        for e, w in zip(chosen, weights):
            if config_type == "swiglu":
                gate_up = params["experts.gate_up_proj"][e] @ token
                gate, up = gate_up[: gate_up.shape[0] // 2], gate_up[gate_up.shape[0] // 2:]
                out[t] += w * (params["experts.down_proj"][e] @ (F.silu(gate) * up))
            else:
                hidden = F.gelu(params["experts.up_proj"][e] @ token + params["experts.up_proj_bias"][e])
                out[t] += w * (params["experts.down_proj"][e] @ hidden + params["experts.down_proj_bias"][e])
        if module.shared_experts is not None:
            if config_type == "swiglu":
                g = params["shared_experts.gate_proj.weight"] @ token
                u = params["shared_experts.up_proj.weight"] @ token
                out[t] += params["shared_experts.down_proj.weight"] @ (F.silu(g) * u)
            else:
                h = F.gelu(params["shared_experts.up_proj.weight"] @ token + params["shared_experts.up_proj.bias"])
                out[t] += params["shared_experts.down_proj.weight"] @ h + params["shared_experts.down_proj.bias"]
    return out


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("expert_type,shared,norm", [("mlp", 1, True), ("mlp", 0, False), ("swiglu", 2, True)])
def test_equals_a_per_token_loop_reference(implementation, expert_type, shared, norm):
    config = moe_config(moe_expert_type=expert_type, num_shared_experts=shared, norm_topk_prob=norm)
    module = initialised_moe(config, implementation)
    x = torch.randn(2, 6, config.hidden_size)
    out = module(x)
    reference = loop_reference(module, x.reshape(-1, config.hidden_size)).reshape(x.shape)
    assert out.shape == x.shape
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=FP32_TOL * reference.abs().max().item())


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_top1_with_one_expert_equals_the_dense_ffn(implementation):
    config = moe_config(num_experts=1, num_experts_per_tok=1, moe_intermediate_size=None)
    module = initialised_moe(config, implementation)
    dense = DenseFeedForward(config.hidden_size, config.intermediate_size, config.hidden_act)
    with torch.no_grad():
        dense.up_proj.weight.copy_(module.experts.up_proj[0])
        dense.up_proj.bias.copy_(module.experts.up_proj_bias[0])
        dense.down_proj.weight.copy_(module.experts.down_proj[0])
        dense.down_proj.bias.copy_(module.experts.down_proj_bias[0])
    x = torch.randn(3, 5, config.hidden_size)
    expected = dense(x)
    torch.testing.assert_close(module(x), expected, rtol=0, atol=FP32_TOL * expected.abs().max().item())


def test_aux_loss_is_the_switch_formula_over_real_tokens_averaged_over_moe_layers():
    config = moe_config(num_hidden_layers=3, first_k_dense_replace=1, router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    module = initialised_moe(config).train()
    x = torch.randn(2, 5, config.hidden_size)
    padding_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    module(x, padding_mask=padding_mask)
    aux = module.hfx_auxiliary()
    # By hand, over the 8 real tokens only.
    real = x[padding_mask].double()
    logits = real @ module.router.weight.detach().double().T
    probs = torch.softmax(logits, dim=-1)
    counts = torch.zeros(4, dtype=torch.float64)
    for row in probs:
        for e in row.argsort(descending=True)[:2]:
            counts[e] += 1
    assert aux.stats["expert_counts"].tolist() == counts.tolist()
    assert counts.sum() == 8 * 2  # padding never counts
    switch = 4 * ((counts / counts.sum()) * probs.mean(0)).sum()
    z = torch.logsumexp(logits, dim=-1).square().mean()
    n_moe_layers = 2  # 3 layers, the first dense
    expected = (0.1 * switch + 0.01 * z) / n_moe_layers
    assert aux.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert aux.stats["balance_loss"].item() == pytest.approx(switch.item(), rel=1e-5)
    # Eval mode reports the same stats but adds no loss.
    module.eval()
    module(x, padding_mask=padding_mask)
    assert module.hfx_auxiliary().loss is None
    assert module.hfx_auxiliary().stats["expert_counts"].tolist() == counts.tolist()


def test_gradient_reaches_the_router():
    # Through the LM path: top-2 weights depend on the router's probabilities.
    config = moe_config(router_aux_loss_coef=0.0)
    module = initialised_moe(config).train()
    module(torch.randn(2, 4, config.hidden_size)).square().sum().backward()
    assert module.router.weight.grad.abs().sum() > 0
    # Top-1 renormalised has weight 1: the LM path gives the router nothing, only the balance loss teaches it.
    config = moe_config(num_experts_per_tok=1, router_aux_loss_coef=0.0)
    module = initialised_moe(config).train()
    module(torch.randn(2, 4, config.hidden_size)).square().sum().backward()
    assert module.router.weight.grad.abs().sum() == 0
    config = moe_config(num_experts_per_tok=1, router_aux_loss_coef=0.01)
    module = initialised_moe(config).train()
    out = module(torch.randn(2, 4, config.hidden_size))
    (out.square().sum() + module.hfx_auxiliary().loss).backward()
    assert module.router.weight.grad.abs().sum() > 0


def test_first_k_dense_replace_and_router_logits():
    config = moe_config(first_k_dense_replace=1, output_router_logits=True)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert isinstance(model.model.layers[0].ffn, DenseFeedForward)
    assert isinstance(model.model.layers[1].ffn, MoEFeedForward)
    ids = torch.randint(1, 97, (2, 7))
    out = model(ids)
    assert len(out.router_logits) == 1 and out.router_logits[0].shape == (14, 4)
    chosen = out.router_logits[0].topk(2, dim=-1).indices
    assert out.aux_stats["expert_counts"].shape == (1, 4)
    assert out.aux_stats["expert_counts"][0].tolist() == torch.bincount(chosen.flatten(), minlength=4).float().tolist()


def test_save_load_round_trip_in_transformers_layout(tmp_path):
    config = moe_config(num_shared_experts=1)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "model.safetensors")
    prefix = "model.layers.0.ffn."
    assert saved[prefix + "experts.up_proj"].shape == (4, 16, 32)
    assert saved[prefix + "experts.up_proj_bias"].shape == (4, 16)
    assert saved[prefix + "experts.down_proj"].shape == (4, 32, 16)
    assert saved[prefix + "experts.down_proj_bias"].shape == (4, 32)
    assert saved[prefix + "router.weight"].shape == (4, 32)
    ids = torch.randint(1, 97, (2, 9))
    model.set_experts_implementation("eager")
    expected = model(ids).logits
    for implementation in IMPLEMENTATIONS:
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=implementation)
        assert loaded.config._experts_implementation == implementation
        assert loaded.config.num_experts == 4 and loaded.config.moe_intermediate_size == 16
        logits = loaded(ids).logits
        if implementation == "eager":
            assert torch.equal(logits, expected)  # same kernel, same weights: bit-identical
        torch.testing.assert_close(logits, expected, rtol=0, atol=FP32_TOL * expected.abs().max().item())


def test_swiglu_experts_use_the_gated_stacked_layout():
    model = AutoModelForCausalLM.from_config(moe_config(moe_expert_type="swiglu", num_shared_experts=1))
    names = dict(model.named_parameters())
    assert names["model.layers.0.ffn.experts.gate_up_proj"].shape == (4, 32, 32)
    assert names["model.layers.0.ffn.experts.down_proj"].shape == (4, 32, 16)
    assert not any(name.endswith("_bias") for name in names if ".experts." in name)


def test_4bit_loading_keeps_experts_and_router_in_their_dtype(tmp_path):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    from hfx.quantization import pin_bnb_cpu_path

    config = moe_config(num_shared_experts=1, hidden_size=64, moe_intermediate_size=32, intermediate_size=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    pin_bnb_cpu_path(quantized)
    ffn = quantized.model.layers[0].ffn
    assert isinstance(ffn.shared_experts.up_proj, bnb.nn.Linear4bit)
    assert isinstance(quantized.model.layers[0].attention.q_proj, bnb.nn.Linear4bit)
    assert isinstance(ffn.router, TopKRouter) and isinstance(ffn.experts, MlpExperts)
    original = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name in ("experts.up_proj", "experts.down_proj_bias", "router.weight"):
        q, o = ffn.get_parameter(name), original.model.layers[0].ffn.get_parameter(name)
        assert q.dtype == torch.float32 and torch.equal(q, o)
    ids = torch.randint(1, 97, (2, 6))
    with torch.no_grad():
        logits = quantized(ids).logits
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)).dequantize(
        dtype=torch.float32)
    torch.testing.assert_close(logits, reference(ids).logits, rtol=0, atol=FP32_TOL * logits.abs().max().item())


def test_lora_on_expert_parameters_trains_and_merges():
    from peft import LoraConfig, get_peft_model

    from hfx.peft_integration import moe_target_parameters

    config = moe_config(router_aux_loss_coef=0.0)
    assert moe_target_parameters(config) == ["experts.up_proj", "experts.down_proj"]
    assert moe_target_parameters(moe_config(moe_expert_type="swiglu"))[0] == "experts.gate_up_proj"
    with pytest.raises(ValueError, match="ffn_type='dense'"):
        moe_target_parameters(tiny_config())
    model = AutoModelForCausalLM.from_config(config)
    peft_model = get_peft_model(model, LoraConfig(
        r=4, lora_alpha=8, target_modules=[], target_parameters=moe_target_parameters(config)))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("experts" in n for n in trainable)
    ids = torch.randint(1, 97, (4, 12))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-2)
    peft_model.train()
    losses = []
    for _ in range(10):
        loss = peft_model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1  # only the expert adapters move; ~0.2 in 10 steps
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(ids).logits
        merged = peft_model.merge_and_unload()(ids).logits
    assert isinstance(merged, torch.Tensor)
    torch.testing.assert_close(merged, adapted, rtol=0, atol=FP32_TOL * adapted.abs().max().item())


def test_trainer_loss_includes_exactly_the_aux_loss_and_the_callback_logs_expert_load(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from hfx_ffn.moe import ExpertLoadCallback

    model = AutoModelForCausalLM.from_config(moe_config(num_hidden_layers=2, router_aux_loss_coef=0.5,
                                                        router_z_loss_coef=0.1)).train()
    no_aux = AutoModelForCausalLM.from_config(moe_config(num_hidden_layers=2, router_aux_loss_coef=0.0,
                                                         router_z_loss_coef=0.0)).train()
    no_aux.load_state_dict(model.state_dict())
    ids = torch.randint(1, 97, (4, 8))
    rows = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                             report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    batch = {"input_ids": ids[:2], "labels": ids[:2]}
    with_aux, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    without = Trainer(model=no_aux, args=args).compute_loss(no_aux, batch)
    assert outputs.aux_loss > 0
    assert (with_aux - without).item() == pytest.approx(outputs.aux_loss.item(), rel=1e-5)
    # The model's aux loss is the mean over its 2 MoE layers of coef * balance + z_coef * z (stats are unweighted).
    stats = outputs.aux_stats
    by_formula = (0.5 * stats["balance_loss"] + 0.1 * stats["router_z_loss"]).mean()
    assert outputs.aux_loss.item() == pytest.approx(by_formula.item(), rel=1e-6)

    callback = ExpertLoadCallback()
    trainer.callback_handler.callbacks.insert(0, callback)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "moe_max_load" in entry]
    assert [entry["step"] for entry in logged] == [1, 2]
    for record in callback.history:
        counts = torch.tensor(record["expert_counts"])
        assert counts.shape == (2, 4)
        assert (counts.sum(dim=-1) == 2 * 8 * 2).all()  # batch 2 x 8 tokens x top-2, per MoE layer
        share = counts / counts.sum(dim=-1, keepdim=True)
        assert record["moe_max_load"] == pytest.approx(float((share * 4).max()), rel=1e-6)
        assert record["moe_aux_loss"] > 0


@pytest.mark.parametrize("overrides,field,valid", [
    (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok=5", "[1, num_experts=4]"),
    (dict(num_experts=0), "num_experts=0", ">= 1"),
    (dict(num_shared_experts=-1), "num_shared_experts=-1", ">= 0"),
    (dict(moe_expert_type="geglu"), "moe_expert_type='geglu'", "['mlp', 'swiglu']"),
    (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef=-0.1", ">= 0"),
    (dict(router_z_loss_coef=math.inf), "router_z_loss_coef=inf", "finite"),
    (dict(first_k_dense_replace=2), "first_k_dense_replace=2", "[0, num_hidden_layers=2)"),
    (dict(moe_intermediate_size=0), "moe_intermediate_size=0", "None"),
    (dict(norm_topk_prob="yes"), "norm_topk_prob='yes'", "True or False"),
])
def test_bad_values_fail_at_config_construction(overrides, field, valid):
    with pytest.raises(ValueError) as error:
        moe_config(**overrides)
    assert field in str(error.value) and valid in str(error.value)


def test_defaults_are_filled_and_saved(tmp_path):
    config = tiny_config(ffn_type="moe")
    assert (config.num_experts, config.num_experts_per_tok, config.num_shared_experts) == (8, 2, 0)
    assert config.moe_intermediate_size is None and config.moe_expert_type == "mlp"
    config.save_pretrained(tmp_path)
    again = hfx.HfxConfig.from_pretrained(tmp_path)
    assert again.router_aux_loss_coef == 0.01 and again.first_k_dense_replace == 0


def test_gradient_checkpointing_keeps_the_aux_loss_gradient():
    """Non-reentrant checkpointing recomputes the block; the aux loss read from module state must still backprop."""
    model = AutoModelForCausalLM.from_config(moe_config(router_aux_loss_coef=0.5, router_z_loss_coef=0.1)).train()
    ids = torch.randint(1, 97, (2, 8))

    def gradients():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.gradient_checkpointing_enable()
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and "model.layers.0.ffn.router.weight" in plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6 * plain[name].abs().max().item())
