"""``hfx finetune``: full, LoRA, QLoRA or LLM.int8 + LoRA fine-tuning; a thin layer over ``hfx.finetune``."""

from __future__ import annotations

import argparse
import json

EPILOG = """examples:
  hfx finetune --model ./tiny-llama --data train.jsonl --method qlora --output runs/qlora --max-steps 200 --merge
  hfx finetune --model ./hfx-enc --data reviews.csv --task seq-cls --label-field sentiment --output runs/cls
  hfx finetune --model ./t5-small --data pairs.jsonl --task seq2seq --output runs/s2s   # {"source": ..., "target": ...}
  hfx finetune ... --output runs/qlora --resume          # continue from the last checkpoint
  torchrun --nproc_per_node 2 -m hfx.cli finetune ...    # DDP, one process per device (CPU: gloo)

Records: {"text": ...}, {"prompt": ..., "completion": ...} (loss on the completion only) or
{"messages": [{"role": ..., "content": ...}, ...]} (rendered with the tokenizer's chat template);
--task seq2seq (an encoder-decoder): {"source": ..., "target": ...} or {"prompt": ..., "completion": ...}.
Output: OUTPUT/adapter (PEFT adapter; OUTPUT/model for --method full), OUTPUT/merged with --merge,
OUTPUT/checkpoint-*, OUTPUT/hfx_finetune_results.json. See docs/finetuning.md."""


def add_parser(subparsers) -> None:
    from hfx.finetune.config import BF16_CHOICES, CHUNKED_LOSS, DATA_FORMATS, DTYPES, METHODS, PACKING, QUANT_TYPES, TASKS
    from hfx.finetune.config import INIT_LORA_WEIGHTS
    from hfx.finetune.run_file import track_given_flags

    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a model: full, LoRA, QLoRA (4-bit) or LLM.int8 + LoRA",
        description="Fine-tune an hfx model or any AutoModelForCausalLM / AutoModelForSequenceClassification / "
        "AutoModelForSeq2SeqLM checkpoint with Trainer, PEFT and bitsandbytes. Bad input (missing data fields, unusable bitsandbytes, "
        "LoRA targets that match nothing, an output folder holding another run) is reported before the model loads.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    need = p.add_argument_group("what to train")
    need.add_argument("--config", metavar="RUN_FILE", help="YAML or JSON file of FinetuneConfig fields (e.g. lora_r: 8); "
                      "flags given on the command line override it")
    need.add_argument("--model", help="checkpoint folder or hub id (required, here or in --config)")
    need.add_argument("--data", help="json/jsonl/csv/parquet file, a folder of them, or a hub dataset (required)")
    need.add_argument("--output", help="run folder (adapter, checkpoints, results) (required)")
    need.add_argument("--method", choices=METHODS, default="lora", help="default: %(default)s")
    need.add_argument("--task", choices=TASKS, default="auto", help="auto: from the checkpoint's architecture "
                      "(seq-cls for a classifier, seq2seq for an encoder-decoder, else causal-lm)")

    data = p.add_argument_group("data")
    data.add_argument("--data-format", choices=DATA_FORMATS, default="auto", help="auto: chosen by the columns present")
    for name, default in (("text", "text"), ("prompt", "prompt"), ("completion", "completion"),
                          ("messages", "messages"), ("label", "label"), ("source", "source"), ("target", "target")):
        data.add_argument(f"--{name}-field", default=default, help="default: %(default)s")
    data.add_argument("--assistant-only-loss", action=argparse.BooleanOptionalAction, default=True,
                      help="chat data: the loss on the assistant turns only (--no-assistant-only-loss: on every token)")
    data.add_argument("--data-split", default="train", help="split of a hub dataset (default: %(default)s)")
    data.add_argument("--eval-data", help="separate evaluation data (same formats as --data)")
    data.add_argument("--eval-fraction", type=float, default=0.0, help="hold out this fraction of --data for evaluation")
    data.add_argument("--max-length", type=int, default=512, help="tokens per sequence (default: %(default)s)")
    data.add_argument("--packing", nargs="?", const="bfd", default="none", choices=PACKING,
                      help="causal LM: several examples per --max-length row, kept apart (position ids restart, no "
                      "attention across examples). bfd (a bare --packing): best-fit decreasing, no example cut unless "
                      "longer than --max-length; wrapped: concatenate and cut into full rows. default: %(default)s")
    data.add_argument("--max-train-samples", type=int)

    lora = p.add_argument_group("LoRA and quantisation")
    lora.add_argument("--lora-r", type=int, default=16)
    lora.add_argument("--lora-alpha", type=int, default=32)
    lora.add_argument("--lora-dropout", type=float, help="default: 0.05, or 0 with --target-parameters")
    lora.add_argument("--target-modules", help="comma-separated names (default: every linear layer except the output head)")
    lora.add_argument("--use-dora", action=argparse.BooleanOptionalAction, default=False, help="DoRA: a trained magnitude per output feature (merges)")
    lora.add_argument("--use-rslora", action=argparse.BooleanOptionalAction, default=False, help="rank-stabilised scaling lora_alpha / sqrt(r)")
    lora.add_argument("--init-lora-weights", default="default", metavar="INIT", help="PEFT's adapter init: "
                      + "|".join(INIT_LORA_WEIGHTS) + " (pissa/olora/corda: the adapter is saved converted, for the "
                      "original base; loftq: CUDA only)")
    lora.add_argument("--target-parameters", help="comma-separated nn.Parameter names for LoRA, e.g. MoE experts "
                      "(experts.gate_up_proj,experts.down_proj); --lora-dropout then defaults to 0, the only value PEFT takes")
    lora.add_argument("--modules-to-save", help="comma-separated modules trained in full and saved with the adapter")
    lora.add_argument("--quant-type", choices=QUANT_TYPES, default="nf4", help="4-bit data type for qlora")
    lora.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                      help="qlora: double quantisation (--no-double-quant: off)")
    lora.add_argument("--compute-dtype", choices=DTYPES, default="bfloat16", help="qlora matmul dtype")
    lora.add_argument("--quant-storage", choices=DTYPES, help="qlora: dtype the packed 4-bit weights are stored in "
                      "(FSDP needs the model's dtype, e.g. bfloat16)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=float, default=1.0)
    opt.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    opt.add_argument("--batch-size", type=int, default=8, help="per device")
    opt.add_argument("--eval-batch-size", type=int)
    opt.add_argument("--grad-accum", type=int, default=1)
    opt.add_argument("--learning-rate", type=float, help="default 2e-4 for adapters, 2e-5 for full")
    opt.add_argument("--lr-scheduler", default="cosine", help="any transformers scheduler name (default: %(default)s)")
    opt.add_argument("--warmup-ratio", type=float, default=0.03)
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--optim", default=None, help="a TrainingArguments optim name, e.g. paged_adamw_8bit on GPU "
                     "(default: TrainingArguments' own, adamw_torch_fused)")
    opt.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                     help="default: on for qlora/int8, off otherwise")
    opt.add_argument("--bf16", choices=BF16_CHOICES, default="auto", help="auto: on where the GPU supports it")
    opt.add_argument("--chunked-loss", choices=CHUNKED_LOSS, default="auto",
                     help="causal-lm: cross-entropy on labelled positions only, the head applied in chunks (no full "
                     "logits tensor); auto: where it equals the plain loss (see docs/finetuning.md), on: refuse "
                     "otherwise, off: the model's own loss")
    opt.add_argument("--seed", type=int, default=42)

    run = p.add_argument_group("evaluation, checkpoints, output")
    run.add_argument("--eval-steps", type=int, help="default: --save-steps")
    run.add_argument("--early-stopping-patience", type=int, help="stop after this many evaluations without improvement")
    run.add_argument("--metrics", help="comma-separated, logged at each evaluation (needs --eval-data or --eval-fraction); "
                     "seq-cls: accuracy,f1,precision,recall,mcc; causal-lm: perplexity,exact_match (greedy generation "
                     "from each evaluation prompt against its completion); seq2seq: perplexity")
    from hfx.finetune.metrics import AVERAGES

    run.add_argument("--metrics-average", choices=AVERAGES, default="auto",
                     help="how f1/precision/recall average over classes; auto: binary (class 1) for 2 labels, "
                     "macro otherwise")
    run.add_argument("--save-steps", type=int, default=200)
    run.add_argument("--save-total-limit", type=int, default=2)
    run.add_argument("--logging-steps", type=int, default=10)
    run.add_argument("--merge", action=argparse.BooleanOptionalAction, default=False, help="also save OUTPUT/merged, a plain checkpoint without PEFT")
    run.add_argument("--merge-dtype", choices=DTYPES, help="default: the base checkpoint's dtype")
    run.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False, help="replace the hfx run in the output folder (only a folder "
                     "with hfx_finetune.json that holds nothing but what a run writes)")
    run.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False, help="continue the run in the output folder from its newest "
                     "complete checkpoint (same settings; --max-steps/--epochs may grow)")
    run.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False)
    track_given_flags(p)  # last: every flag above (and only a typed one) overrides the --config file
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    import sys

    from hfx.checkpoint_check import check_model_dir

    from hfx.finetune.run_file import GIVEN, config_from_values, merged_values

    values = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config", GIVEN)}
    try:
        # The model folder first: checking it needs no torch, so the commonest mistake is reported
        # in a fraction of a second instead of after the training stack has been imported.
        given = getattr(args, GIVEN, set())
        values = merged_values(values, given, args.config)
        check_model_dir(values["model"], "--model")
        config = config_from_values(values, given, args.config)
    except ValueError as exc:
        print(f"hfx finetune: error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(2) from None

    from hfx.finetune import BackendError, DataError, OutputDirError, TargetModulesError, finetune

    try:
        result = finetune(config)
    except (ValueError, BackendError, OutputDirError) as exc:
        kind = "bad data" if isinstance(exc, DataError) else "bad target modules" if isinstance(exc, TargetModulesError) else "error"
        print(f"hfx finetune: {kind}: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    _close_process_group()
    if not result.main_process:
        return 0  # one summary per run: the other processes of a DDP run stay quiet
    summary = {k: v for k, v in result.to_dict().items() if k != "log_history"}
    print(json.dumps(summary, indent=2))
    return 0


def _close_process_group() -> None:
    """The command owns its process: under torchrun every rank waits for the others, then closes the
    group, so no rank exits while gloo still talks to it (an abort at interpreter exit otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
