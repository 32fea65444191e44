"""Pre-training an hfx model with Trainer: the pieces the examples, quickstart and compare_norms share.

Three objectives, each a model class, a dataset builder and a collator:

=============  ======================  =======================================  ====================================
objective      model                   dataset                                  collator
=============  ======================  =======================================  ====================================
``mlm_nsp``    ``HfxForPreTraining``   ``build_nsp_pairs`` (A/B sentence pairs)  ``DataCollatorForPreTraining``
``mlm``        ``HfxForMaskedLM``      ``tokenize_for_mlm`` (document chunks)    ``DataCollatorForPreTraining``
``clm``        ``HfxForCausalLM``      ``pack_for_causal_lm`` (EOS-joined)       ``DataCollatorForLanguageModeling``
=============  ======================  =======================================  ====================================

``run_from_args`` is the body of ``examples/pretrain_bert_style.py`` and
``examples/pretrain_gpt_style.py``; ``add_arguments`` declares their shared flags.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import warnings
from pathlib import Path

from transformers import (
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)

from .configuration_hfx import HfxConfig
from .safe_paths import blocking_parent, remove_entry, replace_folder, shown_names
from .data import (
    DataCollatorForPreTraining,
    build_nsp_pairs,
    load_documents,
    pack_for_causal_lm,
    require_mask_token,
    tokenize_for_mlm,
)
from .modeling_hfx import HfxForCausalLM, HfxForMaskedLM, HfxForPreTraining
from .tokenizer import train_tokenizer

OBJECTIVES = {"mlm_nsp": HfxForPreTraining, "mlm": HfxForMaskedLM, "clm": HfxForCausalLM}
# clm gets a tokenizer that adds nothing around a text; the BERT objectives need [CLS]/[SEP]/[MASK].
TOKENIZER_STYLES = {"mlm_nsp": "bert", "mlm": "bert", "clm": "causal"}
COMPONENT_FLAGS = ("norm_type", "norm_position", "position_embedding_type", "attention_type")


def model_config(
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    dropout: float = 0.0,
    max_position_embeddings: int | None = None,
    **components,
) -> HfxConfig:
    """A small HfxConfig sized to ``tokenizer``; ``components`` are HfxConfig fields such as ``norm_type``.

    ``max_position_embeddings`` defaults to ``max(256, max_length)``: evaluation prompts with
    few-shot demonstrations are longer than training blocks.
    """
    return HfxConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=max_position_embeddings or max(256, max_length),
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{k: v for k, v in components.items() if v is not None},
    )


def prepare_dataset(documents, tokenizer, objective: str, max_length: int, seed: int = 0, whole_word_mask=False):
    """``(dataset, data_collator)`` for ``objective`` from a documents dataset (see ``hfx.data.documents``)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid objectives: {list(OBJECTIVES)}.")
    if objective == "clm":
        return pack_for_causal_lm(documents, tokenizer, block_size=max_length), DataCollatorForLanguageModeling(
            tokenizer, mlm=False
        )
    require_mask_token(tokenizer)
    collator = DataCollatorForPreTraining(tokenizer, whole_word_mask=whole_word_mask, seed=seed)
    if objective == "mlm_nsp":
        return build_nsp_pairs(documents, tokenizer, max_length=max_length, seed=seed), collator
    return tokenize_for_mlm(documents, tokenizer, max_length=max_length), collator


def training_arguments(
    output_dir, max_steps: int, batch_size: int, learning_rate: float, seed: int, save_steps: int | None = None,
    logging_steps: int = 10, progress: bool = True,
) -> TrainingArguments:
    """CPU pre-training arguments; ``progress`` shows Trainer's own progress bar (steps done, rate, time left)."""
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=max(1, max_steps // 20),
        lr_scheduler_type="linear",
        weight_decay=0.01,
        logging_steps=logging_steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        seed=seed,
        data_seed=seed,
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=not progress,
    )


def checkpoint_problem(folder: Path) -> str | None:
    """Why a ``checkpoint-N`` folder cannot be resumed from, or ``None`` when its write finished.

    Trainer writes ``trainer_state.json`` after the weights, optimizer and RNG states, so a
    folder without a readable one (or with damaged weights) is a write that was cut short.
    """
    from .checkpoint_check import weights_problem

    state = folder / "trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no trainer_state.json (Trainer writes it last)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"trainer_state.json is unreadable ({type(exc).__name__})"
    if not (folder / "config.json").is_file():
        return "no config.json"
    return weights_problem(folder)


def last_checkpoint_or_error(output_dir) -> str:
    """The newest complete ``checkpoint-N`` in ``output_dir``; half-written ones are skipped with a warning."""
    folder = Path(output_dir)
    numbered = []
    if folder.is_dir():
        for path in folder.glob("checkpoint-*"):
            suffix = path.name[len("checkpoint-"):]
            if path.is_dir() and suffix.isdigit():
                numbered.append((int(suffix), path))
    for _, path in sorted(numbered, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        warnings.warn(f"--resume: skipping {path}, a checkpoint whose write did not finish: {problem}",
                      RuntimeWarning, stacklevel=2)
    if numbered:
        raise FileNotFoundError(
            f"--resume: no complete checkpoint in {str(output_dir)!r} ({len(numbered)} checkpoint-* folder(s), "
            "none finished); start again without --resume"
        )
    raise FileNotFoundError(
        f"--resume: no checkpoint-* folder in {str(output_dir)!r}; run without --resume first "
        "(with --save-steps so checkpoints are written)."
    )


class OutputDirError(ValueError):
    """An ``--output-dir`` the run may not use (the examples print it as one line, exit code 2)."""


#: The run's settings, saved to OUTPUT_DIR/RUN_ARGS_FILE when training starts: on --resume a flag
#: left out takes the saved value (not the default), so ``--resume`` alone continues the run it names.
RUN_ARGS_FILE = "pretrain_args.json"
RUN_DEFAULTS = {
    "data": "embedded",
    "dataset_config": None,
    "text_column": None,  # load_documents: the 'text' column, else a 'sentences' column
    "tokenizer": None,
    "vocab_size": 1000,
    "max_length": 64,
    "whole_word_mask": False,
    "max_steps": 300,
    "batch_size": 16,
    "learning_rate": 3e-3,
    "save_steps": 100,
    "logging_steps": 10,
    "seed": 0,
}
# A run saved before RUN_ARGS_FILE existed: these come from the checkpoint's trainer_state.json.
TRAINER_STATE_FIELDS = {"max_steps": "max_steps", "save_steps": "save_steps", "logging_steps": "logging_steps",
                        "batch_size": "train_batch_size"}
#: Everything the examples write into --output-dir, the ONLY names --overwrite removes (the whole name
#: must match): the model, tokenizer, Trainer's checkpoints and runs/, the curve, the settings file,
#: and the temporary names of an atomic write that was cut short.
RUN_OUTPUTS = (
    r"model", r"tokenizer", r"checkpoint-[0-9]+", r"tmp-checkpoint-[0-9]+", r"runs", r"loss_curve\.png",
    re.escape(RUN_ARGS_FILE),
    r"(?:model|tokenizer)\.(?:tmp|old)",  # save_pretrained_atomic's temporary folders
    r"\.loss_curve\..+\.png", r"\." + re.escape(RUN_ARGS_FILE) + r"\..+\.tmp",
)
_RUN_OUTPUT = re.compile("|".join(f"(?:{pattern})" for pattern in RUN_OUTPUTS))
# Entries that make a folder hold a run: without --resume or --overwrite it is not trained over.
_RUN_MARKER = re.compile(r"model|(?:tmp-)?checkpoint-[0-9]+")


def check_output_dir(args: argparse.Namespace) -> list[str]:
    """Check ``--output-dir`` before any data or model work; the entries ``--overwrite`` is to remove.

    Refused: a file, a path with a file among its parents, a folder that cannot be written or
    created; a folder holding a run (``model/`` or ``checkpoint-N``) without ``--resume`` or
    ``--overwrite``; ``--overwrite`` of a folder holding anything the examples do not write
    (:data:`RUN_OUTPUTS`), or whose removal would delete the ``--data`` / ``--tokenizer`` it reads.
    Nothing is removed here.
    """
    output = Path(args.output_dir)
    overwrite = getattr(args, "overwrite", False)
    if overwrite and args.resume:
        raise OutputDirError("--resume and --overwrite exclude each other: --overwrite deletes the checkpoints "
                             "--resume continues from")
    if output.exists() and not output.is_dir():
        raise OutputDirError(f"--output-dir {output} is a file, not a folder; choose a folder for the run")
    if not output.exists():
        blocked = blocking_parent(output)
        if blocked is not None:
            parent, why = blocked
            reason = "is a file, not a folder" if why == "file" else "is not writable"
            raise OutputDirError(f"--output-dir {output} cannot be created: {parent} {reason}")
        return []
    if not os.access(output, os.W_OK | os.X_OK):
        raise OutputDirError(f"--output-dir {output} is not writable")
    entries = sorted(entry.name for entry in output.iterdir())
    if overwrite:
        foreign = [name for name in entries if not _RUN_OUTPUT.fullmatch(name)]
        if foreign:
            raise OutputDirError(
                f"--overwrite: {output} holds {shown_names(foreign)}, which the pre-training examples do not write; "
                "nothing was deleted. Move them elsewhere or choose another --output-dir"
            )
        doomed = {(output / name).resolve() for name in entries}
        for flag in ("data", "tokenizer"):
            value = getattr(args, flag, None)
            if value is None or not Path(value).exists():
                continue
            source = Path(value).resolve()
            if source == output.resolve() or any(entry == source or entry in source.parents for entry in doomed):
                raise OutputDirError(f"--overwrite would delete --{flag} {value}, which lies in {output}; "
                                     "nothing was deleted. Copy it out first or choose another --output-dir")
        return entries
    runs = [name for name in entries if _RUN_MARKER.fullmatch(name)]
    if runs and not args.resume:
        raise OutputDirError(f"--output-dir {output} already holds a run ({shown_names(runs)}); pass --resume to "
                             "continue it or --overwrite to replace it")
    return []


def clear_run_outputs(output: Path, names: list[str]) -> None:
    """Remove the run outputs ``names`` (checked by :func:`check_output_dir`) from ``output``; links are unlinked."""
    for name in names:
        if not _RUN_OUTPUT.fullmatch(name):  # check_output_dir refused these already; never remove one
            raise OutputDirError(f"refusing to remove {output / name}: the pre-training examples do not write it")
        remove_entry(output / name)


def saved_settings(output_dir, checkpoint) -> dict:
    """The settings of the run in ``output_dir``: its :data:`RUN_ARGS_FILE`, else ``checkpoint``'s trainer_state.json."""
    run_file = Path(output_dir) / RUN_ARGS_FILE
    if run_file.is_file():
        try:
            saved = json.loads(run_file.read_text(encoding="utf-8"))
            problem = None if isinstance(saved, dict) else "not a JSON object"
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            problem = str(exc)
        if problem is not None:
            raise OutputDirError(f"--resume: {run_file} is damaged ({problem}); give the settings again as flags and "
                                 f"delete it, or pass --overwrite to start again")
        return {key: value for key, value in saved.items() if key in RUN_DEFAULTS}
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    return {flag: state[field] for flag, field in TRAINER_STATE_FIELDS.items() if state.get(field) is not None}


def resolve_settings(args: argparse.Namespace, saved: dict) -> argparse.Namespace:
    """A copy of ``args`` whose settings left out (None) take the saved run's value, else :data:`RUN_DEFAULTS`."""
    resolved = argparse.Namespace(**vars(args))
    for name, default in RUN_DEFAULTS.items():
        if getattr(resolved, name, None) is None:
            setattr(resolved, name, saved.get(name, default))
    return resolved


def check_steps_left(args: argparse.Namespace, given_max_steps, checkpoint) -> None:
    """Refuse a resume with nothing to train: a --max-steps at or below the checkpoint's global step."""
    step = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8")).get("global_step", 0)
    if given_max_steps is not None and given_max_steps <= step:
        raise OutputDirError(f"--resume: {checkpoint} is already at step {step}; raise --max-steps "
                             f"(given: {given_max_steps}) above {step} to train on")
    if given_max_steps is None and args.max_steps <= step and (Path(args.output_dir) / "model").exists():
        raise OutputDirError(f"--resume: the run finished: {checkpoint} is already at step {step}; raise --max-steps "
                             f"(saved: {args.max_steps}) above {step} to train on")


def settings_to_save(args: argparse.Namespace) -> dict:
    settings = {name: getattr(args, name) for name in RUN_DEFAULTS}
    for name in ("data", "tokenizer"):  # a local path is saved absolute, so a resume from elsewhere finds it
        if settings[name] is not None and Path(settings[name]).exists():
            settings[name] = str(Path(settings[name]).resolve())
    return settings


# --flag -> HfxConfig field of the model flags; on --resume they come from the checkpoint's config.json.
MODEL_FLAGS = {
    "norm_type": "norm_type",
    "norm_position": "norm_position",
    "position_embedding_type": "position_embedding_type",
    "attention_type": "attention_type",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
}
MODEL_DEFAULTS = {
    "norm_type": "layernorm",
    "norm_position": "pre",
    "position_embedding_type": "learned",
    "attention_type": "sdpa",
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
}


def resumed_config(checkpoint, args: argparse.Namespace) -> HfxConfig:
    """The model config saved with ``checkpoint``; a model flag given now must agree with it.

    A flag left out takes the checkpoint's value, not the command-line default, so ``--resume``
    alone continues any run. A flag given with another value is refused, naming each difference.
    """
    config = HfxConfig.from_pretrained(str(checkpoint))
    expected = OBJECTIVES[args.objective].__name__
    saved_architectures = list(getattr(config, "architectures", None) or [])
    if saved_architectures and expected not in saved_architectures:
        raise ValueError(
            f"--resume: {checkpoint} holds a {saved_architectures[0]}, not a {expected} (objective "
            f"{args.objective!r}); resume it with the example that started it"
        )
    differences = []
    for flag, field_name in MODEL_FLAGS.items():
        given = getattr(args, flag, None)
        if given is not None and given != getattr(config, field_name):
            differences.append(f"--{flag.replace('_', '-')} {given} (saved: {getattr(config, field_name)})")
    if differences:
        raise ValueError(
            f"--resume: the model in {checkpoint} was built with other settings: {'; '.join(differences)}. "
            "Leave these flags out to continue it, or start a new --output-dir"
        )
    return config


def model_flag(args: argparse.Namespace, flag: str):
    value = getattr(args, flag, None)
    return MODEL_DEFAULTS[flag] if value is None else value


def loss_history(trainer: Trainer) -> list[tuple[int, float]]:
    """``(step, training loss)`` pairs from ``trainer.state.log_history``."""
    return [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


def plot_loss_curves(curves: dict[str, list[tuple[int, float]]], path, title: str = "training loss") -> Path:
    """One line per curve, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        ax.plot([s for s, _ in points], [loss for _, loss in points], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    return save_figure_atomic(fig, path)


def save_figure_atomic(fig, path) -> Path:
    """Write the matplotlib figure ``fig`` to ``path`` as a PNG (100 dpi) and close it.

    Saved to a temporary sibling first and renamed into place: ``path`` is the old image or the new
    one, never a half-written file (the temporary file, ``.STEM.*.png``, is removed on failure).
    """
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_pretrained_atomic(directory, *objects) -> Path:
    """``save_pretrained`` of each object into one temporary sibling folder, then swap it into place
    (:func:`hfx.safe_paths.replace_folder`: files hfx did not write are kept, never deleted)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)

    def save(tmp: str) -> None:
        for obj in objects:
            obj.save_pretrained(tmp)

    replace_folder(directory, save)
    return directory


def write_json_atomic(data, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)
    return path


def add_arguments(parser: argparse.ArgumentParser, objective_default: str) -> argparse.ArgumentParser:
    """Flags shared by the two pre-training examples."""
    from .registry import registry

    # Data and training flags default to None too: RUN_DEFAULTS for a new run, the saved run's
    # values (RUN_ARGS_FILE) for a resumed one; see resolve_settings.
    data = parser.add_argument_group("data", "with --resume, a flag left out takes the saved run's value")
    data.add_argument("--data", help="a .txt file or folder (one sentence per line, blank line "
                      "between documents), a .json/.jsonl/.csv/.parquet file, 'embedded' (default: the corpus hfx "
                      "generates itself), or a datasets name")
    data.add_argument("--dataset-config", help="config name for a datasets name")
    data.add_argument("--text-column", help="text column of a table or datasets name; it must exist and is used "
                      "even when there is a 'sentences' column (default: 'text', else a 'sentences' column)")
    data.add_argument("--tokenizer", help="a saved tokenizer folder; default: train one on --data")
    data.add_argument("--vocab-size", type=int, help="vocabulary of a trained tokenizer (default 1000)")
    data.add_argument("--max-length", type=int, help="tokens per example / block (default 64)")

    # Model flags default to None so that --resume can tell a flag given from one left out; the
    # defaults (MODEL_DEFAULTS) apply to a new run, the checkpoint's config.json to a resumed one.
    model = parser.add_argument_group("model", "with --resume, a flag left out takes the checkpoint's value")
    model.add_argument("--objective", default=objective_default, choices=list(OBJECTIVES), help=argparse.SUPPRESS)
    model.add_argument("--norm-type", choices=registry.names("norm"), help="default: layernorm")
    model.add_argument("--norm-position", choices=["pre", "post"], help="default: pre")
    model.add_argument("--position-embedding-type", choices=registry.names("position"), help="default: learned")
    model.add_argument("--attention-type",
                       help="sdpa (default), eager, or an installed attention plugin (see `hfx plugins`)")
    model.add_argument("--hidden-size", type=int, help="default: 64")
    model.add_argument("--num-layers", type=int, help="default: 2")
    model.add_argument("--num-heads", type=int, help="default: 4")
    model.add_argument("--whole-word-mask", action="store_true", default=None,
                       help="MLM: mask whole words (BERT's WWM)")

    train = parser.add_argument_group("training", "with --resume, a flag left out takes the saved run's value")
    train.add_argument("--output-dir", required=True, help="checkpoints, final model and tokenizer go here; a folder "
                       "that holds a run needs --resume or --overwrite")
    train.add_argument("--max-steps", type=int, help="default 300; on --resume it must exceed the checkpoint's step")
    train.add_argument("--batch-size", type=int, help="default 16")
    train.add_argument("--learning-rate", type=float, help="default 3e-3")
    train.add_argument("--save-steps", type=int, help="checkpoint every N steps (0: never; default 100)")
    train.add_argument("--logging-steps", type=int, help="default 10")
    train.add_argument("--seed", type=int, help="default 0")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    train.add_argument("--overwrite", action="store_true", help="start again in an --output-dir that holds a run: "
                       "removes only what these examples wrote there (model/, tokenizer/, checkpoint-*, runs/, "
                       f"loss_curve.png, {RUN_ARGS_FILE}); any other file stops the run")
    return parser


def run_from_args(args: argparse.Namespace, callbacks=None) -> Trainer:
    """Load data, get a tokenizer, build the model and train it; saves model and tokenizer to ``--output-dir``."""
    output_dir = Path(args.output_dir)
    to_remove = check_output_dir(args)  # before any data or model work; removed once the inputs are checked
    checkpoint = last_checkpoint_or_error(output_dir) if args.resume else None
    resumed = resumed_config(checkpoint, args) if checkpoint is not None else None  # before any data is read
    given_max_steps = getattr(args, "max_steps", None)
    args = resolve_settings(args, saved_settings(output_dir, checkpoint) if checkpoint is not None else {})
    if checkpoint is not None:
        check_steps_left(args, given_max_steps, checkpoint)
    documents = load_documents(args.data, text_column=args.text_column, dataset_config=args.dataset_config)
    tokenizer_dir = output_dir / "tokenizer"
    trained_tokenizer = False
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    elif args.resume and tokenizer_dir.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    else:
        tokenizer = train_tokenizer(documents["text"], vocab_size=args.vocab_size,
                                    style=TOKENIZER_STYLES[args.objective])
        trained_tokenizer = True
    dataset, collator = prepare_dataset(
        documents, tokenizer, args.objective, args.max_length, seed=args.seed, whole_word_mask=args.whole_word_mask
    )
    if resumed is not None:
        config = resumed
    else:
        config = model_config(
            tokenizer,
            args.max_length,
            hidden_size=model_flag(args, "hidden_size"),
            num_hidden_layers=model_flag(args, "num_layers"),
            num_attention_heads=model_flag(args, "num_heads"),
            **{name: model_flag(args, name) for name in COMPONENT_FLAGS},
        )
    training_args = training_arguments(
        output_dir, args.max_steps, args.batch_size, args.learning_rate, args.seed, args.save_steps or None,
        args.logging_steps,
    )
    clear_run_outputs(output_dir, to_remove)  # --overwrite: every input is read and prepared, nothing left to fail
    if trained_tokenizer:
        save_pretrained_atomic(tokenizer_dir, tokenizer)
    write_json_atomic(settings_to_save(args), output_dir / RUN_ARGS_FILE)
    # Trainer seeds before building the model when given model_init; the same seed gives the same weights.
    trainer = Trainer(
        model_init=lambda: OBJECTIVES[args.objective](config),
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=checkpoint)
    save_pretrained_atomic(output_dir / "model", trainer.model, tokenizer)
    plot_loss_curves({args.objective: loss_history(trainer)}, output_dir / "loss_curve.png",
                     f"{args.objective} pre-training loss")
    return trainer


__all__ = [
    "MODEL_DEFAULTS",
    "OBJECTIVES",
    "RUN_ARGS_FILE",
    "RUN_DEFAULTS",
    "TOKENIZER_STYLES",
    "OutputDirError",
    "add_arguments",
    "check_output_dir",
    "loss_history",
    "model_config",
    "plot_loss_curves",
    "prepare_dataset",
    "resumed_config",
    "run_from_args",
    "save_figure_atomic",
    "save_pretrained_atomic",
    "training_arguments",
]
