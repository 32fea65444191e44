"""Standard transformers behaviour of every hfx head, on tiny models, offline."""

import inspect
import itertools
import json

import pytest
import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForPreTraining,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

import hfx
from tests.conftest import tiny_config

NORMS = ("layernorm", "rmsnorm", "batchnorm")
POSITIONS = ("sinusoidal", "learned", "rotary")
NORM_POSITIONS = ("pre", "post")

AUTO_HEADS = {
    "model": (AutoModel, hfx.HfxModel),
    "masked_lm": (AutoModelForMaskedLM, hfx.HfxForMaskedLM),
    "pretraining": (AutoModelForPreTraining, hfx.HfxForPreTraining),
    "causal_lm": (AutoModelForCausalLM, hfx.HfxForCausalLM),
    "sequence_classification": (AutoModelForSequenceClassification, hfx.HfxForSequenceClassification),
    "token_classification": (AutoModelForTokenClassification, hfx.HfxForTokenClassification),
    "question_answering": (AutoModelForQuestionAnswering, hfx.HfxForQuestionAnswering),
    "multiple_choice": (AutoModelForMultipleChoice, hfx.HfxForMultipleChoice),
}


def padded_batch(batch=3, seq=7, vocab=97, num_choices=None):
    """Random ids with right padding (pad id 0) of different lengths, and the matching mask."""
    shape = (batch, seq) if num_choices is None else (batch, num_choices, seq)
    ids = torch.randint(1, vocab, shape)
    mask = torch.ones_like(ids)
    if num_choices is None:
        mask[1, seq - 2 :] = 0
        mask[2, seq - 4 :] = 0
    else:
        mask[:, 1, seq - 3 :] = 0
    return ids.masked_fill(mask == 0, 0), mask


def head_inputs(head: str):
    if head == "multiple_choice":
        ids, mask = padded_batch(batch=2, num_choices=3)
    else:
        ids, mask = padded_batch()
    return {"input_ids": ids, "attention_mask": mask}


def main_output(out) -> torch.Tensor:
    """The tensor a head is judged by (logits, hidden states, or QA start+end logits)."""
    for name in ("logits", "prediction_logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            value = getattr(out, name)
            if name == "prediction_logits":
                return torch.cat([value.flatten(), out.seq_relationship_logits.flatten()])
            return value
    return torch.cat([out.start_logits, out.end_logits])


def warm_up(model, head):
    """One train-mode forward, so batchnorm running statistics differ from their initial values."""
    model.train()
    with torch.no_grad():
        model(**head_inputs(head))
    model.eval()


COMBOS = list(itertools.product(NORMS, POSITIONS, NORM_POSITIONS))
HEAD_NAMES = list(AUTO_HEADS)
# Each combination is checked with two heads, (i, i + 4) mod 8: every head meets every norm type, and every
# norm x position x norm_position combination is covered, at 36 instead of 144 save/load cycles.
ROUND_TRIPS = [(*combo, (HEAD_NAMES[i % 8], HEAD_NAMES[(i + 4) % 8])) for i, combo in enumerate(COMBOS)]


@pytest.mark.parametrize("norm,position,norm_position,heads", ROUND_TRIPS, ids=["-".join(c) for c in COMBOS])
def test_save_load_round_trip_is_exact_for_every_head(tmp_path, norm, position, norm_position, heads):
    config = tiny_config(
        norm_type=norm, position_embedding_type=position, norm_position=norm_position, num_labels=3, num_hidden_layers=1
    )
    for head in heads:
        auto_class, model_class = AUTO_HEADS[head]
        model = auto_class.from_config(config)
        assert type(model) is model_class
        warm_up(model, head)
        inputs = head_inputs(head)
        with torch.no_grad():
            expected = main_output(model(**inputs))
        folder = tmp_path / head
        model.save_pretrained(folder)
        assert (folder / "model.safetensors").is_file()
        loaded, info = auto_class.from_pretrained(folder, output_loading_info=True)
        assert type(loaded) is model_class
        assert not info["missing_keys"] and not info["unexpected_keys"], (head, info)
        assert not loaded.training
        with torch.no_grad():
            actual = main_output(loaded(**inputs))
        # Equal up to float summation order (BLAS may pick another kernel for mmap'd safetensors weights).
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=head)
        if norm == "batchnorm":
            assert torch.equal(
                model.state_dict()[next(k for k in model.state_dict() if k.endswith("running_var"))],
                loaded.state_dict()[next(k for k in loaded.state_dict() if k.endswith("running_var"))],
            )


@pytest.mark.parametrize("norm_position", NORM_POSITIONS)
def test_output_attentions_and_hidden_states(norm_position):
    config = tiny_config(attention_type="eager", norm_position=norm_position, num_hidden_layers=3)
    model = AutoModel.from_config(config).eval()
    ids, mask = padded_batch()
    out = model(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert len(out.hidden_states) == config.num_hidden_layers + 1  # embeddings, then each layer
    assert len(out.attentions) == config.num_hidden_layers
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    for weights in out.attentions:
        assert weights.shape == (3, config.num_attention_heads, 7, 7)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, config.num_attention_heads, 7))
        # padded keys receive no attention
        assert torch.all(weights[1, :, :, 5:] == 0) and torch.all(weights[2, :, :, 3:] == 0)
    plain = model(ids, attention_mask=mask)
    assert plain.hidden_states is None and plain.attentions is None
    # layer i's output is layer i+1's input: recompute layer 1 from hidden_states[1]
    assert not torch.equal(out.hidden_states[1], out.hidden_states[2])


def test_causal_attentions_are_causal():
    model = AutoModelForCausalLM.from_config(tiny_config(attention_type="eager")).eval()
    out = model(torch.randint(1, 97, (1, 6)), output_attentions=True)
    assert torch.all(out.attentions[0][0].triu(1) == 0)


@pytest.mark.parametrize("head", ["masked_lm", "causal_lm", "pretraining"])
def test_resize_token_embeddings_keeps_old_rows_and_ties(head):
    auto_class, _ = AUTO_HEADS[head]
    model = auto_class.from_config(tiny_config()).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        before = main_output(model(input_ids=ids, attention_mask=mask))
    model.resize_token_embeddings(120)
    assert model.config.vocab_size == 120
    assert model.get_input_embeddings().weight.shape == (120, 32)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    logits = out.logits if head != "pretraining" else out.prediction_logits
    assert logits.shape[-1] == 120
    if head == "pretraining":
        torch.testing.assert_close(logits[..., :97], before[: logits[..., :97].numel()].view_as(logits[..., :97]))
    else:
        torch.testing.assert_close(logits[..., :97], before)
    labels = torch.randint(0, 120, ids.shape)
    assert torch.isfinite(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    model.resize_token_embeddings(80)
    assert model.get_output_embeddings().weight.shape[0] == 80
    if head != "causal_lm":
        assert model.lm_head.bias.shape == (80,)


@pytest.mark.parametrize("tie", [True, False])
def test_tied_embeddings(tmp_path, tie):
    model = AutoModelForCausalLM.from_config(tiny_config(tie_word_embeddings=tie))
    same = model.lm_head.weight is model.model.embeddings.word_embeddings.weight
    assert same == tie
    with torch.no_grad():
        model.lm_head.weight[0].add_(1.0)  # make an untied head distinguishable from the embeddings
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (loaded.lm_head.weight is loaded.model.embeddings.word_embeddings.weight) == tie
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(
        loaded.model.embeddings.word_embeddings.weight, model.model.embeddings.word_embeddings.weight, rtol=0, atol=0
    )
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tie)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_same_loss_and_grads(use_reentrant):
    config = tiny_config(norm_position="pre", position_embedding_type="rotary")
    model = AutoModelForCausalLM.from_config(config).train()
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = loss_and_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.is_gradient_checkpointing and all(layer.gradient_checkpointing for layer in model.model.layers)
    ckpt_loss, ckpt_grads = loss_and_grads()
    torch.testing.assert_close(ckpt_loss, loss, rtol=0, atol=0)
    assert grads.keys() == ckpt_grads.keys()
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


def _has_var_kwargs(fn) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


@pytest.mark.parametrize("head", list(AUTO_HEADS)[1:])
def test_num_items_in_batch_is_honoured_whenever_trainer_passes_it(head):
    """Trainer passes num_items_in_batch (and multiplies by the world size) iff the model accepts loss kwargs;
    such a model must then return sum(loss) / num_items_in_batch, else losses scale with the process count."""
    auto_class, _ = AUTO_HEADS[head]
    model = auto_class.from_config(tiny_config(num_labels=3)).eval()
    inputs = head_inputs(head)
    ids = inputs["input_ids"]
    labels = {
        "masked_lm": ids.masked_fill(inputs["attention_mask"] == 0, -100),
        "causal_lm": ids.masked_fill(inputs["attention_mask"] == 0, -100),
        "pretraining": ids,
        "sequence_classification": torch.tensor([0, 2, 1]),
        "token_classification": torch.randint(0, 3, ids.shape),
        "multiple_choice": torch.tensor([2, 0]),
    }
    if head == "question_answering":
        inputs.update(start_positions=torch.tensor([1, 2, 0]), end_positions=torch.tensor([3, 4, 2]))
    else:
        inputs["labels"] = labels[head]
    accepts = getattr(model, "accepts_loss_kwargs", None)
    if accepts is None:
        accepts = _has_var_kwargs(model.forward)
    with torch.no_grad():
        mean_loss = model(**inputs).loss
        if not accepts:
            return
        if head == "causal_lm":
            n_items = int((inputs["labels"][:, 1:] != -100).sum())
        else:
            n_items = int((inputs["labels"] != -100).sum())
        torch.testing.assert_close(model(**inputs, num_items_in_batch=n_items).loss, mean_loss)
        torch.testing.assert_close(model(**inputs, num_items_in_batch=2 * n_items).loss, mean_loss / 2)


def _toy_lm_dataset(n=32, seq=12):
    """A deterministic pattern (counting mod 10) that a tiny causal LM learns in a few steps."""
    rows = []
    for i in range(n):
        ids = [(i + j) % 10 + 1 for j in range(seq)]
        rows.append({"input_ids": ids, "attention_mask": [1] * seq, "labels": ids})
    return rows


def test_trainer_steps_reduce_loss(tmp_path):
    from transformers import Trainer, TrainingArguments, default_data_collator

    model = AutoModelForCausalLM.from_config(tiny_config(norm_type="batchnorm", norm_position="pre"))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_steps=12,
        logging_steps=3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_toy_lm_dataset(), data_collator=default_data_collator)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 4
    assert losses[-1] < 0.6 * losses[0], losses


def test_device_map_auto(tmp_path):
    model = AutoModelForMaskedLM.from_config(tiny_config(norm_type="batchnorm")).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path, device_map="auto")
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert loaded.lm_head.decoder.weight is loaded.model.embeddings.word_embeddings.weight
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)


def test_4bit_quantisation_of_block_linears_on_cpu(tmp_path, bnb_cpu_bf16):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    from hfx.quantization import pin_bnb_cpu_path

    config = tiny_config(hidden_size=64, intermediate_size=128, num_attention_heads=4)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    linears = {name: type(m) for name, m in loaded.named_modules() if isinstance(m, nn.Linear)}
    block = {n: t for n, t in linears.items() if ".layers." in n}
    assert len(block) == config.num_hidden_layers * 6  # q, k, v, o, up, down
    assert all(t is bnb.nn.Linear4bit for t in block.values()), block
    assert linears["lm_head"] is nn.Linear  # the output projection stays in full precision
    assert pin_bnb_cpu_path(loaded) == "dequantize (float32)"
    with torch.no_grad():
        actual = loaded(input_ids=ids, attention_mask=mask).logits
    assert actual.shape == expected.shape and torch.isfinite(actual).all()
    cos = nn.functional.cosine_similarity(actual.flatten(), expected.flatten(), dim=0)
    assert cos > 0.95, cos  # NF4 rounding of the weights: close to the fp32 model, not equal
    assert not torch.equal(actual, expected)
    # ... and exactly the model of the dequantised weights, in fp32 (bf16 compute would be ~1e-2 off).
    dequantised = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    dequantised = dequantised.dequantize(dtype=torch.float32).eval()
    with torch.no_grad():
        reference = dequantised(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(actual, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("position,norm", list(zip(POSITIONS, ("batchnorm", "layernorm", "rmsnorm"))))
def test_generate_with_cache_equals_without_cache(position, norm):
    config = tiny_config(position_embedding_type=position, norm_type=norm, norm_position="pre", eos_token_id=None)
    model = AutoModelForCausalLM.from_config(config)
    warm_up(model, "causal_lm")
    ids = torch.randint(1, 97, (2, 5))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding, as for batched generation
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (2, 11)
    assert torch.equal(cached, uncached)
    # the left-padded row generates exactly what the unpadded prompt generates alone
    alone = model.generate(ids[:1, 2:], max_new_tokens=6, do_sample=False)
    assert torch.equal(cached[0, 2:], alone[0])
    # and greedy decoding by hand, one full forward per token, agrees
    seq = ids[1:]
    for _ in range(6):
        with torch.no_grad():
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached[1:], seq)


def test_attention_type_saved_and_used_at_load(tmp_path):
    model = AutoModelForCausalLM.from_config(tiny_config(attention_type="eager"))
    assert model.config._attn_implementation == "eager"
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["attention_type"] == "eager"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config._attn_implementation == "eager"
    overridden = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert overridden.config._attn_implementation == "sdpa"
    assert overridden.config.attention_type == "sdpa"  # what is saved next is what runs
    # the backend really is the one dispatched: eager and sdpa agree numerically
    ids = torch.randint(1, 97, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, overridden(ids).logits, rtol=1e-4, atol=1e-5)


def test_attention_dispatch_goes_through_attention_interface():
    from transformers import AttentionInterface

    calls = []

    def counting(module, query, key, value, attention_mask, **kwargs):
        calls.append(query.shape)
        return hfx.attention.eager_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("hfx_test_counting", counting)
    model = AutoModel.from_config(tiny_config(), attn_implementation="hfx_test_counting")
    model(torch.randint(1, 97, (2, 5)))
    assert calls == [(2, 4, 5, 8)] * 2
