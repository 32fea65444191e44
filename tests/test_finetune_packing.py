"""Packing without padding: best-fit decreasing and wrapped rows, boundaries that hold, exact losses, resume.

The reference for every loss is the same examples run one at a time, weighed as Trainer weighs a
batch (``num_items_in_batch``: the labelled tokens after the shift).
"""

import json
import random

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import hfx
from hfx.cli import main
from hfx.finetune import FinetuneConfig
from hfx.finetune.data import IGNORE_INDEX, collator_for, prepare_data
from hfx.finetune.packing import PackedCollator, best_fit_decreasing, bfd_packer, packing_efficiency, wrapped_packer
from hfx.finetune.train import RUN_FILE, check_output_dir, resume_differences
from hfx.tokenizer import train_tokenizer

QUIET = {"disable_tqdm": True}
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# fp32 losses summed over ~40 tokens and divided: a few ulps of the per-token log-softmax
LOSS_TOL = 1e-5


def _naive_best_fit(lengths, capacity):
    """O(n^2) best-fit decreasing: the definition, to check the indexed version against."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rooms = []
    for i in order:
        fits = [r for r in range(len(rooms)) if rooms[r] >= lengths[i]]
        if fits:
            best = min(fits, key=lambda r: rooms[r])
            rooms[best] -= lengths[i]
        else:
            rooms.append(capacity - lengths[i])
    return sorted(capacity - r for r in rooms)


def test_best_fit_decreasing_is_the_definition_and_keeps_every_example():
    rng = random.Random(0)
    for _ in range(200):
        capacity = rng.randint(1, 40)
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(0, 50))]
        rows = best_fit_decreasing(lengths, capacity)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # each example once, whole
        assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
        assert sorted(sum(lengths[i] for i in row) for row in rows) == _naive_best_fit(lengths, capacity)
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 8\]; got \[9\]"):
        best_fit_decreasing([3, 9], 8)


def _examples(rng, lengths, vocab=50):
    """Token ids in [3, vocab); longer examples have an unlabelled two-token prompt."""
    out = []
    for n in lengths:
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        labels = [IGNORE_INDEX if (n > 4 and i < 2) else t for i, t in enumerate(ids)]
        out.append({"input_ids": ids, "labels": labels})
    return out


def _columns(examples):
    return {"input_ids": [e["input_ids"] for e in examples], "labels": [e["labels"] for e in examples]}


def _pieces(row):
    """Split a packed row at its position restarts into (ids, labels) pieces."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    return [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in zip(starts, starts[1:])]


def test_bfd_rows_hold_whole_examples_and_wrapped_rows_are_the_cut_stream():
    examples = _examples(random.Random(1), [7, 3, 12, 5, 9, 2, 6, 16, 1])
    packed = bfd_packer(16)(_columns(examples))
    rows = [dict(zip(packed, values)) for values in zip(*packed.values())]
    pieces = [piece for row in rows for piece in _pieces(row)]
    expected = [(e["input_ids"], [IGNORE_INDEX] + e["labels"][1:]) for e in examples]
    assert sorted(pieces) == sorted(expected)  # never cut, first label of each example unpredicted
    assert all(len(row["input_ids"]) <= 16 for row in rows)
    assert packing_efficiency((len(r["input_ids"]) for r in rows), 16) == pytest.approx(61 / (16 * len(rows)))

    wrapped = wrapped_packer(8)(_columns(examples))
    stream = [t for e in examples for t in e["input_ids"]]
    assert all(len(ids) == 8 for ids in wrapped["input_ids"])
    assert [t for ids in wrapped["input_ids"] for t in ids] == stream[: len(stream) // 8 * 8]  # as before: tail dropped
    # positions restart where an example starts and where a row continues one
    flat_positions = [p for row in wrapped["position_ids"] for p in row]
    starts = {sum(len(e["input_ids"]) for e in examples[:k]) for k in range(len(examples))}
    starts = {s for s in starts if s < len(flat_positions)}  # examples in the dropped tail
    assert [i for i, p in enumerate(flat_positions) if p == 0] == sorted(starts | set(range(0, len(flat_positions), 8)))
    assert all(row[0] == IGNORE_INDEX for row in wrapped["labels"])


def _hfx(attn="sdpa", **extra):
    config = hfx.HfxConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, is_decoder=True, position_embedding_type="rotary",
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra)
    if attn is not None:
        config._attn_implementation = attn
    return hfx.HfxForCausalLM(config)


def _llama(attn):
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # use_cache=True, as Llama checkpoints ship
    config._attn_implementation = attn
    return LlamaForCausalLM(config)


MODELS = {
    "hfx-sdpa": lambda: _hfx("sdpa"),
    "hfx-eager": lambda: _hfx("eager"),
    "llama-sdpa": lambda: _llama("sdpa"),
    "llama-eager": lambda: _llama("eager"),
    "hfx-sliding-window": lambda: _hfx(None, attention_type="hfx_sliding_window", attention_window=4),
}


# cu_seq_lens are read by flash-attention kernels and hfx_sliding_window; sdpa/eager read the positions
@pytest.mark.parametrize("name,flash_kwargs", [(name, False) for name in sorted(MODELS)] + [("hfx-sliding-window", True)])
def test_packed_loss_and_gradients_equal_the_examples_run_alone(name, flash_kwargs):
    torch.manual_seed(0)
    model = MODELS[name]()
    model.train()  # dropout is 0; train mode is what Trainer runs (and where a cache would still be built)
    examples = _examples(random.Random(2), [7, 3, 12, 5, 9, 2, 6, 11])
    packed = bfd_packer(16)(_columns(examples))
    rows = [dict(zip(packed, values)) for values in zip(*packed.values())]
    assert len({len(r["input_ids"]) for r in rows}) > 1  # rows of different lengths, yet nothing is padded
    batch = PackedCollator(flash_attn_kwargs=flash_kwargs)(rows)
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))  # one row, all examples
    items = (batch["labels"][..., 1:] != IGNORE_INDEX).sum()  # what Trainer passes as num_items_in_batch
    loss = model(**batch, num_items_in_batch=items).loss
    packed_grads = torch.autograd.grad(loss, [p for p in model.parameters()])

    total, count = 0.0, 0
    for e in examples:
        logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1]
        targets = torch.tensor(e["labels"][1:])
        total = total + torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        count += int((targets != IGNORE_INDEX).sum())
    reference = total / count
    assert int(items) == count
    assert abs(loss.item() - reference.item()) <= LOSS_TOL
    reference_grads = torch.autograd.grad(reference, [p for p in model.parameters()])
    for got, want in zip(packed_grads, reference_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_collator_for_picks_flash_kwargs_by_backend():
    tok = type("Tok", (), {"pad_token_id": 0, "eos_token_id": 1})()
    model = _hfx("sdpa")
    assert collator_for("causal-lm", tok, "bfd", model) == PackedCollator(flash_attn_kwargs=False)
    model.config._attn_implementation = "flash_attention_2"
    collator = collator_for("causal-lm", tok, "wrapped", model)
    assert collator.flash_attn_kwargs
    batch = collator([{"input_ids": [5, 6, 7, 4], "labels": [-100, 6, 7, -100], "position_ids": [0, 1, 2, 0]},
                      {"input_ids": [8, 9], "labels": [-100, 9], "position_ids": [0, 1]}])
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 4, 6] and batch["max_length_q"] == 3  # no padding sequence
    assert batch["input_ids"].tolist() == [[5, 6, 7, 4, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100, 9]]


# batchnorm pools statistics over a batch's tokens, MoE routes them and balances over them: a padded
# token would change both, so the packed batch must hold the same tokens as the padded, masked batch
@pytest.mark.parametrize("extra", [dict(norm_type="batchnorm"), dict(ffn_type="moe")], ids=["batchnorm", "moe"])
def test_packed_loss_equals_the_unpacked_batch_for_batchnorm_and_moe(extra):
    torch.manual_seed(0)
    model = _hfx("sdpa", **extra)
    model.train()
    examples = _examples(random.Random(3), [7, 3, 12, 5, 9, 2, 6, 11])
    packed = bfd_packer(16)(_columns(examples))
    rows = [dict(zip(packed, values)) for values in zip(*packed.values())]
    batch = PackedCollator()(rows)
    items = (batch["labels"][..., 1:] != IGNORE_INDEX).sum()
    loss = model(**batch, num_items_in_batch=items).loss

    # unpacked: the same examples in one padded batch with an attention mask, as DataCollatorForSeq2Seq pads
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in examples])
    mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples])
    labels = torch.tensor([e["labels"] + [IGNORE_INDEX] * (width - len(e["input_ids"])) for e in examples])
    assert int((labels[..., 1:] != IGNORE_INDEX).sum()) == int(items)  # num_items_in_batch is unchanged
    reference = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=items).loss
    assert abs(loss.item() - reference.item()) <= LOSS_TOL


# --- settings ------------------------------------------------------------------------------------


def _config(tmp_path, **overrides):
    values = dict(model=str(tmp_path / "m"), data=str(tmp_path / "d.jsonl"), output=str(tmp_path / "out"))
    return FinetuneConfig(**{**values, **overrides})


def test_packing_values_old_booleans_and_errors(tmp_path):
    assert _config(tmp_path).packing == "none"
    assert _config(tmp_path, packing=True).packing == "wrapped"
    assert _config(tmp_path, packing=False).packing == "none"
    assert _config(tmp_path, packing="bfd").packing == "bfd"
    with pytest.raises(ValueError, match=r"packing='best' is invalid; valid values: \['none', 'bfd', 'wrapped'\]"):
        _config(tmp_path, packing="best")
    with pytest.raises(ValueError, match=r"packing='bfd' is invalid with task='seq2seq'; valid values: 'none'"):
        _config(tmp_path, packing="bfd", task="seq2seq")


def test_cli_bare_packing_is_bfd_and_bad_values_are_named(tmp_path, capsys):
    import argparse

    from hfx.commands.finetune import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    base = ["finetune", "--model", "m", "--data", "d", "--output", "o"]
    assert parser.parse_args(base).packing == "none"
    assert parser.parse_args(base + ["--packing", "--max-length", "64"]).packing == "bfd"
    assert parser.parse_args(base + ["--packing", "wrapped"]).packing == "wrapped"
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--packing", "best"])
    err = capsys.readouterr().err
    assert "--packing: invalid choice: 'best'" in err and all(f"'{mode}'" in err for mode in ("none", "bfd", "wrapped"))


@pytest.mark.parametrize("saved,requested,differs", [(True, "wrapped", False), (False, "none", False),
                                                      (None, "none", False), (True, "bfd", True)])
def test_resume_reads_a_run_file_with_the_old_boolean(tmp_path, saved, requested, differs):
    config = _config(tmp_path, packing=requested, resume=True)
    previous = json.loads(config.to_json())
    if saved is None:
        del previous["packing"]  # a run file from before packing existed
    else:
        previous["packing"] = saved
    changed = resume_differences(previous, config)
    assert (changed == [f"packing: saved {saved!r}, requested {requested!r}"]) if differs else changed == []
    if not differs:
        out = tmp_path / "out"
        out.mkdir(exist_ok=True)
        (out / RUN_FILE).write_text(json.dumps(previous))
        check_output_dir(config)  # accepted


# --- data and a real run -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tokenizer, a tiny hfx decoder (layer norm, rotary) and prompt/completion data, saved locally."""
    root = tmp_path_factory.mktemp("packing")
    rows = [{"prompt": f"say {i % 10}" + " again" * (i % 4), "completion": " " + WORDS[i % 10]} for i in range(96)]
    train_tokenizer([r["prompt"] + r["completion"] for r in rows], vocab_size=120, save_dir=root / "tok")
    tok = AutoTokenizer.from_pretrained(root / "tok")
    config = hfx.HfxConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, is_decoder=True, position_embedding_type="rotary",
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    hfx.HfxForCausalLM(config).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = root / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, str(root / "model"), str(data), tok


def test_prepare_data_bfd_keeps_examples_and_reports_efficiency(tiny_run, tmp_path):
    _, model, data, tok = tiny_run
    common = dict(model=model, data=data, output=str(tmp_path / "o"), max_length=32)
    plain = prepare_data(FinetuneConfig(**common), "causal-lm", tok)
    packed = prepare_data(FinetuneConfig(**common, packing="bfd"), "causal-lm", tok)
    pieces = [piece for row in packed.train for piece in _pieces(row)]
    expected = [(r["input_ids"], [IGNORE_INDEX] + r["labels"][1:]) for r in plain.train]
    assert sorted(pieces) == sorted(expected)
    lengths = [len(ids) for ids in packed.train["input_ids"]]
    assert max(lengths) <= 32 and len(packed.train) < len(plain.train)
    assert packed.packing_efficiency == pytest.approx(sum(lengths) / (32 * len(lengths)))
    assert plain.packing_efficiency is None
    # an example longer than max_length is cut to max_length (bfd) rather than dropped
    cut = prepare_data(FinetuneConfig(**{**common, "max_length": 6}, packing="bfd"), "causal-lm", tok)
    assert max(len(ids) for ids in cut.train["input_ids"]) == 6


@pytest.mark.slow  # a whole finetune run
def test_finetune_with_bfd_packing_trains_and_records_efficiency(tiny_run, tmp_path, capsys):
    _, model, data, _ = tiny_run
    out = tmp_path / "run"
    code = main(["finetune", "--model", model, "--data", data, "--output", str(out), "--packing", "--max-length", "64",
                 "--max-steps", "12", "--batch-size", "2", "--learning-rate", "3e-3", "--logging-steps", "1",
                 "--save-steps", "100", "--method", "full", "--warmup-ratio", "0"])
    assert code == 0
    printed = "\n" + capsys.readouterr().out  # Trainer's log lines, then the summary (indented JSON)
    summary = json.loads(printed[printed.rindex("\n{\n") + 1 :])
    results = json.loads((out / "hfx_finetune_results.json").read_text())
    saved = json.loads((out / RUN_FILE).read_text())
    assert saved["packing"] == "bfd"
    assert 0.5 < results["packing_efficiency"] <= 1.0
    losses = [e["loss"] for e in results["log_history"] if "loss" in e]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses  # falls by over 10%
    assert summary["packing_efficiency"] == results["packing_efficiency"]


def test_packed_rows_without_any_label_are_dropped(tiny_run, tmp_path):
    """A wrapped row inside one long prompt would make a batch with no labelled token (a 0/0 loss)."""
    _, model, _, tok = tiny_run
    data = tmp_path / "long-prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": "say 1 again" * 12, "completion": " one"}) + "\n" for _ in range(4)))
    config = FinetuneConfig(model=model, data=str(data), output=str(tmp_path / "o"), max_length=8, packing="wrapped")
    rows = prepare_data(config, "causal-lm", tok).train
    examples = prepare_data(FinetuneConfig(model=model, data=str(data), output=str(tmp_path / "o"), max_length=512),
                            "causal-lm", tok).train
    unfiltered = wrapped_packer(8)({"input_ids": examples["input_ids"], "labels": examples["labels"]})
    assert 0 < len(rows) < len(unfiltered["input_ids"])
    assert all(any(label != IGNORE_INDEX for label in row) for row in rows["labels"])
