"""One fine-tuning run over Trainer: checks, output folder, training, saving, merging.

Everything that can be wrong with the request (fields, bitsandbytes, target modules, the output
folder) is checked before the model's weights are loaded.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint_check import CheckpointError, check_model_dir, file_problem, weights_problem
from ..long_context import long_load_kwargs
from ..safe_paths import blocking_parent, remove_entry, replace_folder
from .config import FinetuneConfig, changes_base, packing_mode
from .data import DataError, check_data, collator_for, prepare_data
from .metrics import check_metrics, last_eval_metrics, trainer_metrics
from .model import (
    BackendError,
    add_lora,
    build_skeleton,
    check_bitsandbytes,
    check_task,
    check_target_modules,
    calibration_batches,
    load_model,
    model_class_for,
    resolve_task,
    save_trained,
)

RUN_FILE = "hfx_finetune.json"
RESULTS_FILE = "hfx_finetune_results.json"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
MERGED_DIR = "merged"
#: Everything a run writes into its output folder, the ONLY names ``--overwrite`` removes: the run
#: file, the saved adapter / model / merged checkpoint, Trainer's checkpoints (``checkpoint-N``,
#: ``tmp-checkpoint-N``: digits only) and its tensorboard ``runs/`` and result files. Each is a
#: regular expression the WHOLE name must match, so ``checkpoint-500-best`` or ``checkpoint-5 (copy)``
#: is not a run output. Each may also appear with the ``.tmp`` / ``.old`` suffix of an interrupted
#: atomic write (:data:`ATOMIC_SUFFIXES`). Anything else in the folder stops an overwrite.
RUN_OUTPUTS = (
    re.escape(RUN_FILE),
    re.escape(RESULTS_FILE),
    re.escape(ADAPTER_DIR),
    re.escape(MODEL_DIR),
    re.escape(MERGED_DIR),
    r"checkpoint-[0-9]+",
    r"tmp-checkpoint-[0-9]+",
    r"runs",
    re.escape("trainer_state.json"),
    re.escape("all_results.json"),
    re.escape("train_results.json"),
    re.escape("eval_results.json"),
)
ATOMIC_SUFFIXES = ("", ".tmp", ".old")
_RUN_OUTPUT = re.compile(
    "(?:" + "|".join(RUN_OUTPUTS) + ")(?:" + "|".join(re.escape(suffix) for suffix in ATOMIC_SUFFIXES) + ")"
)

# Settings that must agree for --resume to continue a run rather than start a different one.
RUN_IDENTITY = (
    "model", "data", "task", "method", "data_format", "text_field", "prompt_field", "completion_field",
    "messages_field", "assistant_only_loss", "label_field", "source_field", "target_field", "data_split",
    "eval_fraction", "max_train_samples",
    "lora_r", "lora_alpha", "lora_dropout", "target_modules",
    "use_dora", "use_rslora", "init_lora_weights", "target_parameters", "modules_to_save",
    "quant_type", "double_quant", "compute_dtype", "quant_storage",
    "max_length", "packing", "batch_size", "grad_accum",
    "learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay", "optim", "bf16", "seed",
)
# Settings a resumed run may change: how long it trains (to extend a run), how often it evaluates,
# saves and logs, what it does after training, and the flags of this invocation.
RESUME_MAY_DIFFER = (
    "output", "epochs", "max_steps", "eval_steps", "save_steps", "logging_steps", "save_total_limit",
    "eval_data", "eval_batch_size", "early_stopping_patience", "metrics", "metrics_average", "gradient_checkpointing",
    "chunked_loss",
    "merge", "merge_dtype", "overwrite", "resume", "trust_remote_code", "extra_training_args",
)


logger = logging.getLogger("hfx.finetune")


class OutputDirError(FileExistsError):
    """The output folder cannot be used as asked: it holds something else, or another run, or the
    saved run differs from the requested one (``--resume``)."""


@dataclass
class OutputPlan:
    """What :func:`check_output_dir` found: the run outputs an overwrite removes, the saved run's process count."""

    remove: list[str] = field(default_factory=list)
    previous_world_size: int | None = None


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
    #: the kernel bitsandbytes' 4-bit layers use on the CPU (``hfx.quantization``); None without any
    bnb_cpu_path: str | None = None
    #: which loss trained: "chunked" (hfx.finetune.loss, labelled positions only) or "plain" (the model's own)
    loss_kind: str = "plain"
    #: real tokens / slots of the packed training rows (--packing); None without packing
    packing_efficiency: float | None = None
    #: the ``eval_*`` values of the last evaluation (eval_loss and the --metrics); None without one
    eval_metrics: dict | None = None
    log_history: list = field(default_factory=list)
    model: object = field(default=None, repr=False)
    tokenizer: object = field(default=None, repr=False)
    main_process: bool = field(default=True, repr=False)  # False on the other ranks of a multi-process run

    def to_dict(self) -> dict:
        skip = {"model", "tokenizer", "main_process"}
        return {k: v for k, v in self.__dict__.items() if k not in skip}


def finetune(config: FinetuneConfig | None = None, *, callbacks=None, **kwargs) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``config.data``; ``finetune(model=..., data=..., output=...)`` works too.

    Order: every check (settings, output folder, model files, tokenizer, data, bitsandbytes,
    target modules) runs first; only then is anything in the output folder removed or written,
    and only then are the model's weights loaded.
    """
    config = config if config is not None else FinetuneConfig(**kwargs)
    check_sharding_engine(config)

    main_process = int(os.environ.get("RANK", "0")) == 0
    output = Path(config.output)
    output_existed = output.exists()
    plan = check_output_dir(config) if main_process else OutputPlan()
    model_config, tokenizer = _load_config_and_tokenizer(config)
    long_load_kwargs(model_config, where=f"--model {config.model}")  # a long backend not installed: refused first
    task = resolve_task(config, model_config)
    check_task(config, task, model_config)  # e.g. seq2seq on a decoder-only model: refused before the data is read
    from .loss import check_chunked_loss

    check_chunked_loss(config, task, model_config)  # chunked_loss="on" where it would not be exact
    checked = check_data(config, task, tokenizer)
    check_metrics(config, task, checked[2])  # a metric the task or the records cannot give: refused before loading
    if config.quantized:
        check_bitsandbytes(config)
    if config.uses_adapter:
        check_target_modules(config, build_skeleton(model_class_for(task), model_config))
    label_names = _existing_label_names(model_config) if task == "seq-cls" else None
    data = prepare_data(config, task, tokenizer, label_names, checked=checked)
    if len(data.train) == 0:
        why = (f"--packing needs at least max_length={config.max_length} tokens in all" if config.packing == "wrapped"
               else f"max_length={config.max_length}")
        raise DataError(f"no training example left after tokenising {config.data} ({why}).")
    if task == "seq-cls":
        _set_labels(model_config, data)
    resumed_from = newest_complete_checkpoint(output, warn=main_process) if config.resume else None
    if config.resume and resumed_from is None and main_process:
        logger.warning("--resume: %s holds no complete checkpoint; training starts from step 0.", output)
    if main_process:
        if plan.remove:
            clear_run_outputs(output, plan.remove)
        if plan.previous_world_size is not None and plan.previous_world_size != _world_size():
            logger.warning(
                "--resume: the run was trained on %d process(es) and continues on %d: the effective batch changes "
                "from %d to %d examples per step.", plan.previous_world_size, _world_size(),
                plan.previous_world_size * config.batch_size * config.grad_accum,
                _world_size() * config.batch_size * config.grad_accum,
            )
        _write_json(output / RUN_FILE, {**json.loads(config.to_json()), "world_size": _world_size()})

    gradient_checkpointing = config.gradient_checkpointing if config.gradient_checkpointing is not None else config.quantized
    from transformers import set_seed

    from ..quantization import bnb_cpu_path

    set_seed(config.seed)  # LoRA's A matrices (and a new classifier head) are drawn before Trainer seeds
    try:
        model = load_model(config, task, model_config, gradient_checkpointing)
        if config.uses_adapter:
            model = add_lora(model, config, task, calibration=lambda batch_size: calibration_batches(  # EVA / CorDA only
                model, data.train, collator_for(task, tokenizer, config.packing, model), batch_size))
        trainer = build_trainer(config, model, tokenizer, data, task, gradient_checkpointing, callbacks)
    except BaseException:
        if main_process and not config.resume:
            _forget_unstarted_run(output, created=not output_existed)
        raise
    outcome = trainer.train(resume_from_checkpoint=resumed_from)
    if data.eval is not None and _needs_final_evaluation(trainer):
        trainer.evaluate()  # on every process (a collective under DDP): the results describe the model saved

    saved_dir = output / (ADAPTER_DIR if config.uses_adapter else MODEL_DIR)
    merged_dir = None
    gathered = partitioned_state_dict(trainer)  # FSDP2 / ZeRO-3: a gather every process joins, before rank 0 writes
    if trainer.is_world_process_zero():
        replace_folder(saved_dir, lambda tmp: (
            save_trained(trainer.model, tmp) if gathered is None else trainer.model.save_pretrained(tmp, state_dict=gathered),
            tokenizer.save_pretrained(tmp),
        ))
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
        train_loss=global_training_loss(trainer, outcome.training_loss),
        final_loss=losses[-1] if losses else None,
        eval_loss=eval_losses[-1] if eval_losses else None,
        world_size=trainer.args.world_size,
        resumed_from=resumed_from,
        bnb_cpu_path=bnb_cpu_path(trainer.model),
        loss_kind=getattr(trainer, "loss_kind", "plain"),
        packing_efficiency=data.packing_efficiency,
        eval_metrics=last_eval_metrics(history),
        log_history=history,
        model=trainer.model,
        tokenizer=tokenizer,
        main_process=trainer.is_world_process_zero(),
    )
    if trainer.is_world_process_zero():
        _write_json(output / RESULTS_FILE, result.to_dict())
    return result


def partitioned_state_dict(trainer) -> dict | None:
    """The whole state dict of a model the engine partitioned across processes, None when it did not.

    ZeRO-3 keeps empty placeholders in the module: its parameters are consolidated by accelerate's
    ``get_state_dict`` of the DeepSpeed engine, as ``Trainer.save_model`` does (the shipped ZeRO-3 config
    sets ``stage3_gather_16bit_weights_on_model_save``). FSDP2: :func:`gathered_state_dict`.
    """
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3:
        return trainer.accelerator.get_state_dict(trainer.model_wrapped)
    return gathered_state_dict(trainer.model)


def gathered_state_dict(model) -> dict | None:
    """The whole state dict of a model whose parameters FSDP2 sharded (DTensors), or None when none is.

    Every process must call it (the shards are gathered with collectives); rank 0 receives the tensors, on
    the CPU, as accelerate's FSDP2 ``get_state_dict`` does. Saving from rank 0 alone would read the local
    shards, whose gathered storage FSDP2 frees after each forward.
    """
    from torch.distributed.tensor import DTensor

    if not any(isinstance(param, DTensor) for param in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def check_sharding_engine(config: FinetuneConfig) -> None:
    """An FSDP or DeepSpeed launch this run cannot honour is refused, before anything is read or written.

    - Without a CUDA device hfx trains on the CPU (``use_cpu``), where accelerate 1.15 keeps the run
      ``MULTI_CPU``: its state enables FSDP only for accelerator devices (GPU, XPU, NPU, HPU, ...) and
      DeepSpeed only without ``use_cpu``, so the engine's plugin is dropped and every process would hold
      the whole model (plain DDP).
    - An init that changes the base weights (PiSSA, OLoRA, CorDA) is saved converted against the original
      base, a computation on the whole weights of one process that a partitioned model does not have.
    """
    from .loss import requested_sharding_engine  # the one reading of the launcher's variables

    requested = requested_sharding_engine()
    if requested is None:
        return
    variable, engine = requested
    launched = f"{variable}={os.environ[variable]}"
    init = str(config.init_lora_weights)
    partitioned = engine == "FSDP" or _deepspeed_zero_stage() == 3  # ZeRO-2 keeps whole parameters everywhere
    if partitioned and config.uses_adapter and changes_base(init):
        raise BackendError(
            f"--init-lora-weights {init} under {engine} ({launched}): the adapter of an init that changes the "
            "base weights is saved converted against the original base, which needs the whole weights in one "
            "process; train it with DDP or on one device, or choose another init (default, gaussian, eva, "
            "orthogonal)."
        )
    if not torch.cuda.is_available():
        raise BackendError(
            f"{engine} was requested by the launcher ({launched}), but there is no CUDA device: accelerate "
            f"does not shard on the CPU and would train every process on the whole model (DDP). Run on GPUs, "
            "or launch DDP on the CPU with `torchrun --nproc_per_node N -m hfx.cli finetune ...` or "
            "`accelerate launch --multi_gpu --num_processes N -m hfx.cli finetune ...`."
        )


def _deepspeed_zero_stage() -> int | None:
    """The ZeRO stage of an ``accelerate launch`` with DeepSpeed: the config's ``zero_stage`` field, or the
    stage in its DeepSpeed JSON file; None when neither says."""
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage is not None and stage.isdigit():
        return int(stage)
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    try:
        with open(path, encoding="utf-8") as f:
            stage = json.load(f).get("zero_optimization", {}).get("stage")
    except (TypeError, OSError, ValueError, AttributeError):
        return None
    return stage if isinstance(stage, int) else None


def global_training_loss(trainer, local_loss: float) -> float:
    """Trainer's ``training_loss`` averaged over every process.

    Trainer adds the losses it logged (already gathered from all processes) to the loss of the
    steps since the last log, which each process only knows for its own batches. The mean of the
    per-process values is therefore the all-process mean; on one process it is the value itself.
    """
    if trainer.args.world_size <= 1:
        return float(local_loss)
    value = torch.tensor([float(local_loss)], device=trainer.args.device)
    return float(trainer.accelerator.reduce(value, reduction="mean").item())


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _load_config_and_tokenizer(config: FinetuneConfig):
    """The model's config and tokenizer, after checking the checkpoint's files; one-line errors otherwise."""
    from transformers import AutoConfig, AutoTokenizer

    check_model_dir(config.model, "--model")
    try:
        model_config = AutoConfig.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"--model {config.model}: cannot read its config: {_one_line(exc)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"--model {config.model}: cannot load its tokenizer (save one next to the weights with "
            f"tokenizer.save_pretrained): {_one_line(exc)}"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model_config, tokenizer


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def build_trainer(config, model, tokenizer, data, task, gradient_checkpointing, callbacks):
    from transformers import EarlyStoppingCallback, TrainingArguments

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
        # transformers 5 has one field for both: a value below 1 is a fraction of the training steps, a
        # value of 1 or more a step count. FinetuneConfig keeps warmup_ratio in [0, 1), so it stays a ratio.
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
    from .loss import trainer_class_for

    base_class = trainer_class_for(config, task, model)  # the chunked causal-LM loss where it is exact
    trainer_class, metric_kwargs = trainer_metrics(config, task, model, base_class)  # --metrics at each evaluation
    return trainer_class(
        model=model,
        args=TrainingArguments(**args),
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=collator_for(task, tokenizer, config.packing, model),
        processing_class=tokenizer,
        callbacks=trainer_callbacks,
        **metric_kwargs,
    )


def _use_bf16(config: FinetuneConfig) -> bool:
    if config.bf16 == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return config.bf16 == "yes"


def is_run_output(name: str) -> bool:
    """Whether an entry of an output folder is one :data:`RUN_OUTPUTS` names (with an atomic-write suffix or not).

    The whole name must match (``re.fullmatch``): a user's ``checkpoint-500-best`` or ``checkpoint-5.bak`` is not.
    """
    return _RUN_OUTPUT.fullmatch(name) is not None


def _shown(names: list[str], limit: int = 8) -> str:
    names = sorted(names)
    return str(names if len(names) <= limit else names[:limit] + [f"... {len(names) - limit} more"])


def _check_writable_parent(output: Path) -> None:
    blocked = blocking_parent(output)
    if blocked is not None:
        raise OutputDirError(f"output folder {output} cannot be created: {blocked[0]} is not a writable folder.")


def check_output_dir(config: FinetuneConfig) -> OutputPlan:
    """Decide what may happen to the output folder; touches nothing (the removal comes after every other check).

    - a missing or empty folder is used as is;
    - ``overwrite``: only a folder holding an hfx run (its ``hfx_finetune.json``) and nothing but
      what a run writes (:data:`RUN_OUTPUTS`) is cleared; anything else stops the run, named;
    - ``resume``: the saved run's settings must match the requested ones (:data:`RUN_IDENTITY`);
    - neither: a non-empty folder is refused.
    """
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise OutputDirError(f"output {output} is a file, not a folder; choose a folder for the run.")
    if not output.exists():
        _check_writable_parent(output)
        return OutputPlan()
    if not os.access(output, os.W_OK | os.X_OK):
        raise OutputDirError(f"output folder {output} is not writable.")
    entries = sorted(entry.name for entry in output.iterdir())
    if not entries:
        return OutputPlan()
    run_file = output / RUN_FILE
    is_run = run_file.is_file()
    if config.overwrite:
        if not is_run:
            raise OutputDirError(
                f"--overwrite: {output} is not an hfx fine-tuning run (it has no {RUN_FILE}) and holds "
                f"{_shown(entries)}; nothing was deleted. Choose another --output or empty the folder yourself."
            )
        foreign = [name for name in entries if not is_run_output(name)]
        if foreign:
            raise OutputDirError(
                f"--overwrite: {output} holds {_shown(foreign)}, which a fine-tuning run does not write; nothing was "
                "deleted. Move them elsewhere or choose another --output."
            )
        _check_sources_survive(config, output, entries)
        return OutputPlan(remove=entries)
    if not config.resume:
        if is_run:
            raise OutputDirError(
                f"output folder {output} already holds another fine-tuning run; pass --overwrite to replace it "
                "or --resume to continue it."
            )
        raise OutputDirError(
            f"output folder {output} already holds files {_shown(entries)} and is not an hfx run; choose another "
            "--output (--overwrite only replaces a folder an hfx run wrote)."
        )
    if not is_run:
        raise OutputDirError(f"--resume: {output} holds no hfx fine-tuning run ({RUN_FILE} is missing).")
    try:
        previous = json.loads(run_file.read_text(encoding="utf-8"))
        if not isinstance(previous, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise OutputDirError(f"--resume: {run_file} is damaged ({exc}); pass --overwrite to start again.") from None
    changed = resume_differences(previous, config)
    if changed:
        raise OutputDirError(
            f"--resume: {output} holds a different run; settings that differ: {'; '.join(changed)}. Repeat the "
            "saved values, or pass --overwrite to start a new run."
        )
    if (output / RESULTS_FILE).exists() and not _extends(previous, config):
        raise OutputDirError(
            f"--resume: the run in {output} already finished; raise --max-steps / --epochs to extend it, or pass "
            "--overwrite to train it again."
        )
    world_size = previous.get("world_size")
    return OutputPlan(previous_world_size=world_size if isinstance(world_size, int) else None)


def _source_paths(config: FinetuneConfig) -> list[tuple[str, str]]:
    """``(flag, path)`` for every local path the run reads: the model (its tokenizer comes from the same
    folder; FinetuneConfig has no separate tokenizer path), the training data and the evaluation data."""
    sources = [("--model", config.model), ("--data", config.data)]
    if config.eval_data is not None:
        sources.append(("--eval-data", config.eval_data))
    return sources


def _lies_in(source: Path, doomed: set[Path]) -> tuple[Path, bool] | None:
    """``(entry, source is the entry itself)`` for the entry of ``doomed`` that ``source`` is or lies under, or None.

    Checked at every level of the path with the folders above it resolved (an entry that is a link
    is unlinked, so ``out/link/x`` is lost with it) and once fully resolved (``x`` a link into ``out/model``).
    """
    path = Path(os.path.abspath(source))
    for level in (path, *path.parents):
        if level.parent != level and level.parent.resolve() / level.name in doomed:
            return level.parent.resolve() / level.name, level == path
    resolved = path.resolve()
    for entry in doomed:
        if not entry.is_symlink() and (resolved == entry or entry in resolved.parents):
            return entry, resolved == entry
    return None


def _check_sources_survive(config: FinetuneConfig, output: Path, entries: list[str]) -> None:
    """Refuse an overwrite that would delete the model or data the run is about to read."""
    real_output = output.resolve()
    doomed = {real_output / name for name in entries}
    for flag, value in _source_paths(config):
        source = Path(value).expanduser()
        if not (source.exists() or source.is_symlink()):
            continue  # a hub id or dataset name, or a missing path reported later
        if source.resolve() == real_output:
            raise OutputDirError(
                f"--overwrite: {flag} {value} is the output folder {output} itself, whose contents the overwrite "
                "deletes; nothing was deleted. Choose another --output."
            )
        found = _lies_in(source, doomed)
        if found is not None:
            entry, itself = found
            where = "is" if itself else "lies inside"
            raise OutputDirError(
                f"--overwrite: {flag} {value} {where} {output / entry.name}, which the overwrite would delete; "
                f"nothing was deleted. Copy it out of {output} first, or choose another --output."
            )


def _comparable(name: str, values: dict):
    value = values.get(name)
    if name == "learning_rate" and value is None and values.get("method") is not None:
        return 2e-5 if values.get("method") == "full" else 2e-4  # FinetuneConfig.resolved_learning_rate
    if name in ("model", "data") and isinstance(value, str) and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    if name in ("target_modules", "target_parameters", "modules_to_save") and isinstance(value, list):
        return sorted(value)
    if name == "packing" and isinstance(value, bool):
        return packing_mode(value)  # a run file from before the packing modes stored a boolean
    return value


def resume_differences(previous: dict, config: FinetuneConfig) -> list[str]:
    """``"name: saved -> requested"`` for every :data:`RUN_IDENTITY` setting that differs."""
    from dataclasses import MISSING, fields

    current = json.loads(config.to_json())
    # a setting an older run file lacks did not exist then: that run used what is now its default
    defaults = {f.name: f.default for f in fields(FinetuneConfig) if f.default is not MISSING}
    previous = {**{k: v for k, v in defaults.items() if k not in previous}, **previous}
    changed = []
    for name in RUN_IDENTITY:
        saved, requested = _comparable(name, previous), _comparable(name, current)
        if saved != requested:
            changed.append(f"{name}: saved {previous.get(name)!r}, requested {current.get(name)!r}")
    return changed


def _extends(previous: dict, config: FinetuneConfig) -> bool:
    return previous.get("max_steps") != config.max_steps or previous.get("epochs") != config.epochs


def clear_run_outputs(output: Path, names: list[str]) -> None:
    """Remove the run outputs ``names`` from ``output`` (a link is unlinked, never followed)."""
    for name in names:
        if not is_run_output(name):  # check_output_dir refused these already; never remove one
            raise OutputDirError(f"refusing to remove {output / name}: a fine-tuning run does not write it.")
        remove_entry(output / name)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed from (a kill while it was written), or None.

    Trainer writes the weights first, then optimizer, scheduler and RNG states, and
    ``trainer_state.json`` last; a complete checkpoint has readable weights and a valid state file,
    and every optimizer / scheduler / RNG file present opens as an archive.
    """
    state = checkpoint / "trainer_state.json"
    if not state.is_file():
        return "trainer_state.json is missing"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "trainer_state.json is not valid JSON"
    problem = weights_problem(checkpoint)
    if problem:
        return problem
    for extra in sorted(checkpoint.iterdir()):
        if extra.suffix in (".pt", ".pth") or extra.name == "training_args.bin":
            problem = file_problem(extra)
            if problem:
                return problem
    return None


def newest_complete_checkpoint(output: Path, warn: bool = True) -> str | None:
    """The newest ``checkpoint-N`` of ``output`` that is complete; newer half-written ones are skipped with a warning."""
    if not output.is_dir():
        return None
    numbered = []
    for entry in output.iterdir():
        name = entry.name
        if entry.is_dir() and name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
            numbered.append((int(name[len("checkpoint-"):]), entry))
    for _, checkpoint in sorted(numbered, reverse=True):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return str(checkpoint)
        if warn:
            logger.warning("--resume: skipping %s, which was not completely written (%s).", checkpoint, problem)
    return None


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


def _needs_final_evaluation(trainer) -> bool:
    """True when the last evaluation did not see the final weights: it ran before the last step, or
    early stopping then restored the best checkpoint."""
    steps = [entry["step"] for entry in trainer.state.log_history if "eval_loss" in entry]
    return not steps or steps[-1] != trainer.state.global_step or trainer.args.load_best_model_at_end


def _forget_unstarted_run(output: Path, created: bool) -> None:
    """A run that failed before training began leaves no record behind: its run file would make the
    corrected command refuse the folder as "another run" (a folder it created, left empty, goes too)."""
    (output / RUN_FILE).unlink(missing_ok=True)
    if created:
        try:
            output.rmdir()  # only when nothing else is in it
        except OSError:
            pass


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)
