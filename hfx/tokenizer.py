"""Train a small fast tokenizer from text, offline, with the `tokenizers` library.

hfx ships no vocabulary and reaches no hub, so quickstart and the tests build their tokenizer
here and save it with ``save_pretrained``; from then on it loads with ``AutoTokenizer``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
    "eos_token": "</s>",
    "bos_token": "<s>",
}


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1000,
    save_dir: str | Path | None = None,
    lowercase: bool = True,
) -> PreTrainedTokenizerFast:
    """A byte-level-free BPE tokenizer with BERT-style specials.

    Single sequences encode as ``[CLS] A [SEP]`` and pairs as ``[CLS] A [SEP] B [SEP]`` with
    token_type_ids 0/1, so the same tokenizer serves MLM/NSP and (with ``add_special_tokens=False``)
    causal LM training, where documents are separated by ``</s>``.
    """
    specials = list(SPECIAL_TOKENS.values())
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"], continuing_subword_prefix="##"))
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, continuing_subword_prefix="##", show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=512,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        **SPECIAL_TOKENS,
    )
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast
