"""The bundled hub tasks (plugins/hfx_tasks/hub) against lm-eval 0.4.13's own task files, offline.

The real datasets need the hub, so each task runs here on a few synthetic documents written in
the real dataset's schema (json data_files). lm-eval's side is lm-eval itself: its YAML for the
task, loaded by lm-eval's loader (``include`` merged, ``!function`` imported: hellaswag's
``process_docs`` and COPA's ``doc_to_*`` run as Python), built as a ``ConfigurableTask`` with only
the dataset location replaced. hfx's side is hfx's YAML, loaded by ``TaskIndex`` and scored by
``evaluate_tasks`` with a fake backend that sees the exact requests. Compared, exactly: the
config fields that choose data and scores, doc_to_text, choices, target, zero- and few-shot
contexts, every (context, continuation) request, and per-document acc / acc_norm for several
log-likelihood patterns (which pins the gold index).
"""

import json
import zlib
from pathlib import Path

import lm_eval
import pytest

from hfx.evaluation import Task, TaskIndex, evaluate_tasks
from hfx.evaluation.metrics import METRICS

HUB_DIR = Path(__file__).resolve().parents[1] / "plugins" / "hfx_tasks" / "hub"
LM_TASKS = Path(lm_eval.__file__).parent / "tasks"
LM_YAML = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "piqa": "piqa/piqa.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "sst2": "glue/sst2/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "copa": "super_glue/copa/default.yaml",
}
PLAIN = ("arc_easy", "arc_challenge", "piqa", "boolq", "sst2")  # lm-eval's prompts are Jinja / field names
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
FEWSHOT = 2
SEED = 1234


def _arc(id_, question, texts, labels, key):
    return {"id": id_, "question": question, "choices": {"text": texts, "label": labels}, "answerKey": key}


ARC = [
    _arc("Mercury_7175875", "Which of these is a mammal?", ["a cat", "a trout", "a robin", "a frog"],
         list("ABCD"), "A"),
    # numeric labels (as in part of ARC) and three choices
    _arc("NYSEDREGENTS_2015_4_9", "What does  a plant need? ", ["light", "it's \"dark\"", "salt\n"],
         ["1", "2", "3"], "3"),
    _arc("MCAS_2000_4_6", "Which tool measures mass?\n", ["a ruler", "a balance", "a clock", "a cup", "a thermometer"],
         list("ABCDE"), "E"),
    _arc("Mercury_SC_401", "Water freezes at what temperature (\u00b0C)?", ["0", "100", "-10", "32"],
         list("ABCD"), "B"),
]
PIQA = [
    {"goal": "How do I ready a guinea pig cage for its new occupants?",
     "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips.",
     "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material.",
     "label": 0},
    {"goal": "To cut a  'tomato' cleanly", "sol1": "use a dull spoon ", "sol2": "use a sharp \"serrated\" knife",
     "label": 1},
    {"goal": "  remove rust\n", "sol1": "soak it in vinegar", "sol2": "soak it in water", "label": 0},
]
BOOLQ = [
    {"question": "do iran and afghanistan speak the same language", "label": 1, "idx": 0,
     "passage": "Persian language -- Persian (/\u02c8p\u025c\u02d0r\u0292\u0259n/) is spoken in Iran and Afghanistan."},
    {"question": "is the sky green", "passage": "The sky is blue.  It is not \"green\".", "label": 0, "idx": 1},
    {"question": "can you eat it?", "passage": "  Leading spaces and a trailing newline\n", "label": 1, "idx": 2},
]
SST2 = [
    {"sentence": "it 's a charming and often affecting journey . ", "label": 1, "idx": 0},
    {"sentence": "unflinchingly bleak and desperate ", "label": 0, "idx": 1},
    {"sentence": "the film 's \"best\" moments\n", "label": 1, "idx": 2},
]


def _hellaswag(ind, activity, ctx_a, ctx_b, endings, label, source="activitynet~v_x"):
    return {"ind": ind, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": f"{ctx_a} {ctx_b}",
            "endings": endings, "source_id": source, "split": "val", "split_type": "indomain", "label": label}


HELLASWAG = [
    _hellaswag(24, "Roof shingle removal", "A man is sitting on a roof.", "he",
               ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "3"),
    # WikiHow: [header] / [title] / [step] brackets, empty ctx_b, double and triple spaces
    _hellaswag(4, "Home and Garden", "[header] How to clean a grill [title] Heat the grill.  [step] Turn the burners"
               " on high   for 15 minutes.", "",
               [" [title] Scrape the grates. [step] Use a wire brush.", "[substeps] Let it cool  down. ",
                "Spray it [with [nested] brackets] now.", "\nWipe the grates   with oil.\t"], "0",
               source="wikihow~1"),
    # ctx_b needing capitalisation, mixed case, leading/trailing whitespace, unicode
    _hellaswag(7, " Caf\u00e9 work ", "  A barista tamps the coffee.  ", "tHE barista then   pours milk [x]",
               ["makes a heart \u2014 carefully.", "'drinks' it \"all\".", "  walks away.  ", "sits down. [title]"],
               "2"),
    # the context ends with " [title]" (strip before replacing), and ends of lines inside it
    _hellaswag(12, "Personal Care", "[header] How to fold a shirt\n[title] Lay the shirt flat. [title]", "",
               ["[step] Fold it.", "Fold it [title] twice.", "Fold it\n", "Roll it. "], "0", source="wikihow~2"),
    _hellaswag(9, "Sports", "Two teams play.", "the ball", ["is kicked.", "flies.", "rolls.", "stops."], "1"),
]
COPA = [
    {"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
     "choice2": "The grass was cut.", "question": "cause", "idx": 0, "label": 0},
    {"premise": "The woman tolerated her friend's difficult behavior. ", "choice1": "The woman knew her friend was"
     " going through a hard time.", "choice2": "I felt that her friend took advantage of her kindness.",
     "question": "cause", "idx": 1, "label": 1},
    {"premise": "  The runner wore shorts.", "choice1": "The forecast predicted high temperatures.",
     "choice2": "She planned to run along the beach.", "question": "effect", "idx": 2, "label": 1},
    {"premise": "The man turned on the faucet.", "choice1": "Water flowed from the spout.",
     "choice2": "The toilet filled with water.", "question": "effect", "idx": 3, "label": 0},
    # identical choices: lm-eval's gold is the first choice equal to its target string
    {"premise": "He flipped the coin.", "choice1": "It landed.", "choice2": "It landed.",
     "question": "effect", "idx": 4, "label": 1},
]
DOCS = {"arc_easy": ARC, "arc_challenge": ARC, "piqa": PIQA, "boolq": BOOLQ, "sst2": SST2,
        "hellaswag": HELLASWAG, "copa": COPA}


def _lm_eval_yaml(name):
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(LM_TASKS / LM_YAML[name], resolve_func=True)  # include merged, !function imported


def _lm_default(key):
    from lm_eval.config.task import TaskConfig

    return getattr(TaskConfig, key, None)


class RecordingBackend:
    """A scorer stand-in: answers ``lls`` in order and keeps the requests it was asked."""

    def __init__(self, lls):
        self.lls, self.requests = lls, None

    def loglikelihood(self, requests, name=None):
        self.requests = [tuple(r) for r in requests]
        assert len(requests) == len(self.lls)
        return [(ll, i % 3 == 0) for i, ll in enumerate(self.lls)]


@pytest.fixture(scope="module", params=sorted(DOCS))
def pair(request, tmp_path_factory):
    """(name, lm-eval ConfigurableTask, lm-eval raw YAML dict, hfx Task) on the same synthetic data."""
    from lm_eval.api.task import ConfigurableTask

    name = request.param
    root = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        lm_cfg = _lm_eval_yaml(name)
        files = {}
        for key in SPLIT_KEYS[:3]:
            split = lm_cfg.get(key)
            if split:
                files[split] = str(root / f"{split}.jsonl")
                with open(files[split], "w", encoding="utf-8") as handle:
                    handle.writelines(json.dumps(doc) + "\n" for doc in DOCS[name])
        local = {"dataset_path": "json", "dataset_name": None,
                 "dataset_kwargs": {"data_files": files, "cache_dir": str(root / "cache")}}
        lm_task = ConfigurableTask(config={**lm_cfg, **local})
        hfx_config = TaskIndex([HUB_DIR], plugins=False).config(name)
        hfx_task = Task(hfx_config, dataset=lm_task.dataset)  # the same raw DatasetDict
        yield name, lm_task, lm_cfg, hfx_task


def test_every_bundled_task_is_compared():
    index = TaskIndex([HUB_DIR], plugins=False)
    assert sorted(index.names()) == sorted(LM_YAML)


def test_config_fields_match_lm_eval(pair):
    name, _, lm_cfg, hfx_task = pair
    cfg = hfx_task.config
    for key in ("dataset_path", "dataset_name", *SPLIT_KEYS, "output_type", "target_delimiter",
                "fewshot_delimiter", "description", "num_fewshot", "fewshot_config", "dataset_kwargs",
                "generation_kwargs", "filter_list", "repeats"):
        assert getattr(cfg, key) == lm_cfg.get(key, _lm_default(key)), (name, key)
    assert cfg.tag == lm_cfg.get("tag"), name
    assert (cfg.metadata or {}).get("version") == lm_cfg["metadata"]["version"], name
    lm_metrics = lm_cfg["metric_list"]
    assert [m["metric"] for m in cfg.metric_list] == [m["metric"] for m in lm_metrics], name
    for ours, theirs in zip(cfg.metric_list, lm_metrics):
        # lm-eval's defaults for these metrics: mean, higher is better
        assert ours.get("aggregation", "mean") == theirs.get("aggregation", "mean") == "mean"
        assert METRICS[ours["metric"]].higher_is_better is theirs.get("higher_is_better", True)
    assert cfg.process_docs is None, "hub tasks must not run Python"


@pytest.mark.parametrize("pair", PLAIN, indirect=True)  # hellaswag/copa prompts are Python: compared on documents
def test_plain_task_templates_are_lm_evals(pair):
    name, _, lm_cfg, hfx_task = pair
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        assert getattr(hfx_task.config, key) == lm_cfg[key], (name, key)


def test_documents_render_as_lm_eval(pair):
    name, lm_task, _, hfx_task = pair
    lm_docs, hfx_docs = list(lm_task.eval_docs), hfx_task.eval_docs()
    assert len(lm_docs) == len(hfx_docs) == len(DOCS[name])
    for i, (lm_doc, doc) in enumerate(zip(lm_docs, hfx_docs)):
        where = (name, i)
        text = hfx_task.doc_to_text(doc)
        assert type(text) is str and text == lm_task.doc_to_text(lm_doc), where
        choices = hfx_task.doc_to_choice(doc)
        assert type(choices) is list and all(type(c) is str for c in choices), where
        assert choices == lm_task.doc_to_choice(lm_doc), where
        assert hfx_task.doc_to_target(doc) == lm_task.doc_to_target(lm_doc), where
        context = hfx_task.context(doc, [])
        assert context == lm_task.fewshot_context(doc=lm_doc, num_fewshot=0), where
        lm_requests = [inst.arguments for inst in lm_task.construct_requests(lm_doc, context, metadata=(name, i, 1))]
        delimiter = hfx_task.config.target_delimiter
        assert [(context, f"{delimiter}{c}") for c in choices] == lm_requests, where


def test_fewshot_contexts_match_lm_eval(pair):
    name, lm_task, _, hfx_task = pair
    lm_task.set_fewshot_seed(SEED)  # what lm-eval's evaluator does before building requests
    expected = [lm_task.fewshot_context(doc=doc, num_fewshot=FEWSHOT) for doc in lm_task.eval_docs]
    ours = hfx_task.contexts(hfx_task.eval_docs(), FEWSHOT, seed=SEED)
    assert ours == expected, name
    assert all(c.count(hfx_task.config.fewshot_delimiter) >= FEWSHOT for c in ours)


def _patterns(counts):
    """Log-likelihood patterns: each choice index winning alone, all tied, and a hash-spread one."""
    top = max(counts)
    yield from ([[0.0 if j == i else -1.0 for j in range(n)] for n in counts] for i in range(top))
    yield [[-1.0] * n for n in counts]
    yield [[-(zlib.crc32(f"{d}:{j}".encode()) % 997) / 50.0 for j in range(n)] for d, n in enumerate(counts)]


@pytest.mark.parametrize("num_fewshot", [0, FEWSHOT])
def test_requests_and_scores_match_lm_eval(pair, num_fewshot):
    name, lm_task, _, hfx_task = pair
    lm_docs = list(lm_task.eval_docs)
    lm_task.set_fewshot_seed(SEED)
    lm_requests = []
    for i, doc in enumerate(lm_docs):
        ctx = lm_task.fewshot_context(doc=doc, num_fewshot=num_fewshot)
        lm_requests.append([inst.arguments for inst in lm_task.construct_requests(doc, ctx, metadata=(name, i, 1))])
    counts = [len(r) for r in lm_requests]
    wanted = [m["metric"] for m in hfx_task.config.metric_list]
    for lls in _patterns(counts):
        backend = RecordingBackend([ll for doc_lls in lls for ll in doc_lls])
        results, records = evaluate_tasks([hfx_task], backend, num_fewshot=num_fewshot, seed=SEED)
        assert backend.requests == [arg for doc_requests in lm_requests for arg in doc_requests], name
        records = records[name]
        assert len(records) == len(lm_docs)
        expected_items = []
        for record, doc, doc_lls in zip(records, lm_docs, lls):
            start = sum(counts[: record["doc_id"]])
            greedy = [(ll, j % 3 == 0) for j, ll in enumerate(doc_lls, start)]
            expected = lm_task.process_results(doc, greedy)
            assert record["metrics"] == {m: expected[m] for m in wanted}, (name, record["doc_id"], doc_lls)
            assert record["target"] == lm_task.doc_to_target(doc), (name, record["doc_id"])
            expected_items.append(expected)
        for m in wanted:
            mean = sum(e[m] for e in expected_items) / len(expected_items)
            assert results["results"][name][f"{m},none"] == pytest.approx(mean, abs=1e-12), (name, m)
