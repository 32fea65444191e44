"""Chat-model prompts: ``--apply-chat-template``, ``--fewshot-as-multiturn``, ``--system-instruction``.

A prompt is built as a list of :class:`Message` turns (system, then user / assistant per
demonstration, then the evaluated document's user turn and its ``gen_prefix`` as an open assistant
turn), exactly as lm-eval 0.4.13 builds it. Without a chat template the turns are joined as text
(each with its plain-text delimiter); with one, they become chat messages rendered by the
tokenizer's own ``apply_chat_template`` (transformers' sandboxed Jinja), either one turn per
demonstration (``fewshot_as_multiturn``) or every demonstration collapsed into a single user turn.

Public API: :func:`prompt_format` (checks the options against the tokenizer once, before the model
loads) returning a :class:`PromptFormat`, or ``None`` when prompts are plain text as without these
options; :func:`prompt_config` (the keys lm-eval writes to its results for these options).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Message:
    """One turn: ``delimiter`` is what follows ``content`` when the prompt is plain text (never sent to a template)."""

    role: str
    content: str
    delimiter: str = ""

    @property
    def text(self) -> str:
        return self.content + self.delimiter

    def as_chat(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def join_delimited(prefix: str | None, suffix: str | None, delimiter: str = " ") -> str:
    """``prefix + suffix``, with ``delimiter`` between them only when neither has whitespace at the seam."""
    if not prefix:
        return suffix or ""
    if not suffix:
        return prefix
    if prefix[-1].isspace() or suffix[0].isspace():
        return prefix + suffix
    return prefix + delimiter + suffix


def messages_text(messages: list[Message]) -> str:
    """The plain-text prompt: every turn followed by its delimiter."""
    return "".join(m.text for m in messages)


def single_turn(messages: list[Message]) -> list[dict[str, str]]:
    """Demonstrations and question collapsed into one user message, as lm-eval sends them without multi-turn.

    A leading system turn stays a system message and a trailing assistant turn (the ``gen_prefix``)
    stays the open assistant message; the text of every turn in between is joined with its
    delimiter, except the last one's (lm-eval drops it).
    """
    system = messages[0] if messages and messages[0].role == "system" else None
    body = messages[1:] if system is not None else list(messages)
    opened = body[-1] if body and body[-1].role == "assistant" else None
    turns = body[:-1] if opened is not None else body
    user = "".join(m.text for m in turns[:-1]) + (turns[-1].content if turns else "")
    out = [{"role": "user", "content": user}]
    if opened is not None:
        out.append(opened.as_chat())
    return ([system.as_chat()] if system is not None else []) + out


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class PromptFormat:
    """How prompts are built for one run: a chat template (or none), multi-turn demonstrations, a system instruction.

    ``template`` is the Jinja source selected from the tokenizer (``None``: plain-text prompts with
    only the system instruction in front); ``template_kwargs`` are passed to every rendering (e.g.
    ``enable_thinking``).
    """

    tokenizer: Any = None
    template: str | None = None
    template_name: str | None = None
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None
    template_kwargs: dict = field(default_factory=dict)

    @property
    def applies_chat_template(self) -> bool:
        return self.template is not None

    @property
    def chat_template(self) -> str | None:
        """The selected template's Jinja source, as lm-eval records it (``chat_template`` in the results)."""
        return self.template

    def system_prompt(self, description: str, fewshot_delimiter: str) -> str:
        """lm-eval's system turn: the instruction, then the task description after the task's few-shot delimiter."""
        return join_delimited(self.system_instruction, description, fewshot_delimiter)

    def render(self, messages: list[Message], gen_prefix: str = "") -> str:
        """The prompt string of ``messages``: plain text, or the chat template's rendering.

        With a ``gen_prefix`` the last message is an open assistant turn that the model continues
        (no generation prompt is added); without one the template's generation prompt ends the text.
        A template that raises on the system role (some refuse it) is rendered again without the
        system turn, as lm-eval does.
        """
        if self.template is None:
            return messages_text(messages)
        chat = [m.as_chat() for m in messages] if self.fewshot_as_multiturn else single_turn(messages)
        return self.render_chat(chat, add_generation_prompt=not gen_prefix)

    def render_chat(self, chat: list[dict], add_generation_prompt: bool = True) -> str:
        """Chat messages through the tokenizer's template; an open last turn when no generation prompt is added."""
        import jinja2

        try:
            return self._apply(chat, add_generation_prompt)
        except jinja2.exceptions.TemplateError:
            if not any(m["role"] == "system" for m in chat):
                raise
            return self._apply([m for m in chat if m["role"] != "system"], add_generation_prompt)

    def _apply(self, chat: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            chat, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt, **self.template_kwargs)

    def choice_delimiter(self, target_delimiter: str, gen_prefix: Any) -> str:
        """What separates a multiple-choice prompt from each choice.

        Under a chat template the prompt ends with the template's generation prompt, so lm-eval
        drops the task's ``target_delimiter``, except after a ``gen_prefix`` (the task's setting as
        written, not its rendering) that does not end in whitespace.
        """
        if self.template is None:
            return target_delimiter
        if gen_prefix and not gen_prefix[-1].isspace():
            return target_delimiter
        return ""

    def lm_eval_options(self) -> dict[str, Any]:
        """The keywords lm-eval's ``Task.build_all_requests`` takes for these options (a ``class:`` task builds
        its own prompts); its ``chat_template`` callable is :meth:`render_chat`."""
        return {"system_instruction": self.system_instruction, "apply_chat_template": self.applies_chat_template,
                "fewshot_as_multiturn": self.fewshot_as_multiturn,
                "chat_template": self.render_chat if self.applies_chat_template else None}

    def config(self) -> dict[str, Any]:
        """The keys lm-eval 0.4.13 writes to its results for these options (see :func:`prompt_config`)."""
        return {
            "chat_template": self.template,
            "chat_template_sha": _sha256(self.template) if self.template else None,
            "system_instruction": self.system_instruction,
            "system_instruction_sha": _sha256(self.system_instruction) if self.system_instruction else None,
            "fewshot_as_multiturn": self.fewshot_as_multiturn,
        }


def prompt_config(fmt: PromptFormat | None) -> dict[str, Any]:
    """``chat_template``, ``chat_template_sha``, ``system_instruction``, ``system_instruction_sha``,
    ``fewshot_as_multiturn`` of a run, as lm-eval records them (all empty for plain prompts)."""
    return fmt.config() if fmt is not None else PromptFormat().config()


def _select_template(tokenizer: Any, name: str | None) -> tuple[str, str | None]:
    """The template source to render and its name; a missing template or name is one clear error line."""
    from .evaluator import EvaluationInputError

    templates = getattr(tokenizer, "chat_template", None)
    what = f"{type(tokenizer).__name__} {getattr(tokenizer, 'name_or_path', '') or ''}".rstrip()
    if not templates:
        raise EvaluationInputError(
            f"--apply-chat-template: the tokenizer ({what}) has no chat template; evaluate without "
            "--apply-chat-template, or give the tokenizer a template (tokenizer.chat_template = ...; save_pretrained)."
        )
    if isinstance(templates, dict):
        names = sorted(templates)
        if name is None:
            if "default" not in templates:
                raise EvaluationInputError(
                    f"--apply-chat-template: the tokenizer ({what}) has several chat templates and none is named "
                    f"'default'; name one: {', '.join(names)}.")
            return templates["default"], "default"
        if name not in templates:
            raise EvaluationInputError(f"--apply-chat-template: the tokenizer ({what}) has no chat template named "
                                       f"{name!r}; it has: {', '.join(names)}.")
        return templates[name], name
    if name is not None and name != "default":
        raise EvaluationInputError(
            f"--apply-chat-template: the tokenizer ({what}) has no chat template named {name!r}; it has a single "
            "template ('default'): pass --apply-chat-template without a name.")
    return templates, None


def prompt_format(tokenizer: Any, apply_chat_template: bool | str = False, fewshot_as_multiturn: bool | None = None,
                  system_instruction: str | None = None, template_kwargs: dict | None = None) -> PromptFormat | None:
    """The run's :class:`PromptFormat`, or ``None`` when every option is at its default (plain prompts, as today).

    ``apply_chat_template``: ``True`` renders the tokenizer's template (its ``default`` one when it
    has several), a string names one of its templates. ``fewshot_as_multiturn``: each demonstration
    its own user / assistant turn; ``None`` is lm-eval's default, on when a template is applied.
    ``system_instruction``: the system turn's text (plain text in front of the prompt without a
    template). Bad options raise :class:`~hfx.evaluation.evaluator.EvaluationInputError`.
    """
    from .evaluator import EvaluationInputError

    if apply_chat_template is None:
        apply_chat_template = False
    if not isinstance(apply_chat_template, (bool, str)) or apply_chat_template == "":
        raise EvaluationInputError(f"apply_chat_template must be True, False or a template name, "
                                   f"got {apply_chat_template!r}.")
    if fewshot_as_multiturn is not None and not isinstance(fewshot_as_multiturn, bool):
        raise EvaluationInputError(f"fewshot_as_multiturn must be True, False or None, got {fewshot_as_multiturn!r}.")
    if system_instruction is not None and not isinstance(system_instruction, str):
        raise EvaluationInputError(f"system_instruction must be a string, got {system_instruction!r}.")
    if fewshot_as_multiturn and apply_chat_template is False:
        raise EvaluationInputError("--fewshot-as-multiturn needs --apply-chat-template: demonstrations become chat "
                                   "turns only under a chat template (lm-eval refuses it too).")
    if apply_chat_template is False and not system_instruction:
        return None
    if apply_chat_template is False:
        return PromptFormat(system_instruction=system_instruction)
    name = None if apply_chat_template is True else apply_chat_template
    template, name = _select_template(tokenizer, name)
    return PromptFormat(tokenizer=tokenizer, template=template, template_name=name,
                        fewshot_as_multiturn=True if fewshot_as_multiturn is None else fewshot_as_multiturn,
                        system_instruction=system_instruction, template_kwargs=dict(template_kwargs or {}))
