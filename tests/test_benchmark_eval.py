"""benchmarks/eval.py on a few documents: its three task files run under both harnesses with equal scores,
and the JSON it writes has the keys docs/evaluation.md describes. Timings are not checked."""

import importlib.util
import json
from pathlib import Path

import torch

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "eval.py"


def _load():
    spec = importlib.util.spec_from_file_location("hfx_benchmark_eval", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_evaluate_only_rows_match_lm_eval_and_record_the_targets(tmp_path, monkeypatch):
    bench = _load()
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))  # main() points it at its own folder
    threads = torch.get_num_threads()
    try:
        # b and c: the MMLU-style first_n and the generation task (a's kind of task is test_eval's parity set)
        report = bench.main(["--quick", "--no-whole", "--tasks", "b,c", "--docs", "4", "--output", str(tmp_path / "eval.json")])
    finally:
        torch.set_num_threads(threads)
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["rows"] == json.loads(json.dumps(report["rows"]))
    assert {"cpu", "cores", "threads", "torch", "transformers", "lm_eval"} <= set(written["machine"])
    assert written["machine"]["lm_eval"] == "0.4.13" and written["machine"]["threads"] == 2
    rows = {row["task"]: row for row in written["rows"]}
    assert sorted(rows) == ["b", "c"]
    for key, row in rows.items():
        assert row["docs"] == 4 and row["device"] == "cpu"
        assert row["metrics_equal"], row["metrics"]
        assert row["lm_eval_eval_s"] > 0 and row["hfx_eval_s"] > 0
        # seconds are written rounded to 0.01 and the ratio to 0.01: the bound is that rounding, not a guess
        lm, ours = row["lm_eval_eval_s"], row["hfx_eval_s"]
        rounding = (lm + 0.005) / max(ours - 0.005, 1e-9) - lm / ours + 0.005
        assert abs(row["eval_ratio"] - lm / ours) <= rounding
        assert row["target_eval"] == bench.TASKS[key]["target_eval"]
        assert row["pass_eval"] == (row["eval_ratio"] >= row["target_eval"])
        assert "hfx_whole_s" not in row  # --no-whole
    assert rows["b"]["requests"] == 4 * 4  # one request per choice
    assert rows["b"]["max_abs_dll"] < 1e-5
    assert rows["c"]["requests"] == 4 and rows["c"]["generations_differ"] == 0
    if not torch.cuda.is_available():
        assert "no CUDA" in written["gpu"]["skipped"]


def test_the_mmlu_style_task_is_what_the_benchmark_says(tmp_path):
    """first_n shots, a description, one-letter choices, questions of 25-40 words: lm-eval's own prompt."""
    bench = _load()
    tasks, _ = bench.write_tasks(tmp_path, {"a": 2, "b": 3, "c": 2})
    from lm_eval.tasks import TaskManager, get_task_dict

    task = get_task_dict(["bench_mmlu"], TaskManager(include_path=str(tasks), include_defaults=False))["bench_mmlu"]
    doc = task.test_docs()[0]
    assert 25 <= len(doc["question"].split()) <= 40
    assert task.doc_to_choice(doc) == ["A", "B", "C", "D"]
    prompt = task.fewshot_context(doc, num_fewshot=5)
    assert prompt.startswith("The following are multiple choice questions (with answers) about old towns.\n\n")
    assert prompt.count("\nAnswer:") == 6 and prompt.endswith("D. " + doc["choices"][3] + "\nAnswer:")
