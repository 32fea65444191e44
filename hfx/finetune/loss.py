"""Causal-LM loss on labelled positions only: no ``(tokens, vocab)`` logits tensor for the whole batch.

The plain loss (``model(labels=...)``, transformers' ``ForCausalLMLoss``) projects every position to the
vocabulary, upcasts the logits to fp32 and keeps them, their log-softmax and their gradient alive: at a
128k vocabulary and 4k tokens that is several GiB, most of it for prompt and padding positions whose label
is -100. Here the model's forward runs as usual up to its output head; the head is intercepted, only the
hidden states whose shifted label is not -100 are kept, and they go through the head in chunks. Each chunk's
cross-entropy and its gradients (softmax minus one-hot) are computed at once, so at most one chunk of logits
exists at any time and the backward pass needs no second projection. The sum is divided exactly as
``ForCausalLMLoss`` divides it (by ``num_items_in_batch`` when Trainer passes it, else by the labelled count),
and hfx's auxiliary loss (MoE balance) is added as ``HfxForCausalLM`` adds it.

It is used only where it equals the plain loss: architectures whose head is ``lm_head(hidden)`` with nothing
after it (:data:`EXACT_ARCHITECTURES`), no setting that rescales or caps the logits, a plain ``nn.Linear``
head (or PEFT's trained copy of one, ``modules_to_save``), one process or DDP (not FSDP / DeepSpeed, which
shard the head). Elsewhere the plain loss runs, and the
log says why.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn
from transformers import Trainer

from .data import IGNORE_INDEX

logger = logging.getLogger("hfx.finetune")

#: model_type -> whether its causal-LM forward adds ``outputs.aux_loss`` to the head's loss. Each of these
#: computes ``logits = lm_head(hidden)`` and ``ForCausalLMLoss(logits, labels)``, nothing else.
EXACT_ARCHITECTURES = {"hfx": True, "llama": False, "mistral": False, "qwen2": False, "qwen3": False}
#: config settings that change the logits after the head (none of EXACT_ARCHITECTURES has them today)
LOGIT_CHANGING_SETTINGS = ("final_logit_softcapping", "logit_softcapping", "logit_scale", "logits_scaling")
#: about 128 MiB of fp32 logits per chunk: 256 rows at a 128k vocabulary, 1024 at 32k
CHUNK_ELEMENTS = 2**25
#: TrainingArguments under which the head is sharded or the loss replaced: the plain loss runs
PLAIN_LOSS_TRAINING_ARGS = ("fsdp", "fsdp_config", "deepspeed", "label_smoothing_factor")


def config_blocker(task: str, model_config) -> str | None:
    """Why the chunked loss would not equal the plain one for this task and model config, or None."""
    if task != "causal-lm":
        return f"task={task!r} (the chunked loss is for causal-lm)"
    model_type = getattr(model_config, "model_type", None)
    if model_type not in EXACT_ARCHITECTURES:
        return (f"model_type={model_type!r} is not one whose head is known to be lm_head(hidden) alone; "
                f"known: {sorted(EXACT_ARCHITECTURES)}")
    for name in LOGIT_CHANGING_SETTINGS:
        value = getattr(model_config, name, None)
        if value not in (None, False, 0, 1, 1.0):
            return f"the model config sets {name}={value!r}, which changes the logits after the head"
    if getattr(model_config, "auto_map", None) and "AutoModelForCausalLM" in model_config.auto_map:
        return "the model's causal-LM class comes from remote code"
    return None


#: the launcher variables (``accelerate launch``) that request a sharding engine, and the engine
SHARDING_ENGINES = (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"))
#: the values accelerate's ``str_to_bool`` reads as true (case-insensitive)
TRUE_VALUES = ("1", "y", "yes", "t", "true", "on")


def requested_sharding_engine() -> tuple[str, str] | None:
    """``(variable, engine)`` of the first sharding engine the launcher's environment requests, or None.

    The one reading of these variables in hfx.finetune (the chunked loss and the launch checks use it),
    with accelerate's own rule for what is true.
    """
    for variable, engine in SHARDING_ENGINES:
        if os.environ.get(variable, "").strip().lower() in TRUE_VALUES:
            return variable, engine
    return None


def run_blocker(config) -> str | None:
    """Why the run's setup (sharded engines, label smoothing) rules the chunked loss out, or None."""
    for name in PLAIN_LOSS_TRAINING_ARGS:
        if config.extra_training_args.get(name):
            return f"extra_training_args sets {name}"
    requested = requested_sharding_engine()
    if requested:
        return f"{requested[1]} shards the output head ({requested[0]}={os.environ[requested[0]]})"
    return None


def skeleton_blocker(config, skeleton) -> str | None:
    """Why the run's adapter settings will leave the output head something other than a plain ``nn.Linear``,
    decided from the settings and the model's module tree (``skeleton``, no weights), or None.

    A LoRA layer on the head (``target_modules`` naming it; ``all-linear`` leaves the head out) or a
    parameter adapter on its weight (``target_parameters``) replaces the head's forward; a checkpoint
    quantised with its head replaces the head by a quantised layer. ``modules_to_save`` may name the
    head: the trained copy is a plain ``nn.Linear``.
    """
    from .model import _ends_with, _matches

    if not config.uses_adapter:
        return None
    head = skeleton.get_output_embeddings() if hasattr(skeleton, "get_output_embeddings") else None
    name = next((n for n, module in skeleton.named_modules() if head is not None and module is head), None)
    if name is None:
        return None  # no head found: head_blocker decides on the loaded model
    matched = [t for t in config.target_modules or [] if _matches(t, name)]
    if matched:
        return f"target_modules {matched} put a LoRA layer on the output head {name!r}"
    matched = [t for t in config.target_parameters or [] if _ends_with(t, f"{name}.weight")]
    if matched:
        return f"target_parameters {matched} put a LoRA adapter on the output head's weight {name!r}.weight"
    quantization = getattr(skeleton.config, "quantization_config", None)
    if quantization is not None:
        values = quantization if isinstance(quantization, dict) else vars(quantization)
        kept = values.get("llm_int8_skip_modules") or values.get("modules_to_not_convert")
        if kept is not None and not any(_ends_with(k, name) or k == name.rsplit(".", 1)[-1] for k in kept):
            return f"the checkpoint is quantised with its output head {name!r} (not in its skip modules {kept})"
    return None


def head_blocker(model) -> str | None:
    """Why this loaded (possibly PEFT-wrapped) model's head cannot be chunked, or None."""
    head = output_head(model)
    linear = effective_linear(head)
    if linear is None:
        return f"the output head is a {type(head).__name__}, not a plain nn.Linear"
    if linear.weight.ndim != 2 or linear.weight.is_meta:
        return "the output head's weight is not a materialised matrix"
    return None


def effective_linear(head) -> nn.Linear | None:
    """The plain ``nn.Linear`` that ``head(hidden)`` applies, or None: the head itself, or the copy PEFT's
    ``modules_to_save`` trains (the original while adapters are disabled); a LoRA or quantised layer is None."""
    if type(head) is nn.Linear:
        return head
    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:
        return None
    if not isinstance(head, ModulesToSaveWrapper):
        return None
    active = head.active_adapters
    if head.disable_adapters or not active or any(name not in head._adapters for name in active):
        inner = head.original_module  # what the wrapper's forward runs then
    else:
        inner = head.modules_to_save[active[0]]
    return inner if type(inner) is nn.Linear else None


def check_chunked_loss(config, task: str, model_config, skeleton=None) -> None:
    """``chunked_loss='on'`` where it would not be exact: refused before any weight is loaded.

    ``skeleton``: the model's module tree on the meta device; built here when needed and not given.
    """
    if config.chunked_loss != "on":
        return
    why = config_blocker(task, model_config) or run_blocker(config)
    if why is None and config.uses_adapter:
        if skeleton is None:
            from .model import build_skeleton, model_class_for

            skeleton = build_skeleton(model_class_for(task), model_config)
        why = skeleton_blocker(config, skeleton)
    if why:
        raise ValueError(f"chunked_loss='on' is invalid here: {why}; valid values: ['auto', 'off'] "
                         "('auto' uses the plain loss where the chunked one would differ).")


def use_chunked_loss(config, task: str, model) -> bool:
    """Whether this run trains with the chunked loss; 'auto' logs why not when it does not."""
    if config.chunked_loss == "off":
        return False
    why = config_blocker(task, model.config) or run_blocker(config) or head_blocker(model)
    if why is None:
        return True
    if config.chunked_loss == "on":
        raise ValueError(f"chunked_loss='on' is invalid here: {why}; valid values: ['auto', 'off'].")
    logger.info("chunked_loss=auto: using the plain loss because %s.", why)
    return False


def output_head(model) -> nn.Module | None:
    """The module that maps hidden states to logits, through PEFT and DDP wrappers."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    if hasattr(inner, "get_base_model"):  # PeftModel
        inner = inner.get_base_model()
    return inner.get_output_embeddings()


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, chunk by chunk.

    The forward computes each chunk's gradients too and keeps only those (hidden-sized and weight-sized), so
    neither pass holds more than one chunk of logits and the head's matmul is not repeated in backward.
    Only the gradients autograd asks for are computed: a frozen head (LoRA without ``lm_head`` in
    ``modules_to_save``) gets no weight gradient, so no (vocab, hidden) fp32 buffer is kept then.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows):
        loss, grads = _chunked_sum(hidden, weight, bias, targets, chunk_rows, ctx.needs_input_grad[:3])
        ctx.grads = grads
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        # scaled in place (the kept gradients are used once): no second weight-sized fp32 copy
        scaled = tuple(None if pair is None else pair[0].mul_(grad_loss).to(pair[1]) for pair in ctx.grads)
        ctx.grads = None
        return (*scaled, None, None)


def _chunked_sum(hidden, weight, bias, targets, chunk_rows, wanted=(False, False, False)):
    """The fp32 summed loss and, for each of hidden / weight / bias that ``wanted`` names, (gradient, dtype)."""
    want_hidden, want_weight, want_bias = wanted
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
    grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = hidden[start:start + chunk_rows]
        target = targets[start:start + chunk_rows]
        logits = nn.functional.linear(rows, weight, bias).float()  # as ForCausalLMLoss upcasts
        log_probs = torch.log_softmax(logits, dim=-1)  # the plain loss's kernel, so each row rounds alike
        del logits
        total -= log_probs.gather(1, target[:, None]).sum()
        if not (want_hidden or want_weight or want_bias):
            continue
        grad_logits = log_probs.exp_()  # softmax, in place
        grad_logits[torch.arange(len(target), device=target.device), target] -= 1.0
        if want_bias:
            grad_bias += grad_logits.sum(0)
        grad_logits = grad_logits.to(weight.dtype)  # where autograd would cast back from the fp32 upcast
        if want_hidden:
            grad_hidden[start:start + chunk_rows] = grad_logits @ weight
        if want_weight:
            grad_weight.addmm_(grad_logits.t().float(), rows.float())
    grads = ((grad_hidden, hidden.dtype), (grad_weight, weight.dtype),
             (grad_bias, None if bias is None else bias.dtype))
    return total, tuple(None if g is None else (g, dtype) for g, dtype in grads)


def chunk_rows_for(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))


def linear_cross_entropy_sum(hidden, weight, bias, targets, chunk_rows: int | None = None) -> torch.Tensor:
    """Summed fp32 cross-entropy of the rows of ``hidden`` (n, H) through a linear head, in chunks."""
    chunk_rows = chunk_rows or chunk_rows_for(weight.shape[0])
    tracked = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if tracked:
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows)
    return _chunked_sum(hidden, weight, bias, targets, chunk_rows)[0]


def shifted_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Position t's target is token t+1, the last position has none: as ForCausalLMLoss shifts."""
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def labelled_loss(hidden, head: nn.Linear, shift_labels, num_items_in_batch=None, chunk_rows=None) -> torch.Tensor:
    """``ForCausalLMLoss(head(hidden), ...)`` computed on the labelled positions only.

    ``hidden`` (..., H) and ``shift_labels`` (...) are aligned (position t against its next token). The sum is
    divided by ``num_items_in_batch`` when given (Trainer's count over the accumulated batch and processes),
    else by the number of labelled positions, which is 0/0 (nan) when there is none, as in the plain loss.
    """
    keep = shift_labels.reshape(-1).to(hidden.device) != IGNORE_INDEX
    rows = hidden.reshape(-1, hidden.shape[-1])[keep]
    targets = shift_labels.reshape(-1).to(hidden.device)[keep]
    total = linear_cross_entropy_sum(rows, head.weight, head.bias, targets, chunk_rows)
    if num_items_in_batch is None:
        return total / keep.sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class _HeadInterceptor:
    """While active, the head's forward computes the chunked loss from its input and returns empty logits."""

    def __init__(self, head: nn.Module, shift_labels, num_items_in_batch, chunk_rows=None):
        self.head, self.shift_labels = head, shift_labels
        self.num_items_in_batch, self.chunk_rows = num_items_in_batch, chunk_rows
        self.loss = None

    def __enter__(self):
        self._own_forward = self.head.__dict__.get("forward")  # an accelerate hook may have set one
        self.head.forward = self._forward
        return self

    def __exit__(self, *exc):
        if self._own_forward is None:
            del self.head.forward
        else:
            self.head.forward = self._own_forward

    def _forward(self, hidden, *args, **kwargs):
        linear = effective_linear(self.head)
        if args or kwargs or linear is None:
            raise RuntimeError("chunked loss: the output head was called with more than hidden states, or is no "
                               "longer a plain linear layer; use chunked_loss='off'.")
        if self.loss is not None:
            raise RuntimeError("chunked loss: the output head ran twice in one forward; use chunked_loss='off'.")
        if hidden.shape[:-1] != self.shift_labels.shape:
            raise RuntimeError(f"chunked loss: the head got hidden states of shape {tuple(hidden.shape)} for labels "
                               f"of shape {tuple(self.shift_labels.shape)}; use chunked_loss='off'.")
        self.loss = labelled_loss(hidden, linear, self.shift_labels, self.num_items_in_batch, self.chunk_rows)
        return hidden.new_zeros((*hidden.shape[:-1], 0))


def chunked_forward(model, inputs: dict, adds_aux_loss: bool, chunk_rows: int | None = None):
    """``model(**inputs)`` (``inputs`` holding ``labels``) with the loss computed by :func:`labelled_loss`.

    The whole forward still runs through ``model`` (DDP and PEFT wrappers included); only the head's call is
    replaced. The outputs' ``logits`` are empty; ``loss`` is the chunked loss plus ``aux_loss`` where the
    architecture adds it.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    shift = inputs.get("shift_labels")
    shift = shifted_labels(labels) if shift is None else shift
    with _HeadInterceptor(output_head(model), shift, inputs.get("num_items_in_batch"), chunk_rows) as caught:
        outputs = model(**inputs)
    if caught.loss is None:
        raise RuntimeError("chunked loss: the model's forward never called its output head; use chunked_loss='off'.")
    loss = caught.loss
    aux = getattr(outputs, "aux_loss", None) if adds_aux_loss else None
    if aux is not None:
        loss = loss + aux.to(loss.dtype)
    outputs["loss"] = loss
    return outputs


class _ChunkedCall:
    """Stands in for the model in Trainer.compute_loss, so Trainer's own scaling (gradient accumulation,
    processes) applies to the chunked loss exactly as to the plain one."""

    def __init__(self, model, adds_aux_loss: bool):
        self.model, self.adds_aux_loss = model, adds_aux_loss

    def __call__(self, **inputs):
        return chunked_forward(self.model, inputs, self.adds_aux_loss)


class ChunkedLossTrainer(Trainer):
    """Trainer whose causal-LM loss is :func:`chunked_forward`'s; evaluation that needs logits (metrics) and
    anything Trainer computes itself (label smoothing, a custom loss function) use the plain path."""

    loss_kind = "chunked"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loss_only = False
        model_type = getattr(self.accelerator.unwrap_model(self.model).config, "model_type", None)
        self._adds_aux_loss = EXACT_ARCHITECTURES.get(model_type, False)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            logger.info("chunked loss: FSDP / DeepSpeed shard the output head; using the plain loss.")
            self.loss_kind = "plain"

    def _chunked_applies(self, inputs, return_outputs: bool) -> bool:
        return (self.loss_kind == "chunked" and "labels" in inputs and self.label_smoother is None
                and self.compute_loss_func is None and (not return_outputs or self._loss_only))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._chunked_applies(inputs, return_outputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return super().compute_loss(_ChunkedCall(model, self._adds_aux_loss), inputs, return_outputs,
                                    num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self._loss_only = prediction_loss_only  # the eval loss alone: no logits to return
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        finally:
            self._loss_only = False


def trainer_class_for(config, task: str, model):
    """ChunkedLossTrainer where the chunked loss applies (see :func:`use_chunked_loss`), else Trainer."""
    return ChunkedLossTrainer if use_chunked_loss(config, task, model) else Trainer
