"""Train a small fast tokenizer from text, offline and reproducibly.

hfx ships no vocabulary and reaches no hub, so quickstart and the tests build their tokenizer
here and save it with ``save_pretrained``; from then on it loads with ``AutoTokenizer``.

The merges are learned here rather than by ``tokenizers.trainers.BpeTrainer``: with a
continuing-subword prefix that trainer assigns ids to the ``##x`` symbols in hash-map order,
and equal-count merges are then broken by those ids, so two runs on the same text give
different vocabularies (measured: five runs, five vocabularies). A model pre-trained in one run
and a tokenizer trained in another would silently disagree, and a test could pass or fail by
chance. Here ties go to the lexicographically smallest pair, so the same text always gives the
same tokenizer. Normalisation, pre-tokenisation and encoding are still ``tokenizers``' own.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
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
CONTINUING_PREFIX = "##"
# A causal (GPT-style) tokenizer has no [CLS]/[SEP]/[MASK]: nothing to wrap inputs in.
CAUSAL_SPECIAL_TOKENS = {key: SPECIAL_TOKENS[key] for key in ("pad_token", "unk_token", "eos_token", "bos_token")}
STYLES = ("bert", "causal")


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1000,
    save_dir: str | Path | None = None,
    lowercase: bool = True,
    style: str = "bert",
) -> PreTrainedTokenizerFast:
    """A WordPiece-style BPE tokenizer (``##`` marks word-internal pieces) for ``style``.

    - ``"bert"`` (MLM / NSP): specials ``[PAD] [UNK] [CLS] [SEP] [MASK] </s> <s>``; single sequences
      encode as ``[CLS] A [SEP]`` and pairs as ``[CLS] A [SEP] B [SEP]`` with token_type_ids 0/1.
    - ``"causal"`` (GPT-style next-token prediction): specials ``[PAD] [UNK] </s> <s>``; nothing is
      added around the text (as GPT-2's tokenizer does), so ``tok(context + continuation)`` starts
      with ``tok(context)``, which log-likelihood scoring and ``pipeline("text-generation")``
      rely on. ``eos_token`` is ``</s>`` (documents are separated by it in packed training data,
      and generation stops on it), ``pad_token`` is ``[PAD]``, ``bos_token`` is ``<s>``.

    Deterministic: the same texts and arguments give the same vocabulary, merges and ids.
    """
    if style not in STYLES:
        raise ValueError(f"style={style!r} is not a tokenizer style; valid styles: {list(STYLES)}")
    special_tokens = SPECIAL_TOKENS if style == "bert" else CAUSAL_SPECIAL_TOKENS
    specials = list(special_tokens.values())
    if vocab_size < len(specials):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the {len(specials)} special tokens {specials}")
    normalizer = normalizers.Sequence([normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else []))
    pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    word_counts: Counter[str] = Counter()
    for text in texts:
        pieces = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
        word_counts.update(piece for piece, _ in pieces)
    if not word_counts:
        raise ValueError("train_tokenizer got no text to learn from (every text was empty or whitespace)")
    vocab, merges = learn_bpe(word_counts, vocab_size, specials)

    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=SPECIAL_TOKENS["unk_token"],
                   continuing_subword_prefix=CONTINUING_PREFIX)
    )
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece(prefix=CONTINUING_PREFIX)
    tokenizer.add_special_tokens(specials)
    if style == "bert":
        cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        input_names = ["input_ids", "token_type_ids", "attention_mask"]
    else:
        input_names = ["input_ids", "attention_mask"]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=512,
        model_input_names=input_names,
        **special_tokens,
    )
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


def learn_bpe(
    word_counts: dict[str, int], vocab_size: int, specials: list[str]
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-pair merges over pre-tokenised words, most frequent pair first, ties to the smallest pair.

    A word starts as its first character followed by ``##``-prefixed characters; a merge of
    ``(a, ##b)`` yields ``ab``, of ``(##a, ##b)`` yields ``##ab``. Ids: specials, then the sorted
    alphabet, then merged tokens in the order they were learned — the layout ``tokenizers``' BPE
    model expects. Pair counts are kept incrementally, so each merge touches only the words that
    contain it.
    """
    words = sorted(word_counts)  # a fixed order makes every later step independent of hashing
    counts = [word_counts[w] for w in words]
    symbols = [[w[0]] + [CONTINUING_PREFIX + c for c in w[1:]] for w in words]
    alphabet = sorted({s for word in symbols for s in word} - set(specials))
    vocab = {token: i for i, token in enumerate(specials + alphabet)}

    pair_counts: Counter[tuple[str, str]] = Counter()
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for index, word in enumerate(symbols):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += counts[index]
            where[pair].add(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size and heap:
        negative, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative:  # stale entry: the count changed since it was pushed
            continue
        left, right = pair
        merged = left + right[len(CONTINUING_PREFIX):]
        merges.append(pair)
        vocab.setdefault(merged, len(vocab))
        touched: set[tuple[str, str]] = set()
        for index in sorted(where.pop(pair)):
            word, count = symbols[index], counts[index]
            for old in zip(word, word[1:]):
                pair_counts[old] -= count
                touched.add(old)
            word = _merge_word(word, left, right, merged)
            symbols[index] = word
            for new in zip(word, word[1:]):
                pair_counts[new] += count
                where[new].add(index)
                touched.add(new)
        for changed in touched:
            count = pair_counts.get(changed, 0)
            if changed != pair and count > 0:
                heapq.heappush(heap, (-count, changed))
                continue
            pair_counts.pop(changed, None)  # merged away everywhere, or no word holds it any more
            where.pop(changed, None)
    return vocab, merges


def _merge_word(word: list[str], left: str, right: str, merged: str) -> list[str]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == left and word[i + 1] == right:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out
