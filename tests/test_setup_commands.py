"""The README's two set-up commands are the ones CI runs and the ones pyproject.toml supports."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Set-up", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_has_exactly_two_setup_commands_install_then_test():
    install, test = setup_commands()
    assert "pip install" in install and install.rstrip().endswith("hfx quickstart")
    assert "[test]" in test and test.rstrip().endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command_verbatim():
    _, test = setup_commands()
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test in ci_lines


def test_the_torch_pin_of_the_commands_is_inside_the_tested_range():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    torch_range = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    for command in setup_commands():
        pinned = re.search(r'"torch==([\d.]+)"', command).group(1)
        low, high = re.fullmatch(r"torch>=([\d.]+),<([\d.]+)", torch_range).groups()
        as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
        assert as_tuple(low) <= as_tuple(pinned) < as_tuple(high), (pinned, torch_range)


def test_the_console_script_is_the_one_the_first_command_runs():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "hfx" in pyproject["project"]["scripts"]


def test_docs_speak_to_users_without_pointing_outside_the_repository():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for needle in ("../shared", "SEEDS.md", "FACTS.md", "the issue", "this issue"):
            assert needle not in text, f"{page.name} mentions {needle!r}"
        for target in re.findall(r"\]\(([^)#]+)", text):  # relative links must resolve inside the repository
            if "://" in target:
                continue
            resolved = (page.parent / target).resolve()
            assert resolved.exists() and ROOT in resolved.parents, f"{page.name} links to {target}"
