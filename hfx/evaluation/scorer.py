"""The fast scorer: lm-eval's three request types on any causal LM, with shared contexts computed once.

Tokenisation is lm-eval's (``HFLM`` 0.4.13): trailing spaces of a context move to the
continuation; context tokens are ``tok(context)`` and continuation tokens are
``tok(context + continuation)[len(tok(context)):]``. ``add_bos_token`` is lm-eval's switch:
``None`` keeps the tokenizer's default special tokens, ``True`` / ``False`` encode with
``add_special_tokens=True`` / ``False``; a text that already starts with the BOS string gets no
special tokens. An empty context is replaced by the BOS (else EOS) token.

A tokenizer that appends a special token (``[SEP]``, EOS) to every input makes every
continuation end in it, so every choice is scored on the same last token; :meth:`loglikelihood`
then logs one warning (and keeps it in ``warnings``).

Scoring differs from lm-eval only in how the work is laid out, not in what is computed:

- **Packed choices.** All continuations of one context go into a single row: the context once,
  then each continuation (minus its last token) as its own block. A 4-D block mask lets a block
  attend to the context and to itself, never to another block, and position ids restart after
  the context for every block, so each continuation sees exactly the sequence lm-eval feeds it.
- **Logits only where scored.** A pre-hook on the output embedding keeps only the hidden states
  at continuation positions, so the vocabulary projection and log-softmax run on those alone.
- **Token-budget batches sorted by length.** Rows are sorted longest first and packed until
  ``rows × longest ≤ max_batch_tokens`` (and at most ``batch_size`` rows). Every row's numbers
  depend only on its own tokens: batch size changes them by float rounding only (< 1e-5).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .cache import ResultCache, request_key

TOKENIZER_INFINITY = 1000000000000000019884624838656
logger = logging.getLogger(__name__)


@dataclass
class _Row:
    """One packed row: a context and the continuations scored after it."""

    context: list[int]
    continuations: list[list[int]]
    slots: list[int]  # where each continuation's result goes

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)


def resolve_max_length(model, tokenizer, default: int = 2048) -> int:
    """The context length lm-eval uses for this model: config attributes, then the tokenizer, then 2048."""
    config = model.config
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value:
            return int(value)
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max and model_max != TOKENIZER_INFINITY:
        return int(model_max)
    return default


class CausalLMScorer:
    """Scores loglikelihood, loglikelihood_rolling and generate_until requests on a causal LM."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int | None = None,
        max_batch_tokens: int = 4096,
        cache: ResultCache | None = None,
        progress: bool = True,
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        seed: int = 1234,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.cache = cache
        self.progress = progress
        self.max_length = max_length or resolve_max_length(model, tokenizer)
        self.device = next(model.parameters()).device
        bos = tokenizer.bos_token_id
        self.prefix_token_id = bos if bos is not None else tokenizer.eos_token_id
        self.forward_calls = 0
        self.seed = seed
        self.warnings: list[str] = []
        # lm-eval's HFLM(add_bos_token=...): None keeps the tokenizer's default special tokens
        self.add_bos_token = add_bos_token
        self.special = {} if add_bos_token is None else {"add_special_tokens": add_bos_token}
        self.prefix_text = tokenizer.decode(self.prefix_token_id) if self.prefix_token_id is not None else None

    # -- tokenisation (lm-eval's) -----------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """lm-eval's ``tok_encode``: the BOS setting, except for a text that already starts with the BOS string."""
        if self.prefix_text and text.startswith(self.prefix_text):
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(text, **self.special)

    def encode_prompt(self, text: str) -> list[int]:
        """lm-eval's ``tok_batch_encode`` for generation: checks the tokenizer's ``bos_token`` string."""
        bos = getattr(self.tokenizer, "bos_token", None)
        special = {"add_special_tokens": False} if bos and text.startswith(bos) else self.special
        return self.tokenizer(text, **special)["input_ids"]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = self.tokenizer.encode(continuation, add_special_tokens=False)
            if self.prefix_token_id != cont[0]:
                return [self.prefix_token_id], cont
            return cont[:1], cont[1:]
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        return context_ids, whole[len(context_ids) :]

    # -- request types ----------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[str, str]], name: str | None = None) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), continuation is the greedy decoding)`` per request.

        ``name`` (the task) is only used in the warning about a shared special last token.
        """
        pairs = [self.encode_pair(ctx, cont) for ctx, cont in requests]
        self._check_shared_special_suffix(pairs, name)
        return self.score_token_pairs(pairs, desc="loglikelihood")

    def _check_shared_special_suffix(self, pairs, name: str | None) -> None:
        last = {cont[-1] for _, cont in pairs if cont}
        if len(pairs) < 2 or len(last) != 1:
            return
        (token_id,) = last
        if token_id not in set(self.tokenizer.all_special_ids):
            return
        what = f"task {name!r}" if name else "these requests"
        message = (
            f"every continuation of {what} ends in the special token {self.tokenizer.convert_ids_to_tokens(token_id)!r} "
            f"(id {token_id}): the tokenizer appends it to every input, so every choice is scored on it alike; "
            "evaluate with add_bos_token=False (hfx eval --no-add-bos-token) or give the tokenizer a post-processor "
            "that does not append it"
        )
        self.warnings.append(message)
        logger.warning("hfx eval: warning: %s", message)

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Log-likelihood of each whole text, in disjoint windows of the model's context length (as lm-eval)."""
        pairs, owners = [], []
        for i, text in enumerate(texts):
            for window in self._rolling_windows(self.encode(text)):
                pairs.append(window)
                owners.append(i)
        totals = [0.0] * len(texts)
        for owner, (logprob, _) in zip(owners, self.score_token_pairs(pairs, desc="loglikelihood_rolling")):
            totals[owner] += logprob
        return totals

    def _rolling_windows(self, tokens: list[int]):
        if not tokens:
            return
        length = self.max_length
        first = min(length, len(tokens))
        yield [self.prefix_token_id], tokens[:first]
        done = first
        while done < len(tokens):
            pred_len = min(len(tokens) - done, length)
            end = done + pred_len
            window = tokens[max(end - length - 1, 0) : end - 1]
            yield window[: len(window) - (pred_len - 1)], tokens[end - pred_len : end]
            done += pred_len

    def generate_until(self, requests: Sequence[tuple[str, dict]]) -> list[str]:
        """Continuations cut at the first stop string: see :func:`hfx.evaluation.generation.generate_until`."""
        from .generation import generate_until

        return generate_until(self, requests)

    # -- the packed scorer ------------------------------------------------------------------------
    def score_token_pairs(
        self, pairs: Sequence[tuple[list[int], list[int]]], desc: str = "scoring"
    ) -> list[tuple[float, bool]]:
        """Score ``(context_ids, continuation_ids)`` pairs; pairs sharing a context share one row."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        keys = [request_key("ll", ctx, cont) for ctx, cont in pairs]
        rows: dict[tuple[int, ...], _Row] = {}
        for slot, ((ctx, cont), key) in enumerate(zip(pairs, keys)):
            cached = self.cache.get(key) if self.cache is not None else None
            if isinstance(cached, list) and len(cached) == 2 and isinstance(cached[0], (int, float)):
                results[slot] = (float(cached[0]), bool(cached[1]))
                continue
            if not cont:
                raise ValueError("A continuation encodes to zero tokens; nothing to score.")
            if len(ctx) + len(cont) > self.max_length + 1:
                # lm-eval truncates such a pair on the left; it then shares its context with nothing
                whole = (ctx + cont)[-(self.max_length + 1) :]
                rows[("truncated", slot)] = _Row(whole[: len(whole) - len(cont)], [cont], [slot])
                continue
            row = rows.setdefault(tuple(ctx), _Row(list(ctx), [], []))
            row.continuations.append(cont)
            row.slots.append(slot)
        ordered = sorted(rows.values(), key=lambda r: (-r.length, r.context))
        bar = tqdm(total=sum(len(r.slots) for r in ordered), desc=desc, disable=not self.progress or not ordered)
        for batch in self._batches(ordered):
            scored = self._forward(batch)
            fresh = {}
            for row, row_results in zip(batch, scored):
                for slot, result in zip(row.slots, row_results):
                    results[slot] = result
                    fresh[keys[slot]] = list(result)
            if self.cache is not None:
                self.cache.put_many(fresh)
            bar.update(sum(len(r.slots) for r in batch))
        bar.close()
        return results  # type: ignore[return-value]

    def _batches(self, rows: list[_Row]):
        batch: list[_Row] = []
        for row in rows:
            longest = batch[0].length if batch else row.length
            too_many = self.batch_size is not None and len(batch) >= self.batch_size
            if batch and (too_many or (len(batch) + 1) * longest > self.max_batch_tokens):
                yield batch
                batch = []
            batch.append(row)
        if batch:
            yield batch

    def _forward(self, rows: list[_Row]) -> list[list[tuple[float, bool]]]:
        width = max(r.length for r in rows)
        n = len(rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((n, width), pad, dtype=torch.long)
        positions = torch.zeros((n, width), dtype=torch.long)
        allowed = torch.zeros((n, width, width), dtype=torch.bool)
        gather_rows, gather_cols, targets, spans = [], [], [], []
        for b, row in enumerate(rows):
            c = len(row.context)
            input_ids[b, :c] = torch.tensor(row.context)
            positions[b, :c] = torch.arange(c)
            allowed[b, :c, :c] = torch.ones(c, c, dtype=torch.bool).tril()
            start, row_spans = c, []
            for cont in row.continuations:
                m = len(cont) - 1
                if m:
                    input_ids[b, start : start + m] = torch.tensor(cont[:-1])
                    positions[b, start : start + m] = torch.arange(c, c + m)
                    allowed[b, start : start + m, :c] = True
                    allowed[b, start : start + m, start : start + m] = torch.ones(m, m, dtype=torch.bool).tril()
                cols = [c - 1] + list(range(start, start + m))
                row_spans.append((len(targets), len(targets) + len(cont)))
                gather_rows.extend([b] * len(cols))
                gather_cols.extend(cols)
                targets.extend(cont)
                start += m
            idle = torch.arange(start, width)
            allowed[b, idle, idle] = True  # padding attends to itself only: no empty softmax rows
            spans.append(row_spans)
        logprobs, greedy = self._scored_positions(
            input_ids, positions, allowed, torch.tensor(gather_rows), torch.tensor(gather_cols), torch.tensor(targets)
        )
        out = []
        for row_spans in spans:
            out.append([(float(logprobs[a:z].sum()), bool(greedy[a:z].all())) for a, z in row_spans])
        return out

    @torch.no_grad()
    def _scored_positions(self, input_ids, positions, allowed, rows, cols, targets):
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
        head = self.model.get_output_embeddings()

        def keep_scored(module, args):
            hidden = args[0]
            return (hidden[rows.to(hidden.device), cols.to(hidden.device)][None],) + tuple(args[1:])

        handle = head.register_forward_pre_hook(keep_scored)
        try:
            self.forward_calls += 1
            logits = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                use_cache=False,
            ).logits[0]
        finally:
            handle.remove()
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        targets = targets.to(logprobs.device)
        picked = logprobs.gather(-1, targets[:, None])[:, 0]
        return picked.cpu(), (logprobs.argmax(-1) == targets).cpu()


def is_causal_lm(model) -> bool:
    """True for models that predict the next token (``*ForCausalLM`` / ``is_decoder``) with an output embedding."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = getattr(model, "config", None)
    if config is None or model.get_output_embeddings() is None:
        return False
    if config.model_type == "hfx":
        return bool(getattr(config, "is_decoder", False)) and type(model).__name__.endswith("ForCausalLM")
    names = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    names = (names,) if isinstance(names, str) else tuple(names or ())
    return type(model).__name__ in names or type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
