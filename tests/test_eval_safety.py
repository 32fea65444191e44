"""hfx eval safety: cache identity by content, the content-hash memo, junk cache lines, lm-eval's
add_bos_token, the shared-special-token warning, and one-line errors (exit 2) before any model work.

Models are tiny GPT-2s with word-level tokenizers built here and saved into tmp folders.
"""

import json
import os
import shutil

import pytest
import torch

from hfx.evaluation import EvaluationInputError, TaskError, evaluate
from hfx.evaluation.cache import MEMO_NAME, ContentHashMemo, model_identity
from hfx.evaluation.scorer import CausalLMScorer

WORDS = "red blue green cat dog owl baker farmer lives in works as the of a is and big small".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<|endoftext|>"]


def _tokenizer(wrap: bool = False):
    """A word-level tokenizer; ``wrap=True`` adds ``[CLS] … [SEP]`` around every input, as a BERT post-processor does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS + ["Question", ":", "Answer", "?"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if wrap:
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
    kwargs = {"bos_token": "[CLS]", "eos_token": "[SEP]"} if wrap else {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", **kwargs)


def _gpt2(folder, tokenizer, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


MC = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root}/docs.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}} ? Answer:"
doc_to_target: label
doc_to_choice: choices
"""
GEN = """task: safety_sample
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root}/docs.jsonl
output_type: generate_until
test_split: test
doc_to_text: "Question: {{{{question}}}} ? Answer:"
doc_to_target: "{{{{choices[label]}}}}"
num_fewshot: 0
generation_kwargs:
  until: ["?"]
  do_sample: true
  temperature: 5.0
  max_gen_toks: 5
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory, private_eval_cache):
    import random

    root = tmp_path_factory.mktemp("safety")
    rng = random.Random(0)
    with open(root / "docs.jsonl", "w") as handle:
        for _ in range(8):
            question = " ".join(rng.choice(WORDS) for _ in range(4))
            handle.write(json.dumps({"question": question, "choices": rng.sample(WORDS, 3), "label": rng.randrange(3)}) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(MC.format(name="safety_mc", root=root))
    (tasks / "gen.yaml").write_text(GEN.format(root=root))
    models = {}
    for name, wrap, seed in (("a", False, 0), ("b", False, 1), ("wrap", True, 2)):
        folder = root / name
        models[name] = (_gpt2(folder, _tokenizer(wrap), seed), folder)
    return {"root": root, "tasks": tasks, "models": models}


@pytest.fixture
def counted_forwards(monkeypatch):
    calls = []
    original = CausalLMScorer._scored_positions

    def counting(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(CausalLMScorer, "_scored_positions", counting)
    return calls


def _eval(folder, world, cache_dir, **kwargs):
    return evaluate(folder, "safety_mc", include_path=world["tasks"], cache_dir=cache_dir, progress=False, **kwargs)


def _copy_keeping_stat(src, dst):
    """``cp -p src dst`` and then the old mtime put back: same inode, size and mtime, other bytes."""
    before = os.stat(dst)
    with open(src, "rb") as source, open(dst, "r+b") as target:  # in place: the inode stays
        target.write(source.read())
        target.truncate()
    os.utime(dst, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(dst)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)


# -- cache identity ------------------------------------------------------------------------------
def test_weights_changed_under_the_same_size_and_mtime_miss_the_cache(world, tmp_path, counted_forwards):
    folder = tmp_path / "model"
    shutil.copytree(world["models"]["a"][1], folder)
    cache = tmp_path / "cache"
    first, first_records = _eval(folder, world, cache, return_records=True)
    n_first = len(counted_forwards)
    assert n_first > 0
    original = tmp_path / "original.safetensors"
    shutil.copy2(folder / "model.safetensors", original)

    _copy_keeping_stat(world["models"]["b"][1] / "model.safetensors", folder / "model.safetensors")
    other, other_records = _eval(folder, world, cache, return_records=True)
    assert len(counted_forwards) > n_first  # other weights: scored again, not read from the cache
    assert other["config"]["model_identity"] != first["config"]["model_identity"]
    assert other["config"]["cache_hits"] == 0
    lls = [[ll for ll, _ in r["resps"]] for r in first_records["safety_mc"]]
    assert [[ll for ll, _ in r["resps"]] for r in other_records["safety_mc"]] != lls

    _copy_keeping_stat(original, folder / "model.safetensors")  # the original bytes again
    n_before = len(counted_forwards)
    again = _eval(folder, world, cache)
    assert len(counted_forwards) == n_before  # identical content: every request from the cache
    assert again["config"]["model_identity"] == first["config"]["model_identity"]
    assert again["results"] == first["results"]
    assert again["config"]["cache_hits"] == 8 * 3


@pytest.mark.parametrize("edit", ["generation_config.json", "tokenizer_config.json", "tokenizer.json", "config.json"])
def test_identity_covers_every_file_that_changes_a_number(world, tmp_path, edit):
    model, source = world["models"]["a"]
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    tok = _tokenizer()
    before = model_identity(model, tok, folder)
    path = folder / edit
    data = json.loads(path.read_text())
    data["hfx_test_edit"] = 1  # any byte of these files may change generation defaults or tokenisation
    path.write_text(json.dumps(data))
    assert model_identity(model, tok, folder) != before
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    # content, not location: the same files elsewhere are the same model
    assert model_identity(model, tok, moved) == model_identity(model, tok, folder)


def test_identity_covers_the_bos_setting_and_the_loaded_generation_config(world):
    model, source = world["models"]["a"]
    tok = _tokenizer()
    ids = {model_identity(model, tok, source, add_bos_token=v) for v in (None, True, False)}
    assert len(ids) == 3
    base = model_identity(model, tok)
    model.generation_config.repetition_penalty = 1.5
    try:
        assert model_identity(model, tok) != base
    finally:
        model.generation_config.repetition_penalty = 1.0


def test_content_hashes_are_memoised_by_inode_size_mtime_and_ctime(tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x" * 1000)
    calls = []

    def digest(path):
        calls.append(path)
        return f"h{len(calls)}"

    memo = ContentHashMemo(tmp_path, digest)
    assert memo.hash(weights) == memo.hash(weights) == "h1" and len(calls) == 1
    memo.save()
    assert json.loads((tmp_path / MEMO_NAME).read_text())[str(weights.resolve())]["hash"] == "h1"
    reread = ContentHashMemo(tmp_path, digest)
    assert reread.hash(weights) == "h1" and len(calls) == 1 and reread.hashed == 0  # from the memo file
    other = tmp_path / "other.bin"
    other.write_bytes(b"y" * 1000)
    _copy_keeping_stat(other, weights)  # inode, size and mtime kept; ctime moved
    changed = ContentHashMemo(tmp_path, digest)
    assert changed.hash(weights) == "h2" and len(calls) == 2 and changed.hashed == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # written through a temp file


def test_memo_keeps_reruns_from_hashing_the_weights_again(world, tmp_path, monkeypatch):
    import hfx.evaluation.cache as cache_module

    calls = []
    real = cache_module.file_digest
    monkeypatch.setattr(cache_module, "file_digest", lambda path: calls.append(path) or real(path))
    folder = world["models"]["a"][1]
    first = _eval(folder, world, tmp_path)
    assert any(p.endswith("model.safetensors") for p in calls)
    assert first["config"]["model_identity_cost"]["files_hashed"] == len(calls) > 0
    calls.clear()
    second = _eval(folder, world, tmp_path)
    assert calls == [] and second["config"]["model_identity_cost"]["files_hashed"] == 0
    assert second["config"]["model_identity"] == first["config"]["model_identity"]
    (tmp_path / MEMO_NAME).write_text("{not json")  # a damaged memo only costs a re-hash
    third = _eval(folder, world, tmp_path)
    assert third["config"]["model_identity"] == first["config"]["model_identity"] and calls


def test_cache_lines_that_are_not_records_are_skipped(world, tmp_path, counted_forwards):
    folder = world["models"]["a"][1]
    first = _eval(folder, world, tmp_path)
    n_first = len(counted_forwards)
    path = tmp_path / f"{first['config']['model_identity']}.jsonl"
    lines = path.read_text().splitlines()
    junk = ['[1, 2]', '"text"', 'null', '42', '{"a": 1}', '{"k": 5, "v": [0, 1]}', '{"k": "x"}', '{"k": "y", "v"']
    one_key = json.loads(lines[0])["k"]
    # a record of the right key but the wrong shape is recomputed, not trusted
    path.write_text("\n".join(junk[:4] + lines + junk[4:] + [json.dumps({"k": one_key, "v": "not a score"})]) + "\n")
    again = _eval(folder, world, tmp_path)
    assert again["results"] == first["results"]
    assert len(counted_forwards) == n_first + 1  # only the request whose value was junk is scored again


def test_sampled_generations_are_keyed_by_seed_and_resume_exactly(world, tmp_path):
    folder = world["models"]["a"][1]

    def run(seed, limit, cache_dir):
        _, records = evaluate(folder, "safety_sample", include_path=world["tasks"], cache_dir=cache_dir, seed=seed,
                              limit=limit, progress=False, return_records=True)
        return [r["resps"][0] for r in records["safety_sample"]]

    fresh = run(7, 6, False)
    assert run(7, 3, tmp_path) == fresh[:3]  # a run "killed" after 3 documents
    resumed = run(7, 6, tmp_path)
    assert resumed == fresh  # the 3 cached and the 3 new ones: what one uninterrupted run samples
    other_seed = run(8, 6, tmp_path)
    assert other_seed == run(8, 6, False)  # not served the seed-7 samples from the cache
    assert other_seed != fresh


# -- add_bos_token -------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["a", "wrap"])
@pytest.mark.parametrize("add_bos", [None, True, False])
def test_add_bos_token_tokenises_as_lm_eval(world, model_name, add_bos):
    from lm_eval.models.huggingface import HFLM

    from hfx.evaluation import load_model

    folder = world["models"][model_name][1]
    lm = HFLM(pretrained=str(folder), add_bos_token=add_bos, batch_size=1, device="cpu")
    model, tok, _ = load_model(folder, add_bos_token=add_bos)
    scorer = CausalLMScorer(model, tok, add_bos_token=add_bos, progress=False)
    bos = lm.tokenizer.decode(lm.prefix_token_id)
    cases = [("Question: red cat ? Answer:", " blue"), ("Question: owl ? Answer: ", "big dog"),
             (bos + " the cat is", " small")]
    for ctx, cont in cases:
        assert scorer.encode_pair(ctx, cont) == lm._encode_pair(ctx, cont)
        assert scorer.encode(ctx + cont) == lm.tok_encode(ctx + cont)
        assert scorer.encode_prompt(ctx) == lm.tok_batch_encode([ctx])[0][0].tolist()
    if add_bos is False:
        assert scorer.encode("red cat") == tok.encode("red cat", add_special_tokens=False)
    if model_name == "wrap" and add_bos is not None:
        assert tok.convert_tokens_to_ids("[SEP]") not in scorer.encode("red cat")  # the post-processor was rebuilt


def test_add_bos_token_scores_match_lm_eval(world):
    import lm_eval
    from lm_eval.tasks import TaskManager

    folder = world["models"]["a"][1]
    ref = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},add_bos_token=True",
                                  tasks=["safety_mc"], log_samples=True, device="cpu",
                                  task_manager=TaskManager(include_path=str(world["tasks"]), include_defaults=False))
    results, records = evaluate(folder, "safety_mc", include_path=world["tasks"], cache_dir=False, progress=False,
                                add_bos_token=True, return_records=True)
    samples = sorted(ref["samples"]["safety_mc"], key=lambda s: s["doc_id"])
    for sample, record in zip(samples, records["safety_mc"], strict=True):
        assert [ll for ll, _ in record["resps"]] == pytest.approx([r[0][0] for r in sample["resps"]], abs=1e-4)
    assert results["results"]["safety_mc"]["acc,none"] == ref["results"]["safety_mc"]["acc,none"]
    plain = evaluate(folder, "safety_mc", include_path=world["tasks"], cache_dir=False, progress=False,
                     return_records=True)[1]["safety_mc"]
    assert [r["resps"] for r in plain] != [r["resps"] for r in records["safety_mc"]]  # the BOS changed the numbers
    assert results["config"]["add_bos_token"] is True


def test_the_old_add_special_tokens_name_is_the_same_switch(world):
    folder = world["models"]["a"][1]
    kwargs = {"include_path": world["tasks"], "cache_dir": False, "progress": False, "limit": 3}
    assert (evaluate(folder, "safety_mc", add_special_tokens=False, **kwargs)["results"]
            == evaluate(folder, "safety_mc", add_bos_token=False, **kwargs)["results"])
    with pytest.raises(EvaluationInputError, match="disagree"):
        evaluate(folder, "safety_mc", add_special_tokens=False, add_bos_token=True, **kwargs)
    with pytest.raises(EvaluationInputError, match="add_bos_token must be True, False or None, got 'yes'"):
        evaluate(folder, "safety_mc", add_bos_token="yes", **kwargs)


# -- the shared special last token -------------------------------------------------------------
def test_a_tokenizer_appending_sep_to_every_input_is_warned_about(world, caplog):
    folder = world["models"]["wrap"][1]
    kwargs = {"include_path": world["tasks"], "cache_dir": False, "progress": False, "return_records": True}
    with caplog.at_level("WARNING", logger="hfx.evaluation.scorer"):
        results, records = evaluate(folder, "safety_mc", **kwargs)
    (warning,) = results["config"]["warnings"]
    assert "'safety_mc'" in warning and "'[SEP]'" in warning and "--no-add-bos-token" in warning
    assert [r.getMessage() for r in caplog.records if "every continuation" in r.getMessage()] == [
        f"hfx eval: warning: {warning}"]
    # what the warning is about: single-word choices all score the [SEP] alone, so they tie
    for record in records["safety_mc"]:
        assert len({round(ll, 6) for ll, _ in record["resps"]}) == 1
    fixed, fixed_records = evaluate(folder, "safety_mc", add_bos_token=False, **kwargs)
    assert fixed["config"]["warnings"] == []
    assert any(len({round(ll, 6) for ll, _ in r["resps"]}) == 3 for r in fixed_records["safety_mc"])
    assert evaluate(world["models"]["a"][1], "safety_mc", **kwargs)[0]["config"]["warnings"] == []


# -- bad input: one line, exit 2, before the model loads ---------------------------------------
@pytest.fixture(scope="module")
def bad_models(world):
    root = world["root"] / "bad"
    root.mkdir()
    good = world["models"]["a"][1]
    (root / "empty").mkdir()
    shutil.copytree(good, root / "truncated")
    data = (root / "truncated" / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(data[: len(data) // 2])
    shutil.copytree(good, root / "badjson")
    (root / "badjson" / "config.json").write_text("{ not json")
    shutil.copytree(good, root / "notok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / "notok" / name).unlink()
    import hfx

    tok = _tokenizer()
    config = hfx.HfxConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=64, is_decoder=True)
    hfx.HfxForCausalLM(config).save_pretrained(root / "badnorm")
    tok.save_pretrained(root / "badnorm")
    cfg = json.loads((root / "badnorm" / "config.json").read_text())
    cfg["norm_type"] = "groupnorm"
    (root / "badnorm" / "config.json").write_text(json.dumps(cfg))
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    (root / "afile").write_text("x")
    return root


def _cli_rows():
    """(id, argv with {good}/{bad}/{tasks}/{tmp} placeholders, message fragment)."""
    m, t = ["--model", "{good}"], ["--tasks", "safety_mc", "--include-path", "{tasks}"]
    return [
        ("missing-model", ["--model", "{bad}/nope", *t], "--model {bad}/nope: no such folder"),
        ("hub-id-offline", ["--model", "someorg/somemodel", *t], "hub access is off"),
        ("model-is-a-file", ["--model", "{bad}/afile", *t], "is a file"),
        ("no-config", ["--model", "{bad}/empty", *t], "holds no config.json"),
        ("config-not-json", ["--model", "{bad}/badjson", *t], "config.json is not valid JSON"),
        ("truncated-weights", ["--model", "{bad}/truncated", *t], "model.safetensors is damaged or truncated"),
        ("bad-config-value", ["--model", "{bad}/badnorm", *t], "Unknown norm 'groupnorm'"),
        ("no-tokenizer", ["--model", "{bad}/notok", *t], "the tokenizer encodes text to no tokens"),
        ("not-causal", ["--model", "{bad}/bert", *t], "not a causal LM"),
        ("tasks-comma", [*m, "--tasks", ",", "--include-path", "{tasks}"], "--tasks ',' names no task"),
        ("tasks-empty", [*m, "--tasks", "", "--include-path", "{tasks}"], "--tasks '' names no task"),
        ("unknown-task", [*m, "--tasks", "safety_mcq", "--include-path", "{tasks}"], "Unknown task 'safety_mcq'"),
        ("limit-negative", [*m, *t, "--limit", "-5"], "--limit must be at least 1, got -5"),
        ("limit-zero", [*m, *t, "--limit", "0"], "--limit must be at least 1, got 0"),
        ("fewshot-negative", [*m, *t, "--num-fewshot", "-1"], "--num-fewshot must be at least 0, got -1"),
        ("fewshot-too-many", [*m, *t, "--num-fewshot", "50"], "num_fewshot=50 but the few-shot pool has only"),
        ("batch-size-zero", [*m, *t, "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        ("batch-tokens-zero", [*m, *t, "--max-batch-tokens", "0"], "--max-batch-tokens must be at least 1, got 0"),
        ("seed-negative", [*m, *t, "--seed", "-1"], "--seed must be in [0, 2**63), got -1"),
        ("output-is-dir", [*m, *t, "--output", "{tmp}"], "is a directory; give a file name"),
        ("output-under-file", [*m, *t, "--output", "{bad}/afile/r.json"], "is a file, not a directory"),
        ("samples-no-output", [*m, *t, "--log-samples"], "--log-samples needs --output"),
        ("cache-dir-is-file", [*m, *t, "--cache-dir", "{bad}/afile"], "is not a directory"),
        ("no-cache-and-dir", [*m, *t, "--no-cache", "--cache-dir", "{tmp}/c"], "--no-cache and --cache-dir contradict"),
        ("include-missing", [*m, "--tasks", "safety_mc", "--include-path", "{tmp}/none"], "does not exist"),
    ]


@pytest.mark.parametrize("argv, fragment", [r[1:] for r in _cli_rows()], ids=[r[0] for r in _cli_rows()])
def test_cli_mistakes_are_one_line_exit_2_before_the_weights_load(world, bad_models, tmp_path, monkeypatch, capsys,
                                                                 argv, fragment):
    from transformers import AutoModelForCausalLM

    from hfx.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HFX_EVAL_CACHE", str(tmp_path / "cache"))

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the mistake was reported")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    fill = {"good": str(world["models"]["a"][1]), "bad": str(bad_models), "tasks": str(world["tasks"]),
            "tmp": str(tmp_path)}
    argv = [a.format(**fill) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith(("Loading weights", "Generating "))]  # progress bars
    assert len(err) == 1 and err[0].startswith("hfx eval: error: "), err
    assert fragment.format(**fill) in err[0]
    assert "Traceback" not in err[0]


def test_output_in_an_unwritable_folder_is_refused_before_the_model_loads(world, tmp_path, monkeypatch, capsys):
    import hfx.evaluation as evaluation
    from hfx.cli import main

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # root may write anywhere, so the folder is made unwritable for os.access itself
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("evaluate ran before --output was checked"))
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(world["models"]["a"][1]), "--tasks", "safety_mc", "--include-path",
              str(world["tasks"]), "--output", str(locked / "r.json")])
    assert exit_info.value.code == 2
    assert f"the directory '{locked}' is not writable" in capsys.readouterr().err


def test_output_creates_missing_folders_and_writes_a_whole_file(world, tmp_path, capsys):
    from hfx.cli import main

    out = tmp_path / "new" / "deeper" / "r.json"
    assert main(["eval", "--model", str(world["models"]["a"][1]), "--tasks", "safety_mc", "--include-path",
                 str(world["tasks"]), "--output", str(out), "--no-cache", "--limit", "2", "--log-samples"]) == 0
    data = json.loads(out.read_text())
    assert data["n-samples"]["safety_mc"] == {"original": 8, "effective": 2}
    assert len((out.parent / "r_samples_safety_mc.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.json", "r_samples_safety_mc.jsonl"]


@pytest.mark.parametrize("kwargs, fragment", [
    ({"limit": 0}, "limit must be an integer >= 1 (or None), got 0"),
    ({"limit": 2.5}, "limit must be an integer >= 1 (or None), got 2.5"),
    ({"num_fewshot": -1}, "num_fewshot must be an integer >= 0 (or None), got -1"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1 (or None), got 0"),
    ({"max_batch_tokens": None}, "max_batch_tokens must be an integer >= 1, got None"),
    ({"seed": -3}, "seed must be an integer in [0, 2**63), got -3"),
])
def test_python_api_refuses_bad_arguments_before_anything_loads(kwargs, fragment):
    with pytest.raises(EvaluationInputError) as info:
        evaluate("/nonexistent/model", "no_such_task", cache_dir=False, **kwargs)
    assert fragment in str(info.value)


def test_python_api_refuses_an_empty_task_list(world):
    model, _ = world["models"]["a"]
    for tasks in (",", "", [], [" "]):
        with pytest.raises(EvaluationInputError, match="no task names"):
            evaluate(model, tasks, tokenizer=_tokenizer(), cache_dir=False)
    with pytest.raises(TaskError, match="Unknown task"):
        evaluate(model, "safety_mcq", tokenizer=_tokenizer(), include_path=world["tasks"], cache_dir=False)
    with pytest.raises(EvaluationInputError, match="A tokenizer is required"):
        evaluate(model, "safety_mc", include_path=world["tasks"], cache_dir=False)


def test_files_saved_next_to_the_weights_do_not_change_the_identity(world, tmp_path):
    from hfx.evaluation.cache import identity_files

    folder = tmp_path / "model"
    shutil.copytree(world["models"]["a"][1], folder)
    model, tok = world["models"]["a"][0], _tokenizer()
    before = model_identity(model, tok, folder, memo=ContentHashMemo())
    (folder / "results.json").write_text('{"acc": 0.5}')  # hfx eval --output model/results.json
    (folder / "notes.txt").write_text("tried lr 1e-3")
    (folder / "hfx_finetune_results.json").write_text("{}")
    assert model_identity(model, tok, folder, memo=ContentHashMemo()) == before
    names = {f.name for f in identity_files(folder)}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not names & {"results.json", "notes.txt", "hfx_finetune_results.json"}
    (folder / "modeling_custom.py").write_text("# remote code changes what the model computes\n")
    assert model_identity(model, tok, folder, memo=ContentHashMemo()) != before


def test_no_cache_writes_no_memo(world, tmp_path, monkeypatch):
    monkeypatch.setenv("HFX_EVAL_CACHE", str(tmp_path / "default"))
    evaluate(world["models"]["a"][1], "safety_mc", include_path=world["tasks"], cache_dir=False, progress=False,
             limit=2)
    assert not (tmp_path / "default" / MEMO_NAME).exists()
