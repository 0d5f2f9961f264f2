"""`ops.paged_attention(..., backend="triton")` (interpreted on CPU) against kernels.reference.

Each case builds a flattened batch over a paged cache with shuffled physical blocks, padding
entries in the block table, and poison (a large finite value) everywhere in the cache that no
sequence owns: blocks nobody uses (the padding entries point at them) and the slots past the end
of each partial last block. The output is poisoned with NaN before the call, so a row the kernel
forgets to write, or a read of memory it should mask, fails the relative-error check.

The parameter matrix is sampled, not a full product: every value of every axis (GQA ratio,
head_dim, block_size, batch kind, dtype, sliding window, split-KV) appears several times and in
varied company, and each batch holds sequences of length 1, block_size - 1, block_size and
block_size + 1 (plus a longer one spanning several blocks).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch

from pagedserve_kernels import ops, reference
from pagedserve_kernels.paged_attention import DEFAULT_NUM_SPLITS, choose_num_splits

POISON = 1e4  # finite (stale cache memory is finite) but ruinous for any output that reads it
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
KINDS = ("decode", "prefill", "chunked", "mixed")
GROUPS = (1, 2, 4, 8)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def batch_seqs(kind: str, bs: int) -> list[tuple[int, int]]:
    """(cached context length, query length) per sequence; seq_len = context + q_len."""
    if kind == "decode":  # seq_lens 1, bs-1, bs, bs+1, and 5 blocks + 3
        return [(0, 1), (bs - 2, 1), (bs - 1, 1), (bs, 1), (5 * bs + 2, 1)]
    if kind == "prefill":  # whole prompts, no cached context
        return [(0, 1), (0, bs - 1), (0, bs), (0, bs + 1), (0, 2 * bs + 3)]
    if kind == "chunked":  # chunks on a cached prefix (q_len > 1, context > 0)
        return [(1, bs - 2), (bs - 2, 2), (bs - 1, 2), (2 * bs + 1, bs), (bs + 3, 5)]
    if kind == "mixed":  # decodes, prompts and chunks interleaved
        return [(bs - 2, 1), (0, bs + 1), (3, bs - 3), (bs, 1), (0, 1), (2 * bs + 5, 3),
                (bs - 1, 1)]
    raise AssertionError(kind)


def window_size(window: str | None, bs: int) -> int | None:
    """"short": less than a block; "long": more than a block (both cut the long sequences)."""
    return {None: None, "short": bs // 2 + 3, "long": bs + 5}[window]


@dataclass
class Batch:
    query: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    scale: float

    def args(self):
        return (self.query, self.key_cache, self.value_cache, self.block_table, self.seq_lens,
                self.query_start_loc, self.scale)


def make_batch(seqs: list[tuple[int, int]], *, num_kv_heads: int, group: int, head_dim: int,
               block_size: int, dtype: torch.dtype, seed: int, table_width: int | None = None,
               strided: bool = False) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in seqs]
    needed = [cdiv(n, block_size) for n in seq_lens]
    num_unused = 3
    num_blocks = sum(needed) + num_unused
    width = table_width or max(needed) + 2
    assert width >= max(needed)
    num_heads = num_kv_heads * group
    num_tokens = sum(q for _, q in seqs)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    if strided:  # K and V interleaved in one buffer: views with equal, non-contiguous strides
        kv = randn(num_blocks, block_size, 2, num_kv_heads, head_dim)
        key_cache, value_cache = kv[:, :, 0], kv[:, :, 1]
        # the query as a view of a fused qkv projection's output
        qkv = randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim)
        query = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    else:
        key_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)
        value_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)
        query = randn(num_tokens, num_heads, head_dim)

    physical = torch.randperm(num_blocks, generator=gen)
    unused = physical[num_blocks - num_unused:]
    table = torch.empty(len(seqs), width, dtype=torch.int32)
    start = 0
    for i, (n_blocks, seq_len) in enumerate(zip(needed, seq_lens)):
        table[i, :n_blocks] = physical[start:start + n_blocks]
        start += n_blocks
        pad = unused[torch.randint(num_unused, (width - n_blocks,), generator=gen)]
        table[i, n_blocks:] = pad
        tail = seq_len - (n_blocks - 1) * block_size  # valid slots in the last block
        for cache in (key_cache, value_cache):
            cache[table[i, n_blocks - 1], tail:] = POISON
    for cache in (key_cache, value_cache):
        cache[unused] = POISON

    q_lens = torch.tensor([q for _, q in seqs])
    query_start_loc = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.cumsum(q_lens, 0)
    if dtype != torch.float32:
        if strided:
            kv, qkv = kv.to(dtype), qkv.to(dtype)
            key_cache, value_cache = kv[:, :, 0], kv[:, :, 1]
            query = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
        else:
            key_cache, value_cache, query = (t.to(dtype) for t in (key_cache, value_cache, query))
    return Batch(query, key_cache, value_cache, table,
                 torch.tensor(seq_lens, dtype=torch.int32), query_start_loc, head_dim ** -0.5)


@dataclass(frozen=True)
class Case:
    kind: str
    group: int
    head_dim: int
    block_size: int
    dtype: str
    window: str | None = None
    num_splits: int = 1
    num_kv_heads: int = 0  # 0: 2 KV heads, 1 when group == 8

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or (1 if self.group == 8 else 2)

    @property
    def id(self) -> str:
        return (f"{self.kind}-{self.dtype}-g{self.group}-d{self.head_dim}-bs{self.block_size}"
                f"-{'win_' + self.window if self.window else 'nowin'}-splits{self.num_splits}")

    def seed(self) -> int:
        return zlib.crc32(self.id.encode())


def single_pass_cases() -> list[Case]:
    cases = []
    # fp32: every kind x every GQA ratio; head_dim, block_size and the window vary so that each
    # kind meets all four (head_dim, block_size) pairs and the window both on and off.
    for ki, kind in enumerate(KINDS):
        for gi, group in enumerate(GROUPS):
            g0, g1, k0, k1 = gi % 2, gi // 2, ki % 2, ki // 2
            window = ("long" if k0 else "short") if g0 ^ g1 ^ k1 else None
            cases.append(Case(kind, group, (64, 80)[g0 ^ k0], (16, 32)[g1 ^ k0], "fp32", window))
    # fp16 / bf16: every kind, each dtype, varied company.
    for ki, kind in enumerate(KINDS):
        for di, dtype in enumerate(("fp16", "bf16")):
            window = "short" if (ki + di) % 2 else None
            cases.append(Case(kind, GROUPS[(2 * ki + di) % 4], (64, 80)[(ki + di) % 2],
                              (16, 32)[(ki // 2) ^ di], dtype, window))
    # GQA ratios that are not powers of two (Qwen2-7B has 28 heads over 4 KV heads).
    cases.append(Case("mixed", 3, 80, 16, "fp32", "short"))
    cases.append(Case("chunked", 7, 64, 32, "bf16"))
    return cases


def split_cases() -> list[Case]:
    """Split-KV on decode batches; with 16 splits (and with 4 on the short sequences, or with a
    window) most splits of a sequence get no tiles at all."""
    return [Case("decode", *c) for c in [
        (1, 64, 16, "fp32", None, 4),
        (2, 80, 32, "bf16", "short", 4),
        (4, 80, 16, "fp16", None, 4),
        (8, 64, 32, "fp32", "long", 4),
        (1, 80, 32, "fp16", "short", 16),
        (2, 80, 16, "fp32", "long", 16),
        (4, 64, 16, "bf16", None, 16),
        (8, 80, 32, "fp32", None, 16),
        (7, 64, 16, "fp32", "short", 16),
        (2, 64, 16, "fp32", None, 5),  # not a power of two: rounded up to 8 splits
    ]]


def run_case(case: Case, launches, assert_close, *, strided: bool = False,
             table_width: int | None = None, num_splits: int | None | str = "case"):
    bs = case.block_size
    batch = make_batch(batch_seqs(case.kind, bs), num_kv_heads=case.kv_heads, group=case.group,
                       head_dim=case.head_dim, block_size=bs, dtype=DTYPES[case.dtype],
                       seed=case.seed(), table_width=table_width, strided=strided)
    window = window_size(case.window, bs)
    if strided:  # `out` is a view too; the head it skips must stay untouched
        num_tokens, num_heads, head_dim = batch.query.shape
        out_buf = torch.full((num_tokens, num_heads + 1, head_dim), POISON,
                             dtype=batch.query.dtype)
        out_buf[:, :num_heads] = float("nan")
        out = out_buf[:, :num_heads]
    else:
        out = torch.full_like(batch.query, float("nan"))
    splits = case.num_splits if num_splits == "case" else num_splits
    result = ops.paged_attention(*batch.args(), out=out, sliding_window=window,
                                     backend="triton", num_splits=splits)
    assert result is out
    expected = reference.paged_attention(*batch.args(), sliding_window=window)
    assert_close(out, expected)
    if strided:
        assert (out_buf[:, -1] == POISON).all(), "wrote outside `out`'s view"
    return batch


@pytest.mark.parametrize("case", single_pass_cases(), ids=lambda c: c.id)
def test_single_pass_matches_reference(case, launches, assert_close):
    run_case(case, launches, assert_close)
    assert set(launches.names()) == {"paged_attention_kernel"}


@pytest.mark.parametrize("case", split_cases(), ids=lambda c: c.id)
def test_split_kv_matches_reference(case, launches, assert_close):
    batch = run_case(case, launches, assert_close)
    assert launches.names() == ["paged_attention_split_kernel", "reduce_splits_kernel"]
    num_seqs = batch.block_table.shape[0]
    padded = 1 << (case.num_splits - 1).bit_length()
    assert launches.launches[0][1] == (num_seqs, case.kv_heads, padded)


@pytest.mark.parametrize("case", [
    Case("mixed", 2, 80, 16, "fp32", "short"),
    Case("prefill", 1, 64, 32, "fp16"),
    Case("decode", 4, 64, 32, "bf16", "long", 4),
], ids=lambda c: c.id)
def test_strided_query_out_and_caches(case, launches, assert_close):
    """Query a view of a fused qkv output, K/V caches interleaved views of one buffer, `out` a
    view with a gap: strides are honoured and nothing outside the views is written."""
    run_case(case, launches, assert_close, strided=True)


def test_auto_picks_split_kv_for_few_long_decodes(launches, assert_close):
    """A few decodes whose block tables allow long contexts: `choose_num_splits` picks split-KV
    (most splits get no tiles here: the tables are mostly padding)."""
    case = Case("decode", 4, 64, 16, "fp32", "short")
    width = 2048 // 16
    num_seqs = len(batch_seqs("decode", 16))
    assert choose_num_splits(num_seqs, num_seqs, 2, width, 16) == DEFAULT_NUM_SPLITS > 1
    run_case(case, launches, assert_close, table_width=width, num_splits=None)
    assert launches.names() == ["paged_attention_split_kernel", "reduce_splits_kernel"]
    assert launches.launches[0][1] == (num_seqs, 2, DEFAULT_NUM_SPLITS)


@pytest.mark.parametrize("kind,width", [("mixed", 2048 // 16), ("decode", None)])
def test_auto_keeps_single_pass(kind, width, launches, assert_close):
    """Split-KV only for decode-only batches with long block tables."""
    run_case(Case(kind, 2, 80, 16, "bf16"), launches, assert_close, table_width=width,
             num_splits=None)
    assert launches.names() == ["paged_attention_kernel"]


def test_choose_num_splits():
    assert choose_num_splits(4, 4, 8, 256, 16) > 1  # few long decodes
    assert choose_num_splits(5, 4, 8, 256, 16) == 1  # not decode-only
    assert choose_num_splits(64, 64, 2, 256, 16) == 1  # enough (seq, kv head) pairs
    assert choose_num_splits(4, 4, 8, 8, 16) == 1  # short contexts


def test_out_none_allocates(assert_close):
    batch = make_batch(batch_seqs("mixed", 16), num_kv_heads=2, group=2, head_dim=64,
                       block_size=16, dtype=torch.float32, seed=1)
    out = ops.paged_attention(*batch.args(), backend="triton")
    assert out.shape == batch.query.shape and out.dtype == batch.query.dtype
    assert out.data_ptr() != batch.query.data_ptr()
    assert_close(out, reference.paged_attention(*batch.args()))


def test_empty_batch_launches_nothing(launches):
    batch = make_batch([(3, 1)], num_kv_heads=1, group=1, head_dim=64, block_size=16,
                       dtype=torch.float32, seed=2)
    query = batch.query[:0]
    out = ops.paged_attention(query, batch.key_cache, batch.value_cache,
                                  batch.block_table[:0], batch.seq_lens[:0],
                                  batch.query_start_loc[:1], batch.scale, backend="triton")
    assert out.shape == (0, 1, 64)
    assert launches.launches == []
