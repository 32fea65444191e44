"""Zero/few-shot in-context evaluation: lm-evaluation-harness task files, the same numbers, faster.

```python
>>> from hfx.evaluation import evaluate
>>> results = evaluate("path/to/causal-lm", "facts,arithmetic", num_fewshot=5)
>>> results["results"]["facts"]["acc,none"]
```

Modules: ``tasks`` (task YAML loading and prompt construction), ``templates`` (safe YAML and
sandboxed Jinja), ``samplers`` (few-shot demonstrations), ``scorer`` (the packed causal-LM
scorer), ``metrics``, ``filters`` (lm-eval's ``filter_list`` pipelines for generate_until),
``groups`` (group trees: the catalogue-evaluator contract),
``results`` (lm-eval-shaped JSON with group aggregates, markdown tables, sample logs),
``cache`` (result cache keyed by model identity), ``evaluator`` (output-type dispatch and
``evaluate``). See ``docs/evaluation.md``.
"""

from .evaluator import (
    OUTPUT_TYPES,
    EvaluationInputError,
    OutputType,
    evaluate,
    evaluate_tasks,
    load_model,
    plan,
    register_output_type,
)
from .groups import AggregateMetric, GroupNode, TaskRef
from .results import check_output_path, markdown_table, write_results, write_samples
from .catalogue import TaskIndex, find_tasks
from .tasks import Task, TaskConfig
from .templates import TaskError

__all__ = [
    "OUTPUT_TYPES",
    "AggregateMetric",
    "EvaluationInputError",
    "GroupNode",
    "OutputType",
    "Task",
    "TaskConfig",
    "TaskError",
    "TaskIndex",
    "TaskRef",
    "check_output_path",
    "evaluate",
    "evaluate_tasks",
    "find_tasks",
    "load_model",
    "markdown_table",
    "plan",
    "register_output_type",
    "write_results",
    "write_samples",
]
