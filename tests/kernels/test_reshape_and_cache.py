"""`ops.reshape_and_cache` (backend "triton", interpreted on CPU, and "torch") against the
reference.

K and V are strided views of a fused qkv projection's output, as the model passes them; the
caches start full of random values so that a write to a wrong or padding slot shows; the whole
caches are compared, bit for bit, with the reference's.
"""

from __future__ import annotations

import pytest
import torch

from pagedserve_kernels import ops, reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def fused_kv(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int,
             dtype: torch.dtype, gen: torch.Generator):
    """key and value as the model gets them: column slices of one qkv matrix, viewed per head."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, generator=gen).to(dtype)
    key = qkv[:, q_size:q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, q_size + kv_size:].view(num_tokens, num_kv_heads, head_dim)
    assert num_tokens < 2 or not (key.is_contiguous() or value.is_contiguous())
    return key, value


def random_caches(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                  dtype: torch.dtype, gen: torch.Generator, interleaved: bool):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    if interleaved:  # K and V as views of one buffer (equal, non-contiguous strides)
        kv = torch.randn(num_blocks, block_size, 2, num_kv_heads, head_dim, generator=gen)
        kv = kv.to(dtype)
        return kv[:, :, 0], kv[:, :, 1]
    return (torch.randn(*shape, generator=gen).to(dtype),
            torch.randn(*shape, generator=gen).to(dtype))


@pytest.mark.parametrize("dtype,block_size,num_kv_heads,head_dim,slot_dtype,interleaved", [
    ("fp32", 16, 2, 64, torch.int64, False),
    ("fp32", 32, 3, 80, torch.int32, True),  # 3 heads, 80 dims: masked (padded) tiles
    ("fp16", 16, 1, 80, torch.int64, False),
    ("fp16", 32, 2, 64, torch.int32, False),
    ("bf16", 16, 3, 64, torch.int32, False),
    ("bf16", 32, 2, 80, torch.int64, True),
])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_matches_reference(dtype, block_size, num_kv_heads, head_dim, slot_dtype, interleaved,
                           backend):
    gen = torch.Generator().manual_seed(block_size * 1000 + num_kv_heads * 100 + head_dim)
    dtype = DTYPES[dtype]
    num_tokens, num_blocks = 21, 5
    key, value = fused_kv(num_tokens, 2 * num_kv_heads, num_kv_heads, head_dim, dtype, gen)
    key_cache, value_cache = random_caches(num_blocks, block_size, num_kv_heads, head_dim, dtype,
                                           gen, interleaved)
    # distinct slots all over the cache, the very first and last among them, and padding
    # (any negative slot is padding), in random order
    num_slots, num_padding = num_blocks * block_size, 6
    inner = torch.randperm(num_slots - 2, generator=gen)[:num_tokens - 2 - num_padding] + 1
    slots = torch.cat([torch.tensor([0, num_slots - 1]), inner,
                       torch.tensor([-1] * (num_padding - 1) + [-7])])
    slots = slots[torch.randperm(num_tokens, generator=gen)]
    slot_mapping = slots.to(slot_dtype)

    original_k, original_v = key_cache.clone(), value_cache.clone()
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    reference.reshape_and_cache(key, value, expected_k, expected_v, slot_mapping)
    assert not torch.equal(expected_k, original_k)  # the test writes something

    ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, backend=backend)
    assert torch.equal(key_cache, expected_k), \
        f"key cache differs in {int((key_cache != expected_k).sum())} elements"
    assert torch.equal(value_cache, expected_v), \
        f"value cache differs in {int((value_cache != expected_v).sum())} elements"
    # the unwritten slots are untouched (the reference only writes valid slots)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    flat = (-1, num_kv_heads, head_dim)
    for cache, original in ((key_cache, original_k), (value_cache, original_v)):
        assert torch.equal(cache.reshape(flat)[untouched], original.reshape(flat)[untouched])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_padding_only_leaves_caches_untouched(backend):
    gen = torch.Generator().manual_seed(7)
    key, value = fused_kv(6, 4, 2, 64, torch.bfloat16, gen)
    key_cache, value_cache = random_caches(2, 16, 2, 64, torch.bfloat16, gen, False)
    before = key_cache.clone(), value_cache.clone()
    slots = torch.full((6,), -1, dtype=torch.int64)
    ops.reshape_and_cache(key, value, key_cache, value_cache, slots, backend=backend)
    assert torch.equal(key_cache, before[0]) and torch.equal(value_cache, before[1])


def test_no_tokens_is_a_no_op(launches):
    gen = torch.Generator().manual_seed(8)
    key, value = fused_kv(0, 2, 1, 64, torch.float32, gen)
    key_cache, value_cache = random_caches(2, 16, 1, 64, torch.float32, gen, False)
    before = key_cache.clone()
    ops.reshape_and_cache(key, value, key_cache, value_cache,
                              torch.empty(0, dtype=torch.int64), backend="triton")
    assert torch.equal(key_cache, before)
    assert launches.launches == []


def test_one_program_per_token(launches):
    gen = torch.Generator().manual_seed(9)
    key, value = fused_kv(5, 2, 1, 64, torch.float32, gen)
    key_cache, value_cache = random_caches(2, 16, 1, 64, torch.float32, gen, False)
    ops.reshape_and_cache(key, value, key_cache, value_cache,
                              torch.tensor([0, 1, -1, 17, 31]), backend="triton")
    assert launches.launches == [("reshape_and_cache_kernel", (5,))]
