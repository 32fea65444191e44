"""Train a tiny hfx encoder-decoder to "translate" sentences of the embedded corpus, with Seq2SeqTrainer.

The task is built deterministically from hfx's embedded data (no download): each fact sentence is
translated into its paraphrase, and each equation into its inverse::

    nalger lives in sakgos.   ->  the home of nalger is sakgos.
    3 plus 4 is 7.            ->  7 minus 4 is 3.

Names and numbers must be copied across and the words reordered, what a translation model's
cross-attention does. 15% of the pairs (whole (entity, relation) facts and equations) are held out:
the model never saw them, so exact matches there measure the rule it learned, not memory.

    python examples/translate_seq2seq.py --output-dir /tmp/hfx-translate   # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import re
import zlib
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    DataCollatorForSeq2Seq,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    set_seed,
)

import hfx  # noqa: F401  (registers model_type="hfx")
from hfx.data.embedded import RELATIONS, embedded_corpus
from hfx.tokenizer import train_tokenizer


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(re.escape("{e}"), r"(?P<e>\w+)").replace(re.escape("{v}"), r"(?P<v>\w+)")
    return re.compile(f"^{pattern}$")


def translation_pairs(seed: int = 0) -> list[dict]:
    """Every distinct (source, target) pair the embedded corpus states, in a fixed order."""
    canonical = {relation: _template_regex(templates[0]) for relation, templates in RELATIONS.items()}
    equation = re.compile(r"^(\d+) (plus|minus) (\d+) is (\d+)\.$")
    pairs: dict[str, str] = {}
    for document in embedded_corpus(seed=seed)["corpus_train"]:
        for sentence in document["sentences"]:
            for relation, regex in canonical.items():
                if match := regex.match(sentence):
                    pairs[sentence] = RELATIONS[relation][1].format(e=match["e"], v=match["v"])
            if match := equation.match(sentence):
                x, op, y, z = match.groups()
                pairs[sentence] = f"{z} {'minus' if op == 'plus' else 'plus'} {y} is {x}."
    return [{"source": source, "target": target} for source, target in sorted(pairs.items())]


def is_held_out(source: str, fraction: float = 0.15) -> bool:
    """A stable split by a hash of the source sentence (the same on every machine and run)."""
    return zlib.crc32(source.encode()) % 1000 < fraction * 1000


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="hfx-translate")
    parser.add_argument("--epochs", type=float, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    set_seed(args.seed)
    output_dir = Path(args.output_dir)

    pairs = translation_pairs(args.seed)
    train = [p for p in pairs if not is_held_out(p["source"])]
    test = [p for p in pairs if is_held_out(p["source"])]
    tokenizer = train_tokenizer(
        [p["source"] for p in pairs] + [p["target"] for p in pairs], vocab_size=400, style="causal"
    )

    config = AutoConfig.for_model(
        "hfx",
        is_encoder_decoder=True,
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        decoder_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
        type_vocab_size=0,
        norm_type="rmsnorm",
        norm_position="pre",
        position_embedding_type="rotary",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        decoder_start_token_id=tokenizer.bos_token_id,
    )
    model = AutoModelForSeq2SeqLM.from_config(config)

    def encode(batch):
        eos = [tokenizer.eos_token_id]
        return {
            "input_ids": [ids + eos for ids in tokenizer(batch["source"])["input_ids"]],
            "labels": [ids + eos for ids in tokenizer(batch["target"])["input_ids"]],
        }

    train_set = Dataset.from_list(train).map(encode, batched=True, remove_columns=["source", "target"])
    test_set = Dataset.from_list(test).map(encode, batched=True, remove_columns=["source", "target"])
    training_args = Seq2SeqTrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        num_train_epochs=args.epochs,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_steps=20,
        weight_decay=0.01,
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        predict_with_generate=True,
        generation_max_length=24,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=test_set,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
        processing_class=tokenizer,
    )
    first_loss = trainer.evaluate(test_set, predict_with_generate=False)["eval_loss"]
    trainer.train()
    prediction = trainer.predict(test_set)
    specials = set(tokenizer.all_special_ids)
    generated = [[t for t in row if t >= 0 and t not in specials] for row in prediction.predictions.tolist()]
    # The tokenizer splits numbers into digits and its decoder spaces them apart: join them for display.
    decoded = [re.sub(r"(?<=\d) (?=\d)", "", text) for text in tokenizer.batch_decode(generated)]
    exact = [ids == tokenizer(p["target"])["input_ids"] for ids, p in zip(generated, test)]
    shown = list(zip(decoded, test))
    for got, pair in shown[:3] + shown[-3:]:  # equations sort first, facts last
        print(f"{pair['source']!r:40} -> {got!r}   (reference: {pair['target']!r})")
    results = {
        "train_pairs": len(train),
        "held_out_pairs": len(test),
        "held_out_loss_before": round(first_loss, 4),
        "held_out_loss_after": round(prediction.metrics["test_loss"], 4),
        "held_out_exact_match": round(sum(exact) / len(exact), 4),
    }
    print(json.dumps(results, indent=2))
    trainer.save_model(str(output_dir / "model"))
    tokenizer.save_pretrained(str(output_dir / "model"))
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
