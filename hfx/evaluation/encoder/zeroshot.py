"""Zero-shot scores for encoders, three ways. Each returns a (texts, labels) tensor, higher is better.

- ``description_scores``: inputs and label descriptions are embedded in the same space
  (:func:`embed_texts`); the score is cosine similarity or minus euclidean distance. Each input
  and each description is encoded once.
- ``cloze_scores``: a masked LM fills a template such as ``"{text} All in all, it was {mask}."``.
  A label's verbalizer of L word pieces is scored by putting L mask tokens at the slot and
  averaging, over the L slots, the log-probability of the piece that belongs there, all slots
  masked at once (one forward pass). Averaging rather than summing keeps a two-piece word from
  losing to a one-piece word only because it is longer. Each input is encoded once per distinct
  verbalizer length (once when every verbalizer is a single piece).
- ``nli_scores``: a sequence-classification model trained on NLI scores the pair
  (text, ``hypothesis_template.format(label)``) by its entailment logit, as transformers'
  ``zero-shot-classification`` pipeline does; a cross-encoder sees each pair, so an input is
  encoded once per label.

Argument checks (``check_*``) need the tokenizer at most, never the model, so bad input fails
before any encoding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .embedding import embed_texts
from .prototypes import similarity

METHODS = ("description", "cloze", "nli")
DEFAULT_HYPOTHESIS = "This example is {}."


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"zero-shot method={method!r} is invalid; valid values: {list(METHODS)}.")


@torch.inference_mode()
def description_scores(model, tokenizer, texts: Sequence[str], descriptions: Sequence[str], pooling: str = "mean",
                       distance: str = "cosine", batch_size: int = 32) -> torch.Tensor:
    inputs = embed_texts(model, tokenizer, texts, pooling, batch_size)
    labels = embed_texts(model, tokenizer, descriptions, pooling, batch_size)
    return similarity(inputs, labels, distance)


def check_template(template: str) -> None:
    for slot in ("{text}", "{mask}"):
        if template.count(slot) != 1:
            raise ValueError(f"the cloze template must contain {slot} exactly once, got {template!r}.")


def verbalizer_ids(tokenizer, template: str, verbalizers: Mapping[str, str | Sequence[str]]) -> dict[str, list[int]]:
    """Label -> word-piece ids at the mask slot.

    A string is tokenized as it would follow the template's text before the slot: whitespace
    right before ``{mask}`` is moved onto the word (the lm-eval convention), which matters for
    byte-level BPE vocabularies (RoBERTa's ``Ġgreat``). A list is taken as explicit vocabulary pieces.
    """
    check_template(template)
    if getattr(tokenizer, "mask_token_id", None) is None:
        raise ValueError(f"the tokenizer {type(tokenizer).__name__} has no mask token; cloze scoring needs one.")
    before = template.split("{mask}")[0]
    space = before[len(before.rstrip()):]
    pieces = {}
    for label, word in verbalizers.items():
        if isinstance(word, str):
            ids = tokenizer(space + word, add_special_tokens=False)["input_ids"] if word.strip() else []
        else:
            ids = list(tokenizer.convert_tokens_to_ids(list(word)))
            unknown = [w for w, i in zip(word, ids) if i is None or i == tokenizer.unk_token_id]
            if unknown:
                raise ValueError(f"verbalizer pieces {unknown} of label {label!r} are not in the vocabulary.")
        if not ids:
            raise ValueError(f"the verbalizer of label {label!r} is empty ({word!r}); give a word or a list of pieces.")
        pieces[label] = ids
    return pieces


def _cloze_batch(tokenizer, texts, template, n_masks, max_length):
    filled = template.replace("{mask}", tokenizer.mask_token * n_masks)
    prompts = []
    for text in texts:
        prompt = filled.replace("{text}", text)
        excess = len(tokenizer(prompt)["input_ids"]) - max_length
        if excess > 0:  # cut the text, never the template or the slot
            offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            keep = max(len(offsets) - excess, 0)
            prompt = filled.replace("{text}", text[: offsets[keep - 1][1]] if keep else "")
        prompts.append(prompt)
    return tokenizer(prompts, padding=True, return_tensors="pt")


@torch.inference_mode()
def cloze_scores(model, tokenizer, texts: Sequence[str], template: str, verbalizers: Mapping[str, str | Sequence[str]],
                 batch_size: int = 32) -> torch.Tensor:
    """(texts, labels) mean log-probability of each label's verbalizer pieces at the slot (module docstring)."""
    pieces = verbalizer_ids(tokenizer, template, verbalizers)
    labels = list(pieces)
    model.eval()
    device = next(model.parameters()).device
    max_length = min(tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", 512))
    scores = torch.empty(len(texts), len(labels))
    for n_masks in sorted({len(p) for p in pieces.values()}):
        columns = [j for j, label in enumerate(labels) if len(pieces[label]) == n_masks]
        targets = torch.tensor([pieces[labels[j]] for j in columns])  # (labels of this length, n_masks)
        for start in range(0, len(texts), batch_size):
            batch = _cloze_batch(tokenizer, texts[start : start + batch_size], template, n_masks, max_length).to(device)
            is_mask = batch["input_ids"] == tokenizer.mask_token_id
            per_row = is_mask.sum(-1)
            if (per_row != n_masks).any():
                row = start + int((per_row != n_masks).nonzero()[0])
                raise ValueError(f"text {row} contains the mask token {tokenizer.mask_token!r} itself: {texts[row]!r}")
            logits = model(**batch).logits[is_mask].view(len(per_row), n_masks, -1)
            logprobs = logits.float().log_softmax(-1).cpu()  # (B, n_masks, vocab)
            slot = torch.arange(n_masks)
            picked = logprobs[:, slot.unsqueeze(0), targets]  # (B, labels of this length, n_masks)
            scores[start : start + len(per_row), columns] = picked.mean(-1)
    return scores


def entailment_id(model) -> int:
    """The class index whose label starts with "entail" (case-insensitive), as transformers' pipeline looks it up."""
    for label, index in model.config.label2id.items():
        if label.lower().startswith("entail"):
            return int(index)
    raise ValueError(
        f"NLI zero-shot needs an 'entailment' class in model.config.label2id; this model has {model.config.label2id}."
    )


def check_hypothesis_template(hypothesis_template: str) -> None:
    if hypothesis_template.format("\0") == hypothesis_template:
        raise ValueError(f"hypothesis_template {hypothesis_template!r} has no {{}} slot for the label.")


@torch.inference_mode()
def nli_scores(model, tokenizer, texts: Sequence[str], labels: Sequence[str], hypothesis_template: str = DEFAULT_HYPOTHESIS,
               batch_size: int = 32) -> torch.Tensor:
    """(texts, labels) entailment logits of (text, hypothesis) pairs; softmax over labels gives the pipeline's scores."""
    check_hypothesis_template(hypothesis_template)
    entail = entailment_id(model)
    model.eval()
    device = next(model.parameters()).device
    hypotheses = [hypothesis_template.format(label) for label in labels]
    pairs = [(text, hypothesis) for text in texts for hypothesis in hypotheses]
    logits = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = tokenizer([p for p, _ in chunk], [h for _, h in chunk], padding=True, truncation="only_first",
                          return_tensors="pt").to(device)
        logits.append(model(**batch).logits[:, entail].float().cpu())
    return torch.cat(logits).view(len(texts), len(labels))

