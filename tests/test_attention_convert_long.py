"""hfx convert-long: a short BERT/RoBERTa checkpoint becomes a long one with unchanged short-input outputs."""

import json

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaModel

from hfx.cli import main
from hfx.long_context import load_long_model


@pytest.mark.parametrize(
    "model_class,config",
    [
        (BertForMaskedLM, BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=16)),
        (RobertaModel, RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=18, pad_token_id=1)),
    ],
)
def test_convert_long_keeps_short_outputs(model_class, config, tmp_path):
    short = model_class(config).eval()
    short.save_pretrained(tmp_path / "short")
    assert main(["convert-long", str(tmp_path / "short"), str(tmp_path / "long"), "--max-position-embeddings", "100",
                 "--attention-window", "16", "--global-token-id", "2"]) == 0
    long = load_long_model(tmp_path / "long").eval()
    assert long.config.max_position_embeddings == 100 and long.config._attn_implementation == "hfx_sliding_window"
    input_ids = torch.randint(3, 50, (2, 9))
    input_ids[:, 0] = 2
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, -2:] = 0
    with torch.no_grad():
        want = short(input_ids, attention_mask=mask)[0]
        got = long(input_ids, attention_mask=mask)[0]
        long_out = long(torch.randint(3, 50, (1, 90)))[0]
    real = mask.bool()[:, :, None]
    torch.testing.assert_close(got * real, want * real, atol=1e-5, rtol=0)
    assert torch.isfinite(long_out).all()
    table = long.base_model.embeddings.position_embeddings.weight
    offset = 2 if config.model_type == "roberta" else 0
    learned = config.max_position_embeddings - offset
    torch.testing.assert_close(table[offset + learned : offset + 2 * learned], table[offset : offset + learned])


def bert_dir(path, **overrides):
    settings = dict(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=16)
    settings.update(overrides)
    BertForMaskedLM(BertConfig(**settings)).save_pretrained(path)
    return str(path)


def cli_error(capsys, argv):
    """Run the CLI; return the one stderr line of a refused conversion (exit code 2, no traceback)."""
    capsys.readouterr()  # drop what building the fixtures printed
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_convert_long_rejects_odd_window(tmp_path, capsys):
    source = bert_dir(tmp_path / "short")
    err = cli_error(capsys, ["convert-long", source, str(tmp_path / "long"), "--attention-window", "15"])
    assert "attention_window must be an even integer >= 2" in err and "got 15" in err
    assert not (tmp_path / "long").exists()


def _hfx_model(path):
    import hfx

    hfx.HfxForMaskedLM(hfx.HfxConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64)).save_pretrained(path)


def _gpt2(path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=4, n_positions=16)).save_pretrained(path)


def _truncated(path):
    bert_dir(path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _no_config(path):
    bert_dir(path)
    (path / "config.json").unlink()


def _relative_bert(path):
    bert_dir(path, position_embedding_type="relative_key")


SOURCES = {"hfx": _hfx_model, "gpt2": _gpt2, "truncated": _truncated, "no_config": _no_config,
           "relative": _relative_bert}


@pytest.mark.parametrize("source,extra,fragment", [
    ("missing", [], "no such folder"),
    ("hfx", [], "is a 'hfx' model; convert-long converts ['bert', 'roberta', 'xlm-roberta', 'camembert']"),
    ("gpt2", [], "is a 'gpt2' model"),
    ("truncated", [], "model.safetensors is damaged or truncated"),
    ("no_config", [], "holds no config.json"),
    ("relative", [], "position_embedding_type='relative_key'"),
    ("bert", ["--global-token-id", "50"], "global token id(s) [50] are outside the vocabulary"),
    ("bert", ["--global-token-id", "-1"], "valid ids are 0 to 49"),
    ("bert", ["--max-position-embeddings", "16"], "max_position_embeddings=16 must exceed the checkpoint's 16"),
    ("bert", ["--max-position-embeddings", "0"], "max_position_embeddings must be a positive integer, got 0"),
    ("bert", [], "has no tokenizer with a [CLS]/<s> token; pass --global-token-id"),
])
def test_convert_long_errors_are_one_line_before_any_write(tmp_path, capsys, source, extra, fragment):
    folder = tmp_path / "src"
    if source == "bert":
        bert_dir(folder)
    elif source != "missing":
        SOURCES[source](folder)
    err = cli_error(capsys, ["convert-long", str(folder), str(tmp_path / "long"), *extra])
    assert err.startswith("hfx convert-long: error: ") and fragment in err, err
    assert not (tmp_path / "long").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".long")]  # no temp folder left


def test_convert_long_output_rules(tmp_path, capsys):
    source = bert_dir(tmp_path / "short")
    out = tmp_path / "long"
    argv = ["convert-long", source, str(out), "--max-position-embeddings", "40", "--attention-window", "8",
            "--global-token-id", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "config.json" in printed and "model.safetensors" in printed
    marker = json.loads((out / "hfx_convert_long.json").read_text())
    assert set(marker["files"]) == {p.name for p in out.iterdir()} - {"hfx_convert_long.json"}
    before = (out / "model.safetensors").read_bytes()

    assert "is not empty" in cli_error(capsys, argv) and "--overwrite" in cli_error(capsys, argv)
    (out / "notes.txt").write_text("mine")
    err = cli_error(capsys, argv + ["--overwrite"])
    assert "['notes.txt']" in err and "nothing was deleted" in err
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").read_bytes() == before
    (out / "notes.txt").unlink()
    assert main(argv[:3] + ["--max-position-embeddings", "64", "--attention-window", "8", "--global-token-id", "2",
                            "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 64
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".long")]

    other = tmp_path / "someone-elses"
    other.mkdir()
    (other / "config.json").write_text("{}")
    err = cli_error(capsys, ["convert-long", source, str(other), "--global-token-id", "2", "--overwrite"])
    assert "was not written by hfx convert-long" in err and (other / "config.json").read_text() == "{}"
    a_file = tmp_path / "file.bin"
    a_file.write_text("x")
    for flags in ([], ["--overwrite"]):
        err = cli_error(capsys, ["convert-long", source, str(a_file), "--global-token-id", "2", *flags])
        assert "is a file" in err and a_file.read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert-long", source, str(empty), "--max-position-embeddings", "32", "--attention-window", "8",
                 "--global-token-id", "2"]) == 0
    assert (empty / "model.safetensors").is_file()


def test_convert_long_takes_the_global_token_from_the_saved_tokenizer(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    first = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    source = bert_dir(tmp_path / "short", vocab_size=len(tok))
    tok.save_pretrained(source)
    assert main(["convert-long", source, str(tmp_path / "long"), "--max-position-embeddings", "32",
                 "--attention-window", "8"]) == 0
    saved = json.loads((tmp_path / "long" / "config.json").read_text())
    assert first is not None and saved["global_attention_token_ids"] == [first]
    assert AutoTokenizer.from_pretrained(tmp_path / "long").model_max_length == 32


CONVERT = ["--max-position-embeddings", "40", "--attention-window", "8", "--global-token-id", "2"]


def test_convert_long_refuses_a_symlinked_output(tmp_path, capsys):
    source = bert_dir(tmp_path / "short")
    real = tmp_path / "real"
    assert main(["convert-long", source, str(real), *CONVERT]) == 0
    before = {p.name: p.read_bytes() for p in real.iterdir()}
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    for flags in ([], ["--overwrite"]):
        err = cli_error(capsys, ["convert-long", source, str(link), *CONVERT, *flags])
        assert err == (f"hfx convert-long: error: output {link} is a symbolic link (to {real}); give the folder itself "
                       f"({real.resolve()}) or another folder. Nothing was written."), err
    assert link.is_symlink() and {p.name: p.read_bytes() for p in real.iterdir()} == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".link", ".real"))]


def test_convert_long_overwrite_checks_the_output_again_before_replacing(tmp_path, capsys, monkeypatch):
    """A file put into the output folder while the weights were converted stops the overwrite; nothing is lost."""
    from hfx import long_context

    source = bert_dir(tmp_path / "short")
    out = tmp_path / "long"
    assert main(["convert-long", source, str(out), *CONVERT]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_check = long_context.check_replaceable_output

    def check_then_add_a_file(output, overwrite, rules):
        replaced = real_check(output, overwrite, rules)
        if not (out / "notes.txt").exists():
            (out / "notes.txt").write_text("written during the conversion")
        return replaced

    monkeypatch.setattr(long_context, "check_replaceable_output", check_then_add_a_file)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["convert-long", source, str(out), *CONVERT, "--overwrite"])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    # the weights were loaded and converted by then: transformers' progress bars come first
    [err] = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("hfx convert-long")]
    assert "Traceback" not in stderr and err == (f"hfx convert-long: error: --overwrite: {out} holds ['notes.txt'], which convert-long did not "
                   "write; nothing was deleted. Move them elsewhere or choose another folder."), err
    assert (out / "notes.txt").read_text() == "written during the conversion"
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "notes.txt"} == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".long")]


def test_convert_long_replacement_deletes_only_the_listed_files(tmp_path):
    """What appears after the last check is not deleted with the earlier conversion: it stays aside, named."""
    from hfx.long_context import OUTPUT
    from hfx.safe_paths import swap_folder_in

    out, new = tmp_path / "long", tmp_path / "new"
    out.mkdir()
    new.mkdir()
    for name in ("config.json", "model.safetensors", "hfx_convert_long.json"):
        (out / name).write_text("old")
        (new / name).write_text("new")
    (out / "late.txt").write_text("mine")
    with pytest.warns(UserWarning) as caught:
        swap_folder_in(new, out, ["config.json", "hfx_convert_long.json", "model.safetensors"], OUTPUT)
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        "config.json": "new", "model.safetensors": "new", "hfx_convert_long.json": "new"}
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith(".long.old-")]
    assert {p.name: p.read_text() for p in aside.iterdir()} == {"late.txt": "mine"}
    assert str(caught[0].message) == (f"the earlier conversion in {out} also held ['late.txt'], which convert-long did "
                                      f"not write; they were not deleted and are in {aside}.")
    # a replacement with nothing foreign leaves nothing aside
    aside.rename(tmp_path / "kept")
    new.mkdir()
    (new / "config.json").write_text("newer")
    swap_folder_in(new, out, ["config.json", "hfx_convert_long.json", "model.safetensors"], OUTPUT)
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".long")]
