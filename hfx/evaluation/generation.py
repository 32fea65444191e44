"""Generation for ``generate_until`` requests, as lm-eval 0.4.13's ``HFLM.generate_until`` decides what to return.

The scorer (:class:`~hfx.evaluation.scorer.CausalLMScorer`) owns tokenisation, the model and the
result cache; this module decides how prompts are turned into continuations.

What a request returns is fixed by one-request-at-a-time greedy decoding: generate until the raw
decoded continuation (special tokens included) contains a stop string, the model emits an EOS
token, or ``max_gen_toks`` tokens are out; then decode without special tokens and cut at the
first stop string. Greedy requests are computed in batches that return exactly that:

- **Grouped, sorted, budgeted.** Requests are grouped by their generation kwargs (as lm-eval),
  sorted longest prompt first, and packed until ``rows × (unshared prompt + max_gen_toks) ≤
  max_batch_tokens`` (and at most ``batch_size`` rows when that is an int).
- **A shared prefix computed once.** The longest token prefix shared by most prompts of a group
  (a ``first_n`` few-shot block: the same description and shots for every document) is run once;
  every row of every batch that shares it attends to that one copy of its keys/values (an
  attention function registered with transformers for SDPA/eager models: prefix scores for all
  rows in one matrix product, one softmax over prefix and own keys), else to a copy per row.
  The rest of each prompt is left-padded *after* the prefix: the attention mask hides the gap
  and per-row position ids continue from the prefix, so each row sees exactly the positions it
  has alone.
- **Finished rows leave the batch.** A row that produced a stop string or EOS is done and is
  dropped from the batch (and its cache rows) at once; the batch stops when no row is left.
- **A plain greedy loop** over a ``DynamicCache`` with only the last position's logits computed,
  instead of ``generate``'s per-step machinery.

**Models whose attention takes only a key padding mask** (hfx's long-context backends; the scorer's
:attr:`~hfx.evaluation.scorer.CausalLMScorer.key_padding_only`): a shared prefix would leave a gap
of padding between it and the left-padded rest of a prompt, which a sliding window counts as
distance, so none is shared; left padding itself is exact (the window is measured between key
slots and padded keys are never attended). Backends that cannot decode from a KV cache
(``hfx_block_sparse``, ``hfx_lsh``: :attr:`~hfx.evaluation.scorer.CausalLMScorer.decodes_from_cache`)
decode greedily by a full forward over each right-padded row at every step, the logits taken at
each row's last real token: what ``generate(..., use_cache=False)`` returns one request at a time.

Sampling (``do_sample: true``), beam search and any generation option or model
``generation_config`` setting that changes greedy decoding (repetition penalty, bad words, ...)
keep the one-request-at-a-time ``generate`` path: sampled requests each draw from their own seeded
stream, so a run resumed from the cache samples what an uninterrupted run would.

``scorer.forward_calls`` counts model forward calls: the shared prefix once, each batch's prompt
forward, and one per decoding step of a batch (one ``generate`` call counts one).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .cache import request_key
from .prefixes import prefix_groups
from .scorer import free_memory

#: generation shares no prefix shorter than this many tokens: not worth a separate forward and a cache copy
#: per row (the scorer has its own threshold: :data:`hfx.evaluation.scorer.SCORER_MIN_SHARED_PREFIX`)
GENERATION_MIN_SHARED_PREFIX = 8

#: ``generation_config`` fields that change what greedy decoding picks; a non-default value of any
#: of them sends the request through ``generate`` so it stays exactly what ``generate`` returns
_GREEDY_CHANGING = (
    "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "min_length", "min_new_tokens", "forced_bos_token_id", "forced_eos_token_id",
    "forced_decoder_ids", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "sequence_bias", "guidance_scale", "watermarking_config", "num_beams", "num_beam_groups", "penalty_alpha",
    "dola_layers", "stop_strings", "max_time", "remove_invalid_values",
)


@dataclass
class _Pending:
    """One request still to generate: its slot in the output, prompt ids and cache key."""

    slot: int
    prompt: list[int]
    key: str
    tokens: list[int] = field(default_factory=list)


@dataclass
class _Spec:
    """A request's decoding settings: requests with equal specs (equal ``repr``) may share a batch."""

    until: tuple[str, ...]
    max_new: int
    options: dict


def generate_until(scorer, requests: Sequence[tuple[str, dict]]) -> list[str]:
    """Continuations, cut at the first stop string (``until`` plus the EOS string).

    As in lm-eval, generation stops on a stop string found in the raw decoded text (special
    tokens included), while the returned text is decoded without special tokens. The task's
    other ``generation_kwargs`` go to ``generate``: greedy unless ``do_sample: true``
    (``temperature: 0`` means greedy, as in lm-eval). Cached requests are not generated again;
    fresh ones are written to the cache batch by batch.
    """

    def prompt_of(context: str, max_new: int) -> list[int]:
        if max_new >= scorer.max_length:
            raise ValueError(f"max_gen_toks={max_new} leaves no room for the prompt: the model's max_length is "
                             f"{scorer.max_length}; use a max_gen_toks below it")
        return scorer.encode_prompt(context)[-(scorer.max_length - max_new) :]

    def decode(spec: _Spec, pending: list[_Pending]):
        if not batchable(scorer.model, spec.options, pending, scorer.key_padding_only):
            return ([one] for one in _one_at_a_time(scorer, pending, spec))
        if scorer.decodes_from_cache:
            return _greedy_batches(scorer, pending, spec)
        return _full_forward_batches(scorer, pending, spec)

    return serve_requests(scorer, requests, "generate_until", prompt_of, decode)


@torch.no_grad()
def serve_requests(scorer, requests: Sequence[tuple[str, dict]], kind: str, prompt_of, decode) -> list[str]:
    """What both scorers' ``generate_until`` share: lm-eval's reading of a request, the result cache and the text.

    Each request's ``until`` (plus the EOS string), ``max_gen_toks`` and :func:`generation_options`
    are read; ``prompt_of(context, max_gen_toks)`` gives its prompt ids. A request found in the cache
    (keyed by ``kind``, the prompt ids, stops, budget, options and, when sampling, the seed) is not
    generated again; the others are grouped by equal settings and ``decode(spec, pending)`` yields
    finished batches of them (``tokens`` filled), each turned into text (:func:`_finish`) and
    written to the cache at once.
    """
    tokenizer = scorer.tokenizer
    eos = tokenizer.decode(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else None
    out: list[str | None] = [None] * len(requests)
    groups: dict[str, tuple[_Spec, list[_Pending]]] = {}
    for slot, (context, gen_kwargs) in enumerate(requests):
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        if eos is not None and eos not in until:
            until.append(eos)
        max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", 256)))
        if max_new < 1:
            raise ValueError(f"max_gen_toks={max_new}: generation needs at least one new token")
        prompt = prompt_of(context, max_new)
        options = generation_options(kwargs)
        # the key holds the prompt's token ids (so the BOS setting) and, when sampling, the seed
        key = request_key(kind, prompt, until, max_new, sorted(options.items()),
                          scorer.seed if options["do_sample"] else None)
        cached = scorer.cache.get(key) if scorer.cache is not None else None
        if isinstance(cached, str):
            out[slot] = cached
            continue
        group = repr((until, max_new, sorted(options.items())))
        spec = _Spec(tuple(until), max_new, options)
        groups.setdefault(group, (spec, []))[1].append(_Pending(slot, prompt, key))
    bar = tqdm(total=sum(len(g) for _, g in groups.values()), desc="generate_until",
               disable=not scorer.progress or not groups)
    for spec, pending in groups.values():
        for batch in decode(spec, pending):
            fresh = {}
            for item in batch:
                text = _finish(tokenizer, item.tokens, spec.until)
                out[item.slot] = fresh[item.key] = text
            if scorer.cache is not None:
                scorer.cache.put_many(fresh)
            bar.update(len(batch))
    bar.close()
    return out  # type: ignore[return-value]


def _finish(tokenizer, tokens: list[int], until: Sequence[str]) -> str:
    """lm-eval's ``tok_decode`` (no special tokens), then the text before the first stop string."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


# -- the one-at-a-time path (sampling, beams, greedy-changing options) -------------------------------
def _one_at_a_time(scorer, pending: list[_Pending], spec: _Spec, max_new=None, start: int | None = None):
    """``generate`` on each request alone; ``max_new(item)`` its new-token budget (default ``spec.max_new``),
    ``start`` as in :func:`_generate`."""
    options = spec.options
    for item in pending:
        if options["do_sample"]:
            # each request draws from its own seeded stream: a run resumed from the cache samples
            # exactly what an uninterrupted run would
            torch.manual_seed(int(request_key(scorer.seed, item.key)[:15], 16))
        ids = torch.tensor([item.prompt], dtype=torch.long, device=scorer.device)
        budget = spec.max_new if max_new is None else max_new(item)
        item.tokens = _generate(scorer, ids, budget, list(spec.until), options, start=start)
        yield item


def _generate(scorer, ids: torch.Tensor, max_new: int, until: list[str], options: dict,
              start: int | None = None) -> list[int]:
    """The new tokens ``generate`` returns for one prompt, stopping at a stop string in their raw text.

    ``start``: where the new tokens begin in ``generate``'s output, the prompt's length by default
    (a decoder-only model returns prompt + new tokens); 1 for an encoder-decoder (its output starts
    with the decoder start token).
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    tokenizer = scorer.tokenizer
    start = ids.shape[1] if start is None else start

    class StopStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            text = tokenizer.decode(input_ids[0, start:])
            return torch.tensor([any(s and s in text for s in until)], device=input_ids.device)

    scorer.forward_calls += 1
    # ``use_cache`` in a task's gen_kwargs is a speed knob (lm-eval passes it on to ``generate``, whose
    # outputs it must not change): a backend that needs every key per forward overrides it with False.
    options = dict(options)
    if not scorer.decodes_from_cache:
        options["use_cache"] = False
    result = scorer.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new,
        **options,
        stopping_criteria=StoppingCriteriaList([StopStrings()]),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return result[0, start:].tolist()


# -- the batched greedy path ------------------------------------------------------------------------
def batchable(model, options: dict, pending: Sequence[_Pending] = (), key_padding_only: bool = False) -> bool:
    """True when plain greedy decoding over a ``DynamicCache`` returns what ``generate`` would.

    That needs greedy options with nothing else, a model whose ``generation_config`` adds nothing
    that changes greedy picks, a decoder-only model whose forward takes ``position_ids`` and
    ``past_key_values``, and a full-attention cache (sliding-window or recurrent layers are not
    copied row by row here). An hfx model whose attention takes only a key padding mask
    (``key_padding_only``) is exempt from the last: its backend bounds the window itself, so a
    full cache holds keys it never attends and changes nothing.
    """
    if options != {"do_sample": False} or any(not item.prompt for item in pending):
        return False
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    params = inspect.signature(model.forward).parameters
    if not {"position_ids", "past_key_values", "attention_mask"} <= set(params):
        return False
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if changes_greedy(getattr(model, "generation_config", None)):
        return False
    if key_padding_only and getattr(config, "model_type", None) == "hfx":
        return True
    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # a config the cache cannot read: leave it to generate
        return False
    return all(type(layer) is DynamicLayer for layer in layers)


def changes_greedy(generation_config) -> bool:
    """Whether a ``generation_config`` sets a field of :data:`_GREEDY_CHANGING` away from its default,
    so that greedy decoding by hand would not pick what ``generate`` picks (None: no config, no change)."""
    if generation_config is None:
        return False
    from transformers import GenerationConfig

    defaults = GenerationConfig()
    return any(getattr(generation_config, name, None) != getattr(defaults, name, None) for name in _GREEDY_CHANGING)


def shared_prefix(prompts: Sequence[Sequence[int]], minimum: int = GENERATION_MIN_SHARED_PREFIX) -> tuple[int, list[int]]:
    """``(length, indices)``: the token prefix of at least ``minimum`` tokens whose sharing saves the
    most prompt tokens, and who shares it; ``(0, [])`` when none does.

    The first group of :func:`hfx.evaluation.prefixes.prefix_groups` (as the scorer chooses its
    groups): shared means equal token ids, checked for every prompt (BPE may merge across the
    few-shot boundary; left truncation changes the start), so prompts that differ are simply left
    out, and each prompt keeps at least one token of its own (the forward of its last token gives
    the first generated one).
    """
    groups = prefix_groups(prompts, minimum, max_groups=1)
    return groups[0] if groups else (0, [])


def _greedy_batches(scorer, pending: list[_Pending], spec: _Spec):
    """Yield finished batches of ``pending`` (their ``tokens`` filled), longest prompts first."""
    model = scorer.model
    # no shared prefix under a key-padding-only attention: the padding gap after it would count as distance
    length, sharing = (0, []) if scorer.key_padding_only else shared_prefix([item.prompt for item in pending])
    prefix_kv = None
    if length:
        prefix = pending[sharing[0]].prompt[:length]
        prefix_kv = _forward_prefix(scorer, prefix)
    shared = set(sharing)
    with_prefix = [item for i, item in enumerate(pending) if i in shared]
    without = [item for i, item in enumerate(pending) if i not in shared]
    eos_ids = _eos_ids(model)
    keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
    for rows, start, kv in ((with_prefix, length, prefix_kv), (without, 0, None)):
        rows = sorted(rows, key=lambda item: (-len(item.prompt), item.prompt))
        for batch in _batches(scorer, rows, start, spec.max_new, kv):
            _decode(scorer, batch, start, kv, spec, eos_ids, keep_last)
            yield batch


def _full_forward_batches(scorer, pending: list[_Pending], spec: _Spec):
    """Yield finished batches of ``pending``, decoded by a full forward per step (no KV cache).

    For attention that needs every key in each forward (``hfx_block_sparse``, ``hfx_lsh``): each
    step runs the right-padded rows ``prompt + generated so far`` under their 2-D mask and takes the
    logits at each row's last real token only. Rows are budgeted as the cached path
    (``rows × (prompt + max_gen_toks) ≤ max_batch_tokens``) and leave the batch as they finish.
    """
    eos_ids = _eos_ids(scorer.model)
    rows = sorted(pending, key=lambda item: (-len(item.prompt), item.prompt))
    for batch in _batches(scorer, rows, 0, spec.max_new, None):
        _decode_full(scorer, batch, spec, eos_ids)
        yield batch


def _decode_full(scorer, batch: list[_Pending], spec: _Spec, eos_ids: set[int]) -> None:
    model, tokenizer, device = scorer.model, scorer.tokenizer, scorer.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stops = [s for s in spec.until if s]
    active = list(batch)
    while active:
        rows = [item.prompt + item.tokens for item in active]
        n, width = len(rows), max(len(r) for r in rows)
        ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = 1
        positions = torch.arange(width)[None].expand(n, width)
        last = torch.tensor([len(r) - 1 for r in rows])
        scorer.forward_calls += 1
        with scorer._hidden_kept_at(torch.arange(n), last):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                           use_cache=False).logits[0]
        still = []
        for item, token in zip(active, logits.argmax(-1).tolist()):
            item.tokens.append(token)
            if token in eos_ids or len(item.tokens) >= spec.max_new:
                continue
            if stops and any(s in tokenizer.decode(item.tokens) for s in stops):
                continue
            still.append(item)
        active = still


def _eos_ids(model) -> set[int]:
    """The token ids ``generate`` stops a row at (``generation_config.eos_token_id``)."""
    config = getattr(model, "generation_config", None) or model.config
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, (list, tuple)) else {int(eos)}


@dataclass
class _Prefix:
    """A shared prefix's keys/values (one ``(keys, values)`` per layer, batch of one).

    ``shared``: the model's attention goes through transformers' attention interface, so the rows
    attend to this one copy (:func:`_shared_prefix_attention`); otherwise it is copied into each row.
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    shared: bool


def _forward_prefix(scorer, prefix: list[int]) -> _Prefix:
    """Run the shared prefix once, through the shared-prefix attention when the model takes it.

    With no prefix registered that attention is plain causal attention, so the keys/values are
    right either way; it counts its calls, and only a model that called it once per layer
    (no attention code of its own bypassing the interface) gets ``shared=True``.
    """
    from transformers import DynamicCache

    model = scorer.model
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prefix], dtype=torch.long, device=scorer.device)
    scorer.forward_calls += 1
    _SHARED.calls, _SHARED.current = 0, None
    with _shared_prefix_attention_on(model) as switched:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(len(prefix), device=scorer.device)[None],
              past_key_values=cache, use_cache=True, **_keep_last(model))
    shared = switched and _SHARED.calls == len(cache.layers)
    return _Prefix([(layer.keys, layer.values) for layer in cache.layers], shared)


def _keep_last(model) -> dict:
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _batches(scorer, rows: list[_Pending], start: int, max_new: int, prefix_kv):
    """Rows per batch: ``rows × (unshared prompt + max_new) ≤ max_batch_tokens``, at most ``batch_size``.

    With a shared prefix every row also holds a copy of the prefix's keys/values; rows are then
    also limited so that the whole cache of a batch stays under half the memory free on the device.
    """
    cap = scorer.batch_size if isinstance(scorer.batch_size, int) and scorer.batch_size > 0 else None
    kv_per_token = 0
    if prefix_kv is not None and not prefix_kv.shared:
        kv_per_token = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in prefix_kv.kv) / start
    free = free_memory(scorer.device) if kv_per_token else None
    batch: list[_Pending] = []
    for row in rows:
        longest = len(batch[0].prompt) if batch else len(row.prompt)
        n = len(batch) + 1
        over = n * (longest - start + max_new) > scorer.max_batch_tokens
        if free is not None:
            over = over or n * (longest + max_new) * kv_per_token > free / 2
        if batch and ((cap is not None and len(batch) >= cap) or over):
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch


def _decode(scorer, batch: list[_Pending], start: int, prefix_kv, spec: _Spec, eos_ids: set[int], keep_last: bool):
    """Greedy-decode one batch in place (``item.tokens``); rows leave the batch as they finish."""
    from transformers import DynamicCache

    model, tokenizer = scorer.model, scorer.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tails = [item.prompt[start:] for item in batch]
    width, n = max(len(t) for t in tails), len(batch)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, start + width), dtype=torch.long)
    mask[:, :start] = 1
    positions = torch.full((n, width), start, dtype=torch.long)
    for b, tail in enumerate(tails):
        m = len(tail)
        ids[b, width - m :] = torch.tensor(tail)
        mask[b, start + width - m :] = 1
        positions[b, width - m :] = torch.arange(start, start + m)
    next_position = torch.tensor([start + len(t) for t in tails])
    cache = DynamicCache(config=model.config)
    layer_class = _preallocated_layer()
    if prefix_kv is not None and prefix_kv.shared:
        cache.layers = [layer_class(width + spec.max_new, prefix) for prefix in prefix_kv.kv]
    else:
        cache.layers = [layer_class(start + width + spec.max_new) for _ in cache.layers]
        for layer, (keys, values) in enumerate(prefix_kv.kv if prefix_kv is not None else ()):
            cache.update(keys.expand(n, *keys.shape[1:]), values.expand(n, *values.shape[1:]), layer)
    with _shared_prefix_attention_on(model, prefix_kv is not None and prefix_kv.shared):
        _decode_loop(scorer, batch, cache, ids, mask, positions, next_position, spec, eos_ids, keep_last)


def _decode_loop(scorer, batch, cache, ids, mask, positions, next_position, spec, eos_ids, keep_last):
    model, tokenizer, device = scorer.model, scorer.tokenizer, scorer.device
    n = len(batch)
    extra = {"logits_to_keep": 1} if keep_last else {}
    mask = mask.to(device)
    active = list(range(n))
    step_ids, step_positions = ids, positions
    stops = [s for s in spec.until if s]
    while True:
        scorer.forward_calls += 1
        logits = model(input_ids=step_ids.to(device), attention_mask=mask, position_ids=step_positions.to(device),
                       past_key_values=cache, use_cache=True, **extra).logits
        picked = logits[:, -1].argmax(-1).tolist()
        keep = []
        for j, token in enumerate(picked):
            item = batch[active[j]]
            item.tokens.append(token)
            if token in eos_ids or len(item.tokens) >= spec.max_new:
                continue
            if stops:
                text = tokenizer.decode(item.tokens)
                if any(s in text for s in stops):
                    continue
            keep.append(j)
        if not keep:
            return
        if len(keep) < len(active):
            index = torch.tensor(keep)
            cache.batch_select_indices(index.to(device))
            mask = mask[index.to(mask.device)]
            next_position = next_position[index]
            picked = [picked[j] for j in keep]
            active = [active[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        step_ids = torch.tensor(picked, dtype=torch.long)[:, None]
        step_positions = next_position[:, None]
        next_position = next_position + 1


@functools.lru_cache(maxsize=None)
def _preallocated_layer():
    """The cache layer class, built on first use (importing transformers' cache code only then)."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A full-attention cache layer written in place into storage sized for the whole decoding.

        ``DynamicLayer`` concatenates on every step, copying the whole cache each time; with a
        shared prefix copied into every row that copy dominated a decoding step.
        """

        def __init__(self, capacity: int, prefix: tuple[torch.Tensor, torch.Tensor] | None = None):
            super().__init__()
            self.capacity, self.length, self.prefix = capacity, 0, prefix
            self.offset = prefix[0].shape[-2] if prefix is not None else 0

        def lazy_initialization(self, key_states, value_states):
            self.dtype, self.device = key_states.dtype, key_states.device
            batch, heads, _, dim = key_states.shape
            self.key_store = key_states.new_empty((batch, heads, self.capacity, dim))
            self.value_store = value_states.new_empty((batch, value_states.shape[1], self.capacity, value_states.shape[-1]))
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.capacity:
                raise RuntimeError(f"generation cache overflow: {end} positions > {self.capacity} reserved")
            self.key_store[:, :, self.length : end] = key_states
            self.value_store[:, :, self.length : end] = value_states
            self.length = end
            self.keys, self.values = self.key_store[:, :, :end], self.value_store[:, :, :end]
            # with a shared prefix only the rows' own keys are returned; the attention that follows
            # (_shared_prefix_attention) takes the prefix from here
            _SHARED.current = self.prefix
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.offset + self.length

        def batch_select_indices(self, indices):
            if self.is_initialized:
                self.key_store, self.value_store = self.key_store[indices], self.value_store[indices]
                self.keys, self.values = self.key_store[:, :, : self.length], self.value_store[:, :, : self.length]

    return PreallocatedLayer


class _SharedState:
    """The prefix the cache layer just handed out, for the attention call that follows it."""

    current: tuple[torch.Tensor, torch.Tensor] | None = None
    calls: int = 0


_SHARED = _SharedState()
_ATTENTION_NAME = "hfx_shared_prefix"


@contextlib.contextmanager
def _shared_prefix_attention_on(model, on: bool = True):
    """Route the model's attention through :func:`_shared_prefix_attention` (yields whether it did).

    Only for a model whose attention is plain SDPA or eager (what the function reproduces);
    masks are built as for SDPA. The model's own implementation is restored afterwards.
    """
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    if not on or previous not in ("sdpa", "eager"):
        yield False
        return
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(_ATTENTION_NAME, _shared_prefix_attention)
    AttentionMaskInterface.register(_ATTENTION_NAME, sdpa_mask)
    config._attn_implementation = _ATTENTION_NAME
    try:
        yield True
    finally:
        config._attn_implementation = previous
        _SHARED.current = None


def _shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over ``[shared prefix] + [each row's own keys]`` with the prefix held once.

    Every row's queries meet the one prefix copy in a single matrix product (instead of reading
    a copy per row), then one softmax over prefix and own scores, exactly as attention over the
    concatenated keys; grouped-query heads share their key head as ``repeat_kv`` does.
    """
    for name in ("softcap", "s_aux", "sliding_window"):
        if kwargs.get(name) is not None:
            raise RuntimeError(f"hfx's shared-prefix attention does not implement {name}")
    _SHARED.calls += 1
    prefix, _SHARED.current = _SHARED.current, None
    rows, heads, q, dim = query.shape
    kv_heads, own = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scaling = dim**-0.5 if scaling is None else scaling
    grouped = query.reshape(rows, kv_heads, group * q, dim)
    scores = [torch.matmul(grouped, key.transpose(-1, -2))]
    shared = 0
    if prefix is not None:
        prefix_keys, prefix_values = prefix[0][0], prefix[1][0]
        shared = prefix_keys.shape[-2]
        flat = grouped.transpose(0, 1).reshape(kv_heads, rows * group * q, dim)
        scores.insert(0, torch.matmul(flat, prefix_keys.transpose(-1, -2)).reshape(kv_heads, rows, group * q, shared)
                      .transpose(0, 1))
    scores = torch.cat(scores, dim=-1).float() * scaling
    total = shared + own
    if attention_mask is None:  # SDPA's "plain causal" case: query i is the i-th of the last q keys
        allowed = (torch.arange(total, device=query.device)[None, :]
                   <= torch.arange(total - q, total, device=query.device)[:, None])[None, None]
    else:
        allowed = attention_mask[..., -total:]
    if allowed.dtype == torch.bool:
        allowed = allowed.expand(rows, 1, q, total)[:, :, None].expand(rows, 1, group, q, total)
        scores = scores.masked_fill(~allowed.reshape(rows, 1, group * q, total), float("-inf"))
    else:  # an additive float mask
        scores = scores + allowed.expand(rows, 1, q, total)[:, :, None].expand(rows, 1, group, q, total).reshape(
            rows, 1, group * q, total).float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs[..., shared:], value)
    if shared:
        flat = probs[..., :shared].transpose(0, 1).reshape(kv_heads, rows * group * q, shared)
        out = out + torch.matmul(flat, prefix_values).reshape(kv_heads, rows, group * q, dim).transpose(0, 1)
    return out.reshape(rows, heads, q, dim).transpose(1, 2).contiguous(), None


SAMPLING_OPTIONS = ("temperature", "top_p", "top_k", "min_p", "typical_p")


def generation_options(gen_kwargs: dict) -> dict:
    """``generate`` keyword arguments from a task's generation_kwargs (``until``/``max_gen_toks`` removed).

    lm-eval reads ``temperature: 0`` as greedy; sampling knobs are dropped when not sampling, so
    transformers does not warn that they are ignored.
    """
    options = dict(gen_kwargs)
    if options.get("temperature") == 0.0:
        options.pop("temperature")
        options["do_sample"] = False
    options["do_sample"] = bool(options.get("do_sample", False))
    if not options["do_sample"]:
        for name in SAMPLING_OPTIONS:
            options.pop(name, None)
    return options
