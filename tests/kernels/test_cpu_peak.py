"""The FMA-peak loop (kernels/cpu_peak.py) counts the FLOPs it runs and reports a rate; how
fast this machine is does not matter here."""

from __future__ import annotations

import ctypes

import pytest

from kernels import cpu_peak, native


def test_the_flops_are_counted_per_thread_and_chain():
    lib = native.load(cpu_peak._NAME, cpu_peak._SIGNATURES)
    if lib is None:
        pytest.skip("no C++ compiler here")
    sink = ctypes.c_float(0.0)
    one = lib.pagedserve_fma_peak_f32(10, 1, ctypes.byref(sink))
    assert one in (2 * 12 * 8 * 10, 2 * 12 * 16 * 10)  # 12 chains of 8 or 16 lanes
    assert lib.pagedserve_fma_peak_f32(10, 2, ctypes.byref(sink)) == 2 * one
    assert sink.value != 0.0


def test_a_rate_comes_back():
    rate = cpu_peak.fma_peak_flops(seconds=0.01, threads=1)
    if native.load(cpu_peak._NAME, cpu_peak._SIGNATURES) is None:
        assert rate is None
    else:
        assert rate is not None and rate > 0
