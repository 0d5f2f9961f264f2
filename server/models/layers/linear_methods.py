"""The `quantization` config field -> its LinearMethod (server/config.py's QUANTIZATIONS):
"none" the checkpoint's own dtype; "int8" every linear weight as 8-bit blocks, quantized at
load; "gguf" a GGUF file's quantized blocks kept as blocks (what a GGUF model gets with "none")."""

from __future__ import annotations

from collections.abc import Callable

from server.models.layers.linear import LinearMethod, UnquantizedLinearMethod
from server.models.layers.quantized_linear import Int8LinearMethod

QUANTIZATION_METHODS: dict[str, Callable[[], LinearMethod]] = {
    "none": UnquantizedLinearMethod,
    "int8": lambda: Int8LinearMethod(quantize_floats=True),
    "gguf": lambda: Int8LinearMethod(quantize_floats=False),
}


def get_linear_method(quantization: str) -> LinearMethod:
    try:
        return QUANTIZATION_METHODS[quantization]()
    except KeyError:
        raise ValueError(f"quantization {quantization!r} is not supported; supported: "
                         f"{', '.join(QUANTIZATION_METHODS)}") from None
