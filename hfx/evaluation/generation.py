"""Generation for ``generate_until`` requests, as lm-eval 0.4.13's ``HFLM.generate_until`` decides what to return.

The scorer (:class:`~hfx.evaluation.scorer.CausalLMScorer`) owns tokenisation, the model and the
result cache; this module decides how prompts are turned into continuations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .cache import request_key


@torch.no_grad()
def generate_until(scorer, requests: Sequence[tuple[str, dict]]) -> list[str]:
    """Continuations, cut at the first stop string (``until`` plus the EOS string).

    As in lm-eval, generation stops on a stop string found in the raw decoded text (special
    tokens included), while the returned text is decoded without special tokens. The task's
    other ``generation_kwargs`` go to ``generate``: greedy unless ``do_sample: true``
    (``temperature: 0`` means greedy, as in lm-eval).
    """
    out: list[str] = []
    eos = scorer.tokenizer.decode(scorer.tokenizer.eos_token_id) if scorer.tokenizer.eos_token_id is not None else None
    for context, gen_kwargs in tqdm(requests, desc="generate_until", disable=not scorer.progress):
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        if eos is not None and eos not in until:
            until.append(eos)
        max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", 256)))
        prompt = scorer.encode_prompt(context)[-(scorer.max_length - max_new) :]
        options = generation_options(kwargs)
        # the key holds the prompt's token ids (so the BOS setting) and, when sampling, the seed
        key = request_key("generate_until", prompt, until, max_new, sorted(options.items()),
                          scorer.seed if options["do_sample"] else None)
        cached = scorer.cache.get(key) if scorer.cache is not None else None
        if isinstance(cached, str):
            out.append(cached)
            continue
        if options["do_sample"]:
            # each request draws from its own seeded stream: a run resumed from the cache samples
            # exactly what an uninterrupted run would
            torch.manual_seed(int(request_key(scorer.seed, key)[:15], 16))
        ids = torch.tensor([prompt], dtype=torch.long, device=scorer.device)
        generated = _generate(scorer, ids, max_new, until, options)
        text = scorer.tokenizer.decode(generated, skip_special_tokens=True)  # as lm-eval's tok_decode
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        if scorer.cache is not None:
            scorer.cache.put_many({key: text})
        out.append(text)
    return out


def _generate(scorer, ids: torch.Tensor, max_new: int, until: list[str], options: dict) -> list[int]:
    from transformers import StoppingCriteria, StoppingCriteriaList

    tokenizer, start = scorer.tokenizer, ids.shape[1]

    class StopStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            text = tokenizer.decode(input_ids[0, start:])
            return torch.tensor([any(s and s in text for s in until)], device=input_ids.device)

    scorer.forward_calls += 1
    result = scorer.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new,
        **options,
        stopping_criteria=StoppingCriteriaList([StopStrings()]),
        pad_token_id=scorer.tokenizer.pad_token_id if scorer.tokenizer.pad_token_id is not None else scorer.tokenizer.eos_token_id,
    )
    return result[0, start:].tolist()


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
