"""One fine-tuning run over Trainer: checks, output folder, training, saving, merging.

Everything that can be wrong with the request (fields, bitsandbytes, target modules, the output
folder) is checked before the model's weights are loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import FinetuneConfig
from .data import DataError, check_data, collator_for, prepare_data
from .model import (
    add_lora,
    build_skeleton,
    check_bitsandbytes,
    check_target_modules,
    load_model,
    model_class_for,
    resolve_task,
)

RUN_FILE = "hfx_finetune.json"
RESULTS_FILE = "hfx_finetune_results.json"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
MERGED_DIR = "merged"
# Fields that must agree for --resume to continue a run rather than start a different one.
RUN_IDENTITY = ("model", "data", "method", "task", "lora_r", "target_modules", "quant_type", "max_length", "packing")


class OutputDirError(FileExistsError):
    """The output folder holds another run and neither overwrite nor resume was asked for."""


@dataclass
class FinetuneResult:
    output_dir: str
    saved_dir: str
    merged_dir: str | None
    task: str
    data_format: str
    global_step: int
    train_loss: float
    final_loss: float | None
    eval_loss: float | None
    world_size: int
    resumed_from: str | None
    log_history: list = field(default_factory=list)
    model: object = field(default=None, repr=False)
    tokenizer: object = field(default=None, repr=False)

    def to_dict(self) -> dict:
        skip = {"model", "tokenizer"}
        return {k: v for k, v in self.__dict__.items() if k not in skip}


def finetune(config: FinetuneConfig | None = None, *, callbacks=None, **kwargs) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``config.data``; ``finetune(model=..., data=..., output=...)`` works too."""
    config = config if config is not None else FinetuneConfig(**kwargs)
    from transformers import AutoConfig, AutoTokenizer

    main_process = int(os.environ.get("RANK", "0")) == 0
    output = Path(config.output)
    if main_process:
        prepare_output_dir(config)
    model_config = AutoConfig.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    task = resolve_task(config, model_config)
    tokenizer = AutoTokenizer.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_data(config, task, tokenizer)
    if config.quantized:
        check_bitsandbytes(config)
    if config.uses_adapter:
        check_target_modules(config, build_skeleton(model_class_for(task), model_config))
    label_names = _existing_label_names(model_config) if task == "seq-cls" else None
    data = prepare_data(config, task, tokenizer, label_names)
    if len(data.train) == 0:
        raise DataError(f"no training example left after tokenising {config.data} (max_length={config.max_length}).")
    if task == "seq-cls":
        _set_labels(model_config, data)
    if main_process:
        _write_json(output / RUN_FILE, json.loads(config.to_json()))

    gradient_checkpointing = config.gradient_checkpointing if config.gradient_checkpointing is not None else config.quantized
    from transformers import set_seed

    set_seed(config.seed)  # LoRA's A matrices (and a new classifier head) are drawn before Trainer seeds
    model = load_model(config, task, model_config, gradient_checkpointing)
    if config.uses_adapter:
        model = add_lora(model, config, task)
    trainer = build_trainer(config, model, tokenizer, data, task, gradient_checkpointing, callbacks)
    resumed_from = last_checkpoint(output) if config.resume else None
    outcome = trainer.train(resume_from_checkpoint=resumed_from)

    saved_dir = output / (ADAPTER_DIR if config.uses_adapter else MODEL_DIR)
    merged_dir = None
    if trainer.is_world_process_zero():
        _save_atomically(saved_dir, lambda tmp: (trainer.model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
        if config.merge:
            from .merge import merge_adapter

            merged_dir = output / MERGED_DIR
            merge_adapter(config, task, model_config, saved_dir, merged_dir, tokenizer)
    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    result = FinetuneResult(
        output_dir=str(output),
        saved_dir=str(saved_dir),
        merged_dir=str(merged_dir) if merged_dir else None,
        task=task,
        data_format=data.data_format,
        global_step=trainer.state.global_step,
        train_loss=float(outcome.training_loss),
        final_loss=losses[-1] if losses else None,
        eval_loss=eval_losses[-1] if eval_losses else None,
        world_size=trainer.args.world_size,
        resumed_from=resumed_from,
        log_history=history,
        model=trainer.model,
        tokenizer=tokenizer,
    )
    if trainer.is_world_process_zero():
        _write_json(output / RESULTS_FILE, result.to_dict())
    return result


def build_trainer(config, model, tokenizer, data, task, gradient_checkpointing, callbacks):
    from transformers import EarlyStoppingCallback, Trainer, TrainingArguments

    evaluate = data.eval is not None
    eval_steps = config.eval_steps or config.save_steps
    early_stopping = config.early_stopping_patience is not None
    args = dict(
        output_dir=config.output,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.resolved_learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        seed=config.seed,
        bf16=_use_bf16(config),
        activation_checkpointing=gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        logging_steps=config.logging_steps,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=eval_steps if evaluate else None,
        save_strategy="steps",
        # Early stopping restores the best checkpoint, so checkpoints must line up with evaluations.
        save_steps=eval_steps if early_stopping else config.save_steps,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=early_stopping,
        metric_for_best_model="eval_loss" if early_stopping else None,
        greater_is_better=False if early_stopping else None,
        report_to="none",
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        # Adapters leave most of the graph without gradients; DDP must not wait for them.
        ddp_find_unused_parameters=False,
    )
    if config.optim is not None:
        args["optim"] = config.optim
    args.update(config.extra_training_args)
    trainer_callbacks = list(callbacks or [])
    if early_stopping:
        trainer_callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    return Trainer(
        model=model,
        args=TrainingArguments(**args),
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=collator_for(task, tokenizer),
        processing_class=tokenizer,
        callbacks=trainer_callbacks,
    )


def _use_bf16(config: FinetuneConfig) -> bool:
    if config.bf16 == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return config.bf16 == "yes"


def prepare_output_dir(config: FinetuneConfig) -> None:
    """Refuse a folder that holds another run, unless asked to overwrite it or resume the same run."""
    output = Path(config.output)
    if not output.exists() or not any(output.iterdir()):
        return
    if config.overwrite:
        shutil.rmtree(output)
        return
    run_file = output / RUN_FILE
    if not config.resume:
        what = "another fine-tuning run" if run_file.exists() else "files"
        raise OutputDirError(
            f"output folder {output} already holds {what}; pass --overwrite to replace it or --resume to continue it."
        )
    if not run_file.exists():
        raise OutputDirError(f"--resume: {output} holds no hfx fine-tuning run ({RUN_FILE} is missing).")
    if (output / RESULTS_FILE).exists():
        raise OutputDirError(f"--resume: the run in {output} already finished; pass --overwrite to train it again.")
    previous = json.loads(run_file.read_text())
    current = json.loads(config.to_json())
    changed = {k: (previous.get(k), current[k]) for k in RUN_IDENTITY if previous.get(k) != current[k]}
    if changed:
        raise OutputDirError(f"--resume: {output} holds a different run; differing settings (saved, requested): {changed}.")


def last_checkpoint(output: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output)) if output.is_dir() else None


def _existing_label_names(model_config) -> list[str] | None:
    id2label = getattr(model_config, "id2label", None) or {}
    names = [id2label[i] for i in sorted(id2label)]
    return None if all(name == f"LABEL_{i}" for i, name in enumerate(names)) else names


def _set_labels(model_config, data) -> None:
    if data.label_names:
        model_config.id2label = dict(enumerate(data.label_names))
        model_config.label2id = {name: i for i, name in enumerate(data.label_names)}
    else:
        highest = max(data.train["labels"])
        if highest >= model_config.num_labels:
            model_config.num_labels = highest + 1


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


def _save_atomically(target: Path, save) -> None:
    """Write into a sibling temp folder and rename, so a crash never leaves a half-written model."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(str(tmp))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
