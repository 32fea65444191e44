"""Quickstart step: zero-shot and few-shot evaluation of the pre-trained causal LM on the embedded tasks."""

from __future__ import annotations

FEWSHOT = 3


def quickstart_step(ctx) -> None:
    """Evaluate ``ctx.model_dir`` on embedded_facts / embedded_arithmetic at 0 and 3 shots; print the tables."""
    from hfx_tasks.embedded import task_configs

    from . import Task, TaskConfig, evaluate, markdown_table

    if ctx.objective != "clm":
        ctx.report("eval", f"skipped: in-context evaluation needs a causal LM (objective {ctx.objective!r})")
        return
    configs = [c for c in task_configs(ctx.data_paths) if c["task"] in ("embedded_facts", "embedded_arithmetic")]
    limit = 40 if getattr(ctx.flags, "fast", False) else None
    ctx.results["eval"] = {}
    for shots in (0, FEWSHOT):
        tasks = [Task(TaskConfig.from_dict(c, source="quickstart")) for c in configs]
        results = evaluate(str(ctx.model_dir), tasks, num_fewshot=shots, limit=limit, cache_dir=ctx.work_dir / "eval_cache",
                           progress=False, add_special_tokens=False)
        print(markdown_table(results), flush=True)
        ctx.results["eval"][f"{shots}-shot"] = {
            name: {k: v for k, v in entry.items() if k.endswith(",none")} for name, entry in results["results"].items()
        }
        scores = ", ".join(f"{name} acc {entry['acc,none']:.3f}" for name, entry in results["results"].items())
        ctx.report("eval", f"{shots}-shot: {scores} (chance 0.25)")
