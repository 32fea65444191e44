"""Python hooks and every task feature against lm-eval 0.4.13 itself, on a tiny local GPT-2 and json data.

One module-scoped fixture writes the task folder (YAML plus the ``utils.py`` its ``!function``s
name) and runs ``lm_eval.simple_evaluate`` once over all tasks; hfx runs the same tasks once with
``allow_code=True``. Every metric and stderr must agree within 1e-6 relative; prompts and
requests must be identical.
"""

import json
import math
import random

import pytest

from hfx.evaluation import TaskError, evaluate, find_tasks
from hfx.evaluation.output_types import task_higher_is_better, task_scores

from tests.test_eval import _gpt2, _sentence, lm_eval_reference

LIMIT = 6
BOOTSTRAP = 500  # lm-eval's bootstrap draws for f1 / mcc / bleu ... (100 000 by default: too slow for a test)

UTILS = '''
import re


def wino_index(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def wino_target(doc):
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def wino_contexts(doc):
    cut = doc["sentence"].index("_")
    return [doc["sentence"][:cut] + option for option in (doc["option1"], doc["option2"])]


def rolling_hook(doc, results):
    (ll,) = results
    return {"wppl": (ll, len(re.split(r"\\s+", doc["text"]))), "bpb": (ll, len(doc["text"].encode("utf-8"))),
            "ll_mean": ll}


def ll_hook(doc, results):
    (ll, greedy), = results
    return {"ll": ll, "greedy": int(greedy), "ppl": ll}


def mc_hook(doc, results):
    n = len(doc["choices"])
    lls = [ll for ll, _ in results]
    mutual = [c - u for c, u in zip(lls[:n], lls[n:])]
    return {"acc_mutual_info": float(max(range(n), key=lambda i: mutual[i]) == doc["label"]),
            "n_results": len(results)}


def gen_labels(doc, results):
    answer = results[0]
    pred = len(answer.split()) % 2
    return {"f1": (doc["label"] % 2, pred), "mcc": (doc["label"] % 2, pred), "chars": len(answer)}


def overlap(references, predictions):
    gold, pred = set(references[0].split()), set(predictions[0].split())
    return len(gold & pred) / max(1, len(gold | pred))


def two_scores(references, predictions):
    return {"len_ratio": len(predictions[0]) / max(1, len(references[0])), "starts": float(
        predictions[0][:1] == references[0][:1])}


def weighted_f1(items):
    from sklearn.metrics import f1_score
    golds, preds = zip(*items)
    return f1_score(golds, preds, average="weighted")


def agg_max(items):
    return max(items)


def agg_sum(items):
    return sum(items)


def samples():
    return [{"question": "the big cat", "choices": ["red", "dog", "owl", "blue"], "label": 1},
            {"question": "a small owl", "choices": ["cat", "green", "baker", "is"], "label": 2}]


def bad_text(doc):
    if doc["idx"] == 3:
        raise ValueError("no text for this one")
    return doc["question"]


def bad_results(doc, results):
    if doc["idx"] == 2:
        raise KeyError("missing")
    return {"acc": 1.0}
'''

HEAD = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {root}/train.jsonl
    test: {root}/test.jsonl
training_split: train
test_split: test
"""

TASKS = {
    # winogrande's partial evaluation: doc_to_text is the gold context's index
    "hk_wino0": """output_type: multiple_choice
doc_to_text: !function utils.wino_index
doc_to_target: !function utils.wino_target
doc_to_choice: !function utils.wino_contexts
num_fewshot: 0
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    # lm-eval's afrimmlu / afrixnli files: a hub metric flag that multiple_choice never calls (runs offline)
    "hk_mc_hub": """output_type: multiple_choice
doc_to_text: "Q: {{question}}\\nA:"
doc_to_target: label
doc_to_choice: choices
num_fewshot: 0
metric_list:
  - metric: f1
    aggregation: !function utils.weighted_f1
    hf_evaluate: true
    average: weighted
  - metric: acc
    aggregation: mean
    hf_evaluate: true
""",
    "hk_wino2": """include: hk_wino0.yaml
num_fewshot: 2
description: "Fill the blank.\\n"
""",
    "hk_rolling": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
process_results: !function utils.rolling_hook
num_fewshot: 0
metric_list:
  - metric: wppl
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bpb
    aggregation: bits_per_byte
    higher_is_better: false
""",
    "hk_ll": """output_type: loglikelihood
doc_to_text: "Q: {{question}}\\nA:"
doc_to_target: " {{choices[label]}}"
process_results: !function utils.ll_hook
num_fewshot: 0
metric_list:
  - metric: ll
    aggregation: mean
  - metric: greedy
    aggregation: mean
  - metric: ppl
    aggregation: perplexity
    higher_is_better: false
""",
    "hk_mi": """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: label
doc_to_choice: choices
num_fewshot: 1
metric_list:
  - metric: acc
  - metric: acc_mutual_info
  - metric: mcc
  - metric: brier_score
""",
    "hk_mi_hook": """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: label
doc_to_choice: choices
process_results: !function utils.mc_hook
num_fewshot: 0
metric_list:
  - metric: acc_mutual_info
""",
    "hk_prefix_mc": """output_type: multiple_choice
doc_to_text: "Question: {{question}}"
doc_to_target: label
doc_to_choice: choices
gen_prefix: "Answer:"
num_fewshot: 2
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "hk_prefix_gen": """output_type: generate_until
doc_to_text: "Q: {{question}}\\n"
doc_to_target: "{{choices[label]}}"
gen_prefix: "The answer is"
fewshot_config:
  gen_prefix: "A:"
  samples: !function utils.samples
num_fewshot: 1
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 5
metric_list:
  - metric: exact_match
""",
    "hk_labels": """output_type: generate_until
doc_to_text: "Q: {{question}}\\nA:"
doc_to_target: "{{choices[label]}}"
process_results: !function utils.gen_labels
num_fewshot: 0
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
metric_list:
  - metric: f1
    aggregation: f1
  - metric: mcc
    aggregation: matthews_corrcoef
  - metric: chars
    aggregation: median
""",
    "hk_translate": """output_type: generate_until
doc_to_text: "Say: {{question}}\\n"
doc_to_target: "{{text}}"
num_fewshot: 0
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
metric_list:
  - metric: bleu
  - metric: chrf
  - metric: ter
  - metric: exact_match
    ignore_case: true
  - metric: !function utils.overlap
    aggregation: !function utils.agg_max
    higher_is_better: false
  - metric: !function utils.two_scores
    aggregation: !function utils.agg_sum
""",
}
NAMES = list(TASKS)


def _write(root):
    rng = random.Random(0)
    for split, n in (("train", 12), ("test", 16)):
        with open(root / f"{split}.jsonl", "w") as handle:
            for idx in range(n):
                choices = [_sentence(rng, rng.randint(1, 4)) for _ in range(4)]
                head, tail = _sentence(rng, rng.randint(2, 5)), _sentence(rng, rng.randint(2, 4))
                handle.write(json.dumps({
                    "idx": idx, "question": _sentence(rng, rng.randint(3, 8)), "choices": choices,
                    "label": rng.randrange(4), "text": _sentence(rng, rng.randint(6, 20)),
                    "sentence": f"{head} _ {tail}", "option1": rng.choice(choices), "option2": _sentence(rng, 1),
                    "answer": rng.choice("12"),
                }) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(UTILS)
    for name, body in TASKS.items():
        head = "" if body.startswith("include:") else HEAD.format(name=name, root=root)
        text = head + body if head else body.replace("include: hk_wino0.yaml\n", f"include: hk_wino0.yaml\ntask: {name}\n")
        (tasks / f"{name}.yaml").write_text(text)
    return tasks


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hooks")
    tasks = _write(root)
    model, tok = _gpt2(root)
    reference = lm_eval_reference(model, tok, tasks, NAMES, limit=LIMIT, bootstrap_iters=BOOTSTRAP)
    loaded = {t.name: t for t in find_tasks(NAMES, [tasks], allow_code=True)}
    results, records = evaluate(model, list(loaded.values()), tokenizer=tok, limit=LIMIT, cache_dir=False,
                                progress=False, return_records=True, max_batch_tokens=512, bootstrap_iters=BOOTSTRAP)
    return {"root": root, "tasks": tasks, "model": (model, tok), "reference": reference, "loaded": loaded,
            "results": results, "records": records}


def _close(ours, ref, key):
    if isinstance(ref, str) or isinstance(ours, str):
        assert ours == ref, key
    elif math.isnan(ref):
        assert math.isnan(ours), key
    else:
        assert ours == pytest.approx(ref, rel=1e-6, abs=1e-12), key


@pytest.mark.parametrize("task", NAMES)
def test_metrics_and_stderrs_match_lm_eval(world, task):
    ref = world["reference"]["results"][task]
    scores = task_scores(world["loaded"][task], world["records"][task], bootstrap_iters=BOOTSTRAP)
    ours = {f"{m},{f}": v for (m, f), (v, _) in scores.items()}
    ours.update({f"{m}_stderr,{f}": s for (m, f), (_, s) in scores.items()})
    expected = {k for k in ref if "," in k}
    assert set(ours) == expected
    for key in expected:
        _close(ours[key], ref[key], key)
    for key in expected:  # the evaluator's own numbers and stderrs too
        _close(world["results"]["results"][task][key], ref[key], key)
    assert task_higher_is_better(world["loaded"][task]) == world["reference"]["higher_is_better"][task]


@pytest.mark.parametrize("task", NAMES)
def test_prompts_and_requests_match_lm_eval(world, task):
    samples = sorted(world["reference"]["samples"][task], key=lambda s: (s["filter"], s["doc_id"]))
    ours = sorted(world["records"][task], key=lambda r: (r.get("filter", "none"), r["doc_id"]))
    assert len(samples) == len(ours) == LIMIT
    for sample, record in zip(samples, ours):
        ref_args = [list(a) for a in sample["arguments"]]
        if world["loaded"][task].output_type == "generate_until":
            assert ref_args[0][0] == record["arguments"][0][0]
            assert sample["resps"][0][0] == record["resps"][0]
        elif world["loaded"][task].output_type == "loglikelihood_rolling":
            assert ref_args == record["arguments"]
        else:
            assert ref_args == record["arguments"]
            lls = [r[0][0] for r in sample["resps"]]
            got = [r[0] for r in record["resps"]]
            assert got == pytest.approx(lls, abs=1e-4)


def test_multiple_input_prompts_are_one_per_context(world):
    """winogrande: the gold context in demonstrations, every context before the shared continuation."""
    record = world["records"]["hk_wino2"][0]
    doc = record["doc"]
    cut = doc["sentence"].index("_")
    contexts = [doc["sentence"][:cut] + option for option in (doc["option1"], doc["option2"])]
    assert [a[0][len(a[0]) - len(c):] for a, c in zip(record["arguments"], contexts)] == contexts
    assert [a[1] for a in record["arguments"]] == [" " + doc["sentence"][cut + 1:].strip()] * 2
    assert all(a[0].startswith("Fill the blank.\n") and a[0].count("\n\n") == 2 for a in record["arguments"])


def test_acc_mutual_info_sends_unconditional_requests(world):
    record = world["records"]["hk_mi_hook"][0]
    n = len(record["doc"]["choices"])
    assert [a[0] for a in record["arguments"][n:]] == [""] * n
    assert record["metrics"]["n_results"] == 2 * n


def _hfx(world, names, **kwargs):
    model, tok = world["model"]
    return evaluate(model, names, tokenizer=tok, include_path=world["tasks"], limit=LIMIT, cache_dir=False,
                    progress=False, **kwargs)


def test_hooks_need_allow_code(world):
    with pytest.raises(TaskError, match="allow-code"):
        _hfx(world, ["hk_rolling"])


def test_a_hook_that_raises_names_task_hook_and_document(world, tmp_path):
    for name, body in (
        ("hk_bad_text", "output_type: multiple_choice\ndoc_to_text: !function utils.bad_text\ndoc_to_target: label\n"
                        "doc_to_choice: choices\n"),
        ("hk_bad_results", "output_type: multiple_choice\ndoc_to_text: question\ndoc_to_target: label\n"
                           "doc_to_choice: choices\nprocess_results: !function utils.bad_results\n"
                           "metric_list:\n  - metric: acc\n"),
    ):
        (world["tasks"] / f"{name}.yaml").write_text(HEAD.format(name=name, root=world["root"]) + body)
    with pytest.raises(TaskError, match=r"'hk_bad_text', document 3: the `doc_to_text` hook [\w.]*utils.bad_text "
                                        r"\(.*tasks/utils\.py:\d+\) raised ValueError: no text for this one"):
        _hfx(world, ["hk_bad_text"], allow_code=True)
    with pytest.raises(TaskError, match=r"'hk_bad_results', document 2: the `process_results` hook "
                                        r"[\w.]*utils.bad_results \(.*utils\.py:\d+\) raised KeyError"):
        _hfx(world, ["hk_bad_results"], allow_code=True)


def test_class_tasks_and_hub_metrics_are_refused_clearly(world):
    (world["tasks"] / "task_cls.py").write_text(
        "from lm_eval.api.task import ConfigurableTask\n\n\nclass Mine(ConfigurableTask):\n"
        "    def construct_requests(self, doc, ctx, **kwargs):\n        return []\n"
    )
    (world["tasks"] / "hk_class.yaml").write_text("task: hk_class\nclass: !function task_cls.Mine\n")
    (world["tasks"] / "hk_hub.yaml").write_text(
        HEAD.format(name="hk_hub", root=world["root"])
        + "output_type: generate_until\ndoc_to_text: question\ndoc_to_target: text\nmetric_list:\n  - metric: rouge\n")
    with pytest.raises(TaskError, match=r"class task, `class: [\w.]*task_cls.Mine`: its constructor is lm-eval's "
                                        r"ConfigurableTask.__init__"):
        _hfx(world, ["hk_class"], allow_code=True)
    with pytest.raises(TaskError, match=r"metric 'rouge' is not in lm-eval's registry.*evaluate"):
        _hfx(world, ["hk_hub"], allow_code=True)
    (world["tasks"] / "hk_hub_gen.yaml").write_text(  # generate_until calls the hub metric: refused
        HEAD.format(name="hk_hub_gen", root=world["root"]) + "output_type: generate_until\ndoc_to_text: question\n"
        "doc_to_target: text\nmetric_list:\n  - metric: exact_match\n    hf_evaluate: true\n")
    with pytest.raises(TaskError, match=r"metric 'exact_match' sets `hf_evaluate: true`.*hub"):
        _hfx(world, ["hk_hub_gen"], allow_code=True)
