"""hfx finetune never loses data and reports every ordinary mistake in one line (exit code 2) before work starts.

- ``--overwrite`` removes only what a run writes (``RUN_OUTPUTS``), only in a folder with
  ``hfx_finetune.json``, and only after the settings, the model files and the data were checked;
- ``--resume`` continues from the newest *complete* checkpoint and refuses a run whose settings differ;
- bad settings, model folders and data files are one clear line, exit code 2, before the weights load;
- a DDP run prints one summary, with the loss over every process.
"""

import json
import logging
import math
import os
import re
import shutil
from dataclasses import fields
from pathlib import Path

import pytest

from hfx.cli import main
from hfx.finetune import DataError, FinetuneConfig, OutputDirError, finetune
from hfx.finetune import train as train_module
from hfx.safe_paths import replace_folder
from hfx.finetune.train import (
    RESUME_MAY_DIFFER,
    RUN_FILE,
    RUN_IDENTITY,
    RUN_OUTPUTS,
    check_output_dir,
    is_run_output,
    newest_complete_checkpoint,
)
import test_finetune
from test_finetune import run_config, run_ddp_and_single, task_rows, tokenizer_dir, write_jsonl  # noqa: F401

# pytest fixtures shared with test_finetune (bound here so that pytest finds them in this module)
hfx_causal, task_file = test_finetune.hfx_causal, test_finetune.task_file


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail loudly if the run gets as far as loading the model's weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train_module, "load_model", refuse)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def fake_run(folder: Path, **settings) -> Path:
    """A folder laid out like an interrupted run: run file, a checkpoint, an adapter, results."""
    folder.mkdir(parents=True)
    (folder / RUN_FILE).write_text(json.dumps(settings or {"model": "m"}))
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    (folder / "runs").mkdir()
    (folder / "hfx_finetune_results.json").write_text("{}")
    return folder


# --- --overwrite -------------------------------------------------------------------------------------


def test_run_outputs_are_listed_in_one_place():
    for name in ("hfx_finetune.json", "hfx_finetune_results.json", "adapter", "model", "merged", "checkpoint-12",
                 "runs", "trainer_state.json", "adapter.tmp", "merged.old", "hfx_finetune.json.tmp"):
        assert is_run_output(name), name
    for name in ("checkpoint-7.tmp", "checkpoint-7.old", "tmp-checkpoint-3", "tmp-checkpoint-3.tmp"):
        assert is_run_output(name), name
    for name in ("notes.txt", "data.jsonl", "checkpoint-final", "my-model", "adapter2", ".git",
                 # a user's backups next to the run: the whole name must be a run output's
                 "checkpoint-500-best", "checkpoint-5 (copy)", "checkpoint-500.bak", "tmp-checkpoint-3-keep",
                 "checkpoint-", "checkpoint-5.tmp.bak", "adapter.bak", "model (old)", "runs-2024", "checkpoint-1\n",
                 "hfx_finetune.jsonX", "adapter.kept"):
        assert not is_run_output(name), name
    assert r"checkpoint-[0-9]+" in RUN_OUTPUTS and re.escape(RUN_FILE) in RUN_OUTPUTS


def test_overwrite_keeps_a_users_checkpoint_backups(tmp_path, hfx_causal, task_file, no_model_load):
    run = fake_run(tmp_path / "run")
    for name in ("checkpoint-500-best", "checkpoint-5 (copy)", "checkpoint-500.bak", "tmp-checkpoint-3-keep"):
        (run / name).mkdir()
        (run / name / "trainer_state.json").write_text("mine")
    before = snapshot(run)
    with pytest.raises(OutputDirError) as err:
        finetune(run_config(hfx_causal, task_file, run, overwrite=True))
    assert "['checkpoint-5 (copy)', 'checkpoint-500-best', 'checkpoint-500.bak', 'tmp-checkpoint-3-keep']" in str(err.value)
    assert snapshot(run) == before


def _inside_run(tmp_path, hfx_causal, task_file, where):
    """A run folder with the model or data a new run reads placed at ``where`` inside it (or reached by a link)."""
    run = fake_run(tmp_path / "run")
    for name in ("model", "merged", "checkpoint-3"):
        if where.startswith(name):
            shutil.copytree(hfx_causal, run / name)
    if where.endswith(".jsonl"):
        (run / where).parent.mkdir(exist_ok=True)
        shutil.copy(task_file, run / where)
    return run


INSIDE = [
    # (setting, place inside the run folder, what the message says)
    ("model", "model", "is"),
    ("model", "merged", "is"),
    ("model", "checkpoint-3", "is"),
    ("data", "checkpoint-2/task.jsonl", "lies inside"),
    ("eval_data", "runs/held-out.jsonl", "lies inside"),
    ("data", "hfx_finetune_results.json.tmp", "is"),
    ("model", "link-to-model", "is"),  # a link outside the run folder that points at run/model
]


@pytest.mark.parametrize("setting,where,how", INSIDE)
def test_overwrite_never_deletes_the_model_or_data_it_reads(tmp_path, hfx_causal, task_file, no_model_load,
                                                             setting, where, how):
    run = _inside_run(tmp_path, hfx_causal, task_file, "model" if where == "link-to-model" else where)
    if where == "hfx_finetune_results.json.tmp":
        shutil.copy(task_file, run / where)
    source = run / where
    if where == "link-to-model":
        source = tmp_path / "alias"
        source.symlink_to(run / "model", target_is_directory=True)
    values = {"model": hfx_causal, "data": task_file, setting: str(source)}
    before = snapshot(run)
    with pytest.raises(OutputDirError) as err:
        finetune(run_config(values.pop("model"), values.pop("data"), run, overwrite=True, **values))
    entry = where.split("/")[0] if where != "link-to-model" else "model"
    flag = "--" + setting.replace("_", "-")
    assert f"--overwrite: {flag} {source} {how} {run / entry}, which the overwrite would delete; nothing was deleted" \
        in str(err.value)
    assert snapshot(run) == before


def test_overwrite_refuses_the_output_folder_as_its_own_source(tmp_path, hfx_causal):
    run = fake_run(tmp_path / "run")
    with pytest.raises(OutputDirError, match=r"--data .* is the output folder .* itself"):
        check_output_dir(run_config(hfx_causal, str(run), run, overwrite=True))


def test_overwrite_refuses_its_own_model_on_the_command_line(tmp_path, capsys, hfx_causal, task_file, no_model_load):
    run = _inside_run(tmp_path, hfx_causal, task_file, "model")
    before = snapshot(run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--model", str(run / "model"), "--data", task_file, "--output", str(run), "--method", "full",
              "--max-steps", "1", "--overwrite"])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [(f"hfx finetune: error: --overwrite: --model {run / 'model'} is {run / 'model'}, which the "
                      f"overwrite would delete; nothing was deleted. Copy it out of {run} first, or choose another "
                      "--output.")], lines
    assert snapshot(run) == before


def test_saving_over_a_folder_keeps_what_the_save_did_not_write(tmp_path, caplog):
    target = tmp_path / "run" / "adapter"
    target.mkdir(parents=True)
    (target / "adapter_model.safetensors").write_text("old weights")
    (target / "my-notes.txt").write_text("mine")

    def save(folder):
        Path(folder).mkdir()
        (Path(folder) / "adapter_model.safetensors").write_text("new weights")

    with caplog.at_level(logging.WARNING, logger="hfx.finetune"):
        replace_folder(target, save)
    assert (target / "adapter_model.safetensors").read_text() == "new weights"
    assert sorted(p.name for p in target.parent.iterdir()) == ["adapter", "adapter.kept"]
    assert sorted(p.name for p in (target.parent / "adapter.kept").iterdir()) == ["my-notes.txt"]
    assert f"the previous {target} held ['my-notes.txt'], which hfx did not write; they were not deleted and are " \
           f"now in {target.parent / 'adapter.kept'}" in caplog.text
    assert not is_run_output("adapter.kept")  # so a later --overwrite refuses, not deletes, it
    replace_folder(target, save)  # a clean replacement leaves nothing aside
    assert sorted(p.name for p in target.parent.iterdir()) == ["adapter", "adapter.kept"]


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path, hfx_causal, task_file, no_model_load):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    (home / "adapter").mkdir()  # a name a run writes, but no hfx_finetune.json: still not a run
    before = snapshot(home)
    with pytest.raises(OutputDirError, match=r"is not an hfx fine-tuning run \(it has no hfx_finetune.json\)"):
        finetune(run_config(hfx_causal, task_file, home, overwrite=True))
    assert snapshot(home) == before


def test_overwrite_refuses_a_run_folder_holding_anything_else(tmp_path, hfx_causal, task_file, no_model_load):
    run = fake_run(tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    (run / "eval-data").mkdir()
    before = snapshot(run)
    with pytest.raises(OutputDirError) as err:
        finetune(run_config(hfx_causal, task_file, run, overwrite=True))
    assert "['eval-data', 'notes.txt']" in str(err.value) and "nothing was deleted" in str(err.value)
    assert snapshot(run) == before


def test_overwrite_deletes_nothing_before_model_and_data_are_checked(tmp_path, hfx_causal, task_file, no_model_load):
    run = fake_run(tmp_path / "run")
    before = snapshot(run)
    bad_data = write_jsonl(tmp_path / "bad.jsonl", [{"body": "no text field"}])
    with pytest.raises(DataError, match="no usable field"):
        finetune(run_config(hfx_causal, str(bad_data), run, overwrite=True))
    broken = tmp_path / "broken-model"
    shutil.copytree(hfx_causal, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors is damaged or truncated"):
        finetune(run_config(str(broken), task_file, run, overwrite=True))
    with pytest.raises(ValueError, match="target module"):
        finetune(run_config(hfx_causal, task_file, run, overwrite=True, target_modules="nope"))
    assert snapshot(run) == before


def test_a_run_failing_before_training_leaves_no_run_record(tmp_path, hfx_causal, task_file, no_model_load):
    """A failure while the model loads must not leave a run file that refuses the corrected command."""
    run = tmp_path / "run"
    with pytest.raises(AssertionError, match="the model was loaded"):
        finetune(run_config(hfx_causal, task_file, run))
    assert not run.exists()  # the folder the run created, empty again, is gone too
    run.mkdir()
    with pytest.raises(AssertionError, match="the model was loaded"):
        finetune(run_config(hfx_causal, task_file, run))
    assert run.is_dir() and not any(run.iterdir())  # the user's own (empty) folder stays
    check_output_dir(run_config(hfx_causal, task_file, run, lora_r=4))  # another setting: not "another run"


def test_overwrite_replaces_a_run_and_keeps_nothing_stale(tmp_path, hfx_causal, task_file):
    run = fake_run(tmp_path / "run")
    (run / "checkpoint-99").mkdir()
    result = finetune(run_config(hfx_causal, task_file, run, overwrite=True, max_steps=1, save_steps=1))
    assert result.global_step == 1
    assert sorted(p.name for p in run.iterdir()) == [
        "adapter", "checkpoint-1", "hfx_finetune.json", "hfx_finetune_results.json"]
    assert json.loads((run / RUN_FILE).read_text())["world_size"] == 1


def test_output_that_is_a_file_or_unwritable_is_refused(tmp_path, hfx_causal, task_file, no_model_load):
    a_file = tmp_path / "out.txt"
    a_file.write_text("x")
    for flags in ({}, {"overwrite": True}):
        with pytest.raises(OutputDirError, match="is a file, not a folder"):
            finetune(run_config(hfx_causal, task_file, a_file, **flags))
    assert a_file.read_text() == "x"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        with pytest.raises(OutputDirError, match="not a writable folder"):
            finetune(run_config(hfx_causal, task_file, locked / "out"))


# --- --resume ----------------------------------------------------------------------------------------


def test_every_setting_is_either_identity_or_allowed_to_differ():
    names = {f.name for f in fields(FinetuneConfig)}
    assert set(RUN_IDENTITY) | set(RESUME_MAY_DIFFER) == names
    assert not set(RUN_IDENTITY) & set(RESUME_MAY_DIFFER)
    for required in ("model", "data", "task", "method", "lora_r", "lora_alpha", "lora_dropout", "target_modules",
                     "quant_type", "double_quant", "compute_dtype", "quant_storage", "max_length", "packing",
                     "batch_size", "grad_accum", "learning_rate", "lr_scheduler", "seed"):
        assert required in RUN_IDENTITY, required


CHANGES = {
    "lora_alpha": 64, "lora_r": 2, "lora_dropout": 0.2, "target_modules": "q_proj", "seed": 7, "learning_rate": 1e-3,
    "lr_scheduler": "linear", "batch_size": 2, "grad_accum": 2, "max_length": 64, "packing": True, "method": "qlora",
    "quant_type": "fp4", "double_quant": False, "compute_dtype": "float32", "task": "causal-lm",
}


def saved_run(tmp_path, config, **extra) -> Path:
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps({**json.loads(config.to_json()), **extra}))
    return out


def test_resume_refuses_each_differing_setting_by_name(tmp_path, hfx_causal, task_file):
    base = run_config(hfx_causal, task_file, tmp_path / "run")
    saved_run(tmp_path, base)
    for name, value in CHANGES.items():
        with pytest.raises(OutputDirError) as err:
            check_output_dir(run_config(hfx_causal, task_file, tmp_path / "run", resume=True, **{name: value}))
        assert f"{name}: saved " in str(err.value), name
    with pytest.raises(OutputDirError) as err:
        check_output_dir(run_config(hfx_causal, str(tmp_path / "other.jsonl"), tmp_path / "run", resume=True,
                                    lora_alpha=64, seed=7))
    message = str(err.value)
    assert "lora_alpha: saved 8, requested 64" in message and "seed: saved 42, requested 7" in message
    assert "data: saved" in message and message.count("saved") == 4  # three differences + "saved values"


SHADOWED = [("learning_rate", "learning_rate (--learning-rate)"), ("seed", "seed (--seed)"),
            ("per_device_train_batch_size", "batch_size (--batch-size)"),
            ("gradient_accumulation_steps", "grad_accum (--grad-accum)"),
            ("lr_scheduler_type", "lr_scheduler (--lr-scheduler)"), ("warmup_steps", "warmup_ratio (--warmup-ratio)"),
            ("output_dir", "output (--output)"), ("num_train_epochs", "epochs (--epochs)"),
            ("eval_strategy", "eval_data / eval_fraction (--eval-data / --eval-fraction)")]


@pytest.mark.parametrize("key,use", SHADOWED)
def test_extra_training_args_cannot_override_a_setting_resume_compares(tmp_path, hfx_causal, task_file, key, use):
    with pytest.raises(ValueError) as err:
        run_config(hfx_causal, task_file, tmp_path / "run", extra_training_args={"disable_tqdm": True, key: 1})
    assert str(err.value) == (f"extra_training_args[{key!r}] would override what hfx sets from FinetuneConfig.{use}; "
                              "set that instead, so the run file records it and --resume compares it.")


def test_extra_training_args_may_set_what_hfx_does_not(tmp_path, hfx_causal, task_file):
    extra = {"disable_tqdm": True, "report_to": "none", "dataloader_num_workers": 0, "max_grad_norm": 0.5}
    assert run_config(hfx_causal, task_file, tmp_path / "run", extra_training_args=extra).extra_training_args == extra
    with pytest.raises(ValueError, match=r"extra_training_args names \['learning_rat'\], which are not TrainingArguments"):
        run_config(hfx_causal, task_file, tmp_path / "run", extra_training_args={"learning_rat": 1e-3})


def test_resume_allows_longer_training_and_other_eval_save_logging_steps(tmp_path, hfx_causal, task_file,
                                                                        monkeypatch):
    base = run_config(hfx_causal, task_file, tmp_path / "run")
    saved_run(tmp_path, base)
    plan = check_output_dir(run_config(hfx_causal, task_file, tmp_path / "run", resume=True, max_steps=40,
                                       epochs=3.0, save_steps=7, logging_steps=3, eval_steps=5, save_total_limit=1))
    assert plan.remove == []
    # the same settings spelt differently are the same run: a relative path, the default learning rate
    monkeypatch.chdir(Path(task_file).parent)
    check_output_dir(run_config(hfx_causal, Path(task_file).name, tmp_path / "run", resume=True, learning_rate=2e-4))


def test_resume_of_a_run_file_from_before_a_setting_existed_uses_its_default(tmp_path, hfx_causal, task_file):
    base = run_config(hfx_causal, task_file, tmp_path / "run")
    saved = json.loads(base.to_json())
    del saved["assistant_only_loss"], saved["lr_scheduler"]  # written by an hfx without these settings
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / RUN_FILE).write_text(json.dumps(saved))
    check_output_dir(run_config(hfx_causal, task_file, tmp_path / "run", resume=True))
    with pytest.raises(OutputDirError, match="lr_scheduler: saved 'cosine', requested 'linear'"):
        check_output_dir(run_config(hfx_causal, task_file, tmp_path / "run", resume=True, lr_scheduler="linear"))


def test_resume_of_a_finished_run_needs_more_steps(tmp_path, hfx_causal, task_file):
    base = run_config(hfx_causal, task_file, tmp_path / "run")
    (saved_run(tmp_path, base) / "hfx_finetune_results.json").write_text("{}")
    with pytest.raises(OutputDirError, match="already finished; raise --max-steps"):
        check_output_dir(run_config(hfx_causal, task_file, tmp_path / "run", resume=True))
    check_output_dir(run_config(hfx_causal, task_file, tmp_path / "run", resume=True, max_steps=8))


def test_resume_with_another_process_count_warns_about_the_batch(tmp_path, hfx_causal, task_file, no_model_load,
                                                                 caplog):
    base = run_config(hfx_causal, task_file, tmp_path / "run")
    saved_run(tmp_path, base, world_size=2)
    with caplog.at_level(logging.WARNING, logger="hfx.finetune"), pytest.raises(AssertionError, match="loaded"):
        finetune(run_config(hfx_causal, task_file, tmp_path / "run", resume=True))
    assert "trained on 2 process(es) and continues on 1: the effective batch changes from 16 to 8" in caplog.text


def break_checkpoint(checkpoint: Path, how: str) -> None:
    if how == "no state":
        (checkpoint / "trainer_state.json").unlink()
    elif how == "no weights":
        (checkpoint / "adapter_model.safetensors").unlink()
    elif how == "truncated weights":
        weights = checkpoint / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "truncated optimizer":
        optimizer = checkpoint / "optimizer.pt"
        optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])


def test_resume_skips_half_written_checkpoints(tmp_path, hfx_causal, task_file, caplog):
    out = tmp_path / "run"
    settings = dict(save_steps=2, lora_dropout=0.0, learning_rate=1e-2)
    first = finetune(run_config(hfx_causal, task_file, out, max_steps=2, **settings))
    assert first.global_step == 2
    # a kill while checkpoint-4, -6, -8, -10 were being written, before the run finished
    (out / "hfx_finetune_results.json").unlink()
    shutil.rmtree(out / "adapter")
    hows = ["no state", "no weights", "truncated weights", "truncated optimizer"]
    for step, how in zip((4, 6, 8, 10), hows):
        shutil.copytree(out / "checkpoint-2", out / f"checkpoint-{step}")
        break_checkpoint(out / f"checkpoint-{step}", how)
    assert newest_complete_checkpoint(out, warn=False).endswith("checkpoint-2")
    with caplog.at_level(logging.WARNING, logger="hfx.finetune"):
        resumed = finetune(run_config(hfx_causal, task_file, out, max_steps=4, resume=True, **settings))
    assert resumed.resumed_from.endswith("checkpoint-2") and resumed.global_step == 4
    for step in (4, 6, 8, 10):
        assert f"skipping {out / f'checkpoint-{step}'}" in caplog.text
    for reason in ("trainer_state.json is missing", "no weights file", "adapter_model.safetensors is damaged",
                   "optimizer.pt is damaged or truncated"):
        assert reason in caplog.text, reason


# --- one line, exit code 2, before the model loads -------------------------------------------------------


def _truncated_model(tmp_path, hfx_causal):
    folder = tmp_path / "truncated"
    shutil.copytree(hfx_causal, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return str(folder)


def _no_config_model(tmp_path, hfx_causal):
    folder = tmp_path / "noconfig"
    shutil.copytree(hfx_causal, folder)
    (folder / "config.json").unlink()
    return str(folder)


def _no_weights_model(tmp_path, hfx_causal):
    folder = tmp_path / "noweights"
    shutil.copytree(hfx_causal, folder)
    (folder / "model.safetensors").unlink()
    return str(folder)


def _adapter_as_model(tmp_path, hfx_causal):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/base"}))
    return str(folder)


def _hub_id(tmp_path, hfx_causal):
    return "some-org/some-model"  # conftest sets HF_HUB_OFFLINE=1


def _data(name, content: bytes):
    def make(tmp_path):
        path = tmp_path / name
        path.write_bytes(content)
        return str(path)

    return make


GOOD_ROW = b'{"prompt": "say 1", "completion": "one"}\n'
CLI_ERRORS = [
    # (model maker | None, data maker | None, extra argv, message fragment)
    ("missing", None, [], "--model {tmp}/no-such-model: no such folder"),
    (_truncated_model, None, [], "model.safetensors is damaged or truncated"),
    (_no_config_model, None, [], "holds no config.json, so it is not a saved model folder"),
    (_no_weights_model, None, [], "no weights file"),
    (_adapter_as_model, None, [], "is a PEFT adapter, not a model (it has adapter_config.json and no config.json); "
                                  "give its base model (/models/base)"),
    (_hub_id, None, [], "--model some-org/some-model: no such folder (hub access is off: HF_HUB_OFFLINE is set)"),
    (None, _data("empty.jsonl", b""), [], "empty.jsonl is empty: no records"),
    (None, _data("blank.jsonl", b"\n\n"), [], "blank.jsonl holds no records"),
    (None, _data("broken.jsonl", GOOD_ROW + b'{"prompt": "say 2", \n'), [], "broken.jsonl line 2: invalid JSON"),
    (None, _data("latin1.jsonl", GOOD_ROW + '{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1")), [],
     "latin1.jsonl line 2 is not UTF-8 text (byte 0xe9"),
    (None, _data("list.jsonl", GOOD_ROW + b"[1, 2]\n"), [], "list.jsonl line 2: a record must be a JSON object, got list"),
    (None, _data("ragged.csv", b"prompt,completion\nsay 1,one\nsay 2,two,extra\n"), [],
     "ragged.csv line 3: 3 fields where the header has 2"),
    (None, _data("header.csv", b"prompt,completion\n"), [], "header.csv has a header ['prompt', 'completion'] but no records"),
    (None, _data("latin1.csv", b"prompt,completion\ncaf\xe9,x\n"), [], "latin1.csv line 2 is not UTF-8 text"),
    (None, _data("bad.json", b'[{"prompt": "a", "completion": "b"},'), [], "bad.json line 1: invalid JSON"),
    (None, _data("scalar.json", b"42"), [], "scalar.json must hold a list of records"),
    (None, _data("notes.txt", b"hello"), [], "unsupported data file(s) ['notes.txt']"),
    (None, "missing", [], "data file {tmp}/nope.jsonl does not exist"),
    (None, None, ["--epochs", "0"], "epochs must be a positive finite number (or set max_steps); got 0.0"),
    (None, None, ["--max-steps", "0"], "max_steps must be a positive number of steps, or -1"),
    (None, None, ["--max-steps", "-5"], "max_steps must be a positive number of steps, or -1 to train for epochs; got -5"),
    (None, None, ["--warmup-ratio", "1"], "warmup_ratio must be in [0, 1)"),
    (None, None, ["--warmup-ratio", "5"], "warmup_ratio must be in [0, 1) (a fraction of the training steps), got 5.0"),
    (None, None, ["--warmup-ratio", "-0.1"], "warmup_ratio must be in [0, 1)"),
    (None, None, ["--lr-scheduler", "cosine_restarts"], "lr_scheduler='cosine_restarts' is invalid; valid values: ['linear'"),
    (None, None, ["--learning-rate", "0"], "learning_rate must be a positive finite number, got 0.0"),
    (None, None, ["--learning-rate", "nan"], "learning_rate must be a positive finite number, got nan"),
    (None, None, ["--target-modules", ","], "target_modules=',' names no module"),
    (None, None, ["--eval-steps", "0"], "eval_steps must be a positive integer, got 0"),
    (None, None, ["--max-train-samples", "0"], "max_train_samples must be a positive integer, got 0"),
    (None, None, ["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
    (None, None, ["--lora-dropout", "1"], "lora_dropout must be in [0, 1), got 1.0"),
    (None, None, ["--weight-decay", "-1"], "weight_decay must be a non-negative finite number, got -1.0"),
    (None, None, ["--overwrite", "--resume"], "overwrite and resume exclude each other"),
    (None, None, ["--target-modules", "gate_proj"], "target module(s) ['gate_proj'] match no linear layer"),
    (None, None, ["--eval-fraction", "1"], "eval_fraction must be in [0, 1), got 1.0"),
    (None, None, ["--eval-fraction", "0.99"], "eval_fraction=0.99 of the 48 examples of"),
    (None, None, ["--packing", "wrapped", "--max-length", "100000"], "--packing needs at least max_length=100000 tokens in all"),
    (None, None, ["--eval-data", "{tmp}/held-out.jsonl"], "data file {tmp}/held-out.jsonl does not exist"),
]


@pytest.mark.parametrize("model_maker,data_maker,extra,fragment", CLI_ERRORS)
def test_cli_mistakes_are_one_line_exit_2_before_the_model_loads(tmp_path, capsys, hfx_causal, task_file,
                                                                 no_model_load, model_maker, data_maker, extra,
                                                                 fragment):
    model = (str(tmp_path / "no-such-model") if model_maker == "missing"
             else model_maker(tmp_path, hfx_causal) if model_maker else hfx_causal)
    data = (str(tmp_path / "nope.jsonl") if data_maker == "missing"
            else data_maker(tmp_path) if data_maker else task_file)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--model", model, "--data", data, "--output", str(tmp_path / "out"),
              *(arg.format(tmp=tmp_path) for arg in extra)])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.strip() and not line.rstrip().endswith(("/s]", "?it/s]"))]  # datasets' progress bars
    assert len(lines) == 1 and lines[0].startswith("hfx finetune: "), lines
    err = lines[0]
    assert fragment.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "out").exists()  # nothing written


def test_warmup_ratio_is_a_fraction_of_the_steps(tmp_path, hfx_causal, task_file, monkeypatch):
    """A ratio reached Trainer as warmup_steps; it must stay a ratio (below 1), never become a step count."""

    class Stop(Exception):
        pass

    seen = []
    original = train_module.build_trainer

    def spy(*args, **kwargs):
        seen.append(original(*args, **kwargs).args)
        raise Stop

    monkeypatch.setattr(train_module, "build_trainer", spy)
    for ratio in (0.0, 0.1, 0.5, 0.99):
        with pytest.raises(Stop):
            finetune(run_config(hfx_causal, task_file, tmp_path / f"out-{ratio}", warmup_ratio=ratio, max_steps=200))
    assert [args.get_warmup_steps(200) for args in seen] == [0, 20, 100, math.ceil(0.99 * 200)]


def test_epochs_zero_is_refused_not_reported_as_success(tmp_path, hfx_causal, task_file):
    with pytest.raises(ValueError, match="would train nothing"):
        run_config(hfx_causal, task_file, tmp_path / "out", max_steps=-1, epochs=0)
    assert run_config(hfx_causal, task_file, tmp_path / "out", max_steps=5, epochs=0).max_steps == 5


# --- DDP: one summary, the loss over every process -----------------------------------------------------


def printed_summary(stdout: str) -> dict:
    """The JSON summary ``hfx finetune`` prints last (Trainer prints its own dict lines before it)."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


@pytest.fixture(scope="module")
def peaked_causal(tmp_path_factory, tokenizer_dir):  # noqa: F811
    """An hfx decoder drawn with large weights: its loss differs from example to example by far more
    than the 1e-3 the DDP comparison allows (with the default 0.02 init every loss is ~log(vocab))."""
    import torch
    from transformers import AutoTokenizer

    import hfx

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = hfx.HfxConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        is_decoder=True, norm_type="rmsnorm", position_embedding_type="rotary", initializer_range=0.5,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("peaked")
    hfx.HfxForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.slow
def test_ddp_prints_one_summary_with_the_all_process_loss(tmp_path, peaked_causal):
    # 8 examples, the whole set every step: 2 x 4 under DDP is the batch of 8 of one process. With
    # --logging-steps above the step count no loss is logged during training, so Trainer's
    # training_loss is each process's own (6.63 and 6.92 here; measured) until hfx averages it
    # over the processes (6.7765, the single process's value).
    data = write_jsonl(tmp_path / "eight.jsonl", task_rows(8))
    common = ["finetune", "--model", peaked_causal, "--data", str(data), "--max-steps", "2", "--lora-r", "4",
              "--lora-alpha", "8", "--lora-dropout", "0", "--learning-rate", "1e-2", "--logging-steps", "50"]
    ddp, single = run_ddp_and_single(common, tmp_path)
    assert ddp.stdout.count('"train_loss"') == 1, ddp.stdout
    summary, one = printed_summary(ddp.stdout), printed_summary(single.stdout)
    assert summary["world_size"] == 2 and summary["global_step"] == 2
    assert summary["train_loss"] == pytest.approx(one["train_loss"], abs=1e-3)
    saved = json.loads((tmp_path / "ddp" / "hfx_finetune_results.json").read_text())
    assert saved["train_loss"] == summary["train_loss"]
