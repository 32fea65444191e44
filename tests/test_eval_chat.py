"""Chat prompts (--apply-chat-template, --fewshot-as-multiturn, --system-instruction) against lm-eval 0.4.13.

A tiny byte-level BPE tokenizer with ChatML special tokens carries two chat templates (``default``:
ChatML; ``alt``: starts with the BOS string and refuses the system role), saved with
save_pretrained so that both harnesses load it from its folder. Prompts are compared byte for
byte with the requests lm-eval's own tasks build (every output type, both samplers, k = 0 / 2 / 3,
multiple input, gen_prefix, description, system instruction, single- and multi-turn); two
configurations are then scored end to end by both harnesses (acc / acc_norm / exact_match equal,
every log-likelihood within 1e-5).
"""

import json
import random
from collections import defaultdict

import pytest
import torch

from hfx.evaluation import evaluate
from hfx.evaluation.chat import Message, PromptFormat, join_delimited, prompt_format, single_turn
from hfx.evaluation.evaluator import EvaluationInputError, plan
from hfx.evaluation.output_types import OUTPUT_TYPES
from tests.test_eval import _sentence, _write_tasks, lm_eval_reference

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ALT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
       "{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
SYSTEM = "You grade colours and animals."

EXTRA_TASKS = {
    # description + gen_prefix: the system turn takes the description; the choice delimiter survives the template
    "mc_prefix.yaml": "include: mc3.yaml\ntask: tiny_mc_prefix\ndoc_to_text: \"Question: {{question}}\"\n"
                      "gen_prefix: \"Answer:\"\ndescription: \"Pick the answer.\\n\\n\"\nnum_fewshot: 2\n",
    "gen_prefix.yaml": "include: gen3.yaml\ntask: tiny_gen_prefix\nnum_fewshot: 2\n"
                       "doc_to_text: \"Q: {{question}}\"\ngen_prefix: \"A:\"\ndescription: \"Answer briefly.\"\n",
    "gen3.yaml": "include: gen.yaml\ntask: tiny_gen3\ndataset_kwargs:\n  data_files:\n    train: {root}/train.jsonl\n"
                 "    test: {root}/test.jsonl\ntraining_split: train\nnum_fewshot: 3\n",
    # winogrande-style: doc_to_text is the gold context's index, the continuation is shared
    "wino.yaml": "include: mc3.yaml\ntask: tiny_wino\ndoc_to_text: label\ndoc_to_target: question\n"
                 "doc_to_choice: choices\nnum_fewshot: 2\n",
}
PROMPT_TASKS = ["tiny_mc0", "tiny_mc3", "tiny_mc_self", "tiny_mc_first", "tiny_mc_prefix", "tiny_wino", "tiny_ll",
                "tiny_ppl", "tiny_gen", "tiny_gen3", "tiny_gen_prefix"]
CONFIGS = {
    "multiturn": dict(apply_chat_template=True, fewshot_as_multiturn=True, system_instruction=None),
    "singleturn+system": dict(apply_chat_template=True, fewshot_as_multiturn=False, system_instruction=SYSTEM),
    "multiturn+system": dict(apply_chat_template=True, fewshot_as_multiturn=True, system_instruction=SYSTEM),
    "text+system": dict(apply_chat_template=False, fewshot_as_multiturn=False, system_instruction=SYSTEM),
}
LIMIT = 6


def _chat_model(root):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    rng = random.Random(3)
    corpus = [_sentence(rng, 12) for _ in range(200)] + ["Question: Answer: Q: A: user assistant system"] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    folders = {}
    for name, template in (("chat", {"default": CHATML, "alt": ALT}), ("alt", ALT), ("plain", None)):
        tok.chat_template = template
        tok.save_pretrained(root / name)
        folders[name] = root / name
    return model, folders


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("chat")
    tasks = _write_tasks(root)
    for name, text in EXTRA_TASKS.items():
        (tasks / name).write_text(text.replace("{root}", str(root)))
    model, folders = _chat_model(root)
    toks = {name: AutoTokenizer.from_pretrained(folder) for name, folder in folders.items()}
    return {"root": root, "tasks": tasks, "model": model, "folders": folders, "toks": toks}


class Recorder:
    """A backend that answers every request with a constant: only the requests' arguments matter here."""

    def loglikelihood(self, pairs, name=None):
        return [(0.0, False)] * len(pairs)

    def loglikelihood_rolling(self, texts):
        return [0.0] * len(texts)

    def generate_until(self, requests):
        return [""] * len(requests)


def _normal(output_type, arguments):
    """Request arguments without generation kwargs (lm-eval's dict and hfx's normalised one differ in form only)."""
    if output_type == "generate_until":
        return [a[0] for a in arguments]
    return [list(a) for a in arguments]


def hfx_requests(world, names, fmt):
    prepared = plan(names, include_path=[world["tasks"]], limit=LIMIT, prompt_format=fmt)
    out = {}
    for name, task in prepared.tasks.items():
        _, docs, _, contexts = prepared.prepared[name]
        records = OUTPUT_TYPES[task.output_type].run(task, docs, contexts, Recorder())
        first = records[0].get("filter", "none")
        out[name] = [_normal(task.output_type, r["arguments"]) for r in records if r.get("filter", "none") == first]
    return out


def lm_eval_requests(world, tok, names, apply_chat_template, fewshot_as_multiturn, system_instruction):
    """The requests lm-eval's own tasks build, as ``simple_evaluate`` then ``evaluate`` ask for them."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    lm = HFLM(pretrained=world["model"], tokenizer=tok, batch_size=4)
    manager = TaskManager(include_path=str(world["tasks"]), include_defaults=False)
    out = {}
    for name, task in get_task_dict(names, manager).items():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=1234)
        task.build_all_requests(limit=LIMIT, apply_chat_template=bool(apply_chat_template),
                                fewshot_as_multiturn=fewshot_as_multiturn, system_instruction=system_instruction,
                                chat_template=lm.apply_chat_template if apply_chat_template else None)
        by_doc = defaultdict(list)
        for instance in task.instances:
            by_doc[instance.doc_id].append(instance)
        kind = task.OUTPUT_TYPE
        out[name] = [_normal(kind, [r.arguments for r in sorted(by_doc[i], key=lambda r: r.idx)])
                     for i in sorted(by_doc)]
    return out


@pytest.mark.parametrize("config", list(CONFIGS))
def test_prompts_equal_lm_eval_byte_for_byte(world, config):
    options = CONFIGS[config]
    tok = world["toks"]["chat"]
    ours = hfx_requests(world, PROMPT_TASKS, prompt_format(tok, **options))
    ref = lm_eval_requests(world, tok, PROMPT_TASKS, **options)
    for name in PROMPT_TASKS:
        assert len(ours[name]) == len(ref[name]) == LIMIT, name
        for doc_id, (got, want) in enumerate(zip(ours[name], ref[name])):
            assert got == want, f"{config}: {name}, document {doc_id}"
    # the configuration is visible in the prompts (not a vacuous comparison)
    first = ours["tiny_mc3"][0][0][0]
    if options["apply_chat_template"]:
        assert first.startswith("<|im_start|>") and first.endswith("<|im_start|>assistant\n")
        assert first.count("<|im_start|>user") == (4 if options["fewshot_as_multiturn"] else 1)
        assert ours["tiny_mc3"][0][0][1][0] != " "  # the template's generation prompt replaces target_delimiter
        assert ours["tiny_mc_prefix"][0][0][0].endswith("<|im_start|>assistant\nAnswer:")
        assert ours["tiny_mc_prefix"][0][0][1][0] == " "  # ... except after a gen_prefix without trailing space
    else:
        assert first.startswith(SYSTEM + "Question:")  # lm-eval's plain-text system turn has no separator
    if options["system_instruction"]:
        assert SYSTEM in first
    assert ours["tiny_ppl"] == [[[r[0][0]]] for r in ref["tiny_ppl"]]  # rolling requests are never templated


@pytest.mark.parametrize("multiturn", [True, False])
def test_named_template_is_the_one_rendered(world, multiturn):
    """``--apply-chat-template alt`` renders the tokenizer's ``alt`` template: the prompts lm-eval builds when that
    template is the tokenizer's own (lm-eval 0.4.13 records the name but renders the default template). ``alt``
    refuses the system role: the prompt is rendered again without the system turn, as lm-eval does."""
    names = ["tiny_mc3", "tiny_mc_prefix", "tiny_wino", "tiny_gen_prefix"]
    fmt = prompt_format(world["toks"]["chat"], "alt", fewshot_as_multiturn=multiturn, system_instruction=SYSTEM)
    ours = hfx_requests(world, names, fmt)
    ref = lm_eval_requests(world, world["toks"]["alt"], names, True, multiturn, SYSTEM)
    assert ours == ref
    assert ours["tiny_mc3"][0][0][0].startswith("<|endoftext|>[user] ") and SYSTEM not in ours["tiny_mc3"][0][0][0]
    default = hfx_requests(world, names, prompt_format(world["toks"]["chat"], True, multiturn, SYSTEM))
    assert default["tiny_mc3"][0][0][0].startswith("<|im_start|>system\n")

    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=world["model"], tokenizer=world["toks"]["chat"], batch_size=1)
    assert fmt.config()["chat_template"] == lm.chat_template("alt") == ALT
    assert prompt_format(world["toks"]["chat"], True).config()["chat_template"] == lm.chat_template(True) == CHATML


def _parity(world, names, tok_name, ref_tok_name, options, model_name="chat"):
    tok, ref_tok = world["toks"][tok_name], world["toks"][ref_tok_name]
    results, records = evaluate(world["model"], names, tokenizer=tok, include_path=world["tasks"], limit=LIMIT,
                                cache_dir=False, progress=False, return_records=True, bootstrap_iters=0, **options)
    ref_options = {**options, "apply_chat_template": bool(options.get("apply_chat_template"))}
    ref = lm_eval_reference(world["model"], ref_tok, world["tasks"], names, limit=LIMIT, bootstrap_iters=0,
                            **ref_options)  # no bootstrap: perplexity's 100 000 resamples are not under test here
    for name in names:
        samples = sorted(ref["samples"][name], key=lambda s: s["doc_id"])
        ours = [r for r in records[name] if r.get("filter", "none") == "none"]
        assert len(samples) == len(ours) == LIMIT
        for sample, record in zip(samples, ours):
            if name.startswith("tiny_gen"):
                assert record["arguments"][0][0] == sample["arguments"][0][0]
                assert record["resps"][0] == sample["resps"][0][0]
                continue
            assert [list(a) for a in sample["arguments"]] == record["arguments"]
            if name == "tiny_ppl":
                assert record["resps"][0] == pytest.approx(sample["resps"][0][0], abs=1e-5)
                continue
            assert [ll for ll, _ in record["resps"]] == pytest.approx([r[0][0] for r in sample["resps"]], abs=1e-5)
            assert [g for _, g in record["resps"]] == [bool(r[0][1]) for r in sample["resps"]]
        for metric, value in ref["results"][name].items():
            if metric.split(",")[0] in ("acc", "acc_norm", "exact_match", "acc_stderr", "acc_norm_stderr"):
                assert results["results"][name][metric] == value, (name, metric)
    return results


def test_chat_scores_equal_lm_eval_multiturn_with_system(world):
    names = ["tiny_mc3", "tiny_mc_prefix", "tiny_wino", "tiny_ll", "tiny_gen_prefix"]
    options = dict(apply_chat_template=True, fewshot_as_multiturn=True, system_instruction=SYSTEM)
    results = _parity(world, names, "chat", "chat", options)
    from hfx.evaluation.chat import _sha256

    assert results["chat_template"] == CHATML and results["chat_template_sha"] == _sha256(CHATML)
    assert results["system_instruction"] == SYSTEM and results["system_instruction_sha"] == _sha256(SYSTEM)
    assert results["fewshot_as_multiturn"] is True


def test_chat_scores_equal_lm_eval_named_single_turn(world):
    """The ``alt`` template starts with the BOS string: neither harness adds a second BOS token."""
    names = ["tiny_mc_first", "tiny_mc0", "tiny_gen3"]
    _parity(world, names, "chat", "alt", dict(apply_chat_template="alt", fewshot_as_multiturn=False))
    from hfx.evaluation.scorer import CausalLMScorer

    tok = world["toks"]["chat"]
    scorer = CausalLMScorer(world["model"], tok, add_bos_token=True)
    prompt = hfx_requests(world, ["tiny_mc0"], prompt_format(tok, "alt"))["tiny_mc0"][0][0][0]
    assert scorer.encode(prompt)[:2] == [tok.bos_token_id, *tok.encode(prompt[len(tok.bos_token):])[:1]]


def test_defaults_leave_prompts_untouched(world):
    tok = world["toks"]["chat"]
    assert prompt_format(tok) is None
    assert prompt_format(tok, False, None, None) is None and prompt_format(tok, False, False, "") is None
    assert prompt_format(tok, True).fewshot_as_multiturn is True  # lm-eval's default under a template
    plain = hfx_requests(world, ["tiny_mc3", "tiny_gen_prefix"], None)
    ref = lm_eval_requests(world, tok, ["tiny_mc3", "tiny_gen_prefix"], False, False, None)
    assert plain == ref


def test_bad_options_are_one_line_errors(world):
    toks = world["toks"]
    cases = [
        (dict(tokenizer=toks["plain"], apply_chat_template=True), r"has no chat template; evaluate without"),
        (dict(tokenizer=toks["chat"], apply_chat_template="chatml"), r"no chat template named 'chatml'; it has: alt, "
                                                                      r"default\."),
        (dict(tokenizer=toks["alt"], apply_chat_template="chatml"), r"has a single template \('default'\)"),
        (dict(tokenizer=toks["chat"], fewshot_as_multiturn=True), r"--fewshot-as-multiturn needs "
                                                                   r"--apply-chat-template"),
        (dict(tokenizer=toks["chat"], apply_chat_template=1), r"apply_chat_template must be True, False or a"),
        (dict(tokenizer=toks["chat"], system_instruction=3), r"system_instruction must be a string"),
    ]
    for kwargs, message in cases:
        with pytest.raises(EvaluationInputError, match=message) as info:
            prompt_format(**kwargs)
        assert "\n" not in str(info.value)
    no_default = type(toks["chat"]).from_pretrained(world["folders"]["chat"])
    no_default.chat_template = {"a": CHATML, "b": ALT}
    with pytest.raises(EvaluationInputError, match=r"several chat templates and none is named 'default'; name one: "
                                                   r"a, b\."):
        prompt_format(no_default, True)

def test_evaluate_refuses_before_the_model_runs(world, monkeypatch):
    def forward(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(world["model"], "forward", forward)
    for options, message in ((dict(apply_chat_template=True), "has no chat template"),
                             (dict(fewshot_as_multiturn=True), "needs --apply-chat-template")):
        with pytest.raises(EvaluationInputError, match=message):
            evaluate(world["model"], ["tiny_mc0"], tokenizer=world["toks"]["plain"], include_path=world["tasks"],
                     cache_dir=False, progress=False, **options)


def test_message_helpers_follow_lm_eval():
    from lm_eval.api.utils import Message as LmMessage
    from lm_eval.api.utils import maybe_delimit, multiturn_to_singleturn

    for a, b in [("x", "y"), ("x ", "y"), ("x", " y"), ("", "y"), ("x", ""), (None, "y"), ("x", None)]:
        assert join_delimited(a, b, "--") == maybe_delimit(a, b, "--")
    turns = [("system", "S", ""), ("user", "q1", " "), ("assistant", "a1", "\n\n"), ("user", "q2", " "),
             ("assistant", "A:", "")]
    for cut in (len(turns), len(turns) - 1):
        for start in (0, 1):
            ours = single_turn([Message(*t) for t in turns[start:cut]])
            assert ours == multiturn_to_singleturn([LmMessage(*t) for t in turns[start:cut]])
    assert PromptFormat().render([Message("user", "q", " "), Message("assistant", "A:")]) == "q A:"
    json.dumps(PromptFormat(system_instruction="s").config())  # results-JSON ready


def test_class_task_gets_the_chat_options(world, tmp_path):
    """A ``class:`` task (--allow-code) builds its own requests: lm-eval's chat options reach its build_all_requests."""
    from tests.test_eval import MC

    (tmp_path / "cls.py").write_text(
        "from lm_eval.api.task import ConfigurableTask\n\n\nclass Passthrough(ConfigurableTask):\n"
        "    def __init__(self, config=None):\n"
        "        super().__init__(config={k: v for k, v in config.items() if k != 'class'})\n")
    (tmp_path / "cls.yaml").write_text(
        MC.format(name="cls_chat", root=world["root"], splits="training_split: train\ntest_split: test", k=2)
        + "class: !function cls.Passthrough\n")
    fmt = prompt_format(world["toks"]["chat"], True, system_instruction=SYSTEM)
    prepared = plan(["cls_chat"], include_path=[tmp_path], limit=LIMIT, prompt_format=fmt, allow_code=True)
    task = prepared.tasks["cls_chat"]
    _, docs, _, contexts = prepared.prepared["cls_chat"]
    records = OUTPUT_TYPES[task.output_type].run(task, docs, contexts, Recorder())
    ours = [[list(a) for a in r["arguments"]] for r in records]

    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    lm = HFLM(pretrained=world["model"], tokenizer=world["toks"]["chat"], batch_size=4)
    (ref_task,) = get_task_dict(["cls_chat"], TaskManager(include_path=str(tmp_path), include_defaults=False)).values()
    ref_task.set_fewshot_seed(seed=1234)
    ref_task.build_all_requests(limit=LIMIT, apply_chat_template=True, fewshot_as_multiturn=True,
                                system_instruction=SYSTEM, chat_template=lm.apply_chat_template)
    by_doc = defaultdict(list)
    for instance in ref_task.instances:
        by_doc[instance.doc_id].append(list(instance.arguments))
    assert ours == [by_doc[i] for i in sorted(by_doc)]
    assert ours[0][0][0].startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>")
