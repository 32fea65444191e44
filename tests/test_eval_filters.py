"""filter_list pipelines (hfx.evaluation.filters) against lm-eval 0.4.13 itself.

A tiny GPT-2 is trained for a few seconds to answer "question: <colour> <animal>" with "the answer
is <number>" (blue, green) or "it is <number>" (red), so the regex pipelines have real answers to
extract and to miss. Two local tasks (one with ``repeats: 3``) run through ``lm_eval.simple_evaluate``
and hfx; filtered responses, per-document scores and every ``exact_match,<filter>`` must agree.
Each filter function is also checked on hand-made responses, against known outputs and against
lm-eval's own filter classes.
"""

import json
import random
import warnings

import pytest
import torch

from hfx.evaluation import TaskError, evaluate, find_tasks, markdown_table
from hfx.evaluation.output_types import filtered_exact_match
from hfx.evaluation.filters import FILTERS, build_pipelines

ANIMALS = {"cat": "12", "dog": "7", "owl": "345", "fox": "28"}
FORMS = {"red": "it is", "blue": "the answer is", "green": "the answer is"}
DATA = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {root}/test.jsonl
output_type: generate_until
test_split: test
doc_to_text: "question: {{{{question}}}}\\nanswer:"
num_fewshot: 0
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 6
metric_list:
  - metric: exact_match
"""
NUMBERS = """task: tiny_numbers
doc_to_target: "{{answer}}"
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "the answer is (\\\\-?[0-9]+)"
      - function: take_first
  - name: flexible-extract
    filter:
      - function: regex
        regex_pattern: "(-?[$0-9.,]{2,})|(-?[0-9]+)"
        group_select: -1
      - function: take_first
  - name: normalised
    filter:
      - function: remove_whitespace
      - function: lowercase
      - function: regex
        regex_pattern: "is (\\\\d+)$"
        fallback: "none"
      - function: take_first
  - name: per-char
    filter:
      - function: regex
        regex_pattern: "is (\\\\d+)"
      - function: take_first
      - function: remove_whitespace
"""
FORMS_TASK = """task: tiny_forms
doc_to_target: "{{form}}"
repeats: 3
filter_list:
  - name: vote
    filter:
      - function: regex
        regex_pattern: "(\\\\w+) is (\\\\d+)"
      - function: map
        mapping_dict: {answer: long, it: short}
        default_value: other
      - function: take_first_k
        k: 2
      - function: majority_vote
      - function: take_first
  - name: shouted
    filter:
      - function: uppercase
      - function: regex
        regex_pattern: "(IT|ANSWER) IS"
      - function: lowercase
      - function: map
        mapping_dict: {answer: long}
        default_value: short
      - function: take_first
  - name: first-two
    filter:
      - function: regex
        regex_pattern: "(\\\\w+) is"
      - function: map
        mapping_dict: {answer: long, it: short}
        default_value: other
      - function: take_first_k
        k: 2
"""
TASKS = ["tiny_numbers", "tiny_forms"]


def _doc(rng):
    colour, animal = rng.choice(sorted(FORMS)), rng.choice(sorted(ANIMALS))
    return {"question": f"{colour} {animal}", "answer": ANIMALS[animal], "form": "short" if colour == "red" else "long",
            "text": f"question: {colour} {animal}\nanswer: {FORMS[colour]} {ANIMALS[animal]}"}


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "</s>", "question:", "answer:", "it", "the", "answer", "is", *FORMS, *ANIMALS, *ANIMALS.values()]
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", eos_token="</s>", bos_token="</s>")


def _trained_gpt2(tok):
    """150 full-batch AdamW steps (about 2 s on one thread): the model then answers in the trained forms."""
    from transformers import GPT2Config, GPT2LMHeadModel

    rng = random.Random(0)
    encoded = [tok(_doc(rng)["text"])["input_ids"] + [tok.eos_token_id] for _ in range(48)]
    width = max(map(len, encoded))
    ids = torch.tensor([e + [tok.eos_token_id] * (width - len(e)) for e in encoded])
    labels = torch.tensor([e + [-100] * (width - len(e)) for e in encoded])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is several times faster on a shared machine
    try:
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=2, n_head=4,
                            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        model = GPT2LMHeadModel(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(150):
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("filters")
    rng = random.Random(5)
    with open(root / "test.jsonl", "w") as handle:
        for i in range(12):
            doc = _doc(rng)
            if i % 4 == 3:  # a wrong gold now and then: exact_match must land strictly between 0 and 1
                doc["answer"], doc["form"] = "0", "other"
            handle.write(json.dumps(doc) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "numbers.yaml").write_text(DATA.format(root=root) + NUMBERS)
    (tasks / "forms.yaml").write_text(DATA.format(root=root) + FORMS_TASK)
    tok = _tokenizer()
    model = _trained_gpt2(tok)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    reference = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=4), tasks=TASKS,
                                        task_manager=manager, log_samples=True)
    with pytest.warns(UserWarning, match="per-char.*after take_first works, as in lm-eval, on the characters"):
        ours = evaluate(model, TASKS, tokenizer=tok, include_path=tasks, cache_dir=False, progress=False,
                        return_records=True)
    return {"root": root, "tasks": tasks, "model": model, "tok": tok, "reference": reference, "ours": ours}


FILTERS_OF = {"tiny_numbers": ["strict-match", "flexible-extract", "normalised", "per-char"],
              "tiny_forms": ["vote", "shouted", "first-two"]}


@pytest.mark.parametrize("task", TASKS)
def test_filtered_responses_and_scores_match_lm_eval(world, task):
    ref = world["reference"]
    results, records = world["ours"]
    assert [r["filter"] for r in records[task]][::12] == FILTERS_OF[task]
    for name in FILTERS_OF[task]:
        ref_samples = sorted((s for s in ref["samples"][task] if s["filter"] == name), key=lambda s: s["doc_id"])
        ours = [r for r in records[task] if r["filter"] == name]
        assert len(ref_samples) == len(ours) == 12
        for sample, record in zip(ref_samples, ours):
            assert sample["resps"] == [record["resps"]]
            assert sample["filtered_resps"] == [record["filtered_resps"]]
            assert sample["exact_match"] == record["metrics"]["exact_match"]
        for key in (f"exact_match,{name}", f"exact_match_stderr,{name}"):
            assert results["results"][task][key] == pytest.approx(ref["results"][task][key], abs=1e-12)
    expected = {f"exact_match{s},{f}" for f in FILTERS_OF[task] for s in ("", "_stderr")}
    assert {k for k in results["results"][task] if "," in k} == expected == {k for k in ref["results"][task] if "," in k}


def test_the_pipelines_had_something_to_extract(world):
    """Guards the parity test against a model that answers nothing: real matches, real misses, real scores."""
    results, records = world["ours"]
    numbers = {f: [r for r in records["tiny_numbers"] if r["filter"] == f] for f in FILTERS_OF["tiny_numbers"]}
    strict = [r["filtered_resps"] for r in numbers["strict-match"]]
    assert any(x.isdigit() for x in strict) and "[invalid]" in strict  # "it is 7" has no "the answer is"
    assert all(r["filtered_resps"].isdigit() for r in numbers["flexible-extract"])
    scores = results["results"]["tiny_numbers"]
    assert 0 < scores["exact_match,strict-match"] < scores["exact_match,flexible-extract"] < 1
    forms = {f: [r for r in records["tiny_forms"] if r["filter"] == f] for f in FILTERS_OF["tiny_forms"]}
    assert {r["filtered_resps"] for r in forms["vote"]} >= {"short", "long"}
    assert all(len(r["resps"]) == 3 and len(r["filtered_resps"]) == 2 for r in forms["first-two"])
    assert {tuple(r["filtered_resps"]) for r in numbers["per-char"]} >= {("1", "2"), ("7",)}
    assert 0 < results["results"]["tiny_forms"]["exact_match,vote"] < 1


def test_results_table_has_the_filter_column(world):
    results, _ = world["ours"]
    table = markdown_table(results).splitlines()
    assert table[0].split("|")[1:4] == [" Tasks ", " Version ", " Filter "]
    rows = [line for line in table if "exact_match" in line]
    assert len(rows) == 7
    start = next(i for i, row in enumerate(rows) if "| tiny_numbers |" in row)  # tasks sorted by name, as lm-eval
    assert "| tiny_numbers | Yaml | flexible-extract | 0 | exact_match |" in rows[start]
    assert rows[start + 1].startswith("|  |  | normalised | 0 | exact_match |")  # sorted as lm-eval's make_table
    assert world["ours"][0]["configs"]["tiny_forms"]["repeats"] == 3


# -- each filter on hand-made responses ------------------------------------------------------
def _run(steps, resps, doc=None):
    (pipeline,) = build_pipelines([{"name": "t", "filter": steps}])
    return pipeline.apply(resps, doc or {})


CASES = [
    ([{"function": "regex"}], ["so #### 1,234.", "none here"], ["1,234.", "[invalid]"]),
    ([{"function": "regex", "regex_pattern": r"(\d+)", "group_select": -1, "fallback": "?"}], ["1 and 22", "x"],
     ["22", "?"]),
    # several groups: findall gives tuples, the first non-empty group is kept, then stripped
    ([{"function": "regex", "regex_pattern": r"(-?[$0-9.,]{2,})|(-?[0-9]+)", "group_select": -1}],
     ["is 12 or 7", "is 12", "is 7 "], ["7", "12", "7"]),
    ([{"function": "regex", "regex_pattern": r"a(x)?|b( +)", "fallback": " F "}], ["a", "b  "], ["F", ""]),
    ([{"function": "regex", "regex_pattern": r"(\d*)-(\w+)"}], ["-x 5-y", "5-y -x"], ["x", "5"]),
    ([{"function": "regex", "regex_pattern": r"(\d*)-(\w+)", "group_select": -1}], ["-x 5-y"], ["5"]),
    ([{"function": "remove_whitespace"}], ["  a b \n", "c"], ["a b", "c"]),
    ([{"function": "lowercase"}], ["AbC"], ["abc"]),
    ([{"function": "uppercase"}], ["AbC"], ["ABC"]),
    ([{"function": "map", "mapping_dict": {"A": 1, "B": "two"}, "default_value": -1}], ["A", "B", "C"], [1, "two", -1]),
    ([{"function": "map", "mapping_dict": {"A": 1}}], ["A", "Z"], [1, None]),
    ([{"function": "take_first"}], ["x", "y"], "x"),
    ([{"function": "take_first_k", "k": 2}], ["x", "y", "z"], ["x", "y"]),
    ([{"function": "majority_vote"}], ["b", "a", "a", "b", "c"], ["b"]),  # a tie goes to the first seen
    ([{"function": "majority_vote"}], ["b", "a", "a"], ["a"]),
    ([{"function": "lowercase"}, {"function": "take_first"}], ["HI", "X"], "hi"),
    ([{"function": "take_first"}, {"function": "uppercase"}], ["hi"], ["H", "I"]),  # characters, as lm-eval
    ([{"function": "multi_choice_regex", "regex_pattern": r"\(([A-D])\)", "ignore_case": True,
       "ignore_punctuation": True}],
     ["It is (B).", "surely PARIS!", "Answer: C", "no idea", "Rome, not Paris"], ["B", "(B)", "(C)", "[invalid]", "(C)"]),
]
DOC = {"choices": ["London", "Paris", "Rome"]}


@pytest.mark.parametrize(("steps", "resps", "expected"), CASES, ids=lambda v: json.dumps(v)[:40])
def test_filter_functions_on_known_responses(steps, resps, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _run(steps, resps, DOC) == expected


@pytest.mark.parametrize(("steps", "resps", "expected"), CASES, ids=lambda v: json.dumps(v)[:40])
def test_filter_functions_agree_with_lm_eval_classes(steps, resps, expected):
    import lm_eval.filters  # noqa: F401  (registers lm-eval's filters)
    import lm_eval.filters  # noqa: F401  (registers the filters)
    from lm_eval.api.registry import get_filter

    out = [resps]
    for spec in steps:
        out = get_filter(spec["function"])(**{k: v for k, v in spec.items() if k != "function"}).apply(out, [DOC])
    assert next(iter(out)) == expected


def test_every_filter_function_is_covered():
    covered = {spec["function"] for steps, _, _ in CASES for spec in steps} | set(FAMILY_FILTERS)
    assert covered == set(FILTERS)


def test_exact_match_of_filtered_values_follows_lm_eval():
    assert filtered_exact_match("12", 12, {}) == 1.0  # gold cast to the response's type
    assert filtered_exact_match(["a", "b"], "a", {}) == 0.5  # a list scores its mean
    assert filtered_exact_match(["A"], ["x", "a"], {"ignore_case": True}) == 1.0
    assert filtered_exact_match(["a", "x"], ["x", "a"], {}) == 0.0  # paired as numpy broadcasts them
    assert filtered_exact_match(1, "1", {}) == 1.0
    with pytest.raises(TaskError, match="cannot be compared"):
        filtered_exact_match(None, "1", {})


# -- errors, before the model runs -----------------------------------------------------------
def _task_dir(tmp_path, body, name="bad"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "t.yaml").write_text(DATA.format(root=tmp_path) + f"task: {name}\ndoc_to_target: answer\n" + body)
    return folder


def test_unknown_filter_function_fails_when_the_task_loads(tmp_path):
    folder = _task_dir(tmp_path, "filter_list:\n  - name: f\n    filter:\n      - function: regx\n")
    with pytest.raises(TaskError, match=r"'bad'.*unsupported filter function 'regx'.*'majority_vote'.*'regex'"):
        find_tasks("bad", [folder])
    with pytest.raises(TaskError, match="regx"):  # object() is no model: nothing ran
        evaluate(object(), "bad", tokenizer=object(), include_path=folder, cache_dir=False)


@pytest.mark.parametrize(("body", "message"), [
    ("filter_list:\n  - name: f\n    filter:\n      - {function: regex, pattern: x}\n",
     r"got arguments \['pattern'\].*accepts \['regex_pattern', 'group_select', 'fallback'\]"),
    ("filter_list:\n  - name: f\n    filter:\n      - {function: regex, regex_pattern: '(x'}\n", "bad regular expression"),
    ("filter_list:\n  - name: f\n    filter:\n      - {function: take_first_k}\n", "'take_first_k' got arguments"),
    ("filter_list: strict\n", "non-empty list"),
    ("repeats: 4\ngeneration_kwargs: {until: ['x'], do_sample: true}\n", "do_sample: true"),
    ("repeats: 0\n", "positive integer"),
])
def test_unsupported_task_keys_fail_when_the_task_loads(tmp_path, body, message):
    folder = _task_dir(tmp_path, body)
    (folder / "utils.py").write_text("def f(resps, docs):\n    return resps\n\n\ndef process_results(doc, r):\n"
                                     "    return {'exact_match': 1.0}\n")
    for allow_code in (False, True):  # refused for what it is, not for running code
        with pytest.raises(TaskError, match=message):
            find_tasks("bad", [folder], allow_code=allow_code)


def test_filter_list_on_other_output_types_is_refused(tmp_path):
    folder = _task_dir(tmp_path, "output_type: loglikelihood\nfilter_list:\n  - name: f\n    filter: [{function: take_first}]\n")
    with pytest.raises(TaskError, match="generate_until tasks only"):
        find_tasks("bad", [folder])


def test_harmless_keys_still_load(tmp_path, recwarn):
    folder = _task_dir(tmp_path, "should_decontaminate: true\ndoc_to_decontamination_query: question\n"
                                 "task_alias: Bad\ntag: [x]\nmetadata: {version: 2}\nrepeats: 1\n"
                                 "process_results: not code, ignored by lm-eval too\n")
    (task,) = find_tasks("bad", [folder])
    assert [p.name for p in task.filters] == ["none"] and task.version == 2
    assert not [w for w in recwarn if "ignoring keys" in str(w.message)]
    folder = _task_dir(tmp_path, "frobnicate: 3\n", name="odd")
    with pytest.warns(UserWarning, match=r"ignoring keys \['frobnicate'\]"):
        find_tasks("odd", [folder])


# -- task code as filters (custom, filter classes) and lm-eval's task-family filters -----------
CODE_FILTERS = """
import re


class FirstWord:
    def __init__(self, lower=False):
        self.lower = lower

    def apply(self, resps, docs):
        out = []
        for rs, doc in zip(resps, docs):
            words = [(r.split() or [""])[0] for r in rs]
            out.append([w.lower() for w in words] if self.lower else words)
        return out


def rank_by_length(resps, docs):
    # looks across documents: each answer is replaced by its rank among all first answers
    lengths = sorted(len(rs[0]) for rs in resps)
    return [[str(lengths.index(len(rs[0])))] for rs in resps]
"""


def _code_filter_task(tmp_path, allow_code):
    folder = tmp_path / "code"
    folder.mkdir(exist_ok=True)
    (folder / "utils.py").write_text(CODE_FILTERS)
    (folder / "t.yaml").write_text(
        DATA.format(root=tmp_path) + "task: coded\ndoc_to_target: answer\nfilter_list:\n"
        "  - name: class\n    filter:\n      - function: !function utils.FirstWord\n        lower: true\n"
        "      - function: take_first\n"
        "  - name: custom\n    filter:\n      - {function: custom, filter_fn: !function utils.rank_by_length}\n"
        "      - function: take_first\n")
    return find_tasks("coded", [folder], allow_code=allow_code)


def test_task_code_filters_need_allow_code(tmp_path):
    with pytest.raises(TaskError, match=r"utils.FirstWord.*--allow-code"):
        _code_filter_task(tmp_path, allow_code=False)


def test_task_code_filters_see_every_document_as_lm_eval_calls_them(tmp_path):
    from lm_eval.filters import build_filter_ensemble

    (task,) = _code_filter_task(tmp_path, allow_code=True)
    resps = [["Seven dogs", "x"], ["twelve", "y"], ["An owl here", "z"]]
    docs = [{"answer": "7"}, {"answer": "12"}, {"answer": "345"}]
    ours = {p.name: p.apply_all(resps, docs) for p in task.filters}
    assert ours == {"class": ["seven", "twelve", "an"], "custom": ["1", "0", "2"]}
    for entry in task.config.filter_list:  # lm-eval's own ensemble on the same resolved functions
        components = [[step["function"], {k: v for k, v in step.items() if k != "function"}] for step in entry["filter"]]
        ensemble = build_filter_ensemble(entry["name"], components)
        theirs = [list(r) for r in resps]
        for make in ensemble.filters:
            theirs = list(make().apply(theirs, docs))
        assert theirs == ours[entry["name"]]
    # one document at a time (hfx's per-document path) is the same for the class, not for cross-document code
    assert [task.filters[0].apply(r, d) for r, d in zip(resps, docs)] == ours["class"]


def test_a_code_filter_that_drops_documents_is_named(tmp_path):
    from hfx.evaluation.filters import build_step

    class Bad:
        def apply(self, resps, docs):
            return resps[:-1]

    (pipeline,) = build_pipelines([{"name": "p", "filter": [{"function": Bad}]}], "t")
    with pytest.raises(TaskError, match="returned 1 filtered responses for 2 documents"):
        pipeline.apply_all([["a"], ["b"]], [{}, {}])
    with pytest.raises(TaskError, match="got arguments"):
        build_step(Bad, {"nope": 1}, "t")


FAMILY_FILTERS = ["regex_pos", "format_span"]  # checked against lm-eval's classes on random responses below


@pytest.mark.parametrize("name", FAMILY_FILTERS)
def test_task_family_filters_match_lm_eval(name):
    import lm_eval.filters  # noqa: F401  (registers the filters)
    from lm_eval.api.registry import get_filter

    rng = random.Random(5)
    words = ["Person: Ada", "LOC: kenya, uganda", "org: none", "date:  May $$ time: noon", "('dog', 'NOUN')",
             "('runs', 'VERB'), ('fast', 'ADV')", "nothing here", "Location : Paris\nCompany: ACME", "$$", ""]
    resps = [[" ".join(rng.sample(words, rng.randint(0, 3))) for _ in range(2)] for _ in range(40)]
    docs = [{} for _ in resps]
    (pipeline,) = build_pipelines([{"name": "p", "filter": [{"function": name}]}], "t")
    theirs = [list(r) for r in get_filter(name)().apply([list(r) for r in resps], docs)]
    assert pipeline.apply_all(resps, docs) == theirs
    assert any(r != ["invalid"] and r != "" for rs in theirs for r in rs)


def test_the_evaluator_runs_task_code_filters_once_over_every_document(world, tmp_path):
    """A `custom` filter_fn that looks across documents gets lm-eval's answer through `evaluate` too."""
    folder = tmp_path / "across"
    folder.mkdir()
    (folder / "utils.py").write_text("def count_docs(resps, docs):\n    return [[str(len(docs))] for _ in resps]\n")
    (folder / "t.yaml").write_text(
        DATA.format(root=world["root"]) + "task: across\ndoc_to_target: answer\nfilter_list:\n  - name: n\n    filter:\n"
        "      - {function: custom, filter_fn: !function utils.count_docs}\n      - function: take_first\n")
    _, records = evaluate(world["model"], "across", tokenizer=world["tok"], include_path=folder, allow_code=True,
                          cache_dir=False, progress=False, return_records=True, limit=5)
    assert [r["filtered_resps"] for r in records["across"]] == ["5"] * 5
