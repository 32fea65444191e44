"""Adaptive span: the cost of one attention layer falls with the learned spans, because keys beyond them are skipped.

    python benchmarks/adaptive_span.py            # writes benchmarks/results/adaptive_span.json (~40 s, 1 thread)
    python benchmarks/adaptive_span.py --quick    # one repetition, shorter sequences

One hfx attention layer's score computation (4 heads of 64, ramp R=32, batch 1, fp32), eval mode, no grad, every
head's span set to the same z. Two tables: a full forward over --length tokens (prefill) and one decoding step
against a KV cache of --cache keys. Each is timed with key skipping (the backend as it runs) and with every key
scored (``band=False``: same numbers, the column ``max diff`` says how close), next to PyTorch SDPA with a causal
mask (fused kernel, no span mask). ``keys/query`` is what a query reads when keys are skipped: ceil(z + R).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import hfx  # noqa: F401  (registers the plugin modules' path)
from hfx_attention.adaptive_span import span_attention

HEADS, HEAD_DIM, RAMP = 4, 64, 32


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs) * 1e3


def qkv(length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, HEADS, length, HEAD_DIM, generator=g) for _ in range(3)]


def measure(spans, q, k, v, reps: int) -> list[dict]:
    keep = torch.ones(1, k.shape[2], dtype=torch.bool)
    scaling = HEAD_DIM**-0.5
    rows = []
    for span in spans:
        z = torch.full((HEADS,), float(span))

        def run(band):
            return lambda: span_attention(q, k, v, keep, z, RAMP, True, scaling, band=band)

        skipped, every = run(True)(), run(False)()
        rows.append({
            "span": span,
            "keys_per_query": min(k.shape[2], math.ceil(span + RAMP)),
            "skipped_ms": timed(run(True), reps),
            "all_keys_ms": timed(run(False), reps),
            "max_abs_diff": float((skipped - every).abs().max()),
        })
    return rows


def table(title: str, sdpa_ms: float, rows: list[dict]) -> None:
    print(f"{title}; SDPA causal (no span mask): {sdpa_ms:.3f} ms")
    print(f"{'span z':>7} {'keys/query':>10} {'skipped ms':>11} {'all keys ms':>12} {'speed-up':>9} {'max diff':>9}")
    for r in rows:
        print(f"{r['span']:>7} {r['keys_per_query']:>10} {r['skipped_ms']:>11.3f} {r['all_keys_ms']:>12.3f} "
              f"{r['all_keys_ms'] / r['skipped_ms']:>8.1f}x {r['max_abs_diff']:>9.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048, help="prefill tokens")
    parser.add_argument("--cache", type=int, default=16384, help="KV-cache keys of the decoding step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "adaptive_span.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    length, cache = (1024, 4096) if args.quick else (args.length, args.cache)
    reps = 1 if args.quick else 3
    spans = sorted({length, 1024, 256, 64, 0}, reverse=True)
    with torch.no_grad():
        q, k, v = qkv(length, 0)
        sdpa_prefill = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), reps)
        prefill = measure(spans, q, k, v, reps)
        q, k, v = qkv(cache, 1)
        q = q[:, :, -1:]
        sdpa_decode = timed(lambda: F.scaled_dot_product_attention(q, k, v), reps * 10)
        decode = measure(sorted({cache, *spans}, reverse=True), q, k, v, reps * 10)
    head = f"{HEADS} heads x {HEAD_DIM}, R={RAMP}, {args.threads} thread(s)"
    table(f"prefill, n={length}, {head}", sdpa_prefill, prefill)
    table(f"decode one token against {cache} cached keys, {head}", sdpa_decode, decode)
    result = {
        "setup": {"prefill_length": length, "cache_length": cache, "heads": HEADS, "head_dim": HEAD_DIM, "ramp": RAMP,
                  "batch": 1, "threads": args.threads, "repetitions": reps, "torch": torch.__version__,
                  "machine": platform.machine()},
        "prefill": {"sdpa_causal_ms": sdpa_prefill, "rows": prefill},
        "decode": {"sdpa_ms": sdpa_decode, "rows": decode},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
