"""``hfx convert-long``: turn a local BERT/RoBERTa-style checkpoint into a long-context one."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert-long",
        help="extend a BERT/RoBERTa checkpoint to long inputs (sliding window + global [CLS])",
        description="Copy the learned position embeddings until max_position_embeddings is reached (as the "
        "Longformer paper did for RoBERTa) and switch attention to hfx_sliding_window with the [CLS]/<s> token "
        "global. The output is a stock checkpoint whose config.json names attn_implementation=hfx_sliding_window: "
        "hfx eval, hfx finetune and hfx.long_context.load_long_model(path) load it with the long backend and the "
        "global tokens active; plain transformers code (AutoModel.from_pretrained, pipeline) does too after "
        "`import hfx` (without it transformers refuses the name), then needs "
        "hfx_attention.attach_global_token_ids(model) once for the global tokens. Inputs of at most "
        "attention_window/2 + 1 tokens give the same outputs as the original model.",
    )
    parser.add_argument("source", help="directory of the saved short model (config.json + weights)")
    parser.add_argument("output", help="new (or empty) folder to write the long model to")
    parser.add_argument("--max-position-embeddings", type=int, default=4096, help="new length limit (default 4096)")
    parser.add_argument("--attention-window", type=int, default=512, help="total window, even (default 512)")
    parser.add_argument(
        "--global-token-id", type=int, action="append", dest="global_token_ids",
        help="token id that always attends globally (repeatable; default: the tokenizer's [CLS]/<s>)",
    )
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier convert-long output (a folder with hfx_convert_long.json that holds "
                        "only the files it lists); any other existing output is refused")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    import hfx  # noqa: F401
    from hfx.long_context import MARKER_FILE, ConvertLongError, convert_to_long

    try:
        out = convert_to_long(
            args.source, args.output, args.max_position_embeddings, args.attention_window, args.global_token_ids,
            overwrite=args.overwrite,
        )
    except ConvertLongError as exc:
        print(f"hfx convert-long: error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    files = sorted(p.name for p in out.iterdir() if p.name != MARKER_FILE)
    print(f"wrote {out}: {len(files)} files ({', '.join(files)}); max_position_embeddings={args.max_position_embeddings}, "
          f"attention_window={args.attention_window}; loads with hfx_sliding_window after `import hfx`")
    return 0
