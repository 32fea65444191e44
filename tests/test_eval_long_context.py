"""``hfx eval`` on models whose attention is an hfx long-context backend (2-D key padding mask only).

Every request type is compared with the same request scored alone: one unpadded sequence through
the model, nothing shared, nothing cached (``generate(..., use_cache=False)`` for generation). The
windows, blocks and hash chunks are far smaller than the sequences, so the attention is sparse.
Tolerances: fp32 log-likelihoods summed over a few tokens from a 2-layer model differ between
layouts by rounding only (~1e-7 relative); 1e-5 relative (floor 1e-5) is the scorer's own promise.
"""

import copy
import random

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import hfx
from hfx.evaluation import evaluate
from hfx.evaluation.scorer import CausalLMScorer, takes_key_padding_mask_only
from hfx.tokenizer import train_tokenizer
from tests.test_eval import MC, _sentence

BACKENDS = {
    "hfx_sliding_window": dict(attention_window=8),
    "hfx_block_sparse": dict(block_size=4, num_random_blocks=1),
    "hfx_lsh": dict(lsh_attn_chunk_length=4, hash_seed=3, num_hashes=2),
}
MODELS = [*BACKENDS, "llama_sliding_window", "gpt2_sliding_window", "llama_lsh"]
NO_KV_CACHE = ("hfx_block_sparse", "hfx_lsh", "llama_lsh")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small run fastest on one thread (a second one spins on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(2)
    return train_tokenizer([_sentence(rng, 12) for _ in range(200)], vocab_size=120, style="causal")


def _model(name, tok):
    torch.manual_seed(1)
    # a large init spreads the logits, so greedy generations vary from token to token
    if name in BACKENDS:
        config = hfx.HfxConfig(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=256, is_decoder=True, norm_position="pre", position_embedding_type="rotary",
            norm_type="rmsnorm", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.3,
            eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
            attention_type=name, **BACKENDS[name],
        )
        return hfx.HfxForCausalLM(config).eval()
    attn = "hfx_sliding_window"
    if name.startswith("llama"):
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                             initializer_range=0.3, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        model_class = LlamaForCausalLM
        if name == "llama_lsh":  # the backend's settings as plain config attributes of a stock model
            attn, config.lsh_attn_chunk_length, config.hash_seed = "hfx_lsh", 4, 5
    else:
        config = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=4, initializer_range=0.3,
                            eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        model_class = GPT2LMHeadModel
    config.attention_window = 8
    return model_class._from_config(config, attn_implementation=attn).eval()


@pytest.fixture(scope="module")
def models(tok):
    return {name: _model(name, tok) for name in MODELS}


def _requests(seed=0, shots=60):
    """A few-shot prefix shared by 12 contexts (long enough for the scorer to share it), several
    continuations per context, and unrelated short contexts: rows of many lengths in one batch."""
    rng = random.Random(seed)
    prefix = _sentence(rng, shots)
    contexts = [f"{prefix} {_sentence(rng, rng.randint(1, 12))}" for _ in range(12)]
    contexts += [_sentence(rng, rng.randint(2, 9)) for _ in range(4)]
    return [(c, " " + _sentence(rng, rng.randint(1, 5))) for c in contexts for _ in range(2)]


@torch.no_grad()
def _alone(model, context_ids, continuation_ids):
    """log P(continuation | context) and greedy flag, from one unpadded sequence with no mask."""
    ids = torch.tensor([context_ids + continuation_ids[:-1]])
    logprobs = model(input_ids=ids).logits[0, len(context_ids) - 1 :].float().log_softmax(-1)
    targets = torch.tensor(continuation_ids)
    picked = logprobs.gather(-1, targets[:, None])[:, 0]
    return float(picked.sum()), bool((logprobs.argmax(-1) == targets).all())


def _assert_lls(got, want):
    assert len(got) == len(want)
    for (ll, greedy), (ref, ref_greedy) in zip(got, want):
        assert ll == pytest.approx(ref, rel=1e-5, abs=1e-5)
        assert greedy == ref_greedy


@pytest.mark.parametrize("name", MODELS)
def test_the_mask_contract_is_read_from_the_attention_implementation(models, name):
    assert takes_key_padding_mask_only(models[name])
    plain = LlamaForCausalLM._from_config(copy.deepcopy(models["llama_sliding_window"].config), attn_implementation="sdpa")
    assert not takes_key_padding_mask_only(plain)


@pytest.mark.parametrize("name", MODELS)
def test_loglikelihood_equals_each_request_scored_alone(models, tok, name, monkeypatch):
    model = models[name]
    prefixes = []
    original = CausalLMScorer.prefix_cache

    def spy(self, tokens):
        prefixes.append(len(tokens))
        return original(self, tokens)

    monkeypatch.setattr(CausalLMScorer, "prefix_cache", spy)
    scorer = CausalLMScorer(model, tok, max_batch_tokens=400, progress=False)
    requests = _requests()
    got = scorer.loglikelihood(requests)
    want = [_alone(model, *scorer.encode_pair(c, x)) for c, x in requests]
    _assert_lls(got, want)
    assert scorer.key_padding_only
    rows = len(requests) + 1  # every continuation its own row (one more row per group for its prefix forward)
    assert scorer.forward_calls < rows / 4  # batched: several padded rows per forward
    shared = [n for n in prefixes if n > 6]  # the probe's own prefix has 6 tokens
    if name in NO_KV_CACHE:
        assert not scorer.shares_prefixes and not scorer.decodes_from_cache and shared == []
    else:  # the sliding window decodes from a KV cache: the few-shot prefix is computed once
        assert scorer.shares_prefixes and scorer.decodes_from_cache
        assert len(shared) == 1 and shared[0] >= 50
    # one batch: the shortest rows padded to the longest (several times their length) beside them
    _assert_lls(CausalLMScorer(model, tok, max_batch_tokens=1 << 16, progress=False).loglikelihood(requests), want)


def _window_model(kind, tok, attn):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(4)
    common = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=256, initializer_range=0.3, sliding_window=6,
                  eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    if kind == "mistral":
        return MistralForCausalLM._from_config(MistralConfig(**common), attn_implementation=attn).eval()
    # layer 0 full attention, layer 1 a sliding window
    config = Qwen2Config(**common, use_sliding_window=True, max_window_layers=1)
    return Qwen2ForCausalLM._from_config(config, attn_implementation=attn).eval()


@pytest.mark.parametrize("attn", ["sdpa", "hfx_sliding_window"])
@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_transformers_sliding_window_models_keep_their_window(tok, kind, attn):
    """A 4-D block mask would replace these models' own window masks on every layer: they get 2-D-mask rows."""
    model = _window_model(kind, tok, attn)
    scorer = CausalLMScorer(model, tok, max_batch_tokens=400, progress=False)
    requests = _requests(seed=9, shots=12)
    _assert_lls(scorer.loglikelihood(requests), [_alone(model, *scorer.encode_pair(c, x)) for c, x in requests])
    assert scorer.key_padding_only
    gen_kwargs = {"until": ["owl"], "max_gen_toks": 6, "do_sample": False}
    prompts = [c for c, _ in requests[::6]]
    want = []
    for prompt in prompts:
        ids = torch.tensor([scorer.encode_prompt(prompt)])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        want.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("owl")[0])
    assert scorer.generate_until([(p, gen_kwargs) for p in prompts]) == want


@pytest.mark.parametrize("name", ["hfx_sliding_window", "hfx_lsh"])
def test_auto_batch_size_probe_scores_key_padding_rows(models, tok, name):
    model = models[name]
    scorer = CausalLMScorer(model, tok, batch_size="auto", progress=False)
    requests = _requests(seed=3, shots=10)
    _assert_lls(scorer.loglikelihood(requests), [_alone(model, *scorer.encode_pair(c, x)) for c, x in requests])
    assert scorer.batch_info["mode"] == "auto-cpu" and scorer.batch_info["probe"]


@pytest.mark.parametrize("name", MODELS)
def test_loglikelihood_rolling_equals_its_windows_scored_alone(models, tok, name):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    model = models[name]
    scorer = CausalLMScorer(model, tok, max_batch_tokens=300, max_length=24, progress=False)
    rng = random.Random(5)
    texts = [_sentence(rng, n) for n in (3, 30, 55, 17)]
    got = scorer.loglikelihood_rolling(texts)
    for text, total in zip(texts, got):
        windows = get_rolling_token_windows(scorer.encode(text), prefix_token=scorer.prefix_token_id,
                                            max_seq_len=24, context_len=1)
        want = sum(_alone(model, *make_disjoint_window(w))[0] for w in windows)
        assert total == pytest.approx(want, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_generate_until_equals_greedy_generate_alone(models, tok, name):
    model = models[name]
    scorer = CausalLMScorer(model, tok, max_batch_tokens=2000, progress=False)
    rng = random.Random(7)
    prefix = _sentence(rng, 20)
    prompts = [f"{prefix} {_sentence(rng, rng.randint(1, 15))}" for _ in range(5)] + [_sentence(rng, 4)]
    gen_kwargs = {"until": ["owl"], "max_gen_toks": 10, "do_sample": False}
    got = scorer.generate_until([(p, gen_kwargs) for p in prompts])
    want = []
    for prompt in prompts:
        ids = torch.tensor([scorer.encode_prompt(prompt)])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                             use_cache=False, pad_token_id=tok.pad_token_id)
        want.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("owl")[0])
    assert got == want
    assert len(set(want)) >= 4  # the model's generations differ: the comparison means something
    assert scorer.forward_calls <= 10  # one batch: one forward per step, not one generate per request


def _spy_generate(monkeypatch, model):
    calls, real = [], model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return calls


def test_sampled_generation_without_a_kv_cache_runs_one_at_a_time(models, tok, monkeypatch):
    calls = _spy_generate(monkeypatch, models["hfx_lsh"])
    scorer = CausalLMScorer(models["hfx_lsh"], tok, progress=False)
    assert not scorer.decodes_from_cache
    gen_kwargs = {"until": ["owl"], "max_gen_toks": 5, "do_sample": True, "temperature": 1.0}
    requests = [("the cat is", gen_kwargs), ("a big dog", gen_kwargs), ("red owl", gen_kwargs)]
    first = scorer.generate_until(requests)
    # one generate per request, one row each, every step a full forward (the backend cannot decode from a cache)
    assert len(calls) == 3
    assert all(call["use_cache"] is False and call["input_ids"].shape[0] == 1 for call in calls)
    again = CausalLMScorer(models["hfx_lsh"], tok, progress=False).generate_until(requests)
    assert first == again and all(isinstance(text, str) for text in first)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("name,caches", [("hfx_lsh", False), ("hfx_sliding_window", True)])
def test_use_cache_in_gen_kwargs_gives_way_to_a_backend_that_cannot_cache(models, tok, monkeypatch, name, caches, use_cache):
    """lm-eval passes gen_kwargs on to ``generate``, where ``use_cache`` only changes speed: a backend that needs
    every key per forward overrides it (no "multiple values for keyword argument"); other backends keep it."""
    calls = _spy_generate(monkeypatch, models[name])
    scorer = CausalLMScorer(models[name], tok, progress=False)
    assert scorer.decodes_from_cache is caches
    prompts = ["the cat is", "a big dog"]
    greedy = {"until": ["owl"], "max_gen_toks": 4, "do_sample": False}
    got = scorer.generate_until([(p, {**greedy, "use_cache": use_cache}) for p in prompts])
    assert len(calls) == 2  # an option beyond do_sample: one generate per request
    assert all(call["use_cache"] is (use_cache and caches) for call in calls)
    assert got == CausalLMScorer(models[name], tok, progress=False).generate_until([(p, greedy) for p in prompts])




@pytest.mark.parametrize("name", ["hfx_sliding_window", "hfx_block_sparse", "hfx_lsh"])
def test_multiple_choice_task_end_to_end_gives_the_one_at_a_time_accuracy(models, tok, name, tmp_path):
    import json

    rng = random.Random(11)
    for split, n in (("train", 6), ("test", 8)):
        with open(tmp_path / f"{split}.jsonl", "w") as handle:
            for _ in range(n):
                handle.write(json.dumps({"question": _sentence(rng, rng.randint(3, 8)), "label": rng.randrange(4),
                                         "choices": [_sentence(rng, rng.randint(1, 3)) for _ in range(4)]}) + "\n")
    (tmp_path / "long_mc.yaml").write_text(MC.format(name="long_mc", root=tmp_path, k=4, splits=(
        "training_split: train\ntest_split: test\nfewshot_config:\n  sampler: first_n")))
    model = models[name]
    results, records = evaluate(model, ["long_mc"], tokenizer=tok, include_path=tmp_path, cache_dir=False,
                                progress=False, return_records=True, max_batch_tokens=512)
    scorer = CausalLMScorer(model, tok, progress=False)
    correct = []
    for record in records["long_mc"]:
        want = [_alone(model, *scorer.encode_pair(c, x)) for c, x in record["arguments"]]
        _assert_lls([tuple(r) for r in record["resps"]], want)
        lls = [ll for ll, _ in want]
        correct.append(lls.index(max(lls)) == record["doc"]["label"])
    assert len(correct) == 8
    assert results["results"]["long_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct), abs=1e-12)


@pytest.mark.slow
def test_quickstart_with_lsh_attention_trains_and_evaluates(tmp_path):
    import json

    from hfx.cli import build_parser
    from hfx.quickstart import STEPS, run_quickstart

    steps = [(n, t) for n, t in STEPS if n in ("data", "tokenizer", "pretrain", "reload", "eval")]
    flags = build_parser().parse_args(["quickstart", "--work-dir", str(tmp_path), "--attention-type", "hfx_lsh",
                                       "--fast", "--steps", "2", "--batch-size", "4", "--max-length", "32",
                                       "--hidden-size", "16"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_quickstart(flags, steps=steps)
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "report.json").read_text())
    evaluation = report["results"]["eval"]["pre-trained"]
    assert set(evaluation) == {"0-shot", "3-shot"}
    for shots in evaluation.values():
        assert all(0.0 <= entry["acc,none"] <= 1.0 for entry in shots.values())
