"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90 (no GPU needed), so that
code the interpreter accepts but the GPU compiler rejects fails CI.

Why a subprocess: under TRITON_INTERPRET=1 (set by conftest.py for the whole pytest process)
`triton.jit` returns interpreter objects, for our kernels and for triton's own library functions
(`tl.max`, `tl.cdiv`, ...) alike, and `triton.compile` needs the real `JITFunction`s. Unsetting
the variable afterwards does not turn those objects back, so this module runs itself as a script
(`python tests/kernels/test_aot.py 80`) with the variable removed, once per architecture, both in
parallel; the script prints one JSON line per compile and the tests below read them.

Each job calls the real wrapper (`paged_attention` / `reshape_and_cache`) on small CPU tensors laid
out as the model lays them out, with the kernels swapped for recorders. So every compile uses
exactly the launch the wrapper would make: its constexprs (checked equal to `kernel_constexprs` /
`reduce_constexprs`, with upcast off, as on a GPU) and its arguments specialised the way the JIT
specialises them at launch (unit strides become constants, 16-divisible pointers and ints get
divisibility hints). The jobs cover fp32/fp16/bf16, head_dim 64/80/96/128/256, block_size 16/32,
GQA 1/2/4/7/8, sliding window on and off, and split-KV on and off. The dequantize-GEMM's jobs
(`GemmJob`, calling `linear_blocks`) cover fp32/fp16/bf16 x, 4-bit and 8-bit weights, mins and
bias on and off, and the three tile shapes (decode M = 1, M = 24, prefill M = 512) at the
shapes of a small model's projections (K = 576 / N = 1536 and K = 1536 / N = 576).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

REPO = Path(__file__).resolve().parents[2]
ARCHS = (80, 90)
MARK = "AOT-RESULT "
# The most shared memory one block may use (opt-in): A100 (sm_80) and H100 (sm_90).
MAX_SHARED = {80: 166912, 90: 232448}


@dataclass(frozen=True)
class Job:
    kernel: str  # "attention" (single pass), "split" (split-KV + reduce) or "cache"
    dtype: str
    head_dim: int
    block_size: int
    group: int = 1  # query heads per KV head ("cache": the number of KV heads)
    window: int | None = None
    num_splits: int = 1
    archs: tuple[int, ...] = ARCHS

    @property
    def id(self) -> str:
        parts = [self.kernel, self.dtype, f"d{self.head_dim}", f"bs{self.block_size}",
                 f"{'kv' if self.kernel == 'cache' else 'g'}{self.group}"]
        if self.window:
            parts.append(f"win{self.window}")
        if self.kernel == "split":
            parts.append(f"splits{self.num_splits}")
        return "-".join(parts)


JOBS = [
    # single-pass attention
    Job("attention", "fp16", 128, 16, 4),
    Job("attention", "bf16", 128, 32, 8, window=4096),
    Job("attention", "fp16", 80, 32, 2, window=64),
    Job("attention", "bf16", 64, 16, 1, archs=(90,)),
    Job("attention", "fp32", 256, 16, 2, archs=(80,)),
    Job("attention", "bf16", 256, 32, 4, window=128, archs=(80,)),
    Job("attention", "fp32", 64, 32, 8, window=100, archs=(90,)),
    Job("attention", "fp16", 96, 16, 7, archs=(90,)),
    # split-KV (16 is what `choose_num_splits` picks) and its reduce
    Job("split", "bf16", 128, 16, 4, num_splits=16),
    Job("split", "fp16", 80, 32, 8, window=64, num_splits=16),
    Job("split", "fp32", 64, 16, 1, num_splits=4, archs=(80,)),
    Job("split", "bf16", 256, 32, 2, window=4096, num_splits=16, archs=(90,)),
    # KV-cache write (group = number of KV heads)
    Job("cache", "bf16", 128, 16, 8),
    Job("cache", "fp32", 80, 32, 2, archs=(80,)),
    Job("cache", "fp16", 64, 16, 1, archs=(90,)),
]


@dataclass(frozen=True)
class GemmJob:
    """One `linear_blocks` launch: x [num_tokens, in_features] @ w.T, w [out_features,
    in_features] in blocks of 32 (`bits` 4: nibbles; 8: int8)."""
    kernel: ClassVar[str] = "gemm"
    dtype: str
    num_tokens: int
    in_features: int
    out_features: int
    bits: int
    mins: bool = False
    bias: str | None = None  # the bias dtype ("fp32" or x's), None: no bias
    archs: tuple[int, ...] = ARCHS

    @property
    def id(self) -> str:
        parts = [self.kernel, self.dtype, f"m{self.num_tokens}", f"k{self.in_features}",
                 f"n{self.out_features}", f"q{self.bits}"]
        if self.mins:
            parts.append("mins")
        if self.bias:
            parts.append(f"bias{self.bias}")
        return "-".join(parts)


GEMM_JOBS = [
    GemmJob("fp16", 1, 576, 1536, 4, mins=True),
    GemmJob("bf16", 512, 1536, 576, 4, bias="fp32"),
    GemmJob("fp32", 1, 1536, 576, 8, bias="fp32"),
    GemmJob("fp32", 512, 576, 1536, 8, mins=True, bias="fp32"),
    GemmJob("fp32", 512, 1536, 576, 4, mins=True),
    GemmJob("bf16", 1, 576, 1536, 8, mins=True, archs=(90,)),
    GemmJob("fp16", 512, 576, 1536, 8, bias="fp16", archs=(80,)),
    GemmJob("fp16", 24, 1536, 576, 8, mins=True, archs=(90,)),
    GemmJob("bf16", 24, 576, 1536, 8, bias="bf16", archs=(80,)),
    GemmJob("bf16", 24, 1536, 576, 4, mins=True, archs=(90,)),
]
ALL_JOBS: list = JOBS + GEMM_JOBS
# What each job compiles (the reduce is a second kernel of a split job).
KERNELS_OF = {"attention": ("paged_attention_kernel",),
              "split": ("paged_attention_split_kernel", "reduce_splits_kernel"),
              "cache": ("reshape_and_cache_kernel",),
              "gemm": ("linear_blocks_kernel",)}
COMPILES = [(job, arch, name) for job in ALL_JOBS for arch in job.archs
            for name in KERNELS_OF[job.kernel]]


def compile_id(job: Job | GemmJob, arch: int, name: str) -> str:
    return f"{name}-sm{arch}-{job.id}"


# ----------------------------------------------------------------------------- the worker


def _capture_launches(job: Job | GemmJob) -> list[tuple[object, dict]]:
    """Call the wrapper with the kernels swapped for recorders; return (kernel, bound args)."""
    import importlib

    pa = importlib.import_module("pagedserve_kernels.paged_attention")
    rc = importlib.import_module("pagedserve_kernels.reshape_and_cache")
    qg = importlib.import_module("pagedserve_kernels.quant_gemm")
    captured: list[tuple[object, dict]] = []

    class Recorder:
        def __init__(self, fn) -> None:
            self.fn = fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                captured.append((self.fn, self.fn.signature.bind(*args, **kwargs).arguments))
            return launch

    originals = {(module, name): getattr(module, name) for module in (pa, rc, qg)
                 for name in vars(module) if name.endswith("_kernel")}
    for (module, name), fn in originals.items():
        setattr(module, name, Recorder(fn))
    try:
        if isinstance(job, GemmJob):
            return _call_gemm(job, qg, captured)
        return _call_wrapper(job, pa, rc, captured)
    finally:
        for (module, name), fn in originals.items():
            setattr(module, name, fn)


def _call_wrapper(job: Job, pa, rc, captured: list) -> list[tuple[object, dict]]:
    import torch

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[job.dtype]
    bs, d = job.block_size, job.head_dim
    if job.kernel == "cache":
        kv_heads, heads, tokens = job.group, 4 * job.group, 5
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d).to(dtype)  # a fused projection
        q_size, kv_size = heads * d, kv_heads * d
        key = qkv[:, q_size:q_size + kv_size].view(tokens, kv_heads, d)
        value = qkv[:, q_size + kv_size:].view(tokens, kv_heads, d)
        caches = [torch.zeros(4, bs, kv_heads, d, dtype=dtype) for _ in range(2)]
        rc.reshape_and_cache(key, value, *caches, torch.arange(tokens))
        _check_constexprs(captured[0][1], rc.kernel_constexprs(kv_heads, d, bs))
        return captured

    kv_heads = 2
    heads = kv_heads * job.group
    seqs = [(7, 1), (40, 1)] if job.kernel == "split" else [(0, 9), (40, 1), (16, 3)]
    tokens = sum(q for _, q in seqs)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d).to(dtype)
    query = qkv[:, :heads * d].view(tokens, heads, d)
    caches = [torch.zeros(8, bs, kv_heads, d, dtype=dtype) for _ in range(2)]
    table = torch.arange(len(seqs) * 4, dtype=torch.int32).view(len(seqs), 4) % 8
    seq_lens = torch.tensor([c + q for c, q in seqs], dtype=torch.int32)
    starts = torch.tensor([0] + [q for _, q in seqs], dtype=torch.int32).cumsum(0)
    pa.paged_attention(query, *caches, table, seq_lens, starts.to(torch.int32), d ** -0.5,
                       sliding_window=job.window, num_splits=job.num_splits)
    _check_constexprs(captured[0][1], pa.kernel_constexprs(heads, kv_heads, d, bs, job.window,
                                                           False, job.num_splits))
    if job.kernel == "split":
        _check_constexprs(captured[1][1], pa.reduce_constexprs(heads, d, job.num_splits))
    return captured


def _call_gemm(job: GemmJob, qg, captured: list) -> list[tuple[object, dict]]:
    import torch

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    m, k, n = job.num_tokens, job.in_features, job.out_features
    x = torch.randn(m, k).to(dtypes[job.dtype])
    if job.bits == 4:
        values = qg.pack_nibbles(torch.randint(0, 16, (n, k), dtype=torch.uint8))
    else:
        values = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    scales = torch.rand(n, k // 32).half()
    mins = torch.randn(n, k // 32).half() if job.mins else None
    bias = torch.randn(n).to(dtypes[job.bias]) if job.bias else None
    qg.linear_blocks(x, values, scales, mins, bias)
    _check_constexprs(captured[0][1], qg.kernel_constexprs(m, k, job.bits == 4, job.mins,
                                                           bias is not None, False))
    return captured


def _check_constexprs(arguments: dict, expected: dict) -> None:
    """The wrapper launched with exactly the constexprs its `*_constexprs` function gives."""
    got = {name: arguments.get(name) for name in expected}
    assert got == expected, f"launched with {got}, *_constexprs says {expected}"


def _compile(fn, arguments: dict, arch: int):
    """Compile as the JIT would for these launch arguments, for a CUDA target `arch`."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    signature, constexprs, attrs = {}, {}, {}
    for i, (param, (name, value)) in enumerate(zip(fn.params, arguments.items())):
        assert param.name == name
        if param.is_constexpr:
            signature[name], constexprs[(i,)] = "constexpr", value
            continue
        ty, spec = native_specialize_impl(CUDABackend, value, False, True, True)
        signature[name] = ty
        if ty == "constexpr":  # an int equal to 1
            constexprs[(i,)] = spec
        elif isinstance(spec, str):
            attrs[(i,)] = CUDABackend.parse_attr(spec)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs),
                          target=GPUTarget("cuda", arch, 32))


def worker(arch: int) -> None:
    for job in ALL_JOBS:
        if arch not in job.archs:
            continue
        try:
            launches = _capture_launches(job)
            assert [fn.__name__ for fn, _ in launches] == list(KERNELS_OF[job.kernel])
        except Exception:  # every kernel of the job fails with this
            launches = [(None, traceback.format_exc())] * len(KERNELS_OF[job.kernel])
        for name, (fn, arguments) in zip(KERNELS_OF[job.kernel], launches):
            result = dict(id=compile_id(job, arch, name), ok=False)
            start = time.perf_counter()
            try:
                if fn is None:
                    raise RuntimeError(f"capturing the wrapper's launch failed:\n{arguments}")
                compiled = _compile(fn, arguments, arch)
                ptx = compiled.asm["ptx"]
                result.update(ok=True, shared=compiled.metadata.shared,
                              tf32=any(".tf32" in line for line in ptx.splitlines()
                                       if "mma" in line))
            except Exception:
                result["error"] = traceback.format_exc()[-4000:]
            result["seconds"] = round(time.perf_counter() - start, 2)
            print(MARK + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def aot_results() -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + env.get("PYTHONPATH", "").split(os.pathsep))
    procs = {arch: subprocess.Popen([sys.executable, __file__, str(arch)], cwd=REPO, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in ARCHS}
    results: dict[str, dict] = {}
    for arch, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        for line in stdout.splitlines():
            if line.startswith(MARK):
                result = json.loads(line[len(MARK):])
                results[result["id"]] = result
        results[f"stderr-sm{arch}"] = {"returncode": proc.returncode, "tail": stderr[-4000:]}
    return results


@pytest.mark.parametrize("job,arch,name", COMPILES,
                         ids=[compile_id(*c) for c in COMPILES])
def test_compiles(job, arch, name, aot_results):
    result = aot_results.get(compile_id(job, arch, name))
    worker_log = aot_results[f"stderr-sm{arch}"]
    assert result is not None, f"the sm_{arch} compile worker died: {worker_log}"
    assert result["ok"], result["error"]
    assert result["shared"] <= MAX_SHARED[arch], \
        f"needs {result['shared']} bytes of shared memory, sm_{arch} has {MAX_SHARED[arch]}"


FP32_DOTS = [c for c in COMPILES if c[0].dtype == "fp32" and c[0].kernel != "cache"
             and c[2] != "reduce_splits_kernel"]


@pytest.mark.parametrize("job,arch,name", FP32_DOTS, ids=[compile_id(*c) for c in FP32_DOTS])
def test_fp32_attention_does_not_use_tf32(job, arch, name, aot_results):
    """fp32 must stay fp32 on the GPU (rel. error < 1e-5): `tl.dot` on fp32 operands defaults to
    TF32 tensor cores (10-bit mantissa, ~1e-3 relative error) unless asked for "ieee"."""
    result = aot_results.get(compile_id(job, arch, name))
    assert result is not None and result["ok"], "did not compile (see test_compiles)"
    assert not result["tf32"], "fp32 tl.dot compiles to TF32 mma instructions"


def test_covers_every_kernel_on_both_archs():
    covered = {(name, arch, job.dtype) for job, arch, name in COMPILES}
    import importlib

    for module in ("pagedserve_kernels.paged_attention", "pagedserve_kernels.reshape_and_cache",
                   "pagedserve_kernels.quant_gemm"):
        names = [n for n in vars(importlib.import_module(module)) if n.endswith("_kernel")]
        for name in names:
            for arch in ARCHS:
                assert any((name, arch, dt) in covered for dt in ("fp32", "fp16", "bf16")), \
                    (name, arch)
    assert {job.head_dim for job in JOBS} >= {64, 80, 128, 256}
    assert {job.block_size for job in JOBS} == {16, 32}
    assert {job.group for job in JOBS if job.kernel != "cache"} >= {1, 2, 4, 8}
    for dtype in ("fp32", "fp16", "bf16"):
        assert {arch for job, arch, _ in COMPILES if job.dtype == dtype} == set(ARCHS)
        for bits in (4, 8):
            assert {arch for job, arch, _ in COMPILES if isinstance(job, GemmJob)
                    and (job.dtype, job.bits) == (dtype, bits)} == set(ARCHS), (dtype, bits)
    for arch in ARCHS:
        gemms = [job for job in GEMM_JOBS if arch in job.archs]
        assert {job.bits for job in gemms} == {4, 8}
        assert {job.mins for job in gemms} == {False, True}
        assert {job.bias is None for job in gemms} == {False, True}
        assert {1, 512} <= {job.num_tokens for job in gemms}


if __name__ == "__main__":
    worker(int(sys.argv[1]))
