"""The CPU's FLOP peaks, through kernels/csrc/peak_cpu.cpp: chains of vector FMAs (fp32) or of
AVX512_BF16 dot products (bf16) on registers, on every thread; the roofline's FLOP ceilings (a
machine's, not a library's)."""

from __future__ import annotations

import ctypes
import time

import torch

from pagedserve_kernels import native
from pagedserve_kernels.native import I32, I64, PTR

_NAME = "peak_cpu"
_SIGNATURES = {"pagedserve_fma_peak_f32": ([I64, I32, PTR], ctypes.c_double),
               "pagedserve_dot_peak_bf16": ([I64, I32, PTR], ctypes.c_double)}


def _peak(function: str, seconds: float, threads: int | None) -> float | None:
    lib = native.load(_NAME, _SIGNATURES)
    if lib is None:
        return None
    loop = getattr(lib, function)
    threads = threads or torch.get_num_threads()
    sink = ctypes.c_float(0.0)
    if loop(1, 1, ctypes.byref(sink)) == 0.0:  # not built for this CPU
        return None
    iters = 1 << 16
    while True:  # grow the run until it lasts long enough to time
        start = time.perf_counter()
        loop(iters, threads, ctypes.byref(sink))
        if time.perf_counter() - start >= seconds / 4 or iters >= 1 << 40:
            break
        iters *= 4
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        flops = loop(iters, threads, ctypes.byref(sink))
        best = max(best, flops / (time.perf_counter() - start))
    return best


def fma_peak_flops(seconds: float = 0.2, threads: int | None = None) -> float | None:
    """FLOP/s of the FMA loop on `threads` threads (torch's count by default), the best of three
    runs of between a quarter of `seconds` and `seconds` each; None where the kernel cannot be
    built."""
    return _peak("pagedserve_fma_peak_f32", seconds, threads)


def bf16_dot_peak_flops(seconds: float = 0.2, threads: int | None = None) -> float | None:
    """As fma_peak_flops, for the AVX512_BF16 dot-product loop; None also where this CPU (or the
    build) has no AVX512_BF16. AMX tiles, where a CPU has them, are not measured by it."""
    return _peak("pagedserve_dot_peak_bf16", seconds, threads)
