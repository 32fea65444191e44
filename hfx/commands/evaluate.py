"""``hfx eval``: zero/few-shot evaluation of a causal LM on lm-evaluation-harness task files."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="zero/few-shot evaluation on lm-eval task files (same numbers as lm-eval, faster)",
        description="Evaluate a causal LM on tasks written in lm-evaluation-harness's YAML format. Tasks come from "
        "--include-path directories and from installed hfx.tasks plugins (the offline `embedded` tasks, and "
        "arc_easy, arc_challenge, hellaswag, piqa, boolq, sst2, copa when the hub is reachable). Prompts, few-shot "
        "demonstrations (seed 1234), tokenisation and metrics follow lm-eval 0.4.13. Results are cached per model "
        "identity, so an interrupted run resumes where it stopped.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="local directory or hub id of a causal LM (with its tokenizer)")
    parser.add_argument("--tasks", required=True, help="comma-separated task or tag names, e.g. embedded_facts,embedded")
    parser.add_argument("--num-fewshot", type=int, default=None, help="demonstrations per prompt (default: the task's own, else 0)")
    parser.add_argument("--include-path", action="append", default=[], help="directory (or file) of task YAMLs; repeatable")
    parser.add_argument("--batch-size", type=int, default=None, help="at most this many packed rows per forward pass")
    parser.add_argument("--max-batch-tokens", type=int, default=4096, help="token budget of one forward pass (rows × longest row)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents of each task")
    parser.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed (lm-eval's default is 1234)")
    parser.add_argument("--output", default=None, help="write lm-eval-shaped results JSON here (atomically)")
    parser.add_argument("--log-samples", action="store_true", help="also write per-document records next to --output")
    parser.add_argument("--allow-code", action="store_true", help="allow `!function` in task files (runs Python from the task directory)")
    parser.add_argument("--cache-dir", default=None, help="result cache directory (default $HFX_EVAL_CACHE or ~/.cache/hfx/eval)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the result cache")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hfx.evaluation import TaskError, evaluate, markdown_table, write_results, write_samples
    from hfx.evaluation.results import samples_path

    if args.log_samples and not args.output:
        raise SystemExit("hfx eval: --log-samples needs --output (the sample files are written next to it).")
    try:
        results, records = evaluate(
            args.model,
            args.tasks,
            num_fewshot=args.num_fewshot,
            include_path=args.include_path,
            batch_size=args.batch_size,
            max_batch_tokens=args.max_batch_tokens,
            limit=args.limit,
            seed=args.seed,
            allow_code=args.allow_code,
            cache_dir=False if args.no_cache else args.cache_dir,
            return_records=True,
        )
    except TaskError as exc:
        raise SystemExit(f"hfx eval: {exc}") from None
    if args.output:
        path = write_results(args.output, results)
        print(f"results: {path}")
        if args.log_samples:
            for task, recs in records.items():
                print(f"samples: {write_samples(samples_path(Path(args.output), task), recs)}")
    print(markdown_table(results))
    return 0
