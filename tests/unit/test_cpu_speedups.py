"""The CPU-only speed-ups: oneDNN-prepacked linear weights and the malloc thresholds."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from server.model_runner.cpu_allocator import keep_freed_memory_mapped
from server.models.layers import packed_gemm as linear_mod
from server.models.layers.linear import Linear, pack_linear_weights
from server.models.layers.packed_gemm import PACKED_MIN_ROWS, SMALL_ROWS


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
    """The row counts `owner.name(x, ...)` is called with, from now on (it still runs)."""
    seen: list[int] = []
    real = getattr(owner, name)

    def spy(x, *args):
        seen.append((x if x is not None else args[0]).shape[0])
        return real(x, *args)

    monkeypatch.setattr(owner, name, spy)
    return seen


def test_packed_path_is_taken_only_from_min_rows(monkeypatch):
    layer = random_linear(32, 48)
    assert layer.pack()
    calls = rows_seen(monkeypatch, linear_mod, "_run_packed")
    layer(torch.randn(PACKED_MIN_ROWS - 1, 32))
    layer(torch.randn(PACKED_MIN_ROWS, 32))
    assert calls == [PACKED_MIN_ROWS]


PACKERS = {
    "mkl": lambda w: torch.ops.mkl._mkl_reorder_linear_weight(w, 64),
    "onednn": lambda w: torch.ops.mkldnn._reorder_linear_weight(w, None),
}


@pytest.mark.parametrize("kind", sorted(PACKERS))
def test_each_packer_matches_f_linear_at_any_row_count(kind):
    """MKL's copy is packed for one batch size and used for all: the layout must not depend
    on it. Row counts around SIMD and blocking edges, with and without bias."""
    torch.manual_seed(1)
    weight, bias = torch.randn(300, 160), torch.randn(300)
    try:
        packed = linear_mod.PackedWeight(kind, PACKERS[kind](weight))
    except (AttributeError, RuntimeError):
        pytest.skip(f"this torch build has no {kind} packer")
    for rows in (1, 3, 4, 15, 16, 17, 63, 64, 65, 129, 1000):
        x = torch.randn(rows, 320)[:, ::2]  # strided rows, as a column slice would give
        for b in (None, bias):
            torch.testing.assert_close(linear_mod._run_packed(x, weight, b, packed),
                                       F.linear(x, weight, b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_other_dtypes_stay_unpacked(dtype):
    layer = random_linear(16, 16).to(dtype)
    assert not layer.pack() and layer.packed is None
    x = torch.randn(8, 16, dtype=dtype)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_pack_linear_weights_counts_modules_and_the_model_hook():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = random_linear(8, 8), random_linear(8, 4)
            self.plain = torch.nn.Linear(8, 8)  # not ours: left alone

        def pack_weights(self, small):
            self.hook_small = small
            return 1

    model = Model()
    assert pack_linear_weights(model) == 3
    assert model.a.packed is not None and not hasattr(model.plain, "packed")
    assert model.hook_small is False and model.a.packed.small is None


def test_packing_is_skipped_when_the_copies_exceed_the_budget():
    model = torch.nn.Sequential(random_linear(64, 64), random_linear(64, 32))
    needed = sum(p.nbytes for p in model.parameters() if p.dim() == 2)
    assert pack_linear_weights(model, budget_bytes=needed - 1) == 0
    assert all(m.packed is None for m in model)
    assert pack_linear_weights(model, budget_bytes=needed) == 2


def test_small_row_copies_serve_their_rows(monkeypatch):
    from kernels import cpu_linear

    if not cpu_linear.available():
        pytest.skip("no C++ compiler: no small-row GEMM")
    torch.manual_seed(3)
    layer = random_linear(96, 200, bias=True)  # 200 outputs: the last column block is partial
    assert layer.pack(small=True) and layer.packed.small is not None
    used = rows_seen(monkeypatch, cpu_linear, "linear")
    lo, hi = SMALL_ROWS
    for rows in (lo, lo + 1, hi, hi + 1, 2 * hi):
        x = torch.randn(rows, 96)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias),
                                   rtol=1e-5, atol=1e-5)
    assert used == [lo, lo + 1, hi]


def test_the_row_limit_is_the_last_count_the_own_gemm_wins_at_in_a_row():
    from server.models.layers.packed_gemm import row_limit

    assert row_limit(lambda rows: True) == SMALL_ROWS[1]
    assert row_limit(lambda rows: rows <= 8) == 8
    assert row_limit(lambda rows: rows != 4) == 2  # a loss ends the run: 8 and up stay off
    assert row_limit(lambda rows: False) == 0


def test_the_measured_limit_decides_the_rows_and_the_compiled_step(monkeypatch):
    """With the measurement saying the own GEMM wins up to 8 rows, 9+ rows take torch's
    GEMM; saying it never wins, no small-row copy is made."""
    from kernels import cpu_linear
    from server.models.layers import packed_gemm

    if not cpu_linear.available():
        pytest.skip("no C++ compiler: no small-row GEMM")
    for forced, expected in (("8", [1, 8]), ("0", [])):
        monkeypatch.setenv("PAGEDSERVE_SMALL_GEMM_ROWS", forced)
        packed_gemm.own_rows_limit.cache_clear()
        layer = random_linear(96, 200, bias=True)
        assert layer.pack(small=True)
        assert layer.packed.small_max_rows == int(forced)
        assert (layer.packed.small is None) == (forced == "0")
        used = rows_seen(monkeypatch, cpu_linear, "linear")
        for rows in (1, 8, 9):
            x = torch.randn(rows, 96)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias),
                                       rtol=1e-5, atol=1e-5)
        assert used == expected
    packed_gemm.own_rows_limit.cache_clear()


def test_small_row_copies_are_dropped_first_when_over_budget():
    from kernels import cpu_linear

    if not cpu_linear.available():
        pytest.skip("no C++ compiler: no small-row GEMM")
    model = torch.nn.Sequential(random_linear(64, 64), random_linear(64, 32))
    needed = sum(p.nbytes for p in model.parameters() if p.dim() == 2)
    assert pack_linear_weights(model, budget_bytes=2 * needed - 1, small=True) == 2
    assert all(m.packed is not None and m.packed.small is None for m in model)
    assert pack_linear_weights(model, budget_bytes=2 * needed, small=True) == 2
    assert all(m.packed.small is not None for m in model)


def test_tied_logits_head_uses_a_packed_embedding(tmp_path):
    from server import LLM
    from tests.model_factory import make_tiny_model

    model_dir = make_tiny_model(tmp_path, "qwen2")  # tied embeddings
    llm = LLM(str(model_dir), dtype="float32", device="cpu")
    model = llm.engine.runner.model
    assert model.lm_head.proj is None and model.lm_head._tied_packed is not None
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
    from kernels import cpu_fused
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
