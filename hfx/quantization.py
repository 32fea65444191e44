"""bitsandbytes 4-bit on CPU: the compute dtype the user asked for is the one that runs.

bitsandbytes 0.50 picks a CPU kernel on its own. On a CPU with AVX512-BF16, a ``Linear4bit`` in
eval mode without grad repacks its weight (in place) and from then on runs a fused ``gemv_4bit``
that casts the input and the block scales to bf16, whatever ``bnb_4bit_compute_dtype`` says; on
other CPUs, and in training, it dequantises the weight and computes in the compute dtype. So the
same fp32 QLoRA model gives bf16-rounded numbers on one machine and fp32 numbers on another.

hfx pins the choice on every ``Linear4bit`` right after loading: the fused kernel only where the
compute dtype is bf16 *and* the CPU really has the instructions *and* the model is used for
inference; the dequantising path otherwise. The path taken is returned so that it can be recorded
in results (``hfx eval`` results' ``config.bnb_cpu_path``; ``hfx finetune``'s
``FinetuneResult.bnb_cpu_path`` and ``hfx_finetune_results.json``).
"""

from __future__ import annotations

import logging
import sys

DEQUANTIZE = "dequantize"
FUSED_BF16 = "fused_bf16"

#: bitsandbytes logs this once per process on AVX512-BF16 CPUs when the optional ``kernels``
#: package is absent; it then uses its own bundled kernel, so the line carries no information.
_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropKernelsNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _KERNELS_NOTICE not in record.getMessage()


_NOTICE_FILTER = _DropKernelsNotice()


def quiet_bitsandbytes_notices() -> None:
    """Drop bitsandbytes' "kernels-community" notice; every other bitsandbytes message still shows.

    Cheap (no import of bitsandbytes): the filter sits on the logger by name, which bitsandbytes
    looks up when it is imported later.
    """
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if _NOTICE_FILTER not in logger.filters:
        logger.addFilter(_NOTICE_FILTER)


def cpu_has_fused_bf16_kernel() -> bool:
    """Whether bitsandbytes' native library reports AVX512-BF16 (its fused CPU kernel can run)."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


def _linear4bit_modules(model):
    # A Linear4bit exists only once bitsandbytes is imported; importing it just to find none costs
    # seconds (it pulls in torch.compile / inductor), which every plain `hfx eval` process paid.
    if "bitsandbytes" not in sys.modules:
        return []
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    return [module for module in model.modules() if isinstance(module, Linear4bit)]


def _cpu_layers(model):
    return [m for m in _linear4bit_modules(model) if m.weight.device.type == "cpu"]


def pin_bnb_cpu_path(model, *, for_training: bool = False) -> str | None:
    """Choose and fix the CPU kernel of every 4-bit linear of ``model``; return the path, or None.

    The fused kernel is kept only for inference with a bf16 compute dtype on a CPU that has it
    (once a layer is repacked for it, bitsandbytes routes training forwards there too). A layer
    already repacked is unpacked again.
    """
    import torch

    layers = _cpu_layers(model)
    fused_available = bool(layers) and cpu_has_fused_bf16_kernel()
    for layer in layers:
        fused = (
            fused_available
            and not for_training
            and layer.compute_dtype == torch.bfloat16
            and bool(getattr(layer, "support_avx512bf16_for_cpu", False))
        )
        layer.support_avx512bf16_for_cpu = fused
        # Unpacked in any case: a fused layer repacks itself on its next forward, and until then
        # its state dict (hashed for the eval cache identity) never goes through bitsandbytes'
        # own inverse, which scrambles the scales of weights without double quantisation.
        _unpack_if_packed(layer)
    return bnb_cpu_path(model)


def _unpack_if_packed(layer) -> None:
    state = getattr(layer.weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    data, state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)
    if state.absmax.dim() == 2:
        # bitsandbytes 0.50.2 restores the scales' layout only for double-quantised weights; the
        # plain ones stay in the repacked (blocks, out_features) bf16 layout.
        state.absmax = state.absmax.T.reshape(-1).float()
    layer.weight.data, layer.weight.quant_state = data, state


def bnb_cpu_path(model) -> str | None:
    """The CPU path of ``model``'s 4-bit layers as configured now: ``"fused_bf16"``,
    ``"dequantize (<compute dtype>)"`` (comma-joined if layers differ), or None without any."""
    paths = set()
    for layer in _cpu_layers(model):
        if getattr(layer, "support_avx512bf16_for_cpu", False):
            paths.add(FUSED_BF16)
        else:
            dtype = str(layer.compute_dtype or "input dtype").removeprefix("torch.")
            paths.add(f"{DEQUANTIZE} ({dtype})")
    return ", ".join(sorted(paths)) or None
