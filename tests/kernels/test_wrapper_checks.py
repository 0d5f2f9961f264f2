"""The Triton wrappers reject bad arguments with a clear ValueError before launching anything,
and compute their grids from shapes alone (no device tensor is read back to the host)."""

from __future__ import annotations

import importlib

import pytest
import torch

from pagedserve_kernels import ops

pa = importlib.import_module("pagedserve_kernels.paged_attention")
rc = importlib.import_module("pagedserve_kernels.reshape_and_cache")

NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEADS, HEAD_DIM = 6, 16, 2, 4, 64


def attention_args(device: str = "cpu", seqs=((0, 3), (5, 1), (16, 2))) -> dict:
    """A small valid mixed batch; each test breaks one thing."""
    g = torch.Generator().manual_seed(0)
    num_tokens = sum(q for _, q in seqs)
    cache_shape = (NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    q_lens = torch.tensor([q for _, q in seqs], dtype=torch.int32)
    args = dict(
        query=torch.randn(num_tokens, HEADS, HEAD_DIM, generator=g),
        key_cache=torch.randn(*cache_shape, generator=g),
        value_cache=torch.randn(*cache_shape, generator=g),
        block_table=torch.randperm(NUM_BLOCKS, generator=g)[:len(seqs) * 2]
        .view(len(seqs), 2).to(torch.int32),
        seq_lens=torch.tensor([c + q for c, q in seqs], dtype=torch.int32),
        query_start_loc=torch.cat([torch.zeros(1, dtype=torch.int32),
                                   torch.cumsum(q_lens, 0, dtype=torch.int32)]),
        scale=HEAD_DIM ** -0.5,
    )
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def strided_like(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values, different strides."""
    return torch.cat([t, t], dim=-1)[..., ::2]


ATTENTION_CASES = {
    "query 2-D": (dict(query=lambda a: a["query"][0]), r"query must be \[num_tokens, num_heads"),
    "query 4-D": (dict(query=lambda a: a["query"][None]), r"query must be"),
    "caches 3-D": (dict(key_cache=lambda a: a["key_cache"][0],
                        value_cache=lambda a: a["value_cache"][0]),
                   r"key_cache and value_cache must be \[num_blocks, block_size"),
    "cache shapes differ": (dict(value_cache=lambda a: a["value_cache"][:-1]),
                            r"key_cache and value_cache must be .* and equal"),
    "cache strides differ": (dict(value_cache=lambda a: strided_like(a["value_cache"])),
                             r"must share strides"),
    "head_dim mismatch": (dict(query=lambda a: torch.randn(6, HEADS, 80)),
                          r"head_dim differs: query 80, cache 64"),
    "heads not a multiple of kv heads": (dict(query=lambda a: torch.randn(6, 3, HEAD_DIM)),
                                         r"num_heads \(3\) must be a multiple of num_kv_heads"
                                         r" \(2\)"),
    "block_table int64": (dict(block_table=lambda a: a["block_table"].long()),
                          r"block_table must be a 2-D int32 tensor, got torch.int64"),
    "block_table 1-D": (dict(block_table=lambda a: a["block_table"][0]),
                        r"block_table must be a 2-D int32"),
    "seq_lens int64": (dict(seq_lens=lambda a: a["seq_lens"].long()),
                       r"seq_lens must be int32 \[num_seqs=3\], got torch.int64"),
    "seq_lens length": (dict(seq_lens=lambda a: a["seq_lens"][:2]), r"seq_lens must be int32"),
    "query_start_loc int64": (dict(query_start_loc=lambda a: a["query_start_loc"].long()),
                              r"query_start_loc must be int32 \[num_seqs \+ 1=4\], got "
                              r"torch.int64"),
    "query_start_loc length": (dict(query_start_loc=lambda a: a["query_start_loc"][1:]),
                               r"query_start_loc must be int32"),
    "float64": (dict(query=lambda a: a["query"].double(),
                     key_cache=lambda a: a["key_cache"].double(),
                     value_cache=lambda a: a["value_cache"].double()),
                r"query dtype must be float32, float16 or bfloat16, got torch.float64"),
    "cache dtype differs": (dict(key_cache=lambda a: a["key_cache"].half(),
                                 value_cache=lambda a: a["value_cache"].half()),
                            r"cache dtype torch.float16 differs from query dtype torch.float32"),
    "out shape": (dict(out=lambda a: torch.empty(5, HEADS, HEAD_DIM)), r"out must match query"),
    "out dtype": (dict(out=lambda a: torch.empty_like(a["query"], dtype=torch.bfloat16)),
                  r"out must match query"),
    "block_table on another device": (dict(block_table=lambda a: a["block_table"].to("meta")),
                                      r"all tensors must be on one device, got \['cpu', 'meta'\]"),
    "caches on another device": (dict(key_cache=lambda a: a["key_cache"].to("meta"),
                                      value_cache=lambda a: a["value_cache"].to("meta")),
                                 r"all tensors must be on one device"),
    "out on another device": (dict(out=lambda a: torch.empty_like(a["query"], device="meta")),
                              r"all tensors must be on one device"),
    "split-KV for a non-decode batch": (dict(num_splits=lambda a: 4),
                                        r"split-KV needs a decode-only batch"),
    "block_size 8": (dict(key_cache=lambda a: a["key_cache"].view(12, 8, KV_HEADS, HEAD_DIM),
                          value_cache=lambda a: a["value_cache"].view(12, 8, KV_HEADS, HEAD_DIM)),
                     r"needs block_size >= 16, got 8"),
    "unknown backend": (dict(backend=lambda a: "cuda"),
                        r"backend must be one of auto, torch, cpu, triton, got 'cuda'"),
}


@pytest.mark.parametrize("change,match", ATTENTION_CASES.values(), ids=ATTENTION_CASES.keys())
def test_paged_attention_rejects(change, match, launches):
    args = attention_args()
    args |= {k: f(args) for k, f in change.items()}
    args.setdefault("backend", "triton")
    with pytest.raises(ValueError, match=match):
        ops.paged_attention(**args)
    assert launches.launches == []


def cache_args(device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(1)
    shape = (NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    args = dict(key=torch.randn(5, KV_HEADS, HEAD_DIM, generator=g),
                value=torch.randn(5, KV_HEADS, HEAD_DIM, generator=g),
                key_cache=torch.randn(*shape, generator=g),
                value_cache=torch.randn(*shape, generator=g),
                slot_mapping=torch.tensor([3, -1, 17, 40, 95]))
    return {k: v.to(device) for k, v in args.items()}


CACHE_CASES = {
    "key 2-D": (dict(key=lambda a: a["key"][0], value=lambda a: a["value"][0]),
                r"key and value must be \[num_tokens, num_kv_heads, head_dim\]"),
    "value shape differs": (dict(value=lambda a: a["value"][:4]),
                            r"key and value must be .* and equal"),
    "caches 3-D": (dict(key_cache=lambda a: a["key_cache"][0],
                        value_cache=lambda a: a["value_cache"][0]),
                   r"key_cache and value_cache must be \[num_blocks, block_size"),
    "cache shapes differ": (dict(value_cache=lambda a: a["value_cache"][:-1]),
                            r"key_cache and value_cache must be .* and equal"),
    "kv heads mismatch": (dict(key=lambda a: torch.randn(5, 1, HEAD_DIM),
                               value=lambda a: torch.randn(5, 1, HEAD_DIM)),
                          r"cache heads/head_dim \(2, 64\) do not match key's \(1, 64\)"),
    "head_dim mismatch": (dict(key=lambda a: torch.randn(5, KV_HEADS, 80),
                               value=lambda a: torch.randn(5, KV_HEADS, 80)),
                          r"do not match key's \(2, 80\)"),
    "cache strides differ": (dict(value_cache=lambda a: strided_like(a["value_cache"])),
                             r"must share strides"),
    "slot_mapping length": (dict(slot_mapping=lambda a: a["slot_mapping"][:4]),
                            r"slot_mapping must be \[num_tokens=5\]"),
    "slot_mapping 2-D": (dict(slot_mapping=lambda a: a["slot_mapping"][None]),
                         r"slot_mapping must be \[num_tokens=5\]"),
    "slot_mapping float": (dict(slot_mapping=lambda a: a["slot_mapping"].float()),
                           r"slot_mapping must be int32 or int64, got torch.float32"),
    "slot_mapping int16": (dict(slot_mapping=lambda a: a["slot_mapping"].to(torch.int16)),
                           r"slot_mapping must be int32 or int64"),
    "slot_mapping on another device": (dict(slot_mapping=lambda a: a["slot_mapping"].to("meta")),
                                       r"all tensors must be on one device"),
    "unknown backend": (dict(backend=lambda a: "Triton"), r"backend must be one of"),
}


@pytest.mark.parametrize("change,match", CACHE_CASES.values(), ids=CACHE_CASES.keys())
def test_reshape_and_cache_rejects(change, match, launches):
    args = cache_args()
    before = args["key_cache"].clone()
    args |= {k: f(args) for k, f in change.items()}
    args.setdefault("backend", "triton")
    with pytest.raises(ValueError, match=match):
        ops.reshape_and_cache(**args)
    assert launches.launches == []
    if args["key_cache"].shape == before.shape:
        assert torch.equal(args["key_cache"], before)


class Recorder:
    """Stands in for a kernel: records the launch instead of running it."""

    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.log.append((self.name, tuple(grid), meta))
        return launch


@pytest.fixture
def recorded(monkeypatch) -> list:
    log: list = []
    for module in (pa, rc):
        for name in [n for n in vars(module) if n.endswith("_kernel")]:
            monkeypatch.setattr(module, name, Recorder(log, name))
    return log


def test_grids_come_from_shapes_alone(recorded):
    """All tensors on the meta device, which has no data: any read of a device tensor back to
    the host (.item(), .tolist(), int(), a max over seq_lens...) would raise."""
    args = attention_args("meta")
    num_tokens = args["query"].shape[0]
    out = ops.paged_attention(**args, backend="triton")
    assert out.device.type == "meta" and out.shape == args["query"].shape
    meta = pa.kernel_constexprs(HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, None, False)
    assert recorded == [("paged_attention_kernel", (num_tokens // meta["BLOCK_Q"] + 3, KV_HEADS),
                         meta)]


def test_split_grid_comes_from_shapes_alone(recorded):
    seqs = ((4, 1), (30, 1))
    args = attention_args("meta", seqs)
    args["block_table"] = torch.zeros(2, 2048 // BLOCK_SIZE, dtype=torch.int32, device="meta")
    ops.paged_attention(**args, sliding_window=8, backend="triton")  # auto: split-KV
    splits = pa.DEFAULT_NUM_SPLITS
    assert [(name, grid) for name, grid, _ in recorded] == [
        ("paged_attention_split_kernel", (2, KV_HEADS, splits)),
        ("reduce_splits_kernel", (2, HEADS))]
    assert recorded[0][2] == pa.kernel_constexprs(HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, 8, False,
                                                  splits)
    assert recorded[1][2] == pa.reduce_constexprs(HEADS, HEAD_DIM, splits)


def test_reshape_and_cache_grid_comes_from_shapes_alone(recorded):
    ops.reshape_and_cache(**cache_args("meta"), backend="triton")
    assert recorded == [("reshape_and_cache_kernel", (5,),
                         rc.kernel_constexprs(KV_HEADS, HEAD_DIM, BLOCK_SIZE))]
