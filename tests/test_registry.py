"""Plugin registry: lazy entry-point discovery, broken plugins, unknown names, `hfx plugins`, a pip-installed plugin."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM

import hfx
from hfx.registry import KINDS, Component, PluginLoadError, PluginRegistry, registry
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {
    "norm": {"layernorm", "rmsnorm", "batchnorm", "batchnorm_causal", "powernorm", "dyt"},
    "position": {"sinusoidal", "learned", "rotary", "xl_relative"},
    "ffn": {"dense", "moe"},
}


def make_distribution(root: Path, dist: str, version: str, group: str, entries: dict[str, str], modules: dict[str, str]):
    """An installed distribution as importlib.metadata sees it: a dist-info folder on sys.path, plus modules."""
    info = root / f"{dist}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entries.items())
    (info / "entry_points.txt").write_text(f"[{group}]\n{lines}\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch):
    """Three norm plugins from one fake distribution: a good one, one that fails to import, one of the wrong kind."""
    make_distribution(
        tmp_path,
        "fake-norms",
        "1.2.3",
        "hfx.norm",
        {"fakenorm": "fake_good:COMPONENT", "brokennorm": "fake_broken:COMPONENT", "wrongkind": "fake_wrong:COMPONENT"},
        {
            "fake_good": """
                from torch import nn
                from hfx.registry import Component
                class Identity(nn.Module):
                    def forward(self, hidden_states, padding_mask=None):
                        return hidden_states
                COMPONENT = Component(kind="norm", name="fakenorm", factory=lambda config, size: Identity())
            """,
            "fake_broken": "import definitely_not_an_installed_module_xyz\n",
            "fake_wrong": """
                from hfx.registry import Component
                COMPONENT = Component(kind="ffn", name="wrongkind", factory=lambda config: None)
            """,
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("fakenorm", "brokennorm", "wrongkind"):
        registry.unregister("norm", name)
    for module in ("fake_good", "fake_broken", "fake_wrong"):
        sys.modules.pop(module, None)


def test_first_party_components_are_entry_points_of_hfx():
    for kind, names in FIRST_PARTY.items():
        assert names <= set(registry.names(kind))
    rows = {(r.kind, r.name): r for r in registry.describe()}
    for kind, names in FIRST_PARTY.items():
        for name in names:
            row = rows[(kind, name)]
            assert (row.distribution, row.version, row.error) == ("hfx", hfx.__version__, None)
            assert row.target.startswith(f"hfx_{ {'norm': 'norms', 'position': 'positions', 'ffn': 'ffn'}[kind]}.")


def test_discovery_is_lazy(fake_plugins):
    fresh = PluginRegistry()
    assert {"fakenorm", "brokennorm", "wrongkind"} <= set(fresh.names("norm"))
    assert "fake_good" not in sys.modules and "fake_broken" not in sys.modules  # listing imports nothing
    component = fresh.get("norm", "fakenorm")
    assert "fake_good" in sys.modules and "fake_broken" not in sys.modules
    assert isinstance(component, Component) and fresh.get("norm", "fakenorm") is component  # cached


def test_import_hfx_imports_no_plugin_module():
    code = "import sys, hfx; print(sorted(m for m in sys.modules if m.startswith(('hfx_norms.', 'hfx_positions.', 'hfx_ffn.'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_broken_plugin_is_reported_by_name_and_does_not_break_the_others(fake_plugins):
    fresh = PluginRegistry()
    with pytest.raises(PluginLoadError, match=r"brokennorm.*fake_broken:COMPONENT.*definitely_not_an_installed_module_xyz"):
        fresh.get("norm", "brokennorm")
    with pytest.raises(PluginLoadError, match=r"wrongkind.*must resolve to Component\(kind='norm'"):
        fresh.get("norm", "wrongkind")
    assert fresh.get("norm", "layernorm").name == "layernorm"
    assert fresh.get("norm", "fakenorm").name == "fakenorm"
    rows = {r.name: r for r in fresh.describe() if r.kind == "norm"}
    assert rows["brokennorm"].error and "ModuleNotFoundError" in rows["brokennorm"].error
    assert rows["fakenorm"].error is None and (rows["fakenorm"].distribution, rows["fakenorm"].version) == ("fake-norms", "1.2.3")
    assert rows["layernorm"].error is None
    # a model can still be built with any working norm, including the fake one
    model = AutoModelForMaskedLM.from_config(tiny_config(norm_type="fakenorm"))
    assert type(model.model.layers[0].attention_norm).__name__ == "Identity"
    with pytest.raises(PluginLoadError, match="brokennorm"):
        tiny_config(norm_type="brokennorm")


def test_hfx_plugins_lists_everything_and_flags_broken(fake_plugins, capsys):
    from hfx.cli import main

    code = main(["plugins"])
    out = capsys.readouterr().out
    assert code == 1  # a broken plugin makes the listing exit non-zero
    for names in FIRST_PARTY.values():
        for name in names:
            assert name in out
    assert "fake-norms" in out and "1.2.3" in out and "brokennorm" in out and "error" in out
    assert main(["plugins", "--kind", "ffn"]) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "layernorm" not in out


def test_unknown_name_lists_installed_names():
    with pytest.raises(ValueError, match=r"Unknown norm 'layernrom'.*'batchnorm', 'batchnorm_causal', 'dyt', 'layernorm', 'powernorm', 'rmsnorm'.*Did you mean \['layernorm'\]"):
        registry.get("norm", "layernrom")
    with pytest.raises(ValueError, match="valid kinds"):
        registry.names("normalisation")
    with pytest.raises(ValueError, match="is not one of"):
        Component(kind="bogus", name="x", factory=print)
    assert set(KINDS) >= {"attention", "norm", "position", "ffn"}


def test_in_process_registration():
    component = Component(kind="ffn", name="zero_ffn", factory=lambda config: torch.nn.Identity())
    registry.register(component)
    try:
        assert "zero_ffn" in registry.names("ffn")
        model = AutoModelForMaskedLM.from_config(tiny_config(ffn_type="zero_ffn"))
        assert isinstance(model.model.layers[0].ffn, torch.nn.Identity)
    finally:
        registry.unregister("ffn", "zero_ffn")
    with pytest.raises(ValueError, match="zero_ffn"):
        tiny_config(ffn_type="zero_ffn")


def _pip_install_target(target: Path) -> None:
    import setuptools

    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", str(target)]
    # Offline build with the environment's setuptools when it can build wheels (>= 70.1); else pip isolates it.
    if tuple(int(p) for p in setuptools.__version__.split(".")[:2]) >= (70, 1):
        cmd.append("--no-build-isolation")
    else:
        cmd.remove("--no-index")
    subprocess.run([*cmd, str(ROOT / "examples" / "third_party_plugin")], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def scalenorm_installed(tmp_path_factory):
    """pip-installs the example package into a private target folder (not the shared environment) and puts it on
    sys.path: the same metadata and entry point a normal install creates, with nothing to uninstall afterwards."""
    target = tmp_path_factory.mktemp("site")
    _pip_install_target(target)
    assert list(target.glob("hfx_scalenorm-0.1.0.dist-info"))
    sys.path.insert(0, str(target))
    yield target
    sys.path.remove(str(target))
    registry.unregister("norm", "scalenorm")
    sys.modules.pop("hfx_scalenorm", None)


def test_pip_installed_third_party_plugin_is_selected_by_name(scalenorm_installed, tmp_path):
    assert "scalenorm" in registry.names("norm")
    config = tiny_config(norm_type="scalenorm", norm_position="pre", scalenorm_eps=1e-4)
    assert config.scalenorm_eps == 1e-4
    model = AutoModelForMaskedLM.from_config(config).eval()
    norm = model.model.layers[0].attention_norm
    assert type(norm).__name__ == "ScaleNorm" and type(norm).__module__ == "hfx_scalenorm"
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(norm(x).norm(dim=-1), torch.full((2, 3), 32**0.5))
    ids = torch.randint(1, 97, (2, 6))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert loaded.config.norm_type == "scalenorm" and loaded.config.scalenorm_eps == 1e-4
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="scalenorm_eps"):
        tiny_config(norm_type="scalenorm", scalenorm_eps=0.0)


def test_hfx_plugins_command_shows_the_installed_plugin(scalenorm_installed):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(scalenorm_installed), str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run(
        [sys.executable, "-m", "hfx.cli", "plugins", "--kind", "norm"], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout + out.stderr
    line = next(line for line in out.stdout.splitlines() if "scalenorm" in line)
    assert "hfx-scalenorm" in line and "0.1.0" in line and "ok" in line
    assert "batchnorm" in out.stdout


def test_entry_points_are_read_once_per_sys_path_and_refresh_rereads_them(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "latenorm" not in registry.names("norm")  # this sys.path is now read
    make_distribution(tmp_path, "late-norms", "0.1", "hfx.norm", {"latenorm": "late_norm:COMPONENT"}, {})
    assert "latenorm" not in registry.names("norm")  # installed into the running process: not seen yet
    registry.refresh()
    assert "latenorm" in registry.names("norm")
    registry.refresh()
