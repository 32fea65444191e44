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
  ``batch_size="auto"`` picks the budget once (:meth:`CausalLMScorer._resolve_auto_budget`) and
  says what it picked in ``batch_info``.
- **A shared token prefix computed once.** Rows whose contexts start with the same long run of
  tokens (a ``first_n`` few-shot block) are grouped (:func:`shared_prefix_groups`); the prefix's
  keys/values are computed once (:meth:`CausalLMScorer.prefix_cache`) and each row's remaining
  tokens attend to them (:class:`SharedPrefix`), with position ids continuing after the prefix.
  Models are checked once for this (:attr:`CausalLMScorer.shares_prefixes`); others score whole rows.

**Models whose attention takes only a key padding mask** (hfx's long-context backends
``hfx_sliding_window`` / ``hfx_block_sparse`` / ``hfx_lsh``, flash attention: their
``AttentionMaskInterface`` function returns a 2-D mask, :func:`takes_key_padding_mask_only`) cannot
take the 4-D block mask, so each (context, continuation) gets its own right-padded row under a 2-D
mask. That is the sequence lm-eval feeds the model, so the numbers equal scoring each request
alone wherever the backend's outputs do not depend on the padding. A shared prefix is still
computed once when the backend decodes from a KV cache (``hfx_sliding_window``; the probe finds
out): the tails then attend to prefix + tail keys under one 2-D mask, and a document's choices
share their context that way. Models with transformers' own sliding-window layers (Mistral, Qwen2,
Gemma) get the same rows on any attention: a 4-D mask handed in would replace their window masks.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from functools import lru_cache
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .cache import ResultCache, request_key
from .prefixes import prefix_groups

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


def rolling_windows(tokens: list[int], length: int, prefix_token_id: int):
    """lm-eval's disjoint rolling windows over ``tokens``: ``(context, continuation)`` pairs, each scored
    token once; the first window's context is the prefix (BOS, else EOS) token."""
    if not tokens:
        return
    first = min(length, len(tokens))
    yield [prefix_token_id], tokens[:first]
    done = first
    while done < len(tokens):
        pred_len = min(len(tokens) - done, length)
        end = done + pred_len
        window = tokens[max(end - length - 1, 0) : end - 1]
        yield window[: len(window) - (pred_len - 1)], tokens[end - pred_len : end]
        done += pred_len


def takes_key_padding_mask_only(model) -> bool:
    """Whether the model's attention implementation takes a 2-D key padding mask rather than a 4-D one.

    Asked of the implementation's own ``AttentionMaskInterface`` function (what transformers calls
    to build the model's masks): given one padded key, a 2-D answer means the backend reads
    padding alone and builds its pattern itself (hfx's long-context backends, flash attention),
    so a 4-D mask passed in would be refused or misread. Any other answer (4-D tensor, BlockMask,
    no mask function) keeps the scorer's packed rows.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    name = getattr(config, "_attn_implementation", None)
    if not isinstance(name, str) or name not in ALL_MASK_ATTENTION_FUNCTIONS:
        return False
    keep = torch.tensor([[False, True, True]])
    try:
        mask = ALL_MASK_ATTENTION_FUNCTIONS[name](
            batch_size=1, q_length=2, kv_length=3, q_offset=1, kv_offset=0, mask_function=causal_mask_function,
            attention_mask=keep, allow_is_causal_skip=True, dtype=torch.float32, config=config, use_vmap=False,
            device=torch.device("cpu"),
        )
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as error:
        # a mask function this probe cannot call: keep the packed 4-D layout, and say why at debug level
        logger.debug("hfx eval: mask function of %r not probed (%s: %s); packed rows", name, type(error).__name__, error)
        return False
    return isinstance(mask, torch.Tensor) and mask.dim() == 2


def has_sliding_window_layers(model) -> bool:
    """Whether transformers gives some layer of the model window-bounded attention (Mistral, Gemma 2/3,
    Qwen2 with ``use_sliding_window``, ...), read from the cache layers it builds for the config.

    Such a model takes a 4-D mask handed in as the mask of *every* layer, so the scorer's block
    mask would silently drop the window; these models get 2-D-mask rows and build their own masks.
    """
    from transformers.cache_utils import DynamicCache

    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # a config the cache cannot read: no window known
        return False
    return any(getattr(layer, "is_sliding", False) for layer in layers)


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


class LMScorer:
    """What the causal and the encoder-decoder scorers share: settings, lm-eval's tokenisation and rolling windows.

    A subclass scores ``(context ids, continuation ids)`` pairs (``score_token_pairs``);
    :meth:`loglikelihood_rolling` builds them from lm-eval's windows.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int | str | None = None,
        max_batch_tokens: int = 4096,
        cache: ResultCache | None = None,
        progress: bool = True,
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        seed: int = 1234,
    ):
        if batch_size is not None and batch_size != "auto" and not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be a positive int, 'auto' or None, got {batch_size!r}")
        self._check_model(model)
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
        self.prefix_text = tokenizer.decode(self.prefix_token_id) if self.prefix_token_id is not None else None
        # lm-eval's HFLM(add_bos_token=...): None keeps the tokenizer's default special tokens
        self.add_bos_token = add_bos_token
        self.special = {} if add_bos_token is None else {"add_special_tokens": add_bos_token}
        self.seed = seed
        self.forward_calls = 0
        self.warnings: list[str] = []

    def _check_model(self, model) -> None:
        """Refuse a model this scorer cannot score (before anything else is read from it)."""

    # -- tokenisation (lm-eval's) -----------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """lm-eval's ``tok_encode``: the BOS setting, except for a text that already starts with the BOS string."""
        if self.prefix_text and text.startswith(self.prefix_text):
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(text, **self.special)

    def _split_pair(self, context: str, continuation: str):
        """lm-eval's ``_encode_pair`` up to tokenising the texts: ``(context, continuation, ids)``.

        An empty context is replaced by the prefix (BOS, else EOS) token, and ``ids`` is the finished
        ``(context ids, continuation ids)`` pair (the continuation's first token serves as the context
        when it already is the prefix token); otherwise ``ids`` is None and the context's trailing
        spaces have moved to the continuation.
        """
        if context == "":
            cont = self.tokenizer.encode(continuation, add_special_tokens=False)
            ids = ([self.prefix_token_id], cont) if self.prefix_token_id != cont[0] else (cont[:1], cont[1:])
            return context, continuation, ids
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        return context, continuation, None

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
        return rolling_windows(tokens, self.max_length, self.prefix_token_id)

    def _cached_pair(self, key: str, continuation: list[int]) -> tuple[float, bool] | None:
        """The cached ``(log-likelihood, is_greedy)`` of a pair, or None to score it (an empty continuation
        is refused: there is nothing to score)."""
        cached = self.cache.get(key) if self.cache is not None else None
        if isinstance(cached, list) and len(cached) == 2 and isinstance(cached[0], (int, float)):
            return float(cached[0]), bool(cached[1])
        if not continuation:
            raise ValueError("A continuation encodes to zero tokens; nothing to score.")
        return None

    def score_token_pairs(self, pairs: Sequence[tuple[list[int], list[int]]], desc: str = "scoring"):
        raise NotImplementedError


class CausalLMScorer(LMScorer):
    """Scores loglikelihood, loglikelihood_rolling and generate_until requests on a causal LM."""

    #: data-parallel hook (:class:`~hfx.evaluation.distributed.DataParallelScorer` sets it): ``select(units)``
    #: gets a call's batches as ``(shared prefix length, rows)`` and returns the ascending indices this process
    #: runs; ``merge(results, keys)`` returns the results with every other process's filled in.
    data_parallel = None

    def __init__(self, model, tokenizer, **settings):
        super().__init__(model, tokenizer, **settings)
        #: how rows per forward are chosen: ``mode`` (fixed / auto-cuda / auto-cpu), ``max_batch_tokens``,
        #: ``rows`` (the row cap, None: none) and, for auto, ``probe`` (what was tried and measured);
        #: with ``batch_size="auto"`` it is filled by the first forward that needs it
        self.batch_info: dict | None = None
        if self.batch_size != "auto":
            self.batch_info = {"mode": "fixed", "max_batch_tokens": self.max_batch_tokens, "rows": self.batch_size}
        self._shares_prefixes: bool | None = None
        self._key_padding_only: bool | None = None
        self._kv_key_memory: int | None = None

    def encode_prompt(self, text: str) -> list[int]:
        """lm-eval's ``tok_batch_encode`` for generation: checks the tokenizer's ``bos_token`` string."""
        bos = getattr(self.tokenizer, "bos_token", None)
        special = {"add_special_tokens": False} if bos and text.startswith(bos) else self.special
        return self.tokenizer(text, **special)["input_ids"]

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of every text, each distinct text once, in one tokenizer call per special-token
        setting: the same ids without the per-call overhead (most of the time of short requests)."""
        distinct = list(dict.fromkeys(texts))
        plain = [t for t in distinct if self.prefix_text and t.startswith(self.prefix_text)]
        plain_set = set(plain)
        special = [t for t in distinct if t not in plain_set]
        ids: dict[str, list[int]] = {}
        for batch, kwargs in ((plain, {"add_special_tokens": False}), (special, self.special)):
            if batch:
                ids.update(zip(batch, self.tokenizer(batch, **kwargs)["input_ids"]))
        return [list(ids[t]) for t in texts]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return self.encode_pairs([(context, continuation)])[0]

    def encode_pairs(self, requests: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """lm-eval's ``_encode_pair`` for each request (its context and continuation token ids)."""
        out: list[tuple[list[int], list[int]] | None] = [None] * len(requests)
        texts, split = [], []
        for i, (context, continuation) in enumerate(requests):
            context, continuation, ids = self._split_pair(context, continuation)
            if ids is not None:
                out[i] = ids
                continue
            texts += [context + continuation, context]
            split.append(i)
        encoded = self.encode_many(texts)
        for n, i in enumerate(split):
            whole, context_ids = encoded[2 * n], encoded[2 * n + 1]
            out[i] = (context_ids, whole[len(context_ids) :])
        return out  # type: ignore[return-value]

    # -- request types ----------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[str, str]], name: str | None = None) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), continuation is the greedy decoding)`` per request.

        ``name`` (the task) is only used in the warning about a shared special last token.
        """
        pairs = self.encode_pairs(requests)
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

    def generate_until(self, requests: Sequence[tuple[str, dict]]) -> list[str]:
        """Continuations cut at the first stop string: see :func:`hfx.evaluation.generation.generate_until`."""
        from .generation import generate_until

        return generate_until(self, requests)

    # -- the packed scorer ------------------------------------------------------------------------
    def score_token_pairs(
        self, pairs: Sequence[tuple[list[int], list[int]]], desc: str = "scoring"
    ) -> list[tuple[float, bool]]:
        """Score ``(context_ids, continuation_ids)`` pairs; pairs sharing a context share one row,
        rows sharing a long token prefix share its keys/values (see :func:`shared_prefix_groups`)."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        keys = [request_key("ll", ctx, cont) for ctx, cont in pairs]
        rows: dict[tuple[int, ...], _Row] = {}
        for slot, ((ctx, cont), key) in enumerate(zip(pairs, keys)):
            results[slot] = self._cached_pair(key, cont)
            if results[slot] is not None:
                continue
            if len(ctx) + len(cont) > self.max_length + 1:
                # lm-eval truncates such a pair on the left; the cut context is then scored as any other
                # (choices of one length cut the same: one row)
                whole = (ctx + cont)[-(self.max_length + 1) :]
                ctx = whole[: len(whole) - len(cont)]
            # a key-padding-only attention takes no block mask: one row per continuation
            row = rows.setdefault((slot,) if self.key_padding_only else tuple(ctx), _Row(list(ctx), [], []))
            row.continuations.append(cont)
            row.slots.append(slot)
        plan = self._plan(list(rows.values()))

        def record(batch, scored):
            fresh = {}
            for row, row_results in zip(batch, scored):
                for slot, result in zip(row.slots, row_results):
                    results[slot] = result
                    fresh[keys[slot]] = list(result)
            if self.cache is not None:
                self.cache.put_many(fresh)

        if self.batch_info is None and plan:
            plan = self._resolve_auto_budget(plan, record)  # rows the CPU probe scored are taken out
        units = [(prefix, batch) for prefix, group in plan for batch in self._batches(group, len(prefix))]
        dp = self.data_parallel
        mine = range(len(units)) if dp is None else dp.select([(len(p), b) for p, b in units])
        bar = tqdm(total=sum(len(r.slots) for i in mine for r in units[i][1]), desc=desc,
                   disable=not self.progress or not rows)
        past, past_prefix = None, None
        for i in mine:
            prefix, batch = units[i]
            if prefix and prefix is not past_prefix:  # one prefix cache per group, as its batches come in order
                group = [b for p, b in units if p is prefix]
                width = max(r.length for b in group for r in b) - len(prefix)
                past, past_prefix = SharedPrefix(self.prefix_cache(prefix), max(len(b) for b in group), width), prefix
            record(batch, self._forward(batch, prefix, past if prefix else None))
            bar.update(sum(len(r.slots) for r in batch))
        bar.close()
        if dp is not None:  # the other processes' batches
            results = dp.merge(results, keys)
        return results  # type: ignore[return-value]

    def _plan(self, rows: list[_Row]) -> list[tuple[list[int], list[_Row]]]:
        """``(shared prefix tokens, rows)`` groups, each sorted longest row first; ``[]`` prefix: none shared."""
        groups: list[tuple[list[int], list[_Row]]] = []
        taken: set[int] = set()
        found = shared_prefix_groups([r.context for r in rows]) if len(rows) >= 2 else []
        if found and self.shares_prefixes:
            for length, members in found:
                prefix = rows[members[0]].context[:length]
                groups.append((prefix, sorted((rows[i] for i in members), key=lambda r: (-r.length, r.context))))
                taken.update(members)
        rest = [r for i, r in enumerate(rows) if i not in taken]
        if rest:
            groups.append(([], sorted(rest, key=lambda r: (-r.length, r.context))))
        return groups

    # -- batch_size="auto" -------------------------------------------------------------------------
    def _resolve_auto_budget(self, plan, record):
        """Choose ``max_batch_tokens`` once, on the first rows scored; returns the plan left to score.

        On CUDA: the largest budget whose worst-case forward fits (:func:`find_token_budget`, halving
        on out-of-memory as lm-eval's ``batch_size="auto"``); nothing is scored. Elsewhere nothing runs
        out of memory, it only slows down: the first rows of the largest group are scored in one batch
        at each budget of :data:`AUTO_CPU_BUDGETS` that fits in half the available memory (until the
        group runs out, or a budget is clearly slower than the best so far: :data:`AUTO_CPU_STOP`),
        and the budget with the most tokens per second is kept. Those forwards are real work: their results are recorded.
        """
        info = {"mode": "auto-cuda" if self.device.type == "cuda" else "auto-cpu", "rows": None, "probe": {}}
        self.batch_info = info
        if self.device.type == "cuda":

            def fits(budget: int) -> None:
                width = min(self.max_length, budget)
                token = self.prefix_token_id or 0
                self._forward([_Row([token] * (width - 1), [[token]], [0])] * max(1, budget // width))

            start = AUTO_CUDA_START_ROWS * self.max_length
            calls = self.forward_calls
            self.max_batch_tokens = find_token_budget(fits, start, info["probe"])
            self.forward_calls = calls
            info["max_batch_tokens"] = self.max_batch_tokens
            return plan
        limit = free_memory(self.device)
        per_token = self._bytes_per_token()
        candidates = [b for b in AUTO_CPU_BUDGETS if limit is None or b * per_token <= limit / 2] or AUTO_CPU_BUDGETS[:1]
        info["memory_available"] = limit
        best = None
        plan = [(prefix, list(group)) for prefix, group in plan]
        prefix, group = max(plan, key=lambda g: len(g[1]))  # the largest group: the work that dominates
        for budget in candidates:
            if not group:
                break  # a larger budget would form the same batches as the last one
            self.max_batch_tokens = budget
            batch = next(self._batches(group, len(prefix)))
            past = None
            if prefix:
                past = SharedPrefix(self.prefix_cache(prefix), len(batch), batch[0].length - len(prefix))
            started = time.perf_counter()
            record(batch, self._forward(batch, prefix, past))
            seconds = time.perf_counter() - started
            tokens = sum(r.length - len(prefix) for r in batch)
            info["probe"][budget] = {"rows": len(batch), "tokens": tokens, "seconds": round(seconds, 4),
                                     "tokens_per_s": round(tokens / max(seconds, 1e-9), 1)}
            rate = tokens / max(seconds, 1e-9)
            del group[: len(batch)]
            if best is not None and rate < AUTO_CPU_STOP * best[1]:
                break  # past the best: larger budgets only get slower (cache misses), so stop paying for them
            if best is None or rate > best[1]:
                best = (budget, rate)
        self.max_batch_tokens = best[0] if best is not None else candidates[0]
        info["max_batch_tokens"] = self.max_batch_tokens
        return [(prefix, group) for prefix, group in plan if group]

    def _bytes_per_token(self) -> int:
        """A generous estimate of a forward's peak memory per token in a batch (activations, attention
        scores over the longest possible row, shared-prefix keys/values)."""
        config = getattr(self.model.config, "text_config", None) or self.model.config
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 1024)
        inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 16)
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 12)
        elem = next(self.model.parameters()).element_size()
        attention = (heads + 1) * self.max_length * max(elem, 4)  # scores and the float mask over every key
        prefix_kv = PREFIX_KV_FACTOR * layers * 2 * hidden * elem
        return int(elem * (8 * hidden + 3 * inner) + attention + prefix_kv)

    def _prefix_kv_keys(self) -> int:
        """How many keys (rows × (prefix + tail)) a shared-prefix batch may hold per layer: at most
        ``PREFIX_KV_FACTOR × max_batch_tokens``, and within :meth:`kv_key_memory`."""
        return min(PREFIX_KV_FACTOR * self.max_batch_tokens, self.kv_key_memory())

    def kv_key_memory(self, agreed: int | None = None) -> int:
        """How many keys' keys/values (every layer) fit in half the free device memory (CUDA) or a
        quarter of the available memory (elsewhere): :func:`free_memory`, measured once, on first use.

        ``agreed`` replaces the measurement: data-parallel ranks measure once each and all keep the
        smallest (:class:`~hfx.evaluation.distributed.DataParallelScorer`), so that every rank forms
        the same shared-prefix batches. Recorded in ``batch_info["prefix_kv_keys_in_memory"]``.
        """
        if agreed is not None:
            self._kv_key_memory = max(1, int(agreed))
        elif self._kv_key_memory is None:
            config = getattr(self.model.config, "text_config", None) or self.model.config
            hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 1024)
            heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 16)
            kv_heads = getattr(config, "num_key_value_heads", None) or heads
            head_dim = getattr(config, "head_dim", None) or hidden // heads
            layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 12)
            per_key = layers * 2 * kv_heads * head_dim * next(self.model.parameters()).element_size()
            free = free_memory(self.device)
            free = (1 << 40 if free is None else free) // (2 if self.device.type == "cuda" else 4)
            self._kv_key_memory = max(1, free // per_key)
        if self.batch_info is not None:
            self.batch_info["prefix_kv_keys_in_memory"] = self._kv_key_memory
        return self._kv_key_memory

    def _batches(self, rows: list[_Row], skip: int = 0):
        """Consecutive rows while ``rows × (longest row - skip) ≤ max_batch_tokens`` (and ``≤ batch_size`` rows).

        With a shared prefix of ``skip`` tokens, every row also holds the prefix's keys/values:
        the rows of a batch are then also limited to ``rows × longest ≤`` :meth:`_prefix_kv_keys`.
        """
        batch: list[_Row] = []
        cap = self.batch_size if isinstance(self.batch_size, int) else None
        kv_keys = self._prefix_kv_keys() if skip else None
        for row in rows:
            longest = batch[0].length if batch else row.length
            n = len(batch) + 1
            over = n * (longest - skip) > self.max_batch_tokens
            if skip:
                over = over or n * longest > kv_keys
            if batch and ((cap is not None and len(batch) >= cap) or over):
                yield batch
                batch = []
            batch.append(row)
        if batch:
            yield batch

    def _forward(self, rows: list[_Row], prefix: Sequence[int] = (), past=None) -> list[list[tuple[float, bool]]]:
        """One model forward over ``rows`` (after the ``prefix`` whose keys/values ``past`` holds)."""
        skip = len(prefix)
        width = max(r.length for r in rows) - skip
        n = len(rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # per position: token, position id and block (0: context, i > 0: the i-th continuation, -1: padding)
        ids, pos, block = [], [], []
        gather_rows, gather_cols, targets, spans = [], [], [], []
        for b, row in enumerate(rows):
            c = len(row.context)
            tail = row.context[skip:]
            row_ids, row_pos, row_block = list(tail), list(range(skip, c)), [0] * len(tail)
            row_spans = []
            for i, cont in enumerate(row.continuations, 1):
                m = len(cont) - 1
                cols = [len(tail) - 1] + list(range(len(row_ids), len(row_ids) + m))
                row_ids += cont[:-1]
                row_pos += range(c, c + m)
                row_block += [i] * m
                row_spans.append((len(targets), len(targets) + len(cont)))
                gather_rows.extend([b] * len(cols))
                gather_cols.extend(cols)
                targets.extend(cont)
            idle = width - len(row_ids)
            ids += row_ids + [pad] * idle
            pos += row_pos + list(range(c, c + idle))
            block += row_block + [-1] * idle
            spans.append(row_spans)
        input_ids = torch.tensor(ids, dtype=torch.long).view(n, width)
        positions = torch.tensor(pos, dtype=torch.long).view(n, width)
        block = torch.tensor(block, dtype=torch.long).view(n, width)
        if self.key_padding_only:  # rows of one continuation each: the key padding mask over prefix + row
            allowed = torch.cat([torch.ones(n, skip, dtype=torch.bool), block >= 0], dim=1)
        else:
            allowed = block_mask(block, positions, skip)
        logprobs, greedy = self._scored_positions(
            input_ids, positions, allowed, torch.tensor(gather_rows), torch.tensor(gather_cols), torch.tensor(targets),
            past,
        )
        out = []
        for row_spans in spans:
            out.append([(float(logprobs[a:z].sum()), bool(greedy[a:z].all())) for a, z in row_spans])
        return out

    @torch.no_grad()
    def _scored_positions(self, input_ids, positions, allowed, rows, cols, targets, past=None):
        """Log-probabilities and greedy flags at ``(rows, cols)``; ``allowed`` is a 3-D block mask or a 2-D
        key padding mask (passed as the model's ``attention_mask`` as it is)."""
        if allowed.dim() == 2:
            mask = allowed.long()
        else:
            dtype = next(self.model.parameters()).dtype
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
        cache = {"use_cache": False}
        if past is not None:
            cache = {"past_key_values": past.cache(input_ids.shape[0]), "use_cache": True}
        with self._hidden_kept_at(rows, cols):
            self.forward_calls += 1
            logits = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                **cache,
            ).logits[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        targets = targets.to(logprobs.device)
        picked = logprobs.gather(-1, targets[:, None])[:, 0]
        return picked.cpu(), (logprobs.argmax(-1) == targets).cpu()

    @contextmanager
    def _hidden_kept_at(self, rows: torch.Tensor, cols: torch.Tensor):
        """Within the block, the output embedding sees only the hidden states at ``(rows, cols)``:
        the vocabulary projection runs on scored positions alone (logits come out as ``(1, k, vocab)``)."""
        head = self.model.get_output_embeddings()

        def keep(module, args):
            hidden = args[0]
            return (hidden[rows.to(hidden.device), cols.to(hidden.device)][None],) + tuple(args[1:])

        handle = head.register_forward_pre_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    # -- shared prefixes ---------------------------------------------------------------------------
    @torch.no_grad()
    def prefix_cache(self, tokens: Sequence[int]):
        """The keys/values of ``tokens`` (positions ``0..len-1``, plain causal attention), batch 1.

        A plain ``DynamicCache`` (every layer keeps every key, as the scorer's full masks assume).
        Treat it as read-only (:class:`SharedPrefix` copies it for the rows of a batch). Counted in ``forward_calls``; the vocabulary projection runs on the last position only.
        """
        from transformers.cache_utils import DynamicCache

        self.forward_calls += 1
        ids = torch.tensor([list(tokens)], dtype=torch.long)
        last = torch.tensor([len(tokens) - 1])
        with self._hidden_kept_at(torch.tensor([0]), last):
            out = self.model(input_ids=ids.to(self.device), attention_mask=torch.ones_like(ids).to(self.device),
                             past_key_values=DynamicCache(), use_cache=True)
        return out.past_key_values

    @property
    def key_padding_only(self) -> bool:
        """Whether rows go to the model under a 2-D key padding mask only, each continuation in a row of its
        own (checked once): the attention takes nothing else (:func:`takes_key_padding_mask_only`), or the
        model has sliding-window layers that a 4-D mask would override (:func:`has_sliding_window_layers`)."""
        if self._key_padding_only is None:
            self._key_padding_only = takes_key_padding_mask_only(self.model) or has_sliding_window_layers(self.model)
        return self._key_padding_only

    @property
    def decodes_from_cache(self) -> bool:
        """Whether generation may decode from a KV cache: always, except for a key-padding-only attention
        that failed the prefix probe (``hfx_block_sparse`` and ``hfx_lsh`` need the whole sequence in every
        forward); those generate by a full forward per step."""
        return not self.key_padding_only or self.shares_prefixes

    @property
    def shares_prefixes(self) -> bool:
        """Whether this model scores rows after a cached prefix exactly as without it (checked once).

        A model qualifies when its forward takes ``past_key_values`` and a short probe, two rows
        after a shared 6-token prefix, gives the log-probabilities of the same rows scored whole.
        Otherwise every row is scored whole; the reason is logged at debug level.
        """
        if self._shares_prefixes is None:
            self._shares_prefixes, reason = self._probe_prefix_sharing()
            if not self._shares_prefixes:
                logger.debug("hfx eval: no cross-document prefix sharing for %s: %s", type(self.model).__name__, reason)
        return self._shares_prefixes

    def _probe_prefix_sharing(self) -> tuple[bool, str]:
        import inspect

        config = getattr(self.model, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            return False, "an encoder-decoder model"
        parameters = inspect.signature(self.model.forward).parameters
        if "past_key_values" not in parameters:
            return False, "its forward takes no past_key_values"
        vocab = self.model.get_output_embeddings().weight.shape[0]
        base = [(7 * i + 3) % vocab for i in range(12)]
        rows = [_Row(base[:9], [base[9:11], base[11:12]], [0, 1]), _Row(base[:6] + base[8:10], [base[10:12]], [2])]
        if self.key_padding_only:
            global_ids = getattr(config, "global_attention_token_ids", None)
            if global_ids:  # a global token in a tail would need the whole sequence as keys
                return False, f"global tokens {list(global_ids)} need every key in one forward"
            rows = [_Row(r.context, [c], [s]) for r in rows for c, s in zip(r.continuations, r.slots)]
        prefix = base[:6]
        calls = self.forward_calls
        # Three forwards of a few tokens: on CPU one thread, as waking a second one for each of their
        # hundreds of small ops costs more than they compute (20x on a loaded 2-core machine).
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            whole = self._forward(rows)
            shared = self._forward(rows, prefix, SharedPrefix(self.prefix_cache(prefix), len(rows), 6))
        # a probe of 12 tokens: any failure here means the cached-prefix path is not for this model (a real
        # fault of the model shows again, unhidden, when the rows are scored whole)
        except (TypeError, ValueError, RuntimeError, NotImplementedError, AttributeError, IndexError) as error:
            return False, f"a forward after a cached prefix failed ({type(error).__name__}: {error})"
        finally:
            self.forward_calls = calls  # the probe is not part of the work counted
            torch.set_num_threads(threads)
        dtype = next(self.model.parameters()).dtype
        diff = max(abs(a[0] - b[0]) for x, y in zip(whole, shared) for a, b in zip(x, y))
        tolerance = prefix_probe_tolerance(dtype, max(abs(a[0]) for x in whole for a in x))
        if not diff <= tolerance:
            return False, f"log-likelihoods after a cached prefix differ by {diff:.3g} from whole rows"
        return True, ""


def prefix_probe_tolerance(dtype: torch.dtype, scale: float) -> float:
    """The largest difference the prefix-sharing probe accepts between a log-likelihood of magnitude
    ``scale`` scored after a cached prefix and the same one scored whole.

    Both paths compute the same sums, only in another order (attention over cached plus own keys
    instead of one sequence, other matrix shapes), so they differ by float rounding alone: a few
    ulps per operation, carried through the layers into a log-probability whose error scales with
    its magnitude. In fp32 (eps 1.2e-7) that is ~1e-7 relative (1e-6 measured at |ll| ≈ 10 on
    the test models); ``1e-5 × max(1, |ll|)``, about 80 ulps of the result, is the bound, the
    precision the docs promise against lm-eval. A cache laid out wrong (positions, masks, a prefix
    not attended) moves log-probabilities by far more. In reduced precision (bf16 eps 7.8e-3, fp16
    9.8e-4) the rounding of every activation is of that order: ``max(5e-2, 4 eps × |ll|)``.
    """
    if dtype in (torch.float32, torch.float64):
        return 1e-5 * max(1.0, scale)
    return max(5e-2, 4 * torch.finfo(dtype).eps * scale)


class SharedPrefix:
    """A prefix's keys/values laid out once for every row of a group's batches, and extended in place.

    Per layer, one buffer ``(rows, kv heads, prefix + width, head dim)`` holds the prefix copied
    to every row (once per group, not per batch: concatenating it to every batch's keys was a
    fifth of the forward time); a batch's forward writes its own keys and values after it and
    attends to ``buffer[:batch rows, :, :prefix + batch width]``. ``rows`` and ``width`` are the
    largest of the group's batches.
    """

    def __init__(self, prefix_kv, rows: int, width: int):
        self.length = prefix_kv.get_seq_length()
        self.buffers = []
        for layer in prefix_kv.layers:
            pair = []
            for states in (layer.keys, layer.values):
                _, heads, _, dim = states.shape
                buffer = states.new_empty(rows, heads, self.length + width, dim)
                buffer[:, :, : self.length] = states
                pair.append(buffer)
            self.buffers.append(tuple(pair))

    def cache(self, rows: int):
        """A ``DynamicCache`` for one forward of ``rows`` rows over this prefix."""
        from transformers.cache_utils import DynamicCache

        layer_class = _shared_prefix_layer_class()
        cache = DynamicCache()
        cache.layers = [layer_class(keys, values, self.length, rows) for keys, values in self.buffers]
        return cache


@lru_cache(maxsize=1)
def _shared_prefix_layer_class():
    from transformers.cache_utils import DynamicLayer  # imported on first use: importing hfx stays cheap

    class SharedPrefixLayer(DynamicLayer):
        """A ``DynamicLayer`` whose ``update`` writes into a :class:`SharedPrefix` buffer instead of concatenating."""

        def __init__(self, keys, values, prefix: int, rows: int):
            super().__init__()
            self.buffer_keys, self.buffer_values, self.prefix, self.rows = keys, values, prefix, rows
            self.dtype, self.device = keys.dtype, keys.device
            self.keys, self.values = keys[:rows, :, :prefix], values[:rows, :, :prefix]
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            end = self.prefix + key_states.shape[-2]
            if key_states.shape[0] != self.rows or end > self.buffer_keys.shape[2]:
                raise ValueError(f"a shared-prefix cache for {self.rows} rows of up to {self.buffer_keys.shape[2]} "
                                 f"keys got {key_states.shape[0]} rows reaching {end}")
            self.buffer_keys[: self.rows, :, self.prefix : end] = key_states
            self.buffer_values[: self.rows, :, self.prefix : end] = value_states
            self.keys = self.buffer_keys[: self.rows, :, :end]
            self.values = self.buffer_values[: self.rows, :, :end]
            return self.keys, self.values

    return SharedPrefixLayer


#: token budgets the CPU probe of ``batch_size="auto"`` tries, one forward each
AUTO_CPU_BUDGETS = (1024, 2048, 4096, 8192, 16384)
#: the CPU probe stops at the first budget slower than this fraction of the best one so far
AUTO_CPU_STOP = 0.85
#: the CUDA search starts at this many rows of the model's full context length (lm-eval's auto starts at 64)
AUTO_CUDA_START_ROWS = 64


def find_token_budget(fits, start: int, tried: dict | None = None, minimum: int = 16) -> int:
    """The first of ``start, start/2, start/4, ...`` for which ``fits(budget)`` returns without running
    out of CUDA memory (lm-eval's ``batch_size="auto"`` search, over tokens per forward).

    ``tried`` records each budget as ``"ok"`` or ``"out of memory"``. A budget below ``minimum``
    that still does not fit re-raises the error: the model itself does not fit.
    """
    budget = int(start)
    while True:
        try:
            fits(budget)
        except torch.cuda.OutOfMemoryError:
            if tried is not None:
                tried[budget] = "out of memory"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if budget // 2 < minimum:
                raise
            budget //= 2
            continue
        if tried is not None:
            tried[budget] = "ok"
        return budget


def free_memory(device: torch.device) -> int | None:
    """Bytes a new allocation on ``device`` can take, or None when unknown (no limit).

    CUDA: the driver's free memory plus what PyTorch's caching allocator holds reserved but
    unallocated (it hands that out before asking the driver). Elsewhere: the host's ``MemAvailable``
    (reclaimable page cache counts as free), else the free physical pages. The scorer's and
    generation's memory bounds both use it.
    """
    if device is not None and torch.device(device).type == "cuda":
        held = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0] + max(held, 0))
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


#: the scorer shares no prefix shorter than this many tokens: a group's prefix costs its own forward and a
#: copy of its keys/values per row of the group's largest batch (generation has its own threshold:
#: :data:`hfx.evaluation.generation.GENERATION_MIN_SHARED_PREFIX`)
SCORER_MIN_SHARED_PREFIX = 32
#: nor a group saving fewer than this many tokens of computation, ``(rows - 1) × prefix``
MIN_SHARED_SAVING = 512
#: with a shared prefix, ``rows × (prefix + longest tail)`` keys per layer stay under this × max_batch_tokens
#: (and within memory: :meth:`CausalLMScorer._prefix_kv_keys`)
PREFIX_KV_FACTOR = 8


def shared_prefix_groups(
    contexts: Sequence[Sequence[int]], min_prefix: int = SCORER_MIN_SHARED_PREFIX,
    min_saving: int = MIN_SHARED_SAVING,
) -> list[tuple[int, list[int]]]:
    """Groups of contexts worth scoring after one shared token prefix: ``(prefix length, indices)``.

    :func:`hfx.evaluation.prefixes.prefix_groups` with the scorer's thresholds: groups are taken
    greedily, the one saving the most computation ``(members - 1) × prefix`` first, until none has a
    prefix of ``min_prefix`` tokens saving ``min_saving`` tokens. A context joins a group only when
    its own tokens start with the prefix (a BPE merge across the shots' boundary, or a left cut at
    max_length, is scored whole), and each prefix leaves the last token of every member's context
    to the member's own forward (its logits score the first continuation token).
    """
    return prefix_groups(contexts, min_prefix, min_saving)


def block_mask(block: torch.Tensor, positions: torch.Tensor, prefix: int = 0) -> torch.Tensor:
    """Bool ``(rows, width, prefix + width)``: which key each query may attend to in a packed row.

    ``block`` holds 0 for context tokens, ``i > 0`` for the i-th continuation block and -1 for
    padding. A query sees earlier-or-same positions of the context (and every one of the ``prefix``
    cached keys before the row) and of its own block; padding sees only itself, so no softmax row is
    empty.
    """
    n, width = block.shape
    q_block, q_pos = block[:, :, None], positions[:, :, None]
    allowed = ((block[:, None, :] == 0) | (block[:, None, :] == q_block)) & (positions[:, None, :] <= q_pos)
    allowed &= q_block >= 0
    idle = block < 0
    allowed |= torch.diag_embed(idle)
    if prefix:
        seen = (block >= 0)[:, :, None].expand(n, width, prefix)
        allowed = torch.cat([seen, allowed], dim=2)
    return allowed


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
