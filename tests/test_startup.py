"""A user's first seconds: `hfx --help` and `import hfx` stay light, and `import hfx` still registers everything.

Each check runs in a fresh interpreter (this test process has long imported torch) and reads
``sys.modules``, not the clock: what is imported is what costs the time.
"""

import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate")


def run_python(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


HELP_PROBE = """
import contextlib, io, json, sys
from hfx.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        code = main({argv!r})
    except SystemExit as exc:
        code = exc.code
print(json.dumps({{"code": code, "help": out.getvalue(),
                  "heavy": sorted(m for m in {heavy!r} if m in sys.modules)}}))
"""


def test_the_console_script_is_the_module_checked_here():
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "hfx"]
    assert script.value == "hfx.cli:main"


def test_hfx_help_imports_no_heavy_module_and_lists_every_command():
    result = run_python(HELP_PROBE.format(argv=["--help"], heavy=HEAVY))
    assert result["code"] == 0
    assert result["heavy"] == []
    for command in ("plugins", "quickstart", "finetune", "eval", "convert-long"):
        assert f"    {command}" in result["help"]


@pytest.mark.parametrize("command", ["plugins", "quickstart", "eval", "convert-long", "finetune"])
def test_command_help_imports_no_heavy_module(command):
    result = run_python(HELP_PROBE.format(argv=[command, "--help"], heavy=HEAVY))
    assert result["code"] == 0
    assert f"usage: hfx {command}" in result["help"]
    assert result["heavy"] == []


def test_an_unknown_command_is_one_argparse_error():
    done = subprocess.run([sys.executable, "-m", "hfx.cli", "evl"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "invalid choice: 'evl'" in done.stderr and "Traceback" not in done.stderr


def test_import_hfx_alone_imports_neither_torch_nor_transformers():
    result = run_python(
        "import json, sys; import hfx; print(json.dumps(sorted(m for m in %r if m in sys.modules)))" % (HEAVY,)
    )
    assert result == []


REGISTRATION_PROBE = """
import json, sys
{first}
{second}
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForMultipleChoice,
                          AutoModelForPreTraining, AutoModelForQuestionAnswering, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
modeling_loaded_before_use = "hfx.modeling_hfx" in sys.modules
config = AutoConfig.for_model("hfx", vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=32)
built = {{auto.__name__: type(auto.from_config(config)).__name__ for auto in (
    AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForMultipleChoice, AutoModelForPreTraining,
    AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoModelForTokenClassification)}}
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
import peft.utils.constants as peft_constants
import hfx
from hfx.import_hooks import pending
print(json.dumps({{
    "config": type(config).__name__,
    "built": built,
    "modeling_loaded_before_use": modeling_loaded_before_use,
    "in_mapping_values": hfx.HfxForCausalLM in MODEL_FOR_CAUSAL_LM_MAPPING.values(),
    "attention": sorted(n for n in ALL_ATTENTION_FUNCTIONS.valid_keys() if n.startswith("hfx_")),
    "masks": sorted(n for n in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys() if n.startswith("hfx_")),
    "peft": peft_constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get("hfx"),
    "pending": pending(),
}}))
"""


@pytest.mark.parametrize("order", ["hfx first", "transformers first"])
def test_import_hfx_registers_config_models_attention_and_peft(order):
    first, second = "import hfx", "import transformers.models.auto.modeling_auto"
    if order == "transformers first":
        first, second = second, first
    result = run_python(REGISTRATION_PROBE.format(first=first, second=second))
    assert result["config"] == "HfxConfig"
    assert result["modeling_loaded_before_use"] is False  # the model classes load on first use
    assert result["built"] == {
        "AutoModel": "HfxModel",
        "AutoModelForCausalLM": "HfxForCausalLM",
        "AutoModelForMaskedLM": "HfxForMaskedLM",
        "AutoModelForMultipleChoice": "HfxForMultipleChoice",
        "AutoModelForPreTraining": "HfxForPreTraining",
        "AutoModelForQuestionAnswering": "HfxForQuestionAnswering",
        "AutoModelForSequenceClassification": "HfxForSequenceClassification",
        "AutoModelForTokenClassification": "HfxForTokenClassification",
    }
    assert result["in_mapping_values"] is True
    assert result["attention"] == result["masks"] == ["hfx_adaptive_span", "hfx_block_sparse", "hfx_lsh", "hfx_sliding_window"]
    assert result["peft"] == ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    assert result["pending"] == []


def test_lazy_attributes_resolve_and_unknown_ones_raise():
    import hfx

    assert hfx.HfxForCausalLM.__name__ == "HfxForCausalLM"
    assert hfx.HfxConfig.model_type == "hfx"
    assert {"HfxModel", "HfxConfig", "registry"} <= set(dir(hfx))
    with pytest.raises(AttributeError, match="no attribute 'HfxForCausalLMM'"):
        hfx.HfxForCausalLMM  # noqa: B018


def test_when_imported_runs_once_after_the_module_and_at_once_when_loaded(tmp_path, monkeypatch):
    from hfx.import_hooks import pending, when_imported

    (tmp_path / "hfx_probe_module_a.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    when_imported("hfx_probe_module_a", lambda module: seen.append(module.VALUE + 1))
    assert seen == [] and "hfx_probe_module_a" in pending()
    import hfx_probe_module_a  # noqa: F401

    assert seen == [42] and "hfx_probe_module_a" not in pending()
    when_imported("hfx_probe_module_a", lambda module: seen.append("again"))
    assert seen == [42, "again"]
    sys.modules.pop("hfx_probe_module_a")


def test_a_failing_registration_warns_instead_of_breaking_the_import(tmp_path, monkeypatch):
    from hfx.import_hooks import when_imported

    (tmp_path / "hfx_probe_module_b.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def broken(module):
        raise KeyError("no such mapping")

    when_imported("hfx_probe_module_b", broken)
    with pytest.warns(RuntimeWarning, match="hfx could not register itself with hfx_probe_module_b: KeyError"):
        import hfx_probe_module_b
    assert hfx_probe_module_b.VALUE == 1
    sys.modules.pop("hfx_probe_module_b")


def test_evaluating_a_model_without_4bit_layers_does_not_import_bitsandbytes():
    """bitsandbytes' import pulls in torch.compile / inductor (seconds of every `hfx eval` start);
    a model can only hold a Linear4bit once bitsandbytes is imported, so there is nothing to pin."""
    result = run_python(
        "import json, sys, torch\nfrom hfx.evaluation.evaluator import pin_bnb_cpu_path\n"
        "path = pin_bnb_cpu_path(torch.nn.Sequential(torch.nn.Linear(2, 2)))\n"
        "print(json.dumps({'path': path, 'bnb': 'bitsandbytes' in sys.modules}))"
    )
    assert result == {"path": None, "bnb": False}


def test_the_task_index_with_plugins_imports_neither_datasets_nor_transformers_once_the_data_exists(tmp_path):
    """Listing tasks (the first step of every `hfx eval` / `hfx tasks`) reads the embedded plugins' data
    files; only writing them the first time needs hfx.data (datasets, transformers). torch comes with
    the hfx.evaluation package itself."""
    code = ("import json, os, sys\nos.environ['HFX_EMBEDDED_DIR'] = {d!r}\nos.environ['HFX_EVAL_CACHE'] = {c!r}\n"
            "from hfx.evaluation.catalogue import TaskIndex\nindex = TaskIndex([])\n"
            "print(json.dumps({{'names': sorted(n for n in index.names() if n.startswith('embedded')) "
            ", 'heavy': sorted(m for m in {heavy!r} if m in sys.modules)}}))")
    code = code.format(d=str(tmp_path / "embedded"), c=str(tmp_path / "cache"), heavy=HEAVY)
    first = run_python(code)  # writes the data files
    again = run_python(code)
    assert not {"datasets", "transformers"} & set(again["heavy"]), again["heavy"]
    assert again["names"] == first["names"] and "embedded_facts" in again["names"]
