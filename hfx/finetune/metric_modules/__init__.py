"""``evaluate`` metric scripts that ship with hfx, one metric per file.

``evaluate.load("accuracy")`` fetches its script from the Hugging Face Hub; these are loaded by
path instead (:func:`hfx.finetune.metrics.load_metric`), so metrics work offline.
"""

from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def script(name: str) -> Path:
    """The path of the metric script ``name`` (a file of this folder)."""
    return FOLDER / f"{name}.py"
