"""Hostile and broken task files: every one is a clear TaskError, found quickly and in bounded memory.

Covers the YAML loader (alias bombs, self-referencing aliases, include chains, cycles and
directories, size, encoding), the Jinja sandbox's limits (steps, sizes, integers, recursion),
``!function`` confinement to the task folder, one broken file in an include path, and local data
files that are empty, malformed or not UTF-8. Memory is measured with tracemalloc (Python
allocations, which is where an alias bomb or ``'a' * 10**9`` would land).
"""

import re
import time
import tracemalloc
import warnings
from pathlib import Path

import pytest
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from hfx.evaluation import Task, TaskConfig, TaskError, TaskIndex, find_tasks
from hfx.evaluation import templates
from hfx.evaluation.templates import TemplateLimitError, load_yaml, render

MB = 2**20
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: multiple_choice
doc_to_text: {text}
doc_to_target: label
doc_to_choice: choices
"""


def peak_of(fn):
    """(exception raised by fn or None, peak traced memory in bytes)."""
    tracemalloc.start()
    try:
        try:
            fn()
            raised = None
        except Exception as exc:  # noqa: BLE001 - returned to the test, which checks its type
            raised = exc
        return raised, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        ref = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{','.join([ref] * 9)}]")
    return "task: laughs\n" + "\n".join(lines) + "\n"


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"q": "one", "choices": ["a", "b"], "label": 0}\n'
                    '{"q": "two", "choices": ["c", "d"], "label": 1}\n')
    return path


# -- YAML -----------------------------------------------------------------------------------------
def test_billion_laughs_is_refused_before_it_is_built(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(billion_laughs())
    assert len(path.read_bytes()) < 800  # the size of the probe: 9**9 = 387 million strings once expanded
    raised, peak = peak_of(lambda: load_yaml(path))
    assert isinstance(raised, TaskError)
    assert str(path) in str(raised) and "expands to more than 20000 YAML nodes" in str(raised)
    assert peak < 20 * MB


def test_moderate_aliases_still_load(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text('task: ok\nshared: &s {until: ["\\n"], max_gen_toks: 8}\ngeneration_kwargs: *s\nother: [*s, *s]\n')
    data = load_yaml(path)
    assert data["generation_kwargs"] == {"until": ["\n"], "max_gen_toks": 8}
    assert data["other"] == [data["shared"], data["shared"]]


def test_brackets_inside_strings_are_not_nesting(tmp_path):
    import lm_eval

    path = tmp_path / "quoted.yaml"
    path.write_text('task: quoted\ntext: "' + "[{" * 200 + '"\n')
    assert load_yaml(path)["text"] == "[{" * 200
    # lm-eval's Dyck-language prompts are long runs of brackets in quoted strings
    dyck = load_yaml(Path(lm_eval.__file__).parent / "tasks" / "bbh" / "cot_fewshot" / "dyck_languages.yaml")
    assert dyck["task"] == "bbh_cot_fewshot_dyck_languages"


@pytest.mark.parametrize("body", ["task: x\nloop: &l [1, *l]\n", "task: x\nloop: &m {k: *m}\n"])
def test_self_referencing_alias_is_refused(tmp_path, body):
    path = tmp_path / "self.yaml"
    path.write_text(body)
    with pytest.raises(TaskError, match=r"self\.yaml: has an alias that contains itself \(line 2\)"):
        load_yaml(path)


@pytest.mark.parametrize("content, message", [
    (b"task: x\ndoc_to_text: [unclosed\n", r"not valid YAML: while parsing a flow sequence"),
    (b"task: caf\xe9\n", r"not UTF-8 text \(byte 9: b'\\xe9'\)"),
    (b"- a\n- b\n", r"a task file must be a YAML mapping, got list"),
    (b"", r"a task file must be a YAML mapping, got NoneType"),
    (b"task: x\nd: " + b"[" * 500_000 + b"]" * 500_000, r"nested more than 64 levels deep \(line 2\)"),
    (b"task: x\nd: " + b"[ {a: " * 40 + b"}]" * 40, r"nested more than 64 levels deep \(line 2\)"),
    (b"task: x\nd:\n" + b"".join(b" " * i + b"- \n" for i in range(1, 300)), r"nested more than 64 levels deep"),
])
def test_unreadable_yaml_names_the_file(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(TaskError, match=message) as info:
        load_yaml(path)
    assert str(info.value).startswith(str(path))


def test_oversized_yaml_and_directories_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.yaml"
    path.write_text("task: big\npad: '" + "x" * 2000 + "'\n")
    monkeypatch.setattr(templates, "MAX_YAML_BYTES", 1000)
    with pytest.raises(TaskError, match=r"big\.yaml: 20\d\d bytes, more than the 1000 a task file may have"):
        load_yaml(path)
    with pytest.raises(TaskError, match="is a directory, not a task file"):
        load_yaml(tmp_path)


def test_large_flat_yaml_is_refused_while_it_is_read(tmp_path, monkeypatch):
    # no aliases: a long flat list. 2 MB of it is over the size limit (1 MiB: lm-eval's largest task
    # file has 63 KB); under it, reading stops at the node limit, with a message that blames no alias
    two_mb = tmp_path / "flat2mb.yaml"
    two_mb.write_text("task: x\na: [" + "1," * 10**6 + "1]\n")
    started = time.monotonic()
    with pytest.raises(TaskError, match=r"flat2mb\.yaml: 2000015 bytes, more than the 1048576 a task file may have"):
        load_yaml(two_mb)
    assert time.monotonic() - started < 1
    flat = tmp_path / "flat.yaml"
    flat.write_text("task: x\na: [" + "1," * 300_000 + "1]\n")  # 600 KB, 300 000 nodes
    monkeypatch.setattr(templates, "MAX_YAML_NODES", 5_000)  # keeps the test short: PyYAML reads ~20 000 nodes/s
    started = time.monotonic()
    raised, peak = peak_of(lambda: load_yaml(flat))
    assert isinstance(raised, TaskError), raised
    assert re.fullmatch(rf"{re.escape(str(flat))}: has more than 5000 YAML nodes \(keys, values, lists and mappings; "
                        r"stopped at line 2\); refused\.", str(raised)), str(raised)
    assert time.monotonic() - started < 5 and peak < 20 * MB  # was: all 300 000 composed (70 s, 190 MB)


def test_alias_expansion_is_counted_while_the_file_is_read(tmp_path):
    # the bomb is refused as soon as it is composed: the broken YAML after it is never reached
    path = tmp_path / "laughs_then_broken.yaml"
    path.write_text(billion_laughs() + "broken: [unclosed\n")
    with pytest.raises(TaskError, match=r"expands to more than 20000 YAML nodes \(aliases repeat"):
        load_yaml(path)
    # under the limit, aliases of aliases load; the count is of the expansion, not of the text
    path.write_text(billion_laughs(4))  # 9**4 = 6561 strings
    assert len(load_yaml(path)["a3"]) == 9


def _chain(tmp_path, n):
    for i in range(n):
        body = f"include: link{i + 1}.inc\n" if i < n - 1 else "output_type: multiple_choice\n"
        (tmp_path / f"link{i}.inc").write_text(body)
    (tmp_path / "head.yaml").write_text("task: head\ninclude: link0.inc\n")


def test_include_chain_of_2000_is_refused(tmp_path):
    _chain(tmp_path, 2000)
    raised, peak = peak_of(lambda: TaskIndex([tmp_path], plugins=False).config("head"))
    assert isinstance(raised, TaskError)
    assert "head.yaml: include chain longer than 32 files" in str(raised)
    assert peak < 20 * MB


def test_short_include_chain_merges_nearest_last(tmp_path):
    _chain(tmp_path, 5)
    (tmp_path / "link2.inc").write_text("include: link3.inc\ndoc_to_text: '{{q}}'\n")
    config = TaskIndex([tmp_path], plugins=False).config("head")
    assert config.output_type == "multiple_choice" and config.doc_to_text == "{{q}}"


@pytest.mark.parametrize("files, message", [
    ({"a.yaml": "task: a\ninclude: a.yaml\n"}, r"a\.yaml: include cycle: .*a\.yaml -> .*a\.yaml"),
    ({"a.yaml": "task: a\ninclude: b.inc\n", "b.inc": "include: a.yaml\n"}, r"include cycle: .*a\.yaml -> .*b\.inc"),
    ({"a.yaml": "task: a\ninclude: sub\n", "sub/x.inc": "x: 1\n"}, r"include 'sub' is a directory"),
    ({"a.yaml": "task: a\ninclude: missing.inc\n"}, r"a\.yaml: include 'missing\.inc' not found"),
    ({"a.yaml": "task: a\ninclude: [b.inc]\n"}, r"include 'b\.inc' not found"),  # a list is lm-eval's too
    ({"a.yaml": "task: a\ninclude: [3]\n"}, r"include must name YAML files .*got \[3\]"),
])
def test_bad_includes_name_the_file(tmp_path, files, message):
    for name, body in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(body)
    with pytest.raises(TaskError, match=message):
        TaskIndex([tmp_path], plugins=False).config("a")


# -- one broken file in an include path -------------------------------------------------------------
def test_one_broken_file_does_not_hide_the_others(tmp_path, data_file):
    (tmp_path / "good.yaml").write_text(TASK.format(name="good", data=data_file, text="q"))
    (tmp_path / "broken.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    (tmp_path / "laughs.yaml").write_text(billion_laughs())
    (tmp_path / "latin1.yaml").write_bytes(b"task: caf\xe9\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = TaskIndex([tmp_path], plugins=False)
    skipped = sorted(str(w.message).split(" ")[3] for w in caught if "Skipping task file" in str(w.message))
    assert skipped == [str(tmp_path / f) for f in ("broken.yaml", "latin1.yaml", "laughs.yaml")]
    assert index.names() == ["good"]
    (task,) = [index.load(n) for n in index.expand(["good"])]
    assert [task.doc_to_text(d) for d in task.eval_docs()] == ["one", "two"]
    with pytest.raises(TaskError, match=r"Task 'broken' cannot be loaded: .*broken\.yaml: not valid YAML"):
        index.expand(["broken"])
    with pytest.raises(TaskError, match=r"Task 'laughs' cannot be loaded: .*laughs\.yaml: expands to more than"):
        index.expand(["laughs"])
    with pytest.raises(TaskError, match=r"Unknown task 'nothing'.*3 task file\(s\) could not be read: .*broken\.yaml"):
        index.expand(["nothing"])


# -- !function --------------------------------------------------------------------------------------
@pytest.fixture
def code_world(tmp_path, data_file):
    tasks = tmp_path / "tasks"
    (tasks / "sub").mkdir(parents=True)
    marker = tmp_path / "evil_ran"
    evil = f"open({str(marker)!r}, 'w').close()\ndef text(doc):\n    return 'evil'\n"
    (tmp_path / "evil.py").write_text(evil)
    (tasks / "sub" / "helpers.py").write_text("def text(doc):\n    return 'Q: ' + doc['q']\n")
    (tasks / "link.py").symlink_to(tmp_path / "evil.py")
    for name, ref in [("parent", "../evil.text"), ("absolute", f"{tmp_path / 'evil'}.text"),
                      ("symlink", "link.text"), ("inside", "sub/helpers.text"), ("missing", "sub/nothing.text"),
                      ("no_function", "sub/helpers.other")]:
        (tasks / f"{name}.yaml").write_text(TASK.format(name=name, data=data_file, text=f"!function {ref}"))
    return tasks, marker


def load_task(name, include_path):
    return TaskIndex([include_path], allow_code=True, plugins=False).load(name)


@pytest.mark.parametrize("name", ["parent", "absolute", "symlink"])
def test_function_outside_the_task_folder_is_refused(code_world, name):
    tasks, marker = code_world
    with pytest.raises(TaskError, match=rf"{name}\.yaml: !function .* resolves to .*evil\.py, outside the task folder"):
        load_task(name, tasks)
    assert not marker.exists()


def test_function_inside_the_task_folder_runs(code_world):
    tasks, marker = code_world
    task = load_task("inside", tasks)
    assert [task.doc_to_text(d) for d in task.eval_docs()] == ["Q: one", "Q: two"]
    with pytest.raises(TaskError, match=r"missing\.yaml: !function sub/nothing\.text: .*nothing\.py does not exist"):
        load_task("missing", tasks)
    with pytest.raises(TaskError, match=r"helpers\.py has no function 'other'"):
        load_task("no_function", tasks)
    assert not marker.exists()


def test_function_from_an_included_file_follows_the_include_path_root(tmp_path, data_file):
    shared, tasks = tmp_path / "shared", tmp_path / "tasks"
    shared.mkdir()
    tasks.mkdir()
    (shared / "utils.py").write_text("def text(doc):\n    return doc['q'].upper()\n")
    (shared / "base.inc").write_text("doc_to_text: !function utils.text\n")
    body = TASK.format(name="t", data=data_file, text="q").replace("doc_to_text: q\n", "")
    (tasks / "t.yaml").write_text(body + "include: ../shared/base.inc\n")
    with pytest.raises(TaskError, match=r"base\.inc: !function utils\.text resolves to .*outside the task folder"):
        load_task("t", tasks)
    task = load_task("t", tmp_path)  # the folder holding both is trusted
    assert task.doc_to_text({"q": "one"}) == "ONE"


# -- Jinja ------------------------------------------------------------------------------------------
HOSTILE = [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "loop iterations and calls"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}",
     "loop iterations and calls"),
    ("{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}",
     "loop iterations and calls"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recurses too deeply"),
    ("{{ 'a' * 10**9 }}", "a repeated value would be about 1000000000"),
    ("{{ [x] * 10**6 }}", "a repeated value"),
    ("{{ 'a'|center(10**9) }}", "the center filter with argument 1000000000"),
    ("{{ x.ljust(10**9) }}", "ljust\\(\\) with argument 1000000000"),
    ("{{ '%0999999999d' % 1 }}", "a %-formatted string with a width of 0999999999"),
    ("{{ '{:>999999999}'.format(1) }}", "format\\(\\) with a width of 999999999"),
    ("{{ '%s'|format(x * 5000) }}", "a repeated value"),
    ("{{ x|replace('a', x) }}", "the result of the replace filter"),
    ("{{ x|replace('', x) }}", "the result of the replace filter"),
    ("{{ x.replace('a', x) }}", "replace\\(\\)"),
    ("{{ ([x] * 5000)|join }}", "a repeated value"),
    ("{{ (x|list)|join(x) }}", "the result of the join filter"),
    ("{{ x.join(x|list) }}", "join\\(\\)"),
    ("{{ x|list|map('upper')|join(x) }}", "the result of the join filter"),
    ("{{ (x|list|join('\\n'))|indent(2000) }}", "the result of the indent filter"),
    ("{{ x|wordwrap(1, wrapstring=x) }}", "the result of the wordwrap filter"),
    ("{{ lipsum(10**6) }}", "generate_lorem_ipsum\\(\\)"),
    ("{{ [1]|batch(10**9, 0)|list }}", "the batch filter with argument 1000000000"),
    ("{{ 7 ** 1000000 }}", "a power would have about 3000000 bits"),
    ("{% set ns = namespace(s=x) %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "a concatenated string"),
    ("{% set a = x ~ x %}{% set b = a ~ a %}{% set c = b ~ b %}{% set d = c ~ c %}{% set e = d ~ d %}"
     "{% set f = e ~ e %}{% set g = f ~ f %}{% set h = g ~ g %}{% set i = h ~ h %}{% set j = i ~ i %}"
     "{% set k = j ~ j %}{% set l = k ~ k %}{{ l }}", "a concatenated string"),
    ("{% set s %}{% for i in range(100000) %}{{ x }}{% endfor %}{% endset %}{{ s|length }}", "the text written"),
    # widths from nested fields, resolved against the arguments before the call; their sum
    ("{{ '{a:>{b}}'.format_map({'a': 1, 'b': 10**8}) }}", "format_map\\(\\) with a width of 100000000"),
    ("{{ '{0[0]:>{1[0]}}'.format([1], [10**8]) }}", "format\\(\\) with a width of 100000000"),
    ("{{ '{0:>{1.b}}'.format(1, {'b': 10**8}) }}", "format\\(\\) with a width of 100000000"),
    ("{{ '{:>{}}'.format(1, '100000000') }}", "format\\(\\) with a width of 100000000"),
    ("{{ '{:.{p[n]}f}'.format(1.0, p={'n': 10**8}) }}", "format\\(\\) with a width of 100000000"),
    ("{{ ('{0:>4000000}' * 30).format(1) }}", "format\\(\\) would be about 1200000"),
    ("{{ ('%4000000s' * 30) % ((1,) * 30) }}", "a %-formatted string would be about 120000"),
    ("{{ ('%*d' * 30) % ((4000000, 1) * 30) }}", "a %-formatted string would be about 120000"),
    ("{{ ('%(a)4000000s' * 30)|format(a=1) }}", "the format filter would be about 120000"),
    ("{{ x|regex_replace('a', x) }}", "the result of the regex_replace filter"),
    ("{{ x|regex_replace('(a)', '\\\\1' * 2000) }}", "the result of the regex_replace filter"),
]


@pytest.mark.parametrize("template, message", HOSTILE, ids=[t[:40] for t, _ in HOSTILE])
def test_hostile_template_is_refused_quickly_in_bounded_memory(template, message, monkeypatch):
    # the step limit, not the time limit (tested below), must stop the loops, however busy the machine
    monkeypatch.setattr(templates.TEMPLATE_LIMITS, "max_seconds", 120.0)
    doc = {"x": "a" * 3000}
    steps = "loop iterations" in message  # tracemalloc slows Python down; the loops allocate nothing
    raised, peak = (render_error(template, doc), 0) if steps else peak_of(
        lambda: render(template, doc, where="Task 'hostile': doc_to_text"))
    assert isinstance(raised, TemplateLimitError), raised
    assert str(raised).startswith("Task 'hostile': doc_to_text")
    assert re.search(message, str(raised)), str(raised)
    assert peak < 64 * MB


def render_error(template, doc):
    try:
        render(template, doc, where="Task 'hostile': doc_to_text")
    except Exception as exc:  # noqa: BLE001 - checked by the caller
        return exc
    return None


def test_limit_error_names_task_and_field(data_file, tmp_path):
    config = TaskConfig(task="loops", dataset_path="json", dataset_kwargs={"data_files": {"test": str(data_file)}},
                        test_split="test", output_type="multiple_choice", doc_to_text="q", doc_to_target="label",
                        doc_to_choice="{% for i in range(100000) %}{% for j in range(9) %}{% endfor %}{% endfor %}")
    task = Task(config)
    with pytest.raises(TemplateLimitError, match=r"^Task 'loops': doc_to_choice: more than 100000 loop iterations"):
        task.validate(0)


def test_time_limit_stops_slow_templates(monkeypatch):
    monkeypatch.setattr(templates.TEMPLATE_LIMITS, "max_seconds", 0.0)
    with pytest.raises(TemplateLimitError, match=r"rendering took longer than 0 s"):
        render("{% for c in x %}{{ c }}{% endfor %}", {"x": "abc"})


def test_lazy_filters_count_the_items_they_produce(monkeypatch):
    monkeypatch.setattr(templates.TEMPLATE_LIMITS, "max_seconds", 120.0)  # the step limit must stop it
    raised, peak = peak_of(lambda: render("{{ ('a' * 4000000)|batch(1)|list|length }}", {}))
    assert isinstance(raised, TemplateLimitError) and "more than 100000 loop iterations" in str(raised), raised
    assert peak < 64 * MB  # was: all 4 000 000 batches built (~400 MB), then refused for time
    # a loop over a lazy filter counts each item once
    assert render("{% for c in x|map('upper') %}{% endfor %}ok", {"x": "a" * 60_000}) == "ok"


def test_filters_reading_a_long_input_stop_at_the_deadline(monkeypatch):
    monkeypatch.setattr(templates.TEMPLATE_LIMITS, "max_seconds", 0.2)
    started = time.monotonic()
    with pytest.raises(TemplateLimitError, match=r"rendering took longer than 0\.2 s"):
        render("{{ x|select('equalto', 'b')|list|length }}", {"x": "a" * 4_000_000})  # selects nothing: no step
    assert time.monotonic() - started < 1.5


def test_regex_replace_is_bounded_by_the_time_limit(monkeypatch):
    monkeypatch.setattr(templates.TEMPLATE_LIMITS, "max_seconds", 0.5)
    started = time.monotonic()
    with pytest.raises(TemplateLimitError, match=r"rendering took longer than 0\.5 s \(in regex_replace\)"):
        render("{{ ('a' * 28 + 'b')|regex_replace('(a|a)+c', '') }}", {})  # 2**28 paths for a backtracking engine
    assert time.monotonic() - started < 5  # the regex module's timeout is CPU time: longer wall time on a busy machine
    # the report's pattern: re backtracks for hours, the regex module not at all
    assert render("{{ ('a' * 28 + 'b')|regex_replace('(a+)+c', '') }}", {}) == "a" * 28 + "b"


@pytest.mark.parametrize("pattern, repl, count", [
    ("[aeiou]", "*", 0), (r"(\w+) (\w+)", r"\2 \1", 0), ("x*", "-", 0), ("", "|", 0), (r"\s+", " ", 0),
    (r"(?P<w>b\w)", r"<\g<w>>", 0), ("a", r"\g<0>\g<0>", 2), (r"(\d)", r"\n\1\t", 0), ("(?i)CAT", "dog", 0),
    (r"^\s+|\s+$", "", 0), (r"(a)|b", r"[\1]", 0), (r"é|\bba", "§", 1), (r"(?m)^(\w)", r"\1\1", 0),
])
def test_regex_replace_gives_what_re_sub_gives(pattern, repl, count):
    text = " Cat  bat\tbanana 42 caté ab\nbe\n"
    expected = re.sub(pattern, repl, text, count=count)
    assert render("{{ t|regex_replace(p, r, c) }}", {"t": text, "p": pattern, "r": repl, "c": count}) == expected


def test_document_size_is_not_held_against_the_template():
    long_text = "word " * 2_000_000  # 10 M characters, over the 4 Mi limit on what a template builds
    assert render("Passage: {{ text }}\nAnswer:", {"text": long_text}) == f"Passage: {long_text}\nAnswer:"


@pytest.mark.parametrize("template, message", [
    ("{{ 1 / 0 }}", r"'\{\{ 1 / 0 \}\}' failed: ZeroDivisionError: division by zero"),
    ("{{ [1] + 1 }}", r"failed: TypeError: can only concatenate list"),
    ("{% for %}", r"is not a valid Jinja template: Expected an expression"),
    ("{{ x.__class__ }}", r"the template sandbox refused it: access to attribute '__class__'"),
])
def test_template_errors_are_task_errors_naming_the_field(template, message):
    with pytest.raises(TaskError, match=message) as info:
        render(template, {"x": "a"}, where="Task 't': doc_to_text")
    assert str(info.value).startswith("Task 't': doc_to_text")


# lm-eval-style templates: the bounded environment renders exactly what Jinja's own sandbox renders
ORDINARY = [
    "Question: {{question}}\nAnswer:",
    "{{ passage }}\nQuestion: {{ question }}?\nAnswer:",
    "{% for c in choices %}{{ 'ABCD'[loop.index0] }}. {{ c }}\n{% endfor %}Answer:",
    "{{ choices|join(', ') }} | {{ choices|length }} | {{ question|upper|trim }} | {{ question.split()|list }}",
    "{{ [question, 'x']|map('lower')|join('-') }}{{ label + 1 }}{{ 'A' * 3 }}{{ '%s=%d' % (question, label) }}",
    "{% set ns = namespace(t='') %}{% for c in choices %}{% set ns.t = ns.t ~ c[0] %}{% endfor %}{{ ns.t }}",
    "{% macro opt(i, c) %}({{ i }}) {{ c|title }}{% endmacro %}{% for c in choices %}{{ opt(loop.index, c) }} {% endfor %}",
    "{% set head %}Q{{ label }}: {% endset %}{{ head }}{{ question|replace(' ', '_') }}{{ '{:>5}'.format(label) }}",
    "{{ question|regex_replace('[aeiou]', '*') }} {{ choices|map('length')|sum }} {{ 2 ** 10 }} {{ choices[label] }}\n",
    "{{ ['x', 'y'] + choices }} {{ (choices|first)|center(12) }}|{{ range(3)|list }} {{ question[:4] ~ '…' }}",
    ("{{ choices|unique|list }} {{ choices|batch(2)|list }} {{ choices|sort|first }} {{ choices|map('upper')|join }}"
     " {% for b in choices|slice(2) %}{{ b }}{% endfor %} {{ choices|select('ne', 'cat')|list|length }}"),
    ("{{ choices|reverse|list }} {{ choices|reject('eq', 'cat')|map('title')|list }} {{ choices|map('length')|max }}"
     " {{ '{:>{}}|{}'.format('ab', 9, 'c') }} {{ '{a:^{w}}|{0[1]:>{1}}'.format(choices, 7, a='x', w=label) }}"
     " {{ '%*d|%-*s' % (4, label, 3, 'a') }}"),
]


@pytest.mark.parametrize("template", ORDINARY)
def test_ordinary_templates_render_as_in_jinjas_sandbox(template):
    doc = {"question": "Which is  a mammal", "passage": "Cats.\n", "choices": ["cat", "trout", "robin"], "label": 2}
    reference = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    reference.filters["regex_replace"] = lambda s, p, r, count=0: re.sub(p, r, s, count=count)
    assert render(template, doc) == reference.from_string(template).render(**doc)


# -- data files ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", b"", r"data file .*empty\.jsonl is empty"),
    ("blank.jsonl", b"\n  \n", r"data file .*blank\.jsonl has no records"),
    ("bad.jsonl", b'{"q": "a", "choices": ["x"], "label": 0}\n{"q": "b"\n',
     r"data file .*bad\.jsonl, line 2, is not valid JSON \(Expecting ',' delimiter"),
    ("list.jsonl", b'[1, 2]\n', r"data file .*list\.jsonl must hold a list of JSON objects"),
    ("line.jsonl", b'{"q": "a", "choices": ["x"], "label": 0}\n"just a string"\n',
     r"line\.jsonl, line 2, is a JSON str, not an object"),
    ("latin1.jsonl", b'{"q": "caf\xe9", "choices": ["x"], "label": 0}\n',
     r"data file .*latin1\.jsonl is not UTF-8 text \(byte 10: b'\\xe9'\)"),
    ("array.json", b'[{"q": 1}, ', r"array\.json is not valid JSON \(line 1"),
    ("latin1.csv", b"q,label\ncaf\xe9,0\n", r"latin1\.csv is not UTF-8 text \(byte 11"),
    ("ragged.csv", b"q,label\na,0\nb,1,extra\n",
     r"\(data files: .*ragged\.csv\): ParserError: Error tokenizing data\. C error: Expected 2 fields in line 3"),
    ("missing.jsonl", None, r"data file .*missing\.jsonl does not exist"),
])
def test_bad_data_files_are_one_error_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    config = TaskConfig(task="data", dataset_path="csv" if name.endswith(".csv") else "json",
                        dataset_kwargs={"data_files": {"test": str(path)}}, test_split="test",
                        output_type="multiple_choice", doc_to_text="q", doc_to_target="label", doc_to_choice="choices")
    with pytest.raises(TaskError, match=rf"^Task 'data': .*{message}"):
        Task(config).eval_docs()


def test_good_data_files_load(tmp_path, data_file):
    array = tmp_path / "docs.json"
    array.write_text('[{"q": "one", "choices": ["a"], "label": 0}]')
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + data_file.read_bytes())
    for path in (data_file, array, bom):
        config = TaskConfig(task="ok", dataset_path="json", dataset_kwargs={"data_files": {"test": str(path)}},
                            test_split="test", output_type="multiple_choice", doc_to_text="q", doc_to_target="label",
                            doc_to_choice="choices")
        assert Task(config).eval_docs()[0]["q"] == "one"


@pytest.mark.parametrize("content", [
    billion_laughs().encode(),
    b"task: x\nloop: &l [1, *l]\n",
    b"task: x\nd: " + b"[ {a: " * 40 + b"}]" * 40,
    b"task: x\nd:\n" + b"".join(b" " * i + b"- \n" for i in range(1, 300)),
    b"task: x\na: [" + b"1," * 30_000 + b"1]\n",
    billion_laughs(4).encode(),
    b"task: x\nanchors: &a {k: [1, 2]}\nuse: [*a, *a]\n",
])
def test_libyaml_and_pure_python_loaders_give_the_same_answer(tmp_path, monkeypatch, content):
    """libyaml (PyYAML's wheels) is checked on its event stream; the pure-Python loader is the fallback."""
    path = tmp_path / "same.yaml"
    path.write_bytes(content)

    def outcome():
        try:
            return "ok", load_yaml(path)
        except TaskError as exc:
            return "refused", str(exc)

    assert templates._CSafeLoader is not None  # the wheel this project pins ships libyaml
    with_libyaml = outcome()
    monkeypatch.setattr(templates, "_CSafeLoader", None)
    assert outcome() == with_libyaml


@pytest.mark.parametrize("value", ["lots", "-1", "1.5", "true"])
def test_a_bad_num_fewshot_is_one_line_naming_the_task(tmp_path, value):
    (tmp_path / "t.yaml").write_text(f"task: shots\ndataset_path: json\noutput_type: multiple_choice\nnum_fewshot: {value}\n")
    with pytest.raises(TaskError, match=r"Task 'shots' \(.*t\.yaml\): num_fewshot must be an integer >= 0"):
        find_tasks("shots", [tmp_path])
