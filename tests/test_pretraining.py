"""Pre-training with Trainer through the examples' code path: saving, reloading, resuming after a crash."""

import argparse
import importlib.util
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
    assert [r["norm"] for r in rows.values()] == ["layernorm", "rmsnorm", "batchnorm"]
    table = (tmp_path / "norms.md").read_text()
    for norm in ("layernorm", "rmsnorm", "batchnorm"):
        assert f"| {norm} | 4 |" in table
    assert (tmp_path / "norms.png").read_bytes()[:4] == b"\x89PNG"
