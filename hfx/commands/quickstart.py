"""``hfx quickstart``: train a tokenizer and a tiny hfx model on the embedded corpus, save, reload, report."""

from __future__ import annotations

import argparse
from pathlib import Path

from hfx.commands import DefaultsHelpFormatter, usage_error

HELP = "end to end on the embedded corpus: tokenizer, pre-training, LoRA fine-tune, evaluation (no download)"


def add_parser(subparsers) -> None:
    from hfx.quickstart import STEPS  # the step table only: no torch, no transformers

    parser = subparsers.add_parser(
        "quickstart",
        help=HELP,
        description="Write the embedded corpus and tasks, train a BPE tokenizer on it, pre-train a tiny hfx model "
        "with Trainer, save it, reload it with AutoModel*.from_pretrained and report what happened: timings, "
        "validation loss before and after, a loss-curve PNG and where every file is (report.json). "
        "With no arguments it finishes in under 5 minutes on 2 CPU cores.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--work-dir", default="hfx-quickstart", help="where data, tokenizer, model and report go")
    parser.add_argument("--objective", default="clm", choices=["clm", "mlm_nsp"],
                        help="clm: GPT-style next-token prediction; mlm_nsp: BERT-style masked LM + next sentence")
    parser.add_argument("--norm-type", default="layernorm", help="layernorm, rmsnorm, batchnorm or a norm plugin")
    parser.add_argument("--norm-position", default="pre", choices=["pre", "post"])
    parser.add_argument("--position-embedding-type", default="rotary", help="learned, sinusoidal, rotary or a plugin")
    parser.add_argument("--attention-type", default="sdpa", help="sdpa, eager or an attention plugin (`hfx plugins`)")
    parser.add_argument("--steps", type=int, default=600, help="pre-training steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per training example")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=1000, help="upper bound; the corpus needs fewer tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; a model this small gains nothing from more, and on a busy machine "
                        "extra threads spin and slow it down")
    parser.add_argument("--skip", action="append", default=[], metavar="STEP",
                        help=f"skip a step by name (repeatable): {', '.join(name for name, _ in STEPS)}")
    parser.add_argument("--fast", action="store_true", help="ask every step to do the least that still shows it works")
    parser.set_defaults(func=run)


POSITIVE_INTS = ("steps", "batch_size", "max_length", "hidden_size", "vocab_size", "threads")


def check_args(args: argparse.Namespace) -> None:
    """Every flag checked before any file is written: one line, exit code 2."""
    from hfx.quickstart import skip_error

    problem = skip_error(args.skip)
    if problem:
        usage_error("quickstart", problem)
    for name in POSITIVE_INTS:
        if getattr(args, name) < 1:
            usage_error("quickstart", f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.learning_rate > 0:
        usage_error("quickstart", f"--learning-rate must be positive, got {args.learning_rate}")
    work_dir = Path(args.work_dir)
    if work_dir.exists() and not work_dir.is_dir():
        usage_error("quickstart", f"--work-dir {str(work_dir)!r} exists and is not a directory")
    from hfx.registry import check_component_name

    try:  # plugin names from entry-point metadata: a typo is reported before torch is imported
        check_component_name("norm", "norm_type", args.norm_type)
        check_component_name("position", "position_embedding_type", args.position_embedding_type)
    except ValueError as exc:
        usage_error("quickstart", str(exc))
    # Last: the special tokens come from the tokenizer module, which imports transformers.
    from hfx.pretraining import TOKENIZER_STYLES
    from hfx.tokenizer import CAUSAL_SPECIAL_TOKENS, SPECIAL_TOKENS

    specials = CAUSAL_SPECIAL_TOKENS if TOKENIZER_STYLES[args.objective] == "causal" else SPECIAL_TOKENS
    if args.vocab_size < len(specials):
        usage_error("quickstart", f"--vocab-size {args.vocab_size} is smaller than the {len(specials)} special "
                                  f"tokens {list(specials.values())}")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    import hfx
    from hfx.quickstart import run_quickstart, summary

    # Fail on a bad component name now, before any data or training.
    try:
        hfx.HfxConfig(
            hidden_size=args.hidden_size,
            num_attention_heads=4,
            norm_type=args.norm_type,
            norm_position=args.norm_position,
            position_embedding_type=args.position_embedding_type,
            attention_type=args.attention_type,
        )
    except ValueError as exc:
        usage_error("quickstart", str(exc))
    ctx = run_quickstart(args)
    print(summary(ctx))
    return 0
