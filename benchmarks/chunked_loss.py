"""Chunked causal-LM loss against the plain one: peak memory and time of one forward + backward.

    python benchmarks/chunked_loss.py                     # vocab 32k, 128k, 150k; 4096 tokens; writes
                                                          # benchmarks/results/chunked_loss.json
    python benchmarks/chunked_loss.py --vocab 32000 --tokens 1024 --repeats 1   # quick
    python benchmarks/chunked_loss.py --vocab 32000 --labels all --hidden 1024 --head trained,frozen --append
                                                          # a real hidden size, the head trained and frozen (LoRA)

Model: a one-layer hfx decoder (--hidden 128 or a comma-separated sweep, 4 heads, untied head, fp32 on the
CPU) on 4 rows of tokens/4, full fine-tuning (every weight gets a gradient); with ``--head frozen`` the head's
weight does not require grad, as under LoRA without ``lm_head`` in ``modules_to_save``. ``plain`` is ``model(**batch, labels=labels).loss.backward()``
(transformers' ForCausalLMLoss over (tokens, vocab) fp32 logits); ``chunked`` is hfx.finetune.loss's
``chunked_forward`` (labelled positions only, the head in chunks). Two label layouts: ``all`` (every position
labelled, the chunked loss's worst case) and ``completion`` (the first half of each row is prompt, -100).

Peak memory: each measurement runs in a fresh process; the kernel's peak resident set (VmHWM) is reset just
before the timed steps (``/proc/self/clear_refs``) and read after them, minus the resident set at that moment:
what a forward + backward adds on top of the model, its inputs and its gradient buffers. Time: median wall time
of --repeats forward + backward passes after one warm-up (threads: --threads). The head's matmul dominates the
time (hidden x vocab per labelled token), so a small hidden size keeps the run short; the logits do not depend
on it, but a trained head's fp32 weight gradient (vocab x hidden), which the chunked loss builds in the forward
and keeps until backward, does: sweep --hidden to see it. ``loss diff`` is |chunked - plain| of the same batch.
``--append`` merges the rows into the existing --json (a row with the same vocab, tokens, labels, hidden and
head is replaced) instead of writing only this run's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "chunked_loss.json"
HEADS, ROWS = 4, 4


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_one(vocab: int, tokens: int, hidden: int, loss: str, labels: str, repeats: int, threads: int,
                head: str = "trained") -> dict:
    """One (vocab, hidden, head, loss, label layout) measurement in this process."""
    import torch

    import hfx
    from hfx.finetune.loss import chunk_rows_for, chunked_forward

    torch.set_num_threads(threads)
    config = hfx.HfxConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=HEADS,
                           intermediate_size=4 * hidden, is_decoder=True, tie_word_embeddings=False,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           max_position_embeddings=max(512, tokens // ROWS))
    torch.manual_seed(0)
    model = hfx.HfxForCausalLM(config)
    if head == "frozen":
        model.get_output_embeddings().weight.requires_grad_(False)
    ids = torch.randint(0, vocab, (ROWS, tokens // ROWS))
    target = ids.clone()
    if labels == "completion":
        target[:, : ids.shape[1] // 2] = -100
    batch = {"input_ids": ids, "labels": target}

    def step():
        model.zero_grad(set_to_none=True)
        out = chunked_forward(model, batch, adds_aux_loss=True) if loss == "chunked" else model(**batch)
        out.loss.backward()
        return out.loss.detach()

    value = step()  # warm-up: allocates .grad buffers, so the peak below is the step's own memory
    model.zero_grad(set_to_none=True)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current resident set
    before = _status_kib("VmRSS")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak_mib = (_status_kib("VmHWM") - before) / 1024
    return {"vocab": vocab, "tokens": tokens, "labels": labels, "hidden": hidden, "head": head, "loss": loss, "peak_mib": round(peak_mib, 1),
            "step_ms": round(statistics.median(times) * 1e3, 1), "value": float(value),
            "chunk_rows": chunk_rows_for(vocab) if loss == "chunked" else None}


def run_isolated(vocab, tokens, hidden, loss, labels, repeats, threads, head="trained") -> dict:
    command = [sys.executable, __file__, "--one",
               json.dumps([vocab, tokens, hidden, loss, labels, repeats, threads, head])]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", default="32000,128000,150000", help="comma-separated vocabulary sizes")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per batch (4 rows)")
    parser.add_argument("--labels", default="all,completion", help="label layouts: all, completion")
    parser.add_argument("--hidden", default="128", help="comma-separated hidden sizes")
    parser.add_argument("--head", default="trained", help="comma-separated: trained (full fine-tuning), frozen (LoRA)")
    parser.add_argument("--append", action="store_true", help="merge the rows into the existing --json")
    parser.add_argument("--repeats", type=int, default=1, help="timed steps after the warm-up (the peak is theirs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(RESULTS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(*json.loads(args.one))))
        return
    heads = args.head.split(",")
    bad = [h for h in heads if h not in ("trained", "frozen")]
    if bad:
        parser.error(f"--head {bad} invalid; valid values: trained, frozen")
    rows = []
    print(f"{'vocab':>7} {'hidden':>6} {'head':>7} {'labels':>10} {'plain MiB':>10} {'chunked MiB':>12} {'ratio':>6} {'plain ms':>9} "
          f"{'chunked ms':>11} {'time ratio':>10} {'loss diff':>9}")
    settings = [(v, h, head, labels) for v in args.vocab.split(",") for h in args.hidden.split(",")
                for head in heads for labels in args.labels.split(",")]
    for vocab, hidden, head, labels in settings:
        vocab, hidden = int(vocab), int(hidden)
        plain = run_isolated(vocab, args.tokens, hidden, "plain", labels, args.repeats, args.threads, head)
        chunked = run_isolated(vocab, args.tokens, hidden, "chunked", labels, args.repeats, args.threads, head)
        row = {"vocab": vocab, "tokens": args.tokens, "labels": labels, "hidden": hidden, "head": head,
               "repeats": args.repeats,
               "plain_peak_mib": plain["peak_mib"],
               "chunked_peak_mib": chunked["peak_mib"],
               "peak_ratio": round(chunked["peak_mib"] / plain["peak_mib"], 3),
               "plain_step_ms": plain["step_ms"], "chunked_step_ms": chunked["step_ms"],
               "time_ratio": round(chunked["step_ms"] / plain["step_ms"], 3),
               "loss_diff": abs(chunked["value"] - plain["value"]), "chunk_rows": chunked["chunk_rows"]}
        rows.append(row)
        print(f"{vocab:>7} {hidden:>6} {head:>7} {labels:>10} {row['plain_peak_mib']:>10.0f} {row['chunked_peak_mib']:>12.0f} "
              f"{row['peak_ratio']:>6.3f} {row['plain_step_ms']:>9.0f} {row['chunked_step_ms']:>11.0f} "
              f"{row['time_ratio']:>10.3f} {row['loss_diff']:>9.1e}")
    import torch

    def key(row):
        return row["vocab"], row["tokens"], row["labels"], row["hidden"], row["head"]

    if args.append and Path(args.json).exists():
        previous = json.loads(Path(args.json).read_text())
        old = [{"hidden": previous.get("hidden"), "head": "trained", "repeats": previous.get("repeats"), **row}
               for row in previous["results"]]
        new_keys = {key(row) for row in rows}
        rows = [row for row in old if key(row) not in new_keys] + rows
    payload = {"rows": ROWS, "threads": args.threads,
               "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "results": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
