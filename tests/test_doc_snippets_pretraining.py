"""The Python snippets of docs/pretraining.md, docs/architecture.md and docs/plugins.md run as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / page).read_text(), re.S)


def run_snippet(code: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("page", ["pretraining.md", "architecture.md", "seq2seq.md"])
def test_every_python_block_runs(page, tmp_path):
    blocks = python_blocks(page)
    assert blocks
    for block in blocks:
        run_snippet(block, tmp_path)


def test_printed_values_are_the_ones_the_pages_show(tmp_path):
    (tokenizers,) = [b for b in python_blocks("pretraining.md") if "train_tokenizer" in b]
    assert run_snippet(tokenizers, tmp_path).splitlines() == [
        "['the', 'sky', 'is']", "['[CLS]', 'the', 'sky', 'is', '[SEP]']"]
    (startup,) = [b for b in python_blocks("architecture.md") if '"torch" in sys.modules' in b]
    assert run_snippet(startup, tmp_path).splitlines() == ["False", "HfxForCausalLM"]


def test_the_plugin_module_and_its_in_process_registration_run(tmp_path):
    blocks = python_blocks("plugins.md")
    module = next(b for b in blocks if "COMPONENT = Component(" in b)
    in_process = next(b for b in blocks if "registry.register(COMPONENT)" in b)
    run_snippet(module + "\n" + in_process, tmp_path)
