"""MLM masking (the 80/10/10 rule, measured on >100k tokens), NSP pairs, causal packing, bad input."""

import pytest
import torch
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

import hfx
from hfx.data import (
    IS_NEXT,
    DataCollatorForPreTraining,
    build_nsp_pairs,
    embedded_corpus,
    load_documents,
    pack_for_causal_lm,
    tokenize_for_mlm,
)
from hfx.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def big_documents():
    rows = embedded_corpus(seed=3, docs_per_entity=80, num_arithmetic_docs=800)["corpus_train"]
    return Dataset.from_dict({"sentences": [r["sentences"] for r in rows], "text": [r["text"] for r in rows]})


@pytest.fixture(scope="module")
def tokenizer(big_documents):
    return train_tokenizer(big_documents["text"][:500], vocab_size=400)


@pytest.fixture(scope="module")
def masked_batches(big_documents, tokenizer):
    """Over 100k maskable tokens, collated in batches of 64 chunks of 128 tokens."""
    chunks = tokenize_for_mlm(big_documents, tokenizer, max_length=128)
    collator = DataCollatorForPreTraining(tokenizer, seed=0)
    batches = []
    for start in range(0, len(chunks), 64):
        examples = [chunks[i] for i in range(start, min(start + 64, len(chunks)))]
        original = tokenizer.pad([{"input_ids": e["input_ids"]} for e in examples], return_tensors="pt")["input_ids"]
        batches.append((original, collator(examples)))
    return batches


def _stack(batches):
    originals, inputs, labels = [], [], []
    for original, batch in batches:
        originals.append(original.flatten())
        inputs.append(batch["input_ids"].flatten())
        labels.append(batch["labels"].flatten())
    return torch.cat(originals), torch.cat(inputs), torch.cat(labels)


def test_selection_and_80_10_10_split_on_over_100k_tokens(masked_batches, tokenizer):
    original, inputs, labels = _stack(masked_batches)
    special_ids = torch.tensor(tokenizer.all_special_ids)
    maskable = ~torch.isin(original, special_ids)
    assert int(maskable.sum()) >= 100_000
    selected = labels != -100
    assert not (selected & ~maskable).any(), "a special or pad token was selected"
    assert torch.equal(labels[selected], original[selected])
    rate = selected.sum().item() / maskable.sum().item()
    assert abs(rate - 0.15) <= 0.003, rate

    n = selected.sum().item()
    to_mask = (inputs == tokenizer.mask_token_id) & selected
    kept = (inputs == original) & selected
    randomised = selected & ~to_mask & ~kept
    # A random draw can land on the original token; expected share 10% / (ordinary vocabulary).
    assert abs(to_mask.sum().item() / n - 0.80) <= 0.01
    assert abs(randomised.sum().item() / n - 0.10) <= 0.01
    assert abs(kept.sum().item() / n - 0.10) <= 0.01
    assert torch.equal(inputs[~selected], original[~selected]), "an unselected token changed"
    assert not torch.isin(inputs[randomised], special_ids).any(), "a random replacement is a special or pad token"


def test_transformers_collator_draws_special_tokens_as_random_replacements(tokenizer):
    """Why hfx masks with its own function: transformers 5.23 samples random tokens from the whole vocabulary."""
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=1.0, mask_replace_prob=0.0,
                                               random_replace_prob=1.0, seed=0)
    ids = tokenizer("fikgil lives in danpur . " * 40)["input_ids"]
    batch = collator([{"input_ids": ids} for _ in range(32)])
    assert torch.isin(batch["input_ids"], torch.tensor(tokenizer.all_special_ids)).logical_and(
        batch["labels"] != -100).any()
    ours = DataCollatorForPreTraining(tokenizer, mlm_probability=1.0, mask_replace_prob=0.0, random_replace_prob=1.0,
                                      seed=0)
    batch = ours([{"input_ids": ids} for _ in range(32)])
    replaced = batch["labels"] != -100
    assert replaced.sum() > 0.9 * len(ids) * 32
    assert not torch.isin(batch["input_ids"][replaced], torch.tensor(tokenizer.all_special_ids)).any()


def test_whole_word_masking_selects_every_piece_of_a_word(tokenizer):
    collator = DataCollatorForPreTraining(tokenizer, whole_word_mask=True, seed=0)
    text = " ".join(["pafodrin is a friend of rosfansen."] * 30)
    encoded = tokenizer(text)
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert any(t.startswith("##") for t in tokens), "the test text needs multi-piece words"
    selected_words = total_words = 0
    for _ in range(20):
        labels = collator([encoded])["labels"][0]
        word, word_selected = [], []
        for i, tok in enumerate(tokens):
            if tok in tokenizer.all_special_tokens:
                continue
            if not tok.startswith("##") and word:
                assert len(set(word_selected)) == 1, [tokens[j] for j in word]
                selected_words += word_selected[0]
                total_words += 1
                word, word_selected = [], []
            word.append(i)
            word_selected.append(bool(labels[i] != -100))
    assert 0.10 < selected_words / total_words < 0.20


def test_whole_word_masking_needs_a_subword_prefix():
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"[PAD]": 0, "[MASK]": 1, "[UNK]": 2, "a": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", mask_token="[MASK]",
                                         unk_token="[UNK]")
    with pytest.raises(ValueError, match="continuing-subword prefix"):
        DataCollatorForPreTraining(word_level, whole_word_mask=True)


def test_tokenizer_without_mask_token_is_refused(tokenizer):
    from tokenizers import Tokenizer, models

    backend = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "a": 2}, unk_token="[UNK]"))
    no_mask = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    with pytest.raises(ValueError, match=r"needs a tokenizer with a mask token.*\[PAD\]"):
        DataCollatorForPreTraining(no_mask)


def test_nsp_pairs_half_positive_negatives_from_other_documents(big_documents, tokenizer):
    pairs = build_nsp_pairs(big_documents, tokenizer, max_length=64, seed=0)
    labels = pairs["next_sentence_label"]
    assert len(labels) > 10_000
    positives = sum(1 for label in labels if label == IS_NEXT) / len(labels)
    assert abs(positives - 0.5) <= 0.02, positives

    sentence_doc = {}
    for d, doc in enumerate(big_documents["sentences"]):
        for s in doc:
            sentence_doc.setdefault(s, set()).add(d)
    true_next = [(d, doc[i], doc[i + 1]) for d, doc in enumerate(big_documents["sentences"]) for i in range(len(doc) - 1)]
    for k in range(0, len(pairs), 97):
        d, a, b_true = true_next[k]
        ids, types = pairs[k]["input_ids"], pairs[k]["token_type_ids"]
        sep = ids.index(tokenizer.sep_token_id)
        assert types[: sep + 1] == [0] * (sep + 1) and set(types[sep + 1 :]) == {1}
        b = tokenizer.decode(ids[sep + 1 :], skip_special_tokens=True)
        assert tokenizer.decode(ids[:sep], skip_special_tokens=True) == tokenizer.decode(tokenizer(a)["input_ids"],
                                                                                          skip_special_tokens=True)
        b_true_text = tokenizer.decode(tokenizer(b_true)["input_ids"], skip_special_tokens=True)
        if pairs[k]["next_sentence_label"] == IS_NEXT:
            assert b == b_true_text
        else:
            assert b != b_true_text


def test_nsp_truncates_longest_first(tokenizer):
    docs = Dataset.from_dict({"sentences": [["a " * 50 + ".", "b b ."], ["c c .", "d " * 50 + "."]]})
    pairs = build_nsp_pairs(docs, tokenizer, max_length=16, seed=1)
    for ids in pairs["input_ids"]:
        assert len(ids) <= 16
        assert ids.count(tokenizer.sep_token_id) == 2


def test_nsp_rejects_documents_with_one_sentence(tokenizer):
    docs = Dataset.from_dict({"sentences": [["one.", "two."], ["alone."]]})
    with pytest.raises(ValueError, match=r"at least two sentences; 1 of 2 .*row 1"):
        build_nsp_pairs(docs, tokenizer)


def test_collator_batches_train_hfx_for_pretraining(big_documents, tokenizer, make_config):
    pairs = build_nsp_pairs(big_documents.select(range(40)), tokenizer, max_length=32)
    batch = DataCollatorForPreTraining(tokenizer, seed=0)([pairs[i] for i in range(8)])
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels", "next_sentence_label"}
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    model = hfx.HfxForPreTraining(make_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id))
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.mlm_loss is not None and out.nsp_loss is not None
    out.loss.backward()


def test_causal_packing_fixed_blocks_with_eos_between_documents(tokenizer):
    docs = Dataset.from_dict({"text": ["fikgil lives in danpur.", "3 plus 4 is 7.", "zorvik has a pet owl."] * 20})
    packed = pack_for_causal_lm(docs, tokenizer, block_size=16)
    assert all(len(ids) == 16 for ids in packed["input_ids"])
    stream = [t for ids in packed["input_ids"] for t in ids]
    assert tokenizer.cls_token_id not in stream and tokenizer.sep_token_id not in stream
    expected = [t for text in docs["text"] for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id]]
    assert stream == expected[: len(stream)]
    assert len(expected) - len(stream) < 16


def test_load_documents_from_text_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("first one.\nfirst two.\n\nsecond one.\nsecond two.\n")
    (tmp_path / "b.txt").write_text("third one.\nthird two.\n")
    one = load_documents(str(tmp_path / "a.txt"))
    assert one["sentences"] == [["first one.", "first two."], ["second one.", "second two."]]
    assert len(load_documents(str(tmp_path))) == 3


def test_load_documents_from_jsonl_splits_sentences(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "One sentence. Another one! A third?", "id": 1}\n')
    docs = load_documents(str(path), text_column="body")
    assert docs["sentences"] == [["One sentence.", "Another one!", "A third?"]]
    assert set(docs.column_names) == {"text", "sentences"}


def test_missing_text_column_names_the_existing_columns(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "x.", "id": 1}\n')
    with pytest.raises(ValueError, match=r"text column 'text' not found.*\['body', 'id'\]"):
        load_documents(str(path))


def test_missing_data_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents(str(tmp_path / "nope.txt"))
