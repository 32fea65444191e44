"""Encoder-decoder scoring: what lm-eval 0.4.13's ``hf`` model computes with ``backend="seq2seq"``.

The request types mean, token for token, what lm-eval's seq2seq path makes of them:

- **loglikelihood**: the context (trailing spaces moved to the continuation) is encoded as
  ``tok_encode`` does (the tokenizer's special tokens, or ``add_bos_token``'s setting) and goes to
  the encoder, its last ``max_length`` tokens; the continuation is encoded on its own, without
  special tokens, and is the decoder's labels (the model shifts them right behind its decoder start
  token). An empty context is the prefix (BOS, else EOS) token. ``is_greedy``: every continuation
  token is the decoder's argmax.
- **loglikelihood_rolling**: lm-eval's disjoint windows of ``max_length`` tokens; each window's
  context goes to the encoder (the prefix token alone for the first), its tokens are the labels.
- **generate_until**: the prompt is the tokenizer's default encoding (lm-eval's seq2seq
  ``tok_batch_encode`` ignores ``add_bos_token``), its last ``max_length`` tokens; greedy decoding
  from the decoder start token stops at EOS, at a stop string in the raw decoded text, or after
  ``len(prompt) + max_gen_toks - 1`` tokens, which is what lm-eval's ``generate(max_length=
  prompt + max_gen_toks)`` allows one request alone (the decoder start token counts in it). The
  text is decoded without special tokens and cut at the first stop string.

How the work is laid out differs, not what is computed:

- **One encoder pass per context.** Continuations of one context share its encoder output (a
  multiple-choice document runs its encoder once, not once per choice).
- **Right padding only.** Encoder inputs are right-padded under their attention mask, and decoder
  rows are right-padded labels, so every row sees the positions it has alone (lm-eval left-pads
  prompts for generation, which moves a learned-position model's positions with the batch; these
  results equal lm-eval's at ``batch_size=1``).
- **Token-budget batches sorted by length**, ``rows × (context + continuation) ≤ max_batch_tokens``
  and at most ``batch_size`` rows; a finished generation leaves its batch at once.

Greedy requests on a model whose ``generation_config`` changes greedy picks (BART's
``forced_eos_token_id``, repetition penalties, ...), and sampled ones, go through ``generate`` one
request at a time, with the same budget and stop strings.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .cache import request_key
from .generation import _eos_ids, _one_at_a_time, _Pending, _Spec, changes_greedy, serve_requests
from .scorer import LMScorer

#: ``backend=`` values of ``--model-args``: lm-eval's (``default`` is its name for ``auto``)
BACKENDS = ("auto", "default", "causal", "seq2seq")


def resolve_backend(backend: str | None, config) -> str:
    """``causal`` or ``seq2seq``: the given one, or for ``auto``/``default`` the config's ``is_encoder_decoder``.

    lm-eval's ``default`` reads transformers' static model-type lists, which do not hold model types
    registered at run time (hfx's encoder-decoder is ``model_type="hfx"``, like its decoders); the
    config's own flag tells both apart.
    """
    if backend in (None, "auto", "default"):
        return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
    return backend


def is_seq2seq_lm(model) -> bool:
    """An encoder-decoder with an encoder to run on its own and an output embedding (``*ForConditionalGeneration``)."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "is_encoder_decoder", False):
        return False
    return callable(getattr(model, "get_encoder", None)) and model.get_output_embeddings() is not None


class Seq2SeqScorer(LMScorer):
    """Scores loglikelihood, loglikelihood_rolling and generate_until requests on an encoder-decoder."""

    backend = "seq2seq"
    #: generation always decodes from the decoder's KV cache (``generate`` is not told ``use_cache=False``)
    decodes_from_cache = True

    def __init__(self, model, tokenizer, **settings):
        super().__init__(model, tokenizer, **settings)
        #: rows per forward: the token budget alone for ``batch_size="auto"`` (nothing is probed: every
        #: row's numbers are independent of the batch, so the budget only trades memory for speed)
        self.batch_info = {"mode": "fixed" if self.batch_size != "auto" else "auto-budget",
                           "max_batch_tokens": self.max_batch_tokens,
                           "rows": self.batch_size if isinstance(self.batch_size, int) else None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._shift = getattr(model, "prepare_decoder_input_ids_from_labels", None)

    def _check_model(self, model) -> None:
        if not is_seq2seq_lm(model):
            raise ValueError(f"{type(model).__name__} is not an encoder-decoder LM (config.is_encoder_decoder, "
                             "get_encoder() and an output embedding); backend='seq2seq' needs one.")

    # -- tokenisation (lm-eval's seq2seq) -----------------------------------------------------------
    def encode_pairs(self, requests: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """Context ids (``tok_encode``) and continuation ids (encoded alone, no special tokens) per request."""
        out = []
        for context, continuation in requests:
            context, continuation, ids = self._split_pair(context, continuation)
            out.append(ids if ids is not None else
                       (self.encode(context), self.tokenizer.encode(continuation, add_special_tokens=False)))
        return out

    # -- request types ----------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[str, str]], name: str | None = None) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), continuation is the greedy decoding)`` per request."""
        return self.score_token_pairs(self.encode_pairs(requests), desc="loglikelihood")

    def score_token_pairs(self, pairs: Sequence[tuple[list[int], list[int]]], desc: str = "scoring"):
        """Score ``(encoder ids, label ids)`` pairs; pairs with equal encoder ids share one encoder pass."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        keys = [request_key("seq2seq-ll", ctx, cont) for ctx, cont in pairs]
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for slot, ((ctx, cont), key) in enumerate(zip(pairs, keys)):
            results[slot] = self._cached_pair(key, cont)
            if results[slot] is not None:
                continue
            # lm-eval keeps the last max_length tokens of each side
            groups.setdefault(tuple(ctx[-self.max_length :]), []).append((slot, list(cont[-self.max_length :])))
        ordered = sorted(groups.items(), key=lambda g: (-(len(g[0]) + max(len(c) for _, c in g[1])), g[0]))
        bar = tqdm(total=sum(len(rows) for _, rows in ordered), desc=desc, disable=not self.progress or not ordered)
        for batch in self._batches(ordered):
            fresh = {}
            for slot, result in self._forward(batch):
                results[slot] = result
                fresh[keys[slot]] = list(result)
            if self.cache is not None:
                self.cache.put_many(fresh)
            bar.update(sum(len(rows) for _, rows in batch))
        bar.close()
        return results

    def _batches(self, ordered):
        """``[(context, [(slot, labels)])]`` batches: ``rows × (widest context + widest labels) ≤ max_batch_tokens``."""
        cap = self.batch_size if isinstance(self.batch_size, int) else None
        batch, rows, width = [], 0, 0
        for context, members in ordered:
            for member in members:
                cost = len(context) + len(member[1])
                over = (rows + 1) * max(width, cost) > self.max_batch_tokens or (cap is not None and rows >= cap)
                if batch and over:
                    yield batch
                    batch, rows, width = [], 0, 0
                if batch and batch[-1][0] == context:
                    batch[-1][1].append(member)
                else:
                    batch.append((context, [member]))
                rows, width = rows + 1, max(width, cost)
        if batch:
            yield batch

    @torch.no_grad()
    def _encode(self, contexts: Sequence[Sequence[int]]):
        """The encoder's last hidden states for right-padded ``contexts`` and their attention mask."""
        width = max(len(c) for c in contexts)
        ids = torch.full((len(contexts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(contexts), width), dtype=torch.long)
        for i, ctx in enumerate(contexts):
            ids[i, : len(ctx)] = torch.tensor(ctx)
            mask[i, : len(ctx)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        self.forward_calls += 1
        hidden = self.model.get_encoder()(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state
        return hidden, mask

    def _decoder_inputs(self, labels: torch.Tensor) -> dict:
        """The decoder's inputs for ``labels`` as the model builds them from labels (shifted right)."""
        if callable(self._shift):
            return {"decoder_input_ids": self._shift(labels=labels)}
        return {"labels": labels}

    @torch.no_grad()
    def _forward(self, batch) -> list[tuple[int, tuple[float, bool]]]:
        from transformers.modeling_outputs import BaseModelOutput

        hidden, mask = self._encode([ctx for ctx, _ in batch])
        owner = [i for i, (_, members) in enumerate(batch) for _ in members]
        rows = [member for _, members in batch for member in members]
        width = max(len(labels) for _, labels in rows)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, (_, ids) in enumerate(rows):
            labels[r, : len(ids)] = torch.tensor(ids)
        index = torch.tensor(owner, device=self.device)
        labels = labels.to(self.device)
        self.forward_calls += 1
        logits = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden[index]),
                            attention_mask=mask[index], use_cache=False, **self._decoder_inputs(labels)).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        out = []
        for r, (slot, ids) in enumerate(rows):
            n = len(ids)
            target = labels[r, :n]
            picked = logprobs[r, :n].gather(-1, target[:, None]).squeeze(-1)
            greedy = bool((logprobs[r, :n].argmax(-1) == target).all())
            out.append((slot, (float(picked.sum()), greedy)))
        return out

    # -- generation ---------------------------------------------------------------------------------
    def encode_prompt(self, text: str) -> list[int]:
        """lm-eval's seq2seq ``tok_batch_encode``: the tokenizer's default special tokens, last ``max_length`` kept."""
        return self.tokenizer(text)["input_ids"][-self.max_length :]

    def decoder_start_token_id(self) -> int | None:
        for source in (getattr(self.model, "generation_config", None), self.model.config):
            value = getattr(source, "decoder_start_token_id", None) if source is not None else None
            if value is not None:
                return int(value)
        return None

    def greedy_batchable(self, options: dict) -> bool:
        """Plain greedy decoding here returns what ``generate`` would: greedy options only, a start token,
        and no ``generation_config`` setting that changes greedy picks."""
        if options != {"do_sample": False} or self.decoder_start_token_id() is None:
            return False
        if changes_greedy(getattr(self.model, "generation_config", None)):
            return False
        return "past_key_values" in inspect.signature(self.model.forward).parameters

    def generate_until(self, requests: Sequence[tuple[str, dict]]) -> list[str]:
        """Continuations cut at the first stop string (``until`` plus the EOS string)."""

        def decode(spec: _Spec, pending: list[_Pending]):
            if self.greedy_batchable(spec.options):
                return self._greedy_batches(pending, spec)
            # ``generate`` returns the decoder start token first: the new tokens start at 1
            return ([one] for one in _one_at_a_time(self, pending, spec, max_new=lambda item: self._budget(item, spec),
                                                    start=1))

        return serve_requests(self, requests, "seq2seq-generate_until", lambda context, _: self.encode_prompt(context),
                              decode)

    @staticmethod
    def _budget(item: _Pending, spec: _Spec) -> int:
        """New tokens one request may take: lm-eval's ``generate(max_length=len(prompt) + max_gen_toks)``,
        the decoder start token counted in it."""
        return len(item.prompt) + spec.max_new - 1

    def _stopped(self, tokens: list[int], until: Sequence[str]) -> bool:
        text = self.tokenizer.decode(tokens)
        return any(stop and stop in text for stop in until)

    def _greedy_batches(self, pending: list[_Pending], spec: _Spec):
        """Yield finished batches of ``pending`` (``tokens`` filled), longest prompts first, each row leaving at its end."""
        cap = self.batch_size if isinstance(self.batch_size, int) else None
        rows = sorted(pending, key=lambda item: (-len(item.prompt), item.prompt))
        batch: list[_Pending] = []
        for item in rows:
            n = len(batch) + 1
            longest = max(len(b.prompt) + self._budget(b, spec) for b in batch + [item])
            if batch and ((cap is not None and len(batch) >= cap) or n * longest > self.max_batch_tokens):
                yield self._decode(batch, spec)
                batch = []
            batch.append(item)
        if batch:
            yield self._decode(batch, spec)

    @torch.no_grad()
    def _decode(self, batch: list[_Pending], spec: _Spec) -> list[_Pending]:
        from transformers import DynamicCache, EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutput

        hidden, mask = self._encode([item.prompt for item in batch])
        eos_ids = _eos_ids(self.model)
        budgets = [self._budget(item, spec) for item in batch]
        active = list(range(len(batch)))
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        step = torch.full((len(batch), 1), self.decoder_start_token_id(), dtype=torch.long, device=self.device)
        while active:
            self.forward_calls += 1
            logits = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=mask,
                                decoder_input_ids=step, past_key_values=cache, use_cache=True).logits
            picked = logits[:, -1].argmax(-1).tolist()
            keep = []
            for j, token in enumerate(picked):
                row = active[j]
                tokens = batch[row].tokens
                tokens.append(token)
                if token in eos_ids or len(tokens) >= budgets[row] or self._stopped(tokens, spec.until):
                    continue
                keep.append(j)
            if len(keep) < len(active):
                if not keep:
                    break
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                hidden, mask = hidden[index], mask[index]
                active = [active[j] for j in keep]
                picked = [picked[j] for j in keep]
            step = torch.tensor(picked, dtype=torch.long, device=self.device)[:, None]
        return batch
