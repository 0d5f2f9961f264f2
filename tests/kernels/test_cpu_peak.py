"""The peak loops (kernels/cpu_peak.py: fp32 FMAs, bf16 dot products) count the FLOPs they run
and report a rate; how fast this machine is does not matter here."""

from __future__ import annotations

import ctypes

import pytest

from pagedserve_kernels import cpu_peak, native


@pytest.fixture
def lib() -> ctypes.CDLL:
    built = native.load(cpu_peak._NAME, cpu_peak._SIGNATURES)
    if built is None:
        pytest.skip("no C++ compiler here")
    return built


def flops_of(loop, threads: int) -> tuple[float, float]:
    """FLOPs that 10 iterations count on `threads` threads, and the sink they left."""
    sink = ctypes.c_float(0.0)
    return loop(10, threads, ctypes.byref(sink)), sink.value


def test_the_flops_are_counted_per_thread_and_chain(lib):
    one, sink = flops_of(lib.pagedserve_fma_peak_f32, 1)
    assert one in (2 * 12 * 8 * 10, 2 * 12 * 16 * 10)  # 12 chains of 8 or 16 lanes
    assert flops_of(lib.pagedserve_fma_peak_f32, 2)[0] == 2 * one
    assert sink != 0.0


def test_a_rate_comes_back():
    rate = cpu_peak.fma_peak_flops(seconds=0.01, threads=1)
    if native.load(cpu_peak._NAME, cpu_peak._SIGNATURES) is None:
        assert rate is None
    else:
        assert rate is not None and rate > 0


def _has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read().split()
    except OSError:
        return False


def test_the_bf16_loop_runs_where_the_cpu_has_avx512_bf16(lib):
    one, sink = flops_of(lib.pagedserve_dot_peak_bf16, 1)
    rate = cpu_peak.bf16_dot_peak_flops(seconds=0.01, threads=1)
    if not _has_avx512_bf16():
        assert one == 0.0 and rate is None
        return
    assert one == 64 * 16 * 10  # 16 chains of 16 lanes, 2 products a lane
    assert flops_of(lib.pagedserve_dot_peak_bf16, 2)[0] == 2 * one
    assert sink != 0.0
    assert rate is not None and rate > 0
