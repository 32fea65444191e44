"""Run by tests/test_eval_distributed.py under torchrun: ``hfx eval`` in-process, optionally crashing one rank.

``HFX_TEST_EXIT_RANK=r`` makes rank ``r`` exit (code 3, no clean-up, as a kill would) right
after the first batch of its second scoring call is in the result cache. By then both ranks have
written their whole share of the first call (it ended in a collective), and rank ``r`` part of the
second: what a resumed run must read back from both ranks' files.
"""

from __future__ import annotations

import os
import sys


def _exit_in_second_call() -> None:
    from hfx.evaluation.cache import ResultCache
    from hfx.evaluation.distributed import DataParallelScorer

    calls = []
    put_many = ResultCache.put_many

    def counted(method):
        def call(self, *args, **kwargs):
            calls.append(method.__name__)
            return method(self, *args, **kwargs)
        return call

    def exiting_put_many(self, items):
        put_many(self, items)
        if items and len(calls) >= 2:
            os._exit(3)

    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        setattr(DataParallelScorer, name, counted(getattr(DataParallelScorer, name)))
    ResultCache.put_many = exiting_put_many


if __name__ == "__main__":
    if os.environ.get("HFX_TEST_EXIT_RANK") == os.environ.get("RANK"):
        _exit_in_second_call()
    from hfx.cli import main

    sys.exit(main(sys.argv[1:]))
