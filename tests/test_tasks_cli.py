"""``hfx tasks list`` / ``hfx tasks validate``: verdicts without a model or a dataset, and lm-eval's catalogue coverage.

A tmp folder holds one task per kind of verdict (good, bad template, unknown metric, a
``!function`` hook, a hook importing a package that is not installed) and a group with a refused
member. The last test validates lm-eval 0.4.13's own bundled ``lm_eval/tasks`` with ``allow_code``.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from hfx.cli import main
from hfx.evaluation.catalogue import TaskIndex
from hfx.evaluation.validation import reason_category, validate, validate_task

BASE = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root}/test.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
"""
MISSING_PACKAGE = "hfx_test_no_such_package"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks_cli")
    (root / "test.jsonl").write_text(json.dumps({"question": "q", "choices": ["a", "b"], "label": 0}) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "good.yaml").write_text(BASE.format(name="t_good", root=root) + "tag: t_tag\n")
    (tasks / "good2.yaml").write_text("include: good.yaml\ntask: t_good2\n")  # tag inherited through include
    (tasks / "bad_template.yaml").write_text(
        BASE.format(name="t_bad_template", root=root).replace('"Q: {{question}}\\nA:"', '"Q: {{ question "'))
    (tasks / "bad_metric.yaml").write_text(
        BASE.format(name="t_bad_metric", root=root).replace("metric: acc", "metric: no_such_metric"))
    (tasks / "utils.py").write_text("def process(docs):\n    return docs\n")
    (tasks / "code.yaml").write_text(BASE.format(name="t_code", root=root) + "process_docs: !function utils.process\n")
    (tasks / "hooks_missing.py").write_text(f"import {MISSING_PACKAGE}\n\ndef process(docs):\n    return docs\n")
    (tasks / "missing.yaml").write_text(
        BASE.format(name="t_missing", root=root) + "process_docs: !function hooks_missing.process\n")
    (tasks / "group_ok.yaml").write_text(
        "group: g_ok\ntask:\n  - t_good\n  - t_good2\naggregate_metric_list:\n  - metric: acc\n")
    (tasks / "group_bad.yaml").write_text(
        "group: g_bad\ntask:\n  - t_good\n  - t_bad_metric\naggregate_metric_list:\n  - metric: acc\n")
    return tasks


def _records(path):
    return {(r["kind"], r["name"]): r for r in json.loads(Path(path).read_text())}


def test_validate_without_code(folder, tmp_path, capsys):
    out = tmp_path / "v.json"
    assert main(["tasks", "validate", "--include-path", str(folder), "--json", str(out)]) == 1
    printed = capsys.readouterr().out
    records = _records(out)
    assert records[("task", "t_good")]["status"] == "accepted"
    assert records[("task", "t_good2")]["status"] == "accepted"
    assert records[("task", "t_bad_template")]["status"] == "refused"
    assert "not a valid Jinja template" in records[("task", "t_bad_template")]["reason"]
    assert records[("task", "t_bad_metric")]["status"] == "refused"
    assert "no_such_metric" in records[("task", "t_bad_metric")]["reason"]
    for name in ("t_code", "t_missing"):
        assert records[("task", name)]["status"] == "refused"
        assert "--allow-code" in records[("task", name)]["reason"]
    assert set(records[("task", "t_good")]) >= {"name", "kind", "status", "reason"}
    assert not [r for r in records.values() if r["status"] == "error"]
    assert "groups: 2: 1 resolved (50.0%), 1 refused, 0 error" in printed
    assert "refused group g_bad: member 't_bad_metric' refused" in printed
    assert "refused task t_bad_metric:" in printed


def test_validate_with_code(folder):
    index = TaskIndex([folder], allow_code=True, plugins=False)
    assert validate_task(index, "t_code").status == "accepted"
    missing = validate_task(index, "t_missing")
    assert missing.status == "refused"
    assert missing.reason.startswith(f"needs optional package {MISSING_PACKAGE}")
    assert reason_category(missing.reason) == f"needs optional package {MISSING_PACKAGE}"


def test_groups_and_tags(folder):
    index = TaskIndex([folder], allow_code=False, plugins=False)
    verdicts = {(v.kind, v.name): v for v in validate(index, ["g_ok", "g_bad", "t_tag"])}
    assert verdicts[("group", "g_ok")].status == "accepted"
    assert verdicts[("group", "g_ok")].members == ["t_good", "t_good2"]
    bad = verdicts[("group", "g_bad")]
    assert bad.status == "refused" and bad.refused_members == ["t_bad_metric"]
    assert "t_bad_metric" in bad.reason and "no_such_metric" in bad.reason
    assert verdicts[("tag", "t_tag")].status == "accepted"
    assert verdicts[("tag", "t_tag")].members == ["t_good", "t_good2"]  # the tag came through include:
    assert verdicts[("task", "t_bad_metric")].status == "refused"  # a group's members get records too


def test_validate_named_unknown(folder, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tasks", "validate", "--include-path", str(folder), "--tasks", "t_god"])
    assert exc.value.code == 2
    assert "t_good" in capsys.readouterr().err


def test_list(folder, tmp_path, capsys):
    out = tmp_path / "l.json"
    assert main(["tasks", "list", "--include-path", str(folder), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    records = {(r["kind"], r["name"]): r for r in json.loads(out.read_text())}
    assert records[("task", "t_good")]["output_type"] == "multiple_choice"
    assert records[("task", "t_good")]["source"].endswith("good.yaml")
    assert ("group", "g_bad") in records and ("tag", "t_tag") in records
    assert "t_code\ttask\tmultiple_choice" in printed


def test_console_script(folder):
    """The installed ``hfx`` script, once."""
    script = Path(sys.executable).with_name("hfx")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "hfx.cli"]
    done = subprocess.run([*command, "tasks", "list", "--include-path", str(folder)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "t_good\ttask\tmultiple_choice" in done.stdout
    assert "g_ok\tgroup" in done.stdout


# The whole of lm-eval 0.4.13's bundled catalogue, through `hfx tasks validate` itself (two processes, one
# per mode, side by side: about a minute on 2 cores). Fractions measured at the end of issue 11, rounded
# down; the refusals left are optional packages this machine lacks, image/audio inputs, hub metrics and
# hooks importing modules transformers 5 removed (lm-eval fails on all of them too).
LM_EVAL_ACCEPTED_WITH_CODE = 0.975  # measured 12 857 / 13 123 = 97.97% (the issue asks >= 97%)
# without --allow-code, a task is refused only for Python code (or for what it would be refused with code)
NO_CODE_CAUSES = ("!function without --allow-code", "unsupported key doc_to_image", "unsupported key doc_to_audio",
                  "repeats with do_sample", "hub evaluate metric", "filter function ACP_grammar_filter")


def _validate_catalogue(folder, out, allow_code):
    command = [sys.executable, "-c", "import sys; from hfx.cli import main; sys.exit(main())", "tasks", "validate",
               "--include-path", str(folder), "--json", str(out), "--quiet"] + (["--allow-code"] if allow_code else [])
    env = {**os.environ, "HF_EVALUATE_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_lm_eval_catalogue_coverage(tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    folder = Path(lm_eval.__file__).parent / "tasks"
    runs = {mode: _validate_catalogue(folder, tmp_path / f"{mode}.json", mode == "code") for mode in ("code", "none")}
    records = {}
    for mode, proc in runs.items():
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode in (0, 1), stderr[-2000:]  # 1: something was refused
        records[mode] = json.loads((tmp_path / f"{mode}.json").read_text())
        assert not [r for r in records[mode] if r["status"] == "error"], [r for r in records[mode]
                                                                          if r["status"] == "error"][:5]
    tasks = {mode: [r for r in recs if r["kind"] == "task"] for mode, recs in records.items()}
    assert len(tasks["code"]) == len(tasks["none"]) >= 13_000
    accepted = sum(r["status"] == "accepted" for r in tasks["code"]) / len(tasks["code"])
    assert accepted >= LM_EVAL_ACCEPTED_WITH_CODE, f"{accepted:.2%} accepted with --allow-code"
    odd = [r for r in tasks["none"] if r["status"] != "accepted"
           and not reason_category(r["reason"]).startswith(NO_CODE_CAUSES)]
    assert not odd, odd[:5]
    groups = [r for r in records["code"] if r["kind"] == "group"]
    assert len(groups) == 855
    # every group's membership resolves (names, tags, nesting, inline tasks), except t0_eval, whose promptsource
    # members name no task (lm-eval fails on it too); a refused group names its refused members
    unresolved = {r["name"] for r in groups if r["status"] != "accepted" and not r.get("refused_members")}
    assert unresolved == {"t0_eval"}, unresolved


def test_group_aggregate_checks_are_the_evaluators(tmp_path):
    """validate and hfx eval agree on a group's aggregate: a hook task may report anything, a plain one its metrics."""
    from hfx.evaluation.evaluator import plan

    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"q": f"q{i}", "label": i % 2}) + "\n" for i in range(4)))
    folder = tmp_path / "agg"
    folder.mkdir()
    (folder / "utils.py").write_text("def pr(doc, results):\n    return {'acc': 1.0}\n")
    base = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path}/test.jsonl\ntest_split: test\n"
            "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_target: label\ndoc_to_choice: ['a', 'b']\n")
    (folder / "h_a.yaml").write_text("task: h_a\n" + base + "process_results: !function utils.pr\n")
    (folder / "h_b.yaml").write_text("task: h_b\n" + base + "metric_list:\n  - metric: acc_norm\n")
    (folder / "h_g.yaml").write_text("group: h_g\ntask: [h_a]\naggregate_metric_list:\n  - metric: acc\n")
    (folder / "h_bad.yaml").write_text("group: h_bad\ntask: [h_b]\naggregate_metric_list:\n  - metric: acc\n")
    index = TaskIndex([folder], allow_code=True, plugins=False, cache=False)
    verdicts = {v.name: v for v in validate(index, ["h_g", "h_bad"])}
    assert verdicts["h_g"].accepted and not verdicts["h_g"].warnings
    # lm-eval runs a group whose aggregate no member reports, without that aggregate: so do both, and say so
    assert verdicts["h_bad"].accepted
    (warning,) = verdicts["h_bad"].warnings
    assert "'acc' is reported by none of its members (h_b: acc_norm,none); the group gets no 'acc'" in warning
    for name, expected in (("h_g", []), ("h_bad", [warning])):
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            planned = plan([name], include_path=[folder], allow_code=True)
        assert not planned.refused and planned.warnings == expected
