"""Quickstart step: the bundled encoder tasks on the pre-trained model (``hfx quickstart``)."""

from __future__ import annotations


def quickstart_step(ctx) -> None:
    """n-way k-shot and zero-shot (label descriptions, and cloze for a masked LM) on the embedded topics."""
    from hfx_encoder_tasks import tasks

    from hfx.evaluation import Task, TaskConfig, evaluate

    wanted = ["embedded_topics_5way5shot", "embedded_topics_zeroshot"]
    if ctx.objective != "clm":
        wanted.append("embedded_topics_cloze")
    mappings = {m["task"]: m for m in tasks(ctx.data_paths["topics_train"].parent)}
    if ctx.flags.fast:
        mappings["embedded_topics_5way5shot"]["episodes"] = 20
    results = evaluate(str(ctx.model_dir), [Task(TaskConfig.from_dict(mappings[name])) for name in wanted],
                       cache_dir=False, progress=False)["results"]
    ctx.results["encoder_eval"] = {name: {k: v for k, v in row.items() if k != "alias"} for name, row in results.items()}
    for name, row in results.items():
        ci = f" ± {row['acc_ci95,none']:.3f} (95% CI)" if "acc_ci95,none" in row else ""
        ctx.report("encoder-eval", f"{name}: acc {row['acc,none']:.3f}{ci}")
