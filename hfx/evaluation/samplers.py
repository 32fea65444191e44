"""Few-shot samplers that draw the same demonstrations as lm-eval 0.4.13 for the same seed.

``default``: one ``random.Random(seed)`` per task, shared by all documents in document order;
``rng.sample(pool, k)`` per document, or ``k + 1`` draws with the evaluated document removed when
the pool is the evaluated split. ``first_n``: the first ``k`` documents of the pool.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


class RandomSampler:
    """lm-eval's ``default`` sampler."""

    def __init__(self, pool: Sequence[dict], rng: random.Random):
        self.pool, self.rng = list(pool), rng

    def sample(self, k: int, eval_doc: dict | None = None) -> list[dict]:
        if k == 0:
            return []
        if eval_doc is None:
            return self.rng.sample(self.pool, k)
        drawn = [d for d in self.rng.sample(self.pool, k + 1) if d != eval_doc][:k]
        if len(drawn) < k:  # the pool holds copies of eval_doc: redraw without any of them
            drawn = self.rng.sample([d for d in self.pool if d != eval_doc], k)
        return drawn


class FirstNSampler(RandomSampler):
    """lm-eval's ``first_n`` sampler: canonical, ordered demonstrations."""

    def sample(self, k: int, eval_doc: dict | None = None) -> list[dict]:
        pool = [d for d in self.pool if d != eval_doc] if eval_doc is not None else self.pool
        return pool[:k]


SAMPLERS: dict[str, type[RandomSampler]] = {"default": RandomSampler, "first_n": FirstNSampler}


def get_sampler(name: str) -> type[RandomSampler]:
    if name not in SAMPLERS:
        from .templates import TaskError

        raise TaskError(f"Unknown fewshot_config.sampler {name!r}; available: {sorted(SAMPLERS)}.")
    return SAMPLERS[name]
