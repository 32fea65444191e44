"""Auxiliary losses: what a component adds to the training loss besides the head's own loss.

Some components need a term in the loss that is not the task's: a Mixture-of-Experts router's
load-balancing and z losses, an adaptive attention span's L1 penalty. Such a module implements
one method, ``hfx_auxiliary() -> Auxiliary | None``, returning what its *last forward* produced,
and calls :func:`report` from its forward (a module that forgets to report adds nothing).
:class:`hfx.modeling_hfx.HfxModel` runs its layers inside :func:`collecting` and collects the
modules that reported, so only modules that ran in this forward count, and no module tree is
walked on the hot path. Every head adds the summed
``aux_loss`` to its loss (when labels are given) and reports it, so the term reaches ``Trainer``
without any code in the training script.

The values are read from module state set in ``forward``; transformers' gradient checkpointing is
non-reentrant by default, under which that state keeps its autograd graph (its recomputation in
backward runs outside :func:`collecting`, so nothing is reported twice).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Auxiliary:
    """One module's contribution from its last forward.

    ``loss``: a scalar already weighted by its coefficient (added to the training loss as is).
    ``stats``: detached tensors for logging, by name (e.g. ``expert_counts``: tokens per expert).
    ``router_logits``: (tokens, experts) logits, returned when ``config.output_router_logits``.
    """

    loss: torch.Tensor | None = None
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    router_logits: torch.Tensor | None = None


@dataclass
class CollectedAuxiliary:
    """Every module's contribution, in module order: the summed loss, stacked stats, router logits."""

    loss: torch.Tensor | None = None
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    router_logits: tuple[torch.Tensor, ...] | None = None


_REPORTED: ContextVar[list[nn.Module] | None] = ContextVar("hfx_auxiliary_reported", default=None)


@contextmanager
def collecting() -> Iterator[list[nn.Module]]:
    """The modules that call :func:`report` inside this block, in call order, each once."""
    reported: list[nn.Module] = []
    token = _REPORTED.set(reported)
    try:
        yield reported
    finally:
        _REPORTED.reset(token)


def report(module: nn.Module) -> None:
    """Called by a module's forward: its ``hfx_auxiliary()`` counts for the enclosing model forward (if any)."""
    reported = _REPORTED.get()
    if reported is not None and not any(m is module for m in reported):
        reported.append(module)


def collect(modules: list[nn.Module]) -> CollectedAuxiliary:
    """Sum the losses and stack each stat across modules (one row per module)."""
    losses, stats, logits = [], {}, []
    for module in modules:
        part = module.hfx_auxiliary()
        if part is None:
            continue
        if part.loss is not None:
            losses.append(part.loss)
        for name, value in part.stats.items():
            stats.setdefault(name, []).append(value)
        if part.router_logits is not None:
            logits.append(part.router_logits)
    return CollectedAuxiliary(
        loss=torch.stack([loss.float() for loss in losses]).sum() if losses else None,
        stats={name: torch.stack(values) for name, values in stats.items()},
        router_logits=tuple(logits) if logits else None,
    )


def add_to_loss(loss: torch.Tensor | None, aux_loss: torch.Tensor | None) -> torch.Tensor | None:
    """The head's loss plus the auxiliary loss; no labels means no loss at all."""
    if loss is None or aux_loss is None:
        return loss
    return loss + aux_loss.to(loss.dtype)


__all__ = ["Auxiliary", "CollectedAuxiliary", "collecting", "report", "collect", "add_to_loss"]
