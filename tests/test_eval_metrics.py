"""hfx's metrics against lm-eval 0.4.13's own registry functions, stderr rules and process_results.

Aggregations and stderrs go through lm-eval's ``_compute_task_aggregations`` (its bootstrap cap
for bleu / chrf / ter, ``"N/A"`` rules) on seeded random items; per-document items through
``ConfigurableTask.process_results`` of tiny local json tasks.
"""

import json
import math
import random

import numpy as np
import pytest

from hfx.evaluation import metrics
from hfx.evaluation.templates import TaskError

WORDS = "the cat sat on a mat dog ran far away red blue green owl big small".split()


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")  # lm-eval's single-process bootstrap: the same draws as its pool


def _sentence(rng, lo=2, hi=9):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _items(kind, n, seed):
    """Random per-document items of the shape each aggregation consumes."""
    rng = random.Random(seed)
    if kind == "float":
        return [-rng.expovariate(0.7) for _ in range(n)]
    if kind == "binary":
        return [float(rng.random() < 0.6) for _ in range(n)]
    if kind == "nan":
        return [float("nan") if rng.random() < 0.3 else rng.random() for _ in range(n)]
    if kind == "weighted":
        return [(-rng.expovariate(0.1), rng.randint(1, 30)) for _ in range(n)]
    if kind == "pair2":
        return [(rng.randrange(2), np.int64(rng.randrange(2))) for _ in range(n)]
    if kind == "pair3":
        return [(rng.randrange(3), np.int64(rng.randrange(3))) for _ in range(n)]
    if kind == "text":
        return [[_sentence(rng), _sentence(rng)] for _ in range(n)]
    if kind == "text2ref":
        return [[[_sentence(rng), _sentence(rng)], _sentence(rng)] for _ in range(n)]
    if kind == "brier":
        out = []
        for _ in range(n):
            lls = np.array([-rng.expovariate(1) for _ in range(4)])
            out.append((rng.randrange(4), np.exp(lls - lls.max()) / np.exp(lls - lls.max()).sum()))
        return out
    raise AssertionError(kind)


CASES = [  # metric name, aggregation name (None: the metric's default), item kind
    ("acc", None, "binary"), ("acc_norm", None, "binary"), ("exact_match", None, "binary"),
    ("perplexity", None, "float"), ("word_perplexity", None, "weighted"), ("byte_perplexity", None, "weighted"),
    ("bits_per_byte", None, "weighted"), ("f1", None, "pair2"), ("mcc", None, "pair2"), ("mcc", None, "pair3"),
    ("bleu", None, "text"), ("bleu", None, "text2ref"), ("chrf", None, "text"), ("chrf++", None, "text"),
    ("ter", None, "text"), ("brier_score", None, "brier"), ("bypass", None, "binary"),
    ("acc", "median", "float"), ("acc", "nanmean", "nan"), ("score", "mean", "float"), ("score", "nanmean", "float"),
    ("score", "perplexity", "float"), ("score", "f1", "pair2"), ("score", "matthews_corrcoef", "pair3"),
    ("score", "weighted_perplexity", "weighted"), ("score", "bleu", "text"),  # no cap: the metric is not named bleu
]


def _lm_eval_aggregate(metric, aggregation, items, iters):
    """``(value, stderr)`` as lm-eval's evaluator computes them for one task metric."""
    from lm_eval.api.registry import get_aggregation, get_metric_aggregation
    from lm_eval.evaluator_utils import _compute_task_aggregations

    fn = get_aggregation(aggregation) if isinstance(aggregation, str) else aggregation
    fn = fn or get_metric_aggregation(metric)

    class FakeTask:
        task_name = "t"

        def aggregation(self):
            return {metric: fn}

    out, _ = _compute_task_aggregations(FakeTask(), {(metric, "none"): items}, bootstrap_iters=iters)
    return out[f"{metric},none"], out[f"{metric}_stderr,none"]


def _close(a, b, rel=1e-9):
    if isinstance(b, str) or isinstance(a, str):
        return a == b
    if isinstance(b, float) and math.isnan(b):
        return math.isnan(a)
    return a == pytest.approx(b, rel=rel, abs=1e-12)


@pytest.mark.parametrize("metric, aggregation, kind", CASES)
@pytest.mark.parametrize("iters", [0, 120])
def test_aggregate_equals_lm_eval(metric, aggregation, kind, iters):
    items = _items(kind, 23, seed=len(metric) + len(kind))
    ours = metrics.aggregate(metric, items, aggregation=aggregation, bootstrap_iters=iters)
    theirs = _lm_eval_aggregate(metric, aggregation, items, iters)
    assert _close(ours[0], theirs[0]), (ours, theirs)
    assert _close(ours[1], theirs[1], rel=1e-6), (ours, theirs)
    effective = aggregation or metrics.METRICS[metric].aggregation
    with_stderr = ("mean", "median", "f1", "matthews_corrcoef", "nanmean", "perplexity", "bleu", "chrf", "chrf++", "ter")
    if iters and effective in with_stderr:
        assert isinstance(ours[1], float) and ours[1] > 0  # a stderr was computed: the comparison means something


@pytest.mark.parametrize("aggregation, kind, iters", [
    ("perplexity", "float", 2500), ("median", "float", 2500), ("nanmean", "nan", 2500),
    ("f1", "pair2", 150), ("matthews_corrcoef", "pair3", 150),  # lm-eval calls scikit-learn per resample: slow
])
def test_vectorised_bootstrap_draw_for_draw_across_chunks_and_blocks(aggregation, kind, iters, monkeypatch):
    """2 500 resamples: two chunks of 1 000 (the rest dropped, as lm-eval drops it); blocks of 7 rows."""
    from lm_eval.api import metrics as lm
    from lm_eval.api.registry import get_aggregation

    items = _items(kind, 41, seed=7)
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 41 * 7)
    ours = metrics.bootstrap_stderr(items, iters, aggregation)
    assert ours == pytest.approx(lm.bootstrap_stderr(get_aggregation(aggregation), items, iters), rel=1e-9)


def test_corpus_metrics_bootstrap_capped_at_100():
    items = _items("text", 12, seed=3)
    for name in ("bleu", "chrf", "chrf++", "ter"):
        capped = metrics.aggregate(name, items, bootstrap_iters=5000)
        assert capped[1] == pytest.approx(_lm_eval_aggregate(name, None, items, 5000)[1], rel=1e-9)


def test_acc_all_and_callable_aggregations():
    """lm-eval's own functions passed as `!function` aggregations keep their stderr rule; others get N/A."""
    from lm_eval.api import metrics as lm

    rng = random.Random(5)
    items = [(rng.random() < 0.5, {"idx": {"paragraph": rng.randrange(3), "question": rng.randrange(4)},
                                   "label": rng.randrange(2)}) for _ in range(40)]
    for fn in (lm.acc_all, metrics.acc_all):
        ours = metrics.aggregate("acc_all", items, aggregation=fn)
        assert ours == pytest.approx(_lm_eval_aggregate("acc_all", lm.acc_all, items, 1000), rel=1e-12)
    floats = _items("float", 30, seed=1)
    assert metrics.aggregate("m", floats, aggregation=lm.median, bootstrap_iters=400) == pytest.approx(
        _lm_eval_aggregate("m", lm.median, floats, 400), rel=1e-12)
    custom = lambda xs: max(xs)  # noqa: E731 - a task's own aggregation
    assert metrics.aggregate("m", floats, aggregation=custom) == (max(floats), "N/A")
    assert _lm_eval_aggregate("m", custom, floats, 1000) == (max(floats), "N/A")
    assert metrics.aggregate("acc", [1.0]) == (1.0, "N/A") == _lm_eval_aggregate("acc", None, [1.0], 1000)


def test_registry_covers_lm_eval():
    """Every metric and aggregation lm-eval registers, with its default aggregation and direction."""
    import lm_eval.api.metrics  # noqa: F401 - fills the registries
    from lm_eval.api import registry

    assert set(registry.AGGREGATION_REGISTRY.keys()) <= set(metrics.AGGREGATIONS)
    names = {fn: name for name, fn in registry.AGGREGATION_REGISTRY.items()}
    for name in registry.METRIC_REGISTRY.keys():
        ours = metrics.get_metric(name)
        assert ours.aggregation == names[registry.METRIC_AGGREGATION_REGISTRY.get(name)], name
        assert ours.aggregate is metrics.AGGREGATIONS[ours.aggregation]
        assert ours.higher_is_better is registry.HIGHER_IS_BETTER_REGISTRY.get(name), name
        assert ours.output_types, name


def test_unknown_names_are_task_errors():
    with pytest.raises(TaskError, match=r"Unknown metric 'acc_nrom'.*'acc_norm'"):
        metrics.get_metric("acc_nrom")
    with pytest.raises(TaskError, match=r"Unknown aggregation 'avg'.*'mean'.*'median'"):
        metrics.aggregate("acc", [1.0, 0.0], aggregation="avg")
    with pytest.raises(TaskError, match="aggregation 'mean' of metric 'likelihood' failed"):
        metrics.aggregate("likelihood", [(0, (-1.0, -2.0)), (1, (-1.0, -2.0))])  # lm-eval fails here too


# --- per-document items against ConfigurableTask.process_results -------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric_docs")
    rng = random.Random(0)
    rows = []
    for i in range(14):
        choices = [_sentence(rng, 1, 3) for _ in range(4)]
        label = rng.randrange(4) if i % 5 != 3 else 6  # one gold out of range per five docs (not the first)
        rows.append({"q": _sentence(rng), "choices": choices, "label": label,
                     "answer": choices[label] if label < 4 else "missing", "labels": rng.sample(range(5), 2),
                     "refs": [_sentence(rng) for _ in range(rng.randint(1, 3))], "num": rng.randrange(3)})
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _task(data, output_type, metric_list, **config):
    from lm_eval.api.task import ConfigurableTask

    base = {"task": "t", "dataset_path": "json", "test_split": "test", "output_type": output_type,
            "dataset_kwargs": {"data_files": {"test": str(data / "test.jsonl")}}, "doc_to_text": "{{q}}",
            "metric_list": metric_list}
    base.update(config)
    return ConfigurableTask(config=base)


MC_METRICS = ["acc", "acc_norm", "acc_bytes", "acc_mutual_info", "exact_match", "f1", "mcc", "brier_score",
              "likelihood"]


def _same_items(ours, theirs):
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        if isinstance(value, tuple):
            assert ours[key][0] == value[0], key
            np.testing.assert_array_equal(np.asarray(ours[key][1]), np.asarray(value[1]))
        else:
            assert ours[key] == value and type(ours[key]) is type(value) or (
                isinstance(value, float) and ours[key] == value), (key, ours[key], value)


@pytest.mark.parametrize("target", ["label", "{{answer}}", "labels"])
def test_multiple_choice_items_equal_process_results(data, target):
    wanted = [m for m in MC_METRICS if not (target == "labels" and m == "acc_mutual_info")]  # lm-eval fails there
    task = _task(data, "multiple_choice", [{"metric": m} for m in wanted], doc_to_target=target,
                 doc_to_choice="choices")
    rng = random.Random(hash(target) % 1000)
    for doc in task.eval_docs:
        choices = task.doc_to_choice(doc)
        mutual = "acc_mutual_info" in wanted
        lls = [-rng.expovariate(1) for _ in range((2 if mutual else 1) * len(choices))]
        if rng.random() < 0.3:
            lls[1] = lls[0]  # a tie: the first wins
        greedy = [rng.random() < 0.5 for _ in lls]
        theirs = task.process_results(doc, list(zip(lls, greedy)))
        n = len(choices)
        ours = metrics.multiple_choice_scores(lls[:n], greedy, choices, task.doc_to_target(doc),
                                              lls_unconditional=lls[n:] if mutual else None, multiple_target=bool(task.multiple_target),
                                              metrics=wanted)
        _same_items(ours, theirs)


def test_loglikelihood_and_rolling_items_equal_process_results(data):
    task = _task(data, "loglikelihood", [{"metric": "perplexity"}, {"metric": "acc"}], doc_to_target="{{answer}}")
    doc = task.eval_docs[0]
    for ll, greedy in ((-3.5, True), (-0.25, False)):
        assert metrics.loglikelihood_items(ll, greedy, ["perplexity", "acc"]) == task.process_results(doc, [(ll, greedy)])
    rolling = _task(data, "loglikelihood_rolling", [{"metric": m} for m in ("word_perplexity", "bits_per_byte")],
                    doc_to_text="", doc_to_target="{{q}}")
    doc = rolling.eval_docs[1]
    text = rolling.doc_to_target(doc)
    ours = metrics.rolling_items(-12.5, rolling.count_words(text), rolling.count_bytes(text),
                                 ["word_perplexity", "bits_per_byte"])
    assert ours == rolling.process_results(doc, (-12.5,))


GEN_METRICS = [
    [{"metric": "exact_match"}, {"metric": "bleu"}, {"metric": "chrf"}, {"metric": "ter"}],
    [{"metric": "exact_match", "ignore_case": True, "ignore_punctuation": True, "ignore_numbers": True},
     {"metric": "chrf++"}],
    [{"metric": "exact_match", "regexes_to_ignore": [r"\s+", "^the"]}, {"metric": "bypass"}],
    [{"metric": "exact_match", "regexes_to_ignore": []}],
]


def _responses(rng, gold):
    gold = gold if isinstance(gold, str) else rng.choice(list(gold)) if isinstance(gold, list) else str(gold)
    return [gold, gold.upper() + "!", "The " + gold, _sentence(rng), [gold, _sentence(rng)], [_sentence(rng)]]


@pytest.mark.parametrize("metric_list", GEN_METRICS, ids=range(len(GEN_METRICS)))
@pytest.mark.parametrize("target, choices", [("{{answer}}", None), ("refs", None), ("num", "choices"),
                                             ("label", None)])
def test_generate_items_equal_process_results(data, metric_list, target, choices):
    config = {"doc_to_target": target, "generation_kwargs": {"until": ["\n"]}}
    if choices:
        config["doc_to_choice"] = choices
    task = _task(data, "generate_until", metric_list, **config)
    options = {m["metric"]: {k: v for k, v in m.items() if k != "metric"} for m in metric_list}
    rng = random.Random(len(target))
    compared = 0
    for doc in list(task.eval_docs)[:6]:
        gold = task.doc_to_target(doc)
        for result in _responses(rng, task.doc_to_choice(doc)[gold] if choices else gold):
            try:
                theirs = task.process_results(doc, [result])
            except (TypeError, ValueError):  # lm-eval fails on this combination: hfx must say so
                with pytest.raises(TaskError):
                    metrics.generate_items(options, gold, result, multiple_target=bool(task.multiple_target),
                                           choices=task.doc_to_choice(doc) if choices else None)
                continue
            ours = metrics.generate_items(options, gold, result, multiple_target=bool(task.multiple_target),
                                          choices=task.doc_to_choice(doc) if choices else None)
            assert set(ours) == set(theirs)
            for key, value in theirs.items():
                assert ours[key] == value or (isinstance(value, float) and math.isnan(value) and math.isnan(ours[key]))
            compared += 1
    assert compared >= 12 or (target == "label" and "bypass" in options)  # an int gold kept for bypass: regex fails


def test_generate_item_takes_a_prepared_gold():
    """The per-metric form (gold already prepared): a list of golds means any gold counts."""
    assert metrics.generate_item("exact_match", "Paris", "Paris", {}) == 1.0
    assert metrics.generate_item("exact_match", "paris", ["Paris", "Lyon"], {"ignore_case": True}) == 0.5
    assert metrics.generate_item("exact_match", ["Lyon", "Paris"], "Paris", {}) == 1.0
    assert metrics.generate_item("exact_match", ["Lyon", "Nice"], "Paris", {}) == 0.0
    assert metrics.generate_item("bleu", "a b c", "a b d", {}) == ["a b c", "a b d"]
    assert metrics.generate_item("bypass", "a", "b", {}) is None
    with pytest.raises(TaskError, match="exact_match with options"):
        metrics.generate_item("exact_match", "1", [1, 2], {"ignore_case": True})
    with pytest.raises(TaskError, match="Unknown metric 'blue'"):
        metrics.generate_item("blue", "a", "b", {})


def test_metrics_import_no_corpus_libraries():
    import subprocess
    import sys

    code = ("import importlib.util as u, sys; s = u.spec_from_file_location('m', sys.argv[1]); "
            "m = sys.modules['m'] = u.module_from_spec(s); s.loader.exec_module(m); print('sklearn' in sys.modules or 'sacrebleu' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, metrics.__file__], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
