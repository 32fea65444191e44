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
        def __init__(self, step_s, losses):
            self.times, self.peak, self.losses = [step_s] * 4, 0, list(losses)

    # The pipelines are replaced by fixed step times and loss curves: this checks where rows go and what
    # they report, not how fast anything is.
    monkeypatch.setattr(module, "build_models", lambda root: {"hfx-tiny": "m", "llama-tiny": "m", "data": "d"})
    monkeypatch.setattr(module, "run_plain", lambda *args: Timer(0.100, [4.0, 3.5, 3.0, 2.5]))
    monkeypatch.setattr(module, "run_hfx", lambda *args: Timer(0.104, [4.0, 3.5, 3.0, 2.5]))
    monkeypatch.setattr(module, "run_trl", lambda *args: Timer(0.110, [4.0, 3.5, 3.25, 2.5]))
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


def test_trl_row_reports_overhead_and_loss_difference_for_full_and_lora_only(bench, tmp_path):
    assert bench.main(["--quick", "--methods", "lora,qlora", "--models", "hfx-tiny"]) == 0
    lora, qlora = json.loads((tmp_path / "finetune_quick.json").read_text())["rows"]
    assert lora["trl_step_ms"] == 110.0
    assert lora["overhead_vs_trl"] == pytest.approx(0.104 / 0.110 - 1, abs=1e-3)
    assert lora["loss_diff_trl"] == pytest.approx(0.25) and lora["loss_diff_plain"] == 0.0
    assert lora["losses"]["trl"] == [4.0, 3.5, 3.25, 2.5]
    # SFTTrainer casts the adapters of a quantised base to bf16: no like-for-like 4-bit row
    assert "trl_step_ms" not in qlora and "overhead_vs_trl" not in qlora and qlora["overhead"] == pytest.approx(0.04)


def test_pipelines_option_leaves_trl_out_and_refuses_unknown_names(bench, tmp_path, capsys):
    assert bench.main(["--quick", "--methods", "full", "--models", "llama-tiny", "--pipelines", "plain"]) == 0
    (row,) = json.loads((tmp_path / "finetune_quick.json").read_text())["rows"]
    assert "trl_step_ms" not in row and set(row["losses"]) == {"plain", "hfx"}
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--pipelines", "plain,axolotl"])
    assert "unknown pipeline(s) ['axolotl']" in capsys.readouterr().err


def test_loss_difference_is_the_largest_gap_over_the_compared_steps(bench):
    assert bench.loss_difference([1.0, 2.0, 3.0], [1.0, 2.5, 3.1]) == pytest.approx(0.5)
    assert bench.loss_difference([1.0, 2.0, 3.0], [1.0, 2.0, 9.0], steps=2) == 0.0
    assert bench.loss_difference([], [1.0]) is None


def test_packing_compares_hfx_with_trl_on_the_varied_texts_and_refuses_the_plain_script(bench, tmp_path, capsys,
                                                                                         monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "build_models", lambda root: {"hfx-tiny": "m", "data": "d", "data_varied": "v"})
    for name in ("run_hfx", "run_trl"):
        timer = getattr(bench, name)()
        monkeypatch.setattr(bench, name, lambda *args, t=timer, n=name: calls.append((n, args[1], args[-1])) or t)
    assert bench.main(["--quick", "--methods", "lora", "--models", "hfx-tiny", "--pipelines", "trl",
                       "--packing", "bfd"]) == 0
    assert sorted(calls) == [("run_hfx", "v", "bfd"), ("run_trl", "v", "bfd")]
    (row,) = json.loads((tmp_path / "finetune_quick.json").read_text())["rows"]
    assert row["packing"] == "bfd" and "plain_step_ms" not in row and "overhead_vs_trl" in row
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--packing", "bfd"])
    assert "the plain script does not pack" in capsys.readouterr().err
