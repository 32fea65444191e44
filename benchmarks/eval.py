"""hfx eval vs lm-evaluation-harness 0.4.13: same model, same task file, both times and both score sets.

A 5-shot, 4-way multiple-choice task whose choices are several tokens long, on a GPT-2-shaped
model built locally (no hub). Both harnesses get the same model object and tokenizer.

    python benchmarks/eval.py            # 200 docs, 6-layer 256-wide model
    python benchmarks/eval.py --quick    # 40 docs, smaller model
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

WORDS = ("red blue green yellow cat dog owl fox baker farmer sailor lives in works as the of a is and big small "
         "near under over river town market bread stone garden").split()


def build(root: Path, docs: int, width: int, layers: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    rng = random.Random(0)

    def sentence(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([sentence(12) for _ in range(500)], vocab_size=400, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=width, n_layer=layers,
                                       n_head=4, bos_token_id=0, eos_token_id=0)).eval()
    for split, n in (("train", 50), ("test", docs)):
        with open(root / f"{split}.jsonl", "w") as handle:
            for _ in range(n):
                item = {"question": sentence(rng.randint(6, 14)), "choices": [sentence(rng.randint(2, 6)) for _ in range(4)],
                        "label": rng.randrange(4)}
                handle.write(json.dumps(item) + "\n")
    (root / "tasks").mkdir()
    (root / "tasks" / "bench_mc.yaml").write_text(
        f"task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {root}/train.jsonl\n"
        f"    test: {root}/test.jsonl\noutput_type: multiple_choice\ntraining_split: train\ntest_split: test\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_target: label\ndoc_to_choice: choices\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return model, tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval's batch size")
    args = parser.parse_args()
    docs, width, layers = (40, 128, 2) if args.quick else (200, 256, 6)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, tok = build(root, docs, width, layers)

        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        from hfx.evaluation import evaluate

        start = time.perf_counter()
        manager = TaskManager(include_path=str(root / "tasks"), include_defaults=True)
        index_s = time.perf_counter() - start
        start = time.perf_counter()
        ref = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size),
                                      tasks=["bench_mc"], num_fewshot=args.shots, task_manager=manager, log_samples=True)
        lm_s = time.perf_counter() - start

        start = time.perf_counter()
        ours, records = evaluate(model, "bench_mc", tokenizer=tok, num_fewshot=args.shots, include_path=root / "tasks",
                                 cache_dir=False, progress=False, return_records=True)
        hfx_s = time.perf_counter() - start

    ref_samples = sorted(ref["samples"]["bench_mc"], key=lambda s: s["doc_id"])
    diff = max(abs(r[0][0] - o[0]) for s, rec in zip(ref_samples, records["bench_mc"]) for r, o in zip(s["resps"], rec["resps"]))
    requests = sum(len(s["resps"]) for s in ref_samples)
    print(f"model: GPT-2 shape, {layers} layers x {width}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; "
          f"task: {docs} docs, 4 choices of 2-6 words, {args.shots}-shot; {requests} loglikelihood requests; "
          f"torch threads {torch.get_num_threads()}")
    print(f"lm-eval 0.4.13: task index {index_s:.1f} s + evaluate {lm_s:.1f} s  ({requests / lm_s:.1f} requests/s, batch {args.batch_size})")
    print(f"hfx eval      : evaluate {hfx_s:.1f} s  ({requests / hfx_s:.1f} requests/s)  -> {lm_s / hfx_s:.2f}x "
          f"({(lm_s + index_s) / hfx_s:.2f}x with lm-eval's task index)")
    for metric in ("acc,none", "acc_norm,none"):
        print(f"{metric:14s} lm-eval {ref['results']['bench_mc'][metric]:.6f}   hfx {ours['results']['bench_mc'][metric]:.6f}")
    print(f"max |log-likelihood difference| over all choices: {diff:.2e}")


if __name__ == "__main__":
    main()
