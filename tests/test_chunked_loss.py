"""hfx.finetune.loss: the chunked causal-LM loss against the plain ``model(labels=...)`` loss.

Tolerances (fp32): the chunked loss runs the same log-softmax per row as the plain one, but the head's
matmul over the labelled rows alone may round each logit differently (another BLAS blocking) and the sum
runs in another order: a few ulp of the loss, so 1e-6 absolute plus 1e-6 relative (ulp(7.0) = 4.8e-7).
Gradients are sums of products of O(1) terms: 1e-5.
"""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    Gemma2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import hfx
from hfx.finetune import FinetuneConfig, finetune
from hfx.finetune.loss import (
    EXACT_ARCHITECTURES,
    check_chunked_loss,
    chunked_forward,
    config_blocker,
    head_blocker,
    labelled_loss,
    requested_sharding_engine,
    shifted_labels,
    use_chunked_loss,
)
from tests.test_finetune import hfx_causal, run_config, task_file, tokenizer_dir  # noqa: F401 (fixtures)

VOCAB = 97
LOSS_TOL = dict(atol=1e-6, rtol=1e-6)
GRAD_TOL = 1e-5


def hfx_model(**overrides):
    config = hfx.HfxConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, is_decoder=True, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, **overrides)
    torch.manual_seed(0)
    return hfx.HfxForCausalLM(config)


STOCK = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def stock_model(name):
    config_class, model_class = STOCK[name]
    config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.2)
    torch.manual_seed(0)
    return model_class(config)


def completion_batch():
    """Three rows: a prompt of 12 unlabelled tokens, a completion, the middle row padded after 25 tokens."""
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 36))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    labels = ids.clone()
    labels[:, :12] = -100
    labels[mask == 0] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def loss_and_grads(model, batch, chunked, num_items=None, adds_aux=False):
    model.zero_grad()
    kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
    if chunked:
        outputs = chunked_forward(model, {**batch, **kwargs}, adds_aux, chunk_rows=7)  # several chunks
    else:
        outputs = model(**batch, **kwargs)
    outputs.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return outputs.loss.detach(), grads


def assert_same_as_plain(model, adds_aux=False):
    batch = completion_batch()
    labelled = int((shifted_labels(batch["labels"]) != -100).sum())
    for num_items in (None, torch.tensor(labelled + 17)):  # a per-batch mean, and Trainer's accumulated count
        plain, plain_grads = loss_and_grads(model, batch, False, num_items)
        chunked, chunked_grads = loss_and_grads(model, batch, True, num_items, adds_aux)
        torch.testing.assert_close(chunked, plain, **LOSS_TOL)
        assert chunked_grads.keys() == plain_grads.keys() and plain_grads
        for name, grad in plain_grads.items():
            assert (chunked_grads[name] - grad).abs().max() <= GRAD_TOL, name


@pytest.mark.parametrize("overrides", [{}, {"memory_length": 8, "position_embedding_type": "xl_relative",
                                           "attention_type": "eager"}], ids=["rotary", "segment-memory"])
def test_hfx_model_equals_plain_loss(overrides):
    model = hfx_model(**overrides)
    assert_same_as_plain(model, adds_aux=EXACT_ARCHITECTURES["hfx"])
    assert model.lm_head.weight is model.model.embeddings.word_embeddings.weight  # the tied head's grad is summed


def test_hfx_moe_adds_the_aux_loss_as_the_model_does():
    model = hfx_model(ffn_type="moe", num_experts=4, num_experts_per_tok=2)
    aux = model(**completion_batch()).aux_loss
    assert aux is not None and aux > 0  # the plain loss includes it, so equality below covers it
    assert_same_as_plain(model, adds_aux=True)
    without = chunked_forward(model, completion_batch(), adds_aux_loss=False).loss
    with_aux = chunked_forward(model, completion_batch(), adds_aux_loss=True).loss
    torch.testing.assert_close(with_aux - without, aux.detach(), **LOSS_TOL)


@pytest.mark.parametrize("name", sorted(STOCK))
def test_stock_architectures_equal_plain_loss(name):
    assert EXACT_ARCHITECTURES[name] is False
    assert_same_as_plain(stock_model(name))


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]])
def test_peft_lora_equals_plain_loss(modules_to_save):
    model = get_peft_model(stock_model("llama"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                            target_modules=["q_proj", "v_proj", "down_proj"],
                                                            modules_to_save=modules_to_save))
    with torch.no_grad():  # B = 0 at init: give the adapters a real contribution to the forward
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    assert head_blocker(model) is None
    if modules_to_save:  # the trained copy of the head: its gradient is the chunked one
        with torch.no_grad():
            model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
        assert model.base_model.model.lm_head.modules_to_save["default"].weight.requires_grad
    assert_same_as_plain(model)


@pytest.mark.parametrize("make", [hfx_model, lambda: stock_model("llama")], ids=["hfx", "llama"])
def test_packed_rows_equal_plain_loss(make):
    """Rows holding several examples (position ids restarting, no attention mask, first label -100), as
    --packing feeds them."""
    model = make()
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 30))
    positions = torch.cat([torch.arange(12), torch.arange(18)]).repeat(2, 1)
    labels = ids.clone()
    labels[:, [0, 12]] = -100
    batch = dict(input_ids=ids, position_ids=positions, labels=labels, use_cache=False)
    for num_items in (None, torch.tensor(60)):
        plain, plain_grads = loss_and_grads(model, batch, False, num_items)
        chunked, chunked_grads = loss_and_grads(model, batch, True, num_items, adds_aux=True)
        torch.testing.assert_close(chunked, plain, **LOSS_TOL)
        for name, grad in plain_grads.items():
            assert (chunked_grads[name] - grad).abs().max() <= GRAD_TOL, name


def test_chunk_size_and_eval_mode_give_the_same_loss():
    model = hfx_model()
    batch = completion_batch()
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    shift = shifted_labels(batch["labels"])
    reference = torch.nn.functional.cross_entropy(model.lm_head(hidden).reshape(-1, VOCAB).float(),
                                                  shift.reshape(-1), ignore_index=-100)
    for rows in (1, 5, 64, 10_000):
        torch.testing.assert_close(labelled_loss(hidden, model.lm_head, shift, chunk_rows=rows), reference, **LOSS_TOL)
    with torch.no_grad():
        torch.testing.assert_close(labelled_loss(hidden, model.lm_head, shift), reference.detach(), **LOSS_TOL)


def test_no_projection_covers_the_whole_batch(monkeypatch):
    """Every vocabulary-sized output is one chunk of labelled rows, in forward and backward alike."""
    model = hfx_model()
    batch = completion_batch()
    labelled = int((shifted_labels(batch["labels"]) != -100).sum())
    shapes = []
    linear = torch.nn.functional.linear

    def recording(x, weight, bias=None):
        out = linear(x, weight, bias)
        if out.shape[-1] == VOCAB:
            shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch.nn.functional, "linear", recording)
    model(**batch).loss.backward()
    assert shapes == [(3, 36, VOCAB)]  # the plain loss: every position
    shapes.clear()
    chunked_forward(model, batch, adds_aux_loss=True, chunk_rows=16).loss.backward()
    assert shapes == [(16, VOCAB)] * (labelled // 16) + [(labelled % 16, VOCAB)] * bool(labelled % 16)


def test_a_frozen_head_gets_no_weight_gradient_computed(monkeypatch):
    """LoRA's case: the head's weight does not require grad, so no (vocab, hidden) gradient is built or kept."""
    import hfx.finetune.loss as loss_module

    asked = []
    real = loss_module._chunked_sum

    def spy(*args):
        asked.append(tuple(args[5]))
        out = real(*args)
        asked.append(tuple(g is not None for g in out[1]))
        return out

    monkeypatch.setattr(loss_module, "_chunked_sum", spy)
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(11, 8)  # frozen
    targets = torch.randint(0, 11, (6,))
    loss_module.linear_cross_entropy_sum(hidden, weight, None, targets, chunk_rows=4).backward()
    assert asked == [(True, False, False), (True, False, False)]
    expected = torch.nn.functional.cross_entropy(hidden.detach() @ weight.t(), targets, reduction="sum")
    hidden_ref = hidden.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(hidden_ref @ weight.t(), targets, reduction="sum").backward()
    torch.testing.assert_close(hidden.grad, hidden_ref.grad)
    assert expected.item() == pytest.approx(real(hidden.detach(), weight, None, targets, 4)[0].item(), rel=1e-6)


def test_no_labelled_position_is_nan_like_the_plain_loss():
    model = hfx_model()
    batch = completion_batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    assert math.isnan(model(**batch).loss.item())
    assert math.isnan(chunked_forward(model, batch, adds_aux_loss=True).loss.item())


def test_only_exact_setups_use_it(tmp_path, caplog):
    softcapped = Gemma2Config(vocab_size=VOCAB, final_logit_softcapping=30.0)
    assert "model_type='gemma2'" in config_blocker("causal-lm", softcapped)
    llama_scaled = LlamaConfig(vocab_size=VOCAB)
    llama_scaled.logit_scale = 0.5
    assert "logit_scale=0.5" in config_blocker("causal-lm", llama_scaled)
    assert "task='seq-cls'" in config_blocker("seq-cls", LlamaConfig(vocab_size=VOCAB))
    assert config_blocker("causal-lm", LlamaConfig(vocab_size=VOCAB)) is None

    def run(**overrides):
        return FinetuneConfig(model="m", data="d", output=str(tmp_path), **overrides)

    with pytest.raises(ValueError, match=r"chunked_loss='on' is invalid here: .*softcapping|model_type='gemma2'"):
        check_chunked_loss(run(chunked_loss="on"), "causal-lm", softcapped)
    check_chunked_loss(run(chunked_loss="auto"), "causal-lm", softcapped)  # auto: plain loss, no error
    with pytest.raises(ValueError, match=r"extra_training_args sets label_smoothing_factor"):
        check_chunked_loss(run(chunked_loss="on", extra_training_args={"label_smoothing_factor": 0.1}), "causal-lm",
                           LlamaConfig(vocab_size=VOCAB))

    lora_head = get_peft_model(stock_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert "not a plain nn.Linear" in head_blocker(lora_head)
    with caplog.at_level("INFO", logger="hfx.finetune"):
        assert use_chunked_loss(run(chunked_loss="auto"), "causal-lm", lora_head) is False
    assert "chunked_loss=auto: using the plain loss because the output head is a" in caplog.text
    with pytest.raises(ValueError, match=r"chunked_loss='on' is invalid here: the output head is a"):
        use_chunked_loss(run(chunked_loss="on"), "causal-lm", lora_head)
    assert use_chunked_loss(run(chunked_loss="auto"), "causal-lm", hfx_model()) is True
    assert use_chunked_loss(run(chunked_loss="off"), "causal-lm", hfx_model()) is False


def test_on_is_refused_before_loading_where_the_head_will_not_be_a_plain_linear(tmp_path, monkeypatch):
    """LoRA on the head, a parameter adapter on its weight, a checkpoint quantised with its head: decided from
    the settings and the meta-device module tree, so the refusal comes before any weight is read."""
    llama = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2)

    def run(**overrides):
        return FinetuneConfig(model="m", data="d", output=str(tmp_path), chunked_loss="on", **overrides)

    with pytest.raises(ValueError, match=r"chunked_loss='on' is invalid here: target_modules \['lm_head'\] put a "
                                         r"LoRA layer on the output head 'lm_head'; valid values: \['auto', 'off'\]"):
        check_chunked_loss(run(method="lora", target_modules=["q_proj", "lm_head"]), "causal-lm", llama)
    with pytest.raises(ValueError, match=r"target_modules \['.\*head'\]"):  # a regular expression too
        check_chunked_loss(run(method="lora", target_modules=[".*head"]), "causal-lm", llama)
    with pytest.raises(ValueError, match=r"target_parameters \['lm_head.weight'\]"):
        check_chunked_loss(run(method="lora", target_parameters=["lm_head.weight"]), "causal-lm", llama)
    quantised = LlamaConfig(**llama.to_dict())
    quantised.quantization_config = {"quant_method": "bitsandbytes", "llm_int8_skip_modules": ["q_proj"]}
    with pytest.raises(ValueError, match=r"quantised with its output head 'lm_head'"):
        check_chunked_loss(run(method="lora"), "causal-lm", quantised)
    quantised.quantization_config["llm_int8_skip_modules"] = ["lm_head"]
    check_chunked_loss(run(method="lora"), "causal-lm", quantised)  # head kept in full precision
    # accepted: the default targets (all-linear leaves the head out), the head trained in full, no adapter
    check_chunked_loss(run(method="lora"), "causal-lm", llama)
    check_chunked_loss(run(method="lora", modules_to_save=["lm_head"]), "causal-lm", llama)
    check_chunked_loss(run(method="full"), "causal-lm", llama)
    # a sharding engine, as accelerate reads its variables ("1", "yes", "true", ...)
    for value in ("1", "yes", "True"):
        monkeypatch.setenv("ACCELERATE_USE_FSDP", value)
        assert requested_sharding_engine() == ("ACCELERATE_USE_FSDP", "FSDP")
        with pytest.raises(ValueError, match=rf"FSDP shards the output head \(ACCELERATE_USE_FSDP={value}\)"):
            check_chunked_loss(run(method="full"), "causal-lm", llama)
    if not torch.cuda.is_available():  # the launch check reads the variables the same way
        from hfx.finetune.train import BackendError, check_sharding_engine

        with pytest.raises(BackendError, match=r"FSDP was requested by the launcher \(ACCELERATE_USE_FSDP=True\)"):
            check_sharding_engine(run(method="full"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert requested_sharding_engine() is None


def test_config_field_is_validated(tmp_path, capsys, hfx_causal):  # noqa: F811
    from hfx.cli import main

    with pytest.raises(SystemExit):
        main(["finetune", "--model", hfx_causal, "--data", "d", "--output", "o", "--chunked-loss", "sometimes"])
    err = capsys.readouterr().err
    assert "--chunked-loss: invalid choice: 'sometimes'" in err and all(v in err for v in ("auto", "on", "off"))
    with pytest.raises(SystemExit) as exit_info:  # the flag reaches FinetuneConfig, checked before any loading
        main(["finetune", "--model", hfx_causal, "--data", "d", "--output", str(tmp_path / "o"), "--task", "seq-cls",
              "--chunked-loss", "on"])
    assert exit_info.value.code == 2
    assert "chunked_loss='on' is invalid with task='seq-cls'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"chunked_loss='yes' is invalid; valid values: \['auto', 'on', 'off'\]"):
        FinetuneConfig(model="m", data="d", output=str(tmp_path), chunked_loss="yes")
    with pytest.raises(ValueError, match=r"chunked_loss='on' is invalid with task='seq-cls'"):
        FinetuneConfig(model="m", data="d", output=str(tmp_path), chunked_loss="on", task="seq-cls")


@pytest.mark.slow  # a whole finetune run
def test_trainer_runs_match_the_plain_loss(hfx_causal, task_file, tmp_path):  # noqa: F811
    """Full fine-tuning with gradient accumulation (Trainer's num_items_in_batch) and an eval split: the same
    logged losses, eval loss and final weights as with the plain loss. SGD, so that a weight moves by
    lr * gradient (Adam would turn a 1e-9 difference of a near-zero gradient into a full step)."""
    results = {}
    for kind in ("auto", "off"):
        config = run_config(hfx_causal, task_file, tmp_path / kind, method="full", chunked_loss=kind, grad_accum=2,
                            batch_size=4, max_steps=2, eval_fraction=0.25, eval_steps=2, optim="sgd",
                            learning_rate=0.05, warmup_ratio=0.0)
        results[kind] = finetune(config)
    chunked, plain = results["auto"], results["off"]
    assert (chunked.loss_kind, plain.loss_kind) == ("chunked", "plain")
    losses = [[entry["loss"] for entry in r.log_history if "loss" in entry] for r in (chunked, plain)]
    assert len(losses[0]) == 2 and losses[0][1] != losses[0][0]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert chunked.eval_loss == pytest.approx(plain.eval_loss, abs=1e-5)
    for (name, a), (_, b) in zip(chunked.model.named_parameters(), plain.model.named_parameters()):
        assert (a - b).abs().max() <= 1e-5, name
