"""Transformer-XL training with Trainer: one long text read segment by segment, the memory carried across steps.

    python examples/train_segments.py --output-dir runs/xl                              # rotary, memory 32
    python examples/train_segments.py --output-dir runs/xl --position-embedding-type xl_relative
    python examples/train_segments.py --output-dir runs/xl --memory-length 64 --max-steps 400

The embedded corpus (hfx.data) is joined into one token stream (documents separated by EOS) and cut, as in XL,
into --batch-size parallel rows; step s trains on segment s of every row. Trainer's sampler is set to
"sequential" so that batches come in stream order, and SegmentTrainer passes the memory of step s - 1 to
step s (detached: each step costs one segment plus at most --memory-length keys, whatever the text length).
At the end the validation stream is scored twice with the trained weights, segment by segment with and
without memory; the model is saved to OUTPUT_DIR/model (loads with AutoModelForCausalLM after `import hfx`).
"""

import argparse
import math
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

import hfx
from hfx.data import embedded_corpus
from hfx.tokenizer import train_tokenizer


def token_stream(tokenizer, rows) -> torch.Tensor:
    """Every document's tokens, in corpus order, each followed by EOS."""
    ids = []
    for row in rows:
        ids.extend(tokenizer(row["text"])["input_ids"] + [tokenizer.eos_token_id])
    return torch.tensor(ids)


def batchify(stream: torch.Tensor, rows: int, segment_length: int) -> torch.Tensor:
    """(rows, segments * segment_length): row b is the b-th contiguous slice of the stream (XL's batchify)."""
    per_row = (stream.numel() // rows) // segment_length * segment_length
    return stream[: rows * per_row].view(rows, per_row)


class SegmentDataset(torch.utils.data.Dataset):
    """Example k = segment k // rows of row k % rows: with the sequential sampler and batch size = rows, batch s
    is segment s of every row, the rows always in the same order (the memory's batch axis)."""

    def __init__(self, rows: torch.Tensor, segment_length: int):
        self.rows, self.length = rows, segment_length
        self.segments = rows.shape[1] // segment_length

    def __len__(self):
        return self.rows.shape[0] * self.segments

    def __getitem__(self, k):
        segment, row = divmod(k, self.rows.shape[0])
        ids = self.rows[row, segment * self.length : (segment + 1) * self.length]
        return {"input_ids": ids, "labels": ids}


class SegmentTrainer(Trainer):
    """Trainer that hands each step the memory the previous step left (reset at each epoch: the stream restarts)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.memory = None  # the SegmentMemory of the last step, on this trainer (not on the model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs, past_key_values=self.memory, num_items_in_batch=num_items_in_batch)
        self.memory = outputs.past_key_values
        return (outputs.loss, outputs) if return_outputs else outputs.loss


class MemoryLog(TrainerCallback):
    """Reset the memory at every epoch (the stream starts again); log how many positions it holds."""

    def __init__(self, trainer: SegmentTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer.memory = None

    def on_step_end(self, args, state, control, **kwargs):
        memory = self.trainer.memory
        if state.global_step % args.logging_steps == 0 and memory is not None:
            print(f"step {state.global_step}: memory holds {memory.memory_size()} positions per layer "
                  f"({memory.seen_tokens} positions of each row read this epoch)")


@torch.no_grad()
def perplexity(model, rows: torch.Tensor, segment_length: int, use_memory: bool) -> float:
    model.eval()
    memory, total, count = None, 0.0, 0
    for start in range(0, rows.shape[1], segment_length):
        ids = rows[:, start : start + segment_length]
        out = model(ids, labels=ids, past_key_values=memory if use_memory else None)
        memory = out.past_key_values
        n = ids.numel() - ids.shape[0]
        total, count = total + out.loss.item() * n, count + n
    return math.exp(total / count)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--position-embedding-type", default="rotary", choices=["rotary", "xl_relative"])
    parser.add_argument("--memory-length", type=int, default=32)
    parser.add_argument("--segment-length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="parallel rows of the stream")
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("segment_length", "batch_size", "max_steps", "hidden_size", "layers"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid; valid values: an integer > 0")
    if args.memory_length < 0:
        parser.error(f"--memory-length={args.memory_length} is invalid; valid values: an integer >= 0 (0: no memory)")

    corpus = embedded_corpus()
    tokenizer = train_tokenizer([r["text"] for r in corpus["corpus_train"]], vocab_size=500, style="causal")
    train_rows = batchify(token_stream(tokenizer, corpus["corpus_train"]), args.batch_size, args.segment_length)
    valid_rows = batchify(token_stream(tokenizer, corpus["corpus_validation"]), 4, args.segment_length)
    torch.manual_seed(args.seed)
    config = hfx.HfxConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_attention_heads=4, intermediate_size=4 * args.hidden_size, norm_position="pre", type_vocab_size=0,
        position_embedding_type=args.position_embedding_type, memory_length=args.memory_length,
        attention_type="eager" if args.position_embedding_type == "xl_relative" else "sdpa",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    model = hfx.HfxForCausalLM(config)
    dataset = SegmentDataset(train_rows, args.segment_length)
    print(f"stream: {train_rows.numel()} tokens in {args.batch_size} rows of {dataset.segments} segments of "
          f"{args.segment_length}; memory_length={args.memory_length}, {args.position_embedding_type}")
    training = TrainingArguments(
        output_dir=str(Path(args.output_dir) / "checkpoints"), per_device_train_batch_size=args.batch_size,
        train_sampling_strategy="sequential", max_steps=args.max_steps, learning_rate=args.learning_rate,
        warmup_steps=10, logging_steps=max(1, args.max_steps // 5), save_strategy="no", report_to=[],
        seed=args.seed, dataloader_drop_last=True, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = SegmentTrainer(model=model, args=training, train_dataset=dataset, data_collator=default_data_collator)
    trainer.add_callback(MemoryLog(trainer))
    trainer.train()
    with_memory = perplexity(model, valid_rows, args.segment_length, use_memory=True)
    without = perplexity(model, valid_rows, args.segment_length, use_memory=False)
    print(f"validation perplexity, segment by segment: with memory {with_memory:.2f}, without {without:.2f}")
    out = Path(args.output_dir) / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"saved to {out}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError) as exc:
        print(f"train_segments.py: error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(2)
