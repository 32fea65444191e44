"""Cross-document prefix sharing and ``batch_size="auto"`` in the loglikelihood scorer, against lm-eval 0.4.13.

A ``first_n`` few-shot task gives every document the same description and shots: the scorer
computes that token prefix once and scores every document's tail after it. These tests check the
numbers against lm-eval (task level and request level), the fallbacks (a BPE merge across the
prefix boundary, left truncation at max_length, models that cannot take a cached prefix) and the
automatic token budget.
"""

import json
import logging
import random

import pytest
import torch

from hfx.evaluation import evaluate
from hfx.evaluation.scorer import (
    AUTO_CPU_BUDGETS,
    CausalLMScorer,
    find_token_budget,
    prefix_probe_tolerance,
    shared_prefix_groups,
)
from tests.test_eval import _gpt2, _hfx_causal, _sentence, lm_eval_reference

MMLU = """task: tiny_mmlu
dataset_path: json
dataset_kwargs:
  data_files:
    dev: {root}/dev.jsonl
    test: {root}/test.jsonl
output_type: multiple_choice
fewshot_split: dev
test_split: test
fewshot_config:
  sampler: first_n
description: "the farmer and the baker:\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
num_fewshot: 5
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    rng = random.Random(5)
    for split, n in (("dev", 5), ("test", 14)):
        with open(root / f"{split}.jsonl", "w") as handle:
            for _ in range(n):
                handle.write(json.dumps({"question": _sentence(rng, rng.randint(3, 6)),
                                         "choices": [_sentence(rng, 1) for _ in range(4)],
                                         "answer": rng.randrange(4)}) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "mmlu.yaml").write_text(MMLU.format(root=root))
    return {"root": root, "tasks": tasks, "models": {"gpt2": _gpt2(root), "hfx": _hfx_causal()}}


def _lm_eval_requests(model, tok, requests, **kwargs):
    """lm-eval's own ``HFLM.loglikelihood`` on raw (context, continuation) requests."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, **kwargs)
    instances = [Instance("loglikelihood", {}, request, i) for i, request in enumerate(requests)]
    return lm.loglikelihood(instances, disable_tqdm=True)


@pytest.mark.parametrize("model_name", ["gpt2", "hfx"])
def test_first_n_task_shares_its_prefix_and_matches_lm_eval(world, model_name, monkeypatch):
    model, tok = world["models"][model_name]
    ref = lm_eval_reference(model, tok, world["tasks"], ["tiny_mmlu"])
    computed = []
    original = CausalLMScorer.prefix_cache

    def spy(self, tokens):
        computed.append(len(tokens))
        return original(self, tokens)

    monkeypatch.setattr(CausalLMScorer, "prefix_cache", spy)
    results, records = evaluate(model, "tiny_mmlu", tokenizer=tok, include_path=world["tasks"], cache_dir=False,
                                progress=False, return_records=True)
    # the capability probe, then the description and five shots once for all 14 documents
    assert len(computed) == 2 and computed[1] > 100
    assert max(len(tok(ctx)["input_ids"]) for ctx, _ in (a for r in records["tiny_mmlu"] for a in r["arguments"])) < 256
    samples = sorted(ref["samples"]["tiny_mmlu"], key=lambda s: s["doc_id"])
    assert len(samples) == len(records["tiny_mmlu"]) == 14
    for sample, record in zip(samples, records["tiny_mmlu"]):
        assert [list(a) for a in sample["arguments"]] == record["arguments"]
        assert [ll for ll, _ in record["resps"]] == pytest.approx([r[0][0] for r in sample["resps"]], abs=1e-5)
        assert [g for _, g in record["resps"]] == [bool(r[0][1]) for r in sample["resps"]]
    for metric in ("acc,none", "acc_norm,none"):
        assert results["results"]["tiny_mmlu"][metric] == ref["results"]["tiny_mmlu"][metric]


def test_rows_whose_tokens_do_not_start_with_the_prefix_are_scored_whole(world):
    """A document glued onto the shots' last word ("...ca" + "t sat") merges across the boundary in BPE:
    the shared prefix stops before that token, and a document starting elsewhere is left out."""
    model, tok = world["models"]["gpt2"]
    rng = random.Random(7)
    shots = "\n\n".join(_sentence(rng, 25) for _ in range(3)) + " ca"
    requests = [(shots + "\n\nQ: " + _sentence(rng, 4) + "\nA:", " " + _sentence(rng, rng.randint(1, 2)))
                for _ in range(8)]
    requests += [(shots + "t " + _sentence(rng, 4) + "\nA:", " dog"), (shots + "t\nA:", " owl small")]
    requests += [("Pick one.\n\n" + shots + "\n\nQ: big\nA:", " red")]  # the shots, but not at the start
    scorer = CausalLMScorer(model, tok, progress=False)
    pairs = scorer.encode_pairs(requests)
    shot_ids = scorer.encode(shots)
    assert pairs[0][0][: len(shot_ids)] == shot_ids != pairs[8][0][: len(shot_ids)]  # the merge happened
    ((length, members),) = shared_prefix_groups([ctx for ctx, _ in pairs])
    assert sorted(members) == list(range(10)) and length < len(shot_ids)
    ours = scorer.loglikelihood(requests)
    ref = _lm_eval_requests(model, tok, requests)
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in ref], abs=1e-5)
    assert [g for _, g in ours] == [bool(g) for _, g in ref]


def test_left_truncation_at_max_length_falls_back_and_matches_lm_eval(world):
    model, tok = world["models"]["gpt2"]
    rng = random.Random(8)
    shots = "\n\n".join(_sentence(rng, 14) for _ in range(3))
    requests = [(shots + "\n\nQ: " + _sentence(rng, rng.randint(1, 12)) + "\nA:", " " + _sentence(rng, 2))
                for _ in range(12)]
    lengths = sorted(len(c) + len(x) for c, x in CausalLMScorer(model, tok).encode_pairs(requests))
    limit = lengths[len(lengths) // 2]
    scorer = CausalLMScorer(model, tok, progress=False, max_length=limit)
    assert lengths[0] <= limit + 1 < lengths[-1]  # some pairs are cut on the left, some are not
    ours = scorer.loglikelihood(requests)
    assert scorer.forward_calls > 1
    ref = _lm_eval_requests(model, tok, requests, max_length=limit)
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in ref], abs=1e-5)
    assert [g for _, g in ours] == [bool(g) for _, g in ref]


def test_shared_prefix_groups_takes_the_run_saving_most_and_leaves_a_token_to_each_row():
    common = list(range(100, 220))
    contexts = [common + [i, 7, 8] for i in range(6)]  # six rows share 120 tokens
    contexts += [[1] + common]  # shares nothing at the start
    contexts += [common]  # the prefix itself: at most 119 tokens can be shared with it
    groups = shared_prefix_groups(contexts)
    assert [(n, sorted(m)) for n, m in groups] == [(119, [0, 1, 2, 3, 4, 5, 7])]
    assert shared_prefix_groups(contexts[:6], min_saving=10_000) == []  # not worth it
    assert shared_prefix_groups([list(range(20)) + [i] for i in range(40)]) == []  # prefix under 32 tokens
    two = shared_prefix_groups([[5] * 200 + [i] for i in range(5)] + [[9] * 300 + [i] for i in range(3)])
    assert sorted((n, sorted(m)) for n, m in two) == [(200, [0, 1, 2, 3, 4]), (300, [5, 6, 7])]


class _NoCache(torch.nn.Module):
    """A causal LM whose forward takes no past_key_values (or, ``drop=True``, takes and ignores it)."""

    def __init__(self, inner, drop=False):
        super().__init__()
        self.inner, self.config = inner, inner.config
        if drop:
            self.forward = self.forward_dropping

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)

    def forward_dropping(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None,
                         past_key_values=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)


@pytest.mark.parametrize("drop, reason", [(False, "takes no past_key_values"), (True, "after a cached prefix")])
def test_models_that_cannot_take_a_cached_prefix_are_scored_whole(world, caplog, drop, reason):
    model, tok = world["models"]["gpt2"]
    rng = random.Random(9)
    shots = "\n\n".join(_sentence(rng, 25) for _ in range(3))
    requests = [(shots + "\n\nQ: " + _sentence(rng, 4) + "\nA:", " " + _sentence(rng, 2)) for _ in range(8)]
    shared = CausalLMScorer(model, tok, progress=False)
    expected = shared.loglikelihood(requests)
    assert shared.shares_prefixes
    plain = CausalLMScorer(_NoCache(model, drop), tok, progress=False)
    with caplog.at_level(logging.DEBUG, logger="hfx.evaluation.scorer"):
        got = plain.loglikelihood(requests)
    assert plain.shares_prefixes is False
    assert any("no cross-document prefix sharing" in r.message and reason in r.message for r in caplog.records)
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=1e-5)


def test_the_probe_accepts_fp32_rounding_only(world, monkeypatch):
    """fp32: 1e-5 relative to the log-likelihood (~80 ulps), so a shared-prefix path off by 2e-4 at |ll| ≈ 10
    (what the old 1e-3 let through) is refused; reduced precision gets a bound from its own epsilon."""
    assert prefix_probe_tolerance(torch.float32, 0.3) == 1e-5
    assert prefix_probe_tolerance(torch.float32, 12.0) == pytest.approx(1.2e-4)
    assert prefix_probe_tolerance(torch.float16, 1.0) == 5e-2
    assert prefix_probe_tolerance(torch.bfloat16, 20.0) == pytest.approx(4 * 2**-7 * 20)
    model, tok = world["models"]["gpt2"]
    exact = CausalLMScorer(model, tok, progress=False)
    assert exact.shares_prefixes
    off = CausalLMScorer(model, tok, progress=False)
    inner = off._forward

    def shifted(rows, prefix=(), past=None):
        out = inner(rows, prefix, past)
        return [[(ll + (2e-4 if prefix else 0.0), g) for ll, g in row] for row in out] if prefix else out

    monkeypatch.setattr(off, "_forward", shifted)
    assert off.shares_prefixes is False


def test_auto_batch_size_gives_the_fixed_budget_numbers_and_says_what_it_chose(world):
    model, tok = world["models"]["gpt2"]
    rng = random.Random(10)
    shots = "\n\n".join(_sentence(rng, 25) for _ in range(3))
    requests = [(shots + "\n\nQ: " + _sentence(rng, rng.randint(2, 9)) + "\nA:", " " + _sentence(rng, rng.randint(1, 3)))
                for _ in range(120)]
    requests += [("Q: " + _sentence(rng, 6) + "\nA:", " " + _sentence(rng, 2)) for _ in range(20)]
    auto = CausalLMScorer(model, tok, progress=False, batch_size="auto")
    fixed = CausalLMScorer(model, tok, progress=False, max_batch_tokens=512)
    got, expected = auto.loglikelihood(requests), fixed.loglikelihood(requests)
    # other batches: other padded widths and matrix shapes, so float rounding only (fp32, |ll| < 40: < 1e-5)
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=1e-5)
    assert [g for _, g in got] == [g for _, g in expected]
    info = auto.batch_info
    assert info["mode"] == "auto-cpu" and info["max_batch_tokens"] in AUTO_CPU_BUDGETS and info["rows"] is None
    assert list(info["probe"]) == list(AUTO_CPU_BUDGETS[: len(info["probe"])]) and len(info["probe"]) >= 2
    assert all(p["tokens"] > 0 and p["tokens_per_s"] > 0 for p in info["probe"].values())
    assert {k: fixed.batch_info[k] for k in ("mode", "max_batch_tokens", "rows")} == {
        "mode": "fixed", "max_batch_tokens": 512, "rows": None}
    assert fixed.batch_info["prefix_kv_keys_in_memory"] > 0  # the shared-prefix batches' memory bound
    with pytest.raises(ValueError, match="batch_size must be a positive int, 'auto' or None, got 'big'"):
        CausalLMScorer(model, tok, batch_size="big")


def test_cuda_auto_budget_halves_on_out_of_memory(world, monkeypatch):
    tried = {}

    def fits(budget):
        if budget > 5000:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")

    assert find_token_budget(fits, 65536, tried) == 4096
    assert tried == {65536: "out of memory", 32768: "out of memory", 16384: "out of memory",
                     8192: "out of memory", 4096: "ok"}
    with pytest.raises(torch.cuda.OutOfMemoryError):
        find_token_budget(lambda budget: fits(budget * 10_000), 65536, minimum=16)

    # the scorer's CUDA branch: a worst-case forward (full-length rows) per budget, nothing scored
    model, tok = world["models"]["gpt2"]
    scorer = CausalLMScorer(model, tok, progress=False, batch_size="auto")
    shapes = []

    def fake_forward(rows, prefix=(), past=None):
        shapes.append((len(rows), rows[0].length))
        if len(rows) * rows[0].length > 3000:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        return [[(0.0, True)] for _ in rows]

    monkeypatch.setattr(scorer, "_forward", fake_forward)
    scorer.device = torch.device("cuda", 0)
    plan = [([], [])]
    assert scorer._resolve_auto_budget(plan, record=None) is plan
    assert scorer.max_batch_tokens == 2048  # 64 x 256 = 16384, 8192, 4096 fail; 2048 fits
    assert shapes == [(64, 255), (32, 255), (16, 255), (8, 255)]
    assert scorer.batch_info["mode"] == "auto-cuda" and scorer.batch_info["max_batch_tokens"] == 2048
