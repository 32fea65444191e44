"""hfx eval --model-args / --device: lm-eval's hf keys parsed and checked, dtype, PEFT adapters, 4-bit, parity.

The tiny GPT-2 and task files are test_eval's; lm-eval 0.4.13 loads the same folder with
``model="hf", model_args="pretrained=DIR,dtype=float32"`` for the parity check.
"""

import json
import math
import shutil

import pytest
import torch

from hfx.evaluation import EvaluationInputError, evaluate
from hfx.evaluation.model_args import ModelArgs, check_adapter, parse_value
from tests.test_eval import _gpt2, _write_tasks


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_args")
    tasks = _write_tasks(root)
    model, tok = _gpt2(root)
    return {"root": root, "tasks": tasks, "model": model, "tok": tok, "dir": root / "gpt2"}


def _run(world, task="tiny_mc3", **kwargs):
    kwargs.setdefault("limit", 6)
    return evaluate(kwargs.pop("model", world["dir"]), task, include_path=world["tasks"], cache_dir=False,
                    progress=False, return_records=True, **kwargs)


def _lls(records):
    return [ll for r in records for ll, _ in r["resps"]]


# -- parsing -------------------------------------------------------------------------------------
def test_values_are_read_as_lm_eval_reads_them_then_checked_per_key():
    assert [parse_value(v) for v in ("True", "false", "None", "12", "-3", "0.5", "'007'", "main")] == \
        [True, False, None, 12, -3, 0.5, "007", "main"]
    args = ModelArgs.parse("pretrained=/m,torch_dtype=bfloat16,revision=1234,trust_remote_code=TRUE,max_length=64,"
                           "parallelize=True,,add_bos_token=False")
    assert args == ModelArgs(pretrained="/m", dtype="bfloat16", revision="1234", trust_remote_code=True,
                             max_length=64, parallelize=True, add_bos_token=False)
    assert args.placement == "auto"  # parallelize=True is device_map="auto", as lm-eval
    assert ModelArgs.parse({"dtype": torch.float16}).dtype == "float16"
    assert ModelArgs.parse('{"peft": "runs/x", "max_length": 32}').max_length == 32


@pytest.mark.parametrize("text, fragment", [
    ("dtpye=float16", "unknown key 'dtpye' (did you mean 'dtype'?); valid keys: pretrained, dtype,"),
    ("dtype=fp8", "dtype='fp8' is not a dtype; valid: float32, float, float16, half, bfloat16, auto"),
    ("trust_remote_code=ture", "trust_remote_code must be True or False, got 'ture'"),
    ("max_length=0", "max_length must be an integer >= 1, got 0"),
    ("dtype=float16,torch_dtype=bfloat16", "disagree; they are the same setting"),
    ("load_in_4bit=True,load_in_8bit=True", "choose one"),
    ("bnb_4bit_quant_type=nf4", "only apply with load_in_4bit=True"),
    ("dtype", "'dtype' is not key=value"),
    ("revision=a,revision=b", "'revision' is given twice"),
])
def test_bad_model_args_are_one_clear_line(text, fragment):
    with pytest.raises(EvaluationInputError) as info:
        ModelArgs.parse(text)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_from_pretrained_kwargs_follow_lm_eval():
    from transformers import BitsAndBytesConfig

    kwargs = ModelArgs.parse("dtype=bfloat16,attn_implementation=eager,revision=v2").from_pretrained_kwargs("cpu")
    assert kwargs == {"dtype": torch.bfloat16, "revision": "v2", "attn_implementation": "eager"}  # CPU: no device_map
    assert ModelArgs.parse("").from_pretrained_kwargs("cuda:1")["device_map"] == {"": "cuda:1"}
    assert ModelArgs.parse("").from_pretrained_kwargs(None)["dtype"] == torch.float32  # hfx's default
    quant = ModelArgs.parse("load_in_4bit=True,bnb_4bit_quant_type=nf4,bnb_4bit_compute_dtype=bfloat16,"
                            "bnb_4bit_use_double_quant=True").from_pretrained_kwargs("cpu")["quantization_config"]
    assert isinstance(quant, BitsAndBytesConfig) and quant.load_in_4bit and quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_compute_dtype == torch.bfloat16

    class Config:
        dtype = torch.float16

    assert ModelArgs.parse("dtype=auto").torch_dtype(Config()) == torch.float16  # the checkpoint's own dtype


# -- loading ---------------------------------------------------------------------------------------
def test_model_args_pretrained_matches_lm_eval_hf_model(world):
    """`pretrained=DIR,dtype=float32` through hfx eval equals lm-eval's own `hf` model on the same string."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    margs = f"pretrained={world['dir']},dtype=float32"
    ref = lm_eval.simple_evaluate(model="hf", model_args=margs, tasks=["tiny_mc3"], device="cpu", batch_size=4,
                                  limit=6, log_samples=True,
                                  task_manager=TaskManager(include_path=str(world["tasks"]), include_defaults=False))
    results, records = _run(world, model=None, model_args=margs, device="cpu")
    for metric in ("acc,none", "acc_norm,none"):
        assert results["results"]["tiny_mc3"][metric] == ref["results"]["tiny_mc3"][metric]
    ref_lls = [r[0][0] for s in sorted(ref["samples"]["tiny_mc3"], key=lambda s: s["doc_id"]) for r in s["resps"]]
    assert _lls(records["tiny_mc3"]) == pytest.approx(ref_lls, abs=1e-4)
    assert results["config"]["model_args"] == {"pretrained": str(world["dir"]), "dtype": "float32"}
    assert results["config"]["device"] == "cpu" and results["config"]["world_size"] == 1


def test_bf16_on_cpu_scores_near_fp32_with_fp32_log_softmax(world, monkeypatch):
    fp32, rec32 = _run(world)
    seen = []
    original = torch.log_softmax

    def spy(tensor, *args, **kwargs):
        seen.append(tensor.dtype)
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch, "log_softmax", spy)
    bf16, rec16 = _run(world, model_args="dtype=bfloat16", device="cpu")
    assert bf16["config"]["dtype"] == "bfloat16" and seen and set(seen) == {torch.float32}
    # bf16 keeps 8 mantissa bits: each rounding is within 2**-8 relative; through 2 layers and the head a
    # continuation's summed log-likelihood moves by a few such steps of its magnitude, not more.
    for a, b in zip(_lls(rec32["tiny_mc3"]), _lls(rec16["tiny_mc3"])):
        assert abs(a - b) <= 8 * 2**-8 * abs(a) + 0.05, (a, b)
    assert fp32["config"]["model_identity"] != bf16["config"]["model_identity"]  # never share cached numbers


@pytest.fixture(scope="module")
def adapter(world):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(world["dir"])
    torch.manual_seed(3)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False,
                                                 fan_in_fan_out=True))
    run = world["root"] / "run"  # hfx finetune's layout: RUN/adapter
    peft_model.save_pretrained(run / "adapter")
    merged = peft_model.merge_and_unload().eval()
    return {"run": run, "merged": merged}


def test_peft_adapter_scores_equal_the_merged_model(world, adapter):
    merged, rec_m = _run(world, model=adapter["merged"], tokenizer=world["tok"])
    for path in (adapter["run"] / "adapter", adapter["run"]):  # the adapter folder, or the hfx finetune run
        results, records = _run(world, model_args=f"peft={path}")
        assert _lls(records["tiny_mc3"]) == pytest.approx(_lls(rec_m["tiny_mc3"]), abs=1e-5)
        assert results["results"]["tiny_mc3"]["acc,none"] == merged["results"]["tiny_mc3"]["acc,none"]
    base, _ = _run(world)
    assert base["config"]["model_identity"] != results["config"]["model_identity"]  # the adapter is in the cache key


def test_bad_adapters_are_refused_before_the_model_loads(world, adapter, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model loaded before the adapter was checked"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationInputError, match="not a PEFT adapter folder: it has no adapter_config.json"):
        _run(world, model_args=f"peft={tmp_path / 'empty'}")
    with pytest.raises(EvaluationInputError, match="no such folder"):
        _run(world, model_args=f"peft={tmp_path / 'nope'}")
    other = tmp_path / "wide"  # same architecture, other widths: the adapter's matrices do not fit it
    GPT2LMHeadModel(GPT2Config(vocab_size=len(world["tok"]), n_positions=256, n_embd=48, n_layer=2, n_head=4)
                    ).save_pretrained(other)
    world["tok"].save_pretrained(other)
    with pytest.raises(EvaluationInputError, match=r"the adapter was trained on .*gpt2 \(n_embd=32\), not on this "
                                                   r"base model \(n_embd=48\)"):
        _run(world, model=other, model_args=f"peft={adapter['run']}")
    moved = tmp_path / "moved"  # its recorded base gone: the adapter's matrices are checked against the base's
    shutil.copytree(adapter["run"] / "adapter", moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/moved/away"}))
    with pytest.raises(EvaluationInputError, match=r"the adapter's transformer\.h\.0\.attn\.c_attn is 32 -> 96 but "
                                                   r"this base model's transformer\.h\.0\.attn\.c_attn\.weight is 48 x 144"):
        _run(world, model=other, model_args=f"peft={moved}")
    assert check_adapter(adapter["run"], world["dir"]) == adapter["run"] / "adapter"


def test_load_in_4bit_goes_through_bitsandbytes_config_on_cpu(world):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    fp32, rec32 = _run(world, limit=3)
    results, records = _run(world, limit=3, model_args="load_in_4bit=True,bnb_4bit_compute_dtype=float32")
    assert results["config"]["bnb_cpu_path"] == "dequantize (float32)"
    assert results["config"]["model_args"] == {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"}
    # NF4 keeps 16 levels per 64-weight block: the scores move, but stay those of the same model
    for a, b in zip(_lls(rec32["tiny_mc3"]), _lls(records["tiny_mc3"])):
        assert math.isfinite(b) and abs(a - b) <= 0.05 * abs(a) + 0.5, (a, b)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        world["dir"], **ModelArgs.parse("load_in_4bit=True").from_pretrained_kwargs("cpu"))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


# -- devices ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, fragment", [
    ({"device": "tpu"}, "--device 'tpu' is not a device; valid: cpu, cuda, cuda:N, mps, auto"),
    ({"device": "cpu:1"}, "is not a device"),
    ({"device": "cpu", "model_args": "parallelize=True"}, "device='cpu' and model_args device_map='auto' both place"),
    ({"model_args": "pretrained=/elsewhere"}, "disagree; give the model once"),
    ({"model_args": "add_bos_token=True", "add_bos_token": False}, "disagree; they are the same setting"),
])
def test_device_and_model_mistakes_before_anything_loads(world, kwargs, fragment, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(EvaluationInputError) as info:
        _run(world, **kwargs)
    assert fragment in str(info.value)


def test_cuda_without_cuda_names_what_is_available(world, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the refusal is for a machine without CUDA
    with pytest.raises(EvaluationInputError, match=r"--device cuda: CUDA is not available here \(torch .*\); "
                                                   r"available: cpu"):
        _run(world, device="cuda")
    with pytest.raises(EvaluationInputError, match="--device cuda:3: CUDA is not available"):
        _run(world, device="cuda:3")


def test_auto_device_and_a_loaded_model_with_loading_keys(world):
    results, _ = _run(world, device="auto", limit=2)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert results["config"]["device"].startswith(expected)
    with pytest.raises(EvaluationInputError, match="model_args dtype choose how a model is loaded"):
        _run(world, model=world["model"], tokenizer=world["tok"], model_args="dtype=bfloat16")


def test_max_length_reaches_the_scorer_and_the_cache_key(world, tmp_path):
    shutil.copytree(world["dir"], tmp_path / "m")
    short, rec = _run(world, model=tmp_path / "m", model_args="max_length=16", task="tiny_mc3", limit=2)
    full, rec_full = _run(world, model=tmp_path / "m", task="tiny_mc3", limit=2)
    assert short["config"]["model_identity"] != full["config"]["model_identity"]
    assert _lls(rec["tiny_mc3"]) != _lls(rec_full["tiny_mc3"])  # 3-shot prompts are left-truncated at 16 tokens
    assert json.dumps(short["config"]["model_args"]) == '{"max_length": 16}'


def test_cache_identity_holds_the_devices_the_loaded_model_computes_on(world):
    import copy

    from hfx.evaluation.cache import ContentHashMemo
    from hfx.evaluation.evaluator import _identity_extras, placement_types

    cpu, _ = _run(world, model=world["model"], tokenizer=world["tok"], limit=1)
    explicit, _ = _run(world, model=world["model"], tokenizer=world["tok"], limit=1, device="cpu")
    assert cpu["config"]["model_identity"] == explicit["config"]["model_identity"]  # CPU caches keep their key
    memo = ContentHashMemo(None)
    assert _identity_extras("base", adapter=None, memo=memo, devices=["cpu"], max_length=None) == "base"
    # a model spread by device_map / parallelize (or already on a GPU, given without device=) is not a CPU run
    spread = copy.deepcopy(world["model"])
    spread.hf_device_map = {"transformer": 0, "lm_head": "cpu"}
    assert placement_types(spread) == ["cpu", "cuda"]
    mixed, _ = _run(world, model=spread, tokenizer=world["tok"], limit=1)
    assert mixed["config"]["model_identity"] != cpu["config"]["model_identity"]
    import hashlib

    old_cuda_key = hashlib.blake2b(b"base\ndevice:cuda", digest_size=16).hexdigest()  # what --device cuda keyed before
    assert _identity_extras("base", adapter=None, memo=memo, devices=["cuda"], max_length=None) == old_cuda_key


@pytest.mark.parametrize("extra, fragment", [
    (["--gen-kwargs", "max_gen_toks=abc"], "gen_kwargs: max_gen_toks must be a positive integer, got 'abc'"),
    (["--gen-kwargs", "max_gen_tok=4"], "unknown generation option 'max_gen_tok' (did you mean 'max_gen_toks'?)"),
    (["--gen-kwargs", "num_beams=x"], "gen_kwargs: num_beams must be a positive integer, got 'x'"),
    (["--gen-kwargs", "max_gen_toks=0"], "max_gen_toks must be a positive integer, got 0"),
    (["--gen-kwargs", "do_sample=yes"], "do_sample must be True or False, got 'yes'"),
    (["--gen-kwargs", "temperature=hot"], "temperature must be a number >= 0, got 'hot'"),
    (["--gen-kwargs", "top_p=2"], "top_p must be a number in [0, 1], got 2"),
    (["--gen-kwargs", "top_k=0.5"], "top_k must be an integer >= 0, got 0.5"),
    (["--gen-kwargs", '{"until": [1]}'], "until must be a string or a list of strings, got [1]"),
    (["--gen-kwargs", "max_gen_toks=5000"], ("task 'tiny_gen': max_gen_toks=5000 leaves no room for the prompt: "
                                             "the model's max_length is 256 (from its config)")),
    (["--model-args", "max_length=4"], ("max_gen_toks=6 leaves no room for the prompt: the model's max_length is 4 "
                                        "(--model-args max_length)")),
])
def test_bad_gen_kwargs_are_one_line_before_the_model_loads(world, extra, fragment, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    from hfx.cli import main

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as info:
        main(["eval", "--model", str(world["dir"]), "--tasks", "tiny_gen", "--include-path", str(world["tasks"]),
              "--no-cache", "--limit", "1", *extra])
    assert info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.strip() and not line.startswith(("usage:", " ", "hfx: warning:"))
              and not line.rstrip().endswith(("/s]", "?it/s]"))]
    assert len(errors) == 1 and fragment in errors[0], errors


def test_generation_room_is_checked_for_a_model_object_too(world):
    with pytest.raises(EvaluationInputError, match="max_gen_toks=300 leaves no room for the prompt: the model's "
                                                   r"max_length is 256 \(from its config\)"):
        _run(world, model=world["model"], tokenizer=world["tok"], task="tiny_gen", limit=1,
             gen_kwargs="max_gen_toks=300")


@pytest.mark.parametrize("extra, model_args, gen_kwargs", [
    (["--model-args", '{"dtype": "float32"}', "--trust-remote-code"], {"dtype": "float32", "trust_remote_code": True},
     None),
    (["--model-args", "dtype=float32", "--trust-remote-code"], {"dtype": "float32", "trust_remote_code": True}, None),
    (["--trust-remote-code"], {"trust_remote_code": True}, None),
    (["--model-args", "dtype=float32", "--model-args", "max_length=64", "--gen-kwargs", "max_gen_toks=3",
      "--gen-kwargs", "do_sample=false"], "dtype=float32,max_length=64", "max_gen_toks=3,do_sample=false"),
    (["--model-args", "dtype=float32", "max_length=64", "--model-args", '{"revision": "main"}'],
     {"dtype": "float32", "max_length": 64, "revision": "main"}, None),
])
def test_repeated_model_args_gen_kwargs_and_trust_remote_code_all_reach_evaluate(world, extra, model_args,
                                                                                  gen_kwargs, monkeypatch):
    import hfx.evaluation
    from hfx.cli import main

    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        raise hfx.evaluation.EvaluationInputError("stop here")

    monkeypatch.setattr(hfx.evaluation, "evaluate", fake)
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(world["dir"]), "--tasks", "tiny_gen", "--no-cache", *extra])
    assert seen["model_args"] == model_args and seen["gen_kwargs"] == gen_kwargs


@pytest.mark.parametrize("extra, fragment", [
    (["--model-args", '{"trust_remote_code": false}', "--trust-remote-code"],
     "--trust-remote-code and --model-args trust_remote_code=False disagree"),
    (["--model-args", "dtype=float32", "--model-args", '{"dtype": "float16"}'], "'dtype' is given twice"),
    (["--gen-kwargs", "max_gen_toks=3", "--gen-kwargs", "max_gen_toks=4"], "'max_gen_toks' is given twice"),
])
def test_contradicting_repeats_are_one_line(world, extra, fragment, capsys):
    from hfx.cli import main

    with pytest.raises(SystemExit) as info:
        main(["eval", "--model", str(world["dir"]), "--tasks", "tiny_gen", "--include-path", str(world["tasks"]),
              "--no-cache", *extra])
    assert info.value.code == 2 and fragment in capsys.readouterr().err


def test_seeds_are_set_before_the_tasks_are_built(world, tmp_path):
    """lm-eval seeds random / numpy / torch at the top of simple_evaluate: a process_docs hook drawing from the
    global generators sees the seeded states, whatever ran before."""
    import random

    (tmp_path / "shuffle.py").write_text("import random\n\ndef docs(dataset):\n"
                                         "    return dataset.select(random.sample(range(len(dataset)), len(dataset)))\n")
    (tmp_path / "shuf.yaml").write_text((world["tasks"] / "mc0.yaml").read_text().replace("tiny_mc0", "tiny_shuf")
                                        + "\nprocess_docs: !function shuffle.docs\n")

    def docs(state, seed):
        random.seed(state)
        _, records = evaluate(world["model"], "tiny_shuf", tokenizer=world["tok"], include_path=tmp_path, limit=4,
                              seed=seed, allow_code=True, cache_dir=False, progress=False, return_records=True)
        return [r["doc"] for r in records["tiny_shuf"]]

    first = docs(111, 7)
    assert first == docs(222, 7)
    expected = random.Random(7).sample(range(16), 16)[:4]  # the hook's draw right after random.seed(7)
    test = [json.loads(line) for line in (world["root"] / "test.jsonl").open()]
    assert first == [test[i] for i in expected]


def test_an_unset_torch_seed_does_not_reuse_sampled_generations_of_seed_1234(world, tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "sample.yaml").write_text(
        (world["tasks"] / "gen.yaml").read_text().replace("tiny_gen", "tiny_sample")
        .replace("do_sample: false", "do_sample: true\n  temperature: 5.0"))

    def hits(seed):
        results = evaluate(world["model"], "tiny_sample", tokenizer=world["tok"], include_path=tmp_path / "tasks",
                           limit=3, seed=seed, cache_dir=tmp_path / "cache", progress=False)
        return results["config"]["cache_hits"]

    assert hits(None) == 0
    assert hits("0,1234,1234,1234") == 3  # the default seeds keep their keys
    assert hits("0,1234,None,1234") == 0  # torch slot unset: its own sampled generations
    assert hits("0,1234,None,1234") == 3


def test_one_definition_each_for_the_chat_record_and_the_class_output_type(world):
    import inspect

    from hfx.evaluation import class_tasks, evaluator
    from hfx.evaluation.chat import prompt_config

    source = inspect.getsource(evaluator)
    assert "CLASS_OUTPUT_TYPE = " not in source and evaluator.CLASS_OUTPUT_TYPE is class_tasks.CLASS_OUTPUT_TYPE
    assert not hasattr(evaluator, "_chat_record")
    assert all("ImportError" not in inspect.getsource(f) for f in (evaluator._process_group, evaluator._chat_format))
    plain, _ = _run(world, model=world["model"], tokenizer=world["tok"], limit=1)
    system, _ = _run(world, model=world["model"], tokenizer=world["tok"], limit=1, system_instruction="Be brief.")
    assert {k: plain["config"][k] for k in prompt_config(None)} == prompt_config(None)
    assert system["config"]["system_instruction"] == system["system_instruction"] == "Be brief."
    assert system["config"]["system_instruction_sha"] == hashlib_sha("Be brief.")


def hashlib_sha(text):
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def test_a_pickled_only_adapter_is_refused_before_anything_loads(world, adapter, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(adapter["run"] / "adapter" / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(EvaluationInputError, match="only a pickled adapter_model.bin; hfx loads weights from "
                                                   "safetensors only"):
        check_adapter(pickled, world["dir"])
