"""The CPU-only speed-ups: the GEMM copies of linear weights (which one serves a row count is
tests/unit/test_gemm_choice.py's) and the malloc thresholds."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from pagedserve_kernels import cpu_linear
from server.model_runner.cpu_allocator import keep_freed_memory_mapped
from server.models.layers import packed_gemm as linear_mod
from server.models.layers.linear import Linear, pack_linear_weights
from server.models.layers.packed_gemm import PACKED_MIN_ROWS, GemmPolicy


def random_linear(input_size: int, output_size: int, bias: bool = False) -> Linear:
    """A Linear (created empty, as the loader fills it) with random weights."""
    layer = Linear(input_size, output_size, bias=bias)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, input_size ** -0.5)
    return layer


@pytest.mark.parametrize("rows", [1, PACKED_MIN_ROWS - 1, PACKED_MIN_ROWS, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(rows, bias):
    torch.manual_seed(rows)
    layer = random_linear(96, 200, bias=bias)
    x = torch.randn(rows, 96)
    expected = F.linear(x, layer.weight, layer.bias)
    assert layer.pack()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def rows_seen(monkeypatch, owner, name: str) -> list[int]:
    """The row counts `owner.name(...)` is called with, from now on (it still runs): the first
    tensor argument's rows."""
    seen: list[int] = []
    real = getattr(owner, name)

    def spy(*args):
        seen.append(next(a for a in args if isinstance(a, torch.Tensor)).shape[0])
        return real(*args)

    monkeypatch.setattr(owner, name, spy)
    return seen


def test_packed_path_is_taken_from_the_bucket_of_min_rows(monkeypatch):
    """Unmeasured: F.linear up to the bucket below PACKED_MIN_ROWS (buckets are powers of 2)."""
    layer = random_linear(32, 48)
    assert layer.pack()
    calls = rows_seen(monkeypatch, linear_mod, "_run")
    for rows in (PACKED_MIN_ROWS // 2, PACKED_MIN_ROWS // 2 + 1, PACKED_MIN_ROWS):
        layer(torch.randn(rows, 32))
    assert calls == [PACKED_MIN_ROWS // 2 + 1, PACKED_MIN_ROWS]


@pytest.mark.parametrize("kind", ["mkl", "onednn"])
def test_each_packer_matches_f_linear_at_any_row_count(kind):
    """MKL's copy is packed for one batch size and used for all: the layout must not depend
    on it. Row counts around SIMD and blocking edges, with and without bias."""
    torch.manual_seed(1)
    weight, bias = torch.randn(300, 160), torch.randn(300)
    try:
        copy = linear_mod._pack(kind, weight)
    except (AttributeError, RuntimeError):
        pytest.skip(f"this torch build has no {kind} packer")
    for rows in (1, 3, 4, 15, 16, 17, 63, 64, 65, 129, 1000):
        x = torch.randn(rows, 320)[:, ::2]  # strided rows, as a column slice would give
        for b in (None, bias):
            torch.testing.assert_close(linear_mod._run(kind, x, weight, b, copy),
                                       F.linear(x, weight, b), rtol=1e-5, atol=1e-4)


def test_fp16_stays_unpacked():
    layer = random_linear(16, 16).to(torch.float16)
    assert not layer.pack() and layer.packed is None
    x = torch.randn(8, 16, dtype=torch.float16)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_bf16_weights_get_a_library_copy(monkeypatch):
    """bf16: no MKL (fp32 only), so its unmeasured table takes oneDNN from PACKED_MIN_ROWS."""
    torch.manual_seed(4)
    layer = random_linear(64, 80, bias=True).to(torch.bfloat16)
    if not layer.pack():
        pytest.skip("this torch build has no oneDNN packer")
    assert layer.packed.library == "onednn" and layer.packed.own is None
    used = rows_seen(monkeypatch, linear_mod, "_run")
    for rows in (1, PACKED_MIN_ROWS, 100):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias),
                                   rtol=2e-2, atol=2e-2)
    assert used == [PACKED_MIN_ROWS, 100]


def test_pack_linear_weights_counts_modules_and_the_model_hook():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = random_linear(8, 8), random_linear(8, 4)
            self.plain = torch.nn.Linear(8, 8)  # not ours: left alone

        def pack_weights(self, policy):
            self.hook_policy = policy
            return 1

    model = Model()
    assert pack_linear_weights(model) == 3
    assert model.a.packed is not None and not hasattr(model.plain, "packed")
    assert model.hook_policy == GemmPolicy() and model.a.packed.own is None


def test_packing_is_skipped_when_the_copies_exceed_the_budget():
    model = torch.nn.Sequential(random_linear(64, 64), random_linear(64, 32))
    needed = sum(p.nbytes for p in model.parameters() if p.dim() == 2)
    assert pack_linear_weights(model, budget_bytes=needed - 1) == 0
    assert all(m.packed is None for m in model)
    assert pack_linear_weights(model, budget_bytes=needed) == 2


needs_own = pytest.mark.skipif(not cpu_linear.available(), reason="no C++ compiler: no own GEMM")
OWN = GemmPolicy(own=True)


@needs_own
def test_own_copies_serve_their_rows(monkeypatch):
    torch.manual_seed(3)
    layer = random_linear(96, 200, bias=True)  # 200 outputs: the last column block is partial
    assert layer.pack(OWN) and layer.packed.own is not None
    assert layer.packed.own_rows == 64  # tests/conftest.py's PAGEDSERVE_SMALL_GEMM_ROWS
    used = rows_seen(monkeypatch, cpu_linear, "linear")
    for rows in (1, 2, 64, 65, 128):
        x = torch.randn(rows, 96)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias),
                                   rtol=1e-5, atol=1e-5)
    assert used == [1, 2, 64]


@needs_own
def test_the_unmeasured_limit_decides_the_rows(monkeypatch):
    """PAGEDSERVE_SMALL_GEMM_ROWS=8: 9+ rows take a library's GEMM; 0: no own copy."""
    for forced, expected in (("8", [1, 8]), ("0", [])):
        monkeypatch.setenv("PAGEDSERVE_SMALL_GEMM_ROWS", forced)
        linear_mod.gemm_table.cache_clear()
        layer = random_linear(96, 200, bias=True)
        assert layer.pack(OWN)
        assert layer.packed.own_rows == int(forced)
        assert (layer.packed.own is None) == (forced == "0")
        used = rows_seen(monkeypatch, cpu_linear, "linear")
        for rows in (1, 8, 9):
            x = torch.randn(rows, 96)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias),
                                       rtol=1e-5, atol=1e-5)
        assert used == expected
    linear_mod.gemm_table.cache_clear()


@needs_own
def test_own_copies_are_dropped_first_when_over_budget():
    model = torch.nn.Sequential(random_linear(64, 64), random_linear(64, 32))
    needed = sum(p.nbytes for p in model.parameters() if p.dim() == 2)
    assert pack_linear_weights(model, budget_bytes=2 * needed - 1, policy=OWN) == 2
    assert all(m.packed is not None and m.packed.own is None for m in model)
    assert pack_linear_weights(model, budget_bytes=2 * needed, policy=OWN) == 2
    assert all(m.packed.own is not None for m in model)


def test_tied_logits_head_uses_a_packed_embedding(tmp_path):
    from server import LLM
    from tests.model_factory import make_tiny_model

    model_dir = make_tiny_model(tmp_path, "qwen2")  # tied embeddings
    llm = LLM(str(model_dir), dtype="float32", device="cpu")
    model = llm.engine.runner.model
    assert model.lm_head.proj is None and model.lm_head.packed is not None
    hidden = torch.randn(PACKED_MIN_ROWS + 3, model.config.hidden_size)
    torch.testing.assert_close(model.compute_logits(hidden),
                               F.linear(hidden, model.model.embed_tokens.weight),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_thresholds_apply_and_are_idempotent():
    assert keep_freed_memory_mapped()
    assert keep_freed_memory_mapped()


def test_available_memory_is_capped_by_a_cgroup_limit(tmp_path):
    from server.model_runner.runner import _available_memory_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert _available_memory_bytes(str(meminfo), str(cgroup)) == 20000000 * 1024
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("1000\n")
    assert _available_memory_bytes(str(meminfo), str(cgroup)) == 20000000 * 1024
    (cgroup / "memory.max").write_text(f"{4 << 30}\n")
    (cgroup / "memory.current").write_text(f"{1 << 30}\n")
    assert _available_memory_bytes(str(meminfo), str(cgroup)) == 3 << 30
    assert _available_memory_bytes(str(tmp_path / "none"), str(tmp_path / "none")) is None


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fused_cpu_ops_follow_the_backend_and_keep_the_tokens(tmp_path, monkeypatch, arch):
    """backend auto on fp32 CPU fuses norms, SiLU-and-mul and rotary (kernels.cpu_fused);
    backend torch keeps torch ops; greedy tokens agree."""
    from pagedserve_kernels import cpu_fused
    from server import LLM, SamplingParams
    from server.models.layers.norm import RMSNorm
    from tests.model_factory import make_tiny_model

    if not cpu_fused.available():
        pytest.skip("no C++ compiler: the fused ops are not built")
    model_dir = make_tiny_model(tmp_path, arch)
    prompts = [[5, 9, 13, 2, 40], [7] * 19]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    tokens = {}
    for backend in ("auto", "torch"):
        llm = LLM(str(model_dir), dtype="float32", device="cpu", attention_backend=backend,
                  kv_cache_memory=1 << 22)
        norms = [m for m in llm.engine.runner.model.modules() if isinstance(m, RMSNorm)]
        assert {m.backend for m in norms} == {"cpu" if backend == "auto" else "torch"}
        calls = {name: rows_seen(monkeypatch, cpu_fused, name)
                 for name in ("add_rms_norm", "silu_and_mul", "rotary_")}
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(
            [{"prompt_token_ids": p} for p in prompts], params)]
        assert all(bool(seen) == (backend == "auto") for seen in calls.values()), calls
        monkeypatch.undo()
    assert tokens["auto"] == tokens["torch"]


def test_cpu_engine_takes_the_cpu_token_budget():
    from server import LLM
    from server.config import DEFAULT_MAX_NUM_BATCHED_TOKENS

    engine = LLM(kv_cache_memory=1 << 24).engine
    assert engine.scheduler.token_budget == DEFAULT_MAX_NUM_BATCHED_TOKENS["cpu"]
    given = LLM(kv_cache_memory=1 << 24, max_num_batched_tokens=64).engine
    assert given.scheduler.token_budget == 64
