"""One attention layer, long sequences: hfx backends against transformers' Longformer, BigBird and
Reformer layers and SDPA with a dense band mask.

    python benchmarks/attention.py            # 1k..32k tokens, writes benchmarks/results/attention.{json,png}
    python benchmarks/attention.py --quick    # 1k and 2k only, one repetition (development)

Batch 1, hidden 256, 4 heads of 64, attention_window 512 (BigBird: block 64, 3 random blocks; Reformer:
chunk 64, 2 hashes). Each row is one layer with its q/k/v projections: forward time (no grad),
forward+backward time, and the peak resident memory of forward+backward above the level before it.
Peak memory is read from /proc/self/statm by a sampling thread; the script re-runs itself with
MALLOC_MMAP_THRESHOLD_ set so that freed buffers go back to the OS and every run starts from a clean level.
GFLOP/s counts only the useful multiply-adds of the attention pattern (QK^T and PV), next to a dense
matmul measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import types
from pathlib import Path

import torch
from torch import nn

HIDDEN, HEADS, WINDOW, BLOCK, RANDOM_BLOCKS, CHUNK, HASHES = 256, 4, 512, 64, 3, 64, 2
HEAD_DIM = HIDDEN // HEADS
# lengths beyond which a baseline is skipped: it needs several GB (BigBird and the dense mask are n x n)
LIMITS = {"sdpa_dense_band": 8192, "bigbird (transformers)": 8192, "longformer (transformers)": 16384, "reformer_lsh (transformers)": 16384}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Highest RSS seen while the block runs, minus the RSS when it started."""

    def __enter__(self):
        self.start = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())
        self.bytes = self.peak - self.start


class ProjectedAttention(nn.Module):
    """q/k/v projections + one AttentionInterface function, as a model's attention layer calls it."""

    def __init__(self, fn, causal=False, **config):
        super().__init__()
        self.fn, self.is_causal, self.layer_idx = fn, causal, 0
        self.config = types.SimpleNamespace(**config)
        self.query, self.key, self.value = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, HEADS, HEAD_DIM).transpose(1, 2) for p in (self.query, self.key, self.value))
        return self.fn(self, q, k, v, None, scaling=HEAD_DIM**-0.5)[0].reshape(b, n, HIDDEN)


def dense_band(module, q, k, v, mask, scaling):
    n = q.shape[2]
    i = torch.arange(n)
    band = (i[:, None] - i[None]).abs() <= WINDOW // 2
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=band, scale=scaling)
    return out.transpose(1, 2), None


def builders():
    from transformers import BigBirdConfig, LongformerConfig, ReformerConfig
    from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention, BigBirdModel
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention

    from hfx_attention.block_sparse import block_sparse_attention
    from hfx_attention.lsh import lsh_attention
    from hfx_attention.sliding_window import sliding_window_attention

    def longformer():
        config = LongformerConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, attention_window=[WINDOW], attention_probs_dropout_prob=0.0)
        layer = LongformerSelfAttention(config, 0)

        def run(x):
            n = x.shape[1]
            zeros = torch.zeros(1, n, dtype=torch.bool)
            return layer(x, attention_mask=torch.zeros(1, n), is_index_masked=zeros, is_index_global_attn=zeros, is_global_attn=False)[0]

        return layer, run

    def bigbird():
        config = BigBirdConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, block_size=BLOCK, num_random_blocks=RANDOM_BLOCKS, attention_type="block_sparse")
        layer = BigBirdBlockSparseAttention(config, seed=0)

        def run(x):
            blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(torch.ones(1, x.shape[1]), BLOCK)
            return layer(x, band_mask=band, from_mask=from_mask, to_mask=to_mask, from_blocked_mask=blocked, to_blocked_mask=blocked)[0]

        return layer, run

    def reformer():
        config = ReformerConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, attention_head_size=HEAD_DIM, lsh_attn_chunk_length=CHUNK,
                                num_hashes=HASHES, num_buckets=None, hash_seed=0, lsh_attention_probs_dropout_prob=0.0, max_position_embeddings=1 << 16)
        layer = LSHSelfAttention(config)
        return layer, lambda x: layer(x).hidden_states

    def ours(fn, causal=False, **config):
        def build():
            layer = ProjectedAttention(fn, causal, **config)
            return layer, layer

        return build

    return {
        "hfx_sliding_window": ours(sliding_window_attention, attention_window=WINDOW),
        "hfx_sliding_window causal": ours(sliding_window_attention, causal=True, attention_window=WINDOW),
        "hfx_block_sparse": ours(block_sparse_attention, block_size=BLOCK, num_random_blocks=RANDOM_BLOCKS),
        "hfx_lsh": ours(lsh_attention, num_hashes=HASHES, lsh_attn_chunk_length=CHUNK, hash_seed=0, num_buckets=None),
        "longformer (transformers)": longformer,
        "bigbird (transformers)": bigbird,
        "reformer_lsh (transformers)": reformer,
        "sdpa_dense_band": ours(dense_band),
    }


def useful_flops(name: str, n: int) -> float:
    """Multiply-adds x 2 of QK^T and PV over the pairs the pattern really scores."""
    if "sliding" in name or name.startswith(("longformer", "sdpa")):
        pairs = n * (WINDOW + 1) / (2 if "causal" in name else 1)
    elif "block" in name or name.startswith("bigbird"):
        pairs = n * (3 + RANDOM_BLOCKS + 2) * BLOCK
    else:
        pairs = n * HASHES * 2 * CHUNK
    return 2 * 2 * pairs * HEAD_DIM * HEADS


def measure(build, n: int, repeats: int) -> dict:
    torch.manual_seed(0)
    layer, run = build()
    x = torch.randn(1, n, HIDDEN)
    forward, both = [], []
    for i in range(repeats + 1):  # the first round warms up
        with torch.no_grad():
            start = time.perf_counter()
            run(x)
            forward.append(time.perf_counter() - start)
        xg = x.clone().requires_grad_()
        with PeakMemory() as memory:
            start = time.perf_counter()
            run(xg).sum().backward()
            both.append(time.perf_counter() - start)
        layer.zero_grad(set_to_none=True)
    return {"fwd_ms": 1000 * statistics.median(forward[1:]), "fwd_bwd_ms": 1000 * statistics.median(both[1:]), "peak_mb": memory.bytes / 2**20}


def matmul_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    start = time.perf_counter()
    for _ in range(3):
        a @ b
    return 3 * 2 * 2048**3 / (time.perf_counter() - start) / 1e9


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rows in results["rows"].items():
        lengths = [r["n"] for r in rows]
        axes[0].plot(lengths, [r["fwd_bwd_ms"] for r in rows], marker="o", label=name)
        axes[1].plot(lengths, [r["peak_mb"] for r in rows], marker="o", label=name)
    for ax, label in zip(axes, ("forward+backward (ms)", "peak memory, forward+backward (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"one attention layer, hidden {HIDDEN}, {HEADS} heads, window {WINDOW}, {torch.get_num_threads()} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1k and 2k tokens, one repetition")
    parser.add_argument("--lengths", type=int, nargs="*", help="override the sequence lengths")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="folder for JSON and PNG")
    args = parser.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # see the module docstring
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])

    lengths = args.lengths or ([1024, 2048] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768])
    repeats = 1 if args.quick else 2
    dense = matmul_gflops()
    results = {"lengths": lengths, "threads": torch.get_num_threads(), "matmul_gflops": dense, "rows": {}}
    print(f"dense fp32 matmul: {dense:.1f} GFLOP/s, {torch.get_num_threads()} threads")
    print(f"{'backend':30} {'n':>6} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak MB':>8} {'GFLOP/s':>8}")
    for name, build in builders().items():
        rows = results["rows"].setdefault(name, [])
        for n in lengths:
            if n > LIMITS.get(name, 1 << 30):
                continue
            row = {"n": n, **measure(build, n, repeats)}
            row["gflops"] = useful_flops(name, n) / (row["fwd_ms"] / 1000) / 1e9
            rows.append(row)
            print(f"{name:30} {n:>6} {row['fwd_ms']:>9.1f} {row['fwd_bwd_ms']:>11.1f} {row['peak_mb']:>8.1f} {row['gflops']:>8.2f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (args.out / f"attention{suffix}.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / f"attention{suffix}.png")
    print(f"wrote {args.out / f'attention{suffix}.json'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
