"""hfx.tokenizer: the learned merges are exact BPE, reproducible across processes, and load back."""

import os
import random
import subprocess
import sys
from collections import Counter

import pytest
from transformers import AutoTokenizer

from hfx.tokenizer import SPECIAL_TOKENS, learn_bpe, train_tokenizer

SPECIALS = list(SPECIAL_TOKENS.values())


def naive_bpe(word_counts, vocab_size):
    """Recount every pair after every merge: slow, obviously right, same tie rule."""
    words = {w: [w[0]] + ["##" + c for c in w[1:]] for w in word_counts}
    vocab = SPECIALS + sorted({s for ws in words.values() for s in ws})
    merges = []
    while len(vocab) < vocab_size:
        pairs = Counter()
        for w, syms in words.items():
            for pair in zip(syms, syms[1:]):
                pairs[pair] += word_counts[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = best[0] + best[1][2:]
        merges.append(best)
        if merged not in vocab:
            vocab.append(merged)
        for w, syms in words.items():
            out, i = [], 0
            while i < len(syms):
                if syms[i:i + 2] == list(best):
                    out.append(merged)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[w] = out
    return {t: i for i, t in enumerate(vocab)}, merges


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_merges_equal_the_naive_recount(seed):
    rng = random.Random(seed)
    letters = "abcde"  # few letters: many equal counts, so the tie rule is exercised
    counts = Counter("".join(rng.choice(letters) for _ in range(rng.randint(1, 8))) for _ in range(300))
    vocab, merges = learn_bpe(counts, vocab_size=80, specials=SPECIALS)
    assert (vocab, merges) == naive_bpe(counts, 80)
    assert len(vocab) == 80


def test_same_text_gives_the_same_tokenizer_in_another_process(tmp_path):
    """tokenizers' own BpeTrainer gave five vocabularies in five runs on this text."""
    script = (
        "import json, sys; from hfx.tokenizer import train_tokenizer\n"
        "t = train_tokenizer(['sky sea ocean sapphire frog leaf lime grass'] * 4 + ['strawberry raspberry'], vocab_size=90)\n"
        "print(json.dumps(sorted(t.get_vocab().items())))\n"
    )
    outputs = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        outputs.add(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                   check=True).stdout)
    assert len(outputs) == 1


def test_encodes_pairs_bert_style_and_round_trips_through_save_pretrained(tmp_path):
    texts = ["The quick brown fox jumps over the lazy dog.", "Dogs and foxes: 42 of them!"] * 3
    tok = train_tokenizer(texts, vocab_size=70, save_dir=tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    pair = loaded("the fox", "lazy dogs")
    tokens = loaded.convert_ids_to_tokens(pair.input_ids)
    assert tokens[0] == "[CLS]" and tokens.count("[SEP]") == 2
    first_sep = tokens.index("[SEP]")
    assert pair.token_type_ids == [0] * (first_sep + 1) + [1] * (len(tokens) - first_sep - 1)
    assert loaded("the [MASK] fox").input_ids == tok("the [MASK] fox").input_ids
    assert loaded.mask_token_id in loaded("the [MASK] fox").input_ids  # specials are never split
    assert loaded.decode(loaded("quick brown foxes").input_ids, skip_special_tokens=True) == "quick brown foxes"
    assert len(loaded) == 70


def test_rejects_empty_text_and_a_vocabulary_smaller_than_the_specials():
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer(["", "   "])
    with pytest.raises(ValueError, match="vocab_size=3"):
        train_tokenizer(["abc"], vocab_size=3)


CORPUS = ["the sky is blue and the sea is green", "the grass is green", "a frog is green", "the sky is grey"] * 5


def test_causal_style_adds_nothing_and_keeps_eos_pad_bos(tmp_path):
    train_tokenizer(CORPUS, vocab_size=80, save_dir=tmp_path, style="causal")
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = tok("the sky is blue").input_ids
    assert ids == tok("the sky is blue", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["the", "sky", "is", "blue"]
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("</s>", "[PAD]", "<s>")
    assert tok.cls_token is None and tok.sep_token is None and tok.mask_token is None
    assert "[SEP]" not in tok.get_vocab() and "token_type_ids" not in tok("the sky")
    # the prefix property log-likelihood scoring needs: tok(context + continuation) starts with tok(context)
    assert tok("the sky is blue").input_ids[: len(tok("the sky is").input_ids)] == tok("the sky is").input_ids


def test_unknown_style_is_refused():
    with pytest.raises(ValueError, match=r"style='gpt' is not a tokenizer style; valid styles: \['bert', 'causal'\]"):
        train_tokenizer(CORPUS, style="gpt")


def tiny_causal_lm(tok):
    import torch

    import hfx

    torch.manual_seed(0)
    config = hfx.HfxConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64, is_decoder=True, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    return hfx.HfxForCausalLM(config).eval()


def test_text_generation_pipeline_on_a_causal_tokenizer_sees_and_emits_no_sep():
    from transformers import pipeline

    tok = train_tokenizer(CORPUS, vocab_size=80, style="causal")
    generator = pipeline("text-generation", model=tiny_causal_lm(tok), tokenizer=tok)
    prompt = "the sky is"
    assert generator.preprocess(prompt)["input_ids"].tolist() == [tok(prompt, add_special_tokens=False).input_ids]
    out = generator(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert out.startswith(prompt) and "[SEP]" not in out and "[CLS]" not in out

    bert = train_tokenizer(CORPUS, vocab_size=80, style="bert")  # what the quickstart used to give a causal LM
    wrapped = pipeline("text-generation", model=tiny_causal_lm(bert), tokenizer=bert).preprocess(prompt)["input_ids"]
    assert bert.convert_ids_to_tokens(wrapped[0].tolist())[-1] == "[SEP]"


def test_loglikelihoods_of_different_choices_differ_with_a_causal_tokenizer():
    from hfx.evaluation.scorer import CausalLMScorer

    context, choices = "the sky is", [" blue", " green", " grey"]
    causal = train_tokenizer(CORPUS, vocab_size=80, style="causal")
    scorer = CausalLMScorer(tiny_causal_lm(causal), causal, progress=False)
    for choice in choices:
        assert scorer.encode_pair(context, choice)[1] == causal(choice, add_special_tokens=False).input_ids
    scores = [logprob for logprob, _ in scorer.loglikelihood([(context, c) for c in choices])]
    assert len(set(scores)) == 3, scores

    bert = train_tokenizer(CORPUS, vocab_size=80, style="bert")  # every continuation is scored as "[SEP]"
    bert_scorer = CausalLMScorer(tiny_causal_lm(bert), bert, progress=False)
    assert {tuple(bert_scorer.encode_pair(context, c)[1]) for c in choices} == {(bert.sep_token_id,)}
