"""Data-parallel evaluation: N processes (``torchrun`` / ``accelerate launch``) each score a shard, every rank merges.

:func:`process_group` reads the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` / ``MASTER_PORT``: torchrun and ``accelerate launch`` set the same variables) and
initialises ``torch.distributed`` once: gloo on CPU, NCCL on CUDA, where rank ``r`` runs on
``cuda:LOCAL_RANK``. Outside a launcher it returns a world of one and initialises nothing.

:class:`DataParallelScorer` wraps a scorer and answers the same three calls. Each call's requests
are dealt out, every rank scores its share, and one ``all_gather_object`` brings every share to
every rank, where the results are put back in request order. So every rank returns the full list,
computes the same metrics and builds the same results; only the main rank writes them.

How requests are dealt out keeps what makes the scorer fast:

- ``loglikelihood`` and ``loglikelihood_rolling`` on :class:`~hfx.evaluation.scorer.CausalLMScorer`:
  every rank tokenises the whole call and forms the scorer's own plan (a context and all its
  continuations in one row, rows sharing a few-shot prefix grouped after it, token-budget
  batches), the same on every rank; whole *batches* are then dealt out, costliest first, to the
  rank with the fewest tokens so far (LPT), through the scorer's ``data_parallel`` hook. A batch
  is computed exactly as one process computes it, so every log-likelihood is bitwise one process's.
  Ranks bound shared-prefix batches by the same memory (the smallest rank's, agreed once when the
  wrapper is built). The plans are fingerprinted and compared in one small gather before any
  forward: ranks that formed different batches (another cache state) deal the call out by context
  groups instead, before any work is done, never merging the wrong rows. Each rank also remembers (in memory) what the others scored, so the cache
  and hence the next call's plan stay the same on every rank.
- With ``batch_size="auto"`` (a budget each rank measures for itself) and on scorers without the
  hook, requests sharing a context form one *context group*, dealt out whole by token count. A
  rank's batches then hold other rows than one process's: the padded width and number of rows
  differ, so matrix kernels may add in another order, and a log-likelihood can differ in its last
  bits (one fp32 ulp: ~4e-6 at -40); metrics are equal unless two choices tie to within that.
- ``generate_until``: requests with the same generation kwargs are sorted by prompt length and cut
  into chunks of the scorer's batch size; whole chunks are dealt out, so each rank's batches are
  runs of similar lengths, as one process would form them. Greedy decoding is per row, but a
  rank's batches may be padded to other widths than one process's: as for log-likelihoods, float
  rounding can then differ in the last bits and flip an argmax between two near-tied tokens, so a
  generation can differ from one process's where the model is that undecided.

The result cache is shared: every rank reads every writer's file of the same model identity and
appends to its own (:class:`~hfx.evaluation.cache.ResultCache`), so a killed N-process run resumes,
with any number of processes, from what every rank scored.

Why ``all_gather_object``: a request's result is a float and a bool (or a short string); tens of
thousands of them pickle to a few hundred kilobytes, gathered once per task, next to seconds of
forward passes. It also carries a rank's error, so one rank's failure is raised on every rank
instead of leaving the others waiting in the collective.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .cache import request_key
from .evaluator import EvaluationInputError

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
DEFAULT_GENERATION_CHUNK = 8
logger = logging.getLogger(__name__)


class DistributedSetupError(EvaluationInputError):
    """A launched world that cannot run data-parallel evaluation; raised before the model loads (``hfx eval``
    reports it as a usage error)."""


class DistributedScoringError(RuntimeError):
    """Another rank failed while scoring its share; this rank stops with its message."""


class PlansDiffer(DistributedScoringError):
    """The ranks formed other batches from the same requests; the call is dealt out again by context groups."""


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in the world, and the one collective the evaluation needs.

    ``device``: where this rank's model belongs (``cuda:LOCAL_RANK`` on CUDA), or ``None`` when
    the world is one process and the caller's own device choice stands.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device | None = None
    gather: Callable[[Any], list] | None = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.gather is not None:
            return self.gather(obj)
        if self.world_size == 1:
            return [obj]
        gathered: list = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        if default is None:
            raise DistributedSetupError(f"{name} is not set; launch with torchrun (or accelerate launch), which sets "
                                        f"{', '.join(LAUNCH_VARIABLES)} and LOCAL_RANK.")
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedSetupError(f"{name}={raw!r} is not an integer.") from None


def _device_type(device) -> str:
    """``cpu`` / ``cuda`` / ``mps`` / ... of a device argument; ``None`` and ``auto`` as ``--device auto`` picks."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    return torch.device(device).type


_DESTROY_REGISTERED = False


def process_group(device=None, *, device_map=None) -> ProcessGroup:
    """The launched world (``WORLD_SIZE`` > 1) with ``torch.distributed`` initialised, else a world of one.

    ``device``: the model's device as ``--device`` gives it. With several processes ``cuda`` (or
    ``auto`` on a CUDA machine) means ``cuda:LOCAL_RANK`` for each rank; an explicit ``cuda:N``
    other than ``cuda:LOCAL_RANK`` is refused (every rank would load onto the same GPU). ``cpu`` runs on gloo; other
    device types have no backend here and are refused. ``device_map`` (``device_map`` /
    ``parallelize`` model arguments) spreads one model over several devices, which data-parallel
    evaluation cannot do: each rank needs a whole model, so it is refused in a launched world.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size < 1:
        raise DistributedSetupError(f"WORLD_SIZE={world_size} must be at least 1.")
    if world_size == 1:
        return ProcessGroup()
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world_size:
        raise DistributedSetupError(f"RANK={rank} is outside the world of WORLD_SIZE={world_size}.")
    if device_map not in (None, False, "", {}):
        raise DistributedSetupError(
            f"a model spread by device_map={device_map!r} (or parallelize=True) cannot run in a world of {world_size} "
            "processes: data-parallel evaluation needs a whole model on each rank; launch one process to spread a "
            "model, or drop device_map to run one copy per rank")
    kind = _device_type(device)
    if kind not in BACKENDS:
        raise DistributedSetupError(
            f"--device {device} cannot run in a world of {world_size} processes: data-parallel evaluation runs on "
            f"{' or '.join(f'{k} ({b})' for k, b in BACKENDS.items())}; launch one process for {kind}")
    target = torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DistributedSetupError(f"--device {device}: CUDA is not available in this process (a world of "
                                        f"{world_size}); use --device cpu")
        explicit = torch.device(device) if device not in (None, "auto") else torch.device("cuda")
        if explicit.index is not None and explicit.index != local_rank:
            raise DistributedSetupError(
                f"--device {device} on rank {rank} (LOCAL_RANK={local_rank}) of a world of {world_size} processes: "
                "every rank would use the same GPU; give --device cuda, and each rank uses cuda:LOCAL_RANK (choose "
                "the GPUs with CUDA_VISIBLE_DEVICES)")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise DistributedSetupError(
                f"LOCAL_RANK={local_rank} has no GPU: this machine shows {count}; start at most {count} processes "
                "per machine (--nproc_per_node)")
        target = torch.device("cuda", local_rank)
        torch.cuda.set_device(target)
    backend = BACKENDS[kind]
    dist = torch.distributed
    if not dist.is_available():
        raise DistributedSetupError("this torch build has no torch.distributed; launch one process")
    if dist.is_initialized():  # e.g. accelerate's state or the caller initialised it: use that world
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise DistributedSetupError(
                f"torch.distributed is already initialised as rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"but the environment says rank {rank} of {world_size}")
        backend = dist.get_backend()
    else:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise DistributedSetupError(f"{name} is not set; launch with torchrun (or accelerate launch), which "
                                            f"sets {', '.join(LAUNCH_VARIABLES)} and LOCAL_RANK.")
        kwargs = {"device_id": target} if kind == "cuda" else {}
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size, **kwargs)
        global _DESTROY_REGISTERED
        if not _DESTROY_REGISTERED:
            atexit.register(_destroy)
            _DESTROY_REGISTERED = True
    return ProcessGroup(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend, device=target)


def _destroy() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# -- dealing out work ------------------------------------------------------------------------
def deal(costs: Sequence[float], world_size: int) -> list[list[int]]:
    """Unit indices per rank: the costliest unit first, each to the rank with the least cost so far.

    Deterministic (ties go to the lower index and the lower rank), so every rank computes the same
    deal from the same requests without talking to the others. Each rank's list is ascending.
    """
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    loads = [0.0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in order:
        r = min(range(world_size), key=lambda j: (loads[j], len(shares[j]), j))
        shares[r].append(i)
        loads[r] += max(float(costs[i]), 1.0)  # an empty unit still costs a slot
    return [sorted(s) for s in shares]


def _lengths(tokenizer, texts: Sequence[str]) -> list[int]:
    """Token counts of ``texts`` (one batched call), else character counts: only used to balance the deal."""
    if not texts:
        return []
    try:
        ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        if len(ids) == len(texts):
            return [len(x) for x in ids]
    except Exception:  # noqa: BLE001  a cost estimate; any tokenizer failure falls back to characters
        pass
    return [len(t) for t in texts]


def context_groups(requests: Sequence[tuple[str, str]]) -> list[list[int]]:
    """Request indices per context, in order of first appearance.

    The scorer moves a context's trailing whitespace to the continuation, so contexts that differ
    only there encode to the same tokens and pack into one row: they are one group here too.
    """
    groups: dict[str, list[int]] = {}
    for i, (context, _) in enumerate(requests):
        groups.setdefault(context.rstrip() if context.strip() else context, []).append(i)
    return list(groups.values())


def shard_loglikelihood(requests: Sequence[tuple[str, str]], world_size: int, tokenizer=None) -> list[list[int]]:
    """Request indices per rank: whole context groups, balanced by tokens (context once plus every continuation)."""
    groups = context_groups(requests)
    contexts = [requests[g[0]][0] for g in groups]
    continuations = [requests[i][1] for g in groups for i in g]
    measure = (lambda texts: _lengths(tokenizer, texts)) if tokenizer is not None else (lambda t: [len(x) for x in t])
    context_cost = measure(contexts)
    cont_cost = iter(measure(continuations))
    costs = [context_cost[n] + sum(next(cont_cost) for _ in g) for n, g in enumerate(groups)]
    return [sorted(i for n in share for i in groups[n]) for share in deal(costs, world_size)]


def shard_rolling(texts: Sequence[str], world_size: int, tokenizer=None) -> list[list[int]]:
    costs = _lengths(tokenizer, texts) if tokenizer is not None else [len(t) for t in texts]
    return deal(costs, world_size)


def _kwargs_key(kwargs) -> str:
    return json.dumps(kwargs or {}, sort_keys=True, default=repr)


def shard_generation(requests: Sequence[tuple[str, dict]], world_size: int, tokenizer=None,
                     chunk: int = DEFAULT_GENERATION_CHUNK) -> list[list[int]]:
    """Request indices per rank: per generation-kwargs group, length-sorted chunks of ``chunk`` requests, dealt whole.

    A chunk's cost is its rows times (longest prompt + new tokens): what a left-padded batch of it costs.
    """
    lengths = _lengths(tokenizer, [c for c, _ in requests]) if tokenizer is not None else [len(c) for c, _ in requests]
    by_kwargs: dict[str, list[int]] = {}
    for i, (_, kwargs) in enumerate(requests):
        by_kwargs.setdefault(_kwargs_key(kwargs), []).append(i)
    chunks, costs = [], []
    for members in by_kwargs.values():
        kwargs = requests[members[0]][1] or {}
        new = kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", 256))
        new = new if isinstance(new, int) else 256
        members = sorted(members, key=lambda i: (-lengths[i], i))
        for start in range(0, len(members), chunk):
            part = members[start:start + chunk]
            chunks.append(part)
            costs.append(len(part) * (lengths[part[0]] + new))
    return [sorted(i for n in share for i in chunks[n]) for share in deal(costs, world_size)]


# -- the wrapper -----------------------------------------------------------------------------
class BatchDealer:
    """The scorer's ``data_parallel`` hook: deals out the batches every rank formed alike, merges their results."""

    def __init__(self, group: ProcessGroup, cache=None):
        self.group, self.cache = group, cache
        self.pending: tuple[list[list[int]], str] | None = None  # after select, until merge

    def select(self, units) -> list[int]:
        """``units``: ``(shared prefix length, rows)`` per batch. This rank's batches, by LPT on the tokens run."""
        costs = [len(rows) * (max(r.length for r in rows) - skip) for skip, rows in units]
        shares = deal(costs, self.group.world_size)
        slots = [[s for r in rows for s in r.slots] for _, rows in units]
        fingerprint = request_key(slots)
        # one small gather before any forward: ranks that formed other batches all learn it here, and the
        # call is dealt out by contexts before any batch has run
        self._check(self.group.all_gather({"plan": fingerprint, "error": None}), fingerprint)
        self.pending = ([[s for i in share for s in slots[i]] for share in shares], fingerprint)
        return shares[self.group.rank]

    def merge(self, results: list, keys: list[str]) -> list:
        by_rank, fingerprint = self.pending
        self.pending = None
        mine = by_rank[self.group.rank]
        gathered = self.group.all_gather({"plan": fingerprint, "results": [list(results[s]) for s in mine],
                                          "error": None})
        self._check(gathered, fingerprint)
        remote = {}
        for rank, part in enumerate(gathered):
            if rank == self.group.rank:
                continue
            for slot, value in zip(by_rank[rank], part["results"]):
                results[slot] = (float(value[0]), bool(value[1]))
                remote[keys[slot]] = [float(value[0]), bool(value[1])]
        if self.cache is not None and hasattr(self.cache, "remember"):
            self.cache.remember(remote)  # the next call's cache hits, hence its plan, are the same on every rank
        return results

    def fail(self, exc: BaseException) -> None:
        """This rank failed between select and merge: tell the others, who wait in merge's gather."""
        fingerprint = self.pending[1] if self.pending else None
        self.pending = None
        self.group.all_gather({"plan": fingerprint, "results": [],
                               "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"})

    def _check(self, gathered, fingerprint) -> None:
        failed = [(r, p["error"]) for r, p in enumerate(gathered) if p["error"] is not None]
        if failed:
            rank, message = failed[0]
            raise DistributedScoringError(f"rank {rank} of {self.group.world_size} failed while scoring: {message}")
        differing = [r for r, p in enumerate(gathered) if p["plan"] != fingerprint]
        if differing:
            raise PlansDiffer(
                f"ranks {differing} formed other batches than rank {self.group.rank} from the same requests (a "
                "different cache state or batch budget per rank); their results cannot be merged")


class DataParallelScorer:
    """A scorer whose three request calls are split over the ranks of ``group``; every rank gets every result.

    Every other attribute (``warnings``, ``forward_calls``, ``batch_info``, ``cache``,
    ``tokenizer``, ...) is the wrapped scorer's. After each call the cache's hit counter and the
    scorer's warnings hold the whole world's (the same on every rank), so the results every rank
    builds are the same.
    """

    def __init__(self, scorer, group: ProcessGroup):
        self.__dict__["scorer"] = scorer
        self.__dict__["group"] = group
        model = getattr(scorer, "model", None)
        spread = getattr(model, "hf_device_map", None)
        if group.world_size > 1 and isinstance(spread, dict) and len(set(spread.values())) > 1:
            raise DistributedSetupError(
                f"the model is spread over {sorted(map(str, set(spread.values())))} (device_map); data-parallel "
                f"evaluation in a world of {group.world_size} needs a whole model on each rank")
        cache = getattr(scorer, "cache", None)
        if cache is not None and group.world_size > 1 and hasattr(cache, "use_rank"):
            cache.use_rank(group.rank)  # each rank appends to its own file; all of them are read back
        if not group.is_main and hasattr(scorer, "progress"):
            scorer.progress = False  # one progress bar per run: the main rank's
        dealer = None
        if group.world_size > 1 and hasattr(scorer, "data_parallel") and getattr(scorer, "batch_size", None) != "auto":
            dealer = BatchDealer(group, cache)
            scorer.data_parallel = dealer
        self.__dict__["dealer"] = dealer
        if group.world_size > 1:
            # every rank has read the cache files before any rank writes: the same hits, so the same plans;
            # and every rank bounds its shared-prefix batches by the same memory (the smallest rank's), so
            # that it forms the same batches
            measure = getattr(scorer, "kv_key_memory", None) if dealer is not None else None
            bound = measure() if callable(measure) else None
            bounds = [b for b in group.all_gather(bound) if b is not None]
            if bound is not None and bounds:
                measure(min(bounds))

    def __getattr__(self, name):
        return getattr(self.__dict__["scorer"], name)

    def __setattr__(self, name, value):
        setattr(self.__dict__["scorer"], name, value)

    # the three request types
    def loglikelihood(self, requests: Sequence[tuple[str, str]], name: str | None = None) -> list[tuple[float, bool]]:
        requests = list(requests)
        def by_groups():
            shares = shard_loglikelihood(requests, self.group.world_size, getattr(self.scorer, "tokenizer", None))
            merged = self._run(requests, shares, lambda part: self.scorer.loglikelihood(part, name))
            return [(float(ll), bool(greedy)) for ll, greedy in merged]

        if self.dealer is not None:
            return self._dealt(lambda: self.scorer.loglikelihood(requests, name), by_groups)
        return by_groups()

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        texts = list(texts)
        def by_texts():
            shares = shard_rolling(texts, self.group.world_size, getattr(self.scorer, "tokenizer", None))
            return [float(x) for x in self._run(texts, shares, self.scorer.loglikelihood_rolling)]

        if self.dealer is not None:
            return self._dealt(lambda: self.scorer.loglikelihood_rolling(texts), by_texts)
        return by_texts()

    def generate_until(self, requests: Sequence[tuple[str, dict]]) -> list[str]:
        requests = list(requests)
        size = getattr(self.scorer, "batch_size", None)
        chunk = size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else DEFAULT_GENERATION_CHUNK
        shares = shard_generation(requests, self.group.world_size, getattr(self.scorer, "tokenizer", None), chunk)
        return self._run(requests, shares, self.scorer.generate_until)

    def _dealt(self, call: Callable[[], list], fallback: Callable[[], list]) -> list:
        """A call the scorer runs on every rank with the whole request list, dealing out its own batches.

        Ranks whose plans differ (another process wrote to the cache between the ranks' reads, or the
        batch budget differs) all learn it in the same gather; the call is then dealt out by whole
        contexts instead, reusing what each rank has just scored from its cache.
        """
        try:
            return call()
        except PlansDiffer as exc:
            logger.info("hfx eval: %s; dealing out whole contexts for this call", exc)
        except Exception as exc:
            if self.dealer.pending is not None:  # the others wait for this rank's results: send the error
                self.dealer.fail(exc)
            raise
        self.scorer.data_parallel = None
        try:
            return fallback()
        finally:
            self.scorer.data_parallel = self.dealer

    def _run(self, requests: list, shares: list[list[int]], score: Callable[[list], list]) -> list:
        mine = shares[self.group.rank]
        cache = getattr(self.scorer, "cache", None)
        warnings = getattr(self.scorer, "warnings", None)
        hits_before = getattr(cache, "hits", 0) if cache is not None else 0
        warned_before = len(warnings) if isinstance(warnings, list) else 0
        error, local = None, []
        try:
            local = list(score([requests[i] for i in mine])) if mine else []
            if len(local) != len(mine):
                raise RuntimeError(f"the scorer returned {len(local)} results for {len(mine)} requests")
        except Exception as exc:  # noqa: BLE001  reported to every rank below, then re-raised here
            error = exc
        payload = {
            "results": local if error is None else None,
            "error": None if error is None else f"{type(error).__name__}: {' '.join(str(error).split())}",
            "hits": (getattr(cache, "hits", 0) - hits_before) if cache is not None else 0,
            "warnings": list(warnings[warned_before:]) if isinstance(warnings, list) else [],
        }
        gathered = self.group.all_gather(payload)
        if error is not None:
            raise error
        failed = [(r, p["error"]) for r, p in enumerate(gathered) if p["error"] is not None]
        if failed:
            rank, message = failed[0]
            raise DistributedScoringError(f"rank {rank} of {self.group.world_size} failed while scoring: {message}")
        merged: list = [None] * len(requests)
        for share, part in zip(shares, gathered):
            for i, value in zip(share, part["results"]):
                merged[i] = value
        if cache is not None:
            cache.hits = hits_before + sum(p["hits"] for p in gathered)
        if isinstance(warnings, list):
            new = list(dict.fromkeys(w for p in gathered for w in p["warnings"]))
            warnings[warned_before:] = new
        return merged

