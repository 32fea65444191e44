"""The ``hfx`` command, table-driven: each ordinary mistake is one stderr line and exit code 2.

This table covers the top level, ``plugins``, ``quickstart`` and the task files ``hfx eval``
reads (hostile YAML, templates, ``!function`` outside the task folder, broken data files). The
model-, argument- and output-side mistakes of ``eval``, ``finetune`` and ``convert-long`` have
their own tables beside the fixtures they need: ``test_eval_safety.py``,
``test_finetune_safety.py`` and ``test_attention_convert_long.py``. A few rows are also run
through the installed console script, so the exit code is the process's own.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_task_safety import billion_laughs  # the same hostile file the loader tests use

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{text}"
doc_to_target: label
doc_to_choice: choices
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny hfx causal LM saved to a folder, and a task folder with good, broken and hostile files."""
    import hfx
    from hfx.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "model"
    tok = train_tokenizer(["the cat sat on the mat", "a dog ran in the park"] * 4, vocab_size=80,
                          save_dir=model_dir, style="causal")
    config = hfx.HfxConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=64, is_decoder=True)
    hfx.HfxForCausalLM(config).save_pretrained(model_dir)

    tasks = root / "tasks"
    tasks.mkdir()
    docs = tasks / "docs.jsonl"
    docs.write_text("".join(json.dumps({"q": f"q{i}", "choices": ["cat", "dog"], "label": i % 2}) + "\n"
                            for i in range(4)))
    good = dict(data=docs, text="{{q}}")
    (tasks / "good.yaml").write_text(TASK.format(name="good", **good))
    (tasks / "laughs.yaml").write_text(billion_laughs())
    (tasks / "broken.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    (tasks / "loops.yaml").write_text(TASK.format(
        name="loops", data=docs, text="{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"))
    (tasks / "big.yaml").write_text(TASK.format(name="big", data=docs, text="{{ 'a' * 10**9 }}"))
    (tasks / "cycle.yaml").write_text("include: cycle.yaml\ntask: cycle\n")
    (tasks / "incdir.yaml").write_text("include: ../code\ntask: incdir\n")
    (root / "code").mkdir()
    (root / "evil.py").write_text("def f(doc):\n    raise SystemExit('outside code ran')\n")
    (tasks / "evil.yaml").write_text(TASK.format(name="evil", **good).replace('doc_to_text: "{{q}}"',
                                                                              "doc_to_text: !function ../evil.f"))
    (tasks / "needs_code.yaml").write_text(TASK.format(name="needs_code", **good).replace(
        'doc_to_text: "{{q}}"', "doc_to_text: !function helpers.text"))
    (tasks / "helpers.py").write_text("def text(doc):\n    return doc['q']\n")
    for name, content in {"empty": b"", "badjson": b'{"q": "a" "b"}\n', "latin": b'{"q": "caf\xe9"}\n'}.items():
        (tasks / f"{name}.jsonl").write_bytes(content)
        (tasks / f"data_{name}.yaml").write_text(TASK.format(name=f"data_{name}", data=tasks / f"{name}.jsonl",
                                                             text="{{q}}"))
    (tasks / "undefined.yaml").write_text(TASK.format(name="undefined", data=docs, text="{{ nosuchfield }}"))
    (tasks / "badtype.yaml").write_text(TASK.format(name="badtype", **good).replace(
        "output_type: multiple_choice", "output_type: multiple_choise"))
    (root / "afile").write_text("x")
    return {"root": root, "model": model_dir, "tasks": tasks}


def eval_row(task, fragment, *extra):
    return (["eval", "--model", "{model}", "--include-path", "{tasks}", "--tasks", task, "--no-cache", *extra],
            fragment)


ROWS = {
    # the top level
    "no-command": ([], "usage: hfx"),
    "unknown-command": (["evl"], "invalid choice: 'evl'"),
    "unknown-flag": (["--verbose"], "unrecognized arguments: --verbose"),
    "eval-needs-model": (["eval", "--tasks", "good"], "the following arguments are required: --model"),
    "eval-bootstrap-negative": (["eval", "--model", "{model}", "--tasks", "good", "--bootstrap-iters", "-1"],
                                "--bootstrap-iters must be at least 0"),
    "tasks-unknown-action": (["tasks", "check"], "invalid choice: 'check'"),
    "tasks-missing-include-path": (["tasks", "validate", "--include-path", "{root}/nope"], "does not exist"),
    "tasks-unknown-name": (["tasks", "validate", "--tasks", "nosuch", "--include-path", "{tasks}"],
                           "Unknown task 'nosuch'"),
    "eval-needs-tasks": (["eval", "--model", "{model}"], "the following arguments are required: --tasks"),
    "eval-limit-not-a-number": (["eval", "--model", "{model}", "--tasks", "good", "--limit", "ten"],
                                "argument --limit: invalid value 'ten': give a number of documents"),
    "eval-unknown-flag": (["eval", "--model", "{model}", "--tasks", "good", "--shots", "3"],
                          "unrecognized arguments: --shots 3"),
    "abbreviated-flag-is-not-a-flag": (["eval", "--model", "{model}", "--task", "good"],
                                       "the following arguments are required: --tasks"),
    "quickstart-abbreviated-flag": (["quickstart", "--step", "3"], "unrecognized arguments: --step 3"),
    "finetune-needs-arguments": (["finetune"], "the following arguments are required"),
    "finetune-unknown-method": (["finetune", "--model", "{model}", "--data", "{tasks}/docs.jsonl", "--output",
                                 "{root}/out", "--method", "qlorra"], "invalid choice: 'qlorra'"),
    "convert-long-needs-arguments": (["convert-long"], "the following arguments are required"),
    "export-needs-arguments": (["export"], "the following arguments are required"),
    # plugins
    "plugins-unknown-kind": (["plugins", "--kind", "foo"], "argument --kind: invalid choice: 'foo'"),
    # quickstart: every flag checked before any work
    "quickstart-unknown-step": (["quickstart", "--skip", "pretrian"],
                                "--skip: unknown step 'pretrian'; valid steps: data, tokenizer, pretrain"),
    "quickstart-skip-needed-step": (["quickstart", "--skip", "tokenizer"], "step 'pretrain' needs what it makes"),
    "quickstart-skip-pretrain": (["quickstart", "--skip", "pretrain"], "need what it makes"),
    "quickstart-steps-zero": (["quickstart", "--steps", "0"], "--steps must be at least 1, got 0"),
    "quickstart-batch-negative": (["quickstart", "--batch-size", "-2"], "--batch-size must be at least 1, got -2"),
    "quickstart-max-length-zero": (["quickstart", "--max-length", "0"], "--max-length must be at least 1, got 0"),
    "quickstart-hidden-zero": (["quickstart", "--hidden-size", "0"], "--hidden-size must be at least 1, got 0"),
    "quickstart-threads-zero": (["quickstart", "--threads", "0"], "--threads must be at least 1, got 0"),
    "quickstart-lr-zero": (["quickstart", "--learning-rate", "0"], "--learning-rate must be positive, got 0.0"),
    "quickstart-vocab-too-small": (["quickstart", "--vocab-size", "3"], "is smaller than the 4 special tokens"),
    "quickstart-work-dir-is-file": (["quickstart", "--work-dir", "{root}/afile"], "exists and is not a directory"),
    "quickstart-unknown-norm": (["quickstart", "--norm-type", "groupnorm"], "Unknown norm 'groupnorm'"),
    "quickstart-heads-do-not-divide": (["quickstart", "--hidden-size", "30"],
                                       "hidden_size=30 is not divisible by num_attention_heads=4"),
    # task files hfx eval reads: refused quickly, before the model loads
    "task-billion-laughs": eval_row("laughs", "expands to more than 20000 YAML nodes"),
    "task-broken-yaml": eval_row("broken", "not valid YAML"),
    "task-nested-loops": eval_row("loops", "more than 100000 loop iterations and calls"),
    "task-huge-string": eval_row("big", "a repeated value would be about 1000000000 characters"),
    "task-include-cycle": eval_row("cycle", "include cycle"),
    "task-include-directory": eval_row("incdir", "is a directory"),
    "task-function-outside-folder": eval_row("evil", "outside the task folder", "--allow-code"),
    "task-function-needs-allow-code": eval_row("needs_code", "--allow-code"),
    "task-data-empty": eval_row("data_empty", "empty.jsonl is empty"),
    "task-data-bad-json": eval_row("data_badjson", "badjson.jsonl, line 1, is not valid JSON"),
    "task-data-not-utf8": eval_row("data_latin", "latin.jsonl is not UTF-8 text"),
    "task-undefined-field": eval_row("undefined", "nosuchfield"),
    "task-unknown-output-type": eval_row("badtype", "multiple_choise"),
    "task-unknown-with-broken-files": eval_row("nothing", "Unknown task 'nothing'"),
    "task-typo-suggests": eval_row("goood", "Did you mean"),
}


def fill(argv, world):
    values = {key: str(world[key]) for key in ("root", "model", "tasks")}
    return [arg.format(**values) for arg in argv]


@pytest.mark.parametrize("name", list(ROWS))
def test_each_mistake_is_one_line_and_exit_2(name, world, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    from hfx.cli import main

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the mistake was reported")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    monkeypatch.setenv("HFX_EVAL_CACHE", str(world["root"] / "cache"))
    argv, fragment = ROWS[name]
    try:
        code = main(fill(argv, world))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, (code, out[-500:], err[-2000:])
    assert "Traceback" not in err
    if argv:  # a bare `hfx` prints its help on stdout
        # Warnings and datasets' progress bars (which end in a rate) are not error lines.
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("hfx: warning:")
                 and not line.rstrip().endswith(("/s]", "?it/s]"))]
        # argparse prints its usage lines before its one error line
        errors = [line for line in lines if not line.startswith(("usage:", " "))]
        assert len(errors) == 1, err
        assert fragment in errors[0], (fragment, errors[0])
    else:
        assert fragment in out


def test_the_table_covers_every_subcommand():
    from hfx.cli import COMMANDS

    covered = {argv[0] for argv, _ in ROWS.values() if argv}
    assert set(COMMANDS) <= covered, set(COMMANDS) - covered


@pytest.mark.parametrize("name", ["unknown-command", "quickstart-unknown-step", "task-billion-laughs",
                                  "task-function-outside-folder"])
def test_the_console_script_exits_2_without_a_traceback(name, world):
    script = Path(sys.executable).with_name("hfx")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "hfx.cli"]
    argv, fragment = ROWS[name]
    proc = subprocess.run([*command, *fill(argv, world)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1",
                               "HFX_EVAL_CACHE": str(world["root"] / "cache")})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and fragment in proc.stderr
    assert "outside code ran" not in proc.stderr + proc.stdout


def test_a_skipped_task_file_is_one_warning_line(world):
    """A broken file beside a good one: the good task still resolves; the broken one is named in one line."""
    clean = world["root"] / "two"
    clean.mkdir(exist_ok=True)
    shutil.copy(world["tasks"] / "good.yaml", clean / "good.yaml")
    (clean / "broken.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    out = world["root"] / "two.json"
    proc = subprocess.run(
        [sys.executable, "-m", "hfx.cli", "eval", "--model", str(world["model"]), "--include-path", str(clean),
         "--tasks", "good", "--no-cache", "--output", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("hfx: warning:")]
    assert len(warnings) == 1 and "broken.yaml" in warnings[0] and "not valid YAML" in warnings[0], proc.stderr
    assert "UserWarning" not in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads(out.read_text())["results"]["good"]["acc,none"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_main_in_process_leaves_the_callers_warning_format_alone(capsys):
    import warnings

    from hfx.cli import main

    before = warnings.formatwarning
    assert main(["plugins"]) == 0
    assert warnings.formatwarning is before


def test_version_prints_and_exits_0(capsys):
    from hfx import __version__
    from hfx.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"hfx {__version__}"


@pytest.mark.parametrize("command, hint", [("finetune", "--resume"), ("eval", "cached"), ("plugins", None)])
def test_ctrl_c_is_one_line_and_exit_130(command, hint, monkeypatch, capsys):
    import argparse

    from hfx import cli

    def interrupted(args):
        raise KeyboardInterrupt

    real = argparse.ArgumentParser.parse_args

    def parse_then_interrupt(self, *args, **kwargs):
        namespace = real(self, *args, **kwargs)
        if getattr(namespace, "func", None) is not None:
            namespace.func = interrupted
        return namespace

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_interrupt)
    argv = {"finetune": ["finetune", "--model", "m", "--data", "d.jsonl", "--output", "o"],
            "eval": ["eval", "--model", "m", "--tasks", "t"], "plugins": ["plugins"]}[command]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"hfx {command}: interrupted"), err
    assert hint is None or hint in err[0]


@pytest.mark.parametrize("argv", [
    ["finetune", "--model", "/nonexistent/model", "--data", "d.jsonl", "--output", "out"],
    ["quickstart", "--norm-type", "groupnorm"],
    ["quickstart", "--position-embedding-type", "rope"],
    ["quickstart", "--skip", "pretrian"],
    ["evl"],
], ids=["finetune-missing-model", "quickstart-norm", "quickstart-position", "quickstart-skip", "unknown-command"])
def test_common_mistakes_are_reported_before_torch_is_imported(argv):
    """The commonest typos cost a fraction of a second, not the ~15 s of importing the training stack."""
    probe = ("import sys, json\nfrom hfx.cli import main\ntry:\n    code = main(json.loads(sys.argv[1]))\n"
             "except SystemExit as exc:\n    code = exc.code\nprint(code, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe, json.dumps(argv)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.stdout.split() == ["2", "False"], (proc.stdout, proc.stderr[-1000:])
