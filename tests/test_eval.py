"""hfx eval against lm-eval 0.4.13 itself, on tiny local models and tasks (json data_files, no hub).

One module-scoped fixture builds the models and task files and runs lm_eval once per model;
the parity tests compare per-choice log-likelihoods (1e-4), acc / acc_norm, prompts, rolling
perplexity and greedy generations.
"""

import json
import random

import pytest
import torch

from hfx.evaluation import TaskError, evaluate, find_tasks, markdown_table, write_results

WORDS = "red blue green cat dog owl baker farmer lives in works as the of a is and big small".split()
MC = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {root}/train.jsonl
    test: {root}/test.jsonl
output_type: multiple_choice
{splits}
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: choices
num_fewshot: {k}
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _write_tasks(root):
    rng = random.Random(0)
    for split, n in (("train", 12), ("test", 16)):
        with open(root / f"{split}.jsonl", "w") as handle:
            for _ in range(n):
                choices = [_sentence(rng, rng.randint(1, 4)) for _ in range(4)]
                handle.write(json.dumps({"question": _sentence(rng, rng.randint(3, 8)), "choices": choices,
                                         "label": rng.randrange(4), "text": _sentence(rng, 20)}) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    train_split = "training_split: train\ntest_split: test"
    (tasks / "mc0.yaml").write_text(MC.format(name="tiny_mc0", root=root, splits=train_split, k=0))
    (tasks / "mc3.yaml").write_text(MC.format(name="tiny_mc3", root=root, splits=train_split, k=3))
    # pool == evaluated split: lm-eval draws k+1 and drops the evaluated doc
    (tasks / "mc_self.yaml").write_text(
        MC.format(name="tiny_mc_self", root=root, splits="test_split: test\nfewshot_split: test", k=2)
        + "description: \"Pick the answer.\\n\\n\"\n"
    )
    (tasks / "mc_first.yaml").write_text(
        "include: mc3.yaml\ntask: tiny_mc_first\nfewshot_config:\n  sampler: first_n\ntarget_delimiter: \"  \"\n"
    )
    (tasks / "ppl.yaml").write_text(
        f"task: tiny_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root}/test.jsonl\n"
        "output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: ''\ndoc_to_target: text\nnum_fewshot: 0\n"
    )
    (tasks / "ll.yaml").write_text(
        f"task: tiny_ll\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root}/test.jsonl\n"
        "output_type: loglikelihood\ntest_split: test\ndoc_to_text: \"Q: {{question}}\\nA:\"\n"
        "doc_to_target: \"{{choices[label]}}\"\nnum_fewshot: 0\nmetric_list:\n  - metric: perplexity\n  - metric: acc\n"
    )
    (tasks / "gen.yaml").write_text(
        f"task: tiny_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root}/test.jsonl\n"
        "output_type: generate_until\ntest_split: test\ndoc_to_text: \"Q: {{question}}\\nA:\"\n"
        "doc_to_target: \"{{choices[label]}}\"\nnum_fewshot: 0\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  do_sample: false\n  max_gen_toks: 6\n"
    )
    return tasks


def _gpt2(root):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    rng = random.Random(1)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([_sentence(rng, 12) for _ in range(200)], vocab_size=300,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    return model, tok


def _hfx_causal():
    import hfx
    from hfx.tokenizer import train_tokenizer

    rng = random.Random(2)
    tok = train_tokenizer([_sentence(rng, 12) for _ in range(200)], vocab_size=200)
    torch.manual_seed(1)
    config = hfx.HfxConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=256, is_decoder=True, norm_position="pre",
                           position_embedding_type="rotary", norm_type="rmsnorm", hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    return hfx.HfxForCausalLM(config).eval(), tok


def lm_eval_reference(model, tok, tasks, names, **kwargs):
    """``lm_eval.simple_evaluate`` on local task files only (not its bundled catalogue), HFLM at batch 4."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    return lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=4), tasks=names,
                                   task_manager=manager, log_samples=True, **kwargs)


PARITY_TASKS = ["tiny_mc0", "tiny_mc3", "tiny_mc_self", "tiny_mc_first", "tiny_ppl", "tiny_ll", "tiny_gen"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("eval")
    tasks = _write_tasks(root)
    models = {"gpt2": _gpt2(root), "hfx": _hfx_causal()}
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    reference = {}
    for name, (model, tok) in models.items():
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
        reference[name] = lm_eval.simple_evaluate(
            model=lm, tasks=PARITY_TASKS, task_manager=manager, log_samples=True, limit=10
        )
    return {"root": root, "tasks": tasks, "models": models, "reference": reference}


@pytest.fixture(scope="module")
def ours(world):
    out = {}
    for name, (model, tok) in world["models"].items():
        out[name] = evaluate(model, PARITY_TASKS, tokenizer=tok, include_path=world["tasks"], limit=10,
                             cache_dir=False, progress=False, return_records=True, max_batch_tokens=256)
    return out


@pytest.mark.parametrize("model_name", ["gpt2", "hfx"])
@pytest.mark.parametrize("task", ["tiny_mc0", "tiny_mc3", "tiny_mc_self", "tiny_mc_first"])
def test_multiple_choice_matches_lm_eval(world, ours, model_name, task):
    ref = world["reference"][model_name]
    results, records = ours[model_name]
    ref_samples = sorted(ref["samples"][task], key=lambda s: s["doc_id"])
    assert len(ref_samples) == len(records[task]) == 10
    for sample, record in zip(ref_samples, records[task]):
        assert [list(a) for a in sample["arguments"]] == record["arguments"]  # identical prompts and choices
        ref_lls = [r[0][0] for r in sample["resps"]]
        assert [ll for ll, _ in record["resps"]] == pytest.approx(ref_lls, abs=1e-4)
        assert [bool(r[0][1]) for r in sample["resps"]] == [g for _, g in record["resps"]]
    for metric in ("acc,none", "acc_norm,none", "acc_stderr,none", "acc_norm_stderr,none"):
        assert results["results"][task][metric] == pytest.approx(ref["results"][task][metric], abs=1e-12)
    assert results["n-shot"][task] == ref["n-shot"][task]


@pytest.mark.parametrize("model_name", ["gpt2", "hfx"])
def test_rolling_and_generation_match_lm_eval(world, ours, model_name):
    ref = world["reference"][model_name]
    results, records = ours[model_name]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert results["results"]["tiny_ppl"][metric] == pytest.approx(ref["results"]["tiny_ppl"][metric], rel=1e-5)
    ref_gen = [s["resps"][0][0] for s in sorted(ref["samples"]["tiny_gen"], key=lambda s: s["doc_id"])]
    assert [r["resps"][0] for r in records["tiny_gen"]] == ref_gen
    assert results["results"]["tiny_gen"]["exact_match,none"] == ref["results"]["tiny_gen"]["exact_match,none"]


@pytest.mark.parametrize("model_name", ["gpt2", "hfx"])
def test_loglikelihood_perplexity_and_its_bootstrap_stderr_match_lm_eval(world, ours, model_name):
    """lm-eval bootstraps perplexity's stderr (100 000 resamples); hfx reproduces its draws exactly."""
    ref = world["reference"][model_name]["results"]["tiny_ll"]
    got = ours[model_name][0]["results"]["tiny_ll"]
    for metric in ("perplexity,none", "acc,none", "acc_stderr,none"):
        assert got[metric] == pytest.approx(ref[metric], rel=1e-5)
    assert isinstance(ref["perplexity_stderr,none"], float) and ref["perplexity_stderr,none"] > 0
    assert got["perplexity_stderr,none"] == pytest.approx(ref["perplexity_stderr,none"], rel=1e-5)


@pytest.mark.parametrize("n, iters", [(2, 1000), (10, 100_000), (37, 2500), (150, 999)])
def test_bootstrap_stderr_equals_lm_eval_draw_for_draw(n, iters, monkeypatch, capsys):
    from lm_eval.api.metrics import bootstrap_stderr as lm_eval_bootstrap
    from lm_eval.api.metrics import perplexity

    from hfx.evaluation.metrics import bootstrap_stderr

    monkeypatch.setenv("DISABLE_MULTIPROC", "1")  # lm-eval's own single-process path, same draws as its pool
    rng = random.Random(n)
    lls = [-rng.expovariate(0.5) for _ in range(n)]
    assert bootstrap_stderr(lls, iters) == pytest.approx(lm_eval_bootstrap(perplexity, lls, iters), rel=1e-12)


def test_batch_size_does_not_move_scores(world):
    model, tok = world["models"]["gpt2"]
    runs = [
        evaluate(model, "tiny_mc3", tokenizer=tok, include_path=world["tasks"], cache_dir=False, progress=False,
                 return_records=True, batch_size=bs, max_batch_tokens=tokens)[1]["tiny_mc3"]
        for bs, tokens in ((1, 100000), (64, 100000), (None, 300))
    ]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert [x[0] for x in a["resps"]] == pytest.approx([x[0] for x in b["resps"]], abs=1e-5)


def test_cache_resumes_and_is_keyed_by_model(world, tmp_path):
    from hfx.evaluation.scorer import CausalLMScorer

    model, tok = world["models"]["gpt2"]
    calls = []
    original = CausalLMScorer._scored_positions

    def counting(self, *args):
        calls.append(1)
        return original(self, *args)

    CausalLMScorer._scored_positions = counting
    try:
        first = evaluate(world["root"] / "gpt2", "tiny_mc0", include_path=world["tasks"], cache_dir=tmp_path, progress=False)
        n_first = len(calls)
        again = evaluate(world["root"] / "gpt2", "tiny_mc0", include_path=world["tasks"], cache_dir=tmp_path, progress=False)
        assert len(calls) == n_first and n_first > 0  # resumed entirely from the cache
        assert again["results"] == first["results"]
        changed = type(model)(model.config).eval()  # same path-less config, other weights
        evaluate(changed, "tiny_mc0", tokenizer=tok, include_path=world["tasks"], cache_dir=tmp_path, progress=False)
        assert len(calls) > n_first  # a changed model never reuses the old results
    finally:
        CausalLMScorer._scored_positions = original


def test_results_json_and_table(world, ours, tmp_path):
    results, _ = ours["gpt2"]
    path = write_results(tmp_path / "r.json", results)
    data = json.loads(path.read_text())
    assert set(data) >= {"results", "configs", "versions", "n-shot", "config", "higher_is_better", "n-samples"}
    assert data["config"]["fewshot_seed"] == 1234
    assert data["configs"]["tiny_mc3"]["num_fewshot"] == 3
    table = markdown_table(results)
    assert "| tiny_mc3 |" in table and "acc_norm" in table


def test_bad_input_fails_before_the_model_runs(world, tmp_path):
    model, tok = world["models"]["gpt2"]
    with pytest.raises(TaskError, match=r"Unknown task 'tiny_mc'\. Did you mean \[.*'tiny_mc0'"):
        find_tasks("tiny_mc", [world["tasks"]])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "t.yaml").write_text((world["tasks"] / "mc0.yaml").read_text().replace("tiny_mc0", "bad_field")
                                .replace("{{question}}", "{{questoin}}"))
    with pytest.raises(TaskError, match=r"questoin.*Available fields: \['choices', 'label', 'question', 'text'\]"):
        evaluate(object(), "bad_field", tokenizer=tok, include_path=bad, cache_dir=False)
    with pytest.raises(TaskError, match="num_fewshot=13 but the few-shot pool has only 12"):
        evaluate(object(), "tiny_mc3", tokenizer=tok, num_fewshot=13, include_path=world["tasks"], cache_dir=False)
    from transformers import BertConfig, BertForMaskedLM

    encoder = BertForMaskedLM(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=64))
    with pytest.raises(TaskError, match="not a causal LM"):
        evaluate(encoder, "tiny_mc0", tokenizer=tok, include_path=world["tasks"], cache_dir=False)
    encoder.save_pretrained(tmp_path / "bert")
    with pytest.raises(TaskError, match="not a causal LM"):
        evaluate(tmp_path / "bert", "tiny_mc0", include_path=world["tasks"], cache_dir=False)


def test_function_tag_needs_allow_code_and_jinja_is_sandboxed(world, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "utils.py").write_text("def text(doc):\n    return 'Q: ' + doc['question']\n")
    (code / "t.yaml").write_text((world["tasks"] / "mc0.yaml").read_text().replace("tiny_mc0", "with_code")
                                 .replace('"Question: {{question}}\\nAnswer:"', "!function utils.text"))
    with pytest.raises(TaskError, match="--allow-code"):
        find_tasks("with_code", [code])
    (task,) = find_tasks("with_code", [code], allow_code=True)
    assert task.doc_to_text({"question": "why"}) == "Q: why"
    from jinja2.exceptions import SecurityError

    from hfx.evaluation.templates import render

    with pytest.raises(SecurityError):
        render("{{ x.append(1) }}", {"x": []})
    with pytest.raises(SecurityError):
        render("{{ x.__class__.__mro__ }}", {"x": ""}) and render("{{ ''.__class__.__subclasses__() }}", {})


def test_saved_hfx_causal_model_is_evaluated_by_path(world, ours, tmp_path):
    model, tok = world["models"]["hfx"]
    model.save_pretrained(tmp_path / "hfx")
    tok.save_pretrained(tmp_path / "hfx")
    by_path = evaluate(tmp_path / "hfx", ["tiny_mc0"], include_path=world["tasks"], limit=10, cache_dir=False,
                       progress=False)
    results = by_path[0] if isinstance(by_path, tuple) else by_path
    in_memory = ours["hfx"][0] if isinstance(ours["hfx"], tuple) else ours["hfx"]
    for metric in ("acc,none", "acc_norm,none"):
        assert results["results"]["tiny_mc0"][metric] == in_memory["results"]["tiny_mc0"][metric]


@pytest.mark.parametrize("gen_kwargs, expected", [
    ({}, {"do_sample": False}),
    ({"do_sample": False, "temperature": 0.0}, {"do_sample": False}),
    ({"temperature": 0}, {"do_sample": False}),
    ({"top_k": 5, "num_beams": 2}, {"do_sample": False, "num_beams": 2}),
    ({"do_sample": True, "temperature": 0.7, "top_p": 0.9}, {"do_sample": True, "temperature": 0.7, "top_p": 0.9}),
])
def test_generation_kwargs_reach_generate_as_lm_eval_reads_them(gen_kwargs, expected):
    from hfx.evaluation.generation import generation_options

    assert generation_options(gen_kwargs) == expected


def test_sampling_task_samples_and_is_reproducible_with_a_seed(world, tmp_path):
    """do_sample: true is honoured (it was once silently greedy); a fixed torch seed repeats the samples."""
    model, tok = world["models"]["gpt2"]
    (tmp_path / "sample.yaml").write_text(
        (world["tasks"] / "gen.yaml").read_text().replace("tiny_gen", "tiny_sample")
        .replace("do_sample: false", "do_sample: true\n  temperature: 5.0")
    )

    def run():
        torch.manual_seed(0)
        _, records = evaluate(model, ["tiny_sample"], tokenizer=tok, include_path=tmp_path, limit=6,
                              cache_dir=False, progress=False, return_records=True)
        return [r["resps"][0] for r in records["tiny_sample"]]

    _, greedy = evaluate(model, ["tiny_gen"], tokenizer=tok, include_path=world["tasks"], limit=6, cache_dir=False,
                         progress=False, return_records=True)
    first = run()
    assert first == run()
    assert first != [r["resps"][0] for r in greedy["tiny_gen"]]
