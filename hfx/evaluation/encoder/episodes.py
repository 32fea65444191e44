"""Episodic sampling for n-way k-shot evaluation.

An episode draws ``n_way`` classes, then ``k_shot + n_query`` distinct examples of each class
without replacement: the first ``k_shot`` are the support set, the rest the queries, so a query
is never in its own support set. Episode ``i`` is drawn from ``numpy.random.default_rng([seed, i])``:
it depends only on the seed and its index, so the first 10 episodes of a 600-episode run are the
same 10 episodes as a 10-episode run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Episode:
    """Row indices into the dataset; ``classes[j]`` is the label of prototype ``j``."""

    index: int
    classes: tuple
    support: np.ndarray  # (n_way, k_shot)
    query: np.ndarray  # (n_way, n_query)


def group_by_label(labels: Sequence) -> dict:
    """Label -> array of row indices, labels in sorted order (as strings, so ints and strs sort alike)."""
    groups: dict = {}
    for row, label in enumerate(labels):
        groups.setdefault(label, []).append(row)
    return {label: np.asarray(groups[label]) for label in sorted(groups, key=str)}


def _check_counts(name: str, value, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _check_sizes(groups: dict, need: int, what: str, rule: str) -> None:
    short = {c: len(rows) for c, rows in groups.items() if len(rows) < need}
    if short:
        detail = ", ".join(f"class {c!r} has {count}" for c, count in short.items())
        raise ValueError(f"every class needs at least {rule} = {need} examples in the {what}; {detail}.")


def check_episode_spec(groups: dict, n_way: int, k_shot: int, n_query: int, episodes: int,
                       support_groups: dict | None = None) -> None:
    """Raise ``ValueError`` for a spec the data cannot satisfy, naming the offending classes and counts."""
    for name, value, minimum in (("n_way", n_way, 2), ("k_shot", k_shot, 1), ("n_query", n_query, 1),
                                 ("episodes", episodes, 1)):
        _check_counts(name, value, minimum)
    if support_groups is not None and set(support_groups) != set(groups):
        only = sorted(set(support_groups) ^ set(groups), key=str)
        raise ValueError(f"classes {only} are in only one of the support data and the query data (with hfx eval, "
                         "--limit or --samples keeps only some query documents and can leave a class out: raise "
                         "the limit or leave it off).")
    if n_way > len(groups):
        raise ValueError(
            f"n_way={n_way} is larger than the number of classes in the data ({len(groups)}: {list(groups)})."
        )
    if support_groups is None:
        _check_sizes(groups, k_shot + n_query, "data", f"k_shot + n_query = {k_shot} + {n_query}")
    else:
        _check_sizes(support_groups, k_shot, "support data", "k_shot")
        _check_sizes(groups, n_query, "query data", "n_query")


def sample_episodes(labels: Sequence, n_way: int, k_shot: int, n_query: int, episodes: int, seed: int = 1234,
                    support_labels: Sequence | None = None) -> list[Episode]:
    """Draw ``episodes`` episodes from a column of labels (see the module docstring).

    With ``support_labels`` the support rows index that column (another split) and the queries
    ``labels``; otherwise both come from ``labels``, disjoint within each episode.
    """
    groups = group_by_label(labels)
    support_groups = None if support_labels is None else group_by_label(support_labels)
    check_episode_spec(groups, n_way, k_shot, n_query, episodes, support_groups)
    classes = list(groups)
    drawn = []
    for i in range(episodes):
        rng = np.random.default_rng([seed, i])
        chosen = [classes[c] for c in sorted(rng.choice(len(classes), size=n_way, replace=False).tolist())]
        if support_groups is None:
            rows = np.stack([rng.choice(groups[c], size=k_shot + n_query, replace=False) for c in chosen])
            support, query = rows[:, :k_shot], rows[:, k_shot:]
        else:
            support = np.stack([rng.choice(support_groups[c], size=k_shot, replace=False) for c in chosen])
            query = np.stack([rng.choice(groups[c], size=n_query, replace=False) for c in chosen])
        drawn.append(Episode(i, tuple(chosen), support, query))
    return drawn
