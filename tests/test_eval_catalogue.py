"""The task catalogue against lm-eval 0.4.13's own: names, tags after ``include:``, groups, ``!function``, the cache.

One module-scoped folder of tiny json tasks (tags inherited through includes, an include list,
a tag inside a group, nested and inline groups, overrides, an inline task) is read by hfx's
:class:`TaskIndex` and by lm-eval's ``TaskManager``; the tests compare which tasks run, the group
trees and the merged configs.
"""

import json
import logging
import os

import pytest

from hfx.evaluation import TaskError, TaskIndex, find_tasks
from hfx.evaluation import catalogue
from hfx.evaluation.groups import GroupNode, TaskRef
from hfx.evaluation.templates import MissingPackageError

DATA = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {root}/test.jsonl
  cache_dir: {root}/hf-cache
test_split: test
"""
TEMPLATE = """tag: fam
output_type: multiple_choice
doc_to_text: "Q: {{question}}\\nA:"
doc_to_target: label
doc_to_choice: choices
num_fewshot: 0
metric_list:
  - metric: acc
"""
FILES = {
    "_template_yaml": TEMPLATE,
    "_extra_yaml": "tag: [fam, extra]\ndoc_to_text: \"extra {{question}}\"\ntarget_delimiter: ' '\n",
    "_data_yaml": "{data}",
    "a.yaml": "include: [_data_yaml, _template_yaml]\ntask: fam_a\n",
    # a list: later includes win over earlier ones, the file's own keys over all
    "b.yaml": "include: [_data_yaml, _template_yaml, _extra_yaml]\ntask: fam_b\ntarget_delimiter: '  '\n",
    "c/solo.yaml": "include: [../_data_yaml, ../_template_yaml]\ntask: solo\ntag: other\n",
    "c/solo2.yaml": "include: [../_data_yaml, ../_template_yaml]\ntask: solo2\ntag: []\n",
    "groups/inner.yaml": "group: inner\ntask: [fam]\naggregate_metric_list:\n  metric: acc\n  filter_list: none\n",
    "groups/outer.yaml": """group: outer
group_alias: Outer
task:
  - inner
  - task: solo
    num_fewshot: 1
  - task: inl
    {data_inline}
    output_type: multiple_choice
    doc_to_text: "inline {{{{question}}}}"
    doc_to_target: label
    doc_to_choice: choices
  - group: sub
    task: [solo2]
aggregate_metric_list:
  - metric: acc
    weight_by_size: false
metadata:
  version: 3
""",
    "groups/cycle.yaml": "group: cyc_a\ntask: [cyc_b]\n",
    "groups/cycle2.yaml": "group: cyc_b\ntask: [fam_a, cyc_a]\n",
    "groups/unknown.yaml": "group: has_typo\ntask: [fam_a, fam_zz]\n",
    "groups/bad_agg.yaml": "group: bad_agg\ntask: [fam_a]\naggregate_metric_list:\n  - metric: acc\n    aggregation: median\n",
    "py/pytask.yaml": "task: py_task\nclass: !function mytask.MyTask\n",
    "dup/x.yaml": "include: [../_data_yaml, ../_template_yaml]\ntask: dup\ntag: []\ndoc_to_text: first\n",
    "dup/y.yaml": "include: [../_data_yaml, ../_template_yaml]\ntask: dup\ntag: []\ndoc_to_text: second\n",
    "notes.yaml": "just: a mapping\n",
}


def _write(folder, files, root):
    """The files under ``folder``; ``{data}`` (and ``{data_inline}``, indented for a group's member) filled in."""
    data = DATA.format(root=root)
    for name, body in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if "{data" in body:
            body = body.format(data=data, data_inline="\n    ".join(data.strip().splitlines()))
        path.write_text(body)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalogue")
    with open(root / "test.jsonl", "w") as handle:
        for i in range(3):
            handle.write(json.dumps({"question": f"q{i}", "choices": ["x", "y"], "label": i % 2}) + "\n")
    tasks = root / "tasks"
    _write(tasks, FILES, root)
    return root, tasks


@pytest.fixture(scope="module")
def lm_manager(world):
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return TaskManager(include_path=str(world[1]), include_defaults=False)


@pytest.fixture(scope="module")
def index(world):
    return TaskIndex([world[1]], plugins=False)


def _names(node):
    """A resolved node as nested (name, [children]) tuples; leaves as names."""
    if isinstance(node, GroupNode):
        return (node.name, [_names(c) for c in node.children])
    return node.name


def _lm_names(obj):
    from lm_eval.api.group import Group

    if isinstance(obj, Group):
        return (obj.name, [_lm_names(c) for c in obj])
    return obj.task_name


# -- names: tags after include, include lists -----------------------------------------------------
def test_index_matches_lm_eval(index, lm_manager):
    from lm_eval.tasks._index import Kind

    kinds = {Kind.TASK: "task", Kind.PY_TASK: "task", Kind.GROUP: "group", Kind.TAG: "tag"}
    lm = {name: kinds[e.kind] for name, e in lm_manager.task_index.items()}
    assert {name: index.kind(name) for name in index.entries} == lm
    assert index.tags() == {"fam": ["fam_a", "fam_b"], "extra": ["fam_b"], "other": ["solo"]}
    assert index.kind("nothing") is None
    entry = index.entries["py_task"]
    assert (entry.kind, entry.class_name) == ("task", "mytask.MyTask")  # marked, never imported
    # duplicates: the first file in path order wins (lm-eval's rule), the other is recorded
    assert index.config("dup").doc_to_text == "first" == lm_manager.task_index["dup"].cfg["doc_to_text"]
    assert [(n, a.name, b.name) for n, a, b in index.duplicates] == [("dup", "x.yaml", "y.yaml")]
    listed = {e.name: (e.kind, e.output_type) for e in index.listing()}
    assert listed["fam_a"] == ("task", "multiple_choice") and listed["outer"] == ("group", None)


def test_tag_through_include_runs_what_lm_eval_runs(world, lm_manager):
    import lm_eval

    results = lm_eval.simple_evaluate(model="dummy", tasks=["fam"], task_manager=lm_manager, limit=2)
    lm_ran = sorted(results["results"])
    hfx_ran = sorted(t.name for t in find_tasks(["fam"], [world[1]]))
    assert hfx_ran == lm_ran == ["fam_a", "fam_b"]
    assert TaskIndex([world[1]], plugins=False).expand(["fam", "solo"]) == ["fam_a", "fam_b", "solo"]


def test_include_list_merges_like_lm_eval(index, world):
    from lm_eval.tasks._yaml_loader import load_yaml as lm_load

    lm = lm_load(world[1] / "b.yaml", resolve_func=False)
    config = index.config("fam_b")
    assert (config.doc_to_text, config.target_delimiter, config.tag) == (
        lm["doc_to_text"], lm["target_delimiter"], lm["tag"]) == ("extra {{question}}", "  ", ["fam", "extra"])
    assert config.dataset_path == "json" and config.output_type == "multiple_choice"


# -- groups -----------------------------------------------------------------------------------------
def test_nested_groups_resolve_like_lm_eval(index, lm_manager):
    loaded = lm_manager.load(["outer"])
    (node,) = index.resolve(["outer"])
    assert _names(node) == _lm_names(loaded["groups"]["outer"]) == (
        "outer", [("inner", ["fam_a", "fam_b"]), "solo", "outer::inl", ("outer::sub", ["solo2"])])
    assert {g.name: [c.name for c in g.children] for _, g in [(0, node), *node.walk()]
            if isinstance(g, GroupNode)} == loaded["group_map"]
    assert (node.alias, node.version, node.source.endswith("outer.yaml")) == ("Outer", 3, True)
    (agg,) = node.aggregate_metric_list
    assert (agg.metric, agg.aggregation, agg.weight_by_size, agg.filter_list) == ("acc", "mean", False, None)
    inner = node.children[0]
    assert [(a.metric, a.filter_list, a.weight_by_size) for a in inner.aggregate_metric_list] == [
        ("acc", ("none",), True)]
    # leaves: the overrides the group wrote, merged over the task's config as lm-eval merges them
    refs = {ref.name: ref for ref in node.task_refs()}
    for name, task in loaded["tasks"].items():
        config = index.config(refs[name])
        assert config.task == name
        assert config.num_fewshot == task.config.num_fewshot
        assert config.doc_to_text == task.config.doc_to_text
    assert index.config(refs["solo"]).num_fewshot == 1 and index.config("solo").num_fewshot == 0
    assert index.config(refs["outer::inl"]).doc_to_text == "inline {{question}}"
    # a top-level tag is its tasks, in lm-eval's (sorted) order; a task a TaskRef
    assert index.resolve(["fam", "solo"]) == [TaskRef("fam_a"), TaskRef("fam_b"), TaskRef("solo")]


@pytest.mark.parametrize("name, message", [
    ("cyc_a", r"Group cycle: cyc_a -> cyc_b -> cyc_a"),
    ("has_typo", r"Group 'has_typo': member 'fam_zz' is not a known task, group or tag \(did you mean \[.*'fam_a'"),
    ("bad_agg", r"Group 'bad_agg': aggregation 'median' for 'acc' is not supported; lm-eval 0.4.13 accepts 'mean'"),
    ("fam_q", r"Unknown task 'fam_q'\. Did you mean \[.*'fam_a'"),
])
def test_bad_groups_and_names(index, name, message):
    with pytest.raises(TaskError, match=message):
        index.resolve([name])


def test_a_task_requested_twice_through_groups_is_refused(index, world):
    with pytest.raises(TaskError, match=r"Task 'fam_a' is requested twice: in 'inner' and in 'outer'"):
        index.resolve(["inner", "outer"])


def test_bundled_lm_eval_name_not_included_is_named(index):
    import lm_eval

    tasks_dir = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    with pytest.raises(TaskError) as raised:
        index.resolve(["mmlu"])
    assert f"mmlu is a group in lm-eval's bundled catalogue, which was not included: pass --include-path {tasks_dir}" \
        in str(raised.value)
    with pytest.raises(TaskError, match=r"arc_easy is a task in lm-eval's bundled catalogue"):
        index.resolve(["arc_easy"])


# -- !function --------------------------------------------------------------------------------------
FUNC_TASK = "include: [{up}_data_yaml, {up}_template_yaml]\ntask: {name}\ndoc_to_text: !function {ref}\n"


@pytest.fixture(scope="module")
def code_world(world):
    root = world[0]
    tasks = root / "code_tasks"
    _write(tasks, {"_data_yaml": "{data}", "_template_yaml": TEMPLATE}, root)
    (tasks / "pkg").mkdir()
    (tasks / "pkg" / "helpers.py").write_text("def text(doc):\n    return 'H: ' + doc['question']\n")
    (tasks / "needs.py").write_text("import hfx_no_such_package_xyz\ndef text(doc):\n    return ''\n")
    marker = root / "escaped_ran"
    (root / "x.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef b(doc):\n    return 'evil'\n")
    refs = {"dotted": "pkg.helpers.text", "installed": "lm_eval.api.metrics.mean", "escape": "../x.b",
            "missing_pkg": "needs.text", "nowhere": "nothere.helpers.text"}
    for name, ref in refs.items():
        (tasks / f"{name}.yaml").write_text(FUNC_TASK.format(up="", name=name, ref=ref))
    (tasks / "sub").mkdir()
    (tasks / "sub" / "deep.yaml").write_text(FUNC_TASK.format(up="../", name="deep", ref="pkg.helpers.text"))
    return tasks, marker


def test_dotted_function_from_the_task_folder_and_installed_modules(code_world):
    from lm_eval.api.metrics import mean

    tasks, marker = code_world
    index = TaskIndex([tasks], allow_code=True, plugins=False)
    task = index.load("dotted")
    assert [task.doc_to_text(d) for d in task.eval_docs()] == ["H: q0", "H: q1", "H: q2"]
    assert index.config("installed").doc_to_text is mean
    with pytest.raises(TaskError, match=r"deep\.yaml: !function pkg\.helpers\.text: neither .*sub/pkg/helpers\.py "
                                        r"nor an installed module 'pkg\.helpers' exists"):
        index.config("deep")  # relative to the YAML's own folder, as lm-eval resolves it
    with pytest.raises(TaskError, match=r"escape\.yaml: !function \.\./x\.b resolves to .*x\.py, outside the task"):
        index.config("escape")
    assert not marker.exists()
    with pytest.raises(MissingPackageError, match=r"needs the optional package 'hfx_no_such_package_xyz'") as raised:
        index.config("missing_pkg")
    assert raised.value.package == "hfx_no_such_package_xyz"
    with pytest.raises(TaskError, match=r"neither .*nothere/helpers\.py nor an installed module 'nothere\.helpers'"):
        index.config("nowhere")
    # indexing never imports: without allow_code the same names load as unresolved references
    assert TaskIndex([tasks], plugins=False).kind("escape") == "task"


# -- the index cache --------------------------------------------------------------------------------
def test_index_cache_is_reused_and_refreshed(world, tmp_path, monkeypatch):
    root = world[0]
    folder = tmp_path / "cached"
    _write(folder, {k: v for k, v in FILES.items() if not k.startswith(("groups/", "py/"))}, root)
    monkeypatch.setenv("HFX_EVAL_CACHE", str(tmp_path / "cache"))
    reads = []
    real = catalogue.load_yaml
    monkeypatch.setattr(catalogue, "load_yaml", lambda path, **kw: reads.append(os.path.basename(path)) or real(path, **kw))

    first = TaskIndex([folder], plugins=False)
    assert reads and list((tmp_path / "cache" / "task-index").glob("*.json"))
    reads.clear()
    second = TaskIndex([folder], plugins=False)
    assert reads == []  # nothing re-parsed
    assert second.tags() == first.tags() and second.names() == first.names()

    # a changed file is re-read (and only it)
    (folder / "a.yaml").write_text("include: [_data_yaml, _template_yaml]\ntask: fam_a\ntag: [fam, new]\n")
    third = TaskIndex([folder], plugins=False)
    assert [r for r in reads if r.endswith(".yaml")] == ["a.yaml"] and third.tags()["new"] == ["fam_a"]
    # a changed include is re-read with every file that includes it
    reads.clear()
    (folder / "_extra_yaml").write_text("tag: later\n")
    fourth = TaskIndex([folder], plugins=False)
    assert [r for r in reads if r.endswith(".yaml")] == ["b.yaml"] and "_extra_yaml" in reads
    assert fourth.tags()["later"] == ["fam_b"]
    # a corrupt cache is rebuilt, never trusted
    (cache,) = (tmp_path / "cache" / "task-index").glob("*.json")
    version = catalogue._cache_version()
    for text in ('{"version": "%s", "files": {"a.yaml": 7' % version,  # cut short
                 json.dumps({"version": version, "files": {"a.yaml": 7}, "deps": 3}),
                 json.dumps({"version": version, "deps": [], "files": {"a.yaml": {"stat": None, "deps": [5]}}})):
        cache.write_text(text)
        reads.clear()
        assert TaskIndex([folder], plugins=False).tags() == fourth.tags() and "a.yaml" in reads


def test_loading_many_tasks_parses_a_shared_include_once_and_runs_a_hook_file_once(tmp_path, monkeypatch):
    """lm-eval's catalogue shares include files and hook modules among hundreds of tasks each."""
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / "counter.txt").write_text("")
    (folder / "utils.py").write_text(
        "from pathlib import Path\n"
        "_log = Path(__file__).with_name('counter.txt')\n"
        "_log.write_text(_log.read_text() + 'x')\n"
        "def docs(dataset):\n    return dataset\n")
    (folder / "_base_yaml").write_text("dataset_path: json\noutput_type: multiple_choice\ntest_split: test\n"
                                       "process_docs: !function utils.docs\ndoc_to_text: q\ndoc_to_target: 0\n"
                                       "doc_to_choice: ['a', 'b']\nmetric_list:\n  - metric: acc\n")
    for i in range(5):
        (folder / f"t{i}.yaml").write_text(f"include: _base_yaml\ntask: shared_{i}\n")
    reads = []
    real = catalogue.load_yaml
    monkeypatch.setattr(catalogue, "load_yaml", lambda path, **kw: reads.append(os.path.basename(path)) or real(path, **kw))
    index = TaskIndex([folder], allow_code=True, plugins=False, cache=False)
    reads.clear()
    configs = [index.config(f"shared_{i}") for i in range(5)]
    assert reads.count("_base_yaml") == 1 and len(reads) == 6
    assert (folder / "counter.txt").read_text() == "x"  # the hook file ran once
    configs[0].metric_list[0]["metric"] = "changed"  # each task gets its own copy
    assert index.config("shared_1").metric_list[0]["metric"] == "acc"
    assert all(c.process_docs is configs[0].process_docs for c in configs)


def test_a_hook_file_that_exits_is_refused_not_the_end_of_the_run(tmp_path):
    folder = tmp_path / "exits"
    folder.mkdir()
    (folder / "utils.py").write_text("import sys\nsys.exit('needs swipl')\ndef docs(d):\n    return d\n")
    (folder / "t.yaml").write_text("task: exits\ndataset_path: json\noutput_type: multiple_choice\n"
                                   "process_docs: !function utils.docs\n")
    index = TaskIndex([folder], allow_code=True, plugins=False, cache=False)
    with pytest.raises(TaskError, match=r"called sys.exit\('needs swipl'\)"):
        index.config("exits")


def test_an_include_changed_during_a_scan_is_read_again_next_time(tmp_path, monkeypatch):
    folder = tmp_path / "race"
    folder.mkdir()
    (folder / "_base_yaml").write_text("tag: old_tag\n")
    (folder / "a.yaml").write_text("include: _base_yaml\ntask: race_a\n")
    (folder / "b.yaml").write_text("include: _base_yaml\ntask: race_b\n")
    monkeypatch.setenv("HFX_EVAL_CACHE", str(tmp_path / "cache"))
    real = catalogue._scan_file

    def scan_then_edit(file, root, parsed):
        record = real(file, root, parsed)
        if file.name == "a.yaml":  # the include changes after it was read for a.yaml
            os.utime(folder / "_base_yaml", ns=(1, 1))
            (folder / "_base_yaml").write_text("tag: new_tag\n")
        return record

    monkeypatch.setattr(catalogue, "_scan_file", scan_then_edit)
    TaskIndex([folder], plugins=False)
    monkeypatch.setattr(catalogue, "_scan_file", real)
    assert TaskIndex([folder], plugins=False).tags() == {"new_tag": ["race_a", "race_b"]}


@pytest.mark.parametrize("hook", ["doc_to_text: !function os.system", "process_docs: !function subprocess.run",
                                  "doc_to_text: !function builtins.eval"])
def test_standard_library_functions_are_not_hooks(tmp_path, hook):
    (tmp_path / "t.yaml").write_text(f"task: stdlib\ndataset_path: json\noutput_type: multiple_choice\n{hook}\n")
    with pytest.raises(TaskError, match="is a standard-library module"):
        find_tasks("stdlib", [tmp_path], allow_code=True)


def test_a_filter_from_code_must_be_a_class(tmp_path):
    (tmp_path / "t.yaml").write_text(
        "task: fn_filter\ndataset_path: json\noutput_type: generate_until\nfilter_list:\n  - name: f\n    filter:\n"
        "      - function: !function lm_eval.api.metrics.mean\n")
    with pytest.raises(TaskError, match="is a function; a filter given as code must be a class"):
        find_tasks("fn_filter", [tmp_path], allow_code=True)
