"""The ``finetune`` step of ``hfx quickstart``: LoRA on the embedded task data, then a merged checkpoint.

A causal model learns to complete the arithmetic task (``"3 plus 4 is"`` -> ``" 7."``, loss on the
completion only); an encoder learns the five-way topic classification (``seq-cls``). Both end
with ``--merge`` and a reload of the merged folder through transformers alone.
"""

from __future__ import annotations

import json
from pathlib import Path


def _prompt_completion_file(source, target) -> str:
    rows = [json.loads(line) for line in open(source, encoding="utf-8")]
    records = [{"prompt": row["query"], "completion": f" {row['answer']}."} for row in rows]
    target.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(target)


def quickstart_step(ctx) -> None:
    import transformers

    from .config import FinetuneConfig
    from .train import finetune

    work = ctx.work_dir / "finetune"
    work.mkdir(parents=True, exist_ok=True)
    steps = 12 if ctx.flags.fast else 40
    common = dict(model=str(ctx.model_dir), output=str(work / "run"), method="lora", max_steps=steps, batch_size=16,
                  learning_rate=1e-3, lora_r=8, lora_alpha=16, logging_steps=max(1, steps // 4),
                  eval_steps=steps // 2, save_steps=steps, merge=True, overwrite=True, seed=ctx.flags.seed,
                  max_length=ctx.flags.max_length, extra_training_args={"disable_tqdm": True})
    if ctx.objective == "clm":
        task = "arithmetic, prompt -> completion"
        config = FinetuneConfig(
            data=_prompt_completion_file(ctx.data_paths["arithmetic_train"], work / "train.jsonl"),
            eval_data=_prompt_completion_file(ctx.data_paths["arithmetic_validation"], work / "validation.jsonl"),
            task="causal-lm", **common)
        auto_class = transformers.AutoModelForCausalLM
    else:
        task = "topics, 5-way sequence classification"
        config = FinetuneConfig(data=str(ctx.data_paths["topics_train"]), eval_data=str(ctx.data_paths["topics_validation"]),
                                task="seq-cls", **common)
        auto_class = transformers.AutoModelForSequenceClassification
    result = finetune(config)
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    merged = auto_class.from_pretrained(result.merged_dir)
    ctx.files["LoRA adapter"] = result.saved_dir
    ctx.files["merged model"] = result.merged_dir
    ctx.finetuned_dir = Path(result.merged_dir)
    ctx.results["finetune"] = {
        "task": task, "method": "lora", "steps": result.global_step, "train_loss_first": round(losses[0], 4),
        "train_loss_last": round(losses[-1], 4), "eval_loss": round(result.eval_loss, 4),
    }
    ctx.report("finetune", f"LoRA (r=8) on {task}: {result.global_step} steps, training loss {losses[0]:.3f} -> "
                           f"{losses[-1]:.3f}, validation loss {result.eval_loss:.3f}; merged checkpoint reloads as "
                           f"{type(merged).__name__} without PEFT")
