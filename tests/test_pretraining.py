"""Pre-training with Trainer through the examples' code path: saving, reloading, resuming after a crash."""

import argparse
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForPreTraining,
    AutoTokenizer,
    TrainerCallback,
)

from hfx.data import load_documents
from hfx.pretraining import add_arguments, run_from_args
from hfx.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """A model this small runs fastest on one thread, and far faster than two on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def parse(objective, *argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser, objective_default=objective)
    return parser.parse_args(list(argv))


class Crash(RuntimeError):
    pass


class CrashAfter(TrainerCallback):
    """Dies when step ``step`` is done and its checkpoint written, like a killed job."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise Crash(f"simulated crash after step {state.global_step}")


TINY = ("--max-steps", "12", "--save-steps", "6", "--logging-steps", "3", "--hidden-size", "32", "--max-length", "32",
        "--batch-size", "8")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    # BPE training in `tokenizers` breaks ties differently from run to run, so both runs share one tokenizer.
    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(load_documents("embedded")["text"], vocab_size=1000, save_dir=path)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["mlm_nsp", "clm"])
def test_resumed_run_reaches_the_same_final_loss(tmp_path, objective, tokenizer_dir):
    common = ("--tokenizer", tokenizer_dir, *TINY)
    straight = run_from_args(parse(objective, "--output-dir", str(tmp_path / "straight"), *common))

    interrupted_dir = str(tmp_path / "interrupted")
    with pytest.raises(Crash):
        run_from_args(parse(objective, "--output-dir", interrupted_dir, *common), callbacks=[CrashAfter(6)])
    assert (tmp_path / "interrupted" / "checkpoint-6").is_dir()
    assert not (tmp_path / "interrupted" / "model").exists()
    resumed = run_from_args(parse(objective, "--output-dir", interrupted_dir, "--resume", *common))

    def losses(trainer):
        return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]

    assert resumed.state.global_step == straight.state.global_step == 12
    final_straight, final_resumed = losses(straight)[-1], losses(resumed)[-1]
    assert final_resumed[0] == final_straight[0] == 12
    assert final_resumed[1] == pytest.approx(final_straight[1], rel=1e-5, abs=1e-6)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


MODEL = ("--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--norm-type", "rmsnorm",
         "--position-embedding-type", "rotary")
RUN = ("--max-steps", "12", "--save-steps", "6", "--logging-steps", "3", "--max-length", "32", "--batch-size", "8")


@pytest.mark.slow
def test_resume_rebuilds_the_model_from_the_checkpoint_not_from_the_flag_defaults(tmp_path, tokenizer_dir):
    out = str(tmp_path / "gpt")
    with pytest.raises(Crash):
        run_from_args(parse("clm", "--output-dir", out, "--tokenizer", tokenizer_dir, *MODEL, *RUN),
                      callbacks=[CrashAfter(6)])
    # only what the run needs to continue: no model flags (their defaults are hidden 64, 2 layers, layernorm)
    resumed = run_from_args(parse("clm", "--output-dir", out, "--tokenizer", tokenizer_dir, "--resume", *RUN))
    assert resumed.state.global_step == 12
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt" / "model").config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 1, 2)
    assert (config.norm_type, config.position_embedding_type) == ("rmsnorm", "rotary")

    # a model flag given again with its saved value is fine; another value is refused, naming each difference
    extended = run_from_args(parse("clm", "--output-dir", out, "--tokenizer", tokenizer_dir, "--resume", *RUN,
                                   "--hidden-size", "32", "--max-steps", "15"))
    assert extended.state.global_step == 15
    with pytest.raises(ValueError) as error:
        run_from_args(parse("clm", "--output-dir", out, "--resume", "--data", str(tmp_path / "not-read.txt"),
                            "--hidden-size", "48", "--norm-type", "layernorm", *RUN))
    assert "--norm-type layernorm (saved: rmsnorm); --hidden-size 48 (saved: 32)" in str(error.value)
    assert "Leave these flags out" in str(error.value)  # and it came before the missing --data was read


@pytest.mark.slow
def test_resume_with_the_other_objective_is_refused(tmp_path, tokenizer_dir):
    out = str(tmp_path / "run")
    with pytest.raises(Crash):
        run_from_args(parse("clm", "--output-dir", out, "--tokenizer", tokenizer_dir, *MODEL, *RUN),
                      callbacks=[CrashAfter(6)])
    with pytest.raises(ValueError, match="holds a HfxForCausalLM, not a HfxForPreTraining"):
        run_from_args(parse("mlm_nsp", "--output-dir", out, "--tokenizer", tokenizer_dir, "--resume", *RUN))


@pytest.mark.slow
def test_resume_skips_a_half_written_checkpoint_with_a_warning(tmp_path, tokenizer_dir):
    out = tmp_path / "gpt"
    run = ("--output-dir", str(out), "--tokenizer", tokenizer_dir, *MODEL, *RUN, "--save-steps", "3")
    with pytest.raises(Crash):
        run_from_args(parse("clm", *run), callbacks=[CrashAfter(6)])
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-3", "checkpoint-6"}
    # killed while writing checkpoint-6: the weights are cut short and trainer_state.json never came
    weights = out / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (out / "checkpoint-6" / "trainer_state.json").unlink()
    with pytest.warns(RuntimeWarning, match=r"skipping .*checkpoint-6, a checkpoint whose write did not finish: no "
                                            r"trainer_state\.json"):
        resumed = run_from_args(parse("clm", *run, "--resume"))
    assert resumed.state.global_step == 12  # from checkpoint-3: the damaged weights of checkpoint-6 were never read
    assert (out / "model" / "model.safetensors").is_file()


def test_resume_with_only_half_written_checkpoints_is_an_error(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint .*1 checkpoint-\* folder\(s\), none finished"):
        with pytest.warns(RuntimeWarning, match="no trainer_state.json"):
            run_from_args(parse("clm", "--output-dir", str(tmp_path), "--resume", *TINY))


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_from_args(parse("clm", "--output-dir", str(tmp_path), "--resume", *TINY))


def example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bert_style_example_saves_a_model_auto_classes_reload(tmp_path, tokenizer_dir):
    out = tmp_path / "bert"
    example("pretrain_bert_style").main(
        ["--output-dir", str(out), "--tokenizer", tokenizer_dir, "--norm-type", "rmsnorm",
         "--position-embedding-type", "sinusoidal", "--attention-type", "eager", "--whole-word-mask", *TINY]
    )
    model = AutoModelForPreTraining.from_pretrained(out / "model")
    assert type(model).__name__ == "HfxForPreTraining"
    assert (model.config.norm_type, model.config.position_embedding_type) == ("rmsnorm", "sinusoidal")
    masked_lm = AutoModelForMaskedLM.from_pretrained(out / "model")
    torch.testing.assert_close(masked_lm.lm_head.decoder.weight, model.lm_head.decoder.weight)
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".*")), "temporary folders left behind"


def test_gpt_style_example_rejects_missing_data_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        example("pretrain_gpt_style").main(["--output-dir", str(tmp_path / "gpt"), "--data",
                                            str(tmp_path / "missing.txt")])
    assert not (tmp_path / "gpt").exists()


def test_example_scripts_report_bad_input_in_one_line_with_exit_2(tmp_path):
    import subprocess
    import sys

    for name in ("pretrain_gpt_style", "pretrain_bert_style"):
        done = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), "--output-dir", str(tmp_path / name),
                               "--resume"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.startswith(f"{name}.py: error: --resume: no checkpoint-* folder in ")
        assert "Traceback" not in done.stderr


def test_examples_reject_a_bad_norm_name(tmp_path, capsys):
    with pytest.raises(SystemExit):
        example("pretrain_gpt_style").main(["--output-dir", str(tmp_path), "--norm-type", "groupnorm"])
    assert "invalid choice: 'groupnorm'" in capsys.readouterr().err


def test_gpt_style_run_trains_and_reloads_as_causal_lm(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"doc {i} starts here.\nit ends with {i % 7}." for i in range(200)))
    trainer = run_from_args(parse("clm", "--data", str(text), "--output-dir", str(tmp_path / "gpt"),
                                  *TINY, "--save-steps", "0"))
    assert "12/12" in capsys.readouterr().err  # Trainer's progress bar, run to the end
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "gpt" / "model")
    assert tokenizer("doc 3 starts").input_ids == tokenizer("doc 3 starts", add_special_tokens=False).input_ids
    assert tokenizer.sep_token is None and tokenizer.eos_token == "</s>"  # GPT-style: nothing wraps the text
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt" / "model")
    assert model.config.is_decoder and type(model).__name__ == "HfxForCausalLM"
    assert not list((tmp_path / "gpt").glob("checkpoint-*"))


def test_compare_norms_writes_a_table_and_plot_with_every_norm(tmp_path):
    rows = example("compare_norms").main(["--output-dir", str(tmp_path), "--steps", "4", "--batch-sizes", "4"])
    assert [r["norm"] for r in rows.values()] == ["layernorm", "rmsnorm", "batchnorm", "batchnorm_causal", "powernorm", "dyt"]
    table = (tmp_path / "norms.md").read_text()
    for norm in ["layernorm", "rmsnorm", "batchnorm", "batchnorm_causal", "powernorm", "dyt"]:
        assert f"| {norm} | 4 |" in table
    assert (tmp_path / "norms.png").read_bytes()[:4] == b"\x89PNG"


# --- output folder, --resume / --overwrite rules ---------------------------------------------------------------

SMALL = ("--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--max-length", "32", "--batch-size", "8",
         "--logging-steps", "2")


class StopAt(TrainerCallback):
    """A guard: a run that goes past ``step`` (e.g. on to the default 300) stops the test at once."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        assert state.global_step < self.step, f"trained past step {self.step - 1}"


@pytest.mark.slow
def test_resume_without_max_steps_continues_the_saved_run_and_refuses_nothing_to_do(tmp_path, tokenizer_dir):
    out = str(tmp_path / "gpt")
    with pytest.raises(Crash):
        run_from_args(parse("clm", "--output-dir", out, "--tokenizer", tokenizer_dir, *SMALL, "--max-steps", "6",
                            "--save-steps", "2"), callbacks=[CrashAfter(2)])
    # --resume alone: the saved run's --max-steps 6, --save-steps 2, --tokenizer, batch size..., not the defaults
    resumed = run_from_args(parse("clm", "--output-dir", out, "--resume"), callbacks=[StopAt(7)])
    assert resumed.state.global_step == 6
    assert (resumed.args.save_steps, resumed.args.logging_steps, resumed.args.per_device_train_batch_size) == (2, 2, 8)
    assert {p.name for p in (tmp_path / "gpt").glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4", "checkpoint-6"}
    # tied weights stay tied after Trainer loads the checkpoint (its "missing keys ['lm_head.weight']" note is harmless)
    assert resumed.model.lm_head.weight is resumed.model.model.embeddings.word_embeddings.weight

    with pytest.raises(ValueError, match=r"the run finished: .*checkpoint-6 is already at step 6; raise --max-steps"):
        run_from_args(parse("clm", "--output-dir", out, "--resume"))
    with pytest.raises(ValueError, match=r"checkpoint-6 is already at step 6; raise --max-steps \(given: 5\)"):
        run_from_args(parse("clm", "--output-dir", out, "--resume", "--max-steps", "5"))
    extended = run_from_args(parse("clm", "--output-dir", out, "--resume", "--max-steps", "8"), callbacks=[StopAt(9)])
    assert extended.state.global_step == 8 and (tmp_path / "gpt" / "checkpoint-8").is_dir()


def test_saved_settings_of_a_run_without_a_settings_file_come_from_trainer_state(tmp_path):
    from hfx.pretraining import resolve_settings, saved_settings

    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text(
        '{"global_step": 4, "max_steps": 60, "save_steps": 20, "logging_steps": 5, "train_batch_size": 4}')
    saved = saved_settings(tmp_path, tmp_path / "checkpoint-4")
    assert saved == {"max_steps": 60, "save_steps": 20, "logging_steps": 5, "batch_size": 4}
    args = resolve_settings(parse("clm", "--output-dir", str(tmp_path), "--resume", "--save-steps", "10"), saved)
    assert (args.max_steps, args.save_steps, args.batch_size, args.learning_rate) == (60, 10, 4, 3e-3)


def fake_run(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        if "." in name:
            (folder / name).write_text("x")
        else:
            (folder / name).mkdir()
            (folder / name / "config.json").write_text("{}")


def test_a_folder_holding_a_run_needs_resume_or_overwrite(tmp_path):
    missing = str(tmp_path / "missing.txt")  # the output folder is checked before --data is read
    for names in (("model",), ("checkpoint-20", "tokenizer")):
        out = tmp_path / "-".join(names)
        fake_run(out, *names)
        with pytest.raises(ValueError) as error:
            example("pretrain_gpt_style").main(["--output-dir", str(out), "--data", missing])
        run_entries = [name for name in sorted(names) if name != "tokenizer"]
        assert f"--output-dir {out} already holds a run ({run_entries}); " in str(error.value)
        assert "pass --resume to continue it or --overwrite to replace it" in str(error.value)
        assert sorted(p.name for p in out.iterdir()) == sorted(names)  # untouched
    with pytest.raises(ValueError, match="--resume and --overwrite exclude each other"):
        example("pretrain_gpt_style").main(["--output-dir", str(tmp_path / "model"), "--resume", "--overwrite"])


def test_overwrite_refuses_files_it_did_not_write_and_sources_inside(tmp_path):
    out = tmp_path / "run"
    fake_run(out, "model", "checkpoint-3", "notes.txt", "checkpoint-3-best")
    with pytest.raises(ValueError) as error:
        example("pretrain_gpt_style").main(["--output-dir", str(out), "--overwrite"])
    assert str(error.value) == (f"--overwrite: {out} holds ['checkpoint-3-best', 'notes.txt'], which the pre-training "
                                "examples do not write; nothing was deleted. Move them elsewhere or choose another "
                                "--output-dir")
    assert len(list(out.iterdir())) == 4
    (out / "notes.txt").unlink()
    shutil.rmtree(out / "checkpoint-3-best")
    with pytest.raises(ValueError, match=r"--overwrite would delete --tokenizer .*model, which lies in"):
        example("pretrain_gpt_style").main(["--output-dir", str(out), "--overwrite", "--tokenizer", str(out / "model")])
    assert (out / "model").is_dir()


@pytest.mark.slow
def test_overwrite_starts_again_removing_only_what_the_example_wrote(tmp_path, tokenizer_dir):
    out = tmp_path / "run"
    fake_run(out, "model", "checkpoint-9", "runs", "loss_curve.png", "pretrain_args.json", "model.tmp")
    trainer = run_from_args(parse("clm", "--output-dir", str(out), "--overwrite", "--tokenizer", tokenizer_dir, *SMALL,
                                  "--max-steps", "2", "--save-steps", "0"))
    assert trainer.state.global_step == 2
    assert sorted(p.name for p in out.iterdir()) == ["loss_curve.png", "model", "pretrain_args.json"]
    assert (out / "model" / "model.safetensors").is_file()


def test_output_dir_that_is_a_file_or_under_one_is_one_line_exit_2_before_any_work(tmp_path):
    import subprocess
    import sys

    readme = tmp_path / "README.md"
    readme.write_text("notes")
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "pretrain_gpt_style.py"), "--output-dir", "README.md",
                           "--max-steps", "5"], capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == ("pretrain_gpt_style.py: error: --output-dir README.md is a file, not a folder; choose a "
                           "folder for the run\n")
    assert readme.read_text() == "notes"
    nested = tmp_path / "runs" / "x" / "model" / "config.json"
    nested.parent.mkdir(parents=True)
    nested.write_text("{}")
    with pytest.raises(ValueError) as error:  # before the missing --data is read
        example("pretrain_bert_style").main(["--output-dir", str(nested / "x"), "--data", str(tmp_path / "no.txt")])
    assert str(error.value) == f"--output-dir {nested / 'x'} cannot be created: {nested} is a file, not a folder"


def test_an_explicit_text_column_must_exist_and_wins_over_a_sentences_column(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"sentences": ["old one.", "old two."], "body": "New one. New two!", "id": 1}\n')
    docs = load_documents(str(path), text_column="body")
    assert docs["sentences"] == [["New one.", "New two!"]] and docs["text"] == ["New one. New two!"]
    assert load_documents(str(path))["sentences"] == [["old one.", "old two."]]  # left out: the sentences column
    with pytest.raises(ValueError, match=r"text column 'content' not found in .*notes\.jsonl'; its columns are "
                                         r"\['sentences', 'body', 'id'\]"):
        example("pretrain_gpt_style").main(["--output-dir", str(tmp_path / "out"), "--data", str(path),
                                            "--text-column", "content"])
    assert not (tmp_path / "out").exists()
