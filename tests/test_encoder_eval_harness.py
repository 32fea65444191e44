"""Encoder task types through `hfx eval`'s evaluate(): YAML fields, results shape, checks before scoring."""

import json

import numpy as np
import pytest
import torch

import hfx
from hfx.evaluation import Task, TaskConfig, TaskError, evaluate
from hfx.tokenizer import train_tokenizer

WORDS = {"red": ["apple", "cherry"], "blue": ["sky", "sea"], "green": ["grass", "leaf"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder_harness")
    rng = np.random.default_rng(0)
    rows = [{"text": " ".join(rng.choice(w, 4)), "label": l} for l, w in WORDS.items() for _ in range(10)]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_tokenizer(["apple cherry sky sea grass leaf it is about"] * 5, vocab_size=80)
    torch.manual_seed(0)
    config = hfx.HfxConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    model_dir = root / "mlm"
    hfx.HfxForMaskedLM(config).save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    (root / "tasks").mkdir()
    (root / "tasks" / "fewshot.yaml").write_text(f"""task: syn_fewshot
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: n_way_k_shot
doc_to_text: text
doc_to_target: label
n_way: 3
k_shot: 2
n_query: 3
episodes: 20
distance: euclidean
""")
    (root / "tasks" / "cloze.yaml").write_text(f"""task: syn_cloze
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: zero_shot_classification
doc_to_text: text
doc_to_target: label
method: cloze
template: "{{text}} it is about {{mask}}."
verbalizers: {{red: apple, blue: sky, green: grass}}
""")
    return root, model_dir, data


def test_yaml_tasks_give_lm_eval_shaped_results(setup):
    root, model_dir, _ = setup
    results, records = evaluate(str(model_dir), "syn_fewshot,syn_cloze", include_path=root / "tasks",
                                cache_dir=False, progress=False, return_records=True)
    few, cloze = results["results"]["syn_fewshot"], results["results"]["syn_cloze"]
    assert set(few) >= {"acc,none", "acc_stderr,none", "acc_ci95,none"}
    assert few["acc_ci95,none"] == pytest.approx(1.96 * few["acc_stderr,none"])
    assert len(records["syn_fewshot"]) == 20 and len(records["syn_cloze"]) == 30
    assert results["configs"]["syn_fewshot"]["n_way"] == 3
    assert cloze["acc,none"] == pytest.approx(np.mean([r["metrics"]["acc"] for r in records["syn_cloze"]]))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"doc_to_target": "category"}, r"label column 'category' is not in the data; its columns are \['text', 'label'\]"),
        ({"n_way": 4}, r"n_way=4 is larger than the number of classes"),
        ({"k_shot": 9}, r"k_shot \+ n_query = 9 \+ 3 = 12 examples.*class 'blue' has 10"),
    ],
)
def test_bad_fewshot_task_fails_before_any_task_is_scored(setup, override, message, monkeypatch):
    root, model_dir, data = setup
    import hfx.evaluation.encoder.evaluators as evaluators

    calls = []
    monkeypatch.setattr(evaluators, "embed_texts", lambda *a, **k: calls.append(a))
    base = dict(task="bad", dataset_path="json", dataset_kwargs={"data_files": {"test": str(data)}}, test_split="test",
                output_type="n_way_k_shot", doc_to_text="text", doc_to_target="label", n_way=3, k_shot=2, n_query=3)
    good = Task(TaskConfig.from_dict(dict(base, task="good")))
    bad = Task(TaskConfig.from_dict(base | override))
    with pytest.raises(TaskError, match=message):
        evaluate(str(model_dir), [good, bad], cache_dir=False, progress=False)
    assert calls == []  # the good task, listed first, was not encoded either


def test_empty_verbalizer_fails_before_scoring(setup):
    root, model_dir, data = setup
    config = dict(task="bad_cloze", dataset_path="json", dataset_kwargs={"data_files": {"test": str(data)}},
                  test_split="test", output_type="zero_shot_classification", doc_to_text="text", doc_to_target="label",
                  method="cloze", template="{text} {mask}", verbalizers={"red": "", "blue": "sky", "green": "grass"})
    with pytest.raises(TaskError, match="the verbalizer of label 'red' is empty"):
        evaluate(str(model_dir), [Task(TaskConfig.from_dict(config))], cache_dir=False, progress=False)


def test_bundled_tasks_are_registered(tmp_path):
    from hfx_encoder_tasks import tasks

    from hfx.evaluation import TaskIndex

    names = TaskIndex().names()
    assert {"embedded_topics_5way5shot", "embedded_topics_zeroshot", "embedded_topics_cloze"} <= set(names)
    mappings = {m["task"]: m for m in tasks(tmp_path)}
    assert mappings["embedded_topics_zeroshot"]["label_descriptions"]["arithmetic"].startswith("a sum")
