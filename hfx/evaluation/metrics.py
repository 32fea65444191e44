"""Metrics and aggregations of lm-eval 0.4.13's registry, their per-document items and stderrs.

Every metric lm-eval registers is in :data:`METRICS` (default aggregation, direction, output
types) and every aggregation in :data:`AGGREGATIONS`, computed with the libraries lm-eval uses
(sacrebleu for bleu / chrf / chrf++ / ter, scikit-learn for f1 / matthews_corrcoef; both imported
only when such a metric is aggregated). Per-document items are built as lm-eval's
``ConfigurableTask.process_results`` builds them: :func:`multiple_choice_scores`,
:func:`loglikelihood_items`, :func:`rolling_items`, :func:`generate_items`.

Stderrs follow lm-eval's ``stderr_for_metric``: ``mean`` has the closed form (sample std / sqrt(n)),
lm-eval's ``acc_all`` its own; median, matthews_corrcoef, f1, perplexity, bleu, chrf, chrf++, ter
and nanmean are bootstrapped (bleu / chrf / chrf++ / ter with at most 100 resamples) with lm-eval's
exact draws (:func:`bootstrap_stderr`); anything else, one item, or ``bootstrap_iters <= 0``
gives ``"N/A"``.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_ITERS = 100_000  # lm-eval's default bootstrap_iters
CORPUS_BOOTSTRAP_CAP = 100  # lm-eval caps the resamples of these metrics (by metric name)
CORPUS_METRICS = ("bleu", "chrf", "chrf++", "ter")
_BLOCK_ELEMENTS = 1 << 22  # resampled indices held at once by the vectorised bootstrap (32 MiB)


def _task_error(message: str) -> Exception:
    from .templates import TaskError

    return TaskError(message)


# --- aggregations ---------------------------------------------------------------------------


def mean(items: Sequence[float]) -> float:
    return sum(items) / len(items)


def sample_stddev(values: Sequence[float]) -> float:
    mu = mean(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (len(values) - 1))


def mean_stderr(items: Sequence[float]) -> float:
    if len(items) < 2:
        return float("nan")
    return sample_stddev(items) / math.sqrt(len(items))


def median(items: Sequence[float]) -> float:
    """lm-eval's median: the upper middle item, no averaging of the two middle ones."""
    return sorted(items)[len(items) // 2]


def nanmean(items: Sequence[float]) -> float:
    if len(items) == 0 or all(np.isnan(items)):
        return np.nan
    return np.nanmean(items)


def bypass(items: Sequence) -> int:
    """lm-eval's placeholder aggregation: always 999."""
    return 999


def weighted_mean(items: Sequence[tuple[float, float]]) -> float:
    numerators, denominators = zip(*items)
    return sum(numerators) / sum(denominators)


def perplexity(items: Sequence[float]) -> float:
    return math.exp(-mean(items))


def weighted_perplexity(items: Sequence[tuple[float, float]]) -> float:
    return math.exp(-weighted_mean(items))


def bits_per_byte(items: Sequence[tuple[float, float]]) -> float:
    return -weighted_mean(items) / math.log(2)


def _golds_preds(items: Sequence) -> tuple[tuple, tuple]:
    columns = list(zip(*items))
    return columns[0], columns[1]


def f1_score(items: Sequence[tuple]) -> float:
    """Binary F1 of ``(gold, pred)`` pairs over the corpus (scikit-learn's defaults)."""
    from sklearn.metrics import f1_score as sklearn_f1

    golds, preds = _golds_preds(items)
    return np.max(sklearn_f1(golds, preds))


def matthews_corrcoef(items: Sequence[tuple]) -> float:
    """Matthews correlation of ``(gold, pred)`` pairs over the corpus (scikit-learn)."""
    from sklearn.metrics import matthews_corrcoef as sklearn_mcc

    golds, preds = _golds_preds(items)
    return sklearn_mcc(golds, preds)


def _non_str_iterable(value) -> bool:
    return isinstance(value, Iterable) and not isinstance(value, str)


def sacrebleu_streams(refs: Sequence, preds: Sequence) -> tuple[list, list[str]]:
    """``(reference streams, hypotheses)`` in sacrebleu's corpus layout, as lm-eval builds them.

    Per-item references (a string or a list of strings) become M streams of N strings (``zip``
    keeps the shortest count); a prediction given as a one-item list is unwrapped.
    """
    refs = list(refs)
    if not _non_str_iterable(refs[0]):
        refs = [[ref] for ref in refs]
    streams = list(zip(*refs))
    preds = list(preds)
    if _non_str_iterable(preds[0]):
        if any(len(pred) != 1 for pred in preds[:1]):
            raise _task_error(f"a bleu/chrf/ter prediction must be one string, got {preds[0]!r}")
        preds = [pred[0] for pred in preds]
    return streams, preds


def _sacrebleu(name: str, items: Sequence, **kwargs) -> float:
    import sacrebleu

    refs, preds = _golds_preds(items)
    streams, hypotheses = sacrebleu_streams(refs, preds)
    return getattr(sacrebleu, name)(hypotheses, streams, **kwargs).score


def bleu(items: Sequence) -> float:
    """Corpus BLEU of ``[reference(s), prediction]`` items (sacrebleu's defaults)."""
    return _sacrebleu("corpus_bleu", items)


def chrf(items: Sequence) -> float:
    """Corpus chrF (char order 6, word order 0, beta 2)."""
    return _sacrebleu("corpus_chrf", items)


def chrfpp(items: Sequence) -> float:
    """Corpus chrF++ (chrF with word order 2)."""
    return _sacrebleu("corpus_chrf", items, word_order=2)


def ter(items: Sequence) -> float:
    """Corpus translation error rate (lower is better)."""
    return _sacrebleu("corpus_ter", items)


def brier_score(items: Sequence[tuple]) -> float:
    """Mean squared distance of ``(gold, choice probabilities)`` from the one-hot gold."""
    golds, probabilities = _golds_preds(items)
    num_class = np.array(probabilities).shape[1]
    one_hot = np.eye(num_class)[list(golds)]
    return np.mean(np.sum((probabilities - one_hot) ** 2, axis=1))


def _acc_all_groups(items: Sequence[tuple], key: Callable[[dict], tuple]) -> list[int]:
    groups: dict = {}
    for pred, doc in items:
        groups.setdefault(key(doc), []).append((doc["label"] == 1) == pred)
    return [int(all(group)) for group in groups.values()]


def acc_all(items: Sequence[tuple]) -> float:
    """MultiRC's ``(pred, doc)`` items: a question counts only if all its answers are right."""
    return np.mean(_acc_all_groups(items, lambda d: (d["idx"]["paragraph"], d["idx"]["question"])))


def acc_all_stderr(items: Sequence[tuple]) -> float:
    """lm-eval groups by question id alone here (not by paragraph too, as :func:`acc_all` does)."""
    return mean_stderr(_acc_all_groups(items, lambda d: d["idx"]["question"]))


AGGREGATIONS: dict[str, Callable[[list], float]] = {
    "bypass": bypass,
    "nanmean": nanmean,
    "mean": mean,
    "median": median,
    "perplexity": perplexity,
    "weighted_perplexity": weighted_perplexity,
    "bits_per_byte": bits_per_byte,
    "f1": f1_score,
    "matthews_corrcoef": matthews_corrcoef,
    "bleu": bleu,
    "chrf": chrf,
    "chrf++": chrfpp,
    "ter": ter,
    "brier_score": brier_score,
}


def get_aggregation(name: str) -> Callable[[list], float]:
    if name not in AGGREGATIONS:
        raise _task_error(f"Unknown aggregation {name!r}; lm-eval 0.4.13 registers {sorted(AGGREGATIONS)}.")
    return AGGREGATIONS[name]


# --- the registry of metrics ----------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    name: str
    aggregate: Callable[[list], float]
    higher_is_better: bool = True
    stderr: Callable[[list], float] | None = None  # overrides lm-eval's rule (extensions only)
    aggregation: str = "mean"
    output_types: tuple[str, ...] = ()


_LL, _MC, _ROLL, _GEN = "loglikelihood", "multiple_choice", "loglikelihood_rolling", "generate_until"
_REGISTERED = (  # name, default aggregation, higher_is_better, output types (lm-eval's register_metric)
    ("brier_score", "brier_score", False, (_MC,)),
    ("acc", "mean", True, (_LL, _MC)),
    ("acc_norm", "mean", True, (_LL, _MC)),
    ("acc_mutual_info", "mean", True, (_MC,)),
    ("acc_bytes", "mean", True, (_LL, _MC)),
    ("exact_match", "mean", True, (_GEN,)),
    ("perplexity", "perplexity", False, (_LL,)),
    ("likelihood", "mean", True, (_MC,)),
    ("word_perplexity", "weighted_perplexity", False, (_ROLL,)),
    ("byte_perplexity", "weighted_perplexity", False, (_ROLL,)),
    ("bits_per_byte", "bits_per_byte", False, (_ROLL,)),
    ("bypass", "bypass", True, (_LL, _MC, _GEN)),
    ("mcc", "matthews_corrcoef", True, (_MC,)),
    ("f1", "f1", True, (_MC,)),
    ("bleu", "bleu", True, (_GEN,)),
    ("chrf", "chrf", True, (_GEN,)),
    ("chrf++", "chrf++", True, (_GEN,)),
    ("ter", "ter", False, (_GEN,)),
    ("acc_all", "mean", True, (_LL,)),
)

METRICS: dict[str, Metric] = {
    name: Metric(name, AGGREGATIONS[agg], better, None, agg, types) for name, agg, better, types in _REGISTERED
}


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise _task_error(f"Unknown metric {name!r}; hfx implements {sorted(METRICS)}.")
    return METRICS[name]


# --- standard errors ------------------------------------------------------------------------

_BOOTSTRAPPED = (median, matthews_corrcoef, f1_score, perplexity, bleu, chrf, chrfpp, ter, nanmean)
_CLOSED_FORM = {mean: mean_stderr, acc_all: acc_all_stderr}
# lm-eval's own functions (reached through `!function lm_eval.api.metrics.x`) get the same rules.
_LM_EVAL_NAMES = {"median": median, "matthews_corrcoef": matthews_corrcoef, "f1_score": f1_score,
                  "perplexity": perplexity, "bleu": bleu, "chrf": chrf, "chrfpp": chrfpp, "ter": ter,
                  "nanmean": nanmean, "mean": mean, "acc_all": acc_all}


def _as_hfx(fn: Callable) -> Callable:
    if getattr(fn, "__module__", None) == "lm_eval.api.metrics":
        return _LM_EVAL_NAMES.get(getattr(fn, "__name__", ""), fn)
    return fn


def _resample_blocks(n: int, iters: int):
    """Index blocks ``(rows, n)`` of lm-eval's resamples, in its order.

    lm-eval draws ``iters // chunk`` chunks of ``chunk = min(1000, iters)`` resamples, chunk ``i``
    from ``random.Random(i)`` through ``choices``: index ``floor(random() * n)``. The same Mersenne
    Twister state is loaded into numpy, so the draws are identical while a block costs one gather.
    """
    chunk = min(1000, iters)
    rows_per_block = max(1, _BLOCK_ELEMENTS // max(n, 1))
    for i in range(iters // chunk if chunk > 0 else 0):
        state = random.Random(i).getstate()[1]
        generator = np.random.RandomState()
        generator.set_state(("MT19937", np.array(state[:624], dtype=np.uint32), state[624]))
        left = chunk
        while left:
            rows = min(rows_per_block, left)
            yield np.floor(generator.random_sample(rows * n) * n).astype(np.int64).reshape(rows, n)
            left -= rows


def _sequential_sums(values: np.ndarray, index: np.ndarray) -> list[float]:
    return np.cumsum(values[index], axis=1)[:, -1].tolist()  # left to right, as Python's sum


def _int_labels(items: Sequence) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        golds, preds = (np.asarray(c) for c in _golds_preds(items))
    except (TypeError, ValueError, IndexError):
        return None
    if golds.ndim != 1 or preds.shape != golds.shape or golds.dtype.kind not in "iub" or preds.dtype.kind not in "iub":
        return None
    return golds.astype(np.int64), preds.astype(np.int64)


def _f1_replicates(items: Sequence) -> Callable | None:
    labels = _int_labels(items)
    if labels is None or not set(np.unique(np.concatenate(labels)).tolist()) <= {0, 1}:
        return None
    golds, preds = labels
    tp, true, pred = golds & preds, golds, preds

    def replicates(index):
        both = tp[index].sum(axis=1) * 2.0
        denom = true[index].sum(axis=1) + pred[index].sum(axis=1) * 1.0
        return np.where(denom == 0, 0.0, both / np.where(denom == 0, 1.0, denom)).tolist()

    return replicates


def _mcc_replicates(items: Sequence) -> Callable | None:
    labels = _int_labels(items)
    if labels is None:
        return None
    classes, codes = np.unique(np.concatenate(labels), return_inverse=True)
    k, n = len(classes), len(labels[0])
    cell = codes[:n] * k + codes[n:]

    def replicates(index):
        rows = index.shape[0]
        counts = np.bincount((cell[index] + np.arange(rows)[:, None] * k * k).ravel(), minlength=rows * k * k)
        matrix = counts.reshape(rows, k, k).astype(np.float64)
        t_sum, p_sum = matrix.sum(axis=2), matrix.sum(axis=1)
        correct = np.trace(matrix, axis1=1, axis2=2)
        total = p_sum.sum(axis=1)
        cov_tp = correct * total - (t_sum * p_sum).sum(axis=1)
        cov_pp = total**2 - (p_sum * p_sum).sum(axis=1)
        cov_tt = total**2 - (t_sum * t_sum).sum(axis=1)
        product = cov_pp * cov_tt
        safe = np.where(product == 0, 1.0, product)
        return np.where(product == 0, 0.0, cov_tp / np.sqrt(safe)).tolist()

    return replicates


def _vectorised(fn: Callable, items: Sequence) -> Callable | None:
    """A function of an index block giving the replicates of ``fn``, or None (resample one by one)."""
    if fn in (f1_score, matthews_corrcoef):
        replicates = (_f1_replicates if fn is f1_score else _mcc_replicates)(items)
        full = np.arange(len(items))[None, :]
        if replicates is None or replicates(full)[0] != fn(items):  # scikit-learn has the last word
            return None
        return replicates
    try:
        values = np.asarray(items, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if values.ndim != 1:
        return None
    n = len(values)
    if fn is perplexity:
        return lambda index: [math.exp(-(total / n)) for total in _sequential_sums(values, index)]
    if fn is mean:
        return lambda index: [total / n for total in _sequential_sums(values, index)]
    if fn is median and not np.isnan(values).any():  # Python's sort of NaNs is order-dependent
        return lambda index: np.sort(values[index], axis=1)[:, n // 2].tolist()
    if fn is nanmean:
        def replicates(index):
            sample = values[index]
            missing = np.isnan(sample)
            counts = (~missing).sum(axis=1)
            totals = np.where(missing, 0.0, sample).sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(counts == 0, np.nan, totals / counts).tolist()
        return replicates
    return None


def bootstrap_stderr(items: Sequence, iters: int = BOOTSTRAP_ITERS, aggregation: str | Callable = "perplexity") -> float:
    """Standard error of ``aggregation(items)`` by resampling, with lm-eval's exact draws.

    Means, perplexity, median, nanmean, f1 and mcc are computed for a whole block of resamples at
    once (100 000 resamples of 5 000 documents: seconds instead of minutes); any other aggregation
    (bleu, chrf, ter, a task's own function) is called on each resample, as lm-eval does.
    """
    fn = _as_hfx(get_aggregation(aggregation) if isinstance(aggregation, str) else aggregation)
    items = list(items)
    n = len(items)
    if n < 2 or min(1000, iters) < 1:
        return float("nan")
    fast = _vectorised(fn, items)
    replicates: list = []
    for index in _resample_blocks(n, iters):
        if fast is not None:
            replicates.extend(fast(index))
        else:
            replicates.extend(fn([items[j] for j in row]) for row in index.tolist())
    if len(replicates) < 2:
        return float("nan")
    return sample_stddev(replicates)


def stderr_for_aggregation(aggregation: Callable, bootstrap_iters: int) -> Callable[[list], float] | None:
    """lm-eval's ``stderr_for_metric``: bootstrap, closed form, or None (reported as ``"N/A"``)."""
    if not isinstance(bootstrap_iters, int) or bootstrap_iters <= 0:
        return None
    fn = _as_hfx(aggregation)
    if fn in _BOOTSTRAPPED:
        return lambda items: bootstrap_stderr(items, bootstrap_iters, fn)
    return _CLOSED_FORM.get(fn)


def _resolve(metric_name: str, aggregation) -> tuple[Callable, Callable | None]:
    """``(aggregation function, stderr override)``; a name without an aggregation is averaged, as lm-eval does."""
    if aggregation is None:
        if metric_name in METRICS:
            metric = METRICS[metric_name]
            return metric.aggregate, metric.stderr
        return mean, None
    if isinstance(aggregation, str):
        return get_aggregation(aggregation), None
    if callable(aggregation):
        return aggregation, None
    raise _task_error(f"metric {metric_name!r}: aggregation must be a name in {sorted(AGGREGATIONS)} or a "
                      f"!function, got {aggregation!r}.")


def aggregate(metric_name: str, items: list, aggregation: str | Callable | None = None,
              bootstrap_iters: int | None = BOOTSTRAP_ITERS) -> tuple[object, object]:
    """``(value, stderr)`` of one metric over its per-document items, as lm-eval reports them.

    ``aggregation``: None (the metric's default; ``mean`` for a name lm-eval does not register),
    a registered name, or a task's own function. The stderr is ``"N/A"`` where lm-eval writes it.
    """
    fn, override = _resolve(metric_name, aggregation)
    try:
        value = fn(items)
    except Exception as exc:  # noqa: BLE001 - one line naming the metric, whatever the function raised
        from .templates import TaskError

        if isinstance(exc, TaskError):
            raise
        label = aggregation if isinstance(aggregation, str) else getattr(fn, "__name__", repr(fn))
        raise _task_error(f"aggregation {label!r} of metric {metric_name!r} failed on {len(items)} items: "
                          f"{type(exc).__name__}: {exc}") from None
    if not isinstance(bootstrap_iters, int) or bootstrap_iters <= 0 or len(items) <= 1:
        return value, "N/A"
    if override is not None:
        return value, override(items)
    iters = min(bootstrap_iters, CORPUS_BOOTSTRAP_CAP) if metric_name in CORPUS_METRICS else bootstrap_iters
    stderr = stderr_for_aggregation(fn, iters)
    return value, ("N/A" if stderr is None else stderr(items))


# --- per-document items ---------------------------------------------------------------------


def argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def softmax(values: Sequence[float]) -> np.ndarray:
    shifted = np.exp(np.asarray(values) - np.max(values))
    return shifted / shifted.sum()


def multiple_choice_scores(lls: Sequence[float], greedy: Sequence[bool], choices: list[str], gold, *,
                           lls_unconditional: Sequence[float] | None = None,
                           multiple_target: bool | None = None, metrics: Iterable[str] | None = None) -> dict:
    """Every item lm-eval's multiple_choice ``process_results`` gives one document.

    ``gold``: an index, a choice, or (``multiple_target``, by default when ``gold`` is a list) a
    list of indices; out-of-range golds become -100, as in lm-eval. Items: acc, acc_norm,
    acc_bytes, exact_match (the gold continuation is the greedy one), f1 / mcc ``(gold, pred)``,
    brier_score ``(gold, softmax(lls))``, likelihood ``(gold, lls)``, and acc_mutual_info (argmax
    of conditional minus unconditional log-likelihood) when ``lls_unconditional`` is given.
    ``metrics`` limits the result to those names.
    """
    wanted = None if metrics is None else set(metrics)
    if multiple_target is None:
        multiple_target = isinstance(gold, list)
    lls = tuple(lls)
    lengths = np.array([float(len(c)) for c in choices])
    sizes = np.array([float(len(c.encode("utf-8"))) for c in choices])
    with np.errstate(divide="ignore", invalid="ignore"):
        pred, pred_norm, pred_bytes = np.argmax(lls), np.argmax(lls / lengths), np.argmax(lls / sizes)
    if isinstance(gold, list):
        gold = [g if g < len(choices) else -100 for g in gold]
    elif isinstance(gold, int):
        gold = gold if gold < len(choices) else -100
    elif isinstance(gold, str):
        gold = choices.index(gold) if gold in choices else -100
    try:
        if multiple_target:
            scores = {"acc": 1.0 if pred in gold else 0.0, "acc_norm": 1.0 if pred_norm in gold else 0.0,
                      "acc_bytes": 1.0 if pred_bytes in gold else 0.0,
                      "exact_match": int(any(greedy[g] if g != -100 else 0 for g in gold))}
        else:
            scores = {"acc": 1.0 if pred == gold else 0.0, "acc_norm": 1.0 if pred_norm == gold else 0.0,
                      "acc_bytes": 1.0 if pred_bytes == gold else 0.0,
                      "exact_match": int(greedy[gold]) if gold != -100 else 0}
        if lls_unconditional is not None:
            if len(lls_unconditional) != len(lls):
                raise _task_error(f"{len(lls_unconditional)} unconditional log-likelihoods for {len(lls)} choices.")
            mutual = [c - u for c, u in zip(lls, lls_unconditional)]
            scores["acc_mutual_info"] = 1.0 if np.argmax(mutual) == gold else 0.0
    except (TypeError, ValueError, IndexError) as exc:
        raise _task_error(f"gold {gold!r} cannot be scored against {len(choices)} choices: {exc} "
                          "(lm-eval 0.4.13 fails here too).") from None
    scores.update(f1=(gold, pred), mcc=(gold, pred), brier_score=(gold, softmax(lls)), likelihood=(gold, lls))
    if lls_unconditional is None and wanted is not None and "acc_mutual_info" in wanted:
        raise _task_error("acc_mutual_info needs the unconditional log-likelihood of each choice.")
    return scores if wanted is None else {m: v for m, v in scores.items() if m in wanted}


def loglikelihood_items(ll: float, is_greedy: bool, metrics: Iterable[str]) -> dict:
    """A loglikelihood document's items: lm-eval computes only ``perplexity`` and ``acc`` here."""
    wanted = set(metrics)
    items = {"perplexity": ll, "acc": int(is_greedy)}
    return {m: v for m, v in items.items() if m in wanted}


def rolling_items(ll: float, words: int, size: int, metrics: Iterable[str]) -> dict:
    """A loglikelihood_rolling document's ``(loglikelihood, weight)`` items (words or UTF-8 bytes)."""
    wanted = set(metrics)
    items = {"word_perplexity": (ll, words), "byte_perplexity": (ll, size), "bits_per_byte": (ll, size)}
    return {m: v for m, v in items.items() if m in wanted}


def exact_match(prediction: str, reference: str, *, regexes_to_ignore=None, ignore_case=False,
                ignore_punctuation=False, ignore_numbers=False, **_) -> float:
    """exact_match of one prediction string against one reference string."""
    for pattern in regexes_to_ignore or ():
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    for flag, chars in ((ignore_punctuation, string.punctuation), (ignore_numbers, string.digits)):
        if flag:
            table = str.maketrans("", "", chars)
            prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


def exact_match_score(references, predictions, regexes_to_ignore=None, ignore_case=False,
                      ignore_punctuation=False, ignore_numbers=False):
    """lm-eval's (Hugging Face evaluate's) exact_match over aligned arrays, numpy broadcasting included.

    A filtered response that is a list (no ``take_first``) is a row compared with every gold; an
    empty ``regexes_to_ignore`` leaves Python lists, compared as wholes, as in lm-eval.
    """
    if regexes_to_ignore is not None:
        for pattern in regexes_to_ignore:
            predictions = np.array([re.sub(pattern, "", x) for x in predictions])
            references = np.array([re.sub(pattern, "", x) for x in references])
    else:
        predictions, references = np.asarray(predictions), np.asarray(references)
    if ignore_case:
        predictions, references = np.char.lower(predictions), np.char.lower(references)
    for flag, chars in ((ignore_punctuation, string.punctuation), (ignore_numbers, string.digits)):
        if flag:
            table = str.maketrans("", "", chars)
            predictions = np.char.translate(predictions, table=table)
            references = np.char.translate(references, table=table)
    return np.mean(predictions == references)


def generate_gold(gold, result, *, choices: list | None = None, multiple_target: bool = False,
                  metric_names: Iterable[str] = ()):
    """The gold lm-eval scores a generate_until response against.

    An index into ``choices`` when the task has ``doc_to_choice``; ``list(gold)`` for a
    multiple-target task (a string gold becomes its characters there, as in lm-eval); otherwise
    cast to the response's type unless the response is a list or a metric is ``bypass``.
    """
    try:
        if choices is not None:
            return choices[gold]
        if multiple_target:
            return list(gold)
        if type(gold) is not type(result) and not ("bypass" in set(metric_names) or isinstance(result, list)):
            return type(result)(gold)
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        raise _task_error(f"gold {gold!r} cannot be compared with the response {result!r}: {exc} "
                          "(lm-eval 0.4.13 fails here too).") from None
    return gold


def _call_metric(name: str, fn: Callable | None, references: list, predictions: list, options: dict):
    """lm-eval's call: ``fn(references=, predictions=, **options)``, else ``fn([gold, result])``."""
    if fn is None:
        if name == "exact_match":
            try:
                return {"exact_match": exact_match_score(references, predictions, **options)}
            except (TypeError, ValueError, re.error) as exc:
                raise _task_error(f"exact_match with options {sorted(options)} cannot compare {predictions!r} "
                                  f"with {references!r}: {exc} (lm-eval 0.4.13 fails here too).") from None
        get_metric(name)
        return None if name == "bypass" else [references[0], predictions[0]]  # lm-eval's passthroughs
    try:
        try:
            return fn(references=references, predictions=predictions, **options)
        except TypeError:
            return fn([references[0], predictions[0]])
    except Exception as exc:  # noqa: BLE001 - the hook's error, in one line naming it
        raise _task_error(f"metric {name!r} ({getattr(fn, '__qualname__', fn)}) raised "
                          f"{type(exc).__name__}: {exc}") from None


def generate_item(metric_name: str, gold, result, options: dict | None = None, *,
                  multiple_target: bool | None = None, fn: Callable | None = None):
    """One metric's item for a generate_until response, ``gold`` already prepared (:func:`generate_gold`).

    exact_match scores the mean match (a list response: the share of its items that match); other
    registered metrics give ``[gold, result]`` (what bleu / chrf / ter aggregate), bypass ``None``;
    ``fn`` (a task's own metric) is called as lm-eval calls it and may return a dict of scores.
    With several golds (``multiple_target``, by default when ``gold`` is a list) the item is 1.0
    when any gold scores: exact_match compares one copy of the response with each gold.
    """
    opts = dict(options or {})
    if multiple_target is None:
        multiple_target = isinstance(gold, list)
    if not multiple_target:
        score = _call_metric(metric_name, fn, [gold], [result], opts)
        return score[metric_name] if isinstance(score, dict) and list(score) == [metric_name] else score
    golds = gold if isinstance(gold, list) else [gold]
    if metric_name == "exact_match":
        copies = [result for _ in golds]
        if fn is None:
            score = _call_metric(metric_name, None, golds, copies, opts)["exact_match"]
        else:
            score = fn(references=golds, predictions=copies, **opts)["exact_match"]
        return 1.0 if score > 0.0 else 0.0
    scores = []
    for option in golds:
        score = _call_metric(metric_name, fn, [option], [result], opts)
        scores.append(score[metric_name] if isinstance(score, dict) else score)
    return 1.0 if any(scores) else 0.0


def generate_items(metrics: Mapping[str, dict] | Iterable[str], gold, result, *, choices: list | None = None,
                   multiple_target: bool = False, functions: Mapping[str, Callable] | None = None) -> dict:
    """Every metric's item for one generate_until document, as lm-eval's ``process_results`` gives them.

    ``gold`` is the document's target (prepared here by :func:`generate_gold`); ``metrics`` maps
    names to their ``metric_list`` options, in order: under ``multiple_target`` lm-eval's
    exact_match replaces the response by one copy per gold for the metrics after it, and so does
    this. ``functions`` gives a task's own metric functions by name; a dict they return
    contributes its keys.
    """
    options = dict(metrics) if isinstance(metrics, Mapping) else {m: {} for m in metrics}
    functions = functions or {}
    gold = generate_gold(gold, result, choices=choices, multiple_target=multiple_target, metric_names=options)
    items: dict = {}
    for name, opts in options.items():
        fn = functions.get(name)
        if not multiple_target:
            score = _call_metric(name, fn, [gold], [result], dict(opts or {}))
            if isinstance(score, dict):
                items.update(score)
            else:
                items[name] = score
            continue
        if not isinstance(gold, list):
            gold = [gold]
        items[name] = generate_item(name, gold, result, opts, multiple_target=True, fn=fn)
        if name == "exact_match":
            result = [result for _ in gold]
    return items
