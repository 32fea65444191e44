"""hfx eval vs lm-evaluation-harness 0.4.13: whole-process and evaluate-only times, side by side, same scores.

One GPT-2-shaped model (6 layers x 256 wide, 4 heads, a ~400-token byte-level BPE trained here on
the tasks' vocabulary) is saved with ``save_pretrained`` into a temporary folder, so both
harnesses load it from disk as a user's run does. Three local lm-eval YAML tasks on local JSON
data:

  a  bench_mc    5-shot, random ("default") sampler, 4-way multiple choice, choices of 2-6 words, 200 docs
  b  bench_mmlu  MMLU-style: description line, 5-shot ``first_n``, questions of 25-40 words shown with
                 "A. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:", scored as the continuations " A" / " B" / " C" / " D", 150 docs
  c  bench_gen   generate_until, 5-shot ``first_n`` arithmetic questions, until ["\\n\\n", "Question:"],
                 max_gen_toks 32, greedy, exact_match; 100 docs

For every task, in one run:

* **whole process**: wall (and CPU) seconds of a fresh ``hfx eval --model DIR --tasks T --include-path
  TASKS --no-cache --num-fewshot 5 --output F`` against ``lm_eval run --model hf --model_args
  pretrained=DIR --tasks T --include_path TASKS --batch_size 16 --num_fewshot 5 --output_path D``
  (lm-eval 0.4.13's ``run`` subcommand): interpreter start, imports, task index (lm-eval's includes
  its bundled catalogue, as every ``lm_eval run`` does), model load, evaluation, results written.
* **evaluate-only**: in this process, the model and tokenizer loaded once from the folder and shared;
  ``hfx.evaluation.evaluate(model, ...)`` against ``lm_eval.simple_evaluate(model=HFLM(pretrained=model,
  tokenizer=tok, batch_size=16), task_manager=M, ...)``, timed around those calls only. lm-eval's
  ``TaskManager`` (its task index) is built before the clock starts; hfx's evaluate call includes
  reading its task files and hashing the model's weights for its result cache (which is off).

Both harnesses run with 2 torch threads (``OMP_NUM_THREADS=2`` in the subprocesses,
``torch.set_num_threads(2)`` here). The script checks that acc / acc_norm / exact_match are equal
(in-process and whole-process), the largest |log-likelihood difference| over every request (from
the logged samples) and, for generation, that every generated string is equal. A table is printed
and ``benchmarks/results/eval.json`` written atomically, with the machine, the versions, and each
speed target with pass/fail. With CUDA present, GPU rows follow (hfx ``--device cuda --model-args
dtype=bfloat16``, lm-eval ``--device cuda --model_args pretrained=DIR,dtype=bfloat16``); without,
the reason they were skipped is printed and recorded.

    python benchmarks/eval.py                      # all three tasks -> benchmarks/results/eval.json
    python benchmarks/eval.py --tasks b --repeats 3
    python benchmarks/eval.py --quick              # tiny sizes, 2-layer model -> results/eval_quick.json (untracked)
    python benchmarks/eval.py --startup            # also: where an `hfx eval` / `lm_eval run` process spends its fixed cost
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

THREADS = 2
LM_EVAL_BATCH = 16
SHOTS = 5
TASKS = {
    "a": {"name": "bench_mc", "title": "5-shot random-sampler MC, 2-6-word choices", "metrics": ("acc", "acc_norm"),
          "target_eval": 4.0, "target_whole": 3.0},
    "b": {"name": "bench_mmlu", "title": "MMLU-style 5-shot first_n, one-letter choices", "metrics": ("acc", "acc_norm"),
          "target_eval": 6.0, "target_whole": 3.0},
    "c": {"name": "bench_gen", "title": "generate_until 5-shot first_n, max_gen_toks 32", "metrics": ("exact_match",),
          "target_eval": 2.0, "target_whole": 1.5},
}
SIZES = {  # docs per task, model width and depth
    "full": {"a": 200, "b": 150, "c": 100, "width": 256, "layers": 6},
    "quick": {"a": 24, "b": 20, "c": 12, "width": 64, "layers": 2},
}

WORDS = ("red blue green yellow cat dog owl fox baker farmer sailor lives in works as the of a is and big small "
         "near under over river town market bread stone garden").split()
TOPIC = ("which what where when town river market bridge mill harbour miller weaver mayor council bread grain "
         "stone timber wool cloth north south east west old new first last largest smallest built sold carried "
         "across over under near beside during after before winter summer spring autumn road field tower gate "
         "merchant guild school church well wall ship cart horse sheep goat cheese salt iron copper silver "
         "the of a an in on to by for from with was were is are has had most least many few three two").split()
NUMBER_WORDS = ("plus", "minus", "times")


def _sentence(rng: random.Random, words, n: int) -> str:
    return " ".join(rng.choice(words) for _ in range(n))


def _mc_doc(rng):
    return {"question": _sentence(rng, WORDS, rng.randint(6, 14)),
            "choices": [_sentence(rng, WORDS, rng.randint(2, 6)) for _ in range(4)], "label": rng.randrange(4)}


def _mmlu_doc(rng):
    question = _sentence(rng, TOPIC, rng.randint(25, 40)).capitalize() + "?"
    return {"question": question, "choices": [_sentence(rng, TOPIC, rng.randint(1, 4)) for _ in range(4)],
            "answer": rng.randrange(4)}


def _gen_doc(rng):
    a, b, op = rng.randint(2, 60), rng.randint(2, 40), rng.choice(NUMBER_WORDS)
    value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
    return {"question": f"What is {a} {op} {b}?", "answer": str(value)}


def write_tasks(root: Path, sizes: dict) -> tuple[Path, list[str]]:
    """Local JSON data and lm-eval YAML task files; returns (task folder, texts to train the tokenizer on)."""
    rng = random.Random(0)
    data = root / "data"
    data.mkdir()
    texts = []
    for key, make, pool in (("a", _mc_doc, 50), ("b", _mmlu_doc, 5), ("c", _gen_doc, 5)):
        for split, n in (("train", pool), ("test", sizes[key])):
            docs = [make(rng) for _ in range(n)]
            with open(data / f"{TASKS[key]['name']}_{split}.jsonl", "w") as handle:
                handle.writelines(json.dumps(d) + "\n" for d in docs)
            for d in docs:
                texts.append(" ".join(str(v) if not isinstance(v, list) else " ".join(v) for v in d.values()))
    tasks = root / "tasks"
    tasks.mkdir()

    def files(name):
        return (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {data}/{name}_train.jsonl\n"
                f"    test: {data}/{name}_test.jsonl\n")

    (tasks / "bench_mc.yaml").write_text(
        "task: bench_mc\n" + files("bench_mc") + "output_type: multiple_choice\ntraining_split: train\n"
        "test_split: test\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_target: label\n"
        "doc_to_choice: choices\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (tasks / "bench_mmlu.yaml").write_text(
        "task: bench_mmlu\n" + files("bench_mmlu") + "output_type: multiple_choice\nfewshot_split: train\n"
        "test_split: test\nfewshot_config:\n  sampler: first_n\n"
        "description: \"The following are multiple choice questions (with answers) about old towns.\\n\\n\"\n"
        "doc_to_text: \"{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\n"
        "D. {{choices[3]}}\\nAnswer:\"\ndoc_to_choice: [\"A\", \"B\", \"C\", \"D\"]\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\nmetadata:\n  version: 1.0\n")
    (tasks / "bench_gen.yaml").write_text(
        "task: bench_gen\n" + files("bench_gen") + "output_type: generate_until\nfewshot_split: train\n"
        "test_split: test\nfewshot_config:\n  sampler: first_n\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\"\\n\\n\", \"Question:\"]\n"
        "  max_gen_toks: 32\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
        "    aggregation: mean\n    higher_is_better: true\n    ignore_case: true\n    ignore_punctuation: true\n")
    texts += ["Question: Answer: A. B. C. D. The following are multiple choice questions (with answers) about "
              "old towns. What is plus minus times 0 1 2 3 4 5 6 7 8 9 ?"] * 20
    return tasks, texts


def build_model(folder: Path, texts: list[str], width: int, layers: int) -> dict:
    """A random GPT-2-shaped model and a BPE trained on the task texts, saved the way users have them."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=width, n_layer=layers, n_head=4,
                                       bos_token_id=0, eos_token_id=0)).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return {"shape": "GPT-2", "layers": layers, "width": width, "heads": 4, "vocab": len(tok),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}


# -- runs -----------------------------------------------------------------------------------
def _script(name: str) -> list[str]:
    """The console script next to this interpreter (what users type), else ``python -m``."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", {"hfx": "hfx.cli", "lm_eval": "lm_eval"}[name]]


def child_env(root: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=str(root / "datasets"),
               HFX_EVAL_CACHE=str(root / "hfx_cache"), PYTHONWARNINGS="ignore")
    return env


def timed_process(command: list[str], env: dict, log: Path) -> dict:
    """Wall and CPU (user + sys) seconds of one child process; its output kept in ``log``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{' '.join(command[:3])} ... failed (exit {done.returncode}):\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu}


def _metrics(results: dict, task: str, names) -> dict:
    row = results["results"][task]
    return {m: row.get(f"{m},none") for m in names}


def hfx_whole(model_dir, task, tasks_dir, work: Path, env, device: str | None, dtype: str | None) -> tuple[dict, dict]:
    out = work / f"hfx_{task}_{time.monotonic_ns()}.json"
    command = _script("hfx") + ["eval", "--model", str(model_dir), "--tasks", task, "--include-path", str(tasks_dir),
                                "--no-cache", "--num-fewshot", str(SHOTS), "--output", str(out)]
    if device:
        command += ["--device", device]
    if dtype:
        command += ["--model-args", f"dtype={dtype}"]
    timing = timed_process(command, env, out.with_suffix(".log"))
    return timing, json.loads(out.read_text())


def lm_eval_whole(model_dir, task, tasks_dir, work: Path, env, device: str | None, dtype: str | None) -> tuple[dict, dict]:
    out = work / f"lm_eval_{task}_{time.monotonic_ns()}"
    model_args = f"pretrained={model_dir}" + (f",dtype={dtype}" if dtype else "")
    command = _script("lm_eval") + ["run", "--model", "hf", "--model_args", model_args, "--tasks", task,
                                    "--include_path", str(tasks_dir), "--batch_size", str(LM_EVAL_BATCH),
                                    "--num_fewshot", str(SHOTS), "--output_path", str(out)]
    if device:
        command += ["--device", device]
    timing = timed_process(command, env, out.with_suffix(".log"))
    (found,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    return timing, json.loads(Path(found).read_text())


def hfx_inprocess(model, tok, task, tasks_dir) -> tuple[dict, dict, list]:
    from hfx.evaluation import evaluate

    started, cpu = time.perf_counter(), time.process_time()
    results, records = evaluate(model, task, tokenizer=tok, num_fewshot=SHOTS, include_path=tasks_dir, cache_dir=False,
                                progress=False, return_records=True)
    timing = {"wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu}
    return timing, results, records[task]


def lm_eval_inprocess(model, tok, task, manager) -> tuple[dict, dict, list]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    started, cpu = time.perf_counter(), time.process_time()
    results = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=LM_EVAL_BATCH), tasks=[task],
                                      num_fewshot=SHOTS, task_manager=manager, log_samples=True)
    timing = {"wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu}
    return timing, results, sorted(results["samples"][task], key=lambda s: s["doc_id"])


def compare_requests(ref_samples: list, records: list) -> dict:
    """Largest |Δ log-likelihood| over every scored request, or, for generation, how many outputs differ."""
    if len(ref_samples) != len(records):
        return {"requests": None, "docs_mismatch": f"{len(ref_samples)} vs {len(records)}"}
    worst, requests, texts_differ = 0.0, 0, 0
    for sample, record in zip(ref_samples, records):
        for ref, ours in zip(sample["resps"], record["resps"]):
            requests += 1
            ref, ours = ref[0], ours
            if isinstance(ref, str):
                texts_differ += ref != (ours if isinstance(ours, str) else ours[0])
            else:
                worst = max(worst, abs(float(ref[0]) - float(ours[0])))
    return {"requests": requests, "max_abs_dll": worst, "generations_differ": texts_differ}


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def measure_task(key: str, args, model, tok, model_dir: Path, tasks_dir: Path, manager, work: Path, env,
                 device: str | None = None, dtype: str | None = None) -> dict:
    spec = TASKS[key]
    name = spec["name"]
    runs = {"hfx_whole": [], "lm_eval_whole": [], "hfx_eval": [], "lm_eval_eval": []}
    for repeat in range(args.repeats):
        order = ("hfx", "lm_eval") if repeat % 2 == 0 else ("lm_eval", "hfx")  # alternate who runs first
        for who in order:
            if args.evaluate:
                if who == "hfx":
                    timing, ours, records = hfx_inprocess(model, tok, name, tasks_dir)
                else:
                    timing, ref, ref_samples = lm_eval_inprocess(model, tok, name, manager)
                runs[f"{who}_eval"].append(timing)
            if args.whole:
                whole = hfx_whole if who == "hfx" else lm_eval_whole
                timing, result = whole(model_dir, name, tasks_dir, work, env, device, dtype)
                timing["metrics"] = _metrics(result, name, spec["metrics"])
                runs[f"{who}_whole"].append(timing)
    row = {"task": key, "name": name, "title": spec["title"], "docs": args.sizes[key], "device": device or "cpu",
           "dtype": dtype or "float32", "repeats": args.repeats, "runs": runs}
    for part in ("whole", "eval"):
        if runs[f"hfx_{part}"] and runs[f"lm_eval_{part}"]:
            ours_s, ref_s = _median(runs[f"hfx_{part}"], "wall_s"), _median(runs[f"lm_eval_{part}"], "wall_s")
            row[f"hfx_{part}_s"], row[f"lm_eval_{part}_s"] = round(ours_s, 2), round(ref_s, 2)
            row[f"{part}_ratio"] = round(ref_s / ours_s, 2)
            row[f"{part}_cpu_ratio"] = round(_median(runs[f"lm_eval_{part}"], "cpu_s") / _median(runs[f"hfx_{part}"], "cpu_s"), 2)
            target = spec[f"target_{part}"]
            row[f"target_{part}"] = target
            row[f"pass_{part}"] = row[f"{part}_ratio"] >= target
    if args.evaluate:
        row["metrics"] = {"lm_eval": _metrics(ref, name, spec["metrics"]), "hfx": _metrics(ours, name, spec["metrics"])}
        row["metrics_equal"] = row["metrics"]["lm_eval"] == row["metrics"]["hfx"]
        row.update(compare_requests(ref_samples, records))
    if args.whole:
        whole_metrics = [r["metrics"] for r in runs["hfx_whole"] + runs["lm_eval_whole"]]
        row["whole_metrics"] = whole_metrics[0]
        row["whole_metrics_equal"] = all(m == whole_metrics[0] for m in whole_metrics)
    return row


# -- start-up cost ----------------------------------------------------------------------------
STARTUP_PROBE = r"""
import json, sys, time
marks = {}
def timed(name, fn):
    started = time.perf_counter(); value = fn(); marks[name] = round(time.perf_counter() - started, 3); return value
model_dir, task, tasks_dir = sys.argv[1:4]
timed("import torch", lambda: __import__("torch"))
timed("import transformers", lambda: __import__("transformers"))
timed("import datasets", lambda: __import__("datasets"))
timed("import hfx.evaluation", lambda: __import__("hfx.evaluation"))
from hfx.evaluation import evaluator
from hfx.evaluation.catalogue import TaskIndex
from hfx.evaluation.cache import ContentHashMemo, model_identity
timed("task index: plugins + include (1st in process)", lambda: TaskIndex([tasks_dir]))
timed("task index: again (in-process memo)", lambda: TaskIndex([tasks_dir]))
timed("plan: task files, documents, prompts", lambda: evaluator.plan([task], include_path=[tasks_dir], num_fewshot=5,
                                                                      limit=None, seed=1234))
model, tok, source = timed("load model + tokenizer (with the modeling import)", lambda: evaluator.load_model(model_dir))
timed("model identity: hash weight files (no memo)", lambda: model_identity(model, tok, source, memo=ContentHashMemo(None)))
marks["bitsandbytes imported"] = "bitsandbytes" in sys.modules
print(json.dumps(marks))
"""

LM_EVAL_PROBE = r"""
import json, sys, time
marks = {}
def timed(name, fn):
    started = time.perf_counter(); value = fn(); marks[name] = round(time.perf_counter() - started, 3); return value
timed("import torch", lambda: __import__("torch"))
timed("import transformers", lambda: __import__("transformers"))
timed("import lm_eval + HFLM", lambda: __import__("lm_eval.models.huggingface"))
from lm_eval.tasks import TaskManager
timed("TaskManager: bundled catalogue + include", lambda: TaskManager(include_path=sys.argv[2]))
from lm_eval.models.huggingface import HFLM
timed("HFLM(pretrained=DIR): model + tokenizer", lambda: HFLM(pretrained=sys.argv[1], batch_size=16, device="cpu"))
print(json.dumps(marks))
"""


def _probe(code: str, argv: list[str], env: dict):
    done = subprocess.run([sys.executable, "-c", code] + argv, env=env, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {"error": done.stderr[-2000:]}


def import_profile(command: list[str], env: dict, top: int = 12) -> dict:
    """``python -X importtime`` of a command: total import seconds and the costliest top-level packages."""
    done = subprocess.run([sys.executable, "-X", "importtime"] + command, env=env, capture_output=True, text=True)
    per_package: dict[str, float] = {}
    for line in done.stderr.splitlines():
        parts = line.split("|")
        if not line.startswith("import time:") or len(parts) != 3 or "cumulative" in line:
            continue
        depth = len(parts[2]) - len(parts[2].lstrip())
        if depth == 1:  # imported by the script itself, not by another module (those are inside its cumulative)
            package = parts[2].strip().split(".")[0]
            per_package[package] = per_package.get(package, 0.0) + int(parts[1]) / 1e6
    ranked = sorted(per_package.items(), key=lambda kv: -kv[1])[:top]
    return {"imports_s": round(sum(per_package.values()), 2), "top": [{"package": p, "s": round(s, 2)} for p, s in ranked]}


def startup(model_dir: Path, tasks_dir: Path, env: dict, work: Path) -> dict:
    """Where the fixed cost of one process goes, for hfx eval and lm_eval run (each phase in a fresh interpreter)."""
    out: dict = {}
    argv = [str(model_dir), "bench_mc", str(tasks_dir)]
    out["hfx_phases_cold_s"] = _probe(STARTUP_PROBE, argv, env)  # first process: index cache and page cache cold
    out["hfx_phases_warm_s"] = _probe(STARTUP_PROBE, argv, env)
    out["hfx_eval_help_s"] = round(timed_process(_script("hfx") + ["eval", "--help"], env, work / "help.log")["wall_s"], 2)
    out["hfx_eval_limit_1_s"] = timed_process(
        _script("hfx") + ["eval", "--model", str(model_dir), "--tasks", "bench_mc", "--include-path", str(tasks_dir),
                          "--no-cache", "--limit", "1"], env, work / "limit1.log")
    out["hfx_imports"] = import_profile(["-m", "hfx.cli", "eval", "--model", str(model_dir), "--tasks", "bench_mc",
                                         "--include-path", str(tasks_dir), "--no-cache", "--limit", "1"], env)
    out["lm_eval_phases_s"] = _probe(LM_EVAL_PROBE, [str(model_dir), str(tasks_dir)], env)
    out["lm_eval_run_limit_1_s"] = timed_process(
        _script("lm_eval") + ["run", "--model", "hf", "--model_args", f"pretrained={model_dir}", "--tasks", "bench_mc",
                              "--include_path", str(tasks_dir), "--limit", "1"], env, work / "lm_limit1.log")
    out["lm_eval_imports"] = import_profile(["-m", "lm_eval", "run", "--model", "hf", "--model_args",
                                             f"pretrained={model_dir}", "--tasks", "bench_mc", "--include_path",
                                             str(tasks_dir), "--limit", "1"], env)
    return out


# -- report -----------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    head = ("| task | device | docs | lm-eval whole s | hfx whole s | whole ratio | lm-eval evaluate s | hfx evaluate s "
            "| evaluate ratio | metrics equal | max Δ loglik |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        def ratio(part):
            if f"{part}_ratio" not in r:
                return "-"
            mark = "✓" if r[f"pass_{part}"] else "✗"
            return f"{r[f'{part}_ratio']:.2f}x {mark} (≥{r[f'target_{part}']:g})"
        equal = "-"
        if "metrics_equal" in r or "whole_metrics_equal" in r:
            equal = "yes" if r.get("metrics_equal", True) and r.get("whole_metrics_equal", True) else "NO"
        delta = "-"
        if r.get("requests"):
            delta = (f"{r['max_abs_dll']:.1e}" if r["name"] != "bench_gen"
                     else f"{r['requests'] - r['generations_differ']}/{r['requests']} texts equal")
        lines.append(f"| {r['task']} {r['name']} | {r['device']} {r['dtype']} | {r['docs']} | {r.get('lm_eval_whole_s', '-')} "
                     f"| {r.get('hfx_whole_s', '-')} | {ratio('whole')} | {r.get('lm_eval_eval_s', '-')} "
                     f"| {r.get('hfx_eval_s', '-')} | {ratio('eval')} | {equal} | {delta} |")
    return "\n".join(lines)


def cpu_time_lines(rows: list[dict]) -> str:
    """Ratios of CPU seconds (user + sys): less swayed than wall time by other jobs on a shared machine."""
    lines = []
    for r in rows:
        parts = [f"{part} {r[f'{part}_cpu_ratio']:.2f}x" for part in ("whole", "eval") if f"{part}_cpu_ratio" in r]
        if parts:
            lines.append(f"CPU-time ratio (lm-eval / hfx), {r['task']} {r['name']} {r['device']}: " + ", ".join(parts))
    return "\n".join(lines)


def machine() -> dict:
    import lm_eval  # noqa: F401
    import torch
    import transformers
    from importlib.metadata import version

    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or cpu
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": THREADS, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "lm_eval": version("lm_eval"),
            "hfx": version("hfx") if _installed("hfx") else None, "load_average": list(os.getloadavg()),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _installed(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
        return True
    except PackageNotFoundError:
        return False


def gpu_skip_reason() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    help_text = subprocess.run(_script("hfx") + ["eval", "--help"], capture_output=True, text=True).stdout
    missing = [flag for flag in ("--device", "--model-args") if flag not in help_text]
    if missing:
        return f"hfx eval has no {' / '.join(missing)} yet"
    return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny tasks and a 2-layer 64-wide model (< 2 minutes)")
    parser.add_argument("--tasks", default="a,b,c", help="comma-separated subset of a, b, c")
    parser.add_argument("--docs", type=int, default=None, help="documents per task (default: 200 / 150 / 100, quick: 24 / 20 / 12)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per harness and mode; the median is reported")
    parser.add_argument("--no-whole", dest="whole", action="store_false", help="skip the whole-process runs")
    parser.add_argument("--no-evaluate", dest="evaluate", action="store_false", help="skip the in-process runs")
    parser.add_argument("--startup", action="store_true", help="also profile the fixed cost of one process of each")
    parser.add_argument("--output", default=None,
                        help="JSON path (default benchmarks/results/eval.json, eval_quick.json with --quick)")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.tasks.split(",") if k.strip()]
    unknown = [k for k in keys if k not in TASKS]
    if unknown or not keys:
        parser.error(f"--tasks {args.tasks!r}: unknown {unknown}; choose from {', '.join(TASKS)}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if not (args.whole or args.evaluate or args.startup):
        parser.error("--no-whole and --no-evaluate leave nothing to measure (add --startup for the start-up profile)")
    if args.docs is not None and args.docs < 1:
        parser.error(f"--docs must be at least 1, got {args.docs}")
    args.sizes = dict(SIZES["quick" if args.quick else "full"])
    if args.docs is not None:
        args.sizes.update({key: args.docs for key in TASKS})
    output = Path(args.output or Path(__file__).parent / "results" / f"eval{'_quick' if args.quick else ''}.json")

    root = Path(tempfile.mkdtemp(prefix="hfx_bench_eval_"))
    try:
        os.environ["HF_DATASETS_CACHE"] = str(root / "datasets")  # before datasets is imported
        import torch

        torch.set_num_threads(THREADS)
        tasks_dir, texts = write_tasks(root, args.sizes)
        model_dir = root / "model"
        model_info = build_model(model_dir, texts, args.sizes["width"], args.sizes["layers"])
        env = child_env(root)
        work = root / "runs"
        work.mkdir()

        from lm_eval.tasks import TaskManager
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # Built before the clock starts. Only the local tasks: the bundled catalogue's index (what every
        # `lm_eval run` builds, in the whole-process times; --startup times it) does not change evaluate-only.
        manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(model_dir)
        print(f"model: {model_info}; "
              f"torch threads {torch.get_num_threads()}; lm-eval CLI: lm_eval run", flush=True)

        report = {"command": "python benchmarks/eval.py " + " ".join(sys.argv[1:]), "machine": machine(),
                  "model": model_info, "lm_eval_cli": "lm_eval run (lm-eval 0.4.13 subcommand)",
                  "lm_eval_batch_size": LM_EVAL_BATCH, "hfx_batching": "default (token budget 4096)",
                  "sizes": args.sizes, "num_fewshot": SHOTS, "rows": []}

        def save():
            from hfx.evaluation.results import write_atomic

            report["machine"]["load_average_end"] = list(os.getloadavg())
            write_atomic(output, json.dumps(report, indent=1) + "\n")

        for key in keys if args.whole or args.evaluate else ():
            row = measure_task(key, args, model, tok, model_dir, tasks_dir, manager, work, env)
            report["rows"].append(row)
            print(table([row]).splitlines()[-1], flush=True)
            save()
        reason = gpu_skip_reason() if args.whole or args.evaluate else "only --startup asked for"
        if reason:
            print(f"GPU rows skipped: {reason}")
            report["gpu"] = {"skipped": reason}
        else:
            gpu_model = model.to("cuda", dtype=torch.bfloat16)
            for key in keys:
                row = measure_task(key, args, gpu_model, tok, model_dir, tasks_dir, manager, work, env,
                                   device="cuda", dtype="bfloat16")
                report["rows"].append(row)
                save()
            report["gpu"] = {"device": torch.cuda.get_device_name(0)}
        if args.startup:
            report["startup"] = startup(model_dir, tasks_dir, env, work)
            print(json.dumps(report["startup"], indent=1))
        save()
        print()
        print(table(report["rows"]))
        print(cpu_time_lines(report["rows"]))
        print(f"load average at the end: {report['machine']['load_average_end']}; written: {output}")
        return report
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
