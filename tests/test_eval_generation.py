"""Batched greedy generate_until: equal to one-request-at-a-time ``generate`` and to lm-eval 0.4.13.

The reference is the one-at-a-time path (``model.generate`` per request, what hfx ran before
batching), on a tiny GPT-2 (absolute positions) and an hfx causal model (rotary: per-row position
ids matter), with prompts of different lengths, a shared few-shot block, stop lists that cut rows
at different steps, several ``max_gen_toks`` and prompts left-truncated at ``max_length``.
"""

import random
import types

import pytest
import torch

from hfx.evaluation import evaluate, generation
from hfx.evaluation.cache import ResultCache
from hfx.evaluation.generation import batchable, shared_prefix
from hfx.evaluation.scorer import CausalLMScorer, shared_prefix_groups
from tests.test_eval import _gpt2, _sentence, lm_eval_reference

SPECS = [
    {"until": ["\n"], "max_gen_toks": 12},
    {"until": ["e", "dog"], "max_gen_toks": 9},
    {"until": "o", "max_gen_toks": 6, "do_sample": False},
    {"until": [], "max_gen_toks": 4, "temperature": 0.0},
]


def _hfx_model(vocab_size):
    import hfx

    torch.manual_seed(3)
    config = hfx.HfxConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=96, is_decoder=True, norm_position="pre",
                           position_embedding_type="rotary", norm_type="rmsnorm", hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, initializer_range=0.3, tie_word_embeddings=False,
                           eos_token_id=0, bos_token_id=0)
    return hfx.HfxForCausalLM(config).eval()


def _requests(rng):
    shots = "\n\n".join(f"Q: {_sentence(rng, 5)}\nA: {_sentence(rng, 2)}" for _ in range(3))
    requests = []
    for i in range(16):
        question = f"Q: {_sentence(rng, rng.randint(1, 10))}\nA:"
        context = question if i % 5 == 0 else shots + "\n\n" + question
        if i == 7:
            context = _sentence(rng, 70) + "\n\n" + context  # left-truncated at max_length - max_gen_toks
        requests.append((context, dict(SPECS[i % len(SPECS)])))
    return requests


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Both models with the GPT-2 BPE tokenizer, the requests and their one-at-a-time outputs."""
    gpt2, tok = _gpt2(tmp_path_factory.mktemp("gen"))
    models = {"gpt2": gpt2, "hfx": _hfx_model(len(tok))}
    requests = _requests(random.Random(7))
    reference = {}
    for name, model in models.items():
        scorer = CausalLMScorer(model, tok, progress=False, max_length=96)
        original = generation.batchable
        generation.batchable = lambda *args, **kwargs: False
        try:
            reference[name] = scorer.generate_until(requests)
        finally:
            generation.batchable = original
        assert scorer.forward_calls == len(requests)  # one generate call each
        assert len(set(reference[name])) > len(requests) // 2  # varied answers, not one repeated token
    return {"models": models, "tok": tok, "requests": requests, "reference": reference}


@pytest.mark.parametrize("model_name", ["gpt2", "hfx"])
@pytest.mark.parametrize("batch_size, max_batch_tokens", [(1, 4096), (3, 4096), (8, 4096), (None, 120)])
def test_batched_greedy_equals_one_at_a_time(setup, monkeypatch, model_name, batch_size, max_batch_tokens):
    model, tok = setup["models"][model_name], setup["tok"]
    lengths, prefixes, batches = [], [], []
    finish, forward_prefix, decode = generation._finish, generation._forward_prefix, generation._decode

    def spy_finish(tokenizer, tokens, until):
        lengths.append(len(tokens))
        return finish(tokenizer, tokens, until)

    def spy_prefix(scorer, prefix):
        result = forward_prefix(scorer, prefix)
        assert result.shared  # rows attend to one copy of the prefix (SDPA models take the interface)
        prefixes.append(len(prefix))
        return result

    def spy_decode(scorer, batch, start, prefix_kv, spec, *args):
        batches.append((len(batch), max(len(item.prompt) for item in batch) - start + spec.max_new))
        return decode(scorer, batch, start, prefix_kv, spec, *args)

    monkeypatch.setattr(generation, "_finish", spy_finish)
    monkeypatch.setattr(generation, "_forward_prefix", spy_prefix)
    monkeypatch.setattr(generation, "_decode", spy_decode)
    scorer = CausalLMScorer(model, tok, progress=False, max_length=96, batch_size=batch_size,
                            max_batch_tokens=max_batch_tokens)
    assert scorer.generate_until(setup["requests"]) == setup["reference"][model_name]
    assert any(n < max(s["max_gen_toks"] for s in SPECS) for n in lengths)  # rows stopped early, at different steps
    assert len(prefixes) == len(SPECS) and min(prefixes) >= 8  # the few-shot block once per group of kwargs
    for rows, tokens in batches:
        assert batch_size is None or rows <= batch_size
        if batch_size is None and rows > 1:
            assert rows * tokens <= max_batch_tokens
    assert scorer.forward_calls < len(setup["requests"]) * 12  # prefix + one per batch step, not per request step


@pytest.mark.parametrize("queries", [1, 3])
@pytest.mark.parametrize("masked", [True, False])
def test_shared_prefix_attention_equals_attention_over_the_concatenated_keys(queries, masked):
    """One prefix copy for every row, grouped-query heads, left pads after the prefix, or SDPA's causal None."""
    torch.manual_seed(0)
    rows, heads, kv_heads, dim, shared, own = 3, 4, 2, 8, 5, 4
    query = torch.randn(rows, heads, queries, dim)
    key, value = torch.randn(rows, kv_heads, own, dim), torch.randn(rows, kv_heads, own, dim)
    prefix = (torch.randn(1, kv_heads, shared, dim), torch.randn(1, kv_heads, shared, dim))
    total = shared + own
    allowed = (torch.arange(total)[None, :] <= torch.arange(total - queries, total)[:, None])[None, None].repeat(rows, 1, 1, 1)
    if masked:
        allowed[1, :, :, shared : shared + 2] = False  # row 1: two pads between the prefix and its tokens
    generation._SHARED.current = prefix
    got, _ = generation._shared_prefix_attention(types.SimpleNamespace(), query, key, value, allowed if masked else None,
                                                 scaling=0.3)
    keys = torch.cat([prefix[0].expand(rows, -1, -1, -1), key], 2).repeat_interleave(heads // kv_heads, 1)
    values = torch.cat([prefix[1].expand(rows, -1, -1, -1), value], 2).repeat_interleave(heads // kv_heads, 1)
    expected = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=allowed, scale=0.3)
    assert got.shape == (rows, queries, heads, dim)
    torch.testing.assert_close(got, expected.transpose(1, 2), atol=1e-6, rtol=1e-5)
    assert generation._SHARED.current is None  # one prefix per attention call


def test_shared_prefix_is_checked_per_prompt():
    block = list(range(100, 120))
    prompts = [block + [1, 2], block + [3], block[:-1] + [7, 8], [5] + block, block + [4, 4, 4]]
    # the 20-token block is shared by prompts 0, 1, 4; prompt 2 differs in its last block token
    # (a BPE merge across the boundary), prompt 3 starts elsewhere (left truncation): 19 tokens for four
    # prompts saves 57 tokens, 20 for three saves 40
    assert shared_prefix(prompts) == (19, [0, 1, 2, 4])
    assert shared_prefix(prompts[:2] + prompts[3:]) == (20, [0, 1, 3])
    assert shared_prefix([block, block]) == (19, [0, 1])  # every prompt keeps a token of its own
    assert shared_prefix([block[:5] + [1], block[:5] + [2]]) == (0, [])  # too short to be worth a forward
    assert shared_prefix([block]) == (0, [])
    # a short prefix shared by many (5 tokens × 39 saved) does not hide a long one shared by two: only
    # prefixes of the minimum length compete (the scorer's choice, one helper for both)
    many = [block[:5] + [i, i] for i in range(40)] + [block + [1], block + [2]]
    assert shared_prefix(many) == (20, [40, 41])
    assert shared_prefix(many) == shared_prefix_groups(many, min_prefix=8, min_saving=1)[0]


def test_generation_and_the_scorer_bound_memory_by_one_probe(monkeypatch):
    """Free memory is one function for both: CUDA's free memory plus what torch holds reserved but unused."""
    from hfx.evaluation import scorer as scoring

    assert generation.free_memory is scoring.free_memory
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 8000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 700)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 200)
    assert scoring.free_memory(torch.device("cuda", 0)) == 1500
    host = scoring.free_memory(torch.device("cpu"))
    assert host is None or host > 0


def test_generation_matches_lm_eval_on_a_few_shot_task(setup, tmp_path):
    import json

    rng = random.Random(11)
    for split, n in (("train", 4), ("test", 12)):
        with open(tmp_path / f"{split}.jsonl", "w") as handle:
            for _ in range(n):
                handle.write(json.dumps({"question": _sentence(rng, rng.randint(2, 9)), "answer": _sentence(rng, 1)}) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "gen.yaml").write_text(
        f"task: tiny_gen_fewshot\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {tmp_path}/train.jsonl\n"
        f"    test: {tmp_path}/test.jsonl\noutput_type: generate_until\ntraining_split: train\ntest_split: test\n"
        "fewshot_config:\n  sampler: first_n\ndescription: \"Answer the questions.\\n\\n\"\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_target: \"{{answer}}\"\nnum_fewshot: 3\n"
        "generation_kwargs:\n  until: [\"\\n\\n\", \"Question:\", \"e\"]\n  do_sample: false\n  max_gen_toks: 10\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    model, tok = setup["models"]["gpt2"], setup["tok"]
    ref = lm_eval_reference(model, tok, tmp_path / "tasks", ["tiny_gen_fewshot"])
    results, records = evaluate(model, ["tiny_gen_fewshot"], tokenizer=tok, include_path=tmp_path / "tasks",
                                cache_dir=False, progress=False, return_records=True)
    ref_samples = sorted(ref["samples"]["tiny_gen_fewshot"], key=lambda s: s["doc_id"])
    assert [r["arguments"][0][0] for r in records["tiny_gen_fewshot"]] == [s["arguments"][0][0] for s in ref_samples]
    texts = [r["resps"][0] for r in records["tiny_gen_fewshot"]]
    assert texts == [s["resps"][0][0] for s in ref_samples]
    assert len(set(texts)) > 1
    assert results["results"]["tiny_gen_fewshot"]["exact_match,none"] == \
        ref["results"]["tiny_gen_fewshot"]["exact_match,none"]


def test_cache_skips_done_requests_and_sampling_stays_seeded(setup, tmp_path):
    model, tok = setup["models"]["gpt2"], setup["tok"]
    requests = setup["requests"]
    cache = ResultCache(tmp_path, "gpt2-test")
    half = CausalLMScorer(model, tok, progress=False, max_length=96, cache=cache)
    assert half.generate_until(requests[::2]) == setup["reference"]["gpt2"][::2]
    resumed = CausalLMScorer(model, tok, progress=False, max_length=96, cache=ResultCache(tmp_path, "gpt2-test"))
    assert resumed.generate_until(requests) == setup["reference"]["gpt2"]
    again = CausalLMScorer(model, tok, progress=False, max_length=96, cache=ResultCache(tmp_path, "gpt2-test"))
    assert again.generate_until(requests) == setup["reference"]["gpt2"] and again.forward_calls == 0

    sampled = [(ctx, {"until": ["\n"], "max_gen_toks": 8, "do_sample": True, "temperature": 3.0}) for ctx, _ in requests[:6]]
    whole = CausalLMScorer(model, tok, progress=False, max_length=96).generate_until(sampled)
    first = CausalLMScorer(model, tok, progress=False, max_length=96, cache=ResultCache(tmp_path / "s", "m"))
    first.generate_until(sampled[:3])
    rest = CausalLMScorer(model, tok, progress=False, max_length=96, cache=ResultCache(tmp_path / "s", "m"))
    assert rest.generate_until(sampled) == whole  # a resumed sampling run samples what a whole run does
    assert rest.forward_calls == 3


def test_greedy_changing_settings_keep_generate(setup):
    model, tok = setup["models"]["gpt2"], setup["tok"]
    assert batchable(model, {"do_sample": False})
    assert not batchable(model, {"do_sample": False, "num_beams": 2})
    assert not batchable(model, {"do_sample": True})
    penalised = type(model)(model.config).eval()
    penalised.load_state_dict(model.state_dict())
    penalised.generation_config.repetition_penalty = 3.0
    assert not batchable(penalised, {"do_sample": False})
    scorer = CausalLMScorer(penalised, tok, progress=False, max_length=96)
    requests = setup["requests"][:4]
    outputs = scorer.generate_until(requests)
    assert scorer.forward_calls == len(requests)  # one generate call each: the penalty is applied
    assert outputs != setup["reference"]["gpt2"][:4]


def test_max_gen_toks_must_leave_room_for_the_prompt(setup):
    scorer = CausalLMScorer(setup["models"]["gpt2"], setup["tok"], progress=False, max_length=96)
    with pytest.raises(ValueError, match=r"max_gen_toks=96 .* max_length is 96"):
        scorer.generate_until([("Q: a\nA:", {"until": ["\n"], "max_gen_toks": 96})])
    with pytest.raises(ValueError, match=r"max_gen_toks=0: generation needs at least one new token"):
        scorer.generate_until([("Q: a\nA:", {"until": ["\n"], "max_gen_toks": 0})])


def test_token_budget_and_row_cap():
    """rows × (unshared prompt + max_gen_toks) ≤ max_batch_tokens, the longest row of a batch counting."""
    rows = [generation._Pending(i, list(range(n)), str(i)) for i, n in enumerate([30, 28, 25, 25, 24, 22, 21])]
    scorer = types.SimpleNamespace(batch_size=None, max_batch_tokens=200, device=torch.device("cpu"))

    def sizes(start):
        return [[len(r.prompt) for r in b] for b in generation._batches(scorer, rows, start, 10, None)]

    assert sizes(20) == [[30, 28, 25, 25, 24, 22, 21]]  # tails of at most 10 (+10 generated): 10 rows fit
    scorer.max_batch_tokens = 50
    assert sizes(20) == [[30, 28], [25, 25, 24], [22, 21]]
    assert sizes(0) == [[30], [28], [25], [25], [24], [22], [21]]  # without a shared prefix each row is 31+ tokens
    scorer.batch_size, scorer.max_batch_tokens = 3, 10_000
    assert [len(b) for b in sizes(0)] == [3, 3, 1]
