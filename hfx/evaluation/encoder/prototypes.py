"""Nearest-prototype classification and the episode statistics the few-shot literature reports."""

from __future__ import annotations

import math

import torch

DISTANCES = ("cosine", "euclidean")


def check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"distance={distance!r} is invalid; valid values: {list(DISTANCES)}.")


def similarity(queries: torch.Tensor, references: torch.Tensor, distance: str) -> torch.Tensor:
    """(Q, H) x (C, H) -> (Q, C) scores, higher is closer: cosine similarity or minus euclidean distance."""
    check_distance(distance)
    if distance == "cosine":
        return torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(references, dim=-1).T
    return -torch.cdist(queries.double(), references.double()).to(queries.dtype)


def prototypes(support: torch.Tensor) -> torch.Tensor:
    """(C, K, H) support embeddings -> (C, H) class means."""
    return support.mean(1)


def classify(queries: torch.Tensor, support: torch.Tensor, distance: str) -> torch.Tensor:
    """Index of the nearest prototype for each query (ties go to the lower index)."""
    return similarity(queries, prototypes(support), distance).argmax(-1)


def mean_and_ci95(values) -> tuple[float, float, float]:
    """Mean, standard error (sample std / sqrt(n)) and the 95% half-width 1.96 * stderr."""
    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan"), float("nan")
    stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)
    return mean, stderr, 1.96 * stderr
