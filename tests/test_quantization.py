"""hfx.quantization: a 4-bit layer computes in the dtype that was asked for, on both bitsandbytes CPU paths.

Every test runs twice through the ``bnb_cpu_bf16`` fixture (bitsandbytes' AVX512-BF16 check patched
to False and to True before the layer is built), so both paths are exercised on every CPU. The
tolerances are derived from the dtype and the computation, and each test also shows that its bound
is broken by the error it guards against.
"""

import logging

import bitsandbytes as bnb
import pytest
import torch

from hfx.quantization import (
    FUSED_BF16,
    bnb_cpu_path,
    cpu_has_fused_bf16_kernel,
    pin_bnb_cpu_path,
    quiet_bitsandbytes_notices,
)

K, N = 128, 64  # N a multiple of 32 and K even: the shapes bitsandbytes' CPU repacking accepts
U_FP32 = 2.0**-24  # unit roundoff of fp32 (24 significant bits)
U_BF16 = 2.0**-8  # unit roundoff of bf16 (8 significant bits)


def quantized_linear(compute_dtype, double_quant=True):
    torch.manual_seed(0)
    dense = torch.nn.Linear(K, N)
    layer = bnb.nn.Linear4bit(K, N, compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=double_quant)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu").eval()  # .to() quantises


def dequantized_weight(layer):
    state = layer.weight.quant_state
    return bnb.functional.dequantize_4bit(layer.weight.data, state).float()


def forward(layer, x):
    with torch.no_grad():  # eval mode without grad: the case where bitsandbytes may take the fused kernel
        return layer(x)


def magnitudes(x, weight, bias):
    """|x| @ |W|^T + |b|: what every rounding bound below scales with."""
    return x.abs() @ weight.abs().T + bias.abs()


def fp32_bound(x, weight, bias):
    # Two fp32 evaluations of the same K-term dot product (reference and layer, any summation
    # order) each differ from the exact value by at most gamma_K * magnitudes, gamma_K = K u/(1 - K u).
    gamma = K * U_FP32 / (1 - K * U_FP32)
    return 2 * gamma * magnitudes(x, weight, bias)


def bf16_bound(x, weight, bias):
    # Relative to the fp32 result on the fp32 dequantised weight: the input rounded to bf16 (1 u),
    # the weight formed in bf16 (block scale, code value and their product: up to 3 u), the output
    # rounded to bf16 (1 u), plus fp32 accumulation (gamma_K, negligible): 5 u of magnitudes, and
    # one more u for the bias, added in bf16 by either path.
    return (5 * U_BF16 + K * U_FP32) * magnitudes(x, weight, bias) + U_BF16 * bias.abs()


def test_fp32_compute_stays_fp32_on_both_paths(bnb_cpu_bf16):
    layer = quantized_linear(torch.float32)
    assert pin_bnb_cpu_path(layer) == "dequantize (float32)"
    weight, bias = dequantized_weight(layer), layer.bias.detach()
    x = torch.randn(5, K)
    reference = x @ weight.T + bias
    bound = fp32_bound(x, weight, bias)
    assert ((forward(layer, x) - reference).abs() <= bound).all()
    # The bound is one a bf16 computation breaks: what the fused kernel would have returned.
    bf16_result = (x.bfloat16().float() @ weight.bfloat16().float().T).bfloat16().float() + bias
    assert ((bf16_result - reference).abs() > bound).any()


def test_bf16_compute_within_bf16_rounding_on_both_paths(bnb_cpu_bf16):
    layer = quantized_linear(torch.bfloat16)
    path = pin_bnb_cpu_path(layer)
    # The fused kernel is kept only where the library asks for it and the CPU really has it.
    assert path == (FUSED_BF16 if bnb_cpu_bf16 and cpu_has_fused_bf16_kernel() else "dequantize (bfloat16)")
    weight, bias = dequantized_weight(layer), layer.bias.detach().float()
    x = torch.randn(5, K)
    reference = x @ weight.T + bias
    bound = bf16_bound(x, weight, bias)
    out = forward(layer, x)
    assert out.dtype == torch.float32
    assert ((out - reference).abs() <= bound).all()
    # A wrong unpacking (the 4-bit codes read one column off) breaks the bound.
    wrong = weight.roll(1, dims=1)
    assert ((x @ wrong.T + bias - reference).abs() > bound).any()


def test_training_never_takes_the_fused_kernel(bnb_cpu_bf16):
    layer = quantized_linear(torch.bfloat16)
    assert pin_bnb_cpu_path(layer, for_training=True) == "dequantize (bfloat16)"
    assert layer.support_avx512bf16_for_cpu is False


def test_a_layer_already_repacked_is_unpacked_when_pinned_to_dequantize(bnb_cpu_bf16):
    # Without double quantisation, so that bitsandbytes' round trip is exact up to its bf16 block scales.
    layer = quantized_linear(torch.float32, double_quant=False)
    weight = dequantized_weight(layer)
    block_scale = layer.weight.quant_state.absmax.reshape(N, K // 64).repeat_interleave(64, dim=1)
    # The repacking bitsandbytes does in place on an AVX512-BF16 CPU's first eval forward.
    layer.weight.data, layer.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )
    layer.support_avx512bf16_for_cpu = True
    assert bnb_cpu_path(layer) == FUSED_BF16
    assert pin_bnb_cpu_path(layer) == "dequantize (float32)"
    assert layer.weight.quant_state.absmax.dim() == 1  # the scales' own layout again
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    # Repacking stores the block scales in bf16: each weight (a code in [-1, 1] times its scale)
    # moves by at most one bf16 rounding of the scale.
    unpacked = dequantized_weight(layer)
    assert ((unpacked - weight).abs() <= U_BF16 * block_scale).all()
    weight, bias = unpacked, layer.bias.detach()
    x = torch.randn(3, K)
    assert ((forward(layer, x) - (x @ weight.T + bias)).abs() <= fp32_bound(x, weight, bias)).all()


def test_models_without_4bit_layers_have_no_path():
    assert pin_bnb_cpu_path(torch.nn.Linear(4, 4)) is None
    assert bnb_cpu_path(torch.nn.Sequential(torch.nn.Linear(4, 4))) is None


def test_only_the_kernels_community_notice_is_dropped(caplog):
    import hfx  # noqa: F401  (installs the filter, without importing bitsandbytes)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1
    quiet_bitsandbytes_notices()  # idempotent
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: no module named kernels")
        logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]


@pytest.fixture(scope="module")
def llama_4bit_dirs(tmp_path_factory):
    """A tiny Llama saved in fp32, and the same model saved 4-bit (NF4, double quant, fp32 compute)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from hfx.tokenizer import train_tokenizer

    dense_dir, quant_dir = tmp_path_factory.mktemp("llama_fp32"), tmp_path_factory.mktemp("llama_nf4")
    train_tokenizer(["the cat sat on the mat", "a dog ran in the park"] * 5, vocab_size=100, save_dir=dense_dir,
                    style="causal")
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(dense_dir)
    quantized = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32))
    quantized.save_pretrained(quant_dir)
    tokenizer.save_pretrained(quant_dir)
    return dense_dir, quant_dir


def test_eval_of_a_4bit_checkpoint_computes_in_fp32_and_records_the_path(llama_4bit_dirs, bnb_cpu_bf16):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfx.evaluation import evaluate

    _, quant_dir = llama_4bit_dirs
    results, records = evaluate(quant_dir, "embedded_facts", limit=4, cache_dir=False, progress=False,
                                return_records=True)
    assert results["config"]["bnb_cpu_path"] == "dequantize (float32)"
    # Reference: the same 4-bit weights dequantised to a plain fp32 model, scored as an object.
    reference_model = AutoModelForCausalLM.from_pretrained(quant_dir).dequantize(dtype=torch.float32)
    reference, expected = evaluate(reference_model, "embedded_facts", tokenizer=AutoTokenizer.from_pretrained(quant_dir),
                                   limit=4, cache_dir=False, progress=False, return_records=True)
    assert reference["config"]["bnb_cpu_path"] is None
    ours = [ll for record in records["embedded_facts"] for ll, _ in record["resps"]]
    theirs = [ll for record in expected["embedded_facts"] for ll, _ in record["resps"]]
    # Sums of ~20 fp32 log-probabilities of magnitude ~1 through a 2-layer model: ~1e-5 apart at most
    # in fp32, where bf16 inputs and scales move each one by ~1e-2.
    assert ours == pytest.approx(theirs, abs=1e-4)
