"""LayerNorm vs RMSNorm vs BatchNorm, answered by measurement: the same tiny hfx model, seed, data and steps.

    python examples/compare_norms.py --output-dir runs/norms
    python examples/compare_norms.py --output-dir runs/norms --objective mlm --batch-sizes 32 4 --steps 600

Only ``norm_type`` changes between runs, once per ``--batch-sizes`` entry (the articles' claim is
that BatchNorm suffers with small batches). Writes OUTPUT_DIR/norms.md (final training loss and
validation loss per norm and batch size; BatchNorm is evaluated with its running statistics)
and OUTPUT_DIR/norms.png (training-loss curves).
"""

from __future__ import annotations

import argparse
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
    plot_loss_curves,
    prepare_dataset,
    save_pretrained_atomic,
    training_arguments,
)
from hfx.tokenizer import train_tokenizer

NORMS = ("layernorm", "rmsnorm", "batchnorm")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--data", default="embedded", help="as in pretrain_*_style.py (default: embedded corpus)")
    parser.add_argument("--objective", default="clm", choices=["clm", "mlm"])
    parser.add_argument("--norms", nargs="+", default=list(NORMS))
    parser.add_argument("--norm-position", default="pre", choices=["pre", "post"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 2])
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def model_init(model_class, config):
    """Trainer seeds, then builds the model: every norm starts from the same random stream."""
    return lambda: model_class(config)


def validation_loss(model, dataset, collator, batch_size: int) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            total += model(**batch).loss.item()
            count += 1
    return total / count


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
                              norm_position=args.norm_position, position_embedding_type="rotary")
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
        rows[name] = {
            "norm": norm,
            "batch_size": batch_size,
            "final_train_loss": sum(tail) / len(tail),
            "validation_loss": validation_loss(trainer.model, validation_set, collator, 16),
            "seconds": seconds,
        }
        print(f"{name}: {rows[name]}", flush=True)

    plot_loss_curves(curves, output_dir / "norms.png", f"{args.objective}, {args.norm_position}-norm, {args.steps} steps")
    table = "| norm | batch size | final train loss (mean of last 5 logs) | validation loss | train s |\n"
    table += "|---|---|---|---|---|\n"
    table += "".join(
        f"| {r['norm']} | {r['batch_size']} | {r['final_train_loss']:.3f} | {r['validation_loss']:.3f} "
        f"| {r['seconds']:.0f} |\n"
        for r in rows.values()
    )
    command = "python examples/compare_norms.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = f"Command: `{command}`\n\n{table}\n![loss curves](norms.png)\n"
    tmp = output_dir / ".norms.md.tmp"
    tmp.write_text(text)
    tmp.replace(output_dir / "norms.md")
    print(table)
    return rows


if __name__ == "__main__":
    main()
