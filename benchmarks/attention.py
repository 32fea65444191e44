"""One attention layer, long sequences: hfx backends against transformers' Longformer, BigBird and
Reformer layers and SDPA with a dense band mask; on a CUDA device also against FlexAttention and SDPA.

    python benchmarks/attention.py            # 1k..32k tokens at 1 and 2 threads, writes benchmarks/results/attention.{json,png}
    python benchmarks/attention.py --quick    # 1k and 2k only, one repetition (development)
    python benchmarks/attention.py --lengths 8192 16384 --backends hfx_sliding_window "longformer (transformers)"

Batch 1, hidden 256, 4 heads of 64, attention_window 512 (BigBird: block 64, 3 random blocks; Reformer:
chunk 64, 2 hashes). Each row is one layer with its q/k/v projections: forward time (no grad),
forward+backward time, and the peak memory of forward+backward above the level before it.
CPU peak memory is the resident size read from /proc/self/statm by a sampling thread; the script re-runs
itself with MALLOC_MMAP_THRESHOLD_ set so that freed buffers go back to the OS and every run starts from
a clean level. CUDA peak memory is torch.cuda.max_memory_allocated.
GFLOP/s counts only the useful multiply-adds of the attention pattern (QK^T and PV), next to a dense
matmul measured in the same run at the same thread count. Every thread count of --threads is measured
in the same run; the targets block compares rows of the same thread count only.
CUDA rows run when a CUDA device is present (otherwise the JSON records why not).

The docs' copy of the plot is docs/long-context-benchmark.png: refresh it with
    python benchmarks/attention.py && cp benchmarks/results/attention.png docs/long-context-benchmark.png
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
CUDA_LIMITS = {"sdpa_dense_band": 32768}
DEFAULT_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768]


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


class CudaPeakMemory:
    """torch.cuda.max_memory_allocated while the block runs, above the allocation when it started."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.bytes = torch.cuda.max_memory_allocated() - self.start


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
    i = torch.arange(n, device=q.device)
    band = (i[:, None] - i[None]).abs() <= WINDOW // 2
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=band, scale=scaling)
    return out.transpose(1, 2), None


def sdpa_full(module, q, k, v, mask, scaling):
    """Dense attention without a mask: on CUDA the flash kernel, the speed of light for O(n^2) work."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling).transpose(1, 2), None


def flex_band():
    """FlexAttention with a sliding-window BlockMask, the way its documentation writes it. The BlockMask is built
    once per length outside the timed call (a model builds it once per forward for all its layers); the hfx rows
    build theirs inside every call, so this baseline is the favourable one."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    masks = {}

    def band(b, h, q, k):
        return (q - k).abs() <= WINDOW // 2

    def fn(module, q, k, v, mask, scaling):
        n = q.shape[2]
        if n not in masks:
            masks[n] = create_block_mask(band, None, None, n, n, device=q.device)
        return compiled(q, k, v, block_mask=masks[n], scale=scaling).transpose(1, 2), None

    return fn


def builders() -> dict:
    """CPU rows: name -> () -> (module, callable). Each baseline imports its transformers model only when built."""

    def longformer():
        from transformers import LongformerConfig
        from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

        config = LongformerConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, attention_window=[WINDOW], attention_probs_dropout_prob=0.0)
        layer = LongformerSelfAttention(config, 0)

        def run(x):
            n = x.shape[1]
            zeros = torch.zeros(1, n, dtype=torch.bool)
            return layer(x, attention_mask=torch.zeros(1, n), is_index_masked=zeros, is_index_global_attn=zeros, is_global_attn=False)[0]

        return layer, run

    def bigbird():
        from transformers import BigBirdConfig
        from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention, BigBirdModel

        config = BigBirdConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, block_size=BLOCK, num_random_blocks=RANDOM_BLOCKS, attention_type="block_sparse")
        layer = BigBirdBlockSparseAttention(config, seed=0)

        def run(x):
            blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(torch.ones(1, x.shape[1]), BLOCK)
            return layer(x, band_mask=band, from_mask=from_mask, to_mask=to_mask, from_blocked_mask=blocked, to_blocked_mask=blocked)[0]

        return layer, run

    def reformer():
        from transformers import ReformerConfig
        from transformers.models.reformer.modeling_reformer import LSHSelfAttention

        config = ReformerConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, attention_head_size=HEAD_DIM, lsh_attn_chunk_length=CHUNK,
                                num_hashes=HASHES, num_buckets=None, hash_seed=0, lsh_attention_probs_dropout_prob=0.0, max_position_embeddings=1 << 16)
        layer = LSHSelfAttention(config)
        return layer, lambda x: layer(x).hidden_states

    return {
        **hfx_builders(),
        "longformer (transformers)": longformer,
        "bigbird (transformers)": bigbird,
        "reformer_lsh (transformers)": reformer,
        "sdpa_dense_band": ours(dense_band),
    }


def ours(fn, causal=False, **config):
    def build():
        layer = ProjectedAttention(fn, causal, **config)
        return layer, layer

    return build


def hfx_builders(**extra) -> dict:
    from hfx_attention.block_sparse import block_sparse_attention
    from hfx_attention.lsh import lsh_attention
    from hfx_attention.sliding_window import sliding_window_attention

    return {
        "hfx_sliding_window": ours(sliding_window_attention, attention_window=WINDOW, **extra),
        "hfx_sliding_window causal": ours(sliding_window_attention, causal=True, attention_window=WINDOW, **extra),
        "hfx_block_sparse": ours(block_sparse_attention, block_size=BLOCK, num_random_blocks=RANDOM_BLOCKS, **extra),
        "hfx_lsh": ours(lsh_attention, num_hashes=HASHES, lsh_attn_chunk_length=CHUNK, hash_seed=0, num_buckets=None, **extra),
    }


def cuda_builders() -> dict:
    """CUDA rows: the hfx backends on their automatic route, FlexAttention's own band, SDPA."""
    rows = hfx_builders(attention_route="auto")
    rows["flex_attention band (torch)"] = ours(flex_band())
    rows["sdpa_dense_band"] = ours(dense_band)
    rows["sdpa_full (dense, no mask)"] = ours(sdpa_full)
    return rows


def cpu_names() -> list[str]:
    return ["hfx_sliding_window", "hfx_sliding_window causal", "hfx_block_sparse", "hfx_lsh",
            "longformer (transformers)", "bigbird (transformers)", "reformer_lsh (transformers)", "sdpa_dense_band"]


def cuda_names() -> list[str]:
    return ["hfx_sliding_window", "hfx_sliding_window causal", "hfx_block_sparse", "hfx_lsh",
            "flex_attention band (torch)", "sdpa_dense_band", "sdpa_full (dense, no mask)"]


def useful_flops(name: str, n: int) -> float:
    """Multiply-adds x 2 of QK^T and PV over the pairs the pattern really scores."""
    if "sliding" in name or name.startswith(("longformer", "sdpa_dense", "flex")):
        pairs = n * (WINDOW + 1) / (2 if "causal" in name else 1)
    elif "block" in name or name.startswith("bigbird"):
        pairs = n * (3 + RANDOM_BLOCKS + 2) * BLOCK
    elif name.startswith("sdpa_full"):
        pairs = n * n
    else:
        pairs = n * HASHES * 2 * CHUNK
    return 2 * 2 * pairs * HEAD_DIM * HEADS


def measure(build, n: int, repeats: int, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    layer, run = build()
    layer.to(device)
    x = torch.randn(1, n, HIDDEN, device=device)
    cuda = device != "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    forward, both = [], []
    for i in range(repeats + 1):  # the first round warms up (and compiles, on CUDA)
        with torch.no_grad():
            sync()
            start = time.perf_counter()
            run(x)
            sync()
            forward.append(time.perf_counter() - start)
        xg = x.clone().requires_grad_()
        with (CudaPeakMemory() if cuda else PeakMemory()) as memory:
            start = time.perf_counter()
            run(xg).sum().backward()
            sync()
            both.append(time.perf_counter() - start)
        layer.zero_grad(set_to_none=True)
    return {"fwd_ms": 1000 * statistics.median(forward[1:]), "fwd_bwd_ms": 1000 * statistics.median(both[1:]), "peak_mb": memory.bytes / 2**20}


def sliding_window_fwd_bwd_flops(n: int) -> dict:
    """FLOPs (2 per multiply-add) one hfx_sliding_window layer must do in the timed forward+backward, with the
    columns its tiling computes (plugins/hfx_attention/sliding_window.py: forward tiles of FLASH_CHUNK rows,
    backward tiles of FLASH_BACKWARD_CHUNK rows, each against chunk + the window rounded up to the forward
    chunk): the q/k/v projections forward and backward (input and weight gradients: 3x the forward), the
    attention forward (QK^T, PV) and its backward with recompute (QK^T again, dV = P^T dO, dP = dO V^T,
    dQ = dS K, dK = dS^T Q). Softmax, masks and reductions are not counted."""
    from hfx_attention.sliding_window import FLASH_BACKWARD_CHUNK, FLASH_CHUNK

    pad = -(-WINDOW // FLASH_CHUNK) * FLASH_CHUNK
    rows = -(-n // FLASH_BACKWARD_CHUNK) * FLASH_BACKWARD_CHUNK
    per_column = 2 * rows * HEAD_DIM * HEADS  # one (rows x columns x d) matmul per head, per column
    flops = {
        "projections": 3 * 3 * 2 * n * HIDDEN * HIDDEN,
        "attention_forward": 2 * per_column * (FLASH_CHUNK + pad),
        "attention_backward": 5 * per_column * (FLASH_BACKWARD_CHUNK + pad),
    }
    flops["total"] = sum(flops.values())
    return flops


def attainable(rows: dict, n: int, dense_gflops: float) -> dict | None:
    """The lower bound on hfx_sliding_window's fwd+bwd time at 100% of this run's dense-matmul speed, and so
    the highest speed-up over Longformer's measured fwd+bwd that any implementation of this tiling could show."""
    lf = row_at(rows, "longformer (transformers)", n)
    flops = sliding_window_fwd_bwd_flops(n)
    bound_ms = flops["total"] / (dense_gflops * 1e9) * 1000
    return {"gflop": round(flops["total"] / 1e9, 2), "bound_ms": round(bound_ms, 1),
            "speed_up": None if lf is None else round(lf["fwd_bwd_ms"] / bound_ms, 2)}


def matmul_gflops(device: str = "cpu") -> float:
    size = 2048 if device == "cpu" else 8192
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(3):
        a @ b
    sync()
    return 3 * 2 * size**3 / (time.perf_counter() - start) / 1e9


def row_at(rows: dict, name: str, n: int) -> dict | None:
    return next((r for r in rows.get(name, []) if r["n"] == n), None)


def target(name: str, goal: str, value, threshold: float, higher_is_better: bool, missing: str | None = None) -> dict:
    """One target line: the measured figure and met / not met / not measured."""
    if value is None:
        return {"target": name, "goal": goal, "measured": None, "status": "not measured", "why": missing}
    met = value >= threshold if higher_is_better else value <= threshold
    return {"target": name, "goal": goal, "measured": round(value, 3), "status": "met" if met else "not met"}


def ratio(rows, a, b, n, key):
    """rows[b][n][key] / rows[a][n][key], or None (and which one is missing)."""
    ra, rb = row_at(rows, a, n), row_at(rows, b, n)
    if ra is None or rb is None:
        return None, f"{a if ra is None else b} not run at n={n}"
    return rb[key] / ra[key], None


def cpu_targets(run: dict) -> list[dict]:
    """The CPU targets (see docs/long-context.md#benchmark), from one thread count's rows and its own matmul figure."""
    rows, dense, out = run["rows"], run["matmul_gflops"], []
    sw, lf, bs, bb, lsh, rf = ("hfx_sliding_window", "longformer (transformers)", "hfx_block_sparse", "bigbird (transformers)",
                               "hfx_lsh", "reformer_lsh (transformers)")
    for n in (8192, 16384):
        r = row_at(rows, sw, n)
        out.append(target(f"{sw} forward GFLOP/s / matmul GFLOP/s, n={n}", ">= 0.35", r and r["gflops"] / dense, 0.35, True,
                          f"{sw} not run at n={n}"))
        value, why = ratio(rows, sw, lf, n, "fwd_bwd_ms")
        out.append(target(f"{sw} fwd+bwd speed-up over Longformer, n={n}", ">= 8", value, 8, True, why))
        bound = attainable(rows, n, dense)
        if bound["speed_up"] is not None:
            out[-1]["attainable at matmul speed"] = bound["speed_up"]
            out[-1]["bound"] = (f"{bound['gflop']} GFLOP fwd+bwd (projections, attention forward, backward with recompute) "
                                f"at {dense:.1f} GFLOP/s = {bound['bound_ms']} ms")
        value, why = ratio(rows, lf, sw, n, "peak_mb")
        out.append(target(f"{sw} peak memory / Longformer's, n={n}", "<= 0.2", value, 0.2, False, why))
    r8, r16 = row_at(rows, sw, 8192), row_at(rows, sw, 16384)
    out.append(target(f"{sw} fwd+bwd time 16k / 8k", "<= 2.1", r8 and r16 and r16["fwd_bwd_ms"] / r8["fwd_bwd_ms"], 2.1, False,
                      f"{sw} not run at both n=8192 and n=16384"))
    value, why = ratio(rows, bs, bb, 8192, "fwd_bwd_ms")
    out.append(target(f"{bs} fwd+bwd speed-up over BigBird, n=8192", ">= 3", value, 3, True, why))
    value, why = ratio(rows, bb, bs, 8192, "peak_mb")
    out.append(target(f"{bs} peak memory / BigBird's, n=8192", "<= 0.2", value, 0.2, False, why))
    for n in (8192, 16384):
        for key, what in (("fwd_ms", "forward"), ("fwd_bwd_ms", "fwd+bwd")):
            value, why = ratio(rows, lsh, rf, n, key)
            out.append(target(f"{lsh} {what} speed-up over Reformer, n={n}", ">= 1.5", value, 1.5, True, why))
    return out


def cuda_targets(rows: dict, lengths: list[int]) -> list[dict]:
    """hfx_sliding_window on CUDA within 1.5x of FlexAttention's own band, at the largest common length."""
    out, sw, flex = [], "hfx_sliding_window", "flex_attention band (torch)"
    common = [n for n in lengths if row_at(rows, sw, n) and row_at(rows, flex, n)]
    n = max(common) if common else max(lengths)
    for key, what in (("fwd_ms", "forward"), ("fwd_bwd_ms", "fwd+bwd")):
        value, why = ratio(rows, flex, sw, n, key)
        out.append(target(f"{sw} (cuda) {what} time / FlexAttention's, n={n}", "<= 1.5", value, 1.5, False, why))
    return out


def print_targets(targets: list[dict], heading: str) -> None:
    print(f"targets, {heading}:")
    for t in targets:
        figure = "-" if t["measured"] is None else f"{t['measured']:.3f}"
        extra = f" ({t['why']})" if t.get("why") else ""
        if "attainable at matmul speed" in t:
            extra += f" [attainable at matmul speed: {t['attainable at matmul speed']:.2f}x; {t['bound']}]"
        print(f"  {t['status']:>12}  {figure:>8}  {t['goal']:>7}  {t['target']}{extra}")


def run_rows(build_map: dict, names: list[str], lengths, repeats, device, limits, label) -> dict:
    rows = {}
    print(f"{'backend':30} {label:>8} {'n':>6} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak MB':>8} {'GFLOP/s':>8}")
    for name in names:
        if name not in build_map:
            continue
        rows[name] = []
        for n in lengths:
            if n > limits.get(name, 1 << 30):
                continue
            row = {"n": n, **measure(build_map[name], n, repeats, device)}
            row["gflops"] = useful_flops(name, n) / (row["fwd_ms"] / 1000) / 1e9
            rows[name].append(row)
            print(f"{name:30} {label:>8} {n:>6} {row['fwd_ms']:>9.1f} {row['fwd_bwd_ms']:>11.1f} {row['peak_mb']:>8.1f} {row['gflops']:>8.2f}", flush=True)
    return rows


def cuda_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"CPU, {t} thread{'s' if t != '1' else ''}", run["rows"]) for t, run in results["cpu"].items()]
    if results["cuda"].get("rows"):
        panels.append((f"CUDA, {results['cuda']['device']}", results["cuda"]["rows"]))
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 4.2 * len(panels)), squeeze=False)
    for (title, rows), pair in zip(panels, axes):
        for name, points in rows.items():
            lengths = [r["n"] for r in points]
            pair[0].plot(lengths, [r["fwd_bwd_ms"] for r in points], marker="o", label=name)
            pair[1].plot(lengths, [r["peak_mb"] for r in points], marker="o", label=name)
        for ax, label in zip(pair, ("forward+backward (ms)", "peak memory, forward+backward (MB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length")
            ax.set_ylabel(label)
            ax.set_title(title, fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        pair[0].legend(fontsize=7)
    fig.suptitle(f"one attention layer, hidden {HIDDEN}, {HEADS} heads, window {WINDOW}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse(argv=None):
    valid = sorted(set(cpu_names()) | set(cuda_names()))
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="The docs' plot: python benchmarks/attention.py && cp benchmarks/results/attention.png docs/long-context-benchmark.png",
    )
    parser.add_argument("--quick", action="store_true", help="1k and 2k tokens, one repetition")
    parser.add_argument("--lengths", type=int, nargs="+", help=f"override the sequence lengths (default {' '.join(map(str, DEFAULT_LENGTHS))})")
    parser.add_argument("--backends", nargs="+", metavar="NAME", help=f"run only these rows; valid: {', '.join(repr(v) for v in valid)}")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], metavar="N", help="CPU thread counts, all measured in this run (default 1 2)")
    parser.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], default=["cpu", "cuda"], help="where to run (cuda rows only when a device is present)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="folder for JSON and PNG")
    args = parser.parse_args(argv)
    unknown = [b for b in args.backends or [] if b not in valid]
    if unknown:
        parser.error(f"unknown backend(s) {', '.join(map(repr, unknown))}; valid: {', '.join(map(repr, valid))}")
    bad = [t for t in args.threads if t < 1]
    if bad:
        parser.error(f"--threads must be positive integers, got {bad}")
    bad = [n for n in args.lengths or [] if n < 1]
    if bad:
        parser.error(f"--lengths must be positive integers, got {bad}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # see the module docstring
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])

    lengths = args.lengths or ([1024, 2048] if args.quick else DEFAULT_LENGTHS)
    repeats = 1 if args.quick else 2
    chosen = args.backends
    import transformers

    results = {"lengths": lengths, "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
               "cpu": {}, "cuda": {}}
    if "cpu" in args.devices:
        names = [n for n in cpu_names() if chosen is None or n in chosen]
        builds = builders() if names else {}
        for threads in args.threads:
            torch.set_num_threads(threads)
            dense = matmul_gflops()
            print(f"\ndense fp32 matmul: {dense:.1f} GFLOP/s, {threads} thread(s)")
            run = {"threads": threads, "matmul_gflops": dense}
            run["rows"] = run_rows(builds, names, lengths, repeats, "cpu", LIMITS, f"{threads}thr")
            run["targets"] = cpu_targets(run)
            print_targets(run["targets"], f"{threads} thread(s), this run")
            results["cpu"][str(threads)] = run
    reason = cuda_unavailable() if "cuda" in args.devices else "--devices did not include cuda"
    if reason:
        results["cuda"] = {"skipped": reason}
        print(f"\nCUDA rows skipped: {reason}")
    else:
        names = [n for n in cuda_names() if chosen is None or n in chosen]
        device = torch.cuda.get_device_name()
        dense = matmul_gflops("cuda")
        print(f"\nCUDA {device}: dense fp32 matmul {dense:.1f} GFLOP/s")
        rows = run_rows(cuda_builders(), names, lengths, max(repeats, 3), "cuda", CUDA_LIMITS, "cuda")
        results["cuda"] = {"device": device, "cuda": torch.version.cuda, "matmul_gflops": dense, "rows": rows,
                           "targets": cuda_targets(rows, lengths)}
        print_targets(results["cuda"]["targets"], "CUDA")
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (args.out / f"attention{suffix}.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / f"attention{suffix}.png")
    print(f"wrote {args.out / f'attention{suffix}.json'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
