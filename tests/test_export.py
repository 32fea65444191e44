"""hfx export: the folder loads where hfx cannot be imported and gives the original model's logits; refusals.

One session fixture exports every case and runs ONE subprocess in which ``hfx`` and every ``hfx_*`` plugin
package are blocked (a meta-path finder that the subprocess checks first), so the slow part (importing torch
and transformers) is paid once. Float32, one thread, the same code on the same weights: the logits agree to
rounding (atol 1e-5 allows a different reduction order if transformers picks another kernel path).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import hfx
from hfx.export import EXPORT_MODEL_TYPE, MANIFEST_FILE, ExportError, ModuleSet, export_model
from hfx.registry import Component, registry
from tests.conftest import tiny_config

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
ATOL, RTOL = 1e-5, 1e-5

# Plugins of the model family: exported when installed, or (not yet installed) through a test-only entry point
# to their module in plugins/, as long as it imports.
CAUSAL = dict(is_decoder=True)
CASES = {
    "rotary_rmsnorm_pre": ("HfxForCausalLM", dict(CAUSAL, norm_type="rmsnorm", norm_position="pre",
                                                  position_embedding_type="rotary")),
    "batchnorm_mlm": ("HfxForMaskedLM", dict(norm_type="batchnorm", position_embedding_type="sinusoidal")),
    "sliding_window": ("HfxForCausalLM", dict(CAUSAL, attention_type="hfx_sliding_window", attention_window=4,
                                              position_embedding_type="rotary", norm_position="pre")),
    "adaptive_span": ("HfxForCausalLM", dict(CAUSAL, attention_type="hfx_adaptive_span", adaptive_span_max=8,
                                             adaptive_span_ramp=2, adaptive_span_init=0.5, norm_position="pre")),
    "third_party_scalenorm": ("HfxForMaskedLM", dict(norm_type="scalenorm", scalenorm_eps=1e-4, norm_position="pre")),
    "seq2seq": ("HfxForConditionalGeneration", dict(is_encoder_decoder=True, decoder_layers=1, num_hidden_layers=1,
                                                    decoder_start_token_id=1, type_vocab_size=0,
                                                    tie_word_embeddings=False, norm_type="rmsnorm",
                                                    position_embedding_type="rotary", norm_position="pre")),
    "moe_dyt": ("HfxForCausalLM", dict(CAUSAL, ffn_type="moe", num_experts=4, num_experts_per_tok=2,
                                       num_shared_experts=1, norm_type="dyt", norm_position="pre")),
    "powernorm": ("HfxForMaskedLM", dict(norm_type="powernorm")),
    "batchnorm_causal": ("HfxForCausalLM", dict(CAUSAL, norm_type="batchnorm_causal", norm_position="pre")),
}
#: Classes whose exports are also checked with generate() (causal and seq2seq; an MLM does not generate).
GENERATING_CLASSES = ("HfxForCausalLM", "HfxForConditionalGeneration")
AUTO_CLASS = {"HfxForCausalLM": "AutoModelForCausalLM", "HfxForMaskedLM": "AutoModelForMaskedLM",
              "HfxForConditionalGeneration": "AutoModelForSeq2SeqLM"}

# Runs where hfx is not importable; reads the jobs from stdin, writes every job's result to the file in argv[1].
CHECKER = textwrap.dedent('''
    import importlib.abc, json, sys

    class BlockHfx(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            if top == "hfx" or top.startswith("hfx_"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, BlockHfx())
    blocked = []
    for name in ("hfx", "hfx_norms", "hfx_attention", "hfx_scalenorm"):
        try:
            __import__(name)
        except ImportError:
            blocked.append(name)

    import torch
    import transformers
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    results = {}
    for job in json.loads(sys.stdin.read()):  # sent once the exports exist: importing torch overlapped with them
        auto = getattr(transformers, job["auto"])
        model = auto.from_pretrained(job["export"], trust_remote_code=True).eval()
        inputs = load_file(job["inputs"])
        expected = load_file(job["expected"])
        with torch.no_grad():
            logits = model(**inputs).logits
            out = {"class_module": type(model).__module__, "config_module": type(model.config).__module__,
                   "max_abs_diff": (logits - expected["logits"]).abs().max().item(),
                   "scale": expected["logits"].abs().max().item()}
            if "generated" in expected:
                kwargs = {k: v for k, v in inputs.items() if not k.startswith("decoder_")}
                generated = model.generate(**kwargs, max_new_tokens=4, do_sample=False)
                out["generate_equal"] = torch.equal(generated, expected["generated"])
            if job.get("tokens"):
                tokenizer = transformers.AutoTokenizer.from_pretrained(job["export"])
                out["tokens_equal"] = tokenizer("the cat sat on the mat")["input_ids"] == job["tokens"]
            if job.get("resave"):
                model.save_pretrained(job["resave"])
                again = auto.from_pretrained(job["resave"], trust_remote_code=True).eval()
                out["resave_max_abs_diff"] = (again(**inputs).logits - expected["logits"]).abs().max().item()
        results[job["name"]] = out
    leaked = sorted(m for m in sys.modules if m.split(".")[0] == "hfx" or m.split(".")[0].startswith("hfx_"))
    with open(sys.argv[1], "w") as handle:
        json.dump({"blocked": blocked, "leaked": leaked, "results": results}, handle)
''')


def _write_distribution(root: Path, name: str, entries: dict[tuple[str, str], str]) -> None:
    """A dist-info folder that importlib.metadata reads as an installed distribution with these entry points."""
    info = root / f"{name.replace('-', '_')}-0.1.0.dist-info"  # importlib.metadata reads the name up to the first '-'
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    groups: dict[str, list[str]] = {}
    for (kind, component), target in entries.items():
        groups.setdefault(f"hfx.{kind}", []).append(f"{component} = {target}")
    (info / "entry_points.txt").write_text("".join(f"[{g}]\n" + "\n".join(lines) + "\n" for g, lines in groups.items()))


def _case_inputs(class_name: str, config) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, config.vocab_size, (2, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0 if class_name != "HfxForMaskedLM" else 1
    if class_name == "HfxForMaskedLM":
        mask[1, 7:] = 0  # right padding for the encoder
    inputs = {"input_ids": ids, "attention_mask": mask}
    if class_name == "HfxForConditionalGeneration":
        inputs["decoder_input_ids"] = torch.randint(2, config.vocab_size, (2, 5), generator=generator)
    return inputs


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_tokenizer_dir):
    """Every case saved, exported and checked in one hfx-less subprocess: (results, cases)."""
    root = tmp_path_factory.mktemp("export")
    (root / "checker.py").write_text(CHECKER)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_MODULES_CACHE=str(root / "modules"), HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    checker = subprocess.Popen([sys.executable, str(root / "checker.py"), str(root / "report.json")], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root)
    site = root / "site"
    _write_distribution(site, "hfx-export-test-plugins", {("norm", "scalenorm"): "hfx_scalenorm:COMPONENT"})
    sys.path[:0] = [str(site), str(ROOT / "examples" / "third_party_plugin")]
    importlib.invalidate_caches()
    jobs, cases = [], {}
    try:
        for name, (class_name, overrides) in CASES.items():
            config = tiny_config(**overrides)
            torch.manual_seed(0)
            model = getattr(hfx, class_name, None) or importlib.import_module(
                "hfx.modeling_hfx_seq2seq").HfxForConditionalGeneration
            model = model(config).eval()
            inputs = _case_inputs(class_name, config)
            with torch.no_grad():
                expected = {"logits": model(**inputs).logits}
                if class_name in GENERATING_CLASSES:
                    kwargs = {k: v for k, v in inputs.items() if not k.startswith("decoder_")}
                    expected["generated"] = model.generate(**kwargs, max_new_tokens=4, do_sample=False)
            model.save_pretrained(root / name / "model")
            tokens = None
            if name == "rotary_rmsnorm_pre":  # a model folder with its tokenizer: the export carries it
                tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
                tokenizer.save_pretrained(root / name / "model")
                tokens = tokenizer("the cat sat on the mat")["input_ids"]
            result = export_model(root / name / "model", root / name / "export")
            save_file({k: v.contiguous() for k, v in inputs.items()}, str(root / name / "inputs.safetensors"))
            save_file({k: v.contiguous() for k, v in expected.items()}, str(root / name / "expected.safetensors"))
            cases[name] = dict(result=result, model=model, inputs=inputs, expected=expected, dir=root / name)
            jobs.append({"name": name, "auto": AUTO_CLASS[class_name], "export": str(root / name / "export"),
                         "inputs": str(root / name / "inputs.safetensors"),
                         "expected": str(root / name / "expected.safetensors"),
                         "resave": str(root / name / "resaved") if name == "sliding_window" else None,
                         "tokens": tokens})
    except BaseException:
        checker.kill()
        checker.communicate()
        raise
    finally:
        sys.path.remove(str(site))
        sys.path.remove(str(ROOT / "examples" / "third_party_plugin"))
        importlib.invalidate_caches()
        registry.unregister("norm", "scalenorm")
    stdout, stderr = checker.communicate(json.dumps(jobs), timeout=300)
    assert checker.returncode == 0, (stdout + stderr)[-4000:]
    return json.loads((root / "report.json").read_text()), cases


def test_hfx_is_really_blocked_in_the_checker(exported):
    report, _ = exported
    assert report["blocked"] == ["hfx", "hfx_norms", "hfx_attention", "hfx_scalenorm"]
    assert report["leaked"] == []


@pytest.mark.parametrize("name", list(CASES))
def test_export_loads_without_hfx_and_gives_the_same_outputs(exported, name):
    report, cases = exported
    out = report["results"][name]
    assert out["class_module"].startswith("transformers_modules.")
    assert out["config_module"].startswith("transformers_modules.")
    # every check the case asks for ran: a result missing from the report fails here, not passes by absence
    expected_keys = {"class_module", "config_module", "max_abs_diff", "scale"}
    if CASES[name][0] in GENERATING_CLASSES:
        expected_keys.add("generate_equal")
    if name == "rotary_rmsnorm_pre":
        expected_keys.add("tokens_equal")
    if name == "sliding_window":
        expected_keys.add("resave_max_abs_diff")
    assert set(out) == expected_keys, out
    assert out["max_abs_diff"] <= ATOL + RTOL * out["scale"], out
    if "generate_equal" in expected_keys:
        assert out["generate_equal"]
    if "tokens_equal" in expected_keys:
        assert out["tokens_equal"]
    if "resave_max_abs_diff" in expected_keys:  # the loaded export saved again (transformers copies the code) loads
        assert out["resave_max_abs_diff"] <= ATOL + RTOL * out["scale"], out


def test_export_holds_exactly_the_plugins_its_config_uses(exported):
    _, cases = exported
    result = cases["rotary_rmsnorm_pre"]["result"]
    assert {(c.kind, c.name) for c in result.components} == {("norm", "rmsnorm"), ("position", "rotary"),
                                                            ("ffn", "dense")}
    plugin_files = {f for f in result.files if f.startswith("hfx_")} - {MANIFEST_FILE}
    assert plugin_files == {"hfx_norms__rmsnorm.py", "hfx_positions__rotary.py", "hfx_ffn__dense.py"}
    export = cases["rotary_rmsnorm_pre"]["dir"] / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == EXPORT_MODEL_TYPE and config["architectures"] == ["HfxForCausalLM"]
    assert config["auto_map"]["AutoConfig"] == "configuration_hfx.HfxConfig"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hfx.HfxForCausalLM"
    assert "AutoModelForMaskedLM" not in config["auto_map"]
    assert (export / "model.safetensors").is_file() and not list(export.glob("*.bin"))
    for module in result.modules:  # no absolute import of hfx or a plugin package is left anywhere
        for node in ast.walk(ast.parse((export / module).read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            assert not [n for n in names if n.split(".")[0] == "hfx" or n.startswith("hfx_")], (module, node.lineno)
            if isinstance(node, ast.ImportFrom) and node.level:  # the one relative form transformers follows
                assert node.level == 1 and node.module and (export / f"{node.module}.py").is_file(), (module, node.lineno)
    third = cases["third_party_scalenorm"]["result"]
    scalenorm = next(c for c in third.components if c.name == "scalenorm")
    assert (scalenorm.flat_module, scalenorm.distribution) == ("hfx_scalenorm", "hfx-export-test-plugins")
    seq2seq = json.loads((cases["seq2seq"]["dir"] / "export" / "config.json").read_text())["auto_map"]
    assert seq2seq == {"AutoConfig": "configuration_hfx.HfxConfig",
                       "AutoModelForSeq2SeqLM": "modeling_hfx_seq2seq.HfxForConditionalGeneration"}


@pytest.fixture
def attention_registrations():
    """transformers' process-wide attention and mask registrations, restored afterwards: loading an export
    re-registers its attention backends, which must not leak into other tests."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    saved = [(interface, dict(interface._global_mapping)) for interface in (AttentionInterface, AttentionMaskInterface)]
    yield
    for interface, mapping in saved:
        interface._global_mapping.clear()
        interface._global_mapping.update(mapping)


def test_with_hfx_installed_the_export_uses_its_own_code_and_hfx_is_not_shadowed(exported, attention_registrations):
    _, cases = exported
    case = cases["sliding_window"]
    export = case["dir"] / "export"
    remote = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    assert type(remote).__module__.startswith("transformers_modules.")
    assert remote.config.model_type == EXPORT_MODEL_TYPE == type(remote.config).model_type
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(export, trust_remote_code=False)
    # hfx's own registrations are untouched: its model type, and the original folder loading with hfx's classes
    assert type(AutoConfig.for_model("hfx")) is hfx.HfxConfig
    original = AutoModelForCausalLM.from_pretrained(case["dir"] / "model").eval()
    assert type(original) is hfx.HfxForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(remote(**case["inputs"]).logits, case["expected"]["logits"], atol=ATOL, rtol=RTOL)
        # hfx's model runs the same after the export registered its attention backend under the same name
        torch.testing.assert_close(original(**case["inputs"]).logits, case["expected"]["logits"], atol=ATOL, rtol=RTOL)


def test_model_card_and_manifest(exported):
    _, cases = exported
    case = cases["rotary_rmsnorm_pre"]
    export = case["dir"] / "export"
    card = (export / "README.md").read_text()
    count = sum(p.numel() for p in case["model"].parameters())
    assert f"| parameters | {count:,} ({count:,} trainable) |" in card
    assert "| `norm_type` | `rmsnorm` | set |" in card and "| `norm_position` | `pre` | set |" in card
    assert "| `hidden_size` | `32` | set |" in card and "| `num_attention_heads` | `4` |" in card
    assert 'AutoModelForCausalLM.from_pretrained("path/to/model", trust_remote_code=True)' in card
    assert "## Training\n\nNot recorded" in card
    manifest = json.loads((export / MANIFEST_FILE).read_text())
    assert sorted(manifest["files"]) == sorted(p.name for p in export.iterdir())
    assert manifest["modules"]["registry.py"] == "hfx.registry"


def test_training_run_files_reach_the_model_card(exported, tmp_path):
    _, cases = exported
    run = tmp_path / "run"
    model_dir = run / "model"
    model_dir.mkdir(parents=True)
    for entry in (cases["batchnorm_mlm"]["dir"] / "model").iterdir():
        (model_dir / entry.name).write_bytes(entry.read_bytes())
    (run / "hfx_finetune.json").write_text(json.dumps({"task": "mlm", "method": "lora", "learning_rate": 0.0002}))
    (run / "trainer_state.json").write_text(json.dumps({"global_step": 40, "epoch": 2.0, "train_batch_size": 8,
                                                        "log_history": [{"loss": 3.5}, {"loss": 2.25}]}))
    export_model(model_dir, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "From `hfx_finetune.json`:" in card and "| `method` | `lora` |" in card
    assert "| `learning_rate` | `0.0002` |" in card
    assert "| `global_step` | `40` |" in card and "| `last_logged_loss` | `2.25` |" in card


def test_overwrite_replaces_only_an_earlier_export(exported, tmp_path):
    _, cases = exported
    model_dir = cases["rotary_rmsnorm_pre"]["dir"] / "model"
    out = tmp_path / "out"
    export_model(model_dir, out)
    with pytest.raises(ExportError, match="not empty.*--overwrite"):
        export_model(model_dir, out)
    export_model(model_dir, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or moved-aside folder is left
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"holds \['notes.txt'\].*nothing was deleted"):
        export_model(model_dir, out, overwrite=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.bin").write_bytes(b"x")
    with pytest.raises(ExportError, match="not an hfx export"):
        export_model(model_dir, other, overwrite=True)
    assert (other / "data.bin").read_bytes() == b"x"


def test_bad_model_dirs_are_refused_before_anything_is_loaded(tmp_path):
    with pytest.raises(ExportError, match="is not a folder"):
        export_model(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ExportError, match="no config.json.*merge it first"):
        export_model(tmp_path / "adapter", tmp_path / "out")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ExportError, match="model_type='bert'.*hfx models"):
        export_model(tmp_path / "bert", tmp_path / "out")
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "config.json").write_text(json.dumps({"model_type": "hfx", "architectures": ["HfxModel"],
                                                              "auto_map": {"AutoConfig": "configuration_hfx.HfxConfig"}}))
    with pytest.raises(ExportError, match="already has an auto_map"):
        export_model(tmp_path / "exp", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_non_empty_folder_with_one_line(tmp_path, capsys):
    from hfx.cli import main

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "hfx", "architectures": ["HfxModel"]}))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "m"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hfx export: error: OUT_DIR") and "--overwrite" in err and len(err.splitlines()) == 1


def test_cli_exports(exported, tmp_path, capsys):
    from hfx.cli import main

    _, cases = exported
    assert main(["export", str(cases["batchnorm_mlm"]["dir"] / "model"), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "components: ffn=dense, norm=batchnorm, position=sinusoidal" in out
    assert "AutoModelForMaskedLM.from_pretrained(" in out and (tmp_path / "out" / "hfx_norms__batchnorm.py").is_file()


def test_component_registered_only_in_process_is_refused(tmp_path):
    registry.register(Component(kind="ffn", name="identity_ffn", factory=lambda config: torch.nn.Identity()))
    try:
        hfx.HfxForCausalLM(tiny_config(is_decoder=True, ffn_type="identity_ffn")).save_pretrained(tmp_path / "m")
        with pytest.raises(ExportError, match="ffn component 'identity_ffn' is registered only in this process"):
            export_model(tmp_path / "m", tmp_path / "out")
    finally:
        registry.unregister("ffn", "identity_ffn")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_plugin_with_data_files_is_refused_naming_it(tmp_path, monkeypatch):
    site = tmp_path / "site"
    package = site / "hfx_datanorm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent('''
        from pathlib import Path
        from torch import nn
        from hfx.registry import Component
        SCALE = float((Path(__file__).parent / "scale.txt").read_text())
        COMPONENT = Component(kind="norm", name="datanorm", factory=lambda config, size: nn.LayerNorm(size))
    '''))
    (package / "scale.txt").write_text("1.0")
    _write_distribution(site, "hfx-datanorm", {("norm", "datanorm"): "hfx_datanorm:COMPONENT"})
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    try:
        hfx.HfxForMaskedLM(tiny_config(norm_type="datanorm")).save_pretrained(tmp_path / "m")
        with pytest.raises(ExportError, match=r"hfx_datanorm \(plugin of norm 'datanorm'\) locates files next to its "
                                              r"source \(__file__"):
            export_model(tmp_path / "m", tmp_path / "out")
    finally:
        registry.unregister("norm", "datanorm")
        sys.modules.pop("hfx_datanorm", None)
    assert not (tmp_path / "out").exists()


def test_compiled_module_is_refused():
    compiled = next(name for name in ("_ctypes", "_decimal", "_json", "_csv")
                    if (importlib.util.find_spec(name).origin or "").endswith((".so", ".pyd")))
    with pytest.raises(ExportError, match="is a compiled extension"):
        ModuleSet({compiled}).add(compiled, "plugin of norm 'x'")


def test_import_rewriting_covers_every_form(tmp_path, monkeypatch):
    pkg = tmp_path / "hfx_rewrite_demo"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("VALUE = 3\n")
    (pkg / "sub" / "leaf.py").write_text("LEAF = 4\n")
    (pkg / "main.py").write_text(textwrap.dedent('''\
        """Doc."""
        from __future__ import annotations

        import os
        from hfx import registry as reg, auxiliary
        from hfx.registry import (
            Component,
            KINDS,
        )
        from . import sub
        from .sub import leaf as the_leaf
        from .sub.leaf import LEAF
        import hfx.padding_masks as masks
        from typing import TYPE_CHECKING

        if TYPE_CHECKING:
            from hfx.finetune.config import FinetuneConfig
        try:
            from hfx_rewrite_demo.optional_absent import FAST
        except ImportError:
            FAST = None


        def late():
            from hfx.attention import repeat_kv  # a comment stays
            return repeat_kv
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    modules = ModuleSet({"hfx_rewrite_demo"})
    main = modules.add("hfx_rewrite_demo.main", "test")
    text = modules.rewritten(main)
    for line in (
        "import os\n",
        # hfx's __init__ rebinds `registry` to the registry instance; `auxiliary` is only a submodule
        "from .registry import registry as reg; from .auxiliary import _hfx_export_self as auxiliary\n",
        "from .registry import Component, KINDS\n",
        "from .hfx_rewrite_demo__sub import _hfx_export_self as sub\n",
        "from .hfx_rewrite_demo__sub__leaf import _hfx_export_self as the_leaf\n",
        "from .hfx_rewrite_demo__sub__leaf import LEAF\n",
        "from .padding_masks import _hfx_export_self as masks\n",
        "    from .attention import repeat_kv  # a comment stays\n",
        "    pass  # hfx export: a type-checking import of hfx code that is not exported\n",
        "    from hfx_rewrite_demo.optional_absent import FAST\n",  # absent at export time: kept, fails the same way
    ):
        assert line in text, line
    assert "hfx.finetune.config" not in modules.modules
    assert {"hfx.registry", "hfx.auxiliary", "hfx.attention", "hfx.padding_masks", "hfx_rewrite_demo.sub",
            "hfx_rewrite_demo.sub.leaf"} <= set(modules.modules)
    assert "hfx_rewrite_demo" not in modules.modules  # an empty package __init__ nobody imports from is not copied
    sub_text = modules.rewritten(modules.modules["hfx_rewrite_demo.sub"])
    assert "_hfx_export_self = _hfx_export_sys.modules[__name__]" in sub_text
    compile(text, "main.py", "exec")
    (pkg / "bad.py").write_text("import hfx.registry\n")
    with pytest.raises(ExportError, match=r"bad.py:1: `import hfx.registry` binds a package name"):
        ModuleSet({"hfx_rewrite_demo"}).add("hfx_rewrite_demo.bad", "test")
