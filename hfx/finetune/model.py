"""Model side of a run: task detection, bitsandbytes checks, loading (optionally quantised), LoRA.

Quantisation goes through transformers' ``BitsAndBytesConfig`` on ``from_pretrained``: only
modules whose type is exactly ``nn.Linear`` are replaced, which in hfx means every block linear
(q/k/v/o and up/down projections) and never the output head. The head of a classifier is kept
out of quantisation because LoRA trains it in full (PEFT's ``modules_to_save``).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import tempfile
import weakref

import torch
from torch import nn

from ..checkpoint_check import is_seq2seq_checkpoint
from ..peft_integration import HFX_LORA_TARGET_MODULES, register_peft_mappings  # noqa: F401  (re-exported)
from ..quantization import pin_bnb_cpu_path
from .config import FinetuneConfig, changes_base

CLASSIFIER_HEADS = ("score", "classifier")
#: rows of the training split EVA's and CorDA's calibration forward passes read (the first ones): examples,
#: or with packing packed rows (bfd puts the longest examples first; up to this many x max_length tokens)
CALIBRATION_EXAMPLES = 128
INITIAL_ADAPTER = "hfx_initial"  # the adapter PEFT's weight conversion subtracts (a sub-folder of a temporary folder)


class BackendError(RuntimeError):
    """The requested method needs a library or hardware feature that is not available here."""


class TargetModulesError(ValueError):
    """LoRA target module names that match no linear layer of the model."""


def resolve_task(config: FinetuneConfig, model_config) -> str:
    """``seq-cls`` for a checkpoint saved as a sequence classifier, ``seq2seq`` for an encoder-decoder,
    otherwise ``causal-lm``."""
    if config.task != "auto":
        return config.task
    architectures = getattr(model_config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "seq-cls"
    return "seq2seq" if getattr(model_config, "is_encoder_decoder", False) else "causal-lm"


def _kind(model_config) -> str:
    """How the checkpoint is built, in words, for the errors below: its saved head, else its config."""
    from transformers import AutoModelForCausalLM

    if getattr(model_config, "is_encoder_decoder", False):
        return "encoder-decoder"
    architectures = getattr(model_config, "architectures", None) or []
    if getattr(model_config, "model_type", None) == "hfx":
        causal = bool(getattr(model_config, "is_decoder", False))
    elif architectures:
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    else:
        causal = type(model_config) in AutoModelForCausalLM._model_mapping
    return "decoder-only" if causal else "encoder-only"


def check_task(config: FinetuneConfig, task: str, model_config) -> None:
    """Refuse a task the checkpoint's architecture cannot train, before data or weights are read.

    ``seq2seq`` needs an encoder-decoder (its encoder reads the source, its decoder the target);
    ``causal-lm`` on an encoder-decoder would load its decoder alone and drop the encoder.
    """
    model_type = getattr(model_config, "model_type", None)
    architectures = getattr(model_config, "architectures", None) or []
    kind = _kind(model_config)
    what = f"--model {config.model} is a {kind} {model_type!r} model ({architectures or 'no architectures'})"
    if task == "seq2seq" and not is_seq2seq_checkpoint(model_config):
        valid = ["causal-lm", "seq-cls"] if kind == "decoder-only" else ["seq-cls"]
        raise ValueError(
            f"task='seq2seq' is invalid for this model: {what}; valid values for it: {valid}. "
            "task='seq2seq' needs an encoder-decoder checkpoint (AutoModelForSeq2SeqLM: T5, BART, hfx "
            "HfxForConditionalGeneration)."
        )
    if task == "causal-lm" and getattr(model_config, "is_encoder_decoder", False):
        raise ValueError(
            f"task='causal-lm' is invalid for this model: {what}, and a causal-LM fine-tune would train its decoder "
            "alone, without the encoder; valid values for it: ['seq2seq'] (or 'auto')."
        )


def model_class_for(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    if task == "seq2seq":
        return AutoModelForSeq2SeqLM
    return AutoModelForSequenceClassification if task == "seq-cls" else AutoModelForCausalLM


def check_bitsandbytes(config: FinetuneConfig) -> None:
    """Quantise a small tensor the way the run will, so a missing or broken install fails first."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BackendError(f"method={config.method!r} needs bitsandbytes: pip install 'bitsandbytes>=0.50.2'.")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import bitsandbytes as bnb

        sample = torch.randn(64, 64, device=device)
        if config.method == "qlora":
            packed, state = bnb.functional.quantize_4bit(
                sample, quant_type=config.quant_type, compress_statistics=config.double_quant
            )
            bnb.functional.dequantize_4bit(packed, state)
        else:
            layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False).to(device)
            layer(sample.to(torch.float16 if device == "cuda" else torch.float32))
    except Exception as exc:
        raise BackendError(
            f"method={config.method!r}: bitsandbytes {getattr(bnb, '__version__', '?')} cannot run on {device}: {exc}"
        ) from exc


def quantization_config(config: FinetuneConfig, task: str):
    from transformers import BitsAndBytesConfig

    skip = list(CLASSIFIER_HEADS) if task == "seq-cls" else None
    if config.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quant_type,
        bnb_4bit_use_double_quant=config.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, config.compute_dtype),
        # FSDP flattens one dtype per unit: the packed 4-bit weights must be stored like the rest.
        bnb_4bit_quant_storage=getattr(torch, config.quant_storage or "uint8"),
        llm_int8_skip_modules=skip,
    )


def linear_module_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def head_module_names(model: nn.Module) -> set[str]:
    names = set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if (output is not None and module is output) or name in CLASSIFIER_HEADS:
            names.add(name)
    return names


def _ends_with(target: str, name: str) -> bool:
    """``name`` is ``target`` or ends in it at a dot: ``lm_head`` matches ``lm_head`` and ``base.lm_head``."""
    return name == target or name.endswith("." + target)


def _matches(target: str, name: str) -> bool:
    """A LoRA target module: a name suffix (as :func:`_ends_with`) or a regular expression over the full name."""
    return _ends_with(target, name) or re.fullmatch(target, name) is not None


def check_target_modules(config: FinetuneConfig, skeleton: nn.Module) -> None:
    """Every requested target (linear layers, parameters, modules to save) must exist; the error lists the ones that do."""
    _check_target_parameters(config, skeleton)
    _check_modules_to_save(config, skeleton)
    if not config.target_modules:
        return
    linears = linear_module_names(skeleton)
    unmatched = [t for t in config.target_modules if not any(_matches(t, name) for name in linears)]
    if unmatched:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name in linears})
        shown = linears if len(linears) <= 12 else linears[:12] + [f"... {len(linears) - 12} more"]
        raise TargetModulesError(
            f"target module(s) {unmatched} match no linear layer of {config.model}. Linear layer names: "
            f"{suffixes} (full names: {shown})."
        )


def _check_target_parameters(config: FinetuneConfig, skeleton: nn.Module) -> None:
    if not config.target_parameters:
        return
    names = [name for name, _ in skeleton.named_parameters()]
    unmatched = [t for t in config.target_parameters if not any(_ends_with(t, n) for n in names)]
    if unmatched:
        # the candidates: parameters of no nn.Linear / nn.Embedding (which target_modules reaches already)
        owned = {f"{m}.{p}" if m else p for m, module in skeleton.named_modules()
                 if isinstance(module, (nn.Linear, nn.Embedding)) for p, _ in module.named_parameters(recurse=False)}
        free = sorted({".".join(n.split(".")[-2:]) for n, param in skeleton.named_parameters()
                       if n not in owned and param.dim() >= 2})
        raise TargetModulesError(
            f"target parameter(s) {unmatched} match no parameter of {config.model}. Parameters outside linear and "
            f"embedding layers: {free or 'none'}" + (" (an ffn_type='moe' hfx model has experts.up_proj / "
            "experts.gate_up_proj and experts.down_proj)." if not free else ".")
        )


def _check_modules_to_save(config: FinetuneConfig, skeleton: nn.Module) -> None:
    if not config.modules_to_save:
        return
    names = [name for name, _ in skeleton.named_modules() if name]
    unmatched = [t for t in config.modules_to_save if not any(_ends_with(t, n) for n in names)]
    if unmatched:
        top = sorted({name.rsplit(".", 1)[-1] for name in names if not name.rsplit(".", 1)[-1].isdigit()})
        raise TargetModulesError(f"modules_to_save {unmatched} match no module of {config.model}. Module names: {top}.")
    if config.quantized:  # every block linear is stored in 4 / 8 bit: nothing there to train in full
        heads = head_module_names(skeleton)
        quantised = [t for t in config.modules_to_save if any(_matches(t, name) for name in linear_module_names(skeleton)
                                                               if name not in heads)]
        if quantised:
            raise TargetModulesError(f"modules_to_save {quantised} are linear layers that method={config.method!r} "
                                     "quantises, so they cannot be trained in full; valid: the output head, norms, "
                                     "embeddings, or method='lora'.")
    overlap = [t for t in config.modules_to_save if t in (config.target_modules or [])]
    if overlap:
        raise TargetModulesError(f"modules {overlap} are both in target_modules and in modules_to_save; a module is "
                                 "either adapted by LoRA or trained in full, so name it in one of them.")


def build_skeleton(model_class, model_config) -> nn.Module:
    """The model's module tree on the meta device: names and types without allocating weights."""
    with torch.device("meta"):
        return model_class.from_config(model_config)


def load_model(config: FinetuneConfig, task: str, model_config, gradient_checkpointing: bool) -> nn.Module:
    """The model to train; a convert-long checkpoint with its long backend and global token ids (so
    the saved model, or the merged one, loads with that backend again)."""
    from ..long_context import long_load_kwargs, prepare_long_model

    kwargs = {"config": model_config, "trust_remote_code": config.trust_remote_code, "dtype": torch.float32,
              **long_load_kwargs(model_config, where=f"--model {config.model}")}
    if config.quantized:
        kwargs["quantization_config"] = quantization_config(config, task)
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": _local_device()}
    model = prepare_long_model(model_class_for(task).from_pretrained(config.model, **kwargs))
    if task == "causal-lm" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = model.config.eos_token_id
    if config.quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        # Training must never switch to bitsandbytes' fused bf16 CPU kernel (see hfx.quantization).
        pin_bnb_cpu_path(model, for_training=True)
    return model


def _local_device() -> int:
    import os

    return int(os.environ.get("LOCAL_RANK", 0))


def lora_config(config: FinetuneConfig, task: str):
    from peft import EvaConfig, LoftQConfig, LoraConfig, TaskType
    from peft.tuners.lora.config import CordaConfig

    init = config.init_lora_weights
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules or "all-linear",
        target_parameters=config.target_parameters,
        modules_to_save=config.modules_to_save,
        use_dora=config.use_dora,
        use_rslora=config.use_rslora,
        init_lora_weights=True if init == "default" else init,
        # the label mask keeps EVA's statistics to the positions the loss sees; labels of seq-cls and
        # seq2seq do not line up with input_ids, so there every real input token counts
        eva_config=EvaConfig(use_label_mask=task == "causal-lm") if init == "eva" else None,
        corda_config=CordaConfig() if init == "corda" else None,
        loftq_config=LoftQConfig(loftq_bits=4) if init == "loftq" else {},
        task_type={"seq-cls": TaskType.SEQ_CLS, "seq2seq": TaskType.SEQ_2_SEQ_LM}.get(task, TaskType.CAUSAL_LM),
    )


def calibration_batches(model: nn.Module, dataset, collator, batch_size: int) -> list[dict]:
    """The first :data:`CALIBRATION_EXAMPLES` rows of ``dataset`` (examples, or packed rows) in batches, on the model's device."""
    from torch.utils.data import DataLoader

    subset = dataset.select(range(min(len(dataset), CALIBRATION_EXAMPLES)))
    device = next(model.parameters()).device
    loader = DataLoader(subset, batch_size=batch_size, collate_fn=collator, shuffle=False)
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()} for batch in loader]


def add_lora(model: nn.Module, config: FinetuneConfig, task: str, calibration=None) -> nn.Module:
    """Wrap ``model`` in a PeftModel; every base weight is frozen, so hfx BatchNorm uses and keeps its running stats.

    ``calibration`` (a callable from a batch size to batches, see :func:`calibration_batches`) feeds the data-driven
    inits: CorDA's covariance before the adapter exists, EVA's SVD of layer inputs after. PiSSA / OLoRA /
    CorDA move part of each base weight into the adapter; the initial adapter is kept so that
    :func:`save_trained` can convert the trained one back to the original base.
    """
    from peft import get_peft_model

    register_peft_mappings()
    peft_config = lora_config(config, task)
    init = config.init_lora_weights
    if init in ("eva", "corda") and calibration is None:
        raise ValueError(f"init_lora_weights={init!r} needs calibration data (the training examples).")
    was_training = model.training
    if init == "corda":
        from peft.tuners.lora.corda import preprocess_corda

        if config.target_modules is None:  # preprocess_corda matches names itself; it knows no "all-linear"
            heads = head_module_names(model)
            peft_config.target_modules = {name.rsplit(".", 1)[-1] for name in linear_module_names(model)
                                          if name not in heads}
        batches = calibration(1)  # CorDA's hooks take one unpadded sequence per forward
        model.eval()
        with torch.no_grad():
            preprocess_corda(model, peft_config, run_model=lambda: [model(**batch) for batch in batches])
    peft_model = get_peft_model(model, peft_config)
    if init == "eva":
        from peft import initialize_lora_eva_weights

        peft_model.eval()
        initialize_lora_eva_weights(peft_model, dataloader=calibration(config.batch_size),
                                    show_progress_bar=False)
    peft_model.train(was_training)
    if changes_base(init):
        # PEFT's conversion recipe: the initial adapter is saved as plain LoRA (init True), and so are
        # the checkpoints, so that loading one never decomposes the (already residual) base again
        peft_model.peft_config["default"].init_lora_weights = True
        folder = tempfile.mkdtemp(prefix="hfx-initial-adapter-")
        weakref.finalize(peft_model, shutil.rmtree, folder, True)
        initial = f"{folder}/{INITIAL_ADAPTER}"
        peft_model.save_pretrained(initial)
        peft_model.hfx_initial_adapter = initial
    return peft_model


def save_trained(model: nn.Module, directory) -> None:
    """``save_pretrained``; an adapter whose init changed the base weights is saved converted (PEFT's
    ``path_initial_model_for_weight_conversion``): rank 2r, applying to (and merging into) the original base.

    PEFT's conversion writes only the LoRA matrices; the modules trained in full (``modules_to_save``,
    a classifier head) are written back next to them.
    """
    initial = getattr(model, "hfx_initial_adapter", None)
    if initial is None:
        model.save_pretrained(directory)
        return
    from pathlib import Path

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    kept = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()
            if ".lora_A." not in k and ".lora_B." not in k}
    model.save_pretrained(directory, path_initial_model_for_weight_conversion=initial)
    if kept:
        weights = Path(directory) / "adapter_model.safetensors"
        save_file({**load_file(weights), **kept}, weights, metadata={"format": "pt"})
