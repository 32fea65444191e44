"""``hfx quickstart``: its own steps end to end (short), the step seam, and flag errors."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForPreTraining, AutoTokenizer

from hfx.cli import build_parser, main
from hfx.data import embedded_corpus
from hfx.quickstart import STEPS, run_quickstart

OWN_STEPS = [(name, target) for name, target in STEPS if target.startswith("hfx.quickstart:")]


@pytest.fixture(autouse=True)
def one_thread():
    """A model this small runs fastest on one thread, and far faster than two on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def flags(*argv):
    return build_parser().parse_args(["quickstart", *argv])


def facts_accuracy(model, tokenizer):
    """Summed log-likelihood of each choice after the query; argmax is the prediction."""
    rows = embedded_corpus()["facts_test"]
    correct = 0
    for row in rows:
        context = tokenizer(row["query"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in row["choices"]:
            ids = tokenizer(f"{row['query']} {choice}", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            scores.append(sum(logprobs[i - 1, ids[i]].item() for i in range(len(context), len(ids))))
        correct += scores.index(max(scores)) == row["gold"]
    return correct / len(rows)


@pytest.mark.slow
def test_quickstart_pretrains_a_causal_lm_that_learns_the_facts(tmp_path):
    ctx = run_quickstart(flags("--work-dir", str(tmp_path), "--steps", "500"), steps=OWN_STEPS)
    assert [name for name, _ in OWN_STEPS] == ["data", "tokenizer", "pretrain", "reload"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["timings_s"]) == {"data", "tokenizer", "pretrain", "reload", "total"}
    pretrain = report["results"]["pretrain"]
    assert pretrain["validation_loss_after"] < pretrain["validation_loss_before"] / 2
    assert (tmp_path / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert report["results"]["reload"]["auto_class"] == "AutoModelForCausalLM"
    for label in ("model", "tokenizer", "loss curve", "embedded data"):
        assert label in report["files"]

    model = AutoModelForCausalLM.from_pretrained(ctx.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(ctx.model_dir)
    assert (model.config.norm_type, model.config.position_embedding_type) == ("layernorm", "rotary")
    assert tokenizer("3 plus 4 is").input_ids == tokenizer("3 plus 4 is", add_special_tokens=False).input_ids
    assert "[SEP]" not in report["results"]["reload"]["sample"] and tokenizer.sep_token is None
    untrained = AutoModelForCausalLM.from_config(model.config).eval()
    chance = facts_accuracy(untrained, tokenizer)
    learned = facts_accuracy(model, tokenizer)
    assert chance < 0.4 < learned, (chance, learned)


@pytest.mark.slow
def test_quickstart_bert_style_with_batchnorm_and_a_plugin_step(tmp_path, monkeypatch, capsys):
    seen = {}

    def extra_step(ctx):
        seen["model_dir"], seen["objective"] = ctx.model_dir, ctx.objective
        ctx.report("extra", "ran after reload")

    monkeypatch.setattr("hfx.quickstart.extra_step", extra_step, raising=False)
    steps = OWN_STEPS + [("extra", "hfx.quickstart:extra_step")]
    ctx = run_quickstart(
        flags("--work-dir", str(tmp_path), "--objective", "mlm_nsp", "--norm-type", "batchnorm", "--steps", "20"),
        steps=steps,
    )
    assert seen == {"model_dir": ctx.model_dir, "objective": "mlm_nsp"}
    assert ("extra", "ran after reload") in ctx.lines
    model = AutoModelForPreTraining.from_pretrained(ctx.model_dir)
    assert type(model).__name__ == "HfxForPreTraining" and model.config.norm_type == "batchnorm"
    assert "20/20" in capsys.readouterr().err  # pre-training shows Trainer's progress bar
    tokenizer = AutoTokenizer.from_pretrained(ctx.model_dir)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("the sky", "is blue").input_ids)
    assert tokens[0] == "[CLS]" and tokens.count("[SEP]") == 2 and tokenizer.mask_token == "[MASK]"


def test_skip_names_must_exist(tmp_path):
    with pytest.raises(ValueError, match=r"--skip: unknown step 'pretrian'; valid steps: data, tokenizer, pretrain"):
        run_quickstart(flags("--work-dir", str(tmp_path / "qs"), "--skip", "pretrian"), steps=OWN_STEPS)
    assert not (tmp_path / "qs").exists()


CLI_ERRORS = [
    (["--skip", "pretrian"],
     "hfx quickstart: error: --skip: unknown step 'pretrian'; valid steps: data, tokenizer, pretrain, reload, finetune, "
     "encoder-eval, eval"),
    (["--skip", "tokenizer"], "--skip tokenizer: step 'pretrain' needs what it makes; skip it too or keep 'tokenizer'"),
    (["--skip", "pretrain"], "--skip pretrain: steps 'reload', 'finetune', 'encoder-eval', 'eval' need what it makes"),
    (["--norm-type", "groupnorm"], "Unknown norm 'groupnorm'. Installed norm components: ['batchnorm', 'batchnorm_causal'"),
    (["--hidden-size", "30"], "hidden_size=30 is not divisible by num_attention_heads=4"),
    (["--steps", "0"], "hfx quickstart: error: --steps must be at least 1, got 0"),
    (["--batch-size", "-2"], "--batch-size must be at least 1, got -2"),
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--learning-rate", "0"], "--learning-rate must be positive, got 0.0"),
    (["--vocab-size", "3"], "--vocab-size 3 is smaller than the 4 special tokens ['[PAD]', '[UNK]', '</s>', '<s>']"),
    (["--objective", "mlm_nsp", "--vocab-size", "6"], "--vocab-size 6 is smaller than the 7 special tokens"),
]


@pytest.mark.parametrize(("argv", "message"), CLI_ERRORS, ids=[" ".join(argv) for argv, _ in CLI_ERRORS])
def test_bad_flags_are_one_line_exit_2_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["quickstart", "--work-dir", str(tmp_path / "qs"), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "qs").exists()


def test_a_file_as_work_dir_is_refused(tmp_path, capsys):
    (tmp_path / "qs").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["quickstart", "--work-dir", str(tmp_path / "qs")])
    assert exit_info.value.code == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert (tmp_path / "qs").read_text() == "mine"


def test_skipping_every_step_that_needs_the_model_is_allowed(tmp_path):
    ctx = run_quickstart(flags("--work-dir", str(tmp_path), "--skip", "pretrain", "--skip", "reload"),
                         steps=OWN_STEPS)
    assert set(ctx.timings) == {"data", "tokenizer", "total"}
    tokenizer = AutoTokenizer.from_pretrained(ctx.tokenizer_dir)
    assert tokenizer.sep_token is None and tokenizer.eos_token == "</s>"  # clm: a causal tokenizer


@pytest.mark.slow
def test_every_step_runs_and_eval_compares_the_pre_trained_and_fine_tuned_models(tmp_path, capsys):
    """The main job end to end (``--fast``): each built-in step reports, and eval scores both models."""
    ctx = run_quickstart(flags("--work-dir", str(tmp_path), "--fast"))
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["timings_s"]) == {name for name, _ in STEPS} | {"total"}
    finetune = report["results"]["finetune"]
    assert finetune["steps"] > 0 and finetune["train_loss_last"] < finetune["train_loss_first"]
    assert ctx.finetuned_dir is not None and (ctx.finetuned_dir / "config.json").is_file()
    assert not (ctx.finetuned_dir / "adapter_config.json").exists()  # merged: a plain checkpoint
    evaluation = report["results"]["eval"]
    assert set(evaluation) == {"pre-trained", "fine-tuned"}
    for label in evaluation:
        assert set(evaluation[label]) == {"0-shot", "3-shot"}
        for shots in evaluation[label].values():
            assert set(shots) == {"embedded_facts", "embedded_arithmetic"}
            assert all(0.0 <= entry["acc,none"] <= 1.0 for entry in shots.values())
    table = capsys.readouterr().out.split("| task | shots | pre-trained acc | fine-tuned acc |")[1]
    facts_0 = evaluation["pre-trained"]["0-shot"]["embedded_facts"]["acc,none"]
    tuned_0 = evaluation["fine-tuned"]["0-shot"]["embedded_facts"]["acc,none"]
    assert f"| embedded_facts | 0 | {facts_0:.3f} | {tuned_0:.3f} |" in table
