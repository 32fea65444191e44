"""Quickstart step: zero-shot and few-shot evaluation on the embedded tasks, before and after fine-tuning.

The pre-trained causal LM is scored on embedded_facts / embedded_arithmetic at 0 and 3 shots; when
the ``finetune`` step left a merged checkpoint (LoRA on the arithmetic task), it is scored the same
way, so the table shows what fine-tuning changed: arithmetic should rise, facts should hold.
"""

from __future__ import annotations

FEWSHOT = 3
TASKS = ("embedded_facts", "embedded_arithmetic")


def quickstart_step(ctx) -> None:
    """Evaluate the pre-trained (and, if present, fine-tuned) model at 0 and 3 shots; print the tables."""
    from hfx_tasks.embedded import task_configs

    from . import Task, TaskConfig, evaluate, markdown_table

    if ctx.objective != "clm":
        ctx.report("eval", f"skipped: in-context evaluation needs a causal LM (objective {ctx.objective!r})")
        return
    models = {"pre-trained": ctx.model_dir}
    if ctx.finetuned_dir is not None:
        models["fine-tuned"] = ctx.finetuned_dir
    configs = [c for c in task_configs(ctx.data_paths) if c["task"] in TASKS]
    limit = 40 if getattr(ctx.flags, "fast", False) else None
    ctx.results["eval"] = {}
    accuracy: dict[tuple[str, int, str], float] = {}
    for label, model_dir in models.items():
        ctx.results["eval"][label] = {}
        for shots in (0, FEWSHOT):
            tasks = [Task(TaskConfig.from_dict(c, source="quickstart")) for c in configs]
            results = evaluate(str(model_dir), tasks, num_fewshot=shots, limit=limit,
                               cache_dir=ctx.work_dir / "eval_cache", progress=False, add_special_tokens=False)
            print(f"\n{label} model, {shots}-shot:\n{markdown_table(results)}", flush=True)
            ctx.results["eval"][label][f"{shots}-shot"] = {
                name: {k: v for k, v in entry.items() if k.endswith(",none")} for name, entry in results["results"].items()
            }
            for name, entry in results["results"].items():
                accuracy[(name, shots, label)] = entry["acc,none"]
            scores = ", ".join(f"{name} acc {entry['acc,none']:.3f}" for name, entry in results["results"].items())
            ctx.report("eval", f"{label}, {shots}-shot: {scores} (chance 0.25)")
    print("\n" + comparison_table(accuracy, list(models)), flush=True)


def comparison_table(accuracy: dict[tuple[str, int, str], float], labels: list[str]) -> str:
    """A markdown table: one row per (task, shots), one accuracy column per model."""
    rows = sorted({(task, shots) for task, shots, _ in accuracy})
    lines = ["| task | shots | " + " | ".join(f"{label} acc" for label in labels) + " |",
             "|---|---:|" + "---:|" * len(labels)]
    for task, shots in rows:
        cells = " | ".join(f"{accuracy[(task, shots, label)]:.3f}" for label in labels)
        lines.append(f"| {task} | {shots} | {cells} |")
    return "\n".join(lines)
