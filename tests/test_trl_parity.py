"""hfx.finetune and TRL's SFTTrainer train the same steps: equal per-step losses on a tiny Llama.

SFTTrainer gets exactly the TrainingArguments hfx gave Trainer (captured by a callback), plus the
settings where SFTConfig's defaults differ from hfx (max_length; BOS: hfx puts the tokenizer's BOS
before every text, SFTTrainer adds only what the tokenizer's post-processor adds, nothing for this
GPT-style tokenizer, so its texts are given with the BOS token). The rest are SFTTrainer's defaults:
EOS appended, completion-only loss on prompt-completion records, no packing, no shuffling beyond
Trainer's seeded sampler, token-mean cross-entropy over ``num_items_in_batch``.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TrainerCallback

from hfx.finetune import FinetuneConfig, finetune
from hfx.tokenizer import train_tokenizer

trl = pytest.importorskip("trl", reason="TRL parity needs trl (pip install 'hfx[train]')")

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
STEPS = 4
# Both pipelines run the same fp32 kernels except the loss: SFTTrainer's fused head takes log-softmax
# in chunks, the model's cross-entropy in one call, which differ by a few ulps (4.8e-7 at loss ~4) per
# step; Adam carries that through 4 steps. A token more or less, or a differently drawn adapter,
# moves the loss by 1e-2 or more.
ATOL = 2e-5


class ArgsAndLosses(TrainerCallback):
    def __init__(self):
        self.args, self.losses, self.epoch = None, [], None

    def on_train_begin(self, args, state, control, **kwargs):
        self.args = args

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])
            self.epoch = logs["epoch"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl_parity")
    rows = [{"prompt": f"say {i % 10}", "completion": f" {WORDS[i % 10]}",
             "text": f"say {i % 10} {WORDS[i % 10]} then {WORDS[(i * 3) % 10]} and {WORDS[(i * 7) % 10]}"}
            for i in range(8)]
    tokenizer = train_tokenizer([r["text"] for r in rows], vocab_size=80, style="causal")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, initializer_range=0.2)
    torch.manual_seed(0)
    model_dir = root / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    files = {}
    for shape, keys in (("text", ("text",)), ("prompt-completion", ("prompt", "completion"))):
        files[shape] = root / f"{shape}.jsonl"
        files[shape].write_text("".join(json.dumps({k: r[k] for k in keys}) + "\n" for r in rows))
    # BOS + words + EOS of 20, 18, 16, 14, 4, 6, 8, 10 tokens: best-fit decreasing fills 4 rows of 24 exactly,
    # and no two open rows ever have the same room, so no tie-break decides which row an example joins
    packed = [" ".join(WORDS[(i + j) % 10] for j in range(n - 2)) for i, n in enumerate((20, 18, 16, 14, 4, 6, 8, 10))]
    files["packed"] = root / "packed.jsonl"
    files["packed"].write_text("".join(json.dumps({"text": t}) + "\n" for t in packed))
    return root, str(model_dir), tokenizer, files


def run_hfx(model_dir, data, output, method, packing="none"):
    seen = ArgsAndLosses()
    finetune(FinetuneConfig(model=model_dir, data=str(data), output=str(output), method=method, max_steps=STEPS,
                            batch_size=4 if packing != "none" else 8, max_length=24, packing=packing, logging_steps=1,
                            save_steps=100, lora_r=4, lora_alpha=8, learning_rate=1e-3,
                            extra_training_args={"disable_tqdm": True}), callbacks=[seen])
    return seen


def run_trl(model_dir, tokenizer, data, output, method, hfx_args, packing="none"):
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    dataset = load_dataset("json", data_files=str(data), split="train")
    first = "prompt" if "prompt" in dataset.column_names else "text"
    dataset = dataset.map(lambda row: {first: tokenizer.bos_token + row[first]})
    args = {**hfx_args.to_dict(), "hub_token": hfx_args.hub_token, "output_dir": str(output)}
    peft_config = None if method == "full" else LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05,
                                                           target_modules="all-linear", task_type="CAUSAL_LM")
    seen = ArgsAndLosses()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # a path needs config.auto_map
    if packing != "none":
        args.update(packing=True, packing_strategy=packing)
    SFTTrainer(model=model, args=SFTConfig(**args, max_length=24), train_dataset=dataset, processing_class=tokenizer,
               peft_config=peft_config, callbacks=[seen]).train()
    return seen


@pytest.mark.parametrize("shape, method, packing", [("text", "lora", "none"), ("prompt-completion", "full", "none"),
                                                    ("packed", "lora", "bfd")])
def test_sft_trainer_and_hfx_give_the_same_losses_step_by_step(setup, shape, method, packing):
    """Packed: both flatten a batch of 4 rows of 24 into one padding-free row, positions restarting at
    every example, and mask the first label of each."""
    root, model_dir, tokenizer, files = setup
    hfx_run = run_hfx(model_dir, files[shape], root / f"hfx-{shape}", method, packing)
    assert hfx_run.args.bf16 is False and hfx_run.args.activation_checkpointing is False
    trl_run = run_trl(model_dir, tokenizer, files[shape], root / f"trl-{shape}", method, hfx_run.args, packing)
    assert len(hfx_run.losses) == len(trl_run.losses) == STEPS
    if packing != "none":  # the 8 records went into 4 rows, one batch: one step per epoch on both sides
        assert hfx_run.epoch == trl_run.epoch == STEPS
    # every step sees the same records, so the loss falls: the curves compared are those of training
    assert hfx_run.losses[-1] < hfx_run.losses[0] - 0.05
    assert trl_run.losses == pytest.approx(hfx_run.losses, abs=ATOL, rel=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bfd_rows_equal_trl_pack_dataset(seed):
    """hfx's best-fit decreasing puts the same examples together as TRL's bfd packer (ties included)."""
    import random

    import datasets
    from trl.data_utils import pack_dataset

    from hfx.finetune.packing import best_fit_decreasing

    rng = random.Random(seed)
    lengths = [rng.randint(1, 64) for _ in range(300)]  # many equal rooms: the tie-break decides rows
    data = datasets.Dataset.from_dict({"input_ids": [[i] * n for i, n in enumerate(lengths)]})
    packed = pack_dataset(data, 128, strategy="bfd", map_kwargs={"batch_size": 1000})
    trl_rows = sorted(tuple(sorted(set(row))) for row in packed["input_ids"])
    hfx_rows = sorted(tuple(sorted(row)) for row in best_fit_decreasing(lengths, 128))
    assert hfx_rows == trl_rows
