"""hfx finetune --metrics: evaluate modules shipped in hfx, equal to scikit-learn, logged at each evaluation.

The models are tiny and built here (save_pretrained into tmp folders); data are local jsonl files.
"""

import inspect
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, precision_score, recall_score
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import hfx
from hfx.finetune import FinetuneConfig, finetune
from hfx.finetune.data import prepare_data
from hfx.finetune.metrics import (
    ALL_METRICS,
    MODULES,
    TASK_METRICS,
    MetricError,
    classification_scores,
    generation_examples,
    load_metric,
)
from hfx.tokenizer import train_tokenizer

QUIET = {"disable_tqdm": True}
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def digit_rows(indices):
    return [{"prompt": f"say {i % 10}", "completion": WORDS[i % 10]} for i in indices]


def sentiment_rows(indices):
    """Label 1 when the text holds 'good': a split a tiny classifier finds in a few steps."""
    return [{"text": f"{'good' if i % 2 else 'bad'} movie number {i % 7}", "label": i % 2} for i in indices]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    texts = ([f"{r['prompt']} {r['completion']}" for r in digit_rows(range(20))]
             + [r["text"] for r in sentiment_rows(range(14))])
    train_tokenizer(texts, vocab_size=120, save_dir=path)
    return path


def saved(model, tokenizer_dir, path):
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    return saved(LlamaForCausalLM(config), tokenizer_dir, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def hfx_classifier(tmp_path_factory, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = hfx.HfxConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_token_id, num_labels=2)
    torch.manual_seed(0)
    return saved(hfx.HfxForSequenceClassification(config), tokenizer_dir, tmp_path_factory.mktemp("cls"))


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr("hfx.finetune.train.load_model", refuse)


# --- the modules against scikit-learn ---------------------------------------------------------


@pytest.mark.parametrize("num_labels", [2, 4])
def test_classification_modules_equal_sklearn(num_labels):
    rng = np.random.default_rng(num_labels)
    references = rng.integers(0, num_labels, 200)
    # right 60% of the time, else a random class; class num_labels-1 never predicted for 4 labels
    predictions = np.where(rng.random(200) < 0.6, references, rng.integers(0, max(2, num_labels - 1), 200))
    got = classification_scores(list(TASK_METRICS["seq-cls"]), predictions, references, num_labels)
    average = "binary" if num_labels == 2 else "macro"
    extra = {} if num_labels == 2 else {"labels": list(range(num_labels))}
    want = {
        "accuracy": accuracy_score(references, predictions),
        "f1": f1_score(references, predictions, average=average, zero_division=0, **extra),
        "precision": precision_score(references, predictions, average=average, zero_division=0, **extra),
        "recall": recall_score(references, predictions, average=average, zero_division=0, **extra),
        "mcc": matthews_corrcoef(references, predictions),
    }
    assert got == pytest.approx(want, abs=1e-12)
    assert 0 < got["accuracy"] < 1 and got["mcc"] > 0
    for average in ("micro", "weighted"):
        got = classification_scores(["f1"], predictions, references, num_labels, average)
        assert got["f1"] == pytest.approx(f1_score(references, predictions, average=average,
                                                   labels=list(range(num_labels)), zero_division=0), abs=1e-12)


def test_exact_match_module_normalises_whitespace_only():
    module = load_metric("exact_match")
    predictions = [" two", "three  four", "Five", "six", "seven"]
    references = ["two ", "three four", "five", "sixty", "seven"]
    assert module.compute(predictions=predictions, references=references)["exact_match"] == pytest.approx(3 / 5)
    assert module.compute(predictions=predictions, references=references, ignore_case=True)["exact_match"] == \
        pytest.approx(4 / 5)


CLASSES = {"accuracy": "Accuracy", "f1": "F1", "precision": "Precision", "recall": "Recall",
           "mcc": "MatthewsCorrelation", "exact_match": "ExactMatch"}


def test_modules_load_offline_into_the_modules_cache_only(tmp_path, monkeypatch):
    """evaluate.load of the shipped scripts works offline (HF_HUB_OFFLINE=1, see conftest): the script is
    imported from evaluate's modules cache, and neither the working folder nor the metrics cache receives a file."""
    import evaluate.config

    monkeypatch.chdir(tmp_path)
    metrics_cache = evaluate.config.HF_METRICS_CACHE
    before = sorted(metrics_cache.rglob("*")) if metrics_cache.exists() else []
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    load_metric.cache_clear()
    for name, (script, key) in MODULES.items():
        pair = ([0, 1, 1], [0, 1, 0]) if name != "exact_match" else (["a", "b"], ["a", "c"])
        module = load_metric(name)
        value = module.compute(predictions=pair[0], references=pair[1])[key]
        assert value == pytest.approx({"accuracy": 2 / 3, "exact_match": 0.5}.get(name, value))
        source = Path(inspect.getfile(type(module))).resolve()
        assert source.name == f"{script}.py"
        # f1/precision/recall share an abstract base that evaluate's loader must pass over
        assert type(module).__name__ == CLASSES[name] and not inspect.isabstract(type(module))
        assert Path(evaluate.config.HF_MODULES_CACHE).resolve() in source.parents
    assert list(tmp_path.iterdir()) == []
    assert (sorted(metrics_cache.rglob("*")) if metrics_cache.exists() else []) == before


# --- refused before anything is loaded --------------------------------------------------------


def test_bad_names_and_missing_eval_data_refused():
    base = dict(model="m", data="d", output="o", eval_fraction=0.25)
    with pytest.raises(ValueError, match=r"metrics \['bleu'\] are unknown; valid values: seq-cls: \['accuracy'"):
        FinetuneConfig(**base, metrics="accuracy,bleu")
    with pytest.raises(ValueError, match=r"metrics \['accuracy'\] are invalid with task='causal-lm'; valid values: "
                                         r"\['perplexity', 'exact_match'\]"):
        FinetuneConfig(**base, task="causal-lm", metrics=["accuracy"])
    with pytest.raises(ValueError, match=r"names no metric; valid values: \["):
        FinetuneConfig(**base, metrics=" , ")
    with pytest.raises(ValueError, match=r"metrics_average='samples' is invalid; valid values: \['auto', 'macro'"):
        FinetuneConfig(**base, metrics="f1", metrics_average="samples")
    with pytest.raises(ValueError, match=r"metrics=\['accuracy'\] need evaluation data: set eval_data or eval_fraction"):
        FinetuneConfig(model="m", data="d", output="o", metrics="accuracy")
    with pytest.raises(ValueError, match=r"exact_match is invalid with packing='wrapped'.*\['none', 'bfd'\]"):
        FinetuneConfig(**base, metrics="exact_match", packing="wrapped")
    assert FinetuneConfig(**base, metrics="f1, accuracy,f1").metrics == ["f1", "accuracy"]
    assert set(ALL_METRICS) == {"accuracy", "f1", "precision", "recall", "mcc", "perplexity", "exact_match"}


def test_metric_of_another_task_refused_before_the_model_loads(tmp_path, tiny_llama, no_model_load):
    data = write_jsonl(tmp_path / "d.jsonl", digit_rows(range(8)))
    with pytest.raises(MetricError, match=r"metrics \['accuracy'\] are invalid with task='causal-lm'"):
        finetune(model=tiny_llama, data=data, output=str(tmp_path / "o"), eval_fraction=0.25, metrics="accuracy")
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "say one"}] * 8)
    with pytest.raises(MetricError, match=r"needs prompt-completion records; the data is 'text'. Valid metrics for it: "
                                          r"\['perplexity'\]"):
        finetune(model=tiny_llama, data=text, output=str(tmp_path / "o"), eval_fraction=0.25, metrics="exact_match")
    assert not (tmp_path / "o").exists()


def test_cli_refuses_unknown_metric(tmp_path, tiny_llama, capsys):
    from hfx.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "--model", tiny_llama, "--data", "d.jsonl", "--output", str(tmp_path / "o"),
              "--eval-fraction", "0.2", "--metrics", "accuracy,rouge"])
    assert exit_.value.code == 2
    assert "metrics ['rouge'] are unknown" in capsys.readouterr().err


# --- generation examples, packed or not ---------------------------------------------------------


def test_generation_examples_recovered_from_bfd_rows(tmp_path, tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    rows = digit_rows(range(12)) + [{"prompt": "say 3 and 4", "completion": "three four"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)

    def examples(packing):
        config = FinetuneConfig(model=tiny_llama, data=data, output=str(tmp_path / "o"), task="causal-lm",
                                eval_data=data, max_length=32, packing=packing)
        prepared = prepare_data(config, "causal-lm", tokenizer)
        return prepared.eval, sorted((e.prompt_ids, e.reference_ids) for e in generation_examples(prepared.eval))

    plain_set, plain = examples("none")
    packed_set, packed = examples("bfd")
    assert len(packed_set) < len(plain_set) == len(rows)  # several examples per row
    assert packed == plain and len(plain) == len(rows)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    want = sorted(([bos] * (bos is not None) + tokenizer(r["prompt"], add_special_tokens=False)["input_ids"],
                   tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [eos]) for r in rows)
    assert plain == want


def test_exact_match_is_sharded_under_ddp_and_replicated_where_the_model_is_partitioned(monkeypatch):
    """DDP: each rank generates for every world_size-th example and the counts are summed; FSDP / ZeRO-3:
    every rank generates for the whole split (each forward is a collective)."""
    from types import SimpleNamespace

    import hfx.finetune.metrics as metrics_module
    from hfx.finetune.metrics import GenerationExample, GenerationMetricsMixin

    examples = [GenerationExample([1, 2], [3 + i]) for i in range(7)]
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: " ".join(map(str, ids)))
    generated = []

    def fake_completions(model, tok, chunk, batch_size):  # right for references divisible by 3: 3, 6, 9
        generated.append([e.reference_ids[0] for e in chunk])
        return [tok.decode(e.reference_ids) if e.reference_ids[0] % 3 == 0 else "wrong" for e in chunk]

    monkeypatch.setattr(metrics_module, "greedy_completions", fake_completions)
    reduced = []

    def trainer(rank, world, **engine):
        accelerator = SimpleNamespace(reduce=lambda tensor, reduction: reduced.append(tensor.tolist()) or tensor,
                                      state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=engine.get("zero"))))
        return SimpleNamespace(model=None, processing_class=tokenizer, accelerator=accelerator,
                               is_fsdp_enabled=engine.get("fsdp", False), is_deepspeed_enabled="zero" in engine,
                               args=SimpleNamespace(world_size=world, process_index=rank, eval_batch_size=4,
                                                    device="cpu"))

    def score(fake):
        fake._generation_is_collective = lambda: GenerationMetricsMixin._generation_is_collective(fake)
        return GenerationMetricsMixin._exact_match(fake, examples)

    assert score(trainer(0, 1)) == pytest.approx(3 / 7) and generated == [list(range(3, 10))] and reduced == []
    generated.clear()
    for rank in (0, 1):
        score(trainer(rank, 2))
    assert generated == [[3, 5, 7, 9], [4, 6, 8]]  # each example generated once, on one rank
    assert [sum(column) for column in zip(*reduced)] == [3, 7]  # matches and examples summed over the ranks
    for engine in (dict(fsdp=True), dict(zero=3)):
        generated.clear()
        reduced.clear()
        assert score(trainer(1, 2, **engine)) == pytest.approx(3 / 7)
        assert generated == [list(range(3, 10))] and reduced == []  # the whole split on every rank
    generated.clear()
    score(trainer(1, 2, zero=2))  # ZeRO-2 keeps whole weights: sharded like DDP
    assert generated == [[4, 6, 8]]


# --- runs: Trainer logs the metrics at each evaluation, the results file has the last ----------


def final_predictions(result, rows) -> list[int]:
    """The trained classifier's own argmax class for each row, one example at a time."""
    tokenizer, model = result.tokenizer, result.model.eval()
    with torch.no_grad():
        return [int(model(**tokenizer(row["text"], return_tensors="pt")).logits.argmax(-1)) for row in rows]


@pytest.mark.slow  # a whole finetune run
def test_seq_cls_run_logs_sklearn_equal_metrics(tmp_path, hfx_classifier):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(range(40)))
    held_out = sentiment_rows(range(100, 120))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", held_out)
    result = finetune(model=hfx_classifier, data=train, eval_data=evaluation, output=str(tmp_path / "out"),
                      task="seq-cls", method="full", learning_rate=3e-3, max_steps=6, eval_steps=3, batch_size=8,
                      logging_steps=3, save_steps=100, metrics="accuracy,f1,mcc,precision,recall",
                      extra_training_args=dict(QUIET))
    evals = [entry for entry in result.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [3, 6]
    for entry in evals:
        assert {"eval_accuracy", "eval_f1", "eval_mcc", "eval_precision", "eval_recall"} <= set(entry)
    # the final model's own predictions, one example at a time, scored by scikit-learn
    predictions = final_predictions(result, held_out)
    references = [row["label"] for row in held_out]
    last = evals[-1]
    assert last["eval_accuracy"] == pytest.approx(accuracy_score(references, predictions), abs=1e-12)
    assert last["eval_f1"] == pytest.approx(f1_score(references, predictions, zero_division=0), abs=1e-12)
    assert last["eval_mcc"] == pytest.approx(matthews_corrcoef(references, predictions), abs=1e-12)
    assert last["eval_precision"] == pytest.approx(precision_score(references, predictions, zero_division=0), abs=1e-12)
    assert last["eval_recall"] == pytest.approx(recall_score(references, predictions, zero_division=0), abs=1e-12)
    saved_results = json.loads((tmp_path / "out" / "hfx_finetune_results.json").read_text())
    assert saved_results["eval_metrics"] == result.eval_metrics == {k: v for k, v in last.items() if k.startswith("eval_")}


@pytest.mark.slow  # a whole finetune run
def test_the_final_model_is_evaluated_when_the_last_step_is_not_an_eval_step(tmp_path, hfx_classifier):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(range(24)))
    held_out = sentiment_rows(range(100, 112))
    result = finetune(model=hfx_classifier, data=train, eval_data=write_jsonl(tmp_path / "eval.jsonl", held_out),
                      output=str(tmp_path / "out"), task="seq-cls", method="full", learning_rate=3e-3, max_steps=4,
                      eval_steps=3, batch_size=8, logging_steps=2, save_steps=100, metrics="accuracy",
                      extra_training_args=dict(QUIET))
    assert [entry["step"] for entry in result.log_history if "eval_loss" in entry] == [3, 4]
    predictions = final_predictions(result, held_out)
    accuracy = accuracy_score([row["label"] for row in held_out], predictions)
    assert result.eval_metrics["eval_accuracy"] == pytest.approx(accuracy, abs=1e-12)


@pytest.mark.slow  # a whole finetune run
def test_causal_lm_run_logs_perplexity_and_exact_match(tmp_path, tiny_llama):
    train = write_jsonl(tmp_path / "train.jsonl", digit_rows(range(80)))
    held_out = digit_rows(range(100, 110))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", held_out)
    result = finetune(model=tiny_llama, data=train, eval_data=evaluation, output=str(tmp_path / "out"),
                      method="full", learning_rate=5e-3, max_steps=12, eval_steps=6, batch_size=8, logging_steps=6,
                      save_steps=100, warmup_ratio=0.0, metrics="perplexity,exact_match",
                      extra_training_args=dict(QUIET))
    evals = [entry for entry in result.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [6, 12]
    for entry in evals:
        assert entry["eval_perplexity"] == pytest.approx(math.exp(entry["eval_loss"]), rel=1e-12)
        assert 0.0 <= entry["eval_exact_match"] <= 1.0
    # greedy generation one prompt at a time, the completion compared as decoded text
    tokenizer, model = result.tokenizer, result.model.eval()
    hits = 0
    for row in held_out:
        prompt = [tokenizer.bos_token_id] + tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        reference = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=len(reference),
                                 pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        if tokenizer.eos_token_id in out:
            out = out[: out.index(tokenizer.eos_token_id)]
        hits += " ".join(tokenizer.decode(out, skip_special_tokens=True).split()) == row["completion"]
    assert evals[-1]["eval_exact_match"] == pytest.approx(hits / len(held_out), abs=1e-12)
    assert result.eval_metrics["eval_exact_match"] == evals[-1]["eval_exact_match"]


@pytest.mark.parametrize("given, suggested", [("acc", "accuracy"), ("f-1", "f1"), ("perplex", "perplexity")])
def test_unknown_metric_names_get_a_suggestion(given, suggested):
    from hfx.finetune.metrics import check_metric_names

    with pytest.raises(ValueError, match=rf"Did you mean '{given}' -> '{suggested}'\?"):
        check_metric_names([given], "seq-cls")
