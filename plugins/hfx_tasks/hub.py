"""lm-eval-format task files for well-known datasets; they need the Hugging Face hub to download data."""

from __future__ import annotations

from pathlib import Path

from hfx.registry import Component

TASK_DIR = Path(__file__).parent / "hub"

COMPONENT = Component(
    kind="tasks",
    name="hub",
    factory=lambda: [TASK_DIR],
    description="arc_easy, arc_challenge, hellaswag, piqa, boolq, sst2, copa (datasets from the hub).",
)
