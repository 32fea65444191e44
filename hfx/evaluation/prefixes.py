"""Shared token prefixes: which sequences to run after one common prefix, for the scorer and for generation.

Both the log-likelihood scorer (:func:`hfx.evaluation.scorer.shared_prefix_groups`) and batched greedy
generation (:func:`hfx.evaluation.generation.shared_prefix`) compute a few-shot block's keys/values
once for every sequence that starts with it. They choose those sequences the same way, here, and
differ only in their thresholds (each module's own constants).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise


def prefix_groups(
    sequences: Sequence[Sequence[int]], min_prefix: int, min_saving: int = 1, max_groups: int | None = None
) -> list[tuple[int, list[int]]]:
    """``(prefix length, indices)`` of groups of sequences sharing a token prefix, the most saving first.

    The prefix is a common prefix of the token lists, so a sequence joins a group only when its own
    tokens start with it (BPE merging across a boundary, or a left cut, simply leaves it out). Each
    prefix leaves at least the last token of every member to the member's own forward (its logits
    give the first scored or generated token).

    Sorted lexicographically, sequences sharing a prefix are adjacent, and the longest common prefix
    of a run is the minimum of its neighbours' common prefixes; the run saving the most computation,
    ``(members - 1) × prefix``, is the largest rectangle under that histogram, among prefixes of at
    least ``min_prefix`` tokens. Groups are taken greedily (the rest of the sequences on either side
    of the run searched again) until none has a prefix of ``min_prefix`` tokens saving ``min_saving``
    tokens, or ``max_groups`` are taken. Indices within a group are ascending.
    """
    order = sorted(range(len(sequences)), key=lambda i: list(sequences[i]))
    lcp = []
    for a, b in pairwise(order):
        x, y = sequences[a], sequences[b]
        limit = min(len(x), len(y)) - 1
        k = 0
        while k < limit and x[k] == y[k]:
            k += 1
        lcp.append(k)
    groups, segments = [], [(0, len(order) - 1)]
    while segments and (max_groups is None or len(groups) < max_groups):
        lo, hi = segments.pop()
        if hi <= lo:
            continue
        best = largest_rectangle(lcp, lo, hi - 1, max(1, min_prefix))
        if best is None:
            continue
        height, first, last = best  # lcp[first..last] >= height: sequences order[first .. last + 1]
        if (last - first + 1) * height < min_saving:
            continue
        groups.append((height, sorted(order[i] for i in range(first, last + 2))))
        segments += [(lo, first - 1), (last + 2, hi)]
    return groups


def largest_rectangle(heights: Sequence[int], lo: int, hi: int, floor: int):
    """``(height, first, last)`` maximising ``(last - first + 1) × min(heights[first..last])`` over
    ``lo ≤ first ≤ last ≤ hi`` with every height ``≥ floor`` (``floor ≥ 1``); None when no height qualifies.
    Ties go to the run found first (the leftmost)."""
    best, stack = None, []  # stack of (start index, height), heights increasing
    for i in range(lo, hi + 2):
        h = heights[i] if i <= hi and heights[i] >= floor else 0
        start = i
        while stack and stack[-1][1] >= h:
            start, top = stack.pop()
            if top and (best is None or (i - start) * top > (best[2] - best[1] + 1) * best[0]):
                best = (top, start, i - 1)
        stack.append((start, h))
    return best
