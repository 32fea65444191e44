"""Masked-LM masking by the articles' rule, and the collator that feeds ``HfxForPreTraining``.

Rule: 15% of the non-special, non-pad tokens are selected; of those 80% become the mask token,
10% a random token and 10% stay unchanged; labels are the original ids there and -100 elsewhere.

Why not ``transformers.DataCollatorForLanguageModeling`` (5.23)? Its selection is right, but its
random replacement draws from the whole vocabulary, special and pad tokens included, and its
whole-word masking turns the 80/10/10 rule off. Padding still goes through ``tokenizer.pad``.
Random tokens here are drawn only from ordinary vocabulary ids.

Whole-word masking follows BERT's release: a token starting with the continuing-subword prefix
(``##``) belongs to the word before it; a word is selected as a whole with the same 15%
probability, and each of its tokens then gets its own 80/10/10 draw.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


def require_mask_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The mask token id, or a ValueError naming the tokenizer and its special tokens."""
    if tokenizer.mask_token is None or tokenizer.mask_token_id is None:
        raise ValueError(
            f"masked-LM training needs a tokenizer with a mask token; {type(tokenizer).__name__} "
            f"({getattr(tokenizer, 'name_or_path', '') or 'unnamed'}) has none. Its special tokens are "
            f"{tokenizer.all_special_tokens}. Train one with hfx.tokenizer.train_tokenizer (adds [MASK]), or call "
            "tokenizer.add_special_tokens({'mask_token': '[MASK]'}) and resize the model's embeddings."
        )
    return tokenizer.mask_token_id


def mask_tokens(
    input_ids: torch.Tensor,
    special_tokens_mask: torch.Tensor,
    mask_token_id: int,
    random_token_ids: torch.Tensor,
    mlm_probability: float = 0.15,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
    word_starts: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(masked_input_ids, labels)``; ``input_ids`` is not modified.

    ``special_tokens_mask`` is True (or 1) on special and pad tokens, which are never selected.
    ``random_token_ids`` is the 1-D pool random replacements are drawn from. ``word_starts``
    (bool, same shape) switches on whole-word masking: True on the first token of each word.
    """
    special = special_tokens_mask.bool()
    draws = torch.rand(input_ids.shape, generator=generator)
    selected = (draws < mlm_probability) & ~special
    if word_starts is not None:
        starts = word_starts.bool() & ~special
        positions = torch.arange(input_ids.shape[-1]).expand_as(input_ids)
        # Index of the word start each token belongs to (a running max over start positions).
        start_index = torch.cummax(torch.where(starts, positions, torch.zeros_like(positions)), dim=-1).values
        selected = (selected & starts).gather(-1, start_index) & ~special
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    split = torch.rand(input_ids.shape, generator=generator)
    to_mask = selected & (split < mask_replace_prob)
    to_random = selected & (split >= mask_replace_prob) & (split < mask_replace_prob + random_replace_prob)
    random_ids = random_token_ids[torch.randint(len(random_token_ids), input_ids.shape, generator=generator)]
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, random_ids.to(input_ids.dtype), masked)
    return masked, labels


def ordinary_token_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Every vocabulary id that is not a special token (the pool for random replacements)."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)


@dataclass
class DataCollatorForPreTraining:
    """Pads a list of tokenized examples and masks them for MLM; keeps ``next_sentence_label``.

    Works for ``HfxForPreTraining`` (examples from :func:`hfx.data.build_nsp_pairs`) and for
    ``HfxForMaskedLM`` (examples without ``next_sentence_label``). Examples may carry
    ``special_tokens_mask``; otherwise special tokens are recognised by id.

    With a ``seed``, each batch is masked by a generator seeded from ``(seed, the batch's token
    ids)``: masks do not depend on how many batches came before, so a run resumed from a
    checkpoint masks exactly as the uninterrupted run did (Trainer's data loader collates one
    batch ahead, so a shared RNG saved in the checkpoint would already have moved on), and
    torch's global RNG (dropout) is left alone. Reshuffling puts examples in new batches every
    epoch, so masks still change from epoch to epoch. With ``seed=None`` the global RNG is used.
    """

    tokenizer: PreTrainedTokenizerBase
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    whole_word_mask: bool = False
    pad_to_multiple_of: int | None = None
    seed: int | None = None

    def __post_init__(self):
        self.mask_token_id = require_mask_token(self.tokenizer)
        for name in ("mlm_probability", "mask_replace_prob", "random_replace_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.mask_replace_prob + self.random_replace_prob > 1.0:
            raise ValueError(
                f"mask_replace_prob + random_replace_prob must not exceed 1, got "
                f"{self.mask_replace_prob} + {self.random_replace_prob}."
            )
        self.random_token_ids = ordinary_token_ids(self.tokenizer)
        self.special_ids = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=torch.long)
        self.continuation = None
        if self.whole_word_mask:
            prefix = _continuing_subword_prefix(self.tokenizer)
            tokens = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
            self.continuation = torch.tensor([t is not None and t.startswith(prefix) for t in tokens])

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        nsp = [example["next_sentence_label"] for example in examples if "next_sentence_label" in example]
        if nsp and len(nsp) != len(examples):
            raise ValueError("either every example or none must carry next_sentence_label.")
        keep = ("input_ids", "token_type_ids", "attention_mask")
        features = [{k: v for k, v in example.items() if k in keep} for example in examples]
        batch = self.tokenizer.pad(features, return_tensors="pt", pad_to_multiple_of=self.pad_to_multiple_of)
        input_ids = batch["input_ids"]
        special = torch.isin(input_ids, self.special_ids)
        if "attention_mask" in batch:
            special |= batch["attention_mask"] == 0
        word_starts = None if self.continuation is None else ~self.continuation[input_ids]
        batch["input_ids"], batch["labels"] = mask_tokens(
            input_ids,
            special,
            self.mask_token_id,
            self.random_token_ids,
            self.mlm_probability,
            self.mask_replace_prob,
            self.random_replace_prob,
            word_starts=word_starts,
            generator=self._generator_for(input_ids),
        )
        if nsp:
            batch["next_sentence_label"] = torch.tensor(nsp, dtype=torch.long)
        return dict(batch)


    def _generator_for(self, input_ids: torch.Tensor) -> torch.Generator | None:
        if self.seed is None:
            return None
        digest = hashlib.blake2b(input_ids.numpy().tobytes(), digest_size=8, key=str(self.seed).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _continuing_subword_prefix(tokenizer: PreTrainedTokenizerBase) -> str:
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    prefix = getattr(model, "continuing_subword_prefix", None)
    if not prefix:
        raise ValueError(
            "whole-word masking needs a tokenizer that marks word-internal pieces with a continuing-subword "
            f"prefix (e.g. '##' in WordPiece or hfx.tokenizer.train_tokenizer); {type(tokenizer).__name__} has none."
        )
    return prefix


__all__ = ["DataCollatorForPreTraining", "IGNORE_INDEX", "mask_tokens", "ordinary_token_ids", "require_mask_token"]
