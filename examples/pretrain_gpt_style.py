"""GPT-style pre-training of an hfx model with Trainer: next-token prediction on EOS-separated packed blocks.

    python examples/pretrain_gpt_style.py --output-dir runs/gpt                   # embedded corpus
    python examples/pretrain_gpt_style.py --data corpus.txt --output-dir runs/gpt --position-embedding-type rotary
    python examples/pretrain_gpt_style.py --output-dir runs/gpt --resume           # continue after a stop
    python examples/pretrain_gpt_style.py --output-dir runs/gpt --resume --max-steps 600   # train longer

--data takes a .txt file or folder (one sentence per line, a blank line between documents), a
.json/.jsonl/.csv/.parquet file with --text-column, 'embedded', or a datasets name. The model,
with its tokenizer, is saved to OUTPUT_DIR/model and loads with AutoModelForCausalLM after
`import hfx`; OUTPUT_DIR/loss_curve.png shows training. The tokenizer trained here is GPT-style:
it adds no special tokens around a text, and documents are separated by its EOS token `</s>`.
With --resume the model is rebuilt from the checkpoint's config.json: model flags may be left out,
and data and training flags left out take the saved run's values (OUTPUT_DIR/pretrain_args.json).
An OUTPUT_DIR that holds a run needs --resume, or --overwrite (removes only what this script wrote).
"""

import argparse
import sys

from hfx.pretraining import add_arguments, run_from_args


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, objective_default="clm")
    run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError) as exc:  # bad input: one line, argparse's exit code
        print(f"pretrain_gpt_style.py: error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(2)
