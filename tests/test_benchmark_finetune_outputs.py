"""benchmarks/finetune.py: a --quick run writes its own file and never replaces the recorded rows."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_finetune", ROOT / "benchmarks" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS_DIR", tmp_path)

    class Timer:
        def __init__(self, step_s):
            self.times, self.peak = [step_s] * 4, 0

    # The pipelines are replaced by fixed step times: this checks where rows go, not how fast anything is.
    monkeypatch.setattr(module, "build_models", lambda root: {"hfx-tiny": "m", "llama-tiny": "m", "data": "d"})
    monkeypatch.setattr(module, "run_plain", lambda *args: Timer(0.100))
    monkeypatch.setattr(module, "run_hfx", lambda *args: Timer(0.104))
    return module


def test_quick_run_writes_finetune_quick_json_and_leaves_the_recorded_file(bench, tmp_path):
    recorded = tmp_path / "finetune.json"
    recorded.write_text('{"rows": ["recorded"]}')
    assert bench.main(["--quick", "--methods", "lora", "--models", "hfx-tiny"]) == 0
    assert recorded.read_text() == '{"rows": ["recorded"]}'
    quick = json.loads((tmp_path / "finetune_quick.json").read_text())
    assert quick["steps"] == 4 and quick["repeats"] == 1
    (row,) = quick["rows"]
    assert (row["model"], row["method"], row["plain_step_ms"], row["hfx_step_ms"]) == ("hfx-tiny", "lora", 100.0, 104.0)
    assert row["overhead"] == pytest.approx(0.04)


def test_full_run_writes_the_recorded_file_and_json_overrides_both(bench, tmp_path):
    assert bench.main(["--steps", "4", "--repeats", "1", "--methods", "full", "--models", "llama-tiny"]) == 0
    assert json.loads((tmp_path / "finetune.json").read_text())["rows"][0]["method"] == "full"
    assert not (tmp_path / "finetune_quick.json").exists()
    other = tmp_path / "elsewhere" / "mine.json"
    assert bench.main(["--quick", "--methods", "full", "--models", "llama-tiny", "--json", str(other)]) == 0
    assert json.loads(other.read_text())["steps"] == 4
    assert not (tmp_path / "finetune_quick.json").exists()


def test_quick_results_are_not_tracked_by_git():
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "benchmarks/results/*_quick.*" in ignored
