"""PEFT's LoRA variants through hfx finetune: each trains, saves, loads on the original base and merges.

PiSSA / OLoRA / CorDA rewrite the base weights at initialisation; the adapter hfx saves is PEFT's
converted one, so loading the ORIGINAL base folder plus that adapter must give the trained model.
"""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import hfx
from hfx.finetune import FinetuneConfig, TargetModulesError, finetune
from hfx.finetune.model import build_skeleton, check_target_modules
from hfx.tokenizer import train_tokenizer

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Two fp32 evaluations of one function by different association orders (W_res + s*AB against
# W + s*(AB - A0B0), or a merged weight): rounding ~1e-7 relative per op, a few hundred ops deep here.
FP32_TOL = 1e-5
STEPS = 3  # enough for the loss to fall at learning rate 2e-2; each run costs its fixed start-up more than its steps
IDS = torch.tensor([[3, 9, 14, 20, 7, 11]])


def rows(n=32):
    return [{"prompt": f"say {i % 10}", "completion": WORDS[i % 10]} for i in range(n)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer([f"{r['prompt']} {r['completion']}" for r in rows(20)], vocab_size=100, save_dir=path)
    return path


def _save(model, tok_dir, path):
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.2)
    torch.manual_seed(0)
    return _save(LlamaForCausalLM(config), tok_dir, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def base_logits(llama):
    """The untrained base's logits on IDS, computed once for the module."""
    return logits(AutoModelForCausalLM.from_pretrained(llama), IDS)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    return str(path)


def run(model, data, output, **overrides):
    base = dict(model=model, data=data, output=str(output), max_steps=STEPS, batch_size=8, logging_steps=1,
                save_steps=100, lora_r=4, lora_alpha=8, learning_rate=2e-2, warmup_ratio=0.0, lora_dropout=0.0,
                extra_training_args={"disable_tqdm": True})
    base.update(overrides)
    return finetune(FinetuneConfig(**base))


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


# One run per PEFT code path; flags that only change a formula (rslora's scale) ride along with another.
VARIANTS = {
    "dora+rslora": dict(use_dora=True, use_rslora=True),
    "dora+qlora": dict(use_dora=True, method="qlora", compute_dtype="float32", gradient_checkpointing=False),
    "pissa+modules_to_save": dict(init_lora_weights="pissa_niter_2", modules_to_save=["lm_head"]),
    "olora": dict(init_lora_weights="olora"),
    "eva": dict(init_lora_weights="eva", batch_size=32),  # one calibration batch: EVA's SVD converges at once
    "corda": dict(init_lora_weights="corda"),
}
CONVERTED = ("pissa+modules_to_save", "olora", "corda")  # base-changing inits: the adapter is saved at rank 2r


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_round_trips_and_merges(tmp_path, llama, base_logits, data_file, variant):
    result = run(llama, data_file, tmp_path / variant, merge=True, **VARIANTS[variant])
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert len(losses) == STEPS and losses[-1] < losses[0]
    ids = IDS
    trained = logits(result.model, ids)
    scale = trained.abs().max().item()
    saved = json.loads((Path(result.saved_dir) / "adapter_config.json").read_text())
    assert saved["r"] == (8 if variant in CONVERTED else 4)
    if variant in CONVERTED:
        assert saved["init_lora_weights"] is True  # plain LoRA on the original base
    if "modules_to_save" in VARIANTS[variant]:
        assert any("lm_head" in k for k in load_file(Path(result.saved_dir) / "adapter_model.safetensors"))
    if variant != "dora+qlora":  # a 4-bit base differs from the fp32 one; its merge is dequantised first
        # the ORIGINAL base folder (never the residual one) plus the saved adapter is the trained model
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), result.saved_dir)
        torch.testing.assert_close(logits(reloaded, ids), trained, rtol=0, atol=FP32_TOL * scale)
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, ids), trained, rtol=0, atol=FP32_TOL * scale)
    assert (trained - base_logits).abs().max() > 100 * FP32_TOL * scale  # training moved the model


@pytest.mark.parametrize("init", ["gaussian", "orthogonal"])
def test_init_only_variants_reach_peft_and_train(llama, init):
    """Inits that leave the base alone and save as plain LoRA: PEFT's init is applied, and the adapter learns."""
    from hfx.finetune.model import add_lora

    config = FinetuneConfig(model=llama, data="d", output="o", lora_r=4, lora_alpha=8, init_lora_weights=init)
    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(llama), config, "causal-lm")
    a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    if init == "gaussian":  # PEFT: A ~ N(0, 1/r), B = 0
        assert torch.count_nonzero(b) == 0 and 0.25 < a.std().item() < 0.75
    else:  # PEFT: A and B from rows of one orthogonal matrix: both non-zero, B A = 0 (a no-op at the start)
        assert torch.count_nonzero(a) > 0 and torch.count_nonzero(b) > 0
        torch.testing.assert_close(b @ a, torch.zeros(b.shape[0], a.shape[1]), rtol=0, atol=FP32_TOL)
    ids = torch.tensor([[3, 9, 14, 20, 7, 11], [5, 8, 12, 30, 4, 2]])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_lora_on_moe_expert_parameters(tmp_path, tok_dir, data_file):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = hfx.HfxConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64, is_decoder=True, ffn_type="moe", num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=16, router_aux_loss_coef=0.0,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id, initializer_range=0.2)
    torch.manual_seed(0)
    model_dir = _save(hfx.HfxForCausalLM(config), tok_dir, tmp_path / "moe")
    from hfx.peft_integration import moe_target_parameters

    result = run(model_dir, data_file, tmp_path / "out", target_modules=["q_proj"], lora_dropout=None,  # 0 here
                 target_parameters=",".join(moe_target_parameters(config)), merge=True)
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert losses[-1] < losses[0]
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert any("experts" in n for n in trainable) and all("lora_" in n for n in trainable)
    trained = logits(result.model, IDS)
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    torch.testing.assert_close(logits(merged, IDS), trained, rtol=0, atol=FP32_TOL * trained.abs().max().item())


REFUSED = [
    (dict(method="full", use_dora=True), r"use_dora=True needs an adapter method.*for it: \['lora', 'qlora', 'int8'\]"),
    (dict(method="full", use_dora=True, use_rslora=True),
     r"use_dora=True, use_rslora=True need an adapter method.*for them: \['lora', 'qlora', 'int8'\]"),
    (dict(init_lora_weights="pisa"), r"init_lora_weights='pisa' is invalid; valid values: \['default'.*"
                                     r"did you mean 'pissa'\?$"),
    (dict(init_lora_weights="svd"), r"init_lora_weights='svd' is invalid; valid values: \['default', 'gaussian'"),
    (dict(init_lora_weights="pissa_niter_0"), r"init_lora_weights='pissa_niter_0' is invalid"),
    (dict(init_lora_weights="pissa", method="qlora"), r"'pissa' is invalid with method='qlora'.*\['lora'\]"),
    (dict(init_lora_weights="olora", method="int8"), r"'olora' is invalid with method='int8'.*\['lora'\]"),
    (dict(init_lora_weights="corda", use_dora=True), r"use_dora=True is invalid with init_lora_weights='corda'"),
    pytest.param(dict(use_dora=True, method="int8"), r"use_dora=True is invalid with method='int8' on the CPU.*"
                 r"\['lora', 'qlora'\]", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CPU refusal")),
    (dict(init_lora_weights="orthogonal", lora_r=5), r"'orthogonal' needs an even lora_r, got 5"),
    (dict(target_parameters="experts.down_proj", use_dora=True), r"use_dora=True is invalid with target_parameters"),
    (dict(target_parameters="experts.down_proj", lora_dropout=0.1), r"lora_dropout=0.1 is invalid with target_param"),
    (dict(target_parameters="experts.down_proj", init_lora_weights="eva"),
     r"init_lora_weights='eva' is invalid with target_parameters; valid values: \['default', 'gaussian'\]"),
    (dict(init_lora_weights="loftq", method="qlora"), r"'loftq' is invalid with method='qlora'.*\['lora'\]"),
    (dict(init_lora_weights="loftq", merge=True), r"merge=True is invalid with init_lora_weights='loftq'"),
    (dict(modules_to_save=" , "), r"modules_to_save=' , ' names no module; give comma-separated names"),
    (dict(target_parameters=","), r"target_parameters=',' names no parameter; give comma-separated names"),
]


def test_target_parameters_default_to_no_dropout():
    """PEFT's LoRA on parameters takes no dropout: without a lora_dropout given, it is 0 there, 0.05 elsewhere."""
    assert FinetuneConfig(model="m", data="d", output="o", target_parameters="experts.down_proj").lora_dropout == 0.0
    assert FinetuneConfig(model="m", data="d", output="o").lora_dropout == 0.05
    assert FinetuneConfig(model="m", data="d", output="o", lora_dropout=0.1).lora_dropout == 0.1
    from hfx.cli import build_parser

    args = build_parser(["finetune"]).parse_args(["finetune", "--target-parameters", "experts.down_proj"])
    assert args.lora_dropout is None  # not typed: FinetuneConfig chooses


@pytest.mark.parametrize("overrides,message", REFUSED)
def test_bad_combinations_refused_before_loading(overrides, message):
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(model="m", data="d", output="o", **overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_loftq_refused_on_cpu():
    with pytest.raises(ValueError, match="'loftq' needs a CUDA GPU.*valid values on this machine"):
        FinetuneConfig(model="m", data="d", output="o", init_lora_weights="loftq")


def test_unknown_parameters_and_modules_named_with_the_existing_ones(llama):
    from transformers import AutoConfig

    skeleton = build_skeleton(AutoModelForCausalLM, AutoConfig.from_pretrained(llama))
    bad = FinetuneConfig(model=llama, data="d", output="o", target_parameters="experts.down_proj")
    with pytest.raises(TargetModulesError, match=r"\['experts.down_proj'\] match no parameter.*Parameters outside"):
        check_target_modules(bad, skeleton)
    with pytest.raises(TargetModulesError, match=r"modules_to_save \['head'\] match no module.*'lm_head'"):
        check_target_modules(FinetuneConfig(model=llama, data="d", output="o", modules_to_save="head"), skeleton)
    quantised = FinetuneConfig(model=llama, data="d", output="o", method="qlora", modules_to_save="lm_head,o_proj")
    with pytest.raises(TargetModulesError, match=r"modules_to_save \['o_proj'\] are linear layers that "
                                                 r"method='qlora' quantises"):
        check_target_modules(quantised, skeleton)
    check_target_modules(FinetuneConfig(model=llama, data="d", output="o", method="int8", modules_to_save="lm_head"),
                         skeleton)  # the head is never quantised
    both = FinetuneConfig(model=llama, data="d", output="o", target_modules="q_proj", modules_to_save="q_proj")
    with pytest.raises(TargetModulesError, match=r"\['q_proj'\] are both in target_modules and in modules_to_save"):
        check_target_modules(both, skeleton)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="PEFT's LoftQ quantisation needs CUDA")
def test_loftq_trains_on_gpu(tmp_path, llama, data_file):
    result = run(llama, data_file, tmp_path / "loftq", init_lora_weights="loftq")
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert losses[-1] < losses[0]
    saved = json.loads((Path(result.saved_dir) / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "loftq" and saved["loftq_config"]["loftq_bits"] == 4


def test_resume_compares_the_variant_fields_and_accepts_older_run_files(tmp_path):
    from hfx.finetune.train import RUN_FILE, OutputDirError, check_output_dir

    saved = FinetuneConfig(model="m", data="d", output=str(tmp_path), modules_to_save="lm_head,norm")
    record = json.loads(saved.to_json())
    (tmp_path / RUN_FILE).write_text(json.dumps(record))
    same = dict(model="m", data="d", output=str(tmp_path), resume=True)
    check_output_dir(FinetuneConfig(**same, modules_to_save="norm,lm_head"))  # order does not matter
    with pytest.raises(OutputDirError, match=r"use_dora: saved False, requested True"):
        check_output_dir(FinetuneConfig(**same, modules_to_save="lm_head,norm", use_dora=True))
    for name in ("use_dora", "use_rslora", "init_lora_weights", "target_parameters", "modules_to_save"):
        record.pop(name)  # a run file written before these fields existed: it used today's defaults
    (tmp_path / RUN_FILE).write_text(json.dumps(record))
    check_output_dir(FinetuneConfig(**same))
    with pytest.raises(OutputDirError, match=r"init_lora_weights: saved 'default', requested 'olora'"):
        check_output_dir(FinetuneConfig(**same, init_lora_weights="olora"))
