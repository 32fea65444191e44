"""convert-long outputs load with their long backend everywhere: transformers' from_pretrained, hfx eval
(causal and encoder loaders, evaluate()), hfx finetune, pipelines; older conversions are upgraded.

The reference is the converted checkpoint run with ``hfx_sliding_window`` and an explicit
``global_attention_mask`` (no hook, no loader logic); every path must equal it on an input longer than
the window (1e-5: fp32 and the same kernels, only the loading differs) and the dense sdpa model must not.
"""

import json
import shutil
import warnings

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    BertLMHeadModel,
    BertTokenizer,
    pipeline,
)

from hfx.evaluation import EvaluationInputError, evaluate
from hfx.evaluation.encoder.pipelines import AutoModelForZeroShot
from hfx.evaluation.evaluator import load_model
from hfx.evaluation.model_args import ModelArgs
from hfx.finetune import FinetuneConfig, finetune
from hfx.finetune import model as finetune_model
from hfx.long_context import BACKEND, LongModelError, convert_to_long, load_long_model, prepare_long_model
from hfx_attention import attach_global_token_ids

WORDS = ["apple", "cherry", "sky", "sea", "grass", "leaf", "it", "is", "about", ".", "the", "a"]
WINDOW = 8  # every token sees 4 on each side: an input of more than 5 tokens is no longer dense
ATOL = 1e-5  # the same fp32 kernels on the same input: only the loading differs
TEXT = "apple sky sea it is about the grass and a leaf . the cherry is about the sea ."


def write_tokenizer(folder):
    vocab = folder / "vocab.txt"
    folder.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(str(vocab))
    tokenizer.save_pretrained(folder)
    vocab.unlink()
    return tokenizer


def convert(root, name, model_class, **overrides):
    settings = dict(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, initializer_range=0.2)  # wide weights: dense != windowed
    settings.update(overrides)
    torch.manual_seed(0)
    short = root / f"{name}-short"
    model_class(BertConfig(**settings)).save_pretrained(short)
    write_tokenizer(short)
    return convert_to_long(short, root / name, max_position_embeddings=128, attention_window=WINDOW)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("long_loading")
    long = convert(root, "long", BertForMaskedLM)
    old = root / "old"  # as written before convert-long named the backend in config.json
    shutil.copytree(long, old)
    config = json.loads((old / "config.json").read_text())
    del config["attn_implementation"]
    (old / "config.json").write_text(json.dumps(config))
    tokenizer = BertTokenizer.from_pretrained(long)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > WINDOW // 2 + 1 and ids[0, 0] == tokenizer.cls_token_id
    with torch.no_grad():
        reference = BertForMaskedLM.from_pretrained(long, attn_implementation=BACKEND).eval()
        flags = (ids == tokenizer.cls_token_id).long()
        want = reference(ids, global_attention_mask=flags, output_hidden_states=True)
        dense = BertForMaskedLM.from_pretrained(long, attn_implementation="sdpa").eval()(ids)
    assert (dense.logits - want.logits).abs().max() > 100 * ATOL  # the checks below could fail
    return dict(root=root, long=long, old=old, ids=ids, logits=want.logits, hidden=want.hidden_states[-1],
                dense=dense.logits, tokenizer=tokenizer)


def logits_of(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def hidden_of(model, ids):
    """The bare encoder's last hidden state, as hfx's encoder evaluators compute it."""
    with torch.no_grad():
        return getattr(model, "base_model", model).eval()(input_ids=ids).last_hidden_state


def test_config_json_names_the_backend_and_from_pretrained_picks_it(setup):
    assert json.loads((setup["long"] / "config.json").read_text())["attn_implementation"] == BACKEND
    model = AutoModelForMaskedLM.from_pretrained(setup["long"])
    assert model.config._attn_implementation == BACKEND
    with pytest.raises(ValueError, match=r"attach_global_token_ids\(model\)"):  # the global ids need the hook
        logits_of(model, setup["ids"])
    attach_global_token_ids(model)
    torch.testing.assert_close(logits_of(model, setup["ids"]), setup["logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits_of(load_long_model(setup["long"]), setup["ids"]), setup["logits"],
                               atol=ATOL, rtol=0)


def test_without_import_hfx_transformers_refuses_the_backend_by_name(setup, monkeypatch):
    """What a user sees who loads without ``import hfx``: the backend is not in transformers' AttentionInterface."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    monkeypatch.delitem(ALL_ATTENTION_FUNCTIONS._global_mapping, BACKEND)  # as in a process that never imported hfx
    with pytest.raises(ValueError, match=f'attn_implementation="{BACKEND}"` is not supported'):
        AutoModel.from_pretrained(setup["long"])


def test_hfx_eval_encoder_loader_and_model_args(setup):
    model, tokenizer, source = load_model(str(setup["long"]), causal=False)
    assert model.config._attn_implementation == BACKEND and source == str(setup["long"])
    torch.testing.assert_close(logits_of(model, setup["ids"]), setup["logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(hidden_of(model, setup["ids"]), setup["hidden"], atol=ATOL, rtol=0)
    dense, _, _ = load_model(str(setup["long"]), causal=False, model_args="attn_implementation=sdpa")
    assert dense.config._attn_implementation == "sdpa"  # an explicit choice wins
    torch.testing.assert_close(logits_of(dense, setup["ids"]), setup["dense"], atol=ATOL, rtol=0)


def test_hfx_eval_causal_loader(setup):
    folder = convert(setup["root"], "causal", BertLMHeadModel, is_decoder=True)
    model, _, _ = load_model(str(folder), causal=True)
    assert type(model).__name__ == "BertLMHeadModel" and model.config._attn_implementation == BACKEND
    ids = setup["ids"]
    with torch.no_grad():
        reference = BertLMHeadModel.from_pretrained(folder, attn_implementation=BACKEND).eval()
        want = reference(ids, global_attention_mask=(ids == 2).long()).logits
        dense = BertLMHeadModel.from_pretrained(folder, attn_implementation="sdpa").eval()(ids).logits
    assert (dense - want).abs().max() > 100 * ATOL
    torch.testing.assert_close(logits_of(model, ids), want, atol=ATOL, rtol=0)
    sdpa, _, _ = load_model(str(folder), causal=True, model_args={"attn_implementation": "sdpa"})
    torch.testing.assert_close(logits_of(sdpa, ids), dense, atol=ATOL, rtol=0)


def test_evaluate_scores_a_folder_as_its_long_model_object(setup, tmp_path):
    """evaluate() on the folder equals evaluate() on load_long_model's object; dense scores differ."""
    data = tmp_path / "data.jsonl"
    rows = [{"text": f"{a} {b} it is about the {c} and the {d}", "label": label}
            for label, (a, b, c, d) in [("red", "apple cherry apple cherry".split()),
                                        ("blue", "sky sea sky sea".split()),
                                        ("green", "grass leaf grass leaf".split())] for _ in range(2)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "cloze.yaml").write_text(f"""task: long_cloze
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: zero_shot_classification
doc_to_text: text
doc_to_target: label
method: cloze
template: "{{text}} it is about {{mask}}."
verbalizers: {{red: apple, blue: sky, green: grass}}
""")

    def scores(model, **kwargs):
        _, records = evaluate(model, "long_cloze", include_path=tmp_path, cache_dir=False, progress=False,
                              return_records=True, **kwargs)
        return torch.tensor([[r["resps"][label] for label in ("blue", "green", "red")] for r in records["long_cloze"]],
                            dtype=torch.float64)

    from_folder = scores(str(setup["long"]))
    from_object = scores(load_long_model(setup["long"]), tokenizer=setup["tokenizer"])
    dense = scores(str(setup["long"]), model_args="attn_implementation=sdpa")
    torch.testing.assert_close(from_folder, from_object, atol=ATOL, rtol=0)
    assert (from_folder - dense).abs().max() > 100 * ATOL


def test_evaluate_model_object_dense_warns_and_long_gets_its_global_ids(setup):
    dense = AutoModel.from_pretrained(setup["old"])  # plain transformers: an older conversion loads dense
    assert dense.config._attn_implementation == "sdpa"
    with pytest.warns(UserWarning, match=r"convert-long checkpoint .* runs 'sdpa' attention.*load_long_model"):
        prepare_long_model(dense, warn_dense=True)
    bare = BertForMaskedLM.from_pretrained(setup["long"])  # runs the backend, no hook yet
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_long_model(bare, warn_dense=True)
        prepare_long_model(bare, warn_dense=True)  # attached once
    assert len(bare.base_model._forward_pre_hooks) == 1
    torch.testing.assert_close(logits_of(bare, setup["ids"]), setup["logits"], atol=ATOL, rtol=0)


def test_older_conversion_is_upgraded_by_hfx_loaders_and_on_save(setup, tmp_path):
    old, ids = setup["old"], setup["ids"]
    for model in (load_long_model(old), load_model(str(old), causal=False)[0], AutoModelForZeroShot.from_pretrained(old)):
        assert model.config._attn_implementation == BACKEND
        torch.testing.assert_close(logits_of(model, ids), setup["logits"], atol=ATOL, rtol=0)
    load_long_model(old).save_pretrained(tmp_path / "resaved")  # a re-save names the backend
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["attn_implementation"] == BACKEND
    assert AutoModel.from_pretrained(tmp_path / "resaved").config._attn_implementation == BACKEND


@pytest.mark.parametrize("task", ["feature-extraction", "fill-mask", "text-classification"])
def test_pipelines_load_the_backend_and_need_the_hook_for_global_ids(setup, task):
    pipe = pipeline(task, model=str(setup["long"]))
    assert pipe.model.config._attn_implementation == BACKEND
    attach_global_token_ids(pipe.model)  # on the model the pipeline calls
    with torch.no_grad():
        hidden = pipe.model(input_ids=setup["ids"], output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(hidden, setup["hidden"], atol=ATOL, rtol=0)
    if task == "feature-extraction":
        features = torch.tensor(pipe(TEXT))[0]
        torch.testing.assert_close(features, setup["hidden"][0], atol=ATOL, rtol=0)


def test_hfx_zero_shot_pipeline_needs_no_hook(setup):
    pipe = pipeline("hfx-zero-shot-classification", model=str(setup["long"]))
    assert pipe.model.config._attn_implementation == BACKEND
    torch.testing.assert_close(logits_of(pipe.model, setup["ids"]), setup["logits"], atol=ATOL, rtol=0)


def test_hfx_finetune_loads_and_saves_the_long_backend(setup, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": TEXT, "label": i % 2}) + "\n" for i in range(4)))
    settings = dict(model=str(setup["old"]), data=str(data), task="seq-cls", method="full", max_steps=1,
                    batch_size=2, max_length=64, learning_rate=1e-3, extra_training_args={"disable_tqdm": True})
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(setup["old"])
    model = finetune_model.load_model(FinetuneConfig(output=str(tmp_path / "unused"), **settings), "seq-cls",
                                      model_config, False)
    assert model.config._attn_implementation == BACKEND
    torch.testing.assert_close(hidden_of(model, setup["ids"]), setup["hidden"], atol=ATOL, rtol=0)

    result = finetune(FinetuneConfig(output=str(tmp_path / "run"), **settings))
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["attn_implementation"] == BACKEND and result.global_step == 1
    assert AutoModel.from_pretrained(result.saved_dir).config._attn_implementation == BACKEND


def test_a_backend_that_is_not_installed_is_one_line_before_the_weights(setup, tmp_path):
    folder = tmp_path / "missing"
    shutil.copytree(setup["long"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["attn_implementation"] = "hfx_not_installed"
    (folder / "config.json").write_text(json.dumps(config))
    pattern = r"attn_implementation='hfx_not_installed' is not an installed hfx attention backend \(installed: .*hfx_sliding_window"
    with pytest.raises(LongModelError, match=pattern):
        load_long_model(folder)
    with pytest.raises(LongModelError, match=pattern):
        AutoModelForZeroShot.from_pretrained(folder)
    with pytest.raises(EvaluationInputError, match=pattern):  # named in --model-args
        ModelArgs.parse("attn_implementation=hfx_not_installed").from_pretrained_kwargs(None, None)
    with pytest.raises(EvaluationInputError, match=pattern):
        evaluate(str(folder), "long_cloze_never_planned", cache_dir=False, progress=False)
    with pytest.raises(LongModelError, match=pattern):
        finetune(FinetuneConfig(model=str(folder), data=str(folder / "config.json"), output=str(tmp_path / "run"),
                                task="seq-cls", method="full"))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
