"""The `quantization` config field -> its LinearMethod (server/config.py's QUANTIZATIONS):
"none" the checkpoint's own dtype; "int8" every linear weight as 8-bit blocks, quantized at
load; "gguf", "gptq", "awq" a GGUF file's or a GPTQ/AWQ checkpoint's quantized blocks kept as
blocks (what such a checkpoint gets with "none"), its float tensors float."""

from __future__ import annotations

from collections.abc import Callable

from server.models.layers.linear import LinearMethod, UnquantizedLinearMethod
from server.models.layers.quantized_linear import Int8LinearMethod

QUANTIZATION_METHODS: dict[str, Callable[[str], LinearMethod]] = {
    "none": lambda gemm: UnquantizedLinearMethod(),
    "int8": lambda gemm: Int8LinearMethod(quantize_floats=True, gemm=gemm),
    "gguf": lambda gemm: Int8LinearMethod(quantize_floats=False, gemm=gemm),
    "gptq": lambda gemm: Int8LinearMethod(quantize_floats=False, gemm=gemm),
    "awq": lambda gemm: Int8LinearMethod(quantize_floats=False, gemm=gemm),
}


def get_linear_method(quantization: str, gemm: str = "auto") -> LinearMethod:
    """`gemm` "triton": blocks computed by the Triton GEMM on any device (on CPU tensors under
    TRITON_INTERPRET=1, as attention_backend "triton" runs the attention kernels)."""
    try:
        method = QUANTIZATION_METHODS[quantization]
    except KeyError:
        raise ValueError(f"quantization {quantization!r} is not supported; supported: "
                         f"{', '.join(QUANTIZATION_METHODS)}") from None
    return method(gemm)
