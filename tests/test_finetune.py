"""hfx.finetune: bad input before loading, data shapes, PEFT mapping, 4-bit memory, training runs.

Models and tokenizers are built here, saved with save_pretrained and loaded back through the real
from_pretrained path; data is written as local json/jsonl/csv/parquet and read by datasets.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import hfx
from hfx.finetune import (
    BackendError,
    DataError,
    FinetuneConfig,
    OutputDirError,
    TargetModulesError,
    finetune,
)
from hfx.finetune.data import IGNORE_INDEX, prepare_data
from hfx.finetune.model import load_model
from hfx.tokenizer import train_tokenizer

QUIET = {"disable_tqdm": True}
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def task_rows(n=48):
    """Say a digit's name: a mapping a tiny model learns in a few dozen steps."""
    return [{"prompt": f"say {i % 10}", "completion": WORDS[i % 10]} for i in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    texts = [f"{r['prompt']} {r['completion']}" for r in task_rows(20)] + ["the cat sat on the mat", "user assistant"]
    train_tokenizer(texts, vocab_size=120, save_dir=path)
    return path


def save_model(model, tokenizer_dir, path):
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def hfx_causal(tmp_path_factory, tokenizer_dir):
    """A batchnorm, rotary, pre-norm hfx decoder with non-trivial running statistics."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = hfx.HfxConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        is_decoder=True, norm_type="batchnorm", norm_position="pre", position_embedding_type="rotary",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(0)
    model = hfx.HfxForCausalLM(config)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    return save_model(model, tokenizer_dir, tmp_path_factory.mktemp("hfx_causal"))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        # A frozen head drawn with std 0.02 caps the logits near +-1, so no adapter could fit any task.
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    return save_model(LlamaForCausalLM(config), tokenizer_dir, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    return str(write_jsonl(tmp_path_factory.mktemp("data") / "task.jsonl", task_rows()))


def run_config(model, data, output, **overrides):
    base = dict(model=model, data=data, output=str(output), max_steps=4, batch_size=8, logging_steps=1,
                save_steps=100, lora_r=4, lora_alpha=8, extra_training_args=dict(QUIET))
    base.update(overrides)
    return FinetuneConfig(**base)


def run_ddp_and_single(common, tmp_path):
    """``hfx finetune`` twice: 2 torchrun processes at batch 4 into ``ddp/``, one process at batch 8 into ``one/``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # as in test_distributed.py
    env["OMP_NUM_THREADS"] = "1"
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "hfx.cli", *common, "--batch-size", "4", "--output", str(tmp_path / "ddp")],
        capture_output=True, text=True, env=env, timeout=400,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "hfx.cli", *common, "--batch-size", "8", "--output",
                             str(tmp_path / "one")], capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    return ddp, single


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail loudly if a check under test lets the run reach the model's weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr("hfx.finetune.train.load_model", refuse)


# --- bad input, reported before the model is loaded -------------------------------------------


def test_missing_field_names_existing_columns(tmp_path, hfx_causal, no_model_load):
    data = tmp_path / "d.csv"
    data.write_text("body,score\nhello,1\n")
    with pytest.raises(DataError) as err:
        finetune(run_config(hfx_causal, str(data), tmp_path / "out", data_format="text"))
    assert "['text']" in str(err.value) and "['body', 'score']" in str(err.value)
    with pytest.raises(DataError, match=r"columns \['body', 'score'\]"):
        finetune(run_config(hfx_causal, str(data), tmp_path / "out2"))


def test_target_modules_matching_nothing_list_linear_names(tmp_path, hfx_causal, task_file, no_model_load):
    with pytest.raises(TargetModulesError) as err:
        finetune(run_config(hfx_causal, task_file, tmp_path / "out", target_modules="q_proj,gate_proj"))
    message = str(err.value)
    assert "['gate_proj']" in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "model.layers.0.attention.q_proj"):
        assert name in message


def test_bitsandbytes_missing_is_reported(tmp_path, hfx_causal, task_file, no_model_load, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    for method in ("qlora", "int8"):
        with pytest.raises(BackendError, match="needs bitsandbytes"):
            finetune(run_config(hfx_causal, task_file, tmp_path / method, method=method))


def test_output_folder_with_another_run_is_refused(tmp_path, hfx_causal, task_file, no_model_load):
    out = tmp_path / "out"
    out.mkdir()
    (out / "hfx_finetune.json").write_text(json.dumps({"model": "other", "data": "x", "method": "lora"}))
    with pytest.raises(OutputDirError, match="--overwrite"):
        finetune(run_config(hfx_causal, task_file, out))
    with pytest.raises(OutputDirError, match="different run"):
        finetune(run_config(hfx_causal, task_file, out, resume=True))
    (out / "hfx_finetune.json").unlink()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="already holds files"):
        finetune(run_config(hfx_causal, task_file, out))


def test_unknown_optimizer_is_refused_when_the_config_is_built(tmp_path, hfx_causal, task_file):
    with pytest.raises(ValueError, match=r"optim='adamw_fast' is invalid; valid values: \[.*'adamw_torch_fused'"):
        run_config(hfx_causal, task_file, tmp_path / "out", optim="adamw_fast")


def test_trainer_gets_the_same_optimizer_as_a_plain_script_unless_one_is_named(tmp_path, hfx_causal, task_file,
                                                                             monkeypatch):
    """hfx once forced adamw_torch, 8% slower per full fine-tune step than Trainer's default fused AdamW."""
    from transformers import TrainingArguments

    from hfx.finetune import train as train_module

    class StopBeforeTraining(Exception):
        """Only the arguments Trainer receives matter here."""

    seen = []
    original = train_module.build_trainer

    def spy(*args, **kwargs):
        seen.append(original(*args, **kwargs).args.optim)
        raise StopBeforeTraining

    monkeypatch.setattr(train_module, "build_trainer", spy)
    for optim in (None, "adafactor"):
        with pytest.raises(StopBeforeTraining):
            finetune(run_config(hfx_causal, task_file, tmp_path / f"out-{optim}", optim=optim))
    default = TrainingArguments(output_dir=str(tmp_path / "plain"), use_cpu=True, report_to="none").optim
    assert seen == [default, "adafactor"]


# --- data ----------------------------------------------------------------------------------------


def test_prompt_completion_loss_only_on_completion(tmp_path, hfx_causal, task_file):
    tok = AutoTokenizer.from_pretrained(hfx_causal)
    data = prepare_data(run_config(hfx_causal, task_file, tmp_path), "causal-lm", tok)
    assert data.data_format == "prompt-completion"
    row = data.train[3]
    prompt_len = 1 + len(tok("say 3", add_special_tokens=False)["input_ids"])
    assert row["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:]
    assert tok.decode(row["labels"][prompt_len:-1]) == "three" and row["labels"][-1] == tok.eos_token_id


def test_text_csv_parquet_folder_chat_and_packing(tmp_path, hfx_causal):
    import pandas as pd

    tok = AutoTokenizer.from_pretrained(hfx_causal)
    texts = [f"say {i} {WORDS[i]}" for i in range(10)]
    csv = tmp_path / "t.csv"
    pd.DataFrame({"text": texts}).to_csv(csv, index=False)
    folder = tmp_path / "parts"
    folder.mkdir()
    pd.DataFrame({"text": texts[:5]}).to_parquet(folder / "a.parquet")
    pd.DataFrame({"text": texts[5:]}).to_parquet(folder / "b.parquet")
    for source, n in ((csv, 10), (folder, 10)):
        data = prepare_data(run_config(hfx_causal, str(source), tmp_path, eval_fraction=0.2), "causal-lm", tok)
        assert data.data_format == "text" and len(data.train) + len(data.eval) == n
        assert data.train[0]["labels"] == data.train[0]["input_ids"]
    packed = prepare_data(run_config(hfx_causal, str(csv), tmp_path, packing=True, max_length=8), "causal-lm", tok)
    assert len(packed.train) > 0 and all(len(ids) == 8 for ids in packed.train["input_ids"])

    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "say 2"}, {"role": "assistant", "content": "two"}]}
    ])
    with pytest.raises(DataError, match="no chat template"):
        prepare_data(run_config(hfx_causal, str(chat), tmp_path), "causal-lm", tok)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    data = prepare_data(run_config(hfx_causal, str(chat), tmp_path), "causal-lm", tok)
    assert data.data_format == "chat"
    assert tok.decode(data.train[0]["input_ids"], skip_special_tokens=True) == "user say 2 assistant two"


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def test_chat_loss_on_assistant_turns_only_by_default(tmp_path, hfx_causal):
    tok = AutoTokenizer.from_pretrained(hfx_causal)
    tok.chat_template = CHAT_TEMPLATE
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say 2"},
                    {"role": "assistant", "content": "two"}, {"role": "user", "content": "say 3"},
                    {"role": "assistant", "content": "three"}]
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation},
                                                 {"messages": conversation[:2]}])  # no assistant turn: dropped
    data = prepare_data(run_config(hfx_causal, str(chat), tmp_path), "causal-lm", tok)
    assert len(data.train) == 1
    row = data.train[0]
    supervised = [label for label in row["labels"] if label != IGNORE_INDEX]
    assert tok.decode(supervised, skip_special_tokens=True) == "two three"
    assert supervised.count(tok.eos_token_id) == 2  # each turn's end marker is learned, so generation stops
    full = tok.decode(row["input_ids"], skip_special_tokens=True)
    assert "say 2" in full and "say 3" in full  # the other turns are still read, just not learned

    every = prepare_data(run_config(hfx_causal, str(chat), tmp_path, assistant_only_loss=False), "causal-lm", tok)
    assert len(every.train) == 2 and every.train[0]["labels"] == every.train[0]["input_ids"]

    tok.chat_template = ("{% for m in messages %}{% if loop.last %}{{ m['role'] }}: {{ m['content'] }} </s> "
                         "{% endif %}{% endfor %}")  # renders only the last turn: not prefix-stable
    with pytest.raises(DataError, match="assistant_only_loss=False"):
        prepare_data(run_config(hfx_causal, str(chat), tmp_path), "causal-lm", tok)


# --- model loading, PEFT mapping, quantisation ---------------------------------------------------


def test_lora_config_without_target_modules_works_for_hfx(hfx_causal):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(hfx_causal)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=2))
    adapted = {name.rsplit(".", 1)[-1] for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}


def test_4bit_block_linears_and_memory(tmp_path, tokenizer_dir):
    import bitsandbytes as bnb

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = hfx.HfxConfig(vocab_size=len(tok), hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=1024, is_decoder=True, norm_type="batchnorm", norm_position="pre")
    path = save_model(hfx.HfxForCausalLM(config), tokenizer_dir, tmp_path / "m256")
    fp32 = load_model(run_config(path, "-", tmp_path, method="lora"), "causal-lm", hfx.HfxConfig.from_pretrained(path), False)
    nf4 = load_model(run_config(path, "-", tmp_path, method="qlora"), "causal-lm", hfx.HfxConfig.from_pretrained(path), True)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert type(getattr(nf4.model.layers[1].attention, name)) is bnb.nn.Linear4bit
    assert type(nf4.model.layers[0].ffn.down_proj) is bnb.nn.Linear4bit
    assert type(nf4.lm_head) is torch.nn.Linear
    assert nf4.model.layers[0].attention.q_proj.weight.quant_state.nested  # double quantisation
    # k-bit preparation: base frozen, norms in fp32, BN therefore frozen (running statistics used and kept)
    assert not any(p.requires_grad for p in nf4.parameters())
    assert nf4.model.layers[0].attention_norm.frozen and nf4.model.layers[0].attention_norm.weight.dtype == torch.float32
    ratio = nf4.get_memory_footprint() / fp32.get_memory_footprint()
    assert ratio <= 0.35, ratio


# --- training runs ---------------------------------------------------------------------------------


def completion_loss(model, tokenizer, rows):
    """Mean loss on the completion tokens, the part the run trains on."""
    prompts = [[tokenizer.bos_token_id] + tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    targets = [tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in rows]
    ids = [p + t for p, t in zip(prompts, targets)]
    width = max(map(len, ids))
    input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids])
    labels = torch.tensor([[IGNORE_INDEX] * len(p) + t + [IGNORE_INDEX] * (width - len(p) - len(t))
                           for p, t in zip(prompts, targets)])
    mask = (labels != IGNORE_INDEX) | (torch.arange(width)[None] < torch.tensor([len(p) for p in prompts])[:, None])
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask.long(), labels=labels).loss.item()


def logits(model, input_ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def test_lora_batchnorm_hfx_merge_and_adapter_round_trip(tmp_path, hfx_causal, task_file):
    from peft import PeftModel

    result = finetune(run_config(hfx_causal, task_file, tmp_path / "out", method="lora", max_steps=3,
                                 learning_rate=1e-2, merge=True))
    assert result.data_format == "prompt-completion" and result.global_step == 3
    trained = result.model
    ids = torch.randint(7, 60, (2, 12))
    expected = logits(trained, ids)

    base = AutoModelForCausalLM.from_pretrained(hfx_causal)
    base_buffers = {k: v.clone() for k, v in base.named_buffers() if "running" in k}
    assert (logits(base, ids) - expected).abs().max() > 1e-3  # the adapter changed something
    for name, value in trained.get_base_model().named_buffers():
        if "running" in name:  # frozen BN under LoRA: statistics used and kept, never updated
            torch.testing.assert_close(value, base_buffers[name], rtol=0, atol=0)

    reloaded = PeftModel.from_pretrained(base, result.saved_dir)
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=0, atol=1e-6)

    assert not (Path(result.merged_dir) / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    assert type(merged) is hfx.HfxForCausalLM and not any("lora" in n for n, _ in merged.named_parameters())
    assert (logits(merged, ids) - expected).abs().max() <= 1e-4


def independent_merge(base_dir, adapter_dir, quant_type="nf4", double_quant=True):
    """fp32 dequantised base + LoRA delta, from the checkpoints' files, without PEFT or transformers' loader."""
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    base = load_file(str(Path(base_dir) / "model.safetensors"))
    adapter = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    settings = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    scale = settings["lora_alpha"] / settings["r"]
    expected = {}
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        packed, state = bnb.functional.quantize_4bit(base[name], quant_type=quant_type, compress_statistics=double_quant)
        expected[name] = bnb.functional.dequantize_4bit(packed, state).float() + scale * (b.float() @ a.float())
    return expected


def test_qlora_lowers_loss_and_merges_dequantised(tmp_path, tiny_llama, task_file, bnb_cpu_bf16):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    rows = task_rows(10)
    before = completion_loss(AutoModelForCausalLM.from_pretrained(tiny_llama), tok, rows)
    result = finetune(run_config(tiny_llama, task_file, tmp_path / "out", method="qlora", max_steps=12,
                                 learning_rate=2e-2, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                                 compute_dtype="float32", gradient_checkpointing=False, merge=True, warmup_ratio=0.0))
    # fp32 was asked for: whatever kernel bitsandbytes would pick on this CPU, fp32 is what runs.
    assert result.bnb_cpu_path == "dequantize (float32)"
    after = completion_loss(result.model, tok, rows)
    assert after < 0.5 * before, (before, after)
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    assert getattr(merged.config, "quantization_config", None) is None
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    expected = independent_merge(tiny_llama, result.saved_dir)
    state = merged.state_dict()
    assert len(expected) == 14  # q, k, v, o, gate, up, down in 2 layers: "all-linear" without the head
    for name, weight in expected.items():
        # Same fp32 dequantisation and one fp32 add of the delta: a few ulps of the weights at most.
        torch.testing.assert_close(state[name], weight, rtol=4 * 2.0**-24, atol=1e-8)
    ids = torch.randint(7, 60, (2, 12))
    # The 4-bit model plus adapter and the merged model compute the same fp32 function by different
    # association (x W + s (x A) B vs x (W + s A B)): fp32 rounding through two layers stays near
    # 1e-6 on these O(1) logits, where the bf16 kernel this guards against differs by ~1e-1.
    assert (logits(merged, ids) - logits(result.model, ids)).abs().max() <= 1e-4


KILLER = textwrap.dedent("""
    import json, os, signal, sys
    from transformers import TrainerCallback
    from hfx.finetune import FinetuneConfig, finetune

    class KillAfterCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGKILL)

    finetune(FinetuneConfig(**json.loads(sys.argv[1])), callbacks=[KillAfterCheckpoint()])
""")


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, hfx_causal, task_file):
    settings = dict(model=hfx_causal, data=task_file, max_steps=6, save_steps=3, batch_size=4, logging_steps=1,
                    lora_r=4, lora_alpha=8, learning_rate=2e-2, lora_dropout=0.0, extra_training_args=QUIET)
    straight = finetune(FinetuneConfig(output=str(tmp_path / "straight"), **settings))

    crashed = tmp_path / "crashed"
    proc = subprocess.run([sys.executable, "-c", KILLER, json.dumps({**settings, "output": str(crashed)})],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (crashed / "checkpoint-3").is_dir() and not (crashed / "adapter").exists()
    with pytest.raises(OutputDirError):
        finetune(FinetuneConfig(output=str(crashed), **settings))
    resumed = finetune(FinetuneConfig(output=str(crashed), resume=True, **settings))
    assert resumed.resumed_from.endswith("checkpoint-3") and resumed.global_step == 6
    # CPU kernels are not bitwise reproducible across processes (thread scheduling), so equality is
    # to 1e-3: far below what restarting the data order, the schedule or Adam's moments would change.
    assert resumed.final_loss == pytest.approx(straight.final_loss, abs=1e-3)
    reference = dict(straight.model.named_parameters())
    for name, value in resumed.model.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-3)
