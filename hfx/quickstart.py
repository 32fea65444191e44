"""``hfx quickstart``: the library end to end on the embedded corpus, no download, a few minutes on CPU.

The run is an ordered list of named steps. Each step is a function ``step(ctx)`` taking the
:class:`QuickstartContext`; it reads what earlier steps left there, does its work under
``ctx.work_dir``, stores what later steps need, and reports with ``ctx.report(step, line)``
(and ``ctx.files[...] = path`` for files worth showing).

Extending quickstart (the seam)
-------------------------------
``STEPS`` lists ``(name, "module:function")`` pairs, resolved lazily (a step's module is imported
only when it runs). A later feature adds its step with one line, e.g.::

    ("finetune", "hfx.finetune:quickstart_step"),
    ("evaluate", "hfx.evaluation.quickstart:quickstart_step"),

What a step finds in ``ctx`` after the built-in steps:

- ``ctx.data_paths``: ``hfx.data.write_embedded_data`` paths (``facts_test``, ``topics_train``, ...)
- ``ctx.tokenizer_dir``: the trained tokenizer (``AutoTokenizer.from_pretrained``)
- ``ctx.model_dir``: the pre-trained model and its tokenizer; ``ctx.objective`` says which head
  (``"clm"`` -> ``AutoModelForCausalLM``, ``"mlm_nsp"`` -> ``AutoModelForPreTraining`` /
  ``AutoModelForMaskedLM``); ``ctx.model_class`` is the Auto class used to reload it
- ``ctx.finetuned_dir``: after the ``finetune`` step, the merged fine-tuned checkpoint (same
  Auto class as ``ctx.model_dir``); ``None`` when that step was skipped
- ``ctx.flags``: the parsed command-line flags (``ctx.flags.fast`` asks steps to be brief)
- ``ctx.results``: a dict steps add numbers to (written to ``report.json``)

Time budget: the whole default run must finish in 5 minutes on 2 CPU cores; the pre-training
step takes about half of it, leaving the rest for the steps added later.
"""

from __future__ import annotations

import argparse
import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

STEPS: list[tuple[str, str]] = [
    ("data", "hfx.quickstart:write_data_step"),
    ("tokenizer", "hfx.quickstart:train_tokenizer_step"),
    ("pretrain", "hfx.quickstart:pretrain_step"),
    ("reload", "hfx.quickstart:reload_step"),
    ("finetune", "hfx.finetune:quickstart_step"),
    ("encoder-eval", "hfx.evaluation.encoder.quickstart:quickstart_step"),
    ("eval", "hfx.evaluation.quickstart:quickstart_step"),
]

# What each step reads from the context, by the name of the step that puts it there: skipping a
# step that a step still to run needs is refused before anything runs.
STEP_REQUIRES: dict[str, tuple[str, ...]] = {
    "tokenizer": ("data",),
    "pretrain": ("data", "tokenizer"),
    "reload": ("pretrain",),
    "finetune": ("data", "pretrain"),
    "encoder-eval": ("data", "pretrain"),
    "eval": ("data", "pretrain"),
}

# --fast: enough steps for the loss curve to fall, not for the facts to be learned.
FAST_PRETRAIN_STEPS = 100
AUTO_CLASS_FOR_OBJECTIVE = {"clm": "AutoModelForCausalLM", "mlm_nsp": "AutoModelForPreTraining"}


@dataclass
class QuickstartContext:
    work_dir: Path
    flags: argparse.Namespace
    data_paths: dict[str, Path] = field(default_factory=dict)
    tokenizer_dir: Path | None = None
    model_dir: Path | None = None
    finetuned_dir: Path | None = None
    objective: str = "clm"
    model_class: str | None = None
    files: dict[str, Path] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    lines: list[tuple[str, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def report(self, step: str, line: str) -> None:
        self.lines.append((step, line))
        print(f"[{step}] {line}", flush=True)


def resolve_step(target: str) -> Callable[[QuickstartContext], None]:
    module_name, _, function_name = target.partition(":")
    return getattr(importlib.import_module(module_name), function_name)


def skip_error(skip, steps: list[tuple[str, str]] | None = None) -> str | None:
    """Why ``skip`` cannot be honoured (an unknown name, or a step a remaining step needs), else ``None``."""
    names = [name for name, _ in (STEPS if steps is None else steps)]
    skip = list(dict.fromkeys(skip or ()))
    unknown = [name for name in skip if name not in names]
    if unknown:
        return f"--skip: unknown step {', '.join(map(repr, unknown))}; valid steps: {', '.join(names)}"
    running = [name for name in names if name not in skip]
    for name in skip:
        needed_by = [step for step in running if name in STEP_REQUIRES.get(step, ())]
        if needed_by:
            one = len(needed_by) == 1
            return (f"--skip {name}: {'step' if one else 'steps'} {', '.join(map(repr, needed_by))} "
                    f"{'needs' if one else 'need'} what it makes; skip {'it' if one else 'them'} too or keep {name!r}")
    return None


def write_data_step(ctx: QuickstartContext) -> None:
    from .data import write_embedded_data

    ctx.data_paths = write_embedded_data(ctx.work_dir / "data", seed=ctx.flags.seed)
    ctx.files["embedded data"] = ctx.work_dir / "data"
    ctx.report("data", f"wrote the embedded corpus and tasks ({len(ctx.data_paths)} files) to {ctx.work_dir / 'data'}")


def train_tokenizer_step(ctx: QuickstartContext) -> None:
    from .data import load_documents
    from .pretraining import TOKENIZER_STYLES, save_pretrained_atomic
    from .tokenizer import train_tokenizer

    documents = load_documents(str(ctx.data_paths["corpus_text"]))
    style = TOKENIZER_STYLES[ctx.flags.objective]
    tokenizer = train_tokenizer(documents["text"], vocab_size=ctx.flags.vocab_size, style=style)
    ctx.tokenizer_dir = save_pretrained_atomic(ctx.work_dir / "tokenizer", tokenizer)
    ctx.files["tokenizer"] = ctx.tokenizer_dir
    ctx.report("tokenizer", f"trained a {style}-style BPE tokenizer with {len(tokenizer)} tokens on "
                            f"{len(documents)} documents")


def pretrain_step(ctx: QuickstartContext) -> None:
    from transformers import AutoTokenizer, Trainer

    from .data import load_documents
    from .pretraining import (
        OBJECTIVES,
        loss_history,
        model_config,
        plot_loss_curves,
        prepare_dataset,
        save_pretrained_atomic,
        training_arguments,
    )

    flags = ctx.flags
    ctx.objective = flags.objective
    steps = min(flags.steps, FAST_PRETRAIN_STEPS) if getattr(flags, "fast", False) else flags.steps
    tokenizer = AutoTokenizer.from_pretrained(str(ctx.tokenizer_dir))
    train_docs = load_documents(str(ctx.data_paths["corpus_text"]))
    validation_docs = load_documents(str(ctx.data_paths["corpus_validation"]))
    train_set, collator = prepare_dataset(train_docs, tokenizer, flags.objective, flags.max_length, seed=flags.seed)
    validation_set, _ = prepare_dataset(validation_docs, tokenizer, flags.objective, flags.max_length, seed=flags.seed)
    config = model_config(
        tokenizer,
        flags.max_length,
        hidden_size=flags.hidden_size,
        norm_type=flags.norm_type,
        norm_position=flags.norm_position,
        position_embedding_type=flags.position_embedding_type,
        attention_type=flags.attention_type,
    )
    args = training_arguments(
        ctx.work_dir / "checkpoints", steps, flags.batch_size, flags.learning_rate, flags.seed,
        logging_steps=max(1, steps // 30),
    )
    trainer = Trainer(
        model_init=lambda: OBJECTIVES[flags.objective](config),
        args=args,
        train_dataset=train_set,
        eval_dataset=validation_set,
        data_collator=collator,
    )
    n_params = sum(p.numel() for p in trainer.model.parameters())
    ctx.report(
        "pretrain",
        f"{type(trainer.model).__name__} ({n_params / 1e3:.0f}k parameters; norm={config.norm_type}, "
        f"norm_position={config.norm_position}, position={config.position_embedding_type}, "
        f"attention={config.attention_type}) on {len(train_set)} examples of {flags.max_length} tokens, "
        f"{steps} steps of {flags.batch_size}",
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    curve = loss_history(trainer)
    ctx.model_dir = save_pretrained_atomic(ctx.work_dir / "model", trainer.model, tokenizer)
    plot = plot_loss_curves({flags.objective: curve}, ctx.work_dir / "loss_curve.png",
                            f"hfx quickstart: {flags.objective} pre-training ({config.norm_type})")
    ctx.files["model"] = ctx.model_dir
    ctx.files["loss curve"] = plot
    ctx.results["pretrain"] = {
        "objective": flags.objective,
        "steps": steps,
        "validation_loss_before": round(before, 4),
        "validation_loss_after": round(after, 4),
        "loss_curve": [[step, round(loss, 4)] for step, loss in curve],
    }
    ctx.report("pretrain", f"validation loss {before:.3f} -> {after:.3f}; training loss {curve[0][1]:.3f} -> "
                           f"{curve[-1][1]:.3f}")


def reload_step(ctx: QuickstartContext) -> None:
    import torch
    import transformers

    ctx.model_class = AUTO_CLASS_FOR_OBJECTIVE[ctx.objective]
    auto_class = getattr(transformers, ctx.model_class)
    model = auto_class.from_pretrained(str(ctx.model_dir)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(ctx.model_dir))
    if ctx.objective == "clm":
        prompt = "3 plus 4 is"
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        sample = tokenizer.decode(output[0], skip_special_tokens=True)
    else:
        prompt = f"3 plus 4 is {tokenizer.mask_token}."
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).prediction_logits
        position = (inputs["input_ids"][0] == tokenizer.mask_token_id).nonzero()[0, 0]
        sample = prompt.replace(tokenizer.mask_token, tokenizer.decode(logits[0, position].argmax()))
    ctx.results["reload"] = {"auto_class": ctx.model_class, "prompt": prompt, "sample": sample}
    ctx.report("reload", f"{ctx.model_class}.from_pretrained({str(ctx.model_dir)!r}) -> {type(model).__name__}; "
                         f"sample: {sample!r}")


def run_quickstart(flags: argparse.Namespace, steps: list[tuple[str, str]] | None = None) -> QuickstartContext:
    """Run ``steps`` (default ``STEPS``) minus ``flags.skip``; writes ``report.json`` and returns the context."""
    from .pretraining import write_json_atomic

    steps = STEPS if steps is None else steps
    problem = skip_error(flags.skip, steps)
    if problem:
        raise ValueError(problem)
    work_dir = Path(flags.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    ctx = QuickstartContext(work_dir=work_dir, flags=flags, objective=flags.objective)
    if getattr(flags, "threads", None):
        import torch

        torch.set_num_threads(flags.threads)
    start = time.perf_counter()
    for name, target in steps:
        if name in (flags.skip or ()):
            continue
        step_start = time.perf_counter()
        resolve_step(target)(ctx)
        ctx.timings[name] = round(time.perf_counter() - step_start, 1)
    ctx.timings["total"] = round(time.perf_counter() - start, 1)
    ctx.files["report"] = work_dir / "report.json"
    write_json_atomic(
        {
            "flags": {k: v for k, v in vars(flags).items() if k != "func"},
            "timings_s": ctx.timings,
            "results": ctx.results,
            "files": {k: str(v) for k, v in ctx.files.items()},
            "log": [f"[{step}] {line}" for step, line in ctx.lines],
        },
        ctx.files["report"],
    )
    return ctx


def summary(ctx: QuickstartContext) -> str:
    lines = ["", "hfx quickstart finished in " f"{ctx.timings['total']:.0f} s"]
    width = max((len(name) for name in ctx.timings), default=0)
    lines += [f"  {name:<{width}} {seconds:6.1f} s" for name, seconds in ctx.timings.items() if name != "total"]
    lines.append("files:")
    lines += [f"  {label:<14} {path}" for label, path in ctx.files.items()]
    return "\n".join(lines)


__all__ = ["STEPS", "STEP_REQUIRES", "QuickstartContext", "resolve_step", "run_quickstart", "skip_error", "summary"]
