"""``hfx eval``: zero/few-shot evaluation of a causal LM on lm-evaluation-harness task files."""

from __future__ import annotations

import argparse

from hfx.commands import DefaultsHelpFormatter


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="zero/few-shot evaluation on lm-eval task files (same numbers as lm-eval, faster)",
        description="Evaluate a causal LM on tasks written in lm-evaluation-harness's YAML format. Tasks come from "
        "--include-path directories and from installed hfx.tasks plugins (the offline `embedded` tasks, and "
        "arc_easy, arc_challenge, hellaswag, piqa, boolq, sst2, copa when the hub is reachable). Prompts, few-shot "
        "demonstrations (seed 1234), tokenisation and metrics follow lm-eval 0.4.13. Results are cached per model "
        "identity, so an interrupted run resumes where it stopped.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="local directory or hub id of a causal LM (with its tokenizer)")
    parser.add_argument("--tasks", required=True,
                        help="comma-separated task, tag or group names, e.g. embedded_facts,embedded")
    parser.add_argument("--num-fewshot", type=int, default=None, help="demonstrations per prompt (default: the task's own, else 0)")
    parser.add_argument("--include-path", action="append", default=[], help="directory (or file) of task YAMLs; repeatable")
    parser.add_argument("--batch-size", type=int, default=None, help="at most this many packed rows per forward pass")
    parser.add_argument("--max-batch-tokens", type=int, default=4096, help="token budget of one forward pass (rows × longest row)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents of each task")
    parser.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed (lm-eval's default is 1234)")
    parser.add_argument("--bootstrap-iters", type=int, default=100_000,
                        help="resamples for the stderr of corpus metrics (perplexity, f1, bleu, ...); 0: none")
    parser.add_argument("--output", default=None, help="write lm-eval-shaped results JSON here (atomically)")
    parser.add_argument("--log-samples", action="store_true", help="also write per-document records next to --output")
    parser.add_argument("--skip-unsupported", action="store_true",
                        help="run the tasks that can run and list the others (and groups left without an aggregate) "
                        "as skipped, instead of refusing the run")
    parser.add_argument("--allow-code", action="store_true", help="allow `!function` in task files (runs Python from the task directory)")
    parser.add_argument("--cache-dir", default=None, help="result cache directory (default $HFX_EVAL_CACHE or ~/.cache/hfx/eval)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the result cache")
    parser.add_argument("--add-bos-token", action=argparse.BooleanOptionalAction, default=None,
                        help="lm-eval's add_bos_token: encode with (or, --no-add-bos-token, without) the tokenizer's "
                        "special tokens; default: the tokenizer's own behaviour")
    parser.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    """Every argument checked before a task file is read or the model is touched."""
    from hfx.commands import usage_error

    for flag, value, minimum in (("--num-fewshot", args.num_fewshot, 0), ("--limit", args.limit, 1),
                                 ("--batch-size", args.batch_size, 1), ("--max-batch-tokens", args.max_batch_tokens, 1)):
        if value is not None and value < minimum:
            usage_error("eval", f"{flag} must be at least {minimum}, got {value}")
    if args.bootstrap_iters < 0:
        usage_error("eval", f"--bootstrap-iters must be at least 0 (0: no bootstrap stderr), got {args.bootstrap_iters}")
    if not 0 <= args.seed < 2**63:
        usage_error("eval", f"--seed must be in [0, 2**63), got {args.seed}")
    if not [t for t in args.tasks.split(",") if t.strip()]:
        usage_error("eval", f"--tasks {args.tasks!r} names no task; give comma-separated task or tag names, "
                    "e.g. --tasks embedded_facts,embedded_arithmetic (hfx plugins lists the task plugins)")
    if not args.model.strip():
        usage_error("eval", "--model is empty; give a model folder or hub id")
    if args.log_samples and not args.output:
        usage_error("eval", "--log-samples needs --output (the sample files are written next to it)")
    if args.no_cache and args.cache_dir:
        usage_error("eval", "--no-cache and --cache-dir contradict each other; give one")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hfx.commands import usage_error

    _check_args(args)
    from hfx.checkpoint_check import CheckpointError
    from hfx.evaluation import (
        EvaluationInputError,
        TaskError,
        check_output_path,
        evaluate,
        markdown_table,
        write_results,
        write_samples,
    )
    from hfx.evaluation.results import OutputPathError, samples_path

    try:
        if args.output:
            check_output_path(args.output)
        results, records = evaluate(
            args.model,
            args.tasks,
            num_fewshot=args.num_fewshot,
            include_path=args.include_path,
            batch_size=args.batch_size,
            max_batch_tokens=args.max_batch_tokens,
            limit=args.limit,
            seed=args.seed,
            bootstrap_iters=args.bootstrap_iters,
            allow_code=args.allow_code,
            cache_dir=False if args.no_cache else args.cache_dir,
            return_records=True,
            add_bos_token=args.add_bos_token,
            skip_unsupported=args.skip_unsupported,
        )
    except (TaskError, CheckpointError, EvaluationInputError, OutputPathError) as exc:
        usage_error("eval", str(exc))
    if args.output:
        path = write_results(args.output, results)
        print(f"results: {path}")
        if args.log_samples:
            for task, recs in records.items():
                print(f"samples: {write_samples(samples_path(Path(args.output), task), recs)}")
    print(markdown_table(results))
    return 0
