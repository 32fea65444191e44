"""HfxForConditionalGeneration: cached generation, embedding sharing, padding, switches, loss and training."""

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModel, AutoModelForSeq2SeqLM

import hfx
from hfx.auxiliary import Auxiliary, report
from hfx.modeling_hfx_seq2seq import HfxForConditionalGeneration, shift_tokens_right
from hfx.registry import Component, registry
from tests.conftest import tiny_config

torch.set_num_threads(1)

START = 1


def seq2seq_config(**overrides):
    base = dict(
        is_encoder_decoder=True,
        decoder_layers=2,
        num_hidden_layers=1,
        decoder_start_token_id=START,
        type_vocab_size=0,
        tie_word_embeddings=False,
        initializer_range=0.2,  # sharp logits: greedy picks differ from step to step
    )
    base.update(overrides)
    return tiny_config(**base)


def build(**overrides):
    torch.manual_seed(0)
    return HfxForConditionalGeneration(seq2seq_config(**overrides)).eval()


def source_batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 97, (2, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, 5:], attention_mask[1, 5:] = 0, 0  # right padding in the second row
    return input_ids, attention_mask


def greedy_reference(model, input_ids, attention_mask, steps):
    """Greedy decoding by full forwards over the whole target prefix: no cache, no generate()."""
    decoded = torch.full((input_ids.shape[0], 1), START)
    step_logits = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoded).logits[:, -1]
            step_logits.append(logits)
            decoded = torch.cat([decoded, logits.argmax(-1, keepdim=True)], dim=1)
    return decoded, step_logits


SWITCHES = {
    "layernorm-post-learned": dict(),
    "rmsnorm-pre-rotary": dict(norm_type="rmsnorm", norm_position="pre", position_embedding_type="rotary"),
}


@pytest.mark.parametrize("switches", list(SWITCHES), ids=list(SWITCHES))
def test_generate_with_cache_equals_greedy_without_cache(switches):
    model = build(**SWITCHES[switches])
    input_ids, attention_mask = source_batch()
    steps = 8
    reference, reference_logits = greedy_reference(model, input_ids, attention_mask, steps)
    assert len(set(reference[:, 1:].flatten().tolist())) > 2  # a real sequence, not one token repeated
    runs = {}
    for use_cache in (True, False):
        runs[use_cache] = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=steps, do_sample=False,
            use_cache=use_cache, return_dict_in_generate=True, output_logits=True,
        )
        assert torch.equal(runs[use_cache].sequences, reference)
        # fp32, three blocks: a cached step and a full forward differ by summation order only (~1e-6).
        for got, want in zip(runs[use_cache].logits, reference_logits):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_cross_attention_keys_are_computed_once_per_source_with_cache():
    model = build()
    input_ids, attention_mask = source_batch()
    calls = []
    model.model.decoder.layers[0].cross_attention.k_proj.register_forward_hook(lambda *args: calls.append(1))
    model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False, use_cache=True)
    assert len(calls) == 1
    calls.clear()
    model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False, use_cache=False)
    assert len(calls) == 5


def test_encoder_padding_does_not_change_real_tokens():
    model = build()
    input_ids, attention_mask = source_batch()
    decoder_input_ids = torch.tensor([[START, 5, 9, 11], [START, 7, 3, 20]])
    with torch.no_grad():
        batched = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
        alone = model(input_ids=input_ids[1:, :5], decoder_input_ids=decoder_input_ids[1:])
    torch.testing.assert_close(batched.logits[1:], alone.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched.encoder_last_hidden_state[1:, :5], alone.encoder_last_hidden_state, rtol=1e-5, atol=1e-5)


def test_shared_and_separate_embeddings_param_counts_and_tying_survive_save_load(tmp_path):
    config = dict(tie_word_embeddings=True)
    shared = build(tie_encoder_decoder_embeddings=True, **config)
    separate = build(tie_encoder_decoder_embeddings=False, **config)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731 (parameters() counts a tied one once)
    assert count(separate) - count(shared) == 97 * 32
    for name, model in (("shared", shared), ("separate", separate)):
        model.save_pretrained(tmp_path / name)
        loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / name)
        assert type(loaded) is HfxForConditionalGeneration
        encoder = loaded.model.encoder.embeddings.word_embeddings.weight
        decoder = loaded.model.decoder.embeddings.word_embeddings.weight
        assert loaded.lm_head.weight is decoder  # tie_word_embeddings: the head reads the decoder's embedding
        assert (encoder is decoder) == (name == "shared")
        with safe_open(str(tmp_path / name / "model.safetensors"), "pt") as stored:
            embedding_keys = [k for k in stored.keys() if "word_embeddings" in k or k.startswith("lm_head")]
        assert len(embedding_keys) == (1 if name == "shared" else 2)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    assert shared.model.decoder.embeddings.word_embeddings.weight is shared.model.encoder.embeddings.word_embeddings.weight


def test_auto_classes_load_the_folder_and_automodel_stays_hfxmodel(tmp_path):
    model = build()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    input_ids, attention_mask = source_batch()
    decoder_input_ids = torch.tensor([[START, 4, 5], [START, 6, 7]])
    with torch.no_grad():
        want = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits
        got = loaded(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert loaded.config.is_encoder_decoder and loaded.generation_config.decoder_start_token_id == START
    assert type(AutoModel.from_config(tiny_config())) is hfx.HfxModel


def test_switches_build_both_stacks():
    model = build(**SWITCHES["rmsnorm-pre-rotary"])
    norm_class = type(registry.get("norm", "rmsnorm").factory(model.config, 32))
    position_class = type(registry.get("position", "rotary").factory(model.config))
    for stack in (model.model.encoder, model.model.decoder):
        assert type(stack.embeddings.position) is position_class
        assert type(stack.final_norm) is norm_class
    layer = model.model.decoder.layers[1]
    assert {type(layer.self_attention_norm), type(layer.cross_attention_norm), type(layer.ffn_norm)} == {norm_class}
    assert len(model.model.decoder.layers) == 2 and len(model.model.encoder.layers) == 1


def test_labels_are_shifted_right_ignored_positions_skipped_and_num_items_honoured():
    model = build()
    input_ids, attention_mask = source_batch()
    labels = torch.tensor([[5, 9, 11, 2], [7, 3, -100, -100]])
    shifted = shift_tokens_right(labels, 0, START)
    assert shifted.tolist() == [[START, 5, 9, 11], [START, 7, 3, 0]]
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        explicit = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=shifted)
        summed = nn.functional.cross_entropy(out.logits.reshape(-1, 97), labels.reshape(-1), reduction="sum")
        per_items = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                          num_items_in_batch=torch.tensor(12))
    torch.testing.assert_close(out.logits, explicit.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, summed / 6, rtol=1e-6, atol=1e-6)  # 6 real label tokens
    torch.testing.assert_close(per_items.loss, summed / 12, rtol=1e-6, atol=1e-6)


def test_gradients_flow_through_cross_attention_into_the_encoder():
    model = build(tie_encoder_decoder_embeddings=False).train()
    input_ids, attention_mask = source_batch()
    model(input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([[5, 9], [7, 3]])).loss.backward()
    cross = model.model.decoder.layers[0].cross_attention
    for parameter in (cross.q_proj.weight, cross.k_proj.weight, cross.v_proj.weight, cross.o_proj.weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    # The encoder's own embedding is reached only through cross-attention.
    encoder_grad = model.model.encoder.embeddings.word_embeddings.weight.grad
    assert encoder_grad[input_ids[attention_mask.bool()]].abs().sum() > 0


class _PenalisedFFN(nn.Module):
    """A dense FFN reporting a penalty through hfx.auxiliary, like a MoE router would."""

    def __init__(self, config):
        super().__init__()
        self.linear = nn.Linear(config.hidden_size, config.hidden_size)
        self.last = None

    def forward(self, hidden_states):
        out = self.linear(hidden_states)
        self.last = Auxiliary(loss=0.01 * out.pow(2).mean(), stats={"calls": torch.ones(1)})
        report(self)
        return out

    def hfx_auxiliary(self):
        return self.last


@pytest.fixture
def penalised_ffn():
    registry.register(Component(kind="ffn", name="test_seq2seq_penalised", factory=_PenalisedFFN))
    yield "test_seq2seq_penalised"
    registry.unregister("ffn", "test_seq2seq_penalised")


def test_auxiliary_losses_of_both_stacks_reach_the_loss(penalised_ffn):
    model = build(ffn_type=penalised_ffn)
    input_ids, attention_mask = source_batch()
    labels = torch.tensor([[5, 9, 11], [7, 3, -100]])
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    ffns = [m for m in model.modules() if isinstance(m, _PenalisedFFN)]
    assert len(ffns) == 3  # one encoder block, two decoder blocks
    expected_aux = sum(m.last.loss for m in ffns)
    torch.testing.assert_close(out.aux_loss, expected_aux)
    ce = nn.functional.cross_entropy(out.logits.reshape(-1, 97), labels.reshape(-1))
    torch.testing.assert_close(out.loss, ce + expected_aux)
    assert out.aux_stats["calls"].shape == (3, 1)


def test_training_on_a_reversal_task_lowers_the_loss():
    model = build(initializer_range=0.02, hidden_dropout_prob=0.0).train()
    generator = torch.Generator().manual_seed(2)
    source = torch.randint(3, 97, (16, 6), generator=generator)
    labels = source.flip(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = model(input_ids=source, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # The initial loss is about ln(97) = 4.6; fitting 16 pairs brings it far below.
    assert losses[0] > 4.0
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(is_decoder=True), "is_decoder=True is invalid"),
        (dict(pad_token_id=None, decoder_start_token_id=None), "decoder_start_token_id=None is invalid"),
        (dict(decoder_start_token_id=500), "decoder_start_token_id=500 is invalid"),
    ],
)
def test_bad_configs_are_refused_before_weights_exist(overrides, message):
    with pytest.raises(ValueError, match=message):
        HfxForConditionalGeneration(seq2seq_config(**overrides))


def test_bad_decoder_layers_is_refused_by_the_config():
    with pytest.raises(ValueError, match="decoder_layers=0 is invalid"):
        seq2seq_config(decoder_layers=0)
    config = seq2seq_config()
    with pytest.raises(ValueError, match="decoder_layers=0 is invalid"):
        config.decoder_layers = 0  # HfxConfig checks every assignment (from_pretrained's overrides too)


def test_decoder_layers_default_to_the_encoders_when_the_model_makes_the_config_encoder_decoder():
    config = tiny_config(num_hidden_layers=3, decoder_start_token_id=START)
    assert not config.is_encoder_decoder and config.decoder_layers is None
    model = HfxForConditionalGeneration(config)
    assert config.is_encoder_decoder and config.decoder_layers == 3
    assert len(model.model.decoder.layers) == 3


def test_moe_decoder_counts_real_target_tokens_only():
    model = build(ffn_type="moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    input_ids, attention_mask = source_batch()  # 7 + 5 real source tokens
    decoder_input_ids = torch.tensor([[START, 5, 9, 11], [START, 7, 3, 0]])
    decoder_attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # 6 real target tokens
    with torch.no_grad():
        out = model(
            input_ids=input_ids, attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
        )
    # one row per MoE block, encoder's first; top-2: each real token counts twice, padding never
    assert out.aux_stats["expert_counts"].sum(-1).tolist() == [12 * 2, 6 * 2, 6 * 2]


@pytest.mark.parametrize("share", [True, False])
def test_resize_token_embeddings_resizes_every_embedding_and_keeps_the_ties(share):
    model = build(tie_encoder_decoder_embeddings=share, tie_word_embeddings=True)
    model.resize_token_embeddings(120, mean_resizing=False)
    encoder = model.model.encoder.embeddings.word_embeddings.weight
    decoder = model.model.decoder.embeddings.word_embeddings.weight
    assert encoder.shape == decoder.shape == model.lm_head.weight.shape == (120, 32)
    assert model.lm_head.weight is decoder and (encoder is decoder) == share
    input_ids, attention_mask = source_batch()
    logits = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=torch.tensor([[START, 110]] * 2)).logits
    assert logits.shape == (2, 2, 120)

