"""Transformer-XL segment memory: segment-by-segment forward against one masked forward over the concatenation
(an explicit float64 reference written here), bounded and detached memory, refusals, save/load, generate."""

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfx
from hfx.segment_memory import SegmentMemory
from tests.conftest import tiny_config


def memory_config(position="rotary", memory_length=4, **overrides):
    attention = "eager" if position == "xl_relative" else "sdpa"
    base = dict(
        position_embedding_type=position, attention_type=attention, memory_length=memory_length, type_vocab_size=0,
        is_decoder=True, norm_position="pre",
    )
    base.update(overrides)
    return tiny_config(**base)


def build(config, dtype=torch.float64):
    torch.manual_seed(0)
    model = hfx.HfxForCausalLM(config).eval().to(dtype)
    if config.position_embedding_type == "xl_relative":
        with torch.no_grad():  # u and v start near 0: make the test see them
            for layer in model.model.layers:
                layer.attention.relative.r_w_bias.normal_(0.0, 0.5)
                layer.attention.relative.r_r_bias.normal_(0.0, 0.5)
    return model


def xl_mask(segment_lengths, memory_length):
    """True where query i may read key j: j <= i and j >= (start of i's segment) - memory_length."""
    starts = torch.cat([torch.full((n,), sum(segment_lengths[:k])) for k, n in enumerate(segment_lengths)])
    total = len(starts)
    i, j = torch.arange(total)[:, None], torch.arange(total)[None, :]
    return (j <= i) & (j >= starts[:, None] - memory_length)


def reference_logits(model, ids, allowed):
    """The whole text in one forward with ``allowed`` as the attention pattern, attention written out in float64:
    rotary from its formula at global positions, or XL's four score terms with R_{i-j} computed per (i, j)."""
    cfg, base = model.config, model.model
    batch, total = ids.shape
    heads, dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    pos = torch.arange(total, dtype=torch.float64)
    x = base.embeddings.word_embeddings(ids)
    if base.embeddings.norm is not None:  # post-norm normalises the embeddings
        x = base.embeddings.norm(x)
    for layer in base.layers:
        att = layer.attention
        h = layer.attention_norm(x) if cfg.norm_position == "pre" else x

        def split(t):
            return t.view(batch, total, -1, dim).transpose(1, 2)

        q, k, v = split(att.q_proj(h)), split(att.k_proj(h)), split(att.v_proj(h))
        rep = heads // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if cfg.position_embedding_type == "rotary":
            inv_freq = cfg.rope_theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
            angle = torch.cat([pos[:, None] * inv_freq] * 2, dim=-1)

            def rot(t):
                t1, t2 = t[..., : dim // 2], t[..., dim // 2 :]
                return t * angle.cos() + torch.cat([-t2, t1], dim=-1) * angle.sin()

            scores = rot(q) @ rot(k).transpose(-1, -2)
        else:
            rel = att.relative
            freq = 10000.0 ** (-torch.arange(0, cfg.hidden_size, 2, dtype=torch.float64) / cfg.hidden_size)
            dist = pos[:, None] - pos[None, :]
            sinus = torch.cat([(dist[..., None] * freq).sin(), (dist[..., None] * freq).cos()], dim=-1)
            r = rel.r_proj(sinus).view(total, total, heads, dim)  # W_r R_{i-j}
            u, w = rel.r_w_bias[None, :, None], rel.r_r_bias[None, :, None]
            scores = (q + u) @ k.transpose(-1, -2) + torch.einsum("bhid,ijhd->bhij", q + w, r)
        scores = (scores / math.sqrt(dim)).masked_fill(~allowed, float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, total, -1)
        out = att.o_proj(out)
        if cfg.norm_position == "pre":
            x = x + out
            x = x + layer.ffn(layer.ffn_norm(x))
        else:
            x = layer.attention_norm(x + out)
            x = layer.ffn_norm(x + layer.ffn(x))
    if base.final_norm is not None:
        x = base.final_norm(x)
    return model.lm_head(x)


def by_segments(model, ids, segment_lengths, memory=None):
    logits, start = [], 0
    for n in segment_lengths:
        out = model(ids[:, start : start + n], past_key_values=memory, use_cache=True)
        memory = out.past_key_values
        logits.append(out.logits)
        start += n
    return torch.cat(logits, dim=1), memory


@pytest.mark.parametrize(
    "position, norm_position, memory_length",
    # 3: memory shorter than a segment; 7: memory reaching into the segment before the previous one
    [("rotary", "pre", 3), ("rotary", "post", 7), ("xl_relative", "pre", 7), ("xl_relative", "post", 3)],
)
def test_segments_equal_one_masked_forward(position, norm_position, memory_length):
    model = build(memory_config(position, memory_length, norm_position=norm_position, num_key_value_heads=2))
    torch.manual_seed(1)
    ids = torch.randint(1, 97, (2, 17))
    lengths = [5, 5, 5, 2]
    with torch.no_grad():
        segmented, memory = by_segments(model, ids, lengths)
        expected = reference_logits(model, ids, xl_mask(lengths, memory_length))
        full_causal = reference_logits(model, ids, xl_mask([17], 0))
    # fp32 position tables (rotary angles, XL sinusoids) in an otherwise float64 model
    torch.testing.assert_close(segmented, expected, atol=1e-5, rtol=1e-5)
    assert (segmented - full_causal).abs().max() > 1e-3  # the memory window really limits what is seen
    assert memory.memory_size() == memory_length


def test_memory_bounded_detached_and_no_gradient_into_the_past():
    model = build(memory_config("rotary", memory_length=6), dtype=torch.float32).train()
    memory = previous = previous_grad = None
    for step in range(12):
        embeds = model.model.embeddings.word_embeddings(torch.randint(1, 97, (2, 4))).detach().requires_grad_()
        out = model(inputs_embeds=embeds, past_key_values=memory, labels=torch.randint(1, 97, (2, 4)))
        out.loss.backward()
        if step:  # the previous segment's inputs get no gradient through the memory
            assert torch.equal(previous.grad, previous_grad)
        assert embeds.grad.abs().sum() > 0
        previous, previous_grad, memory = embeds, embeds.grad.clone(), out.past_key_values
        assert memory.memory_size() == min(6, 4 * (step + 1))
        assert all(not layer.states.requires_grad for layer in memory.layers)
    assert memory.seen_tokens == 48


def test_gradient_checkpointing_reads_the_same_memory():
    """Checkpointing re-runs each block in backward, after the memory moved on: the gradients must not change."""
    ids = torch.randint(1, 97, (2, 12))
    grads = []
    for checkpointing in (False, True):
        model = build(memory_config("xl_relative", memory_length=4), dtype=torch.float32).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        memory = model(ids[:, :6]).past_key_values
        model(ids[:, 6:], past_key_values=memory, labels=ids[:, 6:]).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_hfx_model_with_is_decoder_returns_the_memory():
    """The bare HfxModel (is_decoder=True) carries the memory itself: its second segment equals the masked
    float64 reference over the concatenation (read through the causal LM's head, same weights)."""
    config = memory_config("rotary", memory_length=3)
    model = build(config)
    bare = hfx.HfxModel(config).eval().to(torch.float64)
    bare.load_state_dict(model.model.state_dict())
    torch.manual_seed(3)
    ids = torch.randint(1, 97, (2, 8))
    with torch.no_grad():
        first = bare(ids[:, :4])
        assert isinstance(first.past_key_values, SegmentMemory)
        second = bare(ids[:, 4:], past_key_values=first.past_key_values)
        logits = model.lm_head(second.last_hidden_state)
        expected = reference_logits(model, ids, xl_mask([4, 4], 3))[:, 4:]
        full_causal = reference_logits(model, ids, xl_mask([8], 0))[:, 4:]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert (logits - full_causal).abs().max() > 1e-3  # the first query of segment 2 does not see token 0
    assert second.past_key_values.memory_size() == 3


def test_cache_contract():
    """What transformers asks of a Cache: no prefix length, beams reorder / repeat / select every layer's
    states and the real-token mask together, cropping refused."""
    memory = SegmentMemory(memory_length=4, num_layers=2)
    states = [torch.arange(3 * 2 * 1, dtype=torch.float32).view(3, 2, 1) + 100 * k for k in range(2)]
    real = torch.tensor([[True, False], [True, True], [False, True]])
    memory.append(states, real)
    assert (memory.get_seq_length(), memory.memory_size(), memory.seen_tokens) == (0, 2, 2)
    order = torch.tensor([2, 0, 0])
    memory.reorder_cache(order)
    assert all(torch.equal(layer.states, s[order]) for layer, s in zip(memory.layers, states))
    assert torch.equal(memory.real, real[order])
    memory.batch_repeat_interleave(2)
    assert memory.layers[1].states.shape == (6, 2, 1) and torch.equal(memory.real, real[order].repeat_interleave(2, 0))
    memory.batch_select_indices(torch.tensor([0, 5]))
    assert torch.equal(memory.layers[0].states, states[0][[2, 0]]) and torch.equal(memory.real, real[[2, 0]])
    memory.append([torch.zeros(2, 3, 1)] * 2, torch.ones(2, 3, dtype=torch.bool))  # 2 + 3 > 4: oldest dropped
    assert memory.memory_size() == 4 and torch.equal(memory.layers[0].states[:, 0], states[0][[2, 0], 1])
    with pytest.raises(ValueError, match=r"crop\(1\) is invalid: SegmentMemory cannot be cropped"):
        memory.crop(1)
    with pytest.raises(ValueError, match=r"memory_length=0 is invalid; valid values: an integer > 0"):
        SegmentMemory(memory_length=0, num_layers=2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(memory_length=-1), r"memory_length=-1 is invalid; valid values: an integer >= 0"),
        (dict(position_embedding_type="xl_relative", attention_type="sdpa"),
         r"attention_type='sdpa' is invalid with position_embedding_type='xl_relative'; valid values: \['eager'\]"),
    ],
)
def test_config_refusals(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(position_embedding_type="learned"),
         r"position_embedding_type='learned' is invalid with memory_length=4; valid values: \['rotary', 'xl_relative'\]"),
        (dict(position_embedding_type="sinusoidal"), r"position_embedding_type='sinusoidal' is invalid with memory_length"),
        (dict(attention_type="hfx_sliding_window"),
         r"attention_type='hfx_sliding_window' is invalid with memory_length=4; valid values: \['eager', 'sdpa'\]"),
    ],
)
def test_memory_refusals_at_config_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**{"memory_length": 4, "position_embedding_type": "rotary", **overrides})


def test_backend_set_after_construction_is_refused_at_forward():
    model = build(memory_config("rotary"))
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match=r"attn_implementation='flex_attention' is invalid with memory_length=4; "
                                         r"valid values: \['eager', 'sdpa'\]"):
        model(torch.randint(1, 97, (1, 3)))


def test_memory_needs_a_decoder_and_refuses_other_caches():
    with pytest.raises(ValueError, match=r"memory_length=4 is invalid with is_decoder=False"):
        hfx.HfxModel(tiny_config(memory_length=4, position_embedding_type="rotary"))
    with pytest.raises(ValueError, match=r"memory_length=4 is invalid for an encoder-decoder model"):
        hfx.HfxForConditionalGeneration(tiny_config(memory_length=4, position_embedding_type="rotary"))
    with pytest.raises(ValueError, match=r"position_embedding_type='xl_relative' is invalid for an encoder-decoder"):
        hfx.HfxForConditionalGeneration(tiny_config(position_embedding_type="xl_relative", attention_type="eager"))
    model = build(memory_config("rotary"))
    ids = torch.randint(1, 97, (1, 4))
    cache = model.model(ids, past_key_values=None, use_cache=True).past_key_values
    with pytest.raises(ValueError, match=r"holds a batch of 1 rows but this segment has 2"):
        model(torch.randint(1, 97, (2, 3)), past_key_values=cache)
    from transformers import DynamicCache

    filled = DynamicCache()
    filled.update(torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8), 0)
    with pytest.raises(ValueError, match=r"past_key_values=DynamicCache is invalid with memory_length=4"):
        model(ids, past_key_values=filled)


def test_save_load_round_trip(tmp_path):
    model = build(memory_config("xl_relative", memory_length=4))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert (loaded.config.memory_length, loaded.config.position_embedding_type) == (4, "xl_relative")
    keys = set(loaded.state_dict())
    assert {"model.layers.0.attention.relative.r_proj.weight", "model.layers.0.attention.relative.r_w_bias"} <= keys
    ids = torch.randint(1, 97, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(by_segments(loaded, ids, [5, 5])[0], by_segments(model, ids, [5, 5])[0])


@pytest.mark.parametrize("position", ["rotary", "xl_relative"])
def test_generate_with_memory_equals_greedy_segments(position):
    """generate continues a memory: the prompt is one segment, each new token another, which is what a manual
    greedy loop and the masked reference over [previous text ; prompt ; generated] compute."""
    model = build(memory_config(position, memory_length=5))
    torch.manual_seed(2)
    previous, prompt = torch.randint(1, 97, (1, 6)), torch.randint(1, 97, (1, 3))
    with torch.no_grad():
        memory = model(previous).past_key_values
        generated = model.generate(
            prompt, past_key_values=copy.deepcopy(memory), max_new_tokens=6, do_sample=False, pad_token_id=0
        )
        manual, mem, step = [], copy.deepcopy(memory), prompt
        for _ in range(6):
            out = model(step, past_key_values=mem)
            step = out.logits[:, -1:].argmax(-1)
            manual.append(step)
        assert generated[:, 3:].tolist() == torch.cat(manual, dim=1).tolist()
        text = torch.cat([previous, generated], dim=1)
        lengths = [6, 3] + [1] * 5
        reference = reference_logits(model, text[:, :-1], xl_mask(lengths, 5))
        assert reference[:, 8:].argmax(-1).tolist() == generated[:, 3:].tolist()
        # without a memory given, generate starts one (and it stays bounded)
        fresh = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        assert fresh.past_key_values.memory_size() == 5


def test_left_padded_batch_generates_like_each_row():
    model = build(memory_config("rotary", memory_length=4, pad_token_id=0))
    rows = [torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[11, 12, 13]])]
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 11, 12, 13]])
    mask = (ids != 0).long()
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        for k, row in enumerate(rows):
            alone = model.generate(row, max_new_tokens=5, do_sample=False, pad_token_id=0)
            assert batch[k, 5:].tolist() == alone[0, row.shape[1]:].tolist()


def test_xl_relative_kv_cache_without_memory():
    """xl_relative alone (memory_length=0): decoding from a KV cache equals full forwards."""
    model = build(memory_config("xl_relative", memory_length=0))
    prompt = torch.randint(1, 97, (2, 4))
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        full = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
        assert cached.tolist() == full.tolist()
        logits = model(cached[:, :-1]).logits
        reference = reference_logits(model, cached[:, :-1], xl_mask([cached.shape[1] - 1], 0))
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


def test_packed_4d_mask_is_the_segment_pattern_when_the_memory_is_empty():
    """hfx eval's packed rows (a 4-D block mask) score a memory model as one segment; after a memory, refused."""
    model = build(memory_config("rotary", memory_length=4))
    ids = torch.randint(1, 97, (1, 6))
    blocks = torch.zeros(6, 6, dtype=torch.bool)
    blocks[:3, :3] = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    blocks[3:, 3:] = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    with torch.no_grad():
        packed = model(ids, attention_mask=blocks[None, None]).logits
        first, second = model(ids[:, :3]).logits, model(ids[:, 3:]).logits
        torch.testing.assert_close(packed, torch.cat([first, second], dim=1))
        memory = model(ids[:, :3]).past_key_values
        with pytest.raises(ValueError, match=r"attention_mask of shape \(1, 1, 6, 6\) is invalid with a segment memory"):
            model(ids, attention_mask=blocks[None, None], past_key_values=memory)


def test_beam_search_expands_a_given_memory():
    """num_beams / num_return_sequences repeat each prompt row: the memory given to generate is repeated with it."""
    model = build(memory_config("rotary", memory_length=6))
    prompt = torch.randint(1, 97, (2, 3))
    with torch.no_grad():
        memory = model(torch.randint(1, 97, (2, 5))).past_key_values
        beams = model.generate(prompt, past_key_values=copy.deepcopy(memory), num_beams=3, num_return_sequences=2,
                               max_new_tokens=4, do_sample=False, pad_token_id=0)
        for k in range(2):
            alone = copy.deepcopy(memory)
            alone.batch_select_indices(torch.tensor([k]))
            row = model.generate(prompt[k : k + 1], past_key_values=alone, num_beams=3, num_return_sequences=2,
                                 max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert row.tolist() == beams[2 * k : 2 * k + 2].tolist()
