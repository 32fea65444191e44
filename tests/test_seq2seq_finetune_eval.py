"""Encoder-decoders in ``hfx finetune --task seq2seq`` and ``hfx eval`` (``backend=seq2seq``).

Tiny stock encoder-decoders (T5: relative position buckets; BART: learned positions and a
``forced_eos_token_id`` generation config, so generation takes the ``generate`` path) are built
here and saved with save_pretrained. Evaluation is compared with lm-eval 0.4.13's own ``hf``
model (``backend=seq2seq``, batch size 1) on local task files; fine-tuning trains, saves, reloads
and merges, and refuses a seq2seq task on a model without an encoder-decoder before any training.
"""

import json
import random

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from hfx.evaluation import TaskError, evaluate
from hfx.evaluation.evaluator import EvaluationInputError
from hfx.finetune import DataError, FinetuneConfig, finetune
from hfx.finetune.data import IGNORE_INDEX, collator_for, prepare_data
from hfx.tokenizer import train_tokenizer
from tests.test_eval import _sentence, _write_tasks

NAMES = ["tiny_mc3", "tiny_ll", "tiny_ppl", "tiny_gen", "tiny_gen_stop"]
LIMIT = 6


def _tokenizer(style="bert"):
    rng = random.Random(2)
    return train_tokenizer([_sentence(rng, 12) for _ in range(200)], vocab_size=200, style=style)


def _quiet_head(model, tok, scale=0.1):
    """Special tokens other than EOS never win (a random head would emit [PAD] forever, generating ''),
    and logits of a few units, so that log-likelihoods are of a realistic size."""
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.mul_(scale)
        for i in tok.all_special_ids:
            if i != tok.eos_token_id:
                head[i] = 0
    return model.eval()


def _t5(tok):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=1,
                      num_heads=4, n_positions=256, dropout_rate=0.0, tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id)
    return _quiet_head(T5ForConditionalGeneration(config), tok)


def _bart(tok):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=256, dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=tok.eos_token_id)
    return _quiet_head(BartForConditionalGeneration(config), tok)


def _hfx(tok):
    """hfx's own encoder-decoder, pre-norm RMSNorm and rotary positions in both stacks."""
    import hfx

    torch.manual_seed(0)
    config = hfx.HfxConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, decoder_layers=1,
                           num_attention_heads=4, intermediate_size=64, max_position_embeddings=256,
                           is_encoder_decoder=True, norm_type="rmsnorm", norm_position="pre",
                           position_embedding_type="rotary", type_vocab_size=0, tie_word_embeddings=False,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                           decoder_start_token_id=tok.pad_token_id)
    from hfx.modeling_hfx_seq2seq import HfxForConditionalGeneration

    return _quiet_head(HfxForConditionalGeneration(config), tok, scale=1.0)


def _save(model, tok, folder):
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


MODELS = {"t5": _t5, "bart": _bart, "hfx": _hfx}
#: T5 on every task; hfx and BART (learned positions, generation through ``generate``) on fewer, for
#: the test time budget (lm-eval decodes at least as many tokens as the prompt has, one request at a time)
TASKS = {"t5": NAMES, "hfx": ["tiny_mc3", "tiny_ll", "tiny_ppl", "tiny_gen_stop"],
         "bart": ["tiny_mc3", "tiny_gen", "tiny_gen_stop"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import lm_eval
    from lm_eval.tasks import TaskManager

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("seq2seq_eval")
    tasks = _write_tasks(root)
    # a stop string the models do produce, and a budget they run into
    (tasks / "gen_stop.yaml").write_text((tasks / "gen.yaml").read_text().replace("tiny_gen", "tiny_gen_stop")
                                         .replace('until: ["\\n"]', 'until: ["dog", "in"]')
                                         .replace("max_gen_toks: 6", "max_gen_toks: 2"))
    tok = _tokenizer()
    folders = {name: _save(build(tok), tok, root / name) for name, build in MODELS.items()}
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    reference, ours = {}, {}
    for name, folder in folders.items():
        reference[name] = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={folder},backend=seq2seq,dtype=float32", device="cpu", batch_size=1,
            tasks=TASKS[name], task_manager=manager, log_samples=True, limit=LIMIT, bootstrap_iters=0)
        ours[name] = evaluate(folder, TASKS[name], include_path=tasks, limit=LIMIT, cache_dir=False, progress=False,
                              return_records=True, max_batch_tokens=256, bootstrap_iters=0)
    return {"root": root, "tasks": tasks, "tok": tok, "folders": folders, "reference": reference, "ours": ours}


def _samples(reference, task):
    return sorted(reference["samples"][task], key=lambda s: s["doc_id"])


def _ll_bound(value: float) -> float:
    """fp32: both sides sum the same log-probabilities in other batch shapes, ~1e-7 relative; 1e-5 x max(1, |ll|)."""
    return 1e-5 * max(1.0, abs(value))


@pytest.mark.parametrize("model_name, task", [(m, t) for m in MODELS for t in ("tiny_mc3", "tiny_ll") if t in TASKS[m]])
def test_loglikelihood_tasks_match_lm_eval_seq2seq(world, model_name, task):
    ref = world["reference"][model_name]
    results, records = world["ours"][model_name]
    assert results["config"]["backend"] == "seq2seq"  # auto: the config is an encoder-decoder
    samples = _samples(ref, task)
    assert len(samples) == len(records[task]) == LIMIT
    for sample, record in zip(samples, records[task]):
        assert [list(a) for a in sample["arguments"]] == record["arguments"]
        for (ref_ll, ref_greedy), (ll, greedy) in zip((r[0] for r in sample["resps"]), record["resps"]):
            assert abs(ll - ref_ll) <= _ll_bound(ref_ll)
            assert bool(ref_greedy) == greedy
    for metric, value in ref["results"][task].items():
        if metric.startswith(("acc", "perplexity")) and isinstance(value, float):
            assert results["results"][task][metric] == pytest.approx(value, rel=1e-5, abs=1e-12), metric


@pytest.mark.parametrize("model_name", list(MODELS))
def test_rolling_perplexity_and_generation_match_lm_eval_seq2seq(world, model_name):
    ref = world["reference"][model_name]
    results, records = world["ours"][model_name]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        if "tiny_ppl" in TASKS[model_name]:
            assert results["results"]["tiny_ppl"][metric] == pytest.approx(ref["results"]["tiny_ppl"][metric], rel=1e-5)
    for task in [t for t in ("tiny_gen", "tiny_gen_stop") if t in TASKS[model_name]]:
        expected = [s["resps"][0][0] for s in _samples(ref, task)]
        assert [r["resps"][0] for r in records[task]] == expected
        assert results["results"][task]["exact_match,none"] == ref["results"][task]["exact_match,none"]
    generated = [r["resps"][0] for r in records["tiny_gen_stop"]]
    assert any(generated), "the test model must generate text for the comparison to mean anything"


def test_batch_layout_does_not_move_seq2seq_scores(world):
    """One row per forward, or many contexts and choices per forward: the same numbers to rounding."""
    folder = world["folders"]["t5"]
    runs = [evaluate(folder, ["tiny_mc3", "tiny_gen_stop"], include_path=world["tasks"], limit=LIMIT, cache_dir=False,
                     progress=False, return_records=True, batch_size=bs, max_batch_tokens=tokens)[1]
            for bs, tokens in ((1, 100000), (None, 100000))]
    for a, b in zip(runs[0]["tiny_mc3"], runs[1]["tiny_mc3"]):
        for (x, gx), (y, gy) in zip(a["resps"], b["resps"]):
            assert abs(x - y) <= _ll_bound(x) and gx == gy
    assert [r["resps"] for r in runs[0]["tiny_gen_stop"]] == [r["resps"] for r in runs[1]["tiny_gen_stop"]]


def test_seq2seq_scorer_shares_one_encoder_pass_per_context(world):
    from hfx.evaluation.seq2seq import Seq2SeqScorer

    tok = world["tok"]
    model = AutoModelForSeq2SeqLM.from_pretrained(world["folders"]["t5"])
    scorer = Seq2SeqScorer(model, tok, max_batch_tokens=100000)
    requests = [("the cat", " sat"), ("the cat", " ran in"), ("a dog", " is big"), ("", "owl")]
    got = scorer.loglikelihood(requests)
    assert scorer.forward_calls == 2  # one encoder pass over the 3 contexts, one decoder pass over 4 rows
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    for (context, continuation), (ll, _) in zip(requests, got):  # each request alone, through model(labels=)
        # lm-eval's seq2seq encoding, straight from the tokenizer: the context with its special tokens (an
        # empty one is the BOS token), the continuation alone without them
        ctx = tok(context)["input_ids"] if context else [prefix]
        cont = tok(continuation, add_special_tokens=False)["input_ids"]
        assert cont and cont[0] != prefix
        logits = model(input_ids=torch.tensor([ctx]), labels=torch.tensor([cont])).logits[0]
        alone = torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None]).sum().item()
        assert abs(ll - alone) <= _ll_bound(alone)


def test_backend_choice_and_bad_backends_fail_before_loading(world):
    t5 = world["folders"]["t5"]
    with pytest.raises(EvaluationInputError, match=r"backend='encoder' is invalid; valid values: auto, default, "
                                                   r"causal, seq2seq"):
        evaluate(t5, ["tiny_mc3"], include_path=world["tasks"], model_args="backend=encoder", cache_dir=False)
    with pytest.raises(TaskError, match=r"encoder-decoder 't5' model.*backend=seq2seq \(or auto\)"):
        evaluate(t5, ["tiny_mc3"], include_path=world["tasks"], model_args="backend=causal", cache_dir=False)
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = world["tok"]
    gpt2 = _save(GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=16, n_layer=1, n_head=2,
                                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)), tok,
                 world["root"] / "gpt2")
    with pytest.raises(TaskError, match=r"'gpt2' model.*not an encoder-decoder.*Valid backends for this model: causal"):
        evaluate(gpt2, ["tiny_mc3"], include_path=world["tasks"], model_args="backend=seq2seq", cache_dir=False)
    causal = evaluate(gpt2, ["tiny_mc3"], include_path=world["tasks"], limit=2, cache_dir=False, progress=False)
    assert causal["config"]["backend"] == "causal"


# -- fine-tuning ------------------------------------------------------------------------------------
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _pairs(n=40, source="source", target="target"):
    return [{source: f"say {i % 10}", target: WORDS[i % 10]} for i in range(n)]


@pytest.fixture(scope="module")
def ft(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("seq2seq_ft")
    rows = _pairs()
    tok = train_tokenizer([f"{r['source']} {r['target']}" for r in rows], vocab_size=80, style="causal")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t5 = _save(_t5(tok), tok, root / "t5")
    hfx_model = _save(_hfx(tok), tok, root / "hfx")
    return {"root": root, "tok": tok, "data": str(data), "t5": str(t5), "hfx": str(hfx_model)}


def _run(ft, output, **overrides):
    base = dict(model=ft["t5"], data=ft["data"], output=str(output), max_steps=12, batch_size=8, logging_steps=1,
                save_steps=100, learning_rate=5e-3, lora_r=4, lora_alpha=8, warmup_ratio=0.0,
                extra_training_args={"disable_tqdm": True})
    base.update(overrides)
    return FinetuneConfig(**base)


def test_seq2seq_data_encoder_to_encoder_target_to_labels_with_eos(ft, tmp_path):
    tok = ft["tok"]
    config = _run(ft, tmp_path / "unused", task="seq2seq")
    data = prepare_data(config, "seq2seq", tok)
    assert data.data_format == "source-target"
    row = data.train[3]
    assert row["input_ids"] == tok("say 3")["input_ids"]
    assert row["labels"] == tok("three", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    batch = collator_for("seq2seq", tok)([data.train[i] for i in range(4)])
    lengths = [len(data.train[i]["labels"]) for i in range(4)]
    for labels, n in zip(batch["labels"].tolist(), lengths):
        assert labels[n:] == [IGNORE_INDEX] * (len(labels) - n) and IGNORE_INDEX not in labels[:n]
    # prompt/completion records serve too; a file with neither pair is named with its columns
    other = tmp_path / "pc.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in _pairs(8, "prompt", "completion")))
    assert prepare_data(_run(ft, tmp_path / "u2", task="seq2seq", data=str(other)), "seq2seq", tok).data_format == \
        "prompt-completion"
    other.write_text(json.dumps({"text": "say 1"}) + "\n")
    with pytest.raises(DataError, match=r"needs fields \['source', 'target'\].*columns \['text'\]"):
        prepare_data(_run(ft, tmp_path / "u3", task="seq2seq", data=str(other)), "seq2seq", tok)
    with pytest.raises(ValueError, match=r"packing=True is invalid with task='seq2seq'"):
        _run(ft, tmp_path / "u4", task="seq2seq", packing=True)


def _logits(model, tok):
    ids = torch.tensor([tok("say 7")["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=torch.tensor([[tok.pad_token_id, 5, 6]])).logits


def _data_loss(model, tok) -> float:
    """Mean loss over the whole toy data set, each pair alone: source ids in, target + EOS as labels."""
    with torch.no_grad():
        return sum(model(input_ids=torch.tensor([tok(r["source"])["input_ids"]]),
                         labels=torch.tensor([tok(r["target"], add_special_tokens=False)["input_ids"]
                                              + [tok.eos_token_id]])).loss.item() for r in _pairs()) / len(_pairs())


def test_full_seq2seq_finetune_learns_saves_and_reloads(ft, tmp_path):
    result = finetune(_run(ft, tmp_path / "full", method="full"))  # task auto: the checkpoint is an encoder-decoder
    assert result.task == "seq2seq" and result.data_format == "source-target"
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(result.saved_dir).eval()
    torch.testing.assert_close(_logits(reloaded, ft["tok"]), _logits(result.model.eval(), ft["tok"]))


def test_lora_seq2seq_finetune_of_hfx_encoder_decoder_adapter_and_merge(ft, tmp_path):
    from peft import PeftModel

    result = finetune(_run(ft, tmp_path / "lora", model=ft["hfx"], method="lora", task="seq2seq", merge=True))
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert sum(losses[-3:]) / 3 < 0.97 * sum(losses[:3]) / 3  # 12 steps of rank-4 LoRA: about 0.945 here
    tok = ft["tok"]
    trained = _logits(result.model.eval(), tok)
    base = AutoModelForSeq2SeqLM.from_pretrained(ft["hfx"])
    assert type(base).__name__ == "HfxForConditionalGeneration"
    # on the whole data set, deterministically: the adapter lowers the loss by > 5% (4.145 -> 3.870 here)
    assert _data_loss(result.model.eval(), tok) < 0.95 * _data_loss(base.eval(), tok)
    adapter = PeftModel.from_pretrained(base, result.saved_dir).eval()
    torch.testing.assert_close(_logits(adapter, tok), trained)
    merged = AutoModelForSeq2SeqLM.from_pretrained(result.merged_dir).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    # the merged weights are W + BA once: fp32 rounding of one sum per weight
    torch.testing.assert_close(_logits(merged, tok), trained, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(AutoModelForSeq2SeqLM.from_pretrained(ft["hfx"]), tok), trained)


def test_seq2seq_task_refused_on_decoder_and_encoder_only_models_before_training(ft, tmp_path):
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    tok = ft["tok"]
    llama = _save(LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2)), tok, tmp_path / "llama")
    bert = _save(BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=32)), tok, tmp_path / "bert")
    for folder, kind in ((llama, "decoder-only 'llama'"), (bert, "encoder-only 'bert'")):
        out = tmp_path / f"out-{folder.name}"
        with pytest.raises(ValueError, match=rf"task='seq2seq' is invalid for this model: .* is a {kind} model"):
            finetune(_run(ft, out, model=str(folder), task="seq2seq"))
        assert not out.exists()  # refused before anything was written
    with pytest.raises(ValueError, match=r"task='causal-lm' is invalid for this model.*valid values for it: "
                                         r"\['seq2seq'\]"):
        finetune(_run(ft, tmp_path / "out-t5", task="causal-lm"))
    from hfx.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["finetune", "--model", str(llama), "--data", ft["data"], "--output", str(tmp_path / "cli"),
              "--task", "seq2seq"])
    assert stop.value.code == 2 and not (tmp_path / "cli").exists()
