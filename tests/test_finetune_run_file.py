"""``hfx finetune --config run.yaml``: file values, typed flags over them, argparse defaults never, clear refusals."""

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hfx.cli import build_parser, main
from hfx.finetune import FinetuneConfig
from hfx.finetune.run_file import GIVEN, RunFileError, config_from_run_file, load_run_file, merged_values
from hfx.tokenizer import train_tokenizer


def resolved(argv, tmp_path, text=None, name="run.yaml"):
    """The FinetuneConfig values ``hfx finetune ARGV`` resolves (the CLI's own parser and merge)."""
    if text is not None:
        (tmp_path / name).write_text(text)
        argv = ["--config", str(tmp_path / name), *argv]
    args = build_parser(["finetune"]).parse_args(["finetune", *argv])
    cli = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config", GIVEN)}
    return merged_values(cli, getattr(args, GIVEN, set()), args.config)


YAML = """\
model: ./base
data: train.jsonl
output: runs/a
lora_r: 8
double_quant: true
learning_rate: 2e-4      # YAML 1.1 reads this as a string; a float field takes the number
target_modules: [q_proj, v_proj]
modules_to_save: lm_head
use_dora: true
"""


def test_file_values_and_typed_flags_override(tmp_path):
    values = resolved([], tmp_path, YAML)
    assert values["lora_r"] == 8 and values["learning_rate"] == 2e-4 and values["use_dora"] is True
    assert values["target_modules"] == ["q_proj", "v_proj"] and values["model"] == "./base"
    assert values["lora_alpha"] == 32 and values["batch_size"] == 8  # neither given: the CLI defaults
    # typed flags win, even one equal to its argparse default (--lora-r 16) or a store_false one
    values = resolved(["--lora-r", "16", "--no-double-quant", "--output", "runs/b"], tmp_path, YAML)
    assert values["lora_r"] == 16 and values["double_quant"] is False and values["output"] == "runs/b"
    assert values["use_dora"] is True and values["data"] == "train.jsonl"
    config = FinetuneConfig.from_dict(values)
    assert config.modules_to_save == ["lm_head"] and config.target_modules == ["q_proj", "v_proj"]
    # without --config the flags alone, as before
    plain = resolved(["--model", "m", "--data", "d", "--output", "o"], tmp_path)
    assert plain["lora_r"] == 16 and plain["model"] == "m"


def test_json_run_file_and_the_python_api(tmp_path):
    values = {"model": "m", "data": "d", "output": "o", "method": "full", "max_steps": 3, "packing": "bfd"}
    (tmp_path / "run.json").write_text(json.dumps(values))
    assert load_run_file(tmp_path / "run.json") == values
    config = config_from_run_file(tmp_path / "run.json", max_steps=5)
    assert config.method == "full" and config.max_steps == 5 and config.packing == "bfd"


@pytest.mark.parametrize("text", ["packing: true\n", "packing: yes\n", "packing: off\n"])
def test_boolean_packing_refused_outside_a_runs_record(tmp_path, text):
    """``packing: true`` in a new file is ambiguous (an old run's True meant wrapped, a bare --packing is bfd)."""
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(RunFileError, match=r"packing=(True|False) is ambiguous.*valid values: \['none', 'bfd', "
                                           r"'wrapped'\]"):
        load_run_file(tmp_path / "run.yaml")
    (tmp_path / "plain.yaml").write_text("model: m\n")
    with pytest.raises(RunFileError, match=r"overrides: packing=True is ambiguous"):
        config_from_run_file(tmp_path / "plain.yaml", packing=True)


def test_an_older_runs_record_reads_its_boolean_packing(tmp_path):
    record = {"model": "m", "data": "d", "output": "o", "packing": True, "world_size": 1}
    (tmp_path / "hfx_finetune.json").write_text(json.dumps(record))
    assert load_run_file(tmp_path / "hfx_finetune.json")["packing"] is True
    assert config_from_run_file(tmp_path / "hfx_finetune.json").packing == "wrapped"  # as --resume reads it


def test_a_runs_record_carries_neither_overwrite_nor_resume(tmp_path):
    """An --overwrite (or --resume) run's hfx_finetune.json used as --config starts a plain new run."""
    config = FinetuneConfig(model="m", data="d", output=str(tmp_path / "a"), overwrite=True, merge=True,
                            use_dora=True)
    record = tmp_path / "a" / "hfx_finetune.json"
    record.parent.mkdir()
    record.write_text(json.dumps({**json.loads(config.to_json()), "world_size": 1}))
    values = resolved(["--output", str(tmp_path / "b")], tmp_path, record.read_text(), name="hfx_finetune.json")
    assert values["overwrite"] is False and values["resume"] is False and values["merge"] is True
    assert FinetuneConfig.from_dict(values).overwrite is False
    assert config_from_run_file(record).overwrite is False  # the Python API reads it the same way
    resumed = {**json.loads(config.to_json()), "overwrite": False, "resume": True, "world_size": 1}
    record.write_text(json.dumps(resumed))
    assert resolved([], tmp_path, record.read_text(), name="hfx_finetune.json")["resume"] is False
    # typed flags still set them, and every on/off setting a file turns on can be turned off
    values = resolved(["--resume", "--no-merge", "--no-use-dora"], tmp_path, record.read_text(), name="hfx_finetune.json")
    assert values["resume"] is True and values["merge"] is False and values["use_dora"] is False
    # a hand-written run file is the user's own: its overwrite stands, and --no-overwrite turns it off
    text = "model: m\ndata: d\noutput: o\noverwrite: true\nuse_rslora: true\ntrust_remote_code: true\n" \
           "double_quant: false\nassistant_only_loss: false\n"
    assert resolved([], tmp_path, text)["overwrite"] is True
    values = resolved(["--no-overwrite", "--no-use-rslora", "--no-trust-remote-code", "--double-quant",
                       "--assistant-only-loss"], tmp_path, text)
    assert not (values["overwrite"] or values["use_rslora"] or values["trust_remote_code"])
    assert values["double_quant"] is True and values["assistant_only_loss"] is True


@pytest.mark.parametrize("text,message", [
    ("model: m\nlora_rank: 8\n", r"unknown key\(s\) 'lora_rank' \(did you mean 'lora_r'\?\); valid keys: \['model'"),
    ("lora-alpha: 8\n", r"'lora-alpha' \(did you mean 'lora_alpha'\?\)"),
    ("lora_r: eight\n", r"lora_r='eight' is a str; expected int"),
    ("lora_r: 8.5\n", r"lora_r=8.5 is a float; expected int"),
    ("use_dora: 1\n", r"use_dora=1 is a int; expected bool"),
    ("target_modules: [q_proj, 3]\n", r"target_modules=\['q_proj', 3\] is a list; expected a list of strs"),
    ("eval_data: [a]\n", r"eval_data=\['a'\] is a list; expected str or null"),
    ("- lora_r\n", r"must hold a mapping of FinetuneConfig field names to values, got list"),
    ("lora_r: [8\n", r"not valid YAML"),
    # a value not among a field's names: the file named, the valid values and the closest one, before torch loads
    ("packing: bdf\n", r"run.yaml: packing='bdf' is invalid; valid values: \['none', 'bfd', 'wrapped'\]; "
                        r"did you mean 'bfd'\?"),
    ("init_lora_weights: pisa\n", r"run.yaml: init_lora_weights='pisa' is invalid;.*did you mean 'pissa'\?"),
    ("method: qlor\n", r"run.yaml: method='qlor' is invalid;.*did you mean 'qlora'\?"),
    ("merge_dtype: bf16\n", r"run.yaml: merge_dtype='bf16' is invalid;.*did you mean 'bfloat16'\?"),
    ("chunked_loss: xyz\n", r"run.yaml: chunked_loss='xyz' is invalid; valid values: \['auto', 'on', 'off'\]\.$"),
])
def test_bad_run_files_named(tmp_path, text, message):
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(RunFileError, match=message):
        load_run_file(tmp_path / "run.yaml")


def test_required_fields_from_file_or_flags(tmp_path, capsys):
    with pytest.raises(RunFileError, match=r"the following arguments are required: --data, --output \(on the "
                                           r"command line, or as 'data' / 'output' in a --config run file\)"):
        resolved(["--model", "m"], tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--config", str(tmp_path / "missing.yaml")])
    assert exit_info.value.code == 2 and "missing.yaml: no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_a_tiny_run_from_a_run_file(tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    rows = [{"prompt": f"say {i % 4}", "completion": ["zero", "one", "two", "three"][i % 4]} for i in range(16)]
    train_tokenizer([f"{r['prompt']} {r['completion']}" for r in rows], vocab_size=60, save_dir=tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.eos_token_id))
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run.yaml").write_text(
        f"model: {tmp_path / 'base'}\ndata: {tmp_path / 'train.jsonl'}\noutput: {tmp_path / 'out'}\n"
        "max_steps: 2\nbatch_size: 4\nlora_r: 4\nlora_alpha: 8\nuse_rslora: true\nsave_steps: 100\n"
        "extra_training_args: {disable_tqdm: true}\n")
    assert main(["finetune", "--config", str(tmp_path / "run.yaml"), "--lora-r", "2", "--logging-steps", "1"]) == 0
    saved = json.loads((tmp_path / "out" / "hfx_finetune.json").read_text())  # the resolved config
    assert saved["lora_r"] == 2 and saved["lora_alpha"] == 8 and saved["use_rslora"] is True
    assert saved["max_steps"] == 2 and saved["logging_steps"] == 1 and saved["model"] == str(tmp_path / "base")
    adapter = json.loads((Path(tmp_path / "out" / "adapter" / "adapter_config.json")).read_text())
    assert adapter["r"] == 2 and adapter["use_rslora"] is True
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{\n"):])["global_step"] == 2  # the summary (after any library's notes)


def test_every_field_is_a_run_file_key_and_a_flag(tmp_path):
    import yaml

    config = FinetuneConfig(model="m", data="d", output="o", target_modules="q_proj",
                            extra_training_args={"max_grad_norm": 0.5})
    (tmp_path / "all.yaml").write_text(yaml.safe_dump(json.loads(config.to_json())))
    assert config_from_run_file(tmp_path / "all.yaml") == config
    # a run's own record (OUTPUT/hfx_finetune.json, with the process count) reads back as a run file
    (tmp_path / "hfx_finetune.json").write_text(json.dumps({**json.loads(config.to_json()), "world_size": 2}))
    assert config_from_run_file(tmp_path / "hfx_finetune.json", output="o2") == FinetuneConfig(
        **{**json.loads(config.to_json()), "output": "o2"})
    parser = build_parser(["finetune"])
    finetune_parser = next(a for a in parser._actions if a.dest == "command").choices["finetune"]
    dests = {action.dest for action in finetune_parser._actions}
    # extra_training_args is a mapping: set in a run file or from Python
    assert [f.name for f in fields(FinetuneConfig) if f.name not in dests] == ["extra_training_args"]


def test_choice_typos_suggest_the_closest_value():
    from hfx.finetune.config import CHOICE_FIELDS, check_choice

    with pytest.raises(ValueError, match=r"^bf16='ye' is invalid; valid values: \['auto', 'yes', 'no'\]; "
                                         r"did you mean 'yes'\?$"):
        check_choice("bf16", "ye", CHOICE_FIELDS["bf16"])
    for kwargs, message in ((dict(task="seq_cls"), r"task='seq_cls' is invalid.*did you mean 'seq-cls'\?"),
                            (dict(lr_scheduler="cosin"), r"lr_scheduler='cosin' is invalid.*did you mean 'cosine'\?"),
                            (dict(optim="adamw_torh"), r"optim='adamw_torh' is invalid.*did you mean 'adamw_torch'\?"),
                            (dict(metrics_average="mac"), r"metrics_average='mac' is invalid.*did you mean 'macro'\?"),
                            (dict(quant_storage="unit8"), r"quant_storage='unit8' is invalid.*did you mean 'uint8'\?")):
        with pytest.raises(ValueError, match=message):
            FinetuneConfig(model="m", data="d", output="o", **kwargs)


@pytest.mark.parametrize("name", ["run.txt", "run.toml", "run"])
def test_other_extensions_refused_naming_the_valid_ones(tmp_path, name):
    (tmp_path / name).write_text("lora_r: 8\n")
    with pytest.raises(RunFileError, match=rf"--config .*{name}: the extension .* is invalid; valid extensions: "
                                           r"\['.yaml', '.yml', '.json'\]"):
        load_run_file(tmp_path / name)
    (tmp_path / "run.YML").write_text("lora_r: 8\n")
    assert load_run_file(tmp_path / "run.YML") == {"lora_r": 8}


def test_a_run_files_bad_value_is_reported_with_the_file_named(tmp_path, capsys):
    """Values FinetuneConfig refuses (not only names and types) carry the ``--config FILE:`` prefix when the file gave them."""
    from hfx.finetune.run_file import config_from_values

    text = "model: m\ndata: d\noutput: o\nlora_r: 0\nlr_scheduler: cosin\n"
    (tmp_path / "run.yaml").write_text(text)
    run = str(tmp_path / "run.yaml")
    values = resolved([], tmp_path, text)
    with pytest.raises(RunFileError, match=rf"^--config {run}: lora_r must be a positive integer, got 0"):
        config_from_values(values, set(), run)
    # typed on the command line: the flag's value, so no file prefix
    values = resolved(["--lora-r", "0"], tmp_path, text)
    with pytest.raises(ValueError, match=r"^lora_r must be a positive integer") as info:
        config_from_values(values, {"lora_r"}, run)
    assert not isinstance(info.value, RunFileError)
    # the whole command: one line, exit code 2, the file named
    (tmp_path / "model").mkdir()
    (tmp_path / "bad.yaml").write_text(f"model: {tmp_path / 'model'}\ndata: d\noutput: o\npacking: bdf\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--config", str(tmp_path / "bad.yaml")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"hfx finetune: error: --config {tmp_path / 'bad.yaml'}: packing='bdf' is invalid" in err
    assert "did you mean 'bfd'?" in err and len(err.strip().splitlines()) == 1
    # the Python API names the file too, and an override is reported as itself
    with pytest.raises(RunFileError, match=rf"^--config {run}: lora_r must be a positive integer"):
        config_from_run_file(run)
    with pytest.raises(ValueError, match=r"^max_steps must be a positive number") as info:
        config_from_run_file(run, lora_r=8, max_steps=0)
    assert not isinstance(info.value, RunFileError)
