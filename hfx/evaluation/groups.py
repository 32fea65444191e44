"""Groups of tasks as lm-eval 0.4.13 defines them: a tree whose leaves are tasks.

A ``group:`` config names its members under ``task:`` (task names, tag names, other groups, or
inline task definitions) and says how the members' scores are combined
(``aggregate_metric_list``). :mod:`.catalogue` resolves names into these nodes; the evaluator runs
the leaves and aggregates each group from its children.

These dataclasses are the contract between the catalogue (which builds them) and the evaluator
and results (which read them).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AggregateMetric:
    """One entry of a group's ``aggregate_metric_list``.

    ``filter_list`` ``None`` means lm-eval's auto-discovery (every filter the children report for
    the metric). ``aggregation`` is ``"mean"`` or a callable (lm-eval accepts nothing else).
    """

    metric: str
    aggregation: Any = "mean"
    weight_by_size: bool = True
    filter_list: tuple[str, ...] | None = None


@dataclass
class TaskRef:
    """A leaf: the task ``name`` of the index, with ``overrides`` an inline definition in a group wrote.

    ``TaskIndex.config(ref)`` is the task's merged config with ``overrides`` merged over it (key by
    key, as lm-eval merges a group's member overrides). An inline task of a group (a member mapping
    naming no known task) is named ``"<group>::<task>"``, is not in the index, and its
    ``overrides`` are its whole config.
    """

    name: str
    overrides: dict[str, Any] | None = None


@dataclass
class GroupNode:
    """A ``group:`` config resolved: its children in the order lm-eval runs and reports them."""

    name: str
    alias: str | None = None
    children: list[GroupNode | TaskRef] = field(default_factory=list)
    aggregate_metric_list: list[AggregateMetric] | None = None
    metadata: dict[str, Any] | None = None
    source: str = ""

    @property
    def version(self) -> Any:
        return (self.metadata or {}).get("version")

    def walk(self) -> Iterator[tuple[int, GroupNode | TaskRef]]:
        """``(depth, node)`` for every descendant, depth-first in order (children at depth 1)."""
        for child in self.children:
            yield 1, child
            if isinstance(child, GroupNode):
                for depth, node in child.walk():
                    yield depth + 1, node

    def task_refs(self) -> list[TaskRef]:
        """The leaves, in order, each task once."""
        seen, out = set(), []
        for _, node in self.walk():
            if isinstance(node, TaskRef) and node.name not in seen:
                seen.add(node.name)
                out.append(node)
        return out
