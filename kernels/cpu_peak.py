"""The CPU's fp32 FMA peak, through kernels/csrc/peak_cpu.cpp: chains of vector FMAs on
registers, on every thread; the roofline's FLOP ceiling (a machine's, not a library's)."""

from __future__ import annotations

import ctypes
import time

import torch

from kernels import native
from kernels.native import I32, I64, PTR

_NAME = "peak_cpu"
_SIGNATURES = {"pagedserve_fma_peak_f32": ([I64, I32, PTR], ctypes.c_double)}


def fma_peak_flops(seconds: float = 0.2, threads: int | None = None) -> float | None:
    """FLOP/s of the FMA loop on `threads` threads (torch's count by default), the best of three
    runs of between a quarter of `seconds` and `seconds` each; None where the kernel cannot be
    built."""
    lib = native.load(_NAME, _SIGNATURES)
    if lib is None:
        return None
    threads = threads or torch.get_num_threads()
    sink = ctypes.c_float(0.0)
    iters = 1 << 16
    while True:  # grow the run until it lasts long enough to time
        start = time.perf_counter()
        lib.pagedserve_fma_peak_f32(iters, threads, ctypes.byref(sink))
        if time.perf_counter() - start >= seconds / 4 or iters >= 1 << 40:
            break
        iters *= 4
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        flops = lib.pagedserve_fma_peak_f32(iters, threads, ctypes.byref(sink))
        best = max(best, flops / (time.perf_counter() - start))
    return best
