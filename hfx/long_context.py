"""Short -> long conversion of BERT/RoBERTa-style checkpoints, the way the Longformer paper did it.

The position-embedding table is extended by copying the learned rows over and over (so every new
position starts from an embedding the model already knows), and the checkpoint is switched to
``hfx_sliding_window`` attention with the first token ([CLS] / <s>) global. The result stays a stock
BERT/RoBERTa checkpoint: ``config.json`` gains ``attention_window`` and ``global_attention_token_ids``;
:func:`load_long_model` loads it with the right backend. On an input of at most
``attention_window/2 + 1`` tokens every token still sees every other one, so outputs equal the original's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from .safe_paths import blocking_parent, remove_entry

BACKEND = "hfx_sliding_window"
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


def check_output(output: Path, overwrite: bool) -> list[str]:
    """The entries an overwrite replaces (empty for a new or empty folder); refuses anything else, naming it.

    A symbolic link as ``output`` is refused, whatever it points to: the conversion is renamed into
    place, which would replace the link rather than write into the folder it names.
    """
    if output.is_symlink():
        raise ConvertLongError(f"output {output} is a symbolic link (to {os.readlink(output)}); give the folder itself "
                               f"({output.resolve()}) or another folder. Nothing was written.")
    if output.exists() and not output.is_dir():
        raise ConvertLongError(f"output {output} is a file; give a folder to write the long model to.")
    if not output.exists():
        blocked = blocking_parent(output)
        if blocked is not None:
            raise ConvertLongError(f"output {output} cannot be created: {blocked[0]} is not a writable folder.")
        return []
    entries = sorted(entry.name for entry in output.iterdir())
    if not entries:
        return []
    if not overwrite:
        raise ConvertLongError(f"output folder {output} is not empty ({_shown(entries)}); pass --overwrite to replace "
                               "an earlier conversion, or choose another folder.")
    marker = output / MARKER_FILE
    try:
        written = json.loads(marker.read_text(encoding="utf-8"))["files"]
        if not isinstance(written, list):
            raise TypeError
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise ConvertLongError(f"--overwrite: {output} was not written by hfx convert-long (no readable {MARKER_FILE}); "
                               "nothing was deleted. Choose another folder.") from None
    foreign = [name for name in entries if name != MARKER_FILE and name not in written]
    if foreign:
        raise ConvertLongError(f"--overwrite: {output} holds {_shown(foreign)}, which convert-long did not write; "
                               "nothing was deleted. Move them elsewhere or choose another folder.")
    return entries


def _shown(names: list[str], limit: int = 8) -> str:
    return str(names if len(names) <= limit else names[:limit] + [f"... {len(names) - limit} more"])


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
    replaced = check_output(output, overwrite)

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
        replaced = check_output(output, overwrite)
        _replace_folder(tmp, output, replaced)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def _replace_folder(new: Path, output: Path, replaced: list[str]) -> None:
    """Put ``new`` at ``output``; an earlier conversion there is moved aside first.

    Afterwards only ``replaced`` (the marker and the files it lists, as :func:`check_output` found
    them) is removed from the moved-aside folder, and then the folder once empty. Anything else (put
    there after the check) is not deleted: the folder stays aside, and a warning names it.
    """
    if not output.exists():
        os.replace(new, output)
        return
    aside = output.with_name(f".{output.name}.old-{os.getpid()}")
    if not replaced:  # an empty folder
        try:
            output.rmdir()
        except OSError:
            raise ConvertLongError(f"output folder {output} is no longer empty; nothing was deleted. Choose another "
                                   "folder.") from None
        os.replace(new, output)
        return
    os.replace(output, aside)
    try:
        os.replace(new, output)
    except OSError:
        os.replace(aside, output)  # put the earlier conversion back
        raise
    for name in replaced:
        remove_entry(aside / name)
    left = sorted(entry.name for entry in aside.iterdir())
    if left:
        warnings.warn(f"the earlier conversion in {output} also held {_shown(left)}, which convert-long did not "
                      f"write; they were not deleted and are in {aside}.", stacklevel=3)
    else:
        aside.rmdir()


def load_long_model(path: str | Path, model_class=None, **kwargs):
    """Load a converted checkpoint with ``hfx_sliding_window`` and its always-global token ids active."""
    from transformers import AutoConfig

    from hfx_attention import attach_global_token_ids

    import hfx  # noqa: F401  (registers the backend with transformers)

    model_class = model_class or _model_class(AutoConfig.from_pretrained(path))
    model = model_class.from_pretrained(path, attn_implementation=BACKEND, **kwargs)
    attach_global_token_ids(model)
    return model
