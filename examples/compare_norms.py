"""LayerNorm vs RMSNorm vs BatchNorm vs PowerNorm vs DyT, answered by measurement: same tiny model, seed, data, steps.

    python examples/compare_norms.py --output-dir runs/norms
    python examples/compare_norms.py --output-dir runs/norms --objective mlm --batch-sizes 32 4 --steps 600

Only ``norm_type`` changes between runs, once per ``--batch-sizes`` entry (the articles' claim is
that BatchNorm suffers with small batches). Writes OUTPUT_DIR/norms.md and norms.json (final
training loss, validation loss in eval mode, and the train/eval gap per norm and batch size) and
OUTPUT_DIR/norms.png (training-loss curves, one panel per batch size).

The train/eval gap is the validation loss with the norms in training mode (batch statistics, as
during training; dropout stays off) minus the loss in eval mode (running statistics), each batch
starting from the trained state. Per-token norms (layernorm, rmsnorm, dyt) have none by construction.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, Trainer

from hfx.data import load_documents
from hfx.pretraining import (
    OBJECTIVES,
    TOKENIZER_STYLES,
    loss_history,
    model_config,
    prepare_dataset,
    save_figure_atomic,
    save_pretrained_atomic,
    training_arguments,
    write_json_atomic,
)
from hfx.registry import registry
from hfx.tokenizer import train_tokenizer

#: The default comparison, in the order docs/norms.md shows; --norms takes any installed norm (registry.names("norm")).
NORMS = ("layernorm", "rmsnorm", "batchnorm", "batchnorm_causal", "powernorm", "dyt")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--data", default="embedded", help="as in pretrain_*_style.py (default: embedded corpus)")
    parser.add_argument("--objective", default="clm", choices=["clm", "mlm"])
    parser.add_argument("--norms", nargs="+", default=list(NORMS), choices=registry.names("norm"), metavar="NORM",
                        help=f"installed norms to compare (default: {' '.join(NORMS)})")
    parser.add_argument("--norm-position", default="pre", choices=["pre", "post"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 2])
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="an HfxConfig field for every run, e.g. --set dyt_alpha_init=2.0 (value read as JSON, "
                             "else as a string); repeatable")
    args = parser.parse_args(argv)
    args.overrides = dict(_override(parser, item) for item in args.overrides)
    return args


def _override(parser, item: str) -> tuple[str, object]:
    field, sep, text = item.partition("=")
    if not sep or not field:
        parser.error(f"--set {item!r} is invalid; valid values: FIELD=VALUE, e.g. --set powernorm_warmup_steps=50")
    if field in ("norm_type", "norm_position", "position_embedding_type", "hidden_size"):
        parser.error(f"--set {field}=... is invalid: {field} is set by the comparison itself (see --norms and --help)")
    try:
        return field, json.loads(text)
    except json.JSONDecodeError:
        return field, text


def model_init(model_class, config):
    """Trainer seeds, then builds the model: every norm starts from the same random stream."""
    return lambda: model_class(config)


POSITION_BUCKETS = ((0, 1), (1, 4), (4, 16), (16, None))
"""Token positions grouped for the per-position train/eval gap: early positions have the fewest tokens in a
causal norm's cumulative statistics."""


def validation_loss(model, dataset, collator, batch_size: int, objective: str, norms_in_train_mode: bool = False):
    """Mean loss over ``dataset`` and the mean token loss per position bucket (``POSITION_BUCKETS``).

    With ``norms_in_train_mode`` the norms use batch statistics, their buffers (running statistics,
    step counts) restored before every batch so that no batch sees statistics another one moved, and
    after the last; dropout stays off, and the model is left in eval mode.
    """
    model.eval()
    trained = {}
    if norms_in_train_mode:
        # a train-mode forward changes buffers only (no_grad: no parameter moves)
        trained = {name: buffer.clone() for name, buffer in model.named_buffers()}
        for module in model.modules():
            if getattr(module, "_hfx_norm", False):
                module.train()
    try:
        return _validation_loss(model, dataset, collator, batch_size, objective, trained)
    finally:
        _restore_buffers(model, trained)
        model.eval()


def _restore_buffers(model, saved: dict) -> None:
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in saved:
                buffer.copy_(saved[name])


def _validation_loss(model, dataset, collator, batch_size: int, objective: str, trained: dict):
    total, count = 0.0, 0
    position_sums, position_counts = None, None
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            _restore_buffers(model, trained)
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            output = model(**batch)
            total += output.loss.item()
            count += 1
            logits, labels = output.logits.float(), batch["labels"]
            if objective == "clm":  # the logits at position t predict the token at t + 1
                logits, labels = logits[:, :-1], labels[:, 1:]
            token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
            real = labels != -100
            sums, counts = (token_loss * real).sum(0), real.sum(0)
            if position_sums is None:
                position_sums, position_counts = torch.zeros_like(sums), torch.zeros_like(counts)
            width = min(len(sums), len(position_sums))
            position_sums[:width] += sums[:width]
            position_counts[:width] += counts[:width]
    buckets = {}
    for low, high in POSITION_BUCKETS:
        n = position_counts[low:high].sum().item()
        last = (high or len(position_sums)) - 1
        if n:
            buckets[str(low) if last == low else f"{low}-{last}"] = position_sums[low:high].sum().item() / n
    return total / count, buckets


def plot_panels(curves: dict[str, list[tuple[int, float]]], rows: dict[str, dict], path: Path, title: str) -> None:
    """Training-loss curves, one panel per batch size, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["batch_size"] for r in rows.values()}, reverse=True)
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False, sharey=True)
    for ax, size in zip(axes[0], sizes):
        for name, points in curves.items():
            if rows[name]["batch_size"] == size:
                ax.plot([s for s, _ in points], [loss for _, loss in points], label=rows[name]["norm"])
        ax.set_title(f"batch size {size}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("training loss")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure_atomic(fig, path)


def main(argv=None) -> dict[str, dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    train_docs = load_documents(args.data)
    validation_docs = load_documents(args.data, split="validation") if args.data == "embedded" else train_docs
    tokenizer_dir = output_dir / "tokenizer"
    if not tokenizer_dir.is_dir():
        tokenizer = train_tokenizer(train_docs["text"], vocab_size=1000, style=TOKENIZER_STYLES[args.objective])
        save_pretrained_atomic(tokenizer_dir, tokenizer)
    # One saved tokenizer for every run, reloaded the way a user would.
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    train_set, collator = prepare_dataset(train_docs, tokenizer, args.objective, args.max_length, seed=args.seed)
    validation_set, _ = prepare_dataset(validation_docs, tokenizer, args.objective, args.max_length, seed=args.seed)

    curves, rows = {}, {}
    for norm, batch_size in [(n, b) for b in args.batch_sizes for n in args.norms]:
        name = f"{norm}, batch {batch_size}"
        config = model_config(tokenizer, args.max_length, hidden_size=args.hidden_size, norm_type=norm,
                              norm_position=args.norm_position, position_embedding_type="rotary",
                              **args.overrides)
        trainer = Trainer(
            model_init=model_init(OBJECTIVES[args.objective], config),
            args=training_arguments(output_dir / f"run-{norm}-{batch_size}", args.steps, batch_size, args.learning_rate,
                                    args.seed, logging_steps=max(1, args.steps // 40)),
            train_dataset=train_set,
            data_collator=collator,
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        curves[name] = loss_history(trainer)
        tail = [loss for _, loss in curves[name][-5:]]
        # Validation at the training batch size: train-mode batch statistics depend on it.
        eval_loss, eval_positions = validation_loss(trainer.model, validation_set, collator, batch_size, args.objective)
        train_mode_loss, train_positions = validation_loss(trainer.model, validation_set, collator, batch_size,
                                                           args.objective, norms_in_train_mode=True)
        rows[name] = {
            "norm": norm,
            "batch_size": batch_size,
            "final_train_loss": sum(tail) / len(tail),
            "validation_loss": eval_loss,
            "train_mode_validation_loss": train_mode_loss,
            "train_eval_gap": train_mode_loss - eval_loss,
            "train_eval_gap_by_position": {k: train_positions[k] - v for k, v in eval_positions.items()},
            "validation_loss_by_position": eval_positions,
            "seconds": seconds,
        }
        print(f"{name}: {rows[name]}", flush=True)

    plot_panels(curves, rows, output_dir / "norms.png", f"{args.objective}, {args.norm_position}-norm, {args.steps} steps")
    table = ("| norm | batch size | final train loss (mean of last 5 logs) | validation loss (eval mode) "
             "| train/eval gap | train s |\n")
    table += "|---|---|---|---|---|---|\n"
    table += "".join(
        f"| {r['norm']} | {r['batch_size']} | {r['final_train_loss']:.3f} | {r['validation_loss']:.3f} "
        f"| {r['train_eval_gap']:+.3f} | {r['seconds']:.0f} |\n"
        for r in rows.values()
    )
    buckets = list(next(iter(rows.values()))["train_eval_gap_by_position"])
    table += "\nTrain/eval gap (train-mode minus eval-mode token loss) by position:\n\n"
    table += "| norm | batch size | " + " | ".join(f"positions {b}" for b in buckets) + " |\n"
    table += "|---|---|" + "---|" * len(buckets) + "\n"
    table += "".join(
        f"| {r['norm']} | {r['batch_size']} | "
        + " | ".join(f"{r['train_eval_gap_by_position'][b]:+.3f}" for b in buckets) + " |\n"
        for r in rows.values()
    )
    command = "python examples/compare_norms.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = f"Command: `{command}`\n\n{table}\n![loss curves](norms.png)\n"
    tmp = output_dir / ".norms.md.tmp"
    tmp.write_text(text)
    tmp.replace(output_dir / "norms.md")
    write_json_atomic({"command": command, "runs": list(rows.values())}, output_dir / "norms.json")
    print(table)
    return rows


if __name__ == "__main__":
    main()
