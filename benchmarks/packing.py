"""Packing efficiency (real tokens / slots) of ``hfx finetune --packing`` on the embedded fine-tuning data.

    python benchmarks/packing.py                        # max_length 256; writes benchmarks/results/packing.json
    python benchmarks/packing.py --max-length 128 512   # several row lengths

Data: ``hfx.data.embedded`` written with its defaults, tokenised by the tokenizer ``hfx quickstart`` trains
(causal style, vocabulary up to 1000, on the embedded corpus). Record sets, each read by ``hfx finetune``'s
own data path (``prepare_data``):

- ``arithmetic``: the quickstart's fine-tuning records (``"3 plus 4 is"`` -> ``" 7."``, prompt/completion);
- ``facts``: the fact queries with their gold answer (prompt/completion);
- ``corpus``: the training documents as text records (their sentences joined);
- ``all``: the three together.

``fewest`` is ceil(tokens / max_length), the rows no packing can go below (small sets are bounded by it:
40 examples of 9 tokens cannot fill two rows of 256). Rows: ``none`` is padding to the longest example of each batch of --batch-size (what a run without packing
computes on; slots = batch x longest); ``bfd`` and ``wrapped`` are packed rows of --max-length slots each.
``bfd time`` is the best-fit decreasing of 200,000 random lengths in [1, max_length] (the packing alone).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "packing.json"


def _records(paths) -> dict[str, list[dict]]:
    def rows(name):
        return [json.loads(line) for line in open(paths[name], encoding="utf-8") if line.strip()]

    arithmetic = [{"prompt": r["query"], "completion": f" {r['answer']}."} for r in rows("arithmetic_train")]
    facts = [{"prompt": r["query"], "completion": " " + r["choices"][r["gold"]] + "."} for r in rows("facts_train")]
    corpus = [{"text": " ".join(r["sentences"])} for r in rows("corpus_train")]
    return {"arithmetic": arithmetic, "facts": facts, "corpus": corpus}


def _padded_efficiency(lengths: list[int], batch_size: int) -> float:
    slots = sum(batch_size * max(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size))
    return sum(lengths) / slots


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-length", type=int, nargs="+", default=[256])
    parser.add_argument("--batch-size", type=int, default=8, help="for the padded (no packing) comparison")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import datasets
    from transformers import AutoTokenizer

    from hfx.data import load_documents, write_embedded_data
    from hfx.finetune.config import FinetuneConfig
    from hfx.finetune.data import prepare_data
    from hfx.finetune.packing import best_fit_decreasing
    from hfx.tokenizer import train_tokenizer

    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix="hfx-packing-"))
    paths = write_embedded_data(work / "data")
    documents = load_documents(str(paths["corpus_text"]))
    train_tokenizer(documents["text"], vocab_size=1000, style="causal", save_dir=work / "tok")
    tokenizer = AutoTokenizer.from_pretrained(work / "tok")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    record_sets = _records(paths)
    record_sets["all"] = [r for rows in record_sets.values() for r in rows]

    results = []
    for max_length in args.max_length:
        for name, records in record_sets.items():
            # "all" mixes record shapes: each shape is tokenised by its own file, then the rows are pooled
            shapes = ([k for k in record_sets if k != "all"] if name == "all" else [name])
            row = {"data": name, "max_length": max_length, "examples": len(records)}
            for packing in ("none", "bfd", "wrapped"):
                lengths, start = [], time.perf_counter()
                for shape in shapes:
                    file = work / f"{shape}.jsonl"
                    file.write_text("".join(json.dumps(r) + "\n" for r in record_sets[shape]), encoding="utf-8")
                    config = FinetuneConfig(model=str(work / "tok"), data=str(file), output=str(work / "out"),
                                            max_length=max_length, packing=packing)
                    if packing == "bfd" and name == "all":
                        continue  # pooled below: one bfd over every shape's examples
                    prepared = prepare_data(config, "causal-lm", tokenizer)
                    lengths += [len(ids) for ids in prepared.train["input_ids"]]
                if packing == "bfd" and name == "all":
                    examples = []
                    for shape in shapes:
                        config = FinetuneConfig(model=str(work / "tok"), data=str(work / f"{shape}.jsonl"),
                                                output=str(work / "out"), max_length=max_length)
                        examples += [len(ids) for ids in prepare_data(config, "causal-lm", tokenizer).train["input_ids"]]
                    lengths = [sum(examples[i] for i in r) for r in best_fit_decreasing(examples, max_length)]
                seconds = time.perf_counter() - start
                tokens = sum(lengths)
                if packing == "none":
                    row["tokens"] = tokens
                    row["longest"] = max(lengths)
                    row["padded_efficiency"] = round(_padded_efficiency(lengths, args.batch_size), 4)
                    row["fewest_rows"] = -(-tokens // max_length)  # no packing can use fewer rows
                else:
                    row[f"{packing}_rows"] = len(lengths)
                    row[f"{packing}_tokens"] = tokens
                    row[f"{packing}_efficiency"] = round(tokens / (len(lengths) * max_length), 4) if lengths else None
                    row[f"{packing}_seconds"] = round(seconds, 2)
            results.append(row)

    rng = random.Random(0)
    timing = {}
    for max_length in args.max_length:
        lengths = [rng.randint(1, max_length) for _ in range(200_000)]
        start = time.perf_counter()
        rows = best_fit_decreasing(lengths, max_length)
        timing[max_length] = {"seconds": round(time.perf_counter() - start, 3),
                              "efficiency": round(sum(lengths) / (len(rows) * max_length), 4)}

    header = (f"{'data':<11}{'max_len':>8}{'examples':>9}{'tokens':>8}{'longest':>8}{'padded':>8}"
              f"{'fewest':>7}{'bfd rows':>9}{'bfd eff':>8}{'wrap rows':>10}{'wrap eff':>9}{'wrap kept':>10}")
    print(header)
    for r in results:
        print(f"{r['data']:<11}{r['max_length']:>8}{r['examples']:>9}{r['tokens']:>8}{r['longest']:>8}"
              f"{r['padded_efficiency']:>8.3f}{r['fewest_rows']:>7}{r['bfd_rows']:>9}{r['bfd_efficiency']:>8.3f}{r['wrapped_rows']:>10}"
              f"{(r['wrapped_efficiency'] or 0):>9.3f}{r['wrapped_tokens'] / r['tokens']:>10.3f}")
    for max_length, t in timing.items():
        print(f"bfd of 200,000 random lengths in [1, {max_length}]: {t['seconds']} s, efficiency {t['efficiency']}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "command": "python benchmarks/packing.py " + " ".join(sys.argv[1:]),
        "python": platform.python_version(), "results": results, "bfd_timing_200k": timing,
        "notes": "padded: real tokens / (batch x longest of each batch) without packing; wrapped kept: the share "
                 "of tokens wrapped packing keeps (it drops the tail shorter than a row)",
    }, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
