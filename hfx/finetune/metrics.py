"""Evaluation metrics of ``hfx finetune --metrics``, computed with ``evaluate`` modules shipped in hfx.

- sequence classification: accuracy, f1, precision, recall, mcc, from the argmax class of each
  evaluation example (taken on the device, so only one id per example is gathered);
- causal LM / seq2seq: perplexity = exp(eval_loss) of the model being trained;
- causal LM: exact_match of greedy generations from the prompts of the evaluation split against
  their completions (prompt-completion records).

The module scripts live in :mod:`hfx.finetune.metric_modules` and are loaded with
``evaluate.load(<script path>)``: nothing is fetched from the Hub.
"""

from __future__ import annotations

import difflib

import functools
import math
import tempfile
from dataclasses import dataclass

#: metric name -> the metric_modules script that computes it and the key that script returns
MODULES = {
    "accuracy": ("accuracy", "accuracy"),
    "f1": ("f1", "f1"),
    "precision": ("precision", "precision"),
    "recall": ("recall", "recall"),
    "mcc": ("matthews_correlation", "matthews_correlation"),
    "exact_match": ("exact_match", "exact_match"),
}
#: the metrics each task can log (``perplexity`` needs no module: it is exp(eval_loss))
TASK_METRICS = {
    "seq-cls": ("accuracy", "f1", "precision", "recall", "mcc"),
    "causal-lm": ("perplexity", "exact_match"),
    "seq2seq": ("perplexity",),
}
ALL_METRICS = tuple(dict.fromkeys(name for names in TASK_METRICS.values() for name in names))
AVERAGES = ("auto", "macro", "micro", "weighted")
#: metrics averaged over classes (``metrics_average``)
AVERAGED = ("f1", "precision", "recall")


class MetricError(ValueError):
    """A requested metric cannot be computed for this task or data."""


def parse_metrics(value) -> list[str] | None:
    """``"accuracy, f1"`` or a list -> the distinct names in order; None stays None."""
    if value is None:
        return None
    given = value
    names = [name.strip() for name in value.split(",")] if isinstance(value, str) else [str(name).strip() for name in value]
    names = list(dict.fromkeys(name for name in names if name))
    if not names:
        raise ValueError(f"metrics={given!r} names no metric; valid values: {list(ALL_METRICS)} (comma-separated).")
    return names


def check_metric_names(metrics: list[str] | None, task: str) -> None:
    """Every name must be one the task logs; ``auto`` (the task is not known yet) accepts any known name."""
    if not metrics:
        return
    unknown = [name for name in metrics if name not in ALL_METRICS]
    if unknown:
        # an abbreviation ("acc") names the metric it starts; otherwise the closest spelling
        close = {name: [v for v in ALL_METRICS if v.startswith(name.lower())][:1]
                 or difflib.get_close_matches(name, list(ALL_METRICS), n=1, cutoff=0.5) for name in unknown}
        hint = ", ".join(f"{name!r} -> {match[0]!r}" for name, match in close.items() if match)
        raise MetricError(f"metrics {unknown} are unknown; valid values: " + "; ".join(
            f"{task_name}: {list(names)}" for task_name, names in TASK_METRICS.items()) + "."
            + (f" Did you mean {hint}?" if hint else ""))
    if task in TASK_METRICS:
        wrong = [name for name in metrics if name not in TASK_METRICS[task]]
        if wrong:
            raise MetricError(f"metrics {wrong} are invalid with task={task!r}; valid values: {list(TASK_METRICS[task])}.")


def check_metrics(config, task: str, data_format: str) -> None:
    """Checks that need the resolved task and record shape; run before the model is loaded."""
    check_metric_names(config.metrics, task)
    if config.metrics and "exact_match" in config.metrics and data_format != "prompt-completion":
        raise MetricError(f"metrics: exact_match compares greedy generations from the prompt with the completion, so it "
                          f"needs prompt-completion records; the data is {data_format!r}. Valid metrics for it: "
                          f"{[name for name in TASK_METRICS[task] if name != 'exact_match']}.")


@functools.cache
def load_metric(name: str):
    """The ``evaluate`` module of metric ``name``, loaded from the script shipped with hfx (offline), once per process.

    ``evaluate.load`` copies the script into its modules cache (``HF_MODULES_CACHE``); the
    predictions stay in memory, so its data cache (a temporary folder here) receives nothing.
    """
    import evaluate

    from .metric_modules import script

    with tempfile.TemporaryDirectory(prefix="hfx-metric-") as cache:
        return evaluate.load(str(script(MODULES[name][0])), cache_dir=cache, keep_in_memory=True)


def average_for(config_average: str, num_labels: int) -> str:
    """``auto``: binary (class 1 is positive) for two classes, macro otherwise."""
    if config_average != "auto":
        return config_average
    return "binary" if num_labels == 2 else "macro"


def classification_scores(names: list[str], predictions, references, num_labels: int,
                          average: str = "auto") -> dict[str, float]:
    """``{name: value}`` for class-id predictions, each from its ``evaluate`` module.

    Averaged metrics are taken over every class id ``0 .. num_labels-1`` (a class absent from both
    predictions and references counts 0), so values of successive evaluations are comparable.
    """
    average = average_for(average, num_labels)
    predictions = [int(p) for p in predictions]
    references = [int(r) for r in references]
    scores = {}
    for name in names:
        key = MODULES[name][1]
        kwargs = {}
        if name in AVERAGED:
            kwargs = {"average": average, "pos_label": 1}
            if average != "binary":
                kwargs["labels"] = list(range(num_labels))
        result = load_metric(name).compute(predictions=predictions, references=references, **kwargs)
        scores[name] = float(result[key])
    return scores


def argmax_logits(logits, labels):
    """``preprocess_logits_for_metrics``: the predicted class id, on the device (one id per example is gathered)."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.argmax(dim=-1)


def classification_compute_metrics(names: list[str], num_labels: int, average: str):
    """Trainer's ``compute_metrics`` for a classifier whose logits went through :func:`argmax_logits`."""

    def compute(eval_prediction) -> dict[str, float]:
        predictions = eval_prediction.predictions
        if isinstance(predictions, (tuple, list)):
            predictions = predictions[0]
        references = eval_prediction.label_ids
        return classification_scores(names, predictions.reshape(-1), references.reshape(-1), num_labels, average)

    return compute


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy); ``inf`` where that overflows a float."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@dataclass
class GenerationExample:
    prompt_ids: list[int]
    reference_ids: list[int]  # the labelled tokens (the completion, ending in EOS unless cut at max_length)


def generation_examples(dataset) -> list[GenerationExample]:
    """Prompt and completion of each tokenised prompt-completion example: the tokens before the first
    labelled one are the prompt (exactly what the model saw in training), the labelled ones the completion.

    Rows packed best-fit (``position_ids`` restarting at 0 where an example starts, no example cut)
    are split back into their examples first.
    """
    from .data import IGNORE_INDEX

    columns = dataset.column_names
    positions = dataset["position_ids"] if "position_ids" in columns else [None] * len(dataset)
    examples = []
    for input_ids, labels, row_positions in zip(dataset["input_ids"], dataset["labels"], positions):
        starts = [0] if row_positions is None else [i for i, p in enumerate(row_positions) if p == 0]
        for start, end in zip(starts, starts[1:] + [len(input_ids)]):
            piece_ids, piece_labels = input_ids[start:end], labels[start:end]
            first = next((i for i, label in enumerate(piece_labels) if label != IGNORE_INDEX), None)
            if first is None or first == 0:
                continue  # nothing to compare with, or nothing to generate from
            examples.append(GenerationExample(list(piece_ids[:first]),
                                              [t for t in piece_labels[first:] if t != IGNORE_INDEX]))
    return examples


def greedy_completions(model, tokenizer, examples: list[GenerationExample], batch_size: int) -> list[str]:
    """Greedy generation for every example, decoded without special tokens.

    Prompts of equal length are batched together, so no padding enters generation; each example
    generates at most as many tokens as its reference has and stops at EOS.
    """
    import torch
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    texts: list[str | None] = [None] * len(examples)
    by_length: dict[int, list[int]] = {}
    for index, example in enumerate(examples):
        by_length.setdefault(len(example.prompt_ids), []).append(index)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            input_ids = torch.tensor([examples[i].prompt_ids for i in chunk], device=device)
            settings = GenerationConfig(
                do_sample=False, num_beams=1, max_new_tokens=max(len(examples[i].reference_ids) for i in chunk),
                eos_token_id=eos, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
            )
            with torch.no_grad():
                generated = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                           generation_config=settings)
            for row, i in zip(generated[:, input_ids.shape[1]:].tolist(), chunk):
                row = row[: len(examples[i].reference_ids)]
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                texts[i] = tokenizer.decode(row, skip_special_tokens=True)
    return texts


def exact_match(model, tokenizer, examples: list[GenerationExample], batch_size: int) -> float:
    matches, count = exact_match_counts(model, tokenizer, examples, batch_size)
    return matches / count if count else math.nan


def exact_match_counts(model, tokenizer, examples: list[GenerationExample], batch_size: int) -> tuple[int, int]:
    """(examples whose greedy completion matches the reference, examples): what ranks add up under DDP."""
    if not examples:
        return 0, 0
    predictions = greedy_completions(model, tokenizer, examples, batch_size)
    references = [tokenizer.decode(example.reference_ids, skip_special_tokens=True) for example in examples]
    score = load_metric("exact_match").compute(predictions=predictions, references=references)["exact_match"]
    return round(score * len(examples)), len(examples)


class GenerationMetricsMixin:
    """Adds perplexity and exact_match to every evaluation of a Trainer (hence to its log and ``on_evaluate``).

    Under DDP (whole models on every process) each process generates for its share of the evaluation
    examples (every ``world_size``-th one) and the match counts are summed over the processes. Under
    FSDP or ZeRO-3 every forward is a collective of all ranks, so each process generates for the whole
    split instead, in the same order.
    """

    def __init__(self, *args, hfx_metrics: list[str] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.hfx_metrics = list(hfx_metrics)
        self._generation_sets: dict[int, tuple[object, list[GenerationExample]]] = {}

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        if "perplexity" in self.hfx_metrics and loss is not None:
            output.metrics[f"{metric_key_prefix}_perplexity"] = perplexity(loss)
        dataset = getattr(dataloader, "dataset", None)
        if "exact_match" in self.hfx_metrics and dataset is not None and "labels" in dataset.column_names:
            cached = self._generation_sets.get(id(dataset))
            if cached is None or cached[0] is not dataset:  # the dataset is held here, so its id stays its own
                cached = self._generation_sets[id(dataset)] = (dataset, generation_examples(dataset))
            examples = cached[1]
            if examples:
                output.metrics[f"{metric_key_prefix}_exact_match"] = self._exact_match(examples)
        return output

    def _generation_is_collective(self) -> bool:
        """Whether the model is partitioned across ranks (FSDP, ZeRO-3), so all ranks must generate alike."""
        if getattr(self, "is_fsdp_enabled", False):
            return True
        if not getattr(self, "is_deepspeed_enabled", False):
            return False
        plugin = getattr(getattr(self.accelerator, "state", None), "deepspeed_plugin", None)
        return getattr(plugin, "zero_stage", 3) == 3  # an unknown stage: the safe, replicated way

    def _exact_match(self, examples: list[GenerationExample]) -> float:
        world = int(getattr(self.args, "world_size", 1) or 1)
        if world == 1 or self._generation_is_collective():
            return exact_match(self.model, self.processing_class, examples, self.args.eval_batch_size)
        import torch

        shard = examples[self.args.process_index :: world]
        matches, count = exact_match_counts(self.model, self.processing_class, shard, self.args.eval_batch_size)
        totals = self.accelerator.reduce(torch.tensor([matches, count], dtype=torch.float64, device=self.args.device),
                                         reduction="sum")
        return float(totals[0] / totals[1])


def with_generation_metrics(trainer_class):
    """``trainer_class`` with :class:`GenerationMetricsMixin` in front (any Trainer subclass composes)."""
    return type(f"{trainer_class.__name__}WithMetrics", (GenerationMetricsMixin, trainer_class), {})


def trainer_metrics(config, task: str, model, trainer_class):
    """``(trainer class, extra Trainer kwargs)`` that make Trainer log ``config.metrics`` at each evaluation."""
    if not config.metrics:
        return trainer_class, {}
    if task == "seq-cls":
        num_labels = int(model.config.num_labels)
        return trainer_class, {
            "compute_metrics": classification_compute_metrics(config.metrics, num_labels, config.metrics_average),
            "preprocess_logits_for_metrics": argmax_logits,
        }
    return with_generation_metrics(trainer_class), {"hfx_metrics": config.metrics}


def last_eval_metrics(log_history: list[dict]) -> dict | None:
    """The ``eval_*`` values of the last evaluation in Trainer's log, or None if it never evaluated."""
    for entry in reversed(log_history):
        if "eval_loss" in entry:
            return {key: value for key, value in entry.items() if key.startswith("eval_")}
    return None
