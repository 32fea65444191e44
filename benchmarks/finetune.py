"""Fine-tuning cost: hfx.finetune against a plain PEFT + Trainer script and TRL's SFTTrainer doing the same work.

For a tiny Llama-shaped model and an hfx model, and each method (full, LoRA, QLoRA, LLM.int8 +
LoRA), the pipelines train the same data for the same steps with the same TrainingArguments.
Reported per run: median step time (after warm-up steps), tokens per second, and peak memory
(CUDA: max allocated; CPU: peak resident memory above the level before the model was loaded,
sampled every 5 ms). ``overhead`` is hfx's median step time over the plain script's, minus one;
``overhead_vs_trl`` the same against SFTTrainer (full and LoRA rows: TRL trains a quantised base
its own way, casting the adapters to bf16, so the 4/8-bit rows would not compare like with like).

``*_cpu_ms`` / ``overhead*_cpu`` are the same from the process's CPU time per step, which other
programs running on the machine inflate far less than wall time.

Every pipeline logs its loss at every step; ``loss_diff_trl`` / ``loss_diff_plain`` are the
largest absolute difference from hfx's loss over the first 20 steps. The TRL run is told what hfx
does where SFTTrainer's defaults differ (:func:`run_trl` lists them), so the curves must agree to
fp32 rounding.

Each (model, method) pair runs ``--repeats`` times per pipeline, the pipelines' order reversed
every other repeat, and the step time reported is the median over all timed steps of all repeats: on a shared
CPU a single run drifts by tens of percent, which would swamp a 5 % overhead target.

    python benchmarks/finetune.py --quick                     # a few steps -> results/finetune_quick.json
    python benchmarks/finetune.py --methods full,lora         # the CPU rows in docs/finetuning.md
    python benchmarks/finetune.py --pipelines plain           # hfx against the plain script only
    python benchmarks/finetune.py --json results/other.json   # rows go to benchmarks/results/finetune.json by default

A --quick run never replaces the recorded results: it writes ``finetune_quick.json`` (not tracked
by git), as ``benchmarks/attention.py --quick`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import hfx  # noqa: E402
from hfx.finetune import FinetuneConfig, finetune  # noqa: E402
from hfx.tokenizer import train_tokenizer  # noqa: E402

METHODS = ("full", "lora", "qlora", "int8")
MODELS = ("llama-tiny", "hfx-tiny")
PIPELINES = ("plain", "hfx", "trl")
TRL_METHODS = ("full", "lora")
LOSS_STEPS = 20  # steps of the loss curves compared between pipelines
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


class StepTimer(TrainerCallback):
    """Wall time of every optimiser step, peak memory while training, and the logged losses."""

    def __init__(self):
        self.times, self._start, self.peak, self.losses = [], None, 0, []
        self.cpu_times, self._cpu_start = [], None
        self._stop = threading.Event()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return
        process = psutil.Process()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, process.memory_info().rss)
                time.sleep(0.005)

        threading.Thread(target=sample, daemon=True).start()

    def on_step_begin(self, args, state, control, **kwargs):
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)
        self.cpu_times.append(time.process_time() - self._cpu_start)

    def on_train_end(self, args, state, control, **kwargs):
        self._stop.set()
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated()


def build_models(root: Path) -> dict[str, str]:
    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(40)) for i in range(200)]
    tokenizer = train_tokenizer(texts, vocab_size=400, style="causal")
    common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.bos_token_id)
    from transformers import LlamaConfig, LlamaForCausalLM

    models = {
        "llama-tiny": LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                                   num_attention_heads=8, num_key_value_heads=4, **common)),
        "hfx-tiny": hfx.HfxForCausalLM(hfx.HfxConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                                     num_attention_heads=8, is_decoder=True, norm_type="rmsnorm",
                                                     norm_position="pre", position_embedding_type="rotary",
                                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                                     **common)),
    }
    paths = {}
    for name, model in models.items():
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    paths["data"] = str(data)
    # for --packing: 3 to 40 words, so that rows hold several texts of different lengths
    varied = root / "train_varied.jsonl"
    varied.write_text("".join(json.dumps({"text": " ".join(t.split()[: 3 + (i * 13) % 38])}) + "\n"
                              for i, t in enumerate(texts)))
    paths["data_varied"] = str(varied)
    return paths


def training_arguments(output: str, method: str, steps: int, batch: int, logging_steps: int = 1) -> dict:
    """What hfx.finetune gives Trainer for these settings, spelled out for the plain script."""
    return dict(output_dir=output, per_device_train_batch_size=batch, learning_rate=2e-5 if method == "full" else 2e-4,
                lr_scheduler_type="cosine", warmup_steps=0.03, max_steps=steps, logging_steps=logging_steps,
                save_steps=10_000,
                save_strategy="steps", report_to="none", remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
                activation_checkpointing=method in ("qlora", "int8"), bf16=False, disable_tqdm=True, seed=42,
                activation_checkpointing_kwargs={"use_reentrant": False} if method in ("qlora", "int8") else None)


def run_hfx(model: str, data: str, method: str, steps: int, batch: int, length: int, output: str,
            packing: str = "none") -> StepTimer:
    timer = StepTimer()
    finetune(FinetuneConfig(model=model, data=data, output=output, method=method, max_steps=steps, batch_size=batch,
                            max_length=length, packing=packing, save_steps=10_000, logging_steps=1, overwrite=True,
                            extra_training_args={"disable_tqdm": True}),
             callbacks=[timer])
    return timer


def run_plain(model: str, data: str, method: str, steps: int, batch: int, length: int, output: str,
              packing: str = "none") -> StepTimer:
    """The textbook PEFT + bitsandbytes + Trainer recipe (one example per row: no packing)."""
    if packing != "none":
        raise ValueError("the plain script does not pack; run --packing with --pipelines trl")
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments, set_seed)

    tokenizer = AutoTokenizer.from_pretrained(model)
    dataset = load_dataset("json", data_files=data, split="train")

    def encode(row):
        ids = ([tokenizer.bos_token_id] + tokenizer(row["text"], add_special_tokens=False)["input_ids"]
               + [tokenizer.eos_token_id])[:length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids}

    dataset = dataset.map(encode, remove_columns=dataset.column_names)
    quant = {"qlora": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                         bnb_4bit_compute_dtype=torch.bfloat16),
             "int8": BitsAndBytesConfig(load_in_8bit=True)}.get(method)
    set_seed(42)  # before LoRA draws its A matrices, as hfx and SFTTrainer do: the same adapter, the same loss curve
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, quantization_config=quant)
    if quant is not None:
        net = prepare_model_for_kbit_training(net, gradient_checkpointing_kwargs={"use_reentrant": False})
    if method != "full":
        net = get_peft_model(net, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    timer = StepTimer()
    Trainer(model=net, args=TrainingArguments(**training_arguments(output, method, steps, batch)), train_dataset=dataset,
            data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100), callbacks=[timer]).train()
    return timer


def run_trl(model: str, data: str, method: str, steps: int, batch: int, length: int, output: str,
            packing: str = "none") -> StepTimer:
    """TRL's SFTTrainer, told explicitly where its defaults differ from what hfx does.

    - ``bf16`` / ``gradient_checkpointing``: SFTConfig turns both on by default; hfx (and a plain
      Trainer) trains in fp32 without checkpointing unless asked: both off, from training_arguments.
    - ``learning_rate``: SFTConfig's default is 2e-5 for every method; hfx uses 2e-4 for adapters.
    - ``logging_steps``: SFTConfig's default is 10; given like the other pipelines.
    - ``max_length``: SFTConfig's default is 1024; the benchmark's length, cut from the end (keep_start) as in hfx.
    - BOS: hfx puts the tokenizer's BOS token before every text; SFTTrainer adds only what the tokenizer's own
      post-processor adds (nothing, for this GPT-style tokenizer), so the texts are given with the BOS token.
    - EOS: both append the EOS token (SFTTrainer as text before tokenising, hfx as an id), so nothing to align.
    - ``packing``: off unless asked (SFTConfig's default, as hfx's); ``--packing bfd`` is SFTTrainer's
      ``packing=True`` with its default ``packing_strategy="bfd"``, which turns on ``padding_free`` (the rows of a
      batch flattened into one, positions restarting per example, as hfx's rows keep them).
      ``--packing wrapped`` is ``packing_strategy="wrapped"``, whose rows have no boundaries: there, unlike in hfx,
      a token attends to the previous example in its row. ``shuffle_dataset`` off (default): both
      Trainers draw the same seeded random order; ``completion_only_loss`` / ``assistant_only_loss`` do not apply
      to plain text. ``loss_type="nll"`` (default): SFTTrainer's fused LM head computes the same token-mean
      cross-entropy, divided by Trainer's ``num_items_in_batch`` as the model's loss is.
    - The model is loaded here and passed as an object: ``SFTTrainer(model="path")`` reads ``config.auto_map``,
      which a checkpoint of a model type registered in-process (hfx) does not have.
    """
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model)
    dataset = load_dataset("json", data_files=data, split="train")
    if tokenizer.bos_token is not None:
        dataset = dataset.map(lambda row: {"text": tokenizer.bos_token + row["text"]})
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    peft_config = None if method == "full" else LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                           target_modules="all-linear", task_type="CAUSAL_LM")
    timer = StepTimer()
    args = SFTConfig(**training_arguments(output, method, steps, batch), max_length=length, packing=packing != "none",
                     packing_strategy=packing if packing != "none" else "bfd", dataset_text_field="text")
    SFTTrainer(model=net, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
               callbacks=[timer]).train()
    return timer


def loss_difference(reference: list[float], other: list[float], steps: int = LOSS_STEPS) -> float | None:
    """Largest absolute difference of two loss curves over their first ``steps`` logged steps."""
    pairs = list(zip(reference[:steps], other[:steps]))
    return max(abs(a - b) for a, b in pairs) if pairs else None


RESULTS_DIR = Path(__file__).parent / "results"


def default_json_path(quick: bool) -> Path:
    """The recorded rows, or for a ``--quick`` run its own untracked file next to them."""
    return RESULTS_DIR / ("finetune_quick.json" if quick else "finetune.json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 steps per run (2 timed), for development")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=42)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=3, help="runs per pipeline, alternating which goes first")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--pipelines", default=",".join(PIPELINES),
                        help="hfx always runs; trl runs for the full and lora methods only")
    parser.add_argument("--packing", choices=("none", "bfd", "wrapped"), default="none",
                        help="pack the varied-length texts into --max-length rows (hfx and trl; the plain script "
                        "does not pack)")
    parser.add_argument("--json", default=None,
                        help="where the rows are written (default: benchmarks/results/finetune.json, "
                        "finetune_quick.json with --quick)")
    args = parser.parse_args(argv)
    args.json = args.json or str(default_json_path(args.quick))
    steps = 4 if args.quick else args.steps
    repeats = 1 if args.quick else args.repeats
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    unknown = sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    pipelines = args.pipelines.split(",")
    unknown = sorted(set(pipelines) - set(PIPELINES))
    if unknown:
        parser.error(f"unknown pipeline(s) {unknown}; choose from {list(PIPELINES)}")
    pipelines = [p for p in PIPELINES if p in pipelines or p == "hfx"]
    if args.packing != "none" and "plain" in pipelines:
        parser.error("--packing compares hfx with trl: the plain script does not pack; add --pipelines trl")
    if "trl" in pipelines:
        import importlib.util

        if importlib.util.find_spec("trl") is None:
            parser.error("the trl pipeline needs trl: pip install 'hfx[train]', or leave trl out of --pipelines")
    if args.warmup >= steps:
        parser.error(f"--warmup {args.warmup} leaves no timed step out of {steps}")
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = build_models(root)
        for model_name in args.models.split(","):
            for method in args.methods.split(","):
                result = {"model": model_name, "method": method, "packing": args.packing, "repeats": repeats}
                runners = {"plain": run_plain, "hfx": run_hfx, "trl": run_trl}
                order = [(p, runners[p]) for p in pipelines if p != "trl" or method in TRL_METHODS]
                times: dict[str, list[float]] = {p: [] for p, _ in order}
                peaks: dict[str, list[int]] = {p: [] for p, _ in order}
                cpu: dict[str, list[float]] = {p: [] for p, _ in order}
                losses: dict[str, list[float]] = {}
                for repeat in range(repeats):
                    for pipeline, run in order if repeat % 2 == 0 else order[::-1]:
                        base_rss = psutil.Process().memory_info().rss
                        data = paths["data" if args.packing == "none" else "data_varied"]
                        timer = run(paths[model_name], data, method, steps, args.batch_size, args.max_length,
                                    str(root / f"{model_name}-{method}-{pipeline}"), args.packing)
                        times[pipeline].extend(timer.times[args.warmup:])
                        cpu[pipeline].extend(getattr(timer, "cpu_times", timer.times)[args.warmup:])
                        peaks[pipeline].append(timer.peak if torch.cuda.is_available() else max(0, timer.peak - base_rss))
                        losses.setdefault(pipeline, timer.losses[:LOSS_STEPS])  # same seed: every repeat alike
                for pipeline, _ in order:
                    step = statistics.median(times[pipeline])
                    result[f"{pipeline}_step_ms"] = round(step * 1000, 1)
                    result[f"{pipeline}_tokens_per_s"] = round(args.batch_size * args.max_length / step)
                    result[f"{pipeline}_peak_mb"] = round(max(peaks[pipeline]) / 2**20, 1)
                    result[f"{pipeline}_cpu_ms"] = round(statistics.median(cpu[pipeline]) * 1000, 1)
                for pipeline, key in (("plain", "overhead"), ("trl", "overhead_vs_trl")):
                    if pipeline in times:
                        result[key] = round(result["hfx_step_ms"] / result[f"{pipeline}_step_ms"] - 1, 3)
                        result[f"{key}_cpu"] = round(result["hfx_cpu_ms"] / result[f"{pipeline}_cpu_ms"] - 1, 3)
                        result[f"loss_diff_{pipeline}"] = loss_difference(losses["hfx"], losses[pipeline])
                result["losses"] = losses
                rows.append(result)
                print(json.dumps(result), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{device}; {repeats} x {steps} steps of {args.batch_size} x {args.max_length} tokens per pipeline, "
          f"median over the steps after the first {args.warmup} of each run")
    for other, overhead in (("plain", "overhead"), ("trl", "overhead_vs_trl")):
        shown = [r for r in rows if overhead in r]
        if not shown:
            continue
        header = ("model", "method", f"{other} ms/step", "hfx ms/step", f"{other} tok/s", "hfx tok/s",
                  f"{other} peak MB", "hfx peak MB", "hfx overhead", "hfx overhead (CPU time)",
                  f"max loss diff ({LOSS_STEPS} steps)")
        print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for r in shown:
            diff = r[f"loss_diff_{other}"]
            print(f"| {r['model']} | {r['method']} | {r[f'{other}_step_ms']} | {r['hfx_step_ms']} | "
                  f"{r[f'{other}_tokens_per_s']} | {r['hfx_tokens_per_s']} | {r[f'{other}_peak_mb']} | "
                  f"{r['hfx_peak_mb']} | {r[overhead]:+.1%} | {r[overhead + '_cpu']:+.1%} | "
                  f"{'-' if diff is None else f'{diff:.1e}'} |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out.with_name(out.name + ".tmp")
    tmp_path.write_text(json.dumps({"device": device, "steps": steps, "repeats": repeats, "warmup": args.warmup,
                                    "batch_size": args.batch_size, "max_length": args.max_length,
                                    "packing": args.packing, "pipelines": pipelines, "loss_steps": LOSS_STEPS, "rows": rows}, indent=2))
    os.replace(tmp_path, out)
    print(f"rows written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
