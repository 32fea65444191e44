"""Training data: load through ``datasets``, check the fields, tokenise, mask, pack, split.

Three record shapes are understood for causal LMs, chosen by ``data_format`` (``auto`` picks by
the columns present, in this order):

- ``chat``: a list of ``{"role", "content"}`` messages, rendered with the tokenizer's chat template;
  the loss is taken on the assistant turns only (``assistant_only_loss``, on by default). Any
  template works, not only those with ``{% generation %}`` markers: an assistant turn is the text
  between the conversation rendered up to it (with the generation prompt) and rendered through it;
- ``prompt-completion``: two text fields; the loss is taken on the completion only;
- ``text``: one text field; the loss is taken on every token.

Sequence classification reads ``text_field`` and ``label_field`` (integers or label names).
Sequence-to-sequence (an encoder-decoder) reads ``source_field`` / ``target_field`` (``source-target``),
else ``prompt_field`` / ``completion_field``: the source goes to the encoder, the target is the
decoder's labels (ending in EOS, so that generation learns to stop); the loss is on the target only.
Causal-LM examples may be packed into rows of ``max_length`` (``packing``: ``bfd`` or ``wrapped``,
see :mod:`hfx.finetune.packing`), each row keeping its examples apart.
Every check here runs before the model is loaded, so a misspelt field costs seconds, not a load.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from .config import FinetuneConfig

#: the label that no loss is computed for (transformers' and PyTorch's default); the one definition in hfx.finetune
IGNORE_INDEX = -100
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
logger = logging.getLogger("hfx.finetune")


class DataError(ValueError):
    """The data cannot serve the requested run (missing field, unknown split, unreadable files)."""


@dataclass
class PreparedData:
    train: object
    eval: object | None
    data_format: str
    label_names: list[str] | None = None
    packing_efficiency: float | None = None  # real tokens / slots of the packed training rows


def load_split(source: str, split: str):
    """A ``datasets.Dataset`` from a local file, a folder of files, or a hub dataset name.

    Local json/jsonl/csv files are read through once first (:func:`check_data_file`), so an empty,
    malformed or non-UTF-8 file is reported with its name and line instead of failing (or, for a
    JSON line that is not an object or a CSV row with extra fields, silently loading garbage)
    inside ``datasets``.
    """
    from datasets import load_dataset

    path = Path(source).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in FILE_BUILDERS and p.is_file())
        if not files:
            raise DataError(f"folder {source} holds no {sorted(FILE_BUILDERS)} files.")
    else:
        if path.suffix in FILE_BUILDERS or source.startswith((".", "/", "~")) or source.endswith("/"):
            raise DataError(f"data file {source} does not exist.")
        try:
            splits = load_dataset(source)
        except Exception as exc:  # datasets raises many types for "not found / offline"
            raise DataError(f"{source!r} is neither a local file or folder nor a loadable dataset: "
                            f"{' '.join(str(exc).split())}") from None
        if split not in splits:
            raise DataError(f"dataset {source!r} has no split {split!r}; splits: {sorted(splits)}.")
        return splits[split]
    builder = _builder_for(files)
    for file in files:
        check_data_file(file)
    try:
        dataset = load_dataset(builder, data_files=[str(p) for p in files], split="train")
    except Exception as exc:  # pyarrow / pandas errors come wrapped in DatasetGenerationError
        cause = exc.__cause__ or exc
        raise DataError(f"cannot read {source} as {builder}: {' '.join(str(cause).split()) or type(cause).__name__}") from None
    if len(dataset) == 0:
        raise DataError(f"{source} holds no records.")
    return dataset


def _utf8_lines(path: Path):
    """(line number, text) of every line of ``path``; a DataError names the first line that is not UTF-8."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path} line {number} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                    "save the file as UTF-8."
                ) from None


def check_data_file(path: Path) -> None:
    """Read a local .json/.jsonl/.csv file once and report the first problem with its line number."""
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty: no records.")
    if path.suffix == ".jsonl":
        _check_json_lines(path)
    elif path.suffix == ".json":
        text = "".join(line for _, line in _utf8_lines(path))
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            if text.lstrip().startswith("{") and "\n" in text.strip():
                _check_json_lines(path)  # datasets also reads JSON lines from a .json file
                return
            raise DataError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg}).") from None
        _check_json_document(path, document)
    elif path.suffix == ".csv":
        _check_csv(path)


def _check_json_lines(path: Path) -> None:
    records = 0
    for number, line in _utf8_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number}: invalid JSON ({exc.msg} at column {exc.colno}).") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} line {number}: a record must be a JSON object, got {type(record).__name__}.")
        records += 1
    if records == 0:
        raise DataError(f"{path} holds no records (only blank lines).")


def _check_json_document(path: Path, document) -> None:
    if isinstance(document, list):
        if not document:
            raise DataError(f"{path} holds an empty list: no records.")
        for index, record in enumerate(document):
            if not isinstance(record, dict):
                raise DataError(f"{path}: record {index} must be a JSON object, got {type(record).__name__}.")
        return
    if isinstance(document, dict) and document and all(isinstance(v, list) for v in document.values()):
        lengths = {len(v) for v in document.values()}
        if len(lengths) > 1 or lengths == {0}:
            raise DataError(f"{path}: the columns hold lists of different lengths {sorted(lengths)}, or none.")
        return
    raise DataError(f"{path} must hold a list of records (JSON objects), one JSON object per line, or an object "
                    f"mapping column names to lists; got {type(document).__name__}.")


def _check_csv(path: Path) -> None:
    import csv
    import io

    text = io.StringIO("".join(line for _, line in _utf8_lines(path)), newline="")
    reader = csv.reader(text)
    try:
        header = next(reader, None)
        while header is not None and not any(cell.strip() for cell in header):
            header = next(reader, None)
        if header is None:
            raise DataError(f"{path} is empty: no header row.")
        rows = 0
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path} line {reader.line_num}: {len(row)} fields where the header has {len(header)} "
                                f"({header}).")
            rows += 1
    except csv.Error as exc:
        raise DataError(f"{path} line {reader.line_num}: {exc}.") from None
    if rows == 0:
        raise DataError(f"{path} has a header {header} but no records.")


def _builder_for(files: list[Path]) -> str:
    builders = {FILE_BUILDERS.get(p.suffix) for p in files}
    if None in builders:
        bad = [p.name for p in files if p.suffix not in FILE_BUILDERS]
        raise DataError(f"unsupported data file(s) {bad}; supported extensions: {sorted(FILE_BUILDERS)}.")
    if len(builders) > 1:
        raise DataError(f"data files mix formats {sorted(builders)}; use one of json/jsonl, csv or parquet.")
    return builders.pop()


def resolve_format(columns: list[str], config: FinetuneConfig, task: str) -> str:
    """The record shape to use, or a DataError naming the fields that exist."""

    def missing(*names: str) -> list[str]:
        return [name for name in names if name not in columns]

    if task == "seq2seq":
        pairs = {"source-target": (config.source_field, config.target_field),
                 "prompt-completion": (config.prompt_field, config.completion_field)}
        if config.data_format != "auto":
            absent = missing(*pairs[config.data_format])
            if absent:
                raise DataError(f"data_format={config.data_format!r} needs field(s) {absent}; the data has columns "
                                f"{columns}.")
            return config.data_format
        for data_format, names in pairs.items():
            if not missing(*names):
                return data_format
        raise DataError(
            f"sequence-to-sequence needs fields {list(pairs['source-target'])} (source_field/target_field) or "
            f"{list(pairs['prompt-completion'])} (prompt_field/completion_field); the data has columns {columns}."
        )
    if task == "seq-cls":
        absent = missing(config.text_field, config.label_field)
        if absent:
            raise DataError(
                f"sequence classification needs fields {absent} (text_field/label_field); the data has columns {columns}."
            )
        return "text"
    required = {
        "chat": (config.messages_field,),
        "prompt-completion": (config.prompt_field, config.completion_field),
        "text": (config.text_field,),
    }
    if config.data_format != "auto":
        absent = missing(*required[config.data_format])
        if absent:
            raise DataError(f"data_format={config.data_format!r} needs field(s) {absent}; the data has columns {columns}.")
        return config.data_format
    for data_format, names in required.items():
        if not missing(*names):
            return data_format
    wanted = " or ".join(repr(list(names)) for names in required.values())
    raise DataError(f"no usable field: expected {wanted}; the data has columns {columns}.")


def check_data(config: FinetuneConfig, task: str, tokenizer) -> tuple[object, object | None, str]:
    """Load the raw splits and validate them against the config and tokenizer; nothing is tokenised yet."""
    train = load_split(config.data, config.data_split)
    data_format = resolve_format(list(train.column_names), config, task)
    evaluation = None
    if config.eval_data is not None:
        evaluation = load_split(config.eval_data, config.data_split)
        resolve_format(list(evaluation.column_names), config, task)
    if data_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"field {config.messages_field!r} holds chat messages but the tokenizer of {config.model} has no chat "
            "template; set tokenizer.chat_template or use text / prompt-completion records."
        )
    if data_format == "chat" and config.assistant_only_loss and not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"assistant_only_loss needs a fast tokenizer (character offsets); {type(tokenizer).__name__} of "
            f"{config.model} is not one. Pass assistant_only_loss=False (--no-assistant-only-loss)."
        )
    if task == "seq-cls" and config.packing != "none":
        raise DataError(f"packing={config.packing!r} is invalid for sequence classification (one label per example); "
                        "valid values: 'none'.")
    if task in ("causal-lm", "seq2seq") and tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise DataError(f"the tokenizer of {config.model} has neither a pad nor an eos token to pad batches with.")
    return train, evaluation, data_format


def prepare_data(config: FinetuneConfig, task: str, tokenizer, label_names: list[str] | None = None,
                 checked: tuple[object, object | None, str] | None = None) -> PreparedData:
    """Split and tokenise the data; ``checked`` is what :func:`check_data` returned, so the files are read once."""
    train, evaluation, data_format = checked if checked is not None else check_data(config, task, tokenizer)
    if config.max_train_samples is not None:
        train = train.select(range(min(config.max_train_samples, len(train))))
    if evaluation is None and config.eval_fraction > 0:
        held_out = math.ceil(config.eval_fraction * len(train))
        if held_out >= len(train):
            raise DataError(f"eval_fraction={config.eval_fraction} of the {len(train)} examples of {config.data} "
                            "leaves none to train on; lower it or give --eval-data.")
        parts = train.train_test_split(test_size=config.eval_fraction, seed=config.seed)
        train, evaluation = parts["train"], parts["test"]
    if task == "seq-cls":
        label_names = label_names or infer_label_names(train[config.label_field])
        encode = _classification_encoder(config, tokenizer, label_names)
    elif task == "seq2seq":
        encode = _seq2seq_encoder(config, tokenizer, data_format)
    else:
        encode = _causal_encoder(config, tokenizer, data_format)
    train = _tokenize(train, encode, config)
    evaluation = _tokenize(evaluation, encode, config) if evaluation is not None else None
    efficiency = None
    if config.packing != "none" and task == "causal-lm":
        from .packing import packing_efficiency  # packing imports IGNORE_INDEX from here

        efficiency = packing_efficiency((len(ids) for ids in train["input_ids"]), config.max_length)
        logger.info("packing=%s: %d training rows of max_length=%d, %.2f%% of their slots real tokens.",
                    config.packing, len(train), config.max_length, 100 * efficiency)
    return PreparedData(train=train, eval=evaluation, data_format=data_format, label_names=label_names,
                        packing_efficiency=efficiency)


def infer_label_names(labels) -> list[str] | None:
    """None when labels are already integer ids; otherwise the sorted distinct label names."""
    if all(isinstance(label, int) and not isinstance(label, bool) for label in labels):
        return None
    return sorted({str(label) for label in labels})


def _tokenize(dataset, encode, config: FinetuneConfig):
    tokenized = dataset.map(encode, remove_columns=dataset.column_names, desc="tokenising")
    tokenized = tokenized.filter(lambda row: len(row["input_ids"]) > 0)
    token_labels = len(tokenized) > 0 and isinstance(tokenized[0]["labels"], list)  # causal LM, not a class id
    if token_labels:
        # no supervised token left (a chat without an assistant turn, a prompt past max_length): nothing to learn
        tokenized = tokenized.filter(lambda row: any(label != IGNORE_INDEX for label in row["labels"]))
    if config.packing != "none" and token_labels:
        from .packing import BFD_GROUP, bfd_packer, wrapped_packer

        if config.packing == "bfd":
            packer, group = bfd_packer(config.max_length), BFD_GROUP
        else:
            packer, group = wrapped_packer(config.max_length), 1000  # datasets' default batch, as before
        tokenized = tokenized.map(packer, batched=True, batch_size=group, remove_columns=tokenized.column_names,
                                  desc=f"packing ({config.packing})")
        # a row whose only labels were first tokens (now -100), or a wrapped row inside a prompt: no loss at all
        tokenized = tokenized.filter(lambda row: any(label != IGNORE_INDEX for label in row["labels"]))
    return tokenized


def _causal_encoder(config: FinetuneConfig, tokenizer, data_format: str):
    """Token ids and labels: bos + text + eos, with -100 on the tokens that carry no loss."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    truncate = config.packing != "wrapped"  # wrapped packing cuts the concatenated stream into rows instead

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def finish(prompt_ids: list[int], target_ids: list[int]) -> dict:
        return finish_labelled(prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids)

    def finish_labelled(input_ids: list[int], labels: list[int]) -> dict:
        if truncate:
            input_ids, labels = input_ids[: config.max_length], labels[: config.max_length]
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}

    if data_format == "text":
        return lambda row: finish([], bos + ids(row[config.text_field]) + eos)
    if data_format == "prompt-completion":
        return lambda row: finish(bos + ids(row[config.prompt_field]), ids(row[config.completion_field]) + eos)

    def chat(row):
        messages = row[config.messages_field]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        if not config.assistant_only_loss:
            return finish([], ids(rendered))
        spans = assistant_spans(tokenizer, messages, rendered)
        encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        labels = [token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
                  for token, (begin, _) in zip(encoded["input_ids"], encoded["offset_mapping"])]
        return finish_labelled(encoded["input_ids"], labels)

    return chat


def assistant_spans(tokenizer, messages: list[dict], rendered: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in ``rendered``, found by rendering growing prefixes.

    The span of turn k starts where the conversation up to k, rendered with the generation prompt,
    ends, and stops where the conversation through k ends. Templates that rewrite earlier turns
    (e.g. drop past reasoning) break the prefix property; that is reported rather than guessed.
    """

    def render(prefix: list[dict], generation_prompt: bool) -> str:
        if not prefix:
            return ""
        return tokenizer.apply_chat_template(prefix, tokenize=False, add_generation_prompt=generation_prompt)

    spans = []
    for k, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        through = render(messages[: k + 1], False)
        before = render(messages[:k], True)
        if not through.startswith(before):  # the generation prompt is not how this template opens a turn
            before = render(messages[:k], False)
        if not rendered.startswith(through) or not through.startswith(before):
            raise DataError(
                f"the chat template does not render the first {k + 1} messages as a prefix of the whole "
                "conversation, so the assistant turns cannot be located for assistant_only_loss; pass "
                "assistant_only_loss=False (--no-assistant-only-loss) to take the loss on every token."
            )
        spans.append((len(before), len(through)))
    return spans


def _seq2seq_encoder(config: FinetuneConfig, tokenizer, data_format: str):
    """Encoder ids from the source (the tokenizer's own special tokens), decoder labels from the target.

    The labels are the tokenizer's encoding of the target when it ends in EOS (T5, BART); a tokenizer
    that marks no end gets the target's plain tokens plus EOS. Both are cut to ``max_length``, the
    labels keeping their EOS. The model builds its decoder inputs from the labels (shifted right).
    """
    source_field, target_field = ((config.source_field, config.target_field) if data_format == "source-target"
                                  else (config.prompt_field, config.completion_field))
    eos = tokenizer.eos_token_id
    # whether the tokenizer's target encoding ends in EOS is a property of its post-processor, not of
    # the text: asked once here, so each target is tokenised once
    marks_end = eos is None or tokenizer(text_target="a")["input_ids"][-1:] == [eos]

    def labels_of(target: str) -> list[int]:
        if marks_end:
            ids = tokenizer(text_target=target)["input_ids"]
        else:
            ids = tokenizer(target, add_special_tokens=False)["input_ids"]
            if not ids or ids[-1] != eos:  # a target that already ends in the EOS token keeps one
                ids = ids + [eos]
        if len(ids) > config.max_length:
            ids = ids[: config.max_length - 1] + ids[-1:]
        return ids

    def encode(row):
        source = tokenizer(row[source_field], truncation=True, max_length=config.max_length)
        return {"input_ids": source["input_ids"], "attention_mask": source["attention_mask"],
                "labels": labels_of(row[target_field])}

    return encode


def _classification_encoder(config: FinetuneConfig, tokenizer, label_names: list[str] | None):
    index = {name: i for i, name in enumerate(label_names)} if label_names else None

    def encode(row):
        encoded = tokenizer(row[config.text_field], truncation=True, max_length=config.max_length)
        label = row[config.label_field]
        return {**encoded, "labels": index[str(label)] if index else int(label)}

    return encode


def collator_for(task: str, tokenizer, packing: str = "none", model=None):
    """Padding per batch, or for packed rows :class:`~hfx.finetune.packing.PackedCollator` (the batch
    flattened into one unpadded row, boundaries as ``position_ids``, plus ``cu_seq_lens_*`` when ``model`` runs a flash-attention kernel)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    from .packing import PackedCollator

    if task == "seq-cls":
        return DataCollatorWithPadding(tokenizer)
    if packing != "none" and task == "causal-lm":
        backend = str(getattr(getattr(model, "config", None), "_attn_implementation", None) or "")
        return PackedCollator(flash_attn_kwargs="flash" in backend)
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
