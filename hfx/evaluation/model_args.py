"""``--model-args`` in lm-eval's ``key=value,key=value`` form, ``--device``, and the checks run before a model loads.

The keys are those of lm-eval 0.4.13's ``hf`` model that change how a causal LM is loaded
(``pretrained``, ``dtype``/``torch_dtype``, ``revision``, ``trust_remote_code``, ``peft``,
``add_bos_token``, ``max_length``, ``device_map``/``parallelize``, ``attn_implementation``,
``load_in_4bit``/``load_in_8bit`` and the ``bnb_4bit_*`` options), and ``backend``
(``auto``/``default``, ``causal``, ``seq2seq``: how the model is loaded and scored). A value is read as lm-eval
reads it (``True``/``False`` any case, ``None``, integers, quotes keep a string) but then checked
against what its key needs, so ``revision=1234`` stays the string a revision is, and a typo
(``trust_remote_code=ture``) is refused instead of silently becoming a truthy string.

Every problem is one :class:`~hfx.evaluation.evaluator.EvaluationInputError` line naming the
bad value and the valid ones, raised before any weights are read.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

#: dtype names accepted by ``dtype=`` (lm-eval turns the name into ``getattr(torch, name)``)
DTYPES = ("float32", "float", "float16", "half", "bfloat16", "auto")
DEVICES = "cpu, cuda, cuda:N, mps, auto"
_QUANT_TYPES = ("nf4", "fp4")
_BOOL_KEYS = ("trust_remote_code", "add_bos_token", "parallelize", "load_in_4bit", "load_in_8bit",
              "bnb_4bit_use_double_quant")


def _error(message: str):
    from .evaluator import EvaluationInputError  # lazily: evaluator imports this module

    return EvaluationInputError(message)


def parse_value(text: str) -> Any:
    """One ``k=v`` value as lm-eval reads it: quotes keep a string; true/false/none; int; float; else the text."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    if text.lstrip("+-").isdigit():
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def parse_pairs(text: str | dict | None, what: str) -> dict[str, Any]:
    """``a=1,b=x`` (or a dict, or a JSON object) to a dict; empty items are skipped as lm-eval skips them."""
    if text is None:
        return {}
    if isinstance(text, dict):
        return dict(text)
    if not isinstance(text, str):
        raise _error(f"{what} must be a 'key=value,key=value' string or a dict, got {text!r}.")
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            loaded = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise _error(f"{what}: {stripped[:80]!r} starts like JSON but is not valid JSON ({exc.msg}).") from None
        if not isinstance(loaded, dict):
            raise _error(f"{what}: a JSON value must be an object, got {type(loaded).__name__}.")
        return loaded
    out: dict[str, Any] = {}
    for item in (part for part in stripped.split(",") if part.strip()):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise _error(f"{what}: {item.strip()!r} is not key=value (items are separated by commas, e.g. "
                         "dtype=bfloat16,revision=main).")
        if key in out:
            raise _error(f"{what}: {key!r} is given twice ({out[key]!r} and {parse_value(value)!r}); give it once.")
        out[key] = parse_value(value)
    return out


@dataclass(frozen=True)
class ModelArgs:
    """What ``--model-args`` asks of the model load; ``None`` means "not given" (hfx's default applies)."""

    pretrained: str | None = None
    dtype: str | None = None
    revision: str | None = None
    trust_remote_code: bool | None = None
    peft: str | None = None
    add_bos_token: bool | None = None
    max_length: int | None = None
    device_map: str | None = None
    parallelize: bool | None = None
    attn_implementation: str | None = None
    load_in_4bit: bool | None = None
    load_in_8bit: bool | None = None
    bnb_4bit_quant_type: str | None = None
    bnb_4bit_compute_dtype: str | None = None
    bnb_4bit_use_double_quant: bool | None = None
    backend: str | None = None

    # -- parsing ----------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)] + ["torch_dtype"]

    @classmethod
    def parse(cls, text: str | dict | ModelArgs | None) -> ModelArgs:
        """Parse and check lm-eval's ``k=v,k=v`` form (or a dict); unknown keys are refused with the valid list."""
        if isinstance(text, ModelArgs):
            return text
        raw = parse_pairs(text, "--model-args")
        valid = cls.keys()
        for key in raw:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise _error(f"--model-args: unknown key {key!r}{hint}; valid keys: {', '.join(valid)}.")
        values = {k: v for k, v in raw.items() if v is not None}
        if "torch_dtype" in values:
            if "dtype" in values and str(values["dtype"]) != str(values["torch_dtype"]):
                raise _error(f"--model-args: dtype={values['dtype']!r} and torch_dtype={values['torch_dtype']!r} "
                             "disagree; they are the same setting, give one.")
            values["dtype"] = values.pop("torch_dtype")
        for key in _BOOL_KEYS:
            if key in values and not isinstance(values[key], bool):
                raise _error(f"--model-args: {key} must be True or False, got {values[key]!r}.")
        if "max_length" in values:
            value = values["max_length"]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _error(f"--model-args: max_length must be an integer >= 1, got {value!r}.")
        if "backend" in values:
            from .seq2seq import BACKENDS

            if values["backend"] not in BACKENDS:
                raise _error(f"--model-args: backend={values['backend']!r} is invalid; valid values: "
                             f"{', '.join(BACKENDS)} (auto/default: seq2seq for an encoder-decoder, else causal).")
        for key in ("pretrained", "revision", "peft", "device_map", "attn_implementation", "dtype",
                    "bnb_4bit_quant_type", "bnb_4bit_compute_dtype"):
            if key in values:
                value = values[key]
                if key == "dtype" and not isinstance(value, str):  # a torch.dtype from the Python API
                    value = str(value).removeprefix("torch.")
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key in ("revision", "pretrained"):
                    value = str(value)
                if not isinstance(value, str) or not value.strip():
                    raise _error(f"--model-args: {key} must be a non-empty string, got {value!r}.")
                values[key] = value.strip()
        for key in ("dtype", "bnb_4bit_compute_dtype"):
            if key in values and values[key] not in (DTYPES if key == "dtype" else DTYPES[:-1]):
                allowed = DTYPES if key == "dtype" else DTYPES[:-1]
                raise _error(f"--model-args: {key}={values[key]!r} is not a dtype; valid: {', '.join(allowed)}.")
        if values.get("bnb_4bit_quant_type") not in (None, *_QUANT_TYPES):
            raise _error(f"--model-args: bnb_4bit_quant_type={values['bnb_4bit_quant_type']!r}; valid: nf4, fp4.")
        args = cls(**values)
        args._check_combinations()
        return args

    def _check_combinations(self) -> None:
        if self.load_in_4bit and self.load_in_8bit:
            raise _error("--model-args: load_in_4bit and load_in_8bit are both True; choose one.")
        options = [k for k in ("bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant")
                   if getattr(self, k) is not None]
        if options and not self.load_in_4bit:
            raise _error(f"--model-args: {', '.join(options)} only apply with load_in_4bit=True.")

    def given(self) -> dict[str, Any]:
        """The keys that were set, for the results' ``config.model_args``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    # -- what the load does -------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        return bool(self.load_in_4bit or self.load_in_8bit)

    @property
    def placement(self) -> str | None:
        """The ``device_map`` of the load: the given one, or ``"auto"`` for ``parallelize=True`` (as lm-eval)."""
        if self.device_map is not None:
            return self.device_map
        return "auto" if self.parallelize else None

    def torch_dtype(self, config=None):
        """The dtype the weights are loaded in: the given one; ``auto`` reads the checkpoint's config; else fp32."""
        import torch

        name = self.dtype
        if name is None:
            return torch.float32
        if name == "auto":
            found = None
            if config is not None:
                found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
            if isinstance(found, str):
                found = getattr(torch, found, None)
            return found if isinstance(found, torch.dtype) else torch.float32
        return getattr(torch, name)

    def quantization_config(self):
        """``BitsAndBytesConfig`` for load_in_4bit / load_in_8bit (transformers 5 refuses the bare keywords)."""
        if not self.quantized:
            return None
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            flag = "load_in_4bit" if self.load_in_4bit else "load_in_8bit"
            raise _error(f"--model-args {flag}=True needs bitsandbytes, which is not installed "
                         "(pip install bitsandbytes).")
        import torch
        from transformers import BitsAndBytesConfig

        if self.load_in_8bit:
            return BitsAndBytesConfig(load_in_8bit=True)
        options: dict[str, Any] = {"load_in_4bit": True}
        if self.bnb_4bit_quant_type is not None:
            options["bnb_4bit_quant_type"] = self.bnb_4bit_quant_type
        if self.bnb_4bit_compute_dtype is not None:
            options["bnb_4bit_compute_dtype"] = getattr(torch, self.bnb_4bit_compute_dtype)
        if self.bnb_4bit_use_double_quant is not None:
            options["bnb_4bit_use_double_quant"] = self.bnb_4bit_use_double_quant
        return BitsAndBytesConfig(**options)

    def hub_kwargs(self) -> dict[str, Any]:
        """``revision`` / ``trust_remote_code``: passed to the config, tokenizer and model loads alike."""
        out: dict[str, Any] = {}
        if self.revision is not None:
            out["revision"] = self.revision
        if self.trust_remote_code is not None:
            out["trust_remote_code"] = self.trust_remote_code
        return out

    def attention_kwargs(self, config=None, where: str = "--model") -> dict[str, Any]:
        """``attn_implementation`` of the load: the given one, else a convert-long checkpoint's own backend.

        transformers reads ``attn_implementation`` from config.json itself; naming it here also
        upgrades conversions written before that key (see :func:`hfx.long_context.long_load_kwargs`),
        and an hfx backend that is not installed is refused in one line before the weights load.
        """
        from ..long_context import LongModelError, long_load_kwargs

        try:
            return long_load_kwargs(config, self.attn_implementation, where=where)
        except LongModelError as exc:
            raise _error(str(exc)) from None

    def from_pretrained_kwargs(self, device: str | None = None, config=None) -> dict[str, Any]:
        """Keyword arguments of ``AutoModelForCausalLM.from_pretrained`` for this load on ``device``.

        ``device`` (a resolved ``--device``) places the whole model with ``device_map={"": device}``
        as lm-eval does, except on CPU where no placement is needed; ``device_map``/``parallelize``
        place it themselves (the two together with ``--device`` are refused earlier).
        """
        kwargs: dict[str, Any] = {"dtype": self.torch_dtype(config), **self.hub_kwargs()}
        kwargs.update(self.attention_kwargs(config))
        quantization = self.quantization_config()
        if quantization is not None:
            kwargs["quantization_config"] = quantization
        if self.placement is not None:
            kwargs["device_map"] = self.placement
        elif device is not None and device != "cpu":
            kwargs["device_map"] = {"": device}
        return kwargs


# -- devices ------------------------------------------------------------------------------------
_DEVICE = re.compile(r"^(cpu|mps|auto|cuda)(?::(\d+))?$")


def _available() -> str:
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found.append(f"cuda (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return ", ".join(found)


def resolve_device(device: str | None) -> str | None:
    """``--device`` checked against this machine: ``auto`` picks cuda, else mps, else cpu; None stays None."""
    if device is None:
        return None
    import torch

    text = str(device).strip().lower()
    match = _DEVICE.match(text)
    if not match or (match.group(2) is not None and match.group(1) != "cuda"):
        raise _error(f"--device {device!r} is not a device; valid: {DEVICES}.")
    kind, index = match.group(1), match.group(2)
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}, built {'with CUDA ' + torch.version.cuda if torch.version.cuda else 'without CUDA'}"
            raise _error(f"--device {device}: CUDA is not available here ({build}); available: {_available()}.")
        if index is not None and int(index) >= torch.cuda.device_count():
            raise _error(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                         f"available: {_available()}.")
    if kind == "mps" and not mps:
        raise _error(f"--device mps: MPS is not available here; available: {_available()}.")
    return text


def check_dtype_on_device(dtype, device: str | None) -> None:
    """Refuse a dtype the device cannot compute in (bf16 on a pre-Ampere GPU, ...) with one line.

    A tiny matmul in that dtype on that device is the test: it is what every layer will do.
    """
    import torch

    where = device or "cpu"
    if where.startswith("cuda") and dtype == torch.bfloat16:
        index = int(where.split(":")[1]) if ":" in where else torch.cuda.current_device()
        with torch.cuda.device(index):
            supported = torch.cuda.is_bf16_supported()
        if not supported:
            raise _error(f"dtype bfloat16 is not supported on {where} ({torch.cuda.get_device_name(index)}); "
                         "use dtype=float16 or float32.")
    try:
        probe = torch.ones(2, 2, dtype=dtype, device=where)
        (probe @ probe).sum().item()
    except (RuntimeError, TypeError) as exc:
        name = str(dtype).removeprefix("torch.")
        raise _error(f"dtype {name} cannot run on {where}: {' '.join(str(exc).split())[:200]}; "
                     "use float32 (or a dtype this device supports).") from None


# -- PEFT adapters --------------------------------------------------------------------------------
def find_adapter(path: str | os.PathLike) -> Path:
    """The adapter folder of ``peft=``: the folder itself, or ``RUN/adapter`` of an ``hfx finetune`` run."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise _error(f"--model-args peft={path}: no such folder (give a PEFT adapter folder, e.g. the "
                     "adapter/ of an hfx finetune run).")
    if (folder / "adapter_config.json").is_file():
        return folder
    if (folder / "adapter" / "adapter_config.json").is_file():
        return folder / "adapter"
    hint = " (a full fine-tune: evaluate RUN/model with --model)" if (folder / "model").is_dir() else ""
    raise _error(f"--model-args peft={path}: not a PEFT adapter folder: it has no adapter_config.json{hint}.")


def _safetensors_shapes(files) -> dict[str, list[int]]:
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = list(handle.get_slice(name).get_shape())
    return shapes


def _lora_modules(adapter_shapes: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
    """``module path -> (in_features, out_features)`` of every LoRA pair in an adapter's weights."""
    found: dict[str, dict[str, list[int]]] = {}
    for name, shape in adapter_shapes.items():
        match = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", name)
        if match and len(shape) == 2:
            found.setdefault(match.group(1), {})[match.group(2)] = shape
    return {module: (pair["A"][1], pair["B"][0]) for module, pair in found.items() if "A" in pair and "B" in pair}


def check_adapter(path: str | os.PathLike, base: str | os.PathLike, base_config=None) -> Path:
    """Check, before anything loads, that ``path`` is a PEFT adapter for the model at ``base``; its folder.

    The adapter's LoRA matrices (safetensors headers only) must each sit on a 2-D weight of the
    base with matching in/out features; where the adapter's weights cannot be read that way, its
    recorded base model must at least be the same architecture.
    """
    folder = find_adapter(path)
    try:
        adapter = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _error(f"--model-args peft={path}: adapter_config.json cannot be read: {exc}.") from None
    if not isinstance(adapter, dict) or "peft_type" not in adapter:
        raise _error(f"--model-args peft={path}: adapter_config.json has no peft_type; not a PEFT adapter.")
    recorded = adapter.get("base_model_name_or_path")
    base_dir = Path(base)
    if isinstance(recorded, str) and Path(recorded).is_dir() and base_config is not None:
        try:
            theirs = json.loads((Path(recorded) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            theirs = {}
        mine = base_config.to_dict()
        for key in ("model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer"):
            if key in theirs and key in mine and theirs[key] != mine[key]:
                raise _error(f"--model-args peft={path}: the adapter was trained on {recorded} ({key}={theirs[key]!r}), "
                             f"not on this base model ({key}={mine[key]!r}).")
    adapter_files = sorted(folder.glob("adapter_model*.safetensors"))
    if not adapter_files and any(folder.glob("adapter_model*.bin")):
        raise _error(f"--model-args peft={path}: the adapter's weights are only a pickled adapter_model.bin; hfx "
                     "loads weights from safetensors only (save it with save_pretrained(..., "
                     "safe_serialization=True), or convert it).")
    base_files = sorted(base_dir.glob("*.safetensors")) if base_dir.is_dir() else []
    if not adapter_files or not base_files:
        return folder
    try:
        modules = _lora_modules(_safetensors_shapes(adapter_files))
        base_shapes = _safetensors_shapes(base_files)
    except Exception:  # noqa: BLE001  (a damaged header: the load reports it)
        return folder
    for module, (fan_in, fan_out) in sorted(modules.items()):
        # the base may be saved with or without its outer prefix (``model.``, ``transformer.``)
        shorter = module.split(".", 1)[-1]
        candidates = [n for n in base_shapes if n in (f"{module}.weight", f"{shorter}.weight")
                      or n.endswith(f".{module}.weight")]
        shape = base_shapes.get(candidates[0]) if candidates else None
        if shape is None:
            raise _error(f"--model-args peft={path}: the adapter adapts {module}, which this base model "
                         f"({base}) does not have; it was trained for {recorded or 'another model'}.")
        if len(shape) == 2 and sorted(shape) != sorted([fan_in, fan_out]):
            raise _error(f"--model-args peft={path}: the adapter's {module} is {fan_in} -> {fan_out} but this "
                         f"base model's {candidates[0]} is {shape[0]} x {shape[1]}; it was trained for "
                         f"{recorded or 'another model'}.")
    return folder
