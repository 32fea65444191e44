"""Shared fixtures: no hub access, tiny configs, tiny tokenizers saved to tmp dirs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")  # hook modules of lm-eval tasks call evaluate.load at import
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import hfx  # noqa: E402,F401


def tiny_config(**overrides):
    """A 2-layer, 32-wide hfx config: big enough to exercise every path, small enough for CI."""
    base = dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    base.update(overrides)
    return hfx.HfxConfig(**base)


@pytest.fixture
def make_config():
    return tiny_config


TINY_CORPUS = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "transformers normalise tokens with layer norm or batch norm",
    "the quick brown fox jumps over the lazy dog",
    "numbers like 12 and 345 are split into digits",
] * 4


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A ~150-token BPE tokenizer trained offline and saved with save_pretrained; load it with AutoTokenizer."""
    from hfx.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    train_tokenizer(TINY_CORPUS, vocab_size=150, save_dir=folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def private_eval_cache(tmp_path_factory):
    """hfx eval's default cache (and its content-hash memo) in a tmp folder, never in the home directory."""
    old = os.environ.get("HFX_EVAL_CACHE")
    os.environ["HFX_EVAL_CACHE"] = str(tmp_path_factory.mktemp("default-eval-cache"))
    yield os.environ["HFX_EVAL_CACHE"]
    if old is None:
        os.environ.pop("HFX_EVAL_CACHE")
    else:
        os.environ["HFX_EVAL_CACHE"] = old


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=[False, True], ids=["bnb-cpu-dequantize", "bnb-cpu-avx512bf16"])
def bnb_cpu_bf16(request, monkeypatch):
    """Both CPU kernels bitsandbytes can pick, on any CPU: its AVX512-BF16 check, patched before a
    model is built (each ``Linear4bit`` reads it in ``__init__``). On a CPU that has the
    instructions, ``False`` is the path other CPUs take; on one without, ``True`` is the flag a
    Xeon sets, with the real capability still absent (``hfx.quantization`` must notice)."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: request.param)
    return request.param
