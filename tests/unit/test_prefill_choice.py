"""Up to which length the compiled attention kernel takes prompt rows
(server/model_runner/prefill_choice.py): the lengths measured, the disk cache, and one real
measurement, whose outcome this test does not predict (it depends on the machine), only its
form and that the plan then sends the longer prompts to SDPA."""

from __future__ import annotations

import pytest
import torch

from pagedserve_kernels import cpu_attention, ops, reference
from server.model_runner import prefill_choice


def test_lengths_double_up_to_the_longest_sequence_and_stop_at_the_cap():
    assert prefill_choice.lengths(2048) == [128, 256, 512, 1024, 2048]
    assert prefill_choice.lengths(1000) == [128, 256, 512, 1000]
    assert prefill_choice.lengths(100) == [100]
    assert prefill_choice.lengths(1 << 15)[-1] == prefill_choice.LAST_LEN


def test_the_limit_is_measured_once_per_key(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_KERNEL_CACHE", str(tmp_path))
    asked: list[int] = []

    def fake(seq_len, *args):
        asked.append(seq_len)
        return (1.0, 2.0) if seq_len <= 512 else (3.0, 2.0)  # the kernel wins up to 512

    monkeypatch.setattr(prefill_choice, "measure", fake)
    args = (9, 3, 64, 16, torch.bfloat16, None, 2048)
    assert prefill_choice.measured_len(*args) == 512
    assert asked == [128, 256, 512, 1024]  # the first loss ends it
    assert prefill_choice.measured_len(*args) == 512 and len(asked) == 4  # from the cache
    assert prefill_choice.measured_len(9, 3, 64, 16, torch.float32, None, 2048) == 512
    assert len(asked) == 8  # another dtype is another key


@pytest.mark.skipif(not cpu_attention.available(), reason="the compiled kernel did not build")
def test_a_real_measurement_gives_a_measured_length_that_the_plan_applies(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_KERNEL_CACHE", str(tmp_path))
    limit = prefill_choice.measured_len(2, 1, 32, 16, torch.float32, None, 256)
    assert limit in (0, 128, 256)
    kernel_s, sdpa_s = prefill_choice.measure(128, 2, 1, 32, 16, torch.float32, None)
    assert kernel_s > 0 and sdpa_s > 0
    args = prefill_choice.prompt_batch(200, 2, 1, 32, 16, torch.float32)
    plan = ops.attention_plan(*args[3:6], 16, None, backend="cpu", native_prefill_len=limit)
    out = ops.paged_attention(*args, 32 ** -0.5, backend="cpu", plan=plan)
    torch.testing.assert_close(out, reference.paged_attention(*args, 32 ** -0.5),
                               rtol=1e-4, atol=1e-5)
    assert plan.sdpa_prefill(plan.prefills[0]) == (200 > limit)
