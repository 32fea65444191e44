"""BERT-style pre-training of an hfx model with Trainer: masked LM (15%; 80/10/10) + next-sentence prediction.

    python examples/pretrain_bert_style.py --output-dir runs/bert                # embedded corpus
    python examples/pretrain_bert_style.py --data my_texts/ --output-dir runs/bert --norm-type batchnorm
    python examples/pretrain_bert_style.py --output-dir runs/bert --resume        # continue after a stop
    python examples/pretrain_bert_style.py --output-dir runs/bert --resume --max-steps 600   # train longer

--data takes a .txt file or folder (one sentence per line, a blank line between documents), a
.json/.jsonl/.csv/.parquet file with --text-column, 'embedded', or a datasets name. The model,
with its tokenizer, is saved to OUTPUT_DIR/model and loads with AutoModelForPreTraining (or
AutoModelForMaskedLM) after `import hfx`; OUTPUT_DIR/loss_curve.png shows training. The tokenizer trained here is BERT-style:
`[CLS] A [SEP]`, pairs `[CLS] A [SEP] B [SEP]`, and a `[MASK]` token.
With --resume the model is rebuilt from the checkpoint's config.json: model flags may be left out,
and data and training flags left out take the saved run's values (OUTPUT_DIR/pretrain_args.json).
An OUTPUT_DIR that holds a run needs --resume, or --overwrite (removes only what this script wrote).
"""

import argparse
import sys

from hfx.pretraining import add_arguments, run_from_args


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, objective_default="mlm_nsp")
    run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError) as exc:  # bad input: one line, argparse's exit code
        print(f"pretrain_bert_style.py: error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(2)
