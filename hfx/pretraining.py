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
import shutil
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

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    """``save_pretrained`` of each object into one temporary sibling folder, then swap it into place."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        for obj in objects:
            obj.save_pretrained(str(tmp))
        if directory.exists():
            old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old."))
            os.replace(directory, old / directory.name)
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
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

    data = parser.add_argument_group("data")
    data.add_argument("--data", default="embedded", help="a .txt file or folder (one sentence per line, blank line "
                      "between documents), a .json/.jsonl/.csv/.parquet file, 'embedded' (default: the corpus hfx "
                      "generates itself), or a datasets name")
    data.add_argument("--dataset-config", default=None, help="config name for a datasets name")
    data.add_argument("--text-column", default="text", help="text column of a table or datasets name (default: text)")
    data.add_argument("--tokenizer", default=None, help="a saved tokenizer folder; default: train one on --data")
    data.add_argument("--vocab-size", type=int, default=1000, help="vocabulary of a trained tokenizer (default 1000)")
    data.add_argument("--max-length", type=int, default=64, help="tokens per example / block (default 64)")

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
    model.add_argument("--whole-word-mask", action="store_true", help="MLM: mask whole words (BERT's WWM)")

    train = parser.add_argument_group("training")
    train.add_argument("--output-dir", required=True, help="checkpoints, final model and tokenizer go here")
    train.add_argument("--max-steps", type=int, default=300)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--learning-rate", type=float, default=3e-3)
    train.add_argument("--save-steps", type=int, default=100, help="checkpoint every N steps (0: never)")
    train.add_argument("--logging-steps", type=int, default=10)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    return parser


def run_from_args(args: argparse.Namespace, callbacks=None) -> Trainer:
    """Load data, get a tokenizer, build the model and train it; saves model and tokenizer to ``--output-dir``."""
    output_dir = Path(args.output_dir)
    checkpoint = last_checkpoint_or_error(output_dir) if args.resume else None
    resumed = resumed_config(checkpoint, args) if checkpoint is not None else None  # before any data is read
    documents = load_documents(args.data, text_column=args.text_column, dataset_config=args.dataset_config)
    tokenizer_dir = output_dir / "tokenizer"
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    elif args.resume and tokenizer_dir.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    else:
        tokenizer = train_tokenizer(documents["text"], vocab_size=args.vocab_size,
                                    style=TOKENIZER_STYLES[args.objective])
        save_pretrained_atomic(tokenizer_dir, tokenizer)
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
    "TOKENIZER_STYLES",
    "add_arguments",
    "loss_history",
    "model_config",
    "plot_loss_curves",
    "prepare_dataset",
    "resumed_config",
    "run_from_args",
    "save_pretrained_atomic",
    "training_arguments",
]
