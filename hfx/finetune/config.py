"""FinetuneConfig: every knob of one fine-tuning run, checked before anything heavy is loaded."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

METHODS = ("full", "lora", "qlora", "int8")
TASKS = ("auto", "causal-lm", "seq-cls", "seq2seq")
DATA_FORMATS = ("auto", "text", "prompt-completion", "chat", "source-target")
QUANT_TYPES = ("nf4", "fp4")
DTYPES = ("float32", "bfloat16", "float16")
BF16_CHOICES = ("auto", "yes", "no")
#: TrainingArguments hfx sets itself, each from the FinetuneConfig field(s) named (the ``hfx finetune``
#: flag of the same name). ``extra_training_args`` may not set them: every setting that defines a run
#: stays a FinetuneConfig field, recorded in hfx_finetune.json and compared by ``--resume``.
SHADOWED_TRAINING_ARGS = {
    "output_dir": ("output",),
    "per_device_train_batch_size": ("batch_size",),
    "per_device_eval_batch_size": ("eval_batch_size",),
    "gradient_accumulation_steps": ("grad_accum",),
    "learning_rate": ("learning_rate",),
    "lr_scheduler_type": ("lr_scheduler",),
    "warmup_steps": ("warmup_ratio",),
    "warmup_ratio": ("warmup_ratio",),
    "weight_decay": ("weight_decay",),
    "num_train_epochs": ("epochs",),
    "max_steps": ("max_steps",),
    "seed": ("seed",),
    "optim": ("optim",),
    "bf16": ("bf16",),
    "activation_checkpointing": ("gradient_checkpointing",),
    "activation_checkpointing_kwargs": ("gradient_checkpointing",),
    "gradient_checkpointing": ("gradient_checkpointing",),
    "gradient_checkpointing_kwargs": ("gradient_checkpointing",),
    "logging_steps": ("logging_steps",),
    "eval_strategy": ("eval_data", "eval_fraction"),
    "eval_steps": ("eval_steps",),
    "save_strategy": ("save_steps",),
    "save_steps": ("save_steps",),
    "save_total_limit": ("save_total_limit",),
    "load_best_model_at_end": ("early_stopping_patience",),
    "metric_for_best_model": ("early_stopping_patience",),
    "greater_is_better": ("early_stopping_patience",),
    "resume_from_checkpoint": ("resume",),
}


def scheduler_names() -> list[str]:
    """Learning-rate scheduler names transformers' Trainer accepts (``lr_scheduler_type``)."""
    from transformers.trainer_utils import SchedulerType

    return [s.value for s in SchedulerType]


@dataclass
class FinetuneConfig:
    """One fine-tuning run. Field names match the ``hfx finetune`` flags (``lora_r`` is ``--lora-r``).

    ``method``: ``full`` trains every weight; ``lora`` trains low-rank adapters on a frozen base;
    ``qlora`` does the same on a base whose block linears are stored in 4 bit (NF4 + double
    quantisation + bf16 compute unless told otherwise); ``int8`` on an LLM.int8 base.
    ``task``: ``causal-lm``, ``seq-cls``, ``seq2seq`` (an encoder-decoder: ``source_field`` to the
    encoder, ``target_field`` as the decoder's labels) or ``auto`` (from the checkpoint).
    """

    model: str
    data: str
    output: str
    method: str = "lora"
    task: str = "auto"

    # data
    data_format: str = "auto"
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    assistant_only_loss: bool = True  # chat: loss on the assistant turns only (False: on every token)
    label_field: str = "label"
    source_field: str = "source"  # seq2seq: the encoder's input
    target_field: str = "target"  # seq2seq: what the decoder learns to produce
    data_split: str = "train"
    eval_data: str | None = None
    eval_fraction: float = 0.0
    max_length: int = 512
    packing: bool = False
    max_train_samples: int | None = None

    # LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None

    # quantisation
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    quant_storage: str | None = None

    # optimisation
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    eval_batch_size: int | None = None
    grad_accum: int = 1
    learning_rate: float | None = None
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    optim: str | None = None  # None: TrainingArguments' default (adamw_torch_fused), as a plain Trainer script gets
    gradient_checkpointing: bool | None = None
    bf16: str = "auto"
    seed: int = 42

    # evaluation, checkpoints, logging
    eval_steps: int | None = None
    early_stopping_patience: int | None = None
    save_steps: int = 200
    save_total_limit: int | None = 2
    logging_steps: int = 10

    # output
    merge: bool = False
    merge_dtype: str | None = None
    overwrite: bool = False
    resume: bool = False
    trust_remote_code: bool = False
    extra_training_args: dict = field(default_factory=dict)

    def __post_init__(self):
        for name, valid in (
            ("method", METHODS),
            ("task", TASKS),
            ("data_format", DATA_FORMATS),
            ("quant_type", QUANT_TYPES),
            ("compute_dtype", DTYPES),
            ("bf16", BF16_CHOICES),
        ):
            if getattr(self, name) not in valid:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; valid values: {list(valid)}.")
        if self.quant_storage is not None and self.quant_storage not in DTYPES + ("uint8",):
            raise ValueError(f"quant_storage={self.quant_storage!r} is invalid; valid values: {list(DTYPES) + ['uint8']}.")
        if self.optim is not None:
            from transformers.training_args import OptimizerNames

            valid_optims = [o.value for o in OptimizerNames]
            if self.optim not in valid_optims:
                raise ValueError(f"optim={self.optim!r} is invalid; valid values: {valid_optims}.")
        if self.merge_dtype is not None and self.merge_dtype not in DTYPES:
            raise ValueError(f"merge_dtype={self.merge_dtype!r} is invalid; valid values: {list(DTYPES)}.")
        for name in ("lora_r", "lora_alpha", "batch_size", "grad_accum", "max_length", "save_steps", "logging_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        for name in ("eval_steps", "eval_batch_size", "max_train_samples", "early_stopping_patience"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        for name in ("model", "data", "output"):
            if not str(getattr(self, name)).strip():
                raise ValueError(f"{name} must name a path, got {getattr(self, name)!r}.")
        if self.max_steps != -1 and self.max_steps <= 0:
            raise ValueError(f"max_steps must be a positive number of steps, or -1 to train for epochs; got {self.max_steps}.")
        if self.max_steps == -1 and not (0 < self.epochs < math.inf):
            raise ValueError(f"epochs must be a positive finite number (or set max_steps); got {self.epochs}: "
                             "such a run would train nothing.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1) (a fraction of the training steps), got {self.warmup_ratio}.")
        if self.learning_rate is not None and not (0 < self.learning_rate < math.inf):
            raise ValueError(f"learning_rate must be a positive finite number, got {self.learning_rate}.")
        if not (0 <= self.weight_decay < math.inf):
            raise ValueError(f"weight_decay must be a non-negative finite number, got {self.weight_decay}.")
        schedulers = scheduler_names()
        if self.lr_scheduler not in schedulers:
            raise ValueError(f"lr_scheduler={self.lr_scheduler!r} is invalid; valid values: {schedulers}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}.")
        if self.eval_data is not None and self.eval_fraction:
            raise ValueError("give either eval_data or eval_fraction, not both.")
        if self.early_stopping_patience is not None and not self.has_eval:
            raise ValueError("early_stopping_patience needs evaluation data: set eval_data or eval_fraction.")
        if self.overwrite and self.resume:
            raise ValueError("overwrite and resume exclude each other: overwrite deletes the checkpoints resume needs.")
        if self.task == "seq2seq" and self.packing:
            raise ValueError("packing=True is invalid with task='seq2seq'; valid values: packing=False (each "
                             "source/target pair is its own example, padded per batch).")
        if self.task == "seq2seq" and self.data_format not in ("auto", "source-target", "prompt-completion"):
            raise ValueError(f"data_format={self.data_format!r} is invalid with task='seq2seq'; valid values: "
                             "['auto', 'source-target', 'prompt-completion'] (records with an input and an output text).")
        if self.task not in ("auto", "seq2seq") and self.data_format == "source-target":
            raise ValueError(f"data_format='source-target' is invalid with task={self.task!r}; valid values: "
                             "task='seq2seq' or 'auto' (an encoder-decoder model).")
        if self.merge and self.method == "full":
            raise ValueError("merge applies to adapter methods (lora, qlora, int8); a full fine-tune is already plain.")
        self._check_extra_training_args()
        if isinstance(self.target_modules, str):
            given = self.target_modules
            self.target_modules = [name.strip() for name in given.split(",") if name.strip()]
            if not self.target_modules:
                raise ValueError(f"target_modules={given!r} names no module; give comma-separated names, e.g. "
                                 "'q_proj,v_proj', or leave it out for every linear layer except the head.")

    def _check_extra_training_args(self) -> None:
        """Extra TrainingArguments must be real ones and none that hfx sets from a field (:data:`SHADOWED_TRAINING_ARGS`)."""
        if not isinstance(self.extra_training_args, dict) or not all(isinstance(k, str) for k in self.extra_training_args):
            raise ValueError(f"extra_training_args must be a dict of TrainingArguments names to values, got "
                             f"{self.extra_training_args!r}.")
        if not self.extra_training_args:
            return  # the CLI's case: no import of the training stack just to validate settings
        for key in sorted(self.extra_training_args):
            if key in SHADOWED_TRAINING_ARGS:
                names = SHADOWED_TRAINING_ARGS[key]
                use = " / ".join(names)
                flags = " / ".join("--" + name.replace("_", "-") for name in names)
                raise ValueError(f"extra_training_args[{key!r}] would override what hfx sets from FinetuneConfig.{use} "
                                 f"({flags}); set that instead, so the run file records it and --resume compares it.")
        from transformers import TrainingArguments

        known = {f.name for f in fields(TrainingArguments)}
        unknown = sorted(set(self.extra_training_args) - known)
        if unknown:
            raise ValueError(f"extra_training_args names {unknown}, which are not TrainingArguments fields.")

    @property
    def uses_adapter(self) -> bool:
        return self.method != "full"

    @property
    def quantized(self) -> bool:
        return self.method in ("qlora", "int8")

    @property
    def has_eval(self) -> bool:
        return self.eval_data is not None or self.eval_fraction > 0

    @property
    def resolved_learning_rate(self) -> float:
        """2e-4 for adapters (the QLoRA paper's setting), 2e-5 for full fine-tuning."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 2e-4 if self.uses_adapter else 2e-5

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> "FinetuneConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown FinetuneConfig fields {unknown}; valid fields: {sorted(known)}.")
        return cls(**values)
