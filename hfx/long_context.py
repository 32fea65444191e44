"""Short -> long conversion of BERT/RoBERTa-style checkpoints, the way the Longformer paper did it.

The position-embedding table is extended by copying the learned rows over and over (so every new
position starts from an embedding the model already knows), and the checkpoint is switched to
``hfx_sliding_window`` attention with the first token ([CLS] / <s>) global. The result stays a stock
BERT/RoBERTa checkpoint: ``config.json`` gains ``attention_window``, ``global_attention_token_ids`` and
``attn_implementation: "hfx_sliding_window"``, the key transformers' ``from_pretrained`` reads the
attention implementation from, so after ``import hfx`` a plain ``AutoModel.from_pretrained(folder)``
runs the long backend (without ``import hfx`` transformers refuses the name it does not know). On an
input of at most ``attention_window/2 + 1`` tokens every token still sees every other one, so outputs
equal the original's.

Loading: hfx's own loaders (``hfx eval``, ``hfx finetune``, :func:`load_long_model`, the
``hfx-zero-shot-classification`` pipeline) go through :func:`long_load_kwargs` and
:func:`prepare_long_model`: the saved backend by default (an explicit ``attn_implementation`` wins),
older conversions (``attention_window`` + ``global_attention_token_ids`` but no ``attn_implementation``)
upgraded to ``hfx_sliding_window``, and the always-global token ids made active by a forward pre-hook.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

from .safe_paths import ManifestOutput, check_replaceable_output, swap_folder_in

BACKEND = "hfx_sliding_window"
#: The ``config.json`` key ``PreTrainedConfig`` turns into ``config._attn_implementation`` on load (an
#: ``attn_implementation=`` keyword still wins). transformers does not write it back on save: a plain
#: config attribute of that name, which :func:`prepare_long_model` sets, does.
CONFIG_KEY = "attn_implementation"
#: What marks a conversion in config.json, also one written before ``attn_implementation`` was.
LONG_CONFIG_KEYS = ("attention_window", "global_attention_token_ids")
#: Model types whose checkpoints convert: learned absolute position embeddings at
#: ``embeddings.position_embeddings`` and attention dispatched through transformers' AttentionInterface.
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")
#: The marker a conversion writes into its output folder; ``overwrite`` replaces only a folder that
#: has it and holds nothing but the files it lists.
MARKER_FILE = "hfx_convert_long.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model",
                   "spiece.model")


class ConvertLongError(ValueError):
    """A conversion that cannot be done as asked (source, settings or output); nothing was written."""


class LongModelError(ValueError):
    """A long-context checkpoint that cannot load with the backend its config names (one line, with the fix)."""


#: How convert-long's output folder is checked and replaced (:mod:`hfx.safe_paths`), and named in its messages.
OUTPUT = ManifestOutput(error=ConvertLongError, name="output", folder="output folder", manifest=MARKER_FILE,
                        writer="convert-long", made="conversion", foreign_folder="was not written by hfx convert-long",
                        file_hint="write the long model to")


def _model_class(config):
    import transformers
    from transformers import AutoModel

    for name in config.architectures or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return AutoModel


def _position_offset(config) -> int:
    """RoBERTa-style models number positions from pad_token_id + 1; BERT from 0."""
    return config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta", "camembert") else 0


def _check_source(source: Path):
    """The source's config, after checking that its folder, config and weights are readable and the type converts."""
    from transformers import AutoConfig

    from .checkpoint_check import CheckpointError, check_model_dir

    try:
        check_model_dir(source, "source")
    except CheckpointError as exc:
        raise ConvertLongError(str(exc)) from None
    if not source.exists():  # a hub id: convert-long works on local folders only
        raise ConvertLongError(f"source {source}: no such folder (convert-long reads a local checkpoint folder).")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        raise ConvertLongError(f"source {source}: cannot read its config: {' '.join(str(exc).split())}") from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConvertLongError(
            f"source {source} is a {config.model_type!r} model; convert-long converts {list(SUPPORTED_MODEL_TYPES)} "
            "checkpoints (learned absolute position embeddings). hfx models choose their attention by config "
            "(attention_type) instead."
        )
    position_type = getattr(config, "position_embedding_type", "absolute") or "absolute"
    if position_type != "absolute":
        raise ConvertLongError(f"source {source} uses position_embedding_type={position_type!r}; only 'absolute' "
                               "(learned) position embeddings can be extended by copying.")
    return config


def convert_to_long(
    source: str | Path,
    output: str | Path,
    max_position_embeddings: int = 4096,
    attention_window: int = 512,
    global_token_ids: list[int] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a long-context copy of the local checkpoint ``source`` to ``output`` and return ``output``.

    Every check (settings, source files and type, token ids, the output folder) runs before the
    weights are read. The model is written to a temporary sibling folder and renamed into place,
    with a ``hfx_convert_long.json`` listing the files written; an existing ``output`` is refused
    unless ``overwrite`` and it is an earlier conversion holding only those files.
    """
    import torch
    from transformers import AutoTokenizer

    from hfx_attention.sliding_window import check_window

    source, output = Path(source).expanduser(), Path(output).expanduser()
    try:
        check_window(attention_window)
    except ValueError as exc:
        raise ConvertLongError(str(exc)) from None
    if isinstance(max_position_embeddings, bool) or not isinstance(max_position_embeddings, int) or max_position_embeddings <= 0:
        raise ConvertLongError(f"max_position_embeddings must be a positive integer, got {max_position_embeddings!r}.")
    config = _check_source(source)
    old_max = config.max_position_embeddings
    offset = _position_offset(config)
    if max_position_embeddings <= old_max:
        raise ConvertLongError(
            f"max_position_embeddings={max_position_embeddings} must exceed the checkpoint's {old_max}."
        )
    tokenizer = None
    if any((source / name).is_file() for name in TOKENIZER_FILES):
        # only a tokenizer saved with the model: transformers 5 makes up an empty BERT tokenizer for a bare folder
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConvertLongError(f"source {source}: its tokenizer files cannot be loaded: "
                                   f"{' '.join(str(exc).split())}") from None
    if global_token_ids is None:
        first = None if tokenizer is None else (tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id)
        if first is None:
            raise ConvertLongError(
                f"{source} has no tokenizer with a [CLS]/<s> token; pass --global-token-id (e.g. 101 for BERT's [CLS])."
            )
        global_token_ids = [first]
    bad = [t for t in global_token_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < config.vocab_size]
    if bad:
        raise ConvertLongError(f"global token id(s) {bad} are outside the vocabulary of {source}: valid ids are 0 to "
                               f"{config.vocab_size - 1}.")
    replaced = check_replaceable_output(output, overwrite, OUTPUT)

    model_class = _model_class(config)
    short = model_class.from_pretrained(source)
    prefix = short.base_model_prefix
    state = short.state_dict()
    keys = [k for k in state if k.endswith("embeddings.position_embeddings.weight")]
    if len(keys) != 1:
        raise ConvertLongError(f"source {source}: expected one embeddings.position_embeddings table in "
                               f"{model_class.__name__}, found {keys}.")
    key = keys[0]
    old = state[key]
    learned = old[offset:]
    repeats = -(-(max_position_embeddings - offset) // learned.shape[0])
    state[key] = torch.cat([old[:offset], learned.repeat(repeats, 1)[: max_position_embeddings - offset]])

    config.max_position_embeddings = max_position_embeddings
    config.attention_window = attention_window
    config.global_attention_token_ids = list(global_token_ids)
    long = model_class._from_config(config, attn_implementation=BACKEND)
    setattr(long.config, CONFIG_KEY, BACKEND)  # written to config.json: from_pretrained then picks the backend
    missing, unexpected = long.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise RuntimeError(f"weights did not map onto the long {model_class.__name__} ({prefix}): {missing} {unexpected}")

    output.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.absolute().parent))
    try:
        long.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.model_max_length = max_position_embeddings - offset
            tokenizer.save_pretrained(tmp)
        written = sorted(entry.name for entry in tmp.iterdir())
        if "config.json" not in written or not any(name.endswith((".safetensors", ".bin")) for name in written):
            raise RuntimeError(f"saving the long model wrote {written}, not a config and weights; nothing was replaced.")
        marker = {"source": str(source), "max_position_embeddings": max_position_embeddings,
                  "attention_window": attention_window, "global_token_ids": list(global_token_ids), "files": written}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2), encoding="utf-8")
        # again: the conversion took a while, and files may have been put into the output folder meanwhile
        replaced = check_replaceable_output(output, overwrite, OUTPUT)
        swap_folder_in(tmp, output, replaced, OUTPUT)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def hfx_backends() -> list[str]:
    """The installed hfx attention backends (entry points of group ``hfx.attention``)."""
    from .registry import registry

    return registry.names("attention")


def is_long_config(config) -> bool:
    """Whether ``config`` is a convert-long checkpoint's (also one converted before ``attn_implementation``)."""
    return (getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES
            and all(getattr(config, key, None) is not None for key in LONG_CONFIG_KEYS))


def saved_backend(config) -> str | None:
    """The hfx backend a checkpoint's config (as read from its folder) asks for, or None.

    ``attn_implementation`` in config.json names it; a conversion without that key (written before
    it existed) gets ``hfx_sliding_window``, the backend it was converted for. hfx models choose by
    ``attention_type`` and are left alone, as is a config.json naming a non-hfx implementation.
    """
    if config is None or getattr(config, "model_type", None) == "hfx":
        return None
    named = getattr(config, "_attn_implementation", None)
    if isinstance(named, str):
        return named if named.startswith("hfx_") else None
    return BACKEND if is_long_config(config) else None


def check_backend(name: str, where: str) -> None:
    """Refuse, before any weights load, an ``hfx_*`` backend that is not installed (transformers' own
    message would list only its built-in implementations)."""
    installed = hfx_backends()
    if name.startswith("hfx_") and name not in installed:
        raise LongModelError(
            f"{where}: attn_implementation={name!r} is not an installed hfx attention backend (installed: "
            f"{installed or 'none'}); install the plugin that provides it, or pass attn_implementation='sdpa' "
            "for dense attention."
        )


def long_load_kwargs(config, attn_implementation: str | None = None, where: str = "model") -> dict:
    """``from_pretrained`` keywords choosing the attention of the checkpoint whose config is ``config``.

    An explicit ``attn_implementation`` wins; otherwise the checkpoint's own hfx backend
    (:func:`saved_backend`), which upgrades an older conversion. Empty for any other checkpoint, so
    transformers' default applies.
    """
    name = attn_implementation or saved_backend(config)
    if name is None:
        return {}
    check_backend(name, where)
    return {"attn_implementation": name}


def prepare_long_model(model, warn_dense: bool = False):
    """Finish a stock model running an hfx backend as hfx loads it; returns ``model``.

    - its ``global_attention_token_ids`` become active: a forward pre-hook
      (:func:`hfx_attention.attach_global_token_ids`) on the bare encoder (``model.base_model``),
      which heads call and hfx's encoder evaluators call directly; attached once;
    - ``config.attn_implementation`` is set, so a ``save_pretrained`` (an ``hfx finetune`` output,
      a re-saved older conversion) loads with the backend again.

    ``warn_dense``: for a model object an hfx tool was handed, warn in one line when its config marks
    a conversion but it runs another (dense) implementation, since nothing else would say so.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) == "hfx":
        return model
    running = getattr(config, "_attn_implementation", None)
    if running not in hfx_backends():
        if warn_dense and is_long_config(config):
            warnings.warn(
                f"this {config.model_type} model is a convert-long checkpoint (attention_window="
                f"{config.attention_window}) but runs {running!r} attention, not {BACKEND!r}: inputs longer than "
                f"{config.attention_window // 2 + 1} tokens give other outputs than the long model; load it with "
                f"hfx.long_context.load_long_model(path) (or from_pretrained(path) after `import hfx`).",
                stacklevel=3,
            )
        return model
    from hfx_attention import attach_global_token_ids

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel's wrapped model
    base = getattr(inner, "base_model", inner)
    if getattr(config, "global_attention_token_ids", None) and not getattr(base, "_hfx_global_token_hook", False):
        attach_global_token_ids(base)
        base._hfx_global_token_hook = True
    setattr(config, CONFIG_KEY, running)
    return model


def load_long_model(path: str | Path, model_class=None, **kwargs):
    """Load a converted checkpoint with its long backend (``hfx_sliding_window``) and its always-global
    token ids active; ``attn_implementation=`` chooses another implementation."""
    from transformers import AutoConfig

    import hfx  # noqa: F401  (registers the backend with transformers)

    config = AutoConfig.from_pretrained(path)
    model_class = model_class or _model_class(config)
    kwargs.update(long_load_kwargs(config, kwargs.pop("attn_implementation", None) or saved_backend(config) or BACKEND,
                                   where=str(path)))
    return prepare_long_model(model_class.from_pretrained(path, **kwargs))
