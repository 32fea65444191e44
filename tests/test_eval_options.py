"""hfx eval's run options against lm-eval 0.4.13: --limit fractions, --samples, --seed slots, --predict-only,
--gen-kwargs, --write-out / --show-config, and their mistakes as one line before the model loads."""

import json

import pytest

from hfx.cli import main
from hfx.evaluation import EvaluationInputError, evaluate
from hfx.evaluation.evaluator import parse_seeds
from tests.test_eval import _gpt2, _write_tasks, lm_eval_reference

SAMPLES = {"tiny_mc3": [9, 1, 4], "tiny_gen": [0, 2]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    tasks = _write_tasks(root)
    model, tok = _gpt2(root)
    limit_ref = lm_eval_reference(model, tok, tasks, ["tiny_mc3", "tiny_gen"], limit=0.3,
                                  gen_kwargs="max_gen_toks=3")
    samples_ref = lm_eval_reference(model, tok, tasks, ["tiny_mc3", "tiny_gen"], samples=SAMPLES, predict_only=True,
                                    random_seed=0, numpy_random_seed=None, torch_random_seed=8, fewshot_random_seed=52)
    return {"root": root, "tasks": tasks, "dir": root / "gpt2", "limit": limit_ref, "samples": samples_ref}


def _cli(world, *extra, output="r.json"):
    out = world["root"] / output
    code = main(["eval", "--model", str(world["dir"]), "--tasks", "tiny_mc3,tiny_gen", "--include-path",
                 str(world["tasks"]), "--no-cache", "--output", str(out), "--log-samples", *extra])
    assert code == 0
    samples = {t: [json.loads(line) for line in (world["root"] / f"{out.stem}_samples_{t}.jsonl").open()]
               for t in ("tiny_mc3", "tiny_gen")}
    return json.loads(out.read_text()), samples


def _ref_samples(ref, task):
    return sorted(ref["samples"][task], key=lambda s: s["doc_id"])


def test_limit_fraction_and_gen_kwargs_match_lm_eval(world):
    results, samples = _cli(world, "--limit", "0.3", "--gen-kwargs", "max_gen_toks=3", output="limit.json")
    ref = world["limit"]
    for task in ("tiny_mc3", "tiny_gen"):
        assert len(samples[task]) == len(ref["samples"][task]) == 5  # ceil(16 * 0.3), as lm-eval
        assert [s["doc"] for s in samples[task]] == [s["doc"] for s in _ref_samples(ref, task)]
    assert results["results"]["tiny_mc3"]["acc,none"] == ref["results"]["tiny_mc3"]["acc,none"]
    assert results["results"]["tiny_gen"]["exact_match,none"] == ref["results"]["tiny_gen"]["exact_match,none"]
    ours = [s["resps"][0] for s in samples["tiny_gen"]]  # lm-eval nests each response once more
    assert ours == [s["resps"][0][0] for s in _ref_samples(ref, "tiny_gen")]
    assert samples["tiny_gen"][0]["arguments"][0][1]["max_gen_toks"] == 3  # merged into the task's own kwargs
    assert results["config"]["gen_kwargs"] == {"max_gen_toks": 3} and results["config"]["limit"] == 0.3
    assert [results["config"][k] for k in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")] == \
        [0, 1234, 1234, 1234]


def test_samples_seeds_and_predict_only_match_lm_eval(world, tmp_path):
    path = tmp_path / "samples.json"
    path.write_text(json.dumps(SAMPLES))  # a file, as lm-eval's --samples also takes
    results, samples = _cli(world, "--samples", str(path), "--seed", "0,None,8,52", "--predict-only",
                            output="samples.json")
    ref = world["samples"]
    for task in ("tiny_mc3", "tiny_gen"):
        # lm-eval scores the chosen documents in dataset order and logs them in that order; its doc_id is
        # the given list's entry at that position (the dataset index when the list is sorted, as here for
        # tiny_gen): hfx logs the dataset index
        mine, theirs = samples[task], ref["samples"][task]
        assert [s["doc"] for s in mine] == [s["doc"] for s in theirs]  # indices 1, 4, 9 in dataset order
        assert [s["doc_id"] for s in mine] == sorted(SAMPLES[task])
        assert [s["arguments"] for s in mine] == [[list(a) for a in s["arguments"]] for s in theirs] or \
            task == "tiny_gen"  # generation kwargs are logged differently; its prompts are checked below
        assert [s["arguments"][0][0] for s in mine] == [s["arguments"][0][0] for s in theirs]  # fewshot seed 52
        # no metric computed: generate_until shows lm-eval's bypass placeholder, multiple_choice nothing
        assert {k: v for k, v in results["results"][task].items() if "," in k} == \
            {k: v for k, v in ref["results"][task].items() if "," in k} == \
            ({"bypass,none": 999, "bypass_stderr,none": "N/A"} if task == "tiny_gen" else {})
        assert results["higher_is_better"][task] == ref["higher_is_better"][task] == {"bypass": True}
    assert [results["config"][k] for k in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")] == \
        [ref["config"][k] for k in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")] == [0, None, 8, 52]
    assert results["config"]["samples"] == SAMPLES


def test_seed_slots_parse_as_lm_eval():
    assert parse_seeds(None) == (0, 1234, 1234, 1234)
    assert parse_seeds(42) == parse_seeds("42") == (42, 42, 42, 42)
    assert parse_seeds("0,None,8,52") == (0, None, 8, 52)
    assert parse_seeds("1,2,3") == (1, 2, 3, 1234)  # lm-eval fills the last slot from its defaults
    for bad, fragment in (("1,2", "give one integer or four values"), ("x", "'x' is not an integer or None"),
                          (-3, "seed must be an integer in [0, 2**63), got -3"), (2**40, "numpy seed must be below")):
        with pytest.raises(EvaluationInputError, match=fragment.replace("[", r"\[").replace("(", r"\(")
                           .replace(")", r"\)").replace("*", r"\*")):
            parse_seeds(bad)


def test_write_out_and_show_config_print_prompts_and_configs(world, capsys):
    code = main(["eval", "--model", str(world["dir"]), "--tasks", "tiny_mc3", "--include-path", str(world["tasks"]),
                 "--no-cache", "--limit", "1", "--write-out", "--show-config"])
    out = capsys.readouterr().out
    assert code == 0
    first = evaluate(world["dir"], "tiny_mc3", include_path=world["tasks"], limit=1, cache_dir=False, progress=False,
                     return_records=True)[1]["tiny_mc3"][0]
    assert "Task: tiny_mc3; document 0 (multiple_choice, 3-shot); prompt (from the next line):\n" \
        f"{first['arguments'][0][0]}\n(end of prompt)" in out
    assert f"target: {first['target']}" in out
    config = json.loads(out[out.index("tiny_mc3: {") + len("tiny_mc3: "):])
    assert config["task"] == "tiny_mc3" and config["num_fewshot"] == 3
    assert out.index("| Tasks |") < out.index("tiny_mc3: {")  # after the table, as lm-eval's --show_config


ROWS = {
    "samples-out-of-range": (["--samples", '{"tiny_mc3": [3, 16]}'],
                             "samples['tiny_mc3']: document index 16 is out of range: the task has 16 documents"),
    "samples-unknown-task": (["--samples", '{"tiny_mc9": [1]}'], "samples names 'tiny_mc9', which this run does not"),
    "samples-not-json": (["--samples", "{tiny: 1}"], "is not valid JSON"),
    "samples-bad-indices": (["--samples", '{"tiny_mc3": [1, -2]}'], "must be a non-empty list of document indices"),
    "samples-and-limit": (["--samples", '{"tiny_mc3": [1]}', "--limit", "2"], "--samples and --limit both choose"),
    "limit-fraction-over-one": (["--limit", "2.5"], "--limit 2.5: give a whole number of documents (>= 1) or a fraction"),
    "output-folder-to-be": (["--output", "{root}/not_yet/"], "names a folder; give a file name"),
    "model-args-unknown-key": (["--model-args", "dtype=float32,peft_path=x"],
                               "unknown key 'peft_path' (did you mean 'peft'?); valid keys: pretrained"),
    "model-args-bad-dtype": (["--model-args", "dtype=float8"], "dtype='float8' is not a dtype"),
    "device-unknown": (["--device", "gpu"], "--device 'gpu' is not a device; valid: cpu, cuda, cuda:N, mps, auto"),
    "peft-not-adapter": (["--model-args", "peft={root}"], "not a PEFT adapter folder"),
    "device-and-device-map": (["--device", "cpu", "--model-args", "device_map=auto"], "both place the model"),
    "predict-only-no-output": (["--predict-only"], "--predict-only needs --output"),
    "seed-bad": (["--seed", "1,2"], "give one integer or four values random,numpy,torch,fewshot"),
    "batch-size-word": (["--batch-size", "big"], "invalid value 'big': give a number of rows or auto"),
    "gen-kwargs-not-pairs": (["--gen-kwargs", "max_gen_toks"], "'max_gen_toks' is not key=value"),
    "model-twice": (["--model-args", "pretrained=/other"], "disagree; give the model once"),
}


@pytest.mark.parametrize("name", list(ROWS))
def test_option_mistakes_are_one_line_exit_2_before_the_model_loads(name, world, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("the model loaded"))
    extra, fragment = ROWS[name]
    extra = [e.replace("{root}", str(world["root"])) for e in extra]
    with pytest.raises(SystemExit) as info:
        main(["eval", "--model", str(world["dir"]), "--tasks", "tiny_mc3", "--include-path", str(world["tasks"]),
              "--no-cache", *extra])
    assert info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.strip() and not line.startswith(("usage:", " ", "hfx: warning:"))
              and not line.rstrip().endswith(("/s]", "?it/s]"))]
    assert len(errors) == 1 and fragment in errors[0], errors


def test_python_api_limit_fraction_and_samples_refusals(world):
    with pytest.raises(EvaluationInputError, match=r"limit must be an integer >= 1 \(or None\), got 1.5"):
        evaluate(world["dir"], "tiny_mc3", limit=1.5, cache_dir=False)
    with pytest.raises(EvaluationInputError, match="limit and samples both given"):
        evaluate(world["dir"], "tiny_mc3", limit=0.5, samples={"tiny_mc3": [0]}, cache_dir=False)
    with pytest.raises(EvaluationInputError, match=r"batch_size must be an integer >= 1 \(or None\), got 'max'; or 'auto'"):
        evaluate(world["dir"], "tiny_mc3", batch_size="max", cache_dir=False)


def test_auto_batch_size_is_recorded_when_every_request_comes_from_the_cache(world, tmp_path):
    run = dict(include_path=world["tasks"], limit=2, cache_dir=tmp_path, progress=False, batch_size="auto")
    first = evaluate(world["dir"], "tiny_mc3", **run)
    again = evaluate(world["dir"], "tiny_mc3", **run)
    assert first["config"]["batch_info"]["mode"] == "auto-cpu" and first["config"]["batch_info"]["max_batch_tokens"]
    assert again["config"]["cache_hits"] > 0
    assert again["config"]["batch_info"]["mode"] == "auto" and "nothing was scored" in again["config"]["batch_info"]["note"]
    assert again["results"]["tiny_mc3"]["acc,none"] == first["results"]["tiny_mc3"]["acc,none"]
