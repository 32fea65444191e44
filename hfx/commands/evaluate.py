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
    parser.add_argument("--model", default=None,
                        help="local directory or hub id of a causal LM or an encoder-decoder (with its tokenizer); or "
                        "--model-args pretrained=")
    parser.add_argument("--model-args", nargs="+", action="extend", default=None, metavar="KEY=VALUE",
                        help="lm-eval's model arguments, 'k=v,k=v' or 'k=v k=v' (repeats add up) or a JSON object: "
                        "pretrained, dtype (float32, float16, "
                        "bfloat16, auto), revision, trust_remote_code, peft=ADAPTER_DIR, add_bos_token, max_length, "
                        "device_map, parallelize, attn_implementation, load_in_4bit, load_in_8bit, bnb_4bit_*, "
                        "backend (auto, causal, seq2seq; auto: seq2seq for an encoder-decoder)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:N, mps or auto (cuda, else mps, else cpu); default: cpu")
    parser.add_argument("--tasks", required=True,
                        help="comma-separated task, tag or group names, e.g. embedded_facts,embedded")
    parser.add_argument("--num-fewshot", type=int, default=None, help="demonstrations per prompt (default: the task's own, else 0)")
    parser.add_argument("--include-path", action="append", default=[], help="directory (or file) of task YAMLs; repeatable")
    parser.add_argument("--batch-size", type=_batch_size, default=None,
                        help="at most this many packed rows per forward pass, or auto (the budget that fits / runs "
                        "fastest, found once)")
    parser.add_argument("--max-batch-tokens", type=int, default=4096, help="token budget of one forward pass (rows × longest row)")
    parser.add_argument("--limit", type=_limit, default=None,
                        help="evaluate only the first N documents of each task, or a fraction (0.1: the first 10%%, "
                        "rounded up)")
    parser.add_argument("--samples", default=None, metavar="JSON",
                        help="document indices per task, as a JSON object ('{\"task\": [0, 5]}') or a JSON file; "
                        "not with --limit")
    parser.add_argument("--seed", default=None, metavar="SEEDS",
                        help="lm-eval's seeds: one integer for all four, or random,numpy,torch,fewshot (None leaves "
                        "one unset); default 0,1234,1234,1234")
    parser.add_argument("--gen-kwargs", nargs="+", action="extend", default=None, metavar="KEY=VALUE",
                        help="merged into every generate_until task's generation_kwargs, e.g. max_gen_toks=64 "
                        "(repeats add up)")
    parser.add_argument("--predict-only", action="store_true",
                        help="run and keep the samples (implies --log-samples), compute no metrics")
    parser.add_argument("--apply-chat-template", nargs="?", const=True, default=False, metavar="NAME",
                        help="render prompts with the tokenizer's chat template (or its template NAME)")
    parser.add_argument("--fewshot-as-multiturn", action=argparse.BooleanOptionalAction, default=None,
                        help="few-shot demonstrations as chat turns; default: on with --apply-chat-template")
    parser.add_argument("--system-instruction", default=None, metavar="TEXT", help="a system message before the prompt")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the model folder's own Python code run (model argument trust_remote_code=True)")
    parser.add_argument("--bootstrap-iters", type=int, default=100_000,
                        help="resamples for the stderr of corpus metrics (perplexity, f1, bleu, ...); 0: none")
    parser.add_argument("--output", default=None, help="write lm-eval-shaped results JSON here (atomically)")
    parser.add_argument("--log-samples", action="store_true", help="also write per-document records next to --output")
    parser.add_argument("--write-out", action="store_true", help="print the first document's prompt of every task")
    parser.add_argument("--show-config", action="store_true", help="print every task's full config after the table")
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


def _batch_size(text: str):
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: give a number of rows or auto") from None


def _limit(text: str):
    """An integer count, or a fraction below 1 (lm-eval's --limit is a float)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: give a number of documents (e.g. 100) or a "
                                         "fraction (e.g. 0.1)") from None


def _joined(values) -> str | None:
    """``--model-args a=1 b=2`` and ``--model-args a=1,b=2`` alike (as lm-eval's CLI)."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return ",".join(values)


def _merged(values, what: str):
    """Every ``--model-args`` / ``--gen-kwargs`` value (repeats included) as one: the ``k=v,k=v`` text, or a dict
    when one of them is a JSON object; a key given twice is refused (EvaluationInputError)."""
    if not values or not any(v.lstrip().startswith("{") for v in values):
        return _joined(values)
    from hfx.evaluation.model_args import parse_pairs

    merged: dict = {}
    for value in values:
        for key, item in parse_pairs(value, what).items():
            if key in merged:
                from hfx.evaluation import EvaluationInputError

                raise EvaluationInputError(f"{what}: {key!r} is given twice ({merged[key]!r} and {item!r}); "
                                           "give it once.")
            merged[key] = item
    return merged


def _with_trust_remote_code(model_args):
    """``--trust-remote-code`` as the model argument ``trust_remote_code=True``, whatever form --model-args took."""
    from hfx.evaluation import EvaluationInputError
    from hfx.evaluation.model_args import parse_pairs

    merged = parse_pairs(model_args, "--model-args")
    if merged.get("trust_remote_code", True) is not True:
        raise EvaluationInputError(f"--trust-remote-code and --model-args trust_remote_code="
                                   f"{merged['trust_remote_code']!r} disagree; give one.")
    return {**merged, "trust_remote_code": True}


def _check_args(args: argparse.Namespace) -> None:
    """Every argument checked before a task file is read or the model is touched."""
    from hfx.commands import usage_error

    batch = None if args.batch_size == "auto" else args.batch_size
    for flag, value, minimum in (("--num-fewshot", args.num_fewshot, 0), ("--batch-size", batch, 1),
                                 ("--max-batch-tokens", args.max_batch_tokens, 1)):
        if value is not None and value < minimum:
            usage_error("eval", f"{flag} must be at least {minimum}, got {value}")
    limit = args.limit
    if limit is not None and not (0 < limit < 1 or (limit >= 1 and float(limit).is_integer())):
        if float(limit).is_integer() or limit < 1:
            usage_error("eval", f"--limit must be at least 1, got {limit} (or a fraction 0 < x < 1 of each task's "
                        "documents)")
        usage_error("eval", f"--limit {limit}: give a whole number of documents (>= 1) or a fraction 0 < x < 1 "
                    "of each task's documents")
    if args.bootstrap_iters < 0:
        usage_error("eval", f"--bootstrap-iters must be at least 0 (0: no bootstrap stderr), got {args.bootstrap_iters}")
    if args.seed is not None and args.seed.strip().lstrip("-").isdigit() and not 0 <= int(args.seed) < 2**63:
        usage_error("eval", f"--seed must be in [0, 2**63), got {args.seed}")
    if args.samples is not None and args.limit is not None:
        usage_error("eval", "--samples and --limit both choose documents; give one (as lm-eval)")
    if args.predict_only:
        args.log_samples = True  # lm-eval: predictions are what a predict-only run is for
        if not args.output:
            usage_error("eval", "--predict-only needs --output (its samples are written next to it)")
    if not [t for t in args.tasks.split(",") if t.strip()]:
        usage_error("eval", f"--tasks {args.tasks!r} names no task; give comma-separated task or tag names, "
                    "e.g. --tasks embedded_facts,embedded_arithmetic (hfx plugins lists the task plugins)")
    if args.model is None and "pretrained=" not in (_joined(args.model_args) or "") and not any(
            v.lstrip().startswith("{") for v in args.model_args or ()):
        usage_error("eval", "the following arguments are required: --model (or --model-args pretrained=...)")
    if args.model is not None and not args.model.strip():
        usage_error("eval", "--model is empty; give a model folder or hub id")
    if args.log_samples and not args.output:
        usage_error("eval", "--log-samples needs --output (the sample files are written next to it)")
    if args.no_cache and args.cache_dir:
        usage_error("eval", "--no-cache and --cache-dir contradict each other; give one")


def run(args: argparse.Namespace) -> int:
    import json
    import os
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
        model_args = _merged(args.model_args, "--model-args")
        if args.trust_remote_code:
            model_args = _with_trust_remote_code(model_args)
        gen_kwargs = _merged(args.gen_kwargs, "--gen-kwargs")
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
            model_args=model_args,
            device=args.device,
            samples=args.samples,
            predict_only=args.predict_only,
            gen_kwargs=gen_kwargs,
            apply_chat_template=args.apply_chat_template,
            fewshot_as_multiturn=args.fewshot_as_multiturn,
            system_instruction=args.system_instruction,
            write_out=args.write_out,
        )
    except (TaskError, CheckpointError, EvaluationInputError, OutputPathError) as exc:
        usage_error("eval", str(exc))
    if results["config"].get("world_size", 1) > 1 and int(os.environ.get("RANK", "0")) != 0:
        return 0  # every rank holds the merged results; rank 0 alone writes and prints them
    if args.output:
        path = write_results(args.output, results)
        print(f"results: {path}")
        if args.log_samples:
            for task, recs in records.items():
                print(f"samples: {write_samples(samples_path(Path(args.output), task), recs)}")
    print(markdown_table(results))
    if args.show_config:
        for name, config in results["configs"].items():
            print(f"{name}: {json.dumps(config, indent=2, default=str, ensure_ascii=False)}")
    return 0
