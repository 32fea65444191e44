"""Groups in hfx eval against lm-eval 0.4.13 itself: aggregates, stderrs, results JSON, tables, refusals.

One module-scoped fixture writes tiny json tasks and group files, builds a tiny GPT-2 and runs
``lm_eval.simple_evaluate`` once on ``g_top`` (a nested group: a subgroup, a tag, a generate_until
member with two filters, a group without aggregate_metric_list that shares a task with the
subgroup) and a standalone task. hfx runs the same tree built by hand as :class:`GroupNode` s (and,
once the catalogue resolves group files, by name).
"""

import json
import math
import random

import pytest

from hfx.evaluation import TaskError, evaluate, markdown_table
from hfx.evaluation.groups import AggregateMetric, GroupNode, TaskRef
from tests.test_eval import _gpt2, _sentence, lm_eval_reference

LIMIT = 6
MC = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root}/{data}.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: choices
{extra}metric_list:
  - metric: acc
  - metric: acc_norm
"""
GEN = """task: g_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root}/a.jsonl
output_type: generate_until
test_split: test
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{choices[label]}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 4
metric_list:
  - metric: exact_match
filter_list:
  - name: strict
    filter:
      - function: take_first
  - name: lower
    filter:
      - function: lowercase
      - function: take_first
"""
GROUPS = {
    "sub.yaml": "group: g_sub\ntask:\n  - g_a\n  - task: g_b\n    task_alias: Bee\naggregate_metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
                "    weight_by_size: false\nmetadata:\n  version: 3\n",
    "top.yaml": "group: g_top\ngroup_alias: Top Group\ntask: [g_sub, g_tag, g_gen, g_plain]\naggregate_metric_list:\n"
                "  - metric: acc\n    weight_by_size: false\n  - metric: acc_norm\n  - metric: exact_match\n"
                "    filter_list: [lower]\nmetadata:\n  version: 1.5\n",
    "plain.yaml": "group: g_plain\ntask: [g_a, g_d]\n",
}


def _write(root):
    rng = random.Random(0)
    for name, n in (("a", 9), ("b", 5), ("c", 7)):
        with open(root / f"{name}.jsonl", "w") as handle:
            for _ in range(n):
                choices = [_sentence(rng, rng.randint(1, 4)) for _ in range(3)]
                handle.write(json.dumps({"question": _sentence(rng, rng.randint(3, 8)), "choices": choices,
                                         "label": rng.randrange(3)}) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "a.yaml").write_text(MC.format(name="g_a", root=root, data="a", extra="metadata:\n  version: 2.0\n"))
    (tasks / "b.yaml").write_text(MC.format(name="g_b", root=root, data="b", extra=""))
    (tasks / "b2.yaml").write_text(MC.format(name="g_b2", root=root, data="b", extra=""))
    (tasks / "c.yaml").write_text(MC.format(name="g_c", root=root, data="c", extra="tag: g_tag\n"))
    (tasks / "d.yaml").write_text(MC.format(name="g_d", root=root, data="b", extra="num_fewshot: 1\nfewshot_split: test\n"))
    (tasks / "gen.yaml").write_text(GEN.format(root=root))
    for file, text in GROUPS.items():
        (tasks / file).write_text(text)
    bad = root / "bad"  # a task hfx refuses: its template names a field the documents lack
    bad.mkdir()
    (bad / "bad.yaml").write_text(MC.format(name="g_bad", root=root, data="b", extra="").replace("{{question}}",
                                                                                                 "{{questoin}}"))
    return tasks, bad


def _tree():
    """g_top as lm-eval builds it from top.yaml: the tag g_tag becomes its task g_c, a direct child."""
    sub = GroupNode("g_sub", children=[TaskRef("g_a"), TaskRef("g_b", {"task": "g_b", "task_alias": "Bee"})],
                    metadata={"version": 3},
                    aggregate_metric_list=[AggregateMetric("acc"), AggregateMetric("acc_norm", weight_by_size=False)])
    plain = GroupNode("g_plain", children=[TaskRef("g_a"), TaskRef("g_d")])
    return GroupNode("g_top", alias="Top Group", children=[sub, TaskRef("g_c"), TaskRef("g_gen"), plain],
                     metadata={"version": 1.5},
                     aggregate_metric_list=[AggregateMetric("acc", weight_by_size=False), AggregateMetric("acc_norm"),
                                            AggregateMetric("exact_match", filter_list=("lower",))])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("groups")
    tasks, bad = _write(root)
    model, tok = _gpt2(root)
    reference = lm_eval_reference(model, tok, tasks, ["g_top", "g_b2"], limit=LIMIT)
    ours, records = evaluate(model, [_tree(), "g_b2"], tokenizer=tok, include_path=tasks, limit=LIMIT,
                             cache_dir=False, progress=False, return_records=True)
    return {"root": root, "tasks": tasks, "bad": bad, "model": model, "tok": tok, "ref": reference,
            "ours": ours, "records": records}


def _same(got, want):
    if isinstance(want, str) or isinstance(got, str):
        return got == want
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
    return got == pytest.approx(float(want), rel=1e-6, abs=1e-12)


def _assert_entries_equal(got: dict, want: dict):
    assert list(got) == list(want)
    for name, entry in want.items():
        assert set(got[name]) == set(entry), name
        for key, value in entry.items():
            assert _same(got[name][key], value), (name, key, got[name][key], value)


def test_group_aggregates_and_stderrs_match_lm_eval(world):
    ref, ours = world["ref"], world["ours"]
    assert set(ref["groups"]) == {"g_top", "g_sub"}
    _assert_entries_equal(ours["groups"], ref["groups"])
    top = ours["groups"]["g_top"]  # unequal sizes: weighted and unweighted means really differ here
    assert top["acc_norm,none"] != pytest.approx(top["acc,none"])
    assert "exact_match,strict" not in top and "exact_match,lower" in top  # filter_list honoured


def test_results_json_matches_lm_eval(world):
    ref, ours = world["ref"], world["ours"]
    _assert_entries_equal(ours["results"], ref["results"])  # tasks then groups, lm-eval's keys and order
    assert ours["results"]["g_plain"] == {"alias": "g_plain", "name": "g_plain"}
    assert ours["results"]["g_b"]["alias"] == "Bee"  # task_alias of an inline member
    for key in ("group_subtasks", "versions", "n-shot", "higher_is_better", "n-samples"):
        assert ours[key] == ref[key], key
    assert list(ours["versions"]) == list(ref["versions"])
    assert set(ours["configs"]) == set(ref["configs"])
    assert list(world["records"]) == list(ref["n-samples"])  # g_a runs once though two groups list it


def _rows(text, padded):
    """Cells of a markdown table; the indentation of the first column kept (hfx writes "| x |", lm-eval "|x  |")."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not set(line) <= set("|-: "):
            cells = line.strip()[1:-1].split("|")
            if cells[0].strip() in ("Tasks", "Groups"):  # lm-eval centres its headers
                rows.append([c.strip() for c in cells])
                continue
            rows.append([(c[1:] if padded and c.startswith(" ") else c).rstrip() for c in cells[:1]]
                        + [c.strip() for c in cells[1:]])
    return rows


def _cells_equal(ours, theirs):
    try:  # pytablewriter re-formats numbers per column (0.1000 -> 0.1, 3 -> 3.0)
        return math.isclose(float(ours), float(theirs), abs_tol=5e-5)
    except ValueError:
        return ours == theirs


def test_tables_match_lm_eval_make_table(world):
    from lm_eval.utils import make_table

    ref = world["ref"]
    ours = _rows(markdown_table(world["ours"]), padded=True)
    theirs = _rows(make_table(ref) + "\n" + make_table(ref, "groups"), padded=False)
    assert len(ours) == len(theirs) > 20
    for a, b in zip(ours, theirs):
        assert len(a) == len(b) and all(_cells_equal(x, y) for x, y in zip(a, b)), (a, b)
    assert ["Groups", "Version", "Filter", "n-shot", "Metric", "", "Value", "", "Stderr"] in ours
    assert any(r[0] == "  - g_a" for r in ours) and any(r[0] == " - g_sub" for r in ours)


def test_groups_by_name_match_lm_eval(world):
    ref = world["ref"]
    ours = evaluate(world["model"], "g_top,g_b2", tokenizer=world["tok"], include_path=world["tasks"], limit=LIMIT,
                    cache_dir=False, progress=False)
    _assert_entries_equal(ours["groups"], ref["groups"])
    _assert_entries_equal(ours["results"], ref["results"])
    assert ours["group_subtasks"] == ref["group_subtasks"]


def test_pooled_and_unweighted_stderr_equal_lm_eval_functions():
    from lm_eval.api.metrics import (
        aggregate_subtask_metrics,
        pooled_sample_stderr,
        unweighted_mean_stderr,
    )

    from hfx.evaluation.results import pooled_stderr, unweighted_stderr

    rng = random.Random(3)
    for _ in range(20):
        k = rng.randint(1, 6)
        stderrs, sizes = [rng.random() for _ in range(k)], [rng.randint(2, 500) for _ in range(k)]
        assert pooled_stderr(stderrs, sizes) == pytest.approx(float(pooled_sample_stderr(stderrs, sizes)), rel=1e-12)
        assert unweighted_stderr(stderrs) == pytest.approx(float(unweighted_mean_stderr(stderrs)), rel=1e-12)
    group = GroupNode("g", children=[TaskRef("x"), TaskRef("y")], aggregate_metric_list=[AggregateMetric("acc")])
    from hfx.evaluation.results import group_entry

    entries = {"x": {"acc,none": 0.25, "acc_stderr,none": 0.1, "sample_len": 8},
               "y": {"acc,none": 0.75, "acc_stderr,none": "N/A", "sample_len": 2}}
    got = group_entry(group, entries)
    assert got["acc,none"] == pytest.approx(aggregate_subtask_metrics([0.25, 0.75], [8, 2], True))
    assert got["acc_stderr,none"] == "N/A"  # one member without a stderr: lm-eval reports none


def _no_model_load(monkeypatch):
    import hfx.evaluation.evaluator as evaluator

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the tasks were checked")

    monkeypatch.setattr(evaluator, "load_model", refuse)


def test_every_refused_task_is_reported_at_once_before_the_model_loads(world, monkeypatch):
    _no_model_load(monkeypatch)
    with pytest.raises(TaskError) as info:
        evaluate(world["root"] / "gpt2", "g_b,nope_one,g_bad,nope_two", include_path=[world["tasks"], world["bad"]],
                 cache_dir=False, progress=False)
    message = str(info.value)
    assert "3 task(s)/group(s) cannot run" in message and "\n" not in message
    assert "nope_one: Unknown task 'nope_one'" in message and "nope_two: Unknown task 'nope_two'" in message
    assert "g_bad: " in message and "questoin" in message
    assert "g_b:" not in message


def test_group_without_a_common_metric_runs_without_that_aggregate_and_says_why(world):
    """lm-eval 0.4.13 runs such a group (19 of its bundled groups are like this) and reports no value."""
    group = GroupNode("g_nometric", children=[TaskRef("g_a"), TaskRef("g_gen")],
                      aggregate_metric_list=[AggregateMetric("f1"), AggregateMetric("acc")])
    with pytest.warns(UserWarning, match=r"Group 'g_nometric'.*'f1' is reported by none of its members "
                                         r"\(g_a: acc,none, acc_norm,none; g_gen: exact_match,strict"):
        ours = evaluate(world["model"], [group], tokenizer=world["tok"], limit=LIMIT, include_path=world["tasks"],
                        cache_dir=False, progress=False)
    entry = ours["results"]["g_nometric"]
    assert "f1,none" not in entry and "acc,none" in entry
    assert any("'f1' is reported by none" in w for w in ours["config"]["warnings"])
    filtered = GroupNode("g_nofilter", children=[TaskRef("g_gen")],
                         aggregate_metric_list=[AggregateMetric("exact_match", filter_list=("none",))])
    with pytest.warns(UserWarning, match=r"Group 'g_nofilter'.*'exact_match' with filter \['none'\]"):
        ours = evaluate(world["model"], [filtered], tokenizer=world["tok"], limit=LIMIT, include_path=world["tasks"],
                        cache_dir=False, progress=False)
    assert not [k for k in ours["results"]["g_nofilter"] if k.startswith("exact_match")]


def test_skip_unsupported_runs_the_rest_and_says_what_was_skipped(world):
    broken = GroupNode("g_broken", children=[TaskRef("g_b"), TaskRef("g_bad")],
                       aggregate_metric_list=[AggregateMetric("acc")])
    ours = evaluate(world["model"], [broken, "nope_one", "g_c"], tokenizer=world["tok"], limit=LIMIT,
                    include_path=[world["tasks"], world["bad"]], cache_dir=False, progress=False,
                    skip_unsupported=True)
    skipped = ours["skipped"]
    assert list(skipped) == ["nope_one", "g_bad", "g_broken"]
    assert "questoin" in skipped["g_bad"] and "g_bad" in skipped["g_broken"]
    assert ours["results"]["g_broken"] == {"alias": "g_broken", "name": "g_broken"}  # no aggregate
    assert "groups" not in ours
    for task in ("g_b", "g_c"):
        for key in ("acc,none", "acc_norm_stderr,none"):
            assert ours["results"][task][key] == pytest.approx(world["ref"]["results"][task][key], rel=1e-6)
    table = markdown_table(ours)
    assert "| g_broken | N/A |  |" in table and "no aggregate: member(s) g_bad skipped" in table
    assert "Skipped:\n- nope_one: Unknown task" in table


def test_cli_lists_refusals_and_skips(world, capsys):
    from hfx.cli import main

    args = ["eval", "--model", str(world["root"] / "gpt2"), "--tasks", "g_b,nope_one", "--include-path",
            str(world["tasks"]), "--no-cache", "--limit", "2"]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2 and "Unknown task 'nope_one'" in capsys.readouterr().err
    assert main(args + ["--skip-unsupported"]) == 0
    out = capsys.readouterr().out
    assert "| g_b |" in out and "Skipped:\n- nope_one: Unknown task 'nope_one'" in out


def test_many_refusals_name_every_task_and_the_first_reasons():
    from hfx.evaluation.evaluator import _refusal_listing

    text = _refusal_listing({f"t{i}": "could not load dataset" for i in range(12)})
    assert text.count("could not load dataset") == 10 and text.endswith("; and 2 more: t10, t11")
