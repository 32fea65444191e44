"""Python ``class:`` tasks (lm-eval Task subclasses) against lm-eval 0.4.13 itself, on a tiny local GPT-2.

One module-scoped fixture writes a task folder with two ConfigurableTask subclasses (local json
data): a two-choice log-likelihood task with few-shot prompts, and a task whose documents each
make generate_until, loglikelihood and loglikelihood_rolling requests (repeats 2). lm-eval's
``simple_evaluate`` runs them once; hfx runs them once with ``allow_code=True``. Every metric and
stderr (closed form, bootstrap, N/A) must agree within 1e-6 relative, and so must the requests.
"""

import json
import math
import random
from pathlib import Path

import pytest

from hfx.evaluation import TaskError, evaluate, find_tasks
from tests.test_eval import _gpt2, _sentence, lm_eval_reference

LIMIT = 5
BOOTSTRAP = 200
NAMES = ["cls_two", "cls_gen"]

CODE = '''
import numpy as np

from lm_eval.api.instance import Instance
from lm_eval.api.metrics import mean, median, weighted_perplexity
from lm_eval.api.task import ConfigurableTask


def _kw(kwargs):
    return {k: v for k, v in kwargs.items() if k not in ("apply_chat_template", "chat_template")}


class TwoChoice(ConfigurableTask):
    """Two of the choices, scored by log-likelihood after a few-shot prompt the base class builds."""

    def __init__(self, config=None):  # lm-eval passes the task file, `class` included, which its TaskConfig refuses
        super().__init__(config={k: v for k, v in config.items() if k != "class"})

    def doc_to_text(self, doc, doc_to_text=None):
        return "Q: " + doc["question"] + "\\nA:"

    def doc_to_target(self, doc, doc_to_target=None):
        return doc["choices"][doc["label"] % 2]

    def construct_requests(self, doc, ctx, **kwargs):
        return [Instance(request_type="loglikelihood", doc=doc, arguments=(ctx, " " + c), idx=i, **_kw(kwargs))
                for i, c in enumerate(doc["choices"][:2])]

    def process_results(self, doc, results):
        lls = [ll for ll, _ in results]
        gold = doc["label"] % 2
        return {"acc2": float(lls[gold] >= lls[1 - gold]), "margin": lls[gold] - lls[1 - gold],
                "gold_ll": lls[gold], "plain": float(results[gold][1])}

    def aggregation(self):
        return {"acc2": mean, "margin": median, "gold_ll": np.mean}  # "plain": lm-eval's mean by default

    def higher_is_better(self):
        return {"acc2": True, "margin": True, "gold_ll": True}


class Generate(ConfigurableTask):
    """A generation, a log-likelihood and a rolling log-likelihood per document."""

    def __init__(self, config=None):  # lm-eval passes the task file, `class` included, which its TaskConfig refuses
        super().__init__(config={k: v for k, v in config.items() if k != "class"})

    def doc_to_text(self, doc, doc_to_text=None):
        return "Q: " + doc["question"] + "\\nA:"

    def construct_requests(self, doc, ctx, **kwargs):
        kw = _kw(kwargs)
        return [Instance(request_type="generate_until", doc=doc, arguments=(ctx, {"until": ["\\n"], "max_gen_toks": 5}),
                         idx=0, **kw),
                Instance(request_type="loglikelihood", doc=doc, arguments=(ctx, " " + doc["choices"][0]), idx=1, **kw),
                Instance(request_type="loglikelihood_rolling", doc=doc, arguments=(doc["text"],), idx=2, **kw)]

    def process_results(self, doc, results):
        text, (ll, greedy), rolling = results
        return {"contains": float(doc["choices"][0].split()[0] in text), "ll": ll, "greedy": float(greedy),
                "chars": len(text), "wppl": (rolling, len(doc["text"].split()))}

    def aggregation(self):
        return {"contains": mean, "ll": mean, "chars": np.mean, "wppl": weighted_perplexity}

    def higher_is_better(self):
        return {"contains": True, "ll": True, "chars": True, "wppl": False}


class Internals(TwoChoice):
    def apply_filters(self):
        return None

    def build_all_requests(self, **kwargs):
        return super().build_all_requests(**kwargs)


class NotATask:
    def __init__(self, config=None):
        self.config = config
'''

HEAD = """task: {name}
class: !function task_cls.{cls}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {root}/train.jsonl
    test: {root}/test.jsonl
training_split: train
test_split: test
doc_to_target: text
"""


def _write(root: Path) -> Path:
    rng = random.Random(7)
    for split, n in (("train", 8), ("test", 10)):
        with open(root / f"{split}.jsonl", "w") as handle:
            for _ in range(n):
                handle.write(json.dumps({"question": _sentence(rng, rng.randint(3, 7)),
                                         "choices": [_sentence(rng, rng.randint(1, 3)) for _ in range(3)],
                                         "label": rng.randrange(3), "text": _sentence(rng, rng.randint(5, 12))}) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "task_cls.py").write_text(CODE)
    (tasks / "cls_two.yaml").write_text(HEAD.format(name="cls_two", cls="TwoChoice", root=root) + "num_fewshot: 2\n")
    (tasks / "cls_gen.yaml").write_text(HEAD.format(name="cls_gen", cls="Generate", root=root) + "repeats: 2\n")
    (tasks / "cls_internals.yaml").write_text(HEAD.format(name="cls_internals", cls="Internals", root=root))
    (tasks / "cls_plain.yaml").write_text(HEAD.format(name="cls_plain", cls="NotATask", root=root))
    return tasks


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("class_tasks")
    tasks = _write(root)
    model, tok = _gpt2(root)
    reference = lm_eval_reference(model, tok, tasks, NAMES, limit=LIMIT, bootstrap_iters=BOOTSTRAP)
    results, records = evaluate(model, NAMES, tokenizer=tok, include_path=tasks, allow_code=True, limit=LIMIT,
                                cache_dir=False, progress=False, return_records=True, max_batch_tokens=512,
                                bootstrap_iters=BOOTSTRAP)
    return {"root": root, "tasks": tasks, "model": (model, tok), "reference": reference, "results": results,
            "records": records}


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
    ours = world["results"]["results"][task]
    expected = {k for k in ref if "," in k}
    assert expected == {k for k in ours if "," in k}
    assert len(expected) >= 8
    for key in expected:
        _close(ours[key], ref[key], key)
    # closed-form, bootstrapped and N/A stderrs all occur
    stderrs = [ref[k] for k in expected if "_stderr," in k]
    assert "N/A" in stderrs and any(isinstance(s, float) for s in stderrs)
    assert world["results"]["higher_is_better"][task] == world["reference"]["higher_is_better"][task]
    for section in ("versions", "n-samples", "n-shot"):
        assert world["results"][section][task] == world["reference"][section][task], section


@pytest.mark.parametrize("task", NAMES)
def test_requests_and_responses_match_lm_eval(world, task):
    ref = world["reference"]["samples"][task]
    ours = world["records"][task]
    assert len(ours) == len(ref) == LIMIT
    for mine, theirs in zip(ours, ref):
        assert mine["doc_id"] == theirs["doc_id"]
        assert [tuple(a) for a in mine["arguments"]] == [tuple(a) for a in theirs["arguments"]]
        assert mine["target"] == theirs["target"]
        for a, b in zip(mine["filtered_resps"], theirs["filtered_resps"]):
            if isinstance(b, str):
                assert a == b
            elif isinstance(b, (list, tuple)):
                assert a[0] == pytest.approx(float(b[0]), rel=1e-5) and bool(a[1]) == (b[1] in (True, "True"))
            else:
                assert a == pytest.approx(float(b), rel=1e-5)
    if task == "cls_two":  # the few-shot prompt the class's base builds
        assert ours[0]["arguments"][0][0].count("Q: ") == 3
    else:  # repeats: 2 copies of each answer, as lm-eval clones the request
        assert all(len(r) == 2 for r in ours[0]["resps"])


def test_class_overriding_internals_is_refused_naming_them(world):
    with pytest.raises(TaskError, match=r"class task, `class: [\w.]*task_cls.Internals`: it overrides lm-eval "
                                        r"internals apply_filters, build_all_requests"):
        find_tasks(["cls_internals"], [world["tasks"]], allow_code=True)


def test_class_that_is_not_an_lm_eval_task_is_refused(world):
    with pytest.raises(TaskError, match=r"`class: [\w.]*task_cls.NotATask`: it is not a subclass of lm-eval's"):
        find_tasks(["cls_plain"], [world["tasks"]], allow_code=True)


def test_class_without_lm_eval_names_the_extra(world, monkeypatch):
    from hfx.evaluation import class_tasks

    monkeypatch.setattr(class_tasks, "_lm_eval_task", lambda: None)
    with pytest.raises(TaskError, match=r"`class: [\w.]*task_cls.TwoChoice`: .*pip install \"hfx\[lm-eval\]\""):
        find_tasks(["cls_two"], [world["tasks"]], allow_code=True)


def test_class_without_allow_code_is_the_function_refusal(world):
    with pytest.raises(TaskError, match=r"uses `!function task_cls.TwoChoice`.*--allow-code"):
        find_tasks(["cls_two"], [world["tasks"]])


def test_bundled_class_tasks_validate_without_loading_data(monkeypatch):
    import datasets
    import lm_eval

    from hfx.evaluation.catalogue import TaskIndex
    from hfx.evaluation.validation import validate_task

    def no_data(*args, **kwargs):
        raise AssertionError("validation loaded a dataset")

    monkeypatch.setattr(datasets, "load_dataset", no_data)
    bundled = Path(lm_eval.__file__).parent / "tasks"
    for folder, name in (("squadv2", "squadv2"), ("fda", "fda"), ("swde", "swde")):
        verdict = validate_task(TaskIndex([bundled / folder], allow_code=True), name)
        assert verdict.accepted, verdict.reason
        assert verdict.output_type == "class"


def test_class_with_lm_evals_own_constructor_is_refused(world):
    # lm-eval's factory passes the task file, `class` included, to ConfigurableTask.__init__: it always fails
    (world["tasks"] / "cls_ctor.py").write_text(
        "from lm_eval.api.task import ConfigurableTask\n\n\nclass Mine(ConfigurableTask):\n"
        "    def construct_requests(self, doc, ctx, **kwargs):\n        return []\n")
    (world["tasks"] / "cls_ctor.yaml").write_text("task: cls_ctor\nclass: !function cls_ctor.Mine\n")
    with pytest.raises(TaskError, match=r"`class: [\w.]*cls_ctor.Mine`: its constructor is lm-eval's "
                                        r"ConfigurableTask.__init__"):
        find_tasks(["cls_ctor"], [world["tasks"]], allow_code=True)


def test_a_class_that_fails_to_build_names_the_class_before_the_model_runs(world):
    (world["tasks"] / "cls_broken.yaml").write_text(
        HEAD.format(name="cls_broken", cls="TwoChoice", root=world["root"]).replace("test.jsonl", "missing.jsonl"))
    model, tok = world["model"]
    with pytest.raises(TaskError, match=r"'cls_broken': building `class: [\w.]*task_cls.TwoChoice` .* raised"):
        evaluate(model, ["cls_broken"], tokenizer=tok, include_path=world["tasks"], allow_code=True, limit=2,
                 cache_dir=False, progress=False)
