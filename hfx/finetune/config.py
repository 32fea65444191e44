"""FinetuneConfig: every knob of one fine-tuning run, checked before anything heavy is loaded."""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, field, fields

METHODS = ("full", "lora", "qlora", "int8")
TASKS = ("auto", "causal-lm", "seq-cls", "seq2seq")
DATA_FORMATS = ("auto", "text", "prompt-completion", "chat", "source-target")
QUANT_TYPES = ("nf4", "fp4")
DTYPES = ("float32", "bfloat16", "float16")
BF16_CHOICES = ("auto", "yes", "no")
#: causal-LM loss on labelled positions only, head applied in chunks (hfx.finetune.loss); auto: where exact
CHUNKED_LOSS = ("auto", "on", "off")
#: causal-LM packing: none, best-fit decreasing into max_length rows, or concatenate-and-cut (hfx.finetune.packing)
PACKING = ("none", "bfd", "wrapped")
#: PEFT LoraConfig(init_lora_weights=...) values hfx passes on ("default" is PEFT's True; also "pissa_niter_K", K >= 1)
INIT_LORA_WEIGHTS = ("default", "gaussian", "pissa", "pissa_niter_K", "olora", "eva", "loftq", "corda", "orthogonal")
#: inits that rewrite the base weights: the adapter is saved converted, so it applies to the original base
BASE_CHANGING_INITS = ("pissa", "olora", "corda")
#: lora_dropout when none is given; with target_parameters 0, the only value PEFT's LoRA on parameters takes
DEFAULT_LORA_DROPOUT = 0.05
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


#: the FinetuneConfig fields that take one of a fixed set of names (checked by :func:`check_choice`,
#: also by ``hfx finetune --config`` while reading the run file); optim, lr_scheduler,
#: init_lora_weights and metrics_average have their own lists, checked in FinetuneConfig
CHOICE_FIELDS = {
    "method": METHODS,
    "task": TASKS,
    "data_format": DATA_FORMATS,
    "quant_type": QUANT_TYPES,
    "compute_dtype": DTYPES,
    "bf16": BF16_CHOICES,
    "chunked_loss": CHUNKED_LOSS,
    "packing": PACKING,
    "merge_dtype": DTYPES,
    "quant_storage": DTYPES + ("uint8",),
}
#: fields of CHOICE_FIELDS that may be None (the default chosen later)
OPTIONAL_CHOICES = ("merge_dtype", "quant_storage")


def invalid_choice(name: str, value, valid, note: str = "") -> str:
    """The message for ``name=value`` not in ``valid``: the valid values, and the closest one when a typo is likely."""
    text = f"{name}={value!r} is invalid; valid values: {list(valid)}"
    if note:
        text += f" ({note})"
    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1, cutoff=0.6)
    return text + (f"; did you mean {close[0]!r}?" if close else ".")


def check_choice(name: str, value, valid, note: str = ""):
    """``value`` when it is one of ``valid``, else a ValueError naming it, the valid values and the closest one."""
    if isinstance(value, str) and value in valid:
        return value
    raise ValueError(invalid_choice(name, value, valid, note))


def check_field_value(name: str, value) -> None:
    """Refuse a value of a :data:`CHOICE_FIELDS` field (or of init_lora_weights) that names nothing valid.

    Needs no torch or transformers import, so a run file's typo is reported at once.
    """
    if name == "init_lora_weights":
        check_init_lora_weights(value)
    elif name == "packing" and isinstance(value, bool):
        return  # an older run's record; packing_mode reads it
    elif name in CHOICE_FIELDS and not (value is None and name in OPTIONAL_CHOICES):
        check_choice(name, value, CHOICE_FIELDS[name])


def check_init_lora_weights(init) -> str:
    """``init`` when PEFT's LoraConfig takes it from hfx: one of INIT_LORA_WEIGHTS or ``pissa_niter_K`` (K >= 1)."""
    import re

    niter = re.fullmatch(r"pissa_niter_([0-9]+)", init) if isinstance(init, str) else None
    if (init in INIT_LORA_WEIGHTS and init != "pissa_niter_K") or (niter and int(niter.group(1)) > 0):
        return init
    raise ValueError(invalid_choice("init_lora_weights", init, INIT_LORA_WEIGHTS,
                                    "pissa_niter_K with K a positive number of subspace iterations, e.g. pissa_niter_4"))


def packing_mode(value) -> str:
    """The packing mode a value names: an older run file's boolean is True -> "wrapped", False -> "none"."""
    if isinstance(value, bool):
        return "wrapped" if value else "none"
    return check_choice("packing", value, PACKING)


def changes_base(init) -> bool:
    """Whether ``init_lora_weights`` rewrites the base weights (PiSSA, ``pissa_niter_K``, OLoRA, CorDA)."""
    return isinstance(init, str) and init.split("_niter_")[0] in BASE_CHANGING_INITS


def name_list(name: str, value, example: str, noun: str = "module"):
    """A comma-separated string as the list of its non-empty names (lists and None unchanged); naming nothing is refused."""
    if not isinstance(value, str):
        return value
    names = [part.strip() for part in value.split(",") if part.strip()]
    if not names:
        raise ValueError(f"{name}={value!r} names no {noun}; give comma-separated names, e.g. {example!r}, or leave it out.")
    return names


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
    packing: str = "none"  # "bfd" | "wrapped"; True / False (older run files) read as "wrapped" / "none"
    max_train_samples: int | None = None

    # LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float | None = None  # None: DEFAULT_LORA_DROPOUT, or 0 with target_parameters
    target_modules: list[str] | None = None
    use_dora: bool = False  # PEFT's DoRA: a learned magnitude per output feature on top of the LoRA direction
    use_rslora: bool = False  # scaling lora_alpha / sqrt(r) instead of lora_alpha / r
    init_lora_weights: str = "default"  # one of INIT_LORA_WEIGHTS
    target_parameters: list[str] | None = None  # nn.Parameter names for LoRA, e.g. MoE experts.down_proj
    modules_to_save: list[str] | None = None  # modules trained in full and saved with the adapter

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
    chunked_loss: str = "auto"  # one of CHUNKED_LOSS
    bf16: str = "auto"
    seed: int = 42

    # evaluation, checkpoints, logging
    eval_steps: int | None = None
    early_stopping_patience: int | None = None
    metrics: list[str] | None = None  # logged at each evaluation, e.g. ["accuracy", "f1"] (hfx.finetune.metrics)
    metrics_average: str = "auto"  # f1/precision/recall over classes: auto (binary for 2 labels, else macro), macro, micro, weighted
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
        for name in CHOICE_FIELDS:
            if name != "packing":  # read below by packing_mode (it also takes an older run file's boolean)
                check_field_value(name, getattr(self, name))
        if self.optim is not None:
            from transformers.training_args import OptimizerNames

            check_choice("optim", self.optim, [o.value for o in OptimizerNames])
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
        check_choice("lr_scheduler", self.lr_scheduler, scheduler_names())
        self.target_parameters = name_list("target_parameters", self.target_parameters, "experts.down_proj",
                                           noun="parameter")
        if self.lora_dropout is None:
            self.lora_dropout = 0.0 if self.target_parameters else DEFAULT_LORA_DROPOUT
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
        given_packing = self.packing
        self.packing = packing_mode(self.packing)
        if self.task == "seq2seq" and self.packing != "none":
            raise ValueError(f"packing={given_packing!r} is invalid with task='seq2seq'; valid values: 'none' (each "
                             "source/target pair is its own example, padded per batch).")
        if self.task == "seq2seq" and self.data_format not in ("auto", "source-target", "prompt-completion"):
            raise ValueError(f"data_format={self.data_format!r} is invalid with task='seq2seq'; valid values: "
                             "['auto', 'source-target', 'prompt-completion'] (records with an input and an output text).")
        if self.task not in ("auto", "seq2seq") and self.data_format == "source-target":
            raise ValueError(f"data_format='source-target' is invalid with task={self.task!r}; valid values: "
                             "task='seq2seq' or 'auto' (an encoder-decoder model).")
        if self.chunked_loss == "on" and self.task in ("seq-cls", "seq2seq"):
            raise ValueError(f"chunked_loss='on' is invalid with task={self.task!r}: it is a causal-LM loss; valid "
                             "values: ['auto', 'off'].")
        if self.merge and self.method == "full":
            raise ValueError("merge applies to adapter methods (lora, qlora, int8); a full fine-tune is already plain.")
        self._check_extra_training_args()
        self.target_modules = name_list("target_modules", self.target_modules, "q_proj,v_proj")
        self.modules_to_save = name_list("modules_to_save", self.modules_to_save, "lm_head")
        self._check_lora_variants()
        self._check_metrics()

    def _check_metrics(self) -> None:
        """Known metric names (for the task, when it is given), evaluation data, and a usable average."""
        from .metrics import AVERAGES, check_metric_names, parse_metrics

        self.metrics = parse_metrics(self.metrics)
        check_metric_names(self.metrics, self.task)
        check_choice("metrics_average", self.metrics_average, AVERAGES)
        if self.metrics and not self.has_eval:
            raise ValueError(f"metrics={self.metrics} need evaluation data: set eval_data or eval_fraction.")
        if self.metrics and "exact_match" in self.metrics and self.packing == "wrapped":
            raise ValueError("metrics: exact_match is invalid with packing='wrapped', which cuts evaluation examples "
                             "across rows; valid packing values with it: ['none', 'bfd'].")

    def _check_lora_variants(self) -> None:
        """The PEFT LoRA variants: valid names, and only combinations PEFT (and hfx's saving) handle."""
        init = check_init_lora_weights(self.init_lora_weights)
        variant = [f"{name}={getattr(self, name)!r}" for name, default in (
            ("use_dora", False), ("use_rslora", False), ("init_lora_weights", "default"),
            ("target_parameters", None), ("modules_to_save", None)) if getattr(self, name) != default]
        if variant and not self.uses_adapter:
            one = len(variant) == 1
            raise ValueError(f"{', '.join(variant)} {'needs' if one else 'need'} an adapter method; method='full' "
                             f"trains every weight. Valid methods for {'it' if one else 'them'}: "
                             "['lora', 'qlora', 'int8'].")
        base_changing = changes_base(init)
        if base_changing and self.quantized:
            reason = ("the residual base would be quantised again and the saved adapter no longer applies to the "
                      "original base" if init == "olora" else "PEFT decomposes a full-precision weight")
            raise ValueError(f"init_lora_weights={init!r} is invalid with method={self.method!r}: {reason}; valid "
                             "methods for it: ['lora'].")
        if base_changing and self.use_dora:
            raise ValueError(f"use_dora=True is invalid with init_lora_weights={init!r}: converting the adapter back to "
                             "the original base keeps only the LoRA matrices, not DoRA's magnitudes; valid "
                             "init_lora_weights with DoRA: ['default', 'gaussian', 'eva', 'orthogonal'].")
        if self.use_dora and self.method == "int8":
            import torch

            if not torch.cuda.is_available():  # measured: bitsandbytes 0.50.2, PEFT 0.21.2, first training step
                raise ValueError("use_dora=True is invalid with method='int8' on the CPU: bitsandbytes' LLM.int8 "
                                 "layer loses its scales once DoRA reads the weight; valid methods for DoRA here: "
                                 "['lora', 'qlora'].")
        if init == "orthogonal" and self.lora_r % 2:
            raise ValueError(f"init_lora_weights='orthogonal' needs an even lora_r, got {self.lora_r}.")
        if self.target_parameters:
            if self.use_dora:
                raise ValueError("use_dora=True is invalid with target_parameters: PEFT's LoRA on parameters has no "
                                 "DoRA; valid values: use_dora=False, or leave target_parameters out.")
            if self.lora_dropout:
                raise ValueError(f"lora_dropout={self.lora_dropout} is invalid with target_parameters: PEFT's LoRA on "
                                 "parameters has no dropout; valid values: lora_dropout=0 (the default with "
                                 "target_parameters: leave lora_dropout out).")
            if init not in ("default", "gaussian"):
                raise ValueError(f"init_lora_weights={init!r} is invalid with target_parameters; valid values: "
                                 "['default', 'gaussian'].")
        if init == "loftq":
            if self.method != "lora":
                raise ValueError(f"init_lora_weights='loftq' is invalid with method={self.method!r}: LoftQ quantises an "
                                 "unquantised base itself; valid methods for it: ['lora'].")
            if self.merge:
                raise ValueError("merge=True is invalid with init_lora_weights='loftq': the adapter is trained against "
                                 "the LoftQ-quantised base, so merging it into the original base would not give the "
                                 "trained model; valid values: merge=False.")
            import torch

            if not torch.cuda.is_available():
                raise ValueError("init_lora_weights='loftq' needs a CUDA GPU: PEFT's LoftQ quantisation runs on CUDA "
                                 "only; valid values on this machine: ['default', 'gaussian', 'pissa', "
                                 "'pissa_niter_K', 'olora', 'eva', 'corda', 'orthogonal'].")
            import importlib.util

            if importlib.util.find_spec("bitsandbytes") is None:
                raise ValueError("init_lora_weights='loftq' needs bitsandbytes (PEFT quantises the base with it): "
                                 "pip install 'bitsandbytes>=0.50.2'.")

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
