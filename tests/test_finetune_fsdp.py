"""Sharded training: FSDP2 on the CPU against DDP, the shipped accelerate configs, and what hfx refuses.

accelerate 1.15 enables FSDP only on accelerator devices and drops its plugin on a CPU run, so on
the CPU the FSDP2 comparison drives torch's ``fully_shard`` itself, with the wrap policy of
examples/accelerate/fsdp2.yaml; ``hfx finetune`` under an FSDP or DeepSpeed launch without CUDA is
refused instead of silently training every process on the whole model.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hfx.finetune import BackendError, finetune
from test_finetune import hfx_causal, run_config, task_file, tokenizer_dir  # noqa: F401  (module fixtures)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "accelerate"


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # as in test_distributed.py
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return env


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "distributed_worker.py"), "fsdp2", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fsdp2_first_step_and_final_weights_equal_ddp(fsdp2_run, mode):
    record = json.loads((fsdp2_run / f"{mode}.json").read_text())
    # every trainable gradient was a DTensor shard under FSDP2 and a plain tensor under DDP
    assert record["fsdp2"]["sharded_grads"] == record["fsdp2"]["grads"] == record["ddp"]["grads"] > 0
    assert record["ddp"]["sharded_grads"] == 0
    # Same local batches, same reduction of the gradient (a mean over 2 processes); only the order of
    # float sums may differ: 1e-5 at fp32 for values of order 1.
    assert record["fsdp2"]["loss"] == pytest.approx(record["ddp"]["loss"], abs=1e-5)
    ddp, fsdp = (load_file(fsdp2_run / f"{mode}_{e}_grads.safetensors") for e in ("ddp", "fsdp2"))
    assert ddp.keys() == fsdp.keys()
    if mode == "lora":
        assert all("lora_" in key for key in ddp)
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=0, atol=1e-5)
    ddp, fsdp = (load_file(fsdp2_run / f"{mode}_{e}_final.safetensors") for e in ("ddp", "fsdp2"))
    assert ddp.keys() == fsdp.keys()
    from distributed_worker import build_sharding_model

    initial = build_sharding_model(mode == "lora").state_dict()
    moved = [k for k in ddp if (ddp[k] - initial[k]).abs().max() > 1e-3]
    assert moved and (mode == "full" or all("lora_" in k for k in moved))
    for key in ddp:  # the tolerance of tests/test_finetune_ddp.py
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=0, atol=1e-3)

    # The folders save_pretrained wrote from the gathered FSDP2 state dict and from the DDP model agree.
    if mode == "lora":
        ddp, fsdp = (load_file(fsdp2_run / f"lora_{e}_saved" / "adapter_model.safetensors") for e in ("ddp", "fsdp2"))
    else:
        import hfx

        ddp, fsdp = (hfx.HfxForCausalLM.from_pretrained(fsdp2_run / f"full_{e}_saved").state_dict()
                     for e in ("ddp", "fsdp2"))
    assert ddp.keys() == fsdp.keys() and len(ddp) > 0
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=0, atol=1e-3)


def test_shipped_fsdp2_config_parses_as_fsdp2_wrapping_hfx_layers():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType
    from accelerate.utils.dataclasses import get_module_class_from_name

    import hfx
    from hfx.modeling_hfx import HfxLayer

    config = load_config_from_file(str(CONFIGS / "fsdp2.yaml"))
    assert config.distributed_type == DistributedType.FSDP and not config.use_cpu
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    # accelerate refuses a class the model does not have: the one named must be hfx's decoder layer
    model = hfx.HfxForCausalLM(hfx.HfxConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                             intermediate_size=64))
    assert get_module_class_from_name(model, fsdp["fsdp_transformer_layer_cls_to_wrap"]) is HfxLayer
    assert fsdp["fsdp_cpu_ram_efficient_loading"] and fsdp["fsdp_sync_module_states"]  # accelerate needs both
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"


@pytest.mark.parametrize("stage", [2, 3])
def test_shipped_deepspeed_configs_parse_and_validate(stage, tmp_path):
    """accelerate reads the YAML; Trainer's DeepSpeed config fills the "auto" values from TrainingArguments
    and the model; DeepSpeed's own validation accepts the result."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    import hfx

    config = load_config_from_file(str(CONFIGS / f"ds_zero{stage}.yaml"))
    assert config.distributed_type == DistributedType.DEEPSPEED and not config.use_cpu
    json_file = ROOT / config.deepspeed_config["deepspeed_config_file"]  # relative to the repository root
    assert json_file == CONFIGS / f"ds_zero{stage}.json" and json_file.is_file()
    assert config.deepspeed_config["zero3_init_flag"] is (stage == 3)

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             max_grad_norm=0.5, use_cpu=True, report_to=[])
    model = hfx.HfxForCausalLM(hfx.HfxConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                             intermediate_size=64))
    filled = HfTrainerDeepSpeedConfig(str(json_file))
    filled.trainer_config_process(args)
    filled.trainer_config_finalize(args, model, num_training_steps=10)
    assert "auto" not in json.dumps(filled.config)
    assert filled.is_zero3() is (stage == 3)
    checked = DeepSpeedConfig(filled.config)
    assert checked.zero_optimization_stage == stage
    assert (checked.train_micro_batch_size_per_gpu, checked.gradient_accumulation_steps) == (4, 2)
    assert checked.train_batch_size == 8 and checked.gradient_clipping == 0.5
    # the validation is real: a misspelt ZeRO key is refused
    bad = json.loads(json.dumps(filled.config))
    bad["zero_optimization"]["overlap_comms"] = True
    with pytest.raises(Exception, match="overlap_comms"):
        DeepSpeedConfig(bad)


def launcher_env(config_file: Path) -> dict:
    """The environment ``accelerate launch --config_file CONFIG --num_processes 2`` gives its processes, built by
    accelerate's own launcher functions (no process is started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(config_file), "--num_processes", "2", "-m", "hfx.cli", "finetune"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def use_launcher_env(monkeypatch, env):
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
                "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        if key in env:
            monkeypatch.setenv(key, env[key])
        else:
            monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(ROOT)  # the DeepSpeed JSON path of the configs is relative to the repository root


@pytest.mark.parametrize("config_file, variable, engine", [
    ("fsdp2.yaml", "ACCELERATE_USE_FSDP", "FSDP"),
    ("ds_zero2.yaml", "ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
    ("ds_zero3.yaml", "ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
])
def test_sharding_launch_without_cuda_is_refused_before_anything(config_file, variable, engine, tmp_path,
                                                                 hfx_causal, task_file, monkeypatch):  # noqa: F811
    if torch.cuda.is_available():
        pytest.skip("with a CUDA device the engine runs")
    env = launcher_env(CONFIGS / config_file)
    assert env[variable] == "true"
    if engine == "FSDP":
        assert env["FSDP_VERSION"] == "2" and env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "HfxLayer"
    use_launcher_env(monkeypatch, env)
    monkeypatch.setattr("hfx.finetune.train.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    with pytest.raises(BackendError, match=rf"{engine} was requested.*{variable}=true.*no CUDA device.*torchrun"):
        finetune(run_config(hfx_causal, task_file, out))
    assert not out.exists()  # refused before the output folder is touched


@pytest.mark.parametrize("config_file, partitioned", [("fsdp2.yaml", True), ("ds_zero3.yaml", True),
                                                      ("ds_zero2.yaml", False)])
def test_base_changing_init_is_refused_where_the_engine_partitions_the_weights(config_file, partitioned, tmp_path,
                                                                              hfx_causal, task_file, monkeypatch):  # noqa: F811
    use_launcher_env(monkeypatch, launcher_env(CONFIGS / config_file))
    monkeypatch.setattr("hfx.finetune.train.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    config = run_config(hfx_causal, task_file, tmp_path / "out", init_lora_weights="pissa_niter_2")
    if partitioned:
        with pytest.raises(BackendError, match=r"--init-lora-weights pissa_niter_2 under (FSDP|DeepSpeed).*whole weights"):
            finetune(config)
    elif torch.cuda.is_available():
        pytest.skip("ZeRO-2 with a CUDA device trains")
    else:  # ZeRO-2 keeps whole weights: only the missing GPU stops it here
        with pytest.raises(BackendError, match="no CUDA device"):
            finetune(config)
    assert not (tmp_path / "out").exists()
