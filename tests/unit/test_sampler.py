"""Unit tests for the batched sampler (server/model_runner/sampler.py).

Every expected value is computed here, independently of the sampler, from hand-made logits.
Stochastic checks draw many rows in one batched call from a fixed-seed sampler, so they are
deterministic; their tolerances are loose (several standard deviations).
"""

from __future__ import annotations

import math

import pytest
import torch

from server.model_runner.request_state import RequestState
from server.model_runner.sampler import Sampler
from server.outputs import SampleResult
from server.sampling_params import SamplingParams

V = 16  # default vocab size for these tests


# --------------------------------------------------------------------------------------------
# helpers


def make_row(prompt=(0,), outputs=(), eos=(), generator=None, **params) -> RequestState:
    return RequestState("r", list(prompt) + list(outputs), len(prompt), SamplingParams(**params),
                        frozenset(eos), [], generator)


def seeded(seed: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def logits_1d(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def sample_one(values, row: RequestState, seed: int = 0) -> SampleResult:
    results = Sampler(seed=seed)(logits_1d(values).unsqueeze(0), [row])
    assert len(results) == 1
    return results[0]


def greedy_token(values, **kwargs) -> int:
    kwargs.setdefault("temperature", 0.0)
    return sample_one(values, make_row(**kwargs)).token_id


def draw_many(values, n: int = 2000, seed: int = 0, **kwargs) -> list[int]:
    """n independent draws: one batched call of n identical rows on the shared generator."""
    logits = logits_1d(values).unsqueeze(0).expand(n, -1).contiguous()
    row = make_row(**kwargs)  # the sampler only reads the request, so rows may share it
    rows = [row] * n
    results = Sampler(seed=seed)(logits, rows)
    assert len(results) == n
    return [r.token_id for r in results]


def frequencies(tokens: list[int], vocab: int) -> list[float]:
    counts = [0] * vocab
    for t in tokens:
        counts[t] += 1
    return [c / len(tokens) for c in counts]


def softmax(values) -> list[float]:
    m = max(values)
    exps = [math.exp(v - m) if v != -math.inf else 0.0 for v in values]
    s = sum(exps)
    return [e / s for e in exps]


def log_softmax(values) -> list[float]:
    m = max(values)
    lse = m + math.log(sum(math.exp(v - m) for v in values))
    return [v - lse for v in values]


def logits_from_probs(probs, vocab: int, positions) -> list[float]:
    """Logits whose softmax puts probs[j] on token positions[j] and ~0 elsewhere."""
    values = [-1e4] * vocab
    for p, pos in zip(probs, positions):
        values[pos] = math.log(p)
    return values


# --------------------------------------------------------------------------------------------
# greedy and logit_bias


def test_greedy_is_argmax_per_row():
    g = torch.Generator().manual_seed(1234)
    logits = torch.randn(6, V, generator=g)
    rows = [make_row(temperature=0.0) for _ in range(6)]
    results = Sampler(seed=0)(logits, rows)
    assert [r.token_id for r in results] == logits.argmax(dim=-1).tolist()
    # no logprobs requested: none reported
    assert all(r.logprob is None for r in results)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_rows_in_the_logits_dtype_match_fp32(dtype):
    """A bf16 model's logits: the all-greedy batch (no fp32 copy) and the batch that copies to
    fp32 (one row asks for logprobs, one samples) choose the same greedy tokens, ties first."""
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(5, 3000, generator=g) * 3).to(dtype)
    logits[2, [100, 2900]] = 50.0  # a tie: the first wins
    expected = logits.float().max(dim=-1).indices.tolist()
    greedy = Sampler(seed=0)(logits, [make_row(temperature=0.0) for _ in range(5)])
    assert [r.token_id for r in greedy] == expected
    mixed_rows = [make_row(temperature=0.0) for _ in range(4)] + [make_row(temperature=1.0)]
    mixed_rows[1] = make_row(temperature=0.0, logprobs=2)
    mixed = Sampler(seed=0)(logits, mixed_rows)
    assert [r.token_id for r in mixed[:4]] == expected[:4]
    assert mixed[1].logprob is not None and expected[2] == 100


def test_greedy_is_deterministic_across_sampler_seeds():
    values = [0.1, 0.5, 3.0, -1.0, 2.9, 0.0, 0.0, 0.0]
    assert {greedy_token(values) for _ in range(3)} == {2}
    row = make_row(temperature=0.0)
    assert Sampler(seed=99)(logits_1d(values).unsqueeze(0), [row])[0].token_id == 2


def test_logit_bias_changes_argmax():
    values = [0.0] * V
    values[3] = 2.0
    values[7] = 1.5
    assert greedy_token(values) == 3
    # +0.6 on token 7 lifts it to 2.1 > 2.0
    assert greedy_token(values, logit_bias={7: 0.6}) == 7
    # +0.4 leaves it at 1.9 < 2.0: the bias is added, not a replacement of the logit
    assert greedy_token(values, logit_bias={7: 0.4}) == 3
    # a negative bias pushes the argmax down
    assert greedy_token(values, logit_bias={3: -1.0}) == 7
    # -100 effectively bans a token
    assert greedy_token(values, logit_bias={3: -100.0, 7: -100.0}) not in (3, 7)


def test_logit_bias_out_of_range_keys_are_ignored():
    values = [0.0] * V
    values[5] = 1.0
    bias = {V: 100.0, V + 10: 100.0, -1: 100.0, 10_000: 100.0}
    assert greedy_token(values, logit_bias=bias) == 5
    # mixed with an in-range key, the in-range one still applies
    bias[2] = 50.0
    assert greedy_token(values, logit_bias=bias) == 2


def test_logit_bias_applies_only_to_its_own_row():
    values = [0.0] * V
    values[1] = 1.0
    logits = logits_1d(values).unsqueeze(0).repeat(3, 1)
    rows = [make_row(temperature=0.0), make_row(temperature=0.0, logit_bias={9: 5.0}),
            make_row(temperature=0.0)]
    assert [r.token_id for r in Sampler()(logits, rows)] == [1, 9, 1]


# --------------------------------------------------------------------------------------------
# min_tokens


EOS, STOP, OTHER = 3, 5, 1


def _min_tokens_logits() -> list[float]:
    values = [0.0] * V
    values[EOS] = 5.0
    values[STOP] = 4.0
    values[OTHER] = 3.0
    return values


def test_min_tokens_masks_eos_and_stop_tokens_until_reached():
    values = _min_tokens_logits()
    common = dict(eos=(EOS,), stop_token_ids=[STOP], min_tokens=3, temperature=0.0)
    for n_out in range(3):
        assert greedy_token(values, outputs=[7] * n_out, **common) == OTHER, n_out
    # once num_output_tokens == min_tokens nothing is masked any more
    assert greedy_token(values, outputs=[7] * 3, **common) == EOS
    assert greedy_token(values, outputs=[7] * 4, **common) == EOS
    # without min_tokens, eos is the argmax from the start
    assert greedy_token(values, eos=(EOS,), stop_token_ids=[STOP], temperature=0.0) == EOS


def test_min_tokens_masks_every_eos_id():
    values = _min_tokens_logits()
    values[8] = 4.5
    token = greedy_token(values, eos=(EOS, 8), stop_token_ids=[STOP], min_tokens=1,
                         temperature=0.0)
    assert token == OTHER


def test_min_tokens_with_ignore_eos_bans_only_stop_token_ids():
    values = _min_tokens_logits()
    values[STOP] = 6.0  # stop > eos > other
    common = dict(eos=(EOS,), stop_token_ids=[STOP], min_tokens=2, temperature=0.0)
    assert greedy_token(values, ignore_eos=True, **common) == EOS
    assert greedy_token(values, ignore_eos=False, **common) == OTHER
    assert greedy_token(values, ignore_eos=True, outputs=[7, 7], **common) == STOP


def test_min_tokens_out_of_range_ids_are_ignored():
    values = _min_tokens_logits()
    token = greedy_token(values, eos=(EOS, V + 5), stop_token_ids=[STOP, 10_000], min_tokens=1,
                         temperature=0.0)
    assert token == OTHER


def test_min_tokens_masks_banned_tokens_when_sampling():
    values = [1.0] * 8
    values[EOS] = 4.0
    values[STOP] = 4.0
    tokens = draw_many(values, n=2000, eos=(EOS,), stop_token_ids=[STOP], min_tokens=1,
                       temperature=1.0)
    assert EOS not in tokens and STOP not in tokens
    assert len(set(tokens)) == 6  # all the remaining tokens do occur
    # and with min_tokens reached the banned tokens dominate
    tokens = draw_many(values, n=2000, eos=(EOS,), stop_token_ids=[STOP], min_tokens=1,
                       outputs=[0], temperature=1.0)
    f = frequencies(tokens, 8)
    expected = softmax(values)
    assert abs(f[EOS] - expected[EOS]) < 0.05 and abs(f[STOP] - expected[STOP]) < 0.05


# --------------------------------------------------------------------------------------------
# repetition / frequency / presence penalties


def test_repetition_penalty_divides_positive_logits():
    # seen token 0: 3.0 / 2 = 1.5
    assert greedy_token([3.0, 1.4, 0, 0, 0, 0, 0, 0], prompt=[0], repetition_penalty=2.0) == 0
    assert greedy_token([3.0, 1.6, 0, 0, 0, 0, 0, 0], prompt=[0], repetition_penalty=2.0) == 1
    # without the penalty token 0 wins
    assert greedy_token([3.0, 1.6, 0, 0, 0, 0, 0, 0], prompt=[0]) == 0


def test_repetition_penalty_multiplies_negative_logits():
    base = [-10.0] * 8
    # seen token 0: -1.0 * 2 = -2.0
    v = list(base)
    v[0], v[1] = -1.0, -1.9
    assert greedy_token(v, prompt=[0], repetition_penalty=2.0) == 1
    v[1] = -2.1
    assert greedy_token(v, prompt=[0], repetition_penalty=2.0) == 0
    # penalty < 1 rewards seen tokens: -3.0 * 0.5 = -1.5 beats -1.6
    v = list(base)
    v[0], v[1] = -3.0, -1.6
    assert greedy_token(v, prompt=[0], repetition_penalty=0.5) == 0
    v[1] = -1.4
    assert greedy_token(v, prompt=[0], repetition_penalty=0.5) == 1


def test_repetition_penalty_covers_prompt_and_output_tokens_once():
    values = [0.0] * 8
    values[2], values[4], values[6] = 4.0, 3.9, 1.9
    # token 2 only in the output: penalised (4.0 / 2 = 2.0 < 3.9)
    assert greedy_token(values, prompt=[7], outputs=[2], repetition_penalty=2.0) == 4
    # tokens 2 and 4 seen (prompt / output), several times: divided once each (2.0, 1.95 > 1.9)
    assert greedy_token(values, prompt=[4, 4, 4], outputs=[2, 2, 2],
                        repetition_penalty=2.0) == 2
    # out-of-range ids in the prompt do not break anything
    assert greedy_token(values, prompt=[V + 100, 2], repetition_penalty=2.0) == 4


def test_frequency_and_presence_penalties_use_output_counts_only():
    # outputs: token 0 twice, token 1 once; freq 0.5, presence 1.0
    # token 0: 5.0 - 0.5*2 - 1.0 = 3.0 ; token 1: 3.0 - 0.5 - 1.0 = 1.5
    v = [0.0] * 8
    v[0], v[1], v[2] = 5.0, 3.0, 2.9
    common = dict(outputs=[0, 0, 1], frequency_penalty=0.5, presence_penalty=1.0)
    assert greedy_token(v, **common) == 0  # 3.0 > 2.9
    v[2] = 3.1
    assert greedy_token(v, **common) == 2  # 3.1 > 3.0
    # prompt tokens are not counted, however often they occur
    v[2] = 2.9
    assert greedy_token(v, prompt=[0] * 10 + [2], outputs=[], frequency_penalty=2.0,
                        presence_penalty=2.0) == 0


def test_frequency_penalty_scales_with_count():
    v = [0.0] * 8
    v[0], v[1] = 5.0, 2.5
    # 5.0 - 1.0 * count: count 2 -> 3.0 beats 2.5, count 3 -> 2.0 loses
    assert greedy_token(v, outputs=[0, 0], frequency_penalty=1.0) == 0
    assert greedy_token(v, outputs=[0, 0, 0], frequency_penalty=1.0) == 1
    # presence does not scale with count: 5.0 - 2.0 = 3.0 for any count
    assert greedy_token(v, outputs=[0] * 6, presence_penalty=2.0) == 0


def test_negative_frequency_and_presence_penalties_reward_repeats():
    v = [0.0] * 8
    v[0], v[1] = 2.0, 1.0
    assert greedy_token(v, outputs=[1, 1], frequency_penalty=-0.6) == 1  # 1 + 1.2 = 2.2
    assert greedy_token(v, outputs=[1, 1], frequency_penalty=-0.4) == 0  # 1 + 0.8 = 1.8
    assert greedy_token(v, outputs=[1], presence_penalty=-1.5) == 1


def test_penalties_apply_only_to_their_own_row():
    v = [0.0] * 8
    v[0], v[1] = 3.0, 2.0
    logits = logits_1d(v).unsqueeze(0).repeat(3, 1)
    rows = [make_row(temperature=0.0, prompt=[0]),
            make_row(temperature=0.0, prompt=[0], repetition_penalty=2.0),
            make_row(temperature=0.0, prompt=[0], outputs=[0])]
    assert [r.token_id for r in Sampler()(logits, rows)] == [0, 1, 0]


def test_penalised_sampling_distribution():
    """With temperature 1 the draws follow softmax of the penalised logits."""
    values = [1.0, 0.5, -0.5, 0.0, 0.8, -1.0, 0.2, 0.3]
    prompt, outputs = [1, 2], [0, 0, 4]
    rep, freq, pres = 1.5, 0.3, 0.4
    expected_logits = list(values)
    for t in set(prompt + outputs):
        x = expected_logits[t]
        expected_logits[t] = x / rep if x > 0 else x * rep
    for t in set(outputs):
        expected_logits[t] -= freq * outputs.count(t) + pres
    expected = softmax(expected_logits)
    unpenalised = softmax(values)
    assert max(abs(a - b) for a, b in zip(expected, unpenalised)) > 0.1  # the check can fail
    tokens = draw_many(values, n=2500, prompt=prompt, outputs=outputs, repetition_penalty=rep,
                       frequency_penalty=freq, presence_penalty=pres, temperature=1.0)
    for t, (f, e) in enumerate(zip(frequencies(tokens, 8), expected)):
        assert abs(f - e) < 0.04, (t, f, e)


# --------------------------------------------------------------------------------------------
# top-k / top-p / min-p


def test_top_k_1_returns_argmax():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(500, V, generator=g)
    rows = [make_row(temperature=1.5, top_k=1) for _ in range(500)]
    results = Sampler(seed=3)(logits, rows)
    assert [r.token_id for r in results] == logits.argmax(dim=-1).tolist()


def test_top_k_restricts_to_top_k_tokens():
    values = [0.0, 0.9, 0.1, 1.0, 0.2, 0.95, 0.3, 0.85]
    tokens = draw_many(values, n=2000, temperature=2.0, top_k=3)
    assert set(tokens) == {3, 5, 1}
    # relative frequencies follow the renormalised top-3 distribution
    kept = softmax([values[3] / 2, values[5] / 2, values[1] / 2])
    f = frequencies(tokens, 8)
    for tok, e in zip((3, 5, 1), kept):
        assert abs(f[tok] - e) < 0.04
    # top_k >= vocab and top_k = -1 (off) keep everything
    assert len(set(draw_many(values, n=2000, temperature=2.0, top_k=8))) == 8
    assert len(set(draw_many(values, n=2000, temperature=2.0, top_k=-1))) == 8


@pytest.mark.parametrize(("top_p", "kept"), [
    (0.3, {"a"}),
    (0.45, {"a"}),
    (0.75, {"a", "b"}),
    (0.85, {"a", "b", "c"}),
    (0.97, {"a", "b", "c", "d"}),
    (1.0, {"a", "b", "c", "d"}),
])
def test_top_p_keeps_smallest_set_reaching_top_p(top_p, kept):
    # probabilities 0.5 / 0.3 / 0.15 / 0.05 placed on scattered token ids
    positions = {"a": 6, "b": 1, "c": 9, "d": 3}
    values = logits_from_probs([0.5, 0.3, 0.15, 0.05], V, list(positions.values()))
    tokens = draw_many(values, n=2000, temperature=1.0, top_p=top_p)
    assert set(tokens) == {positions[name] for name in kept}


def test_top_p_boundary_exactly_reached():
    # four equal logits give exact probabilities 0.25 each, so cumulative sums are exact:
    # top_p=0.5 is reached by exactly two tokens, 0.75 by three
    values = [0.0] * 4 + [-1e4] * 4
    assert softmax(values)[:4] == [0.25] * 4
    assert len(set(draw_many(values, n=2000, temperature=1.0, top_p=0.5))) == 2
    assert len(set(draw_many(values, n=2000, temperature=1.0, top_p=0.75))) == 3
    assert len(set(draw_many(values, n=2000, temperature=1.0, top_p=0.76))) == 4
    assert set(draw_many(values, n=2000, temperature=1.0, top_p=0.5)) <= {0, 1, 2, 3}


def test_top_p_is_applied_after_temperature():
    # temperature 2 flattens [0.5, 0.3, 0.15, 0.05] to ~[0.38, 0.29, 0.21, 0.12]: the top
    # two reach only ~0.67 < 0.75 so a third token is needed
    values = logits_from_probs([0.5, 0.3, 0.15, 0.05], 8, [0, 1, 2, 3])
    scaled = softmax([v / 2.0 for v in values])
    assert scaled[0] + scaled[1] < 0.75 <= scaled[0] + scaled[1] + scaled[2]
    assert set(draw_many(values, n=2000, temperature=2.0, top_p=0.75)) == {0, 1, 2}


def test_top_p_combined_with_top_k():
    values = logits_from_probs([0.5, 0.3, 0.15, 0.05], 8, [0, 1, 2, 3])
    # top_k=2 renormalises to 0.625 / 0.375, so top_p=0.6 keeps only the first
    assert set(draw_many(values, n=2000, temperature=1.0, top_k=2, top_p=0.6)) == {0}
    assert set(draw_many(values, n=2000, temperature=1.0, top_k=3, top_p=0.99)) == {0, 1, 2}


def test_small_top_p_returns_only_the_top_token():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(300, V, generator=g)
    rows = [make_row(temperature=1.0, top_p=0.01) for _ in range(300)]
    results = Sampler(seed=5)(logits, rows)
    assert [r.token_id for r in results] == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize(("min_p", "kept"), [
    (0.0, {0, 1, 2, 3}),
    (0.2, {0, 1, 2, 3}),   # threshold 0.08 < 0.1
    (0.3, {0, 1, 2}),      # threshold 0.12 > 0.1
    (0.6, {0, 1}),         # threshold 0.24
    (0.8, {0}),            # threshold 0.32 > 0.3
    (1.0, {0}),            # only the most likely token (prob == threshold is kept)
])
def test_min_p_removes_tokens_below_fraction_of_max(min_p, kept):
    values = logits_from_probs([0.4, 0.3, 0.2, 0.1], 8, [0, 1, 2, 3])
    tokens = draw_many(values, n=2000, temperature=1.0, min_p=min_p)
    assert set(tokens) == kept


def test_min_p_keeps_tokens_at_exactly_the_threshold():
    # exact probabilities 0.25 / 0.25 / 0.125 x 4: min_p=0.5 gives threshold 0.125 exactly
    values = [math.log(2.0)] * 2 + [0.0] * 4 + [-1e4] * 2
    tokens = draw_many(values, n=2000, temperature=1.0, min_p=0.5)
    assert set(tokens) == {0, 1, 2, 3, 4, 5}
    # min_p=1.0 keeps every token tied for the maximum
    assert set(draw_many(values, n=2000, temperature=1.0, min_p=1.0)) == {0, 1}


def test_filters_are_per_row_in_a_mixed_batch():
    values = logits_from_probs([0.5, 0.3, 0.15, 0.05], 8, [0, 1, 2, 3])
    n = 600
    logits = logits_1d(values).unsqueeze(0).repeat(4 * n, 1)
    params = [dict(temperature=1.0, top_k=1), dict(temperature=1.0, top_p=0.75),
              dict(temperature=1.0), dict(temperature=1.0, min_p=0.5)]
    rows = [make_row(**params[i % 4]) for i in range(4 * n)]
    tokens = [r.token_id for r in Sampler(seed=1)(logits, rows)]
    assert set(tokens[0::4]) == {0}
    assert set(tokens[1::4]) == {0, 1}
    assert set(tokens[2::4]) == {0, 1, 2, 3}
    assert set(tokens[3::4]) == {0, 1}


# --------------------------------------------------------------------------------------------
# sampling distribution


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_sampling_frequency_follows_softmax_over_temperature(temperature):
    values = [1.2, 0.3, -0.5, 2.0, 0.0, 1.0, -1.5, 0.7]
    expected = softmax([v / temperature for v in values])
    if temperature != 1.0:  # the expected distribution really differs from temperature 1
        assert max(abs(a - b) for a, b in zip(expected, softmax(values))) > 0.05
    tokens = draw_many(values, n=4000, seed=temperature.__hash__() % 1000,
                       temperature=temperature)
    f = frequencies(tokens, 8)
    for t in range(8):
        assert abs(f[t] - expected[t]) < 0.035, (t, f[t], expected[t])


def test_shared_generator_is_seeded_by_sampler_seed():
    values = [0.0] * V
    a = draw_many(values, n=50, seed=42, temperature=1.0)
    b = draw_many(values, n=50, seed=42, temperature=1.0)
    c = draw_many(values, n=50, seed=43, temperature=1.0)
    assert a == b
    assert a != c


def test_shared_generator_advances_between_calls():
    values = logits_1d([0.0] * V).unsqueeze(0).repeat(20, 1)
    sampler = Sampler(seed=0)
    rows = [make_row(temperature=1.0) for _ in range(20)]
    first = [r.token_id for r in sampler(values, rows)]
    second = [r.token_id for r in sampler(values, rows)]
    assert first != second


# --------------------------------------------------------------------------------------------
# per-request seeded generators


def _near_uniform(vocab: int = V) -> list[float]:
    return [0.01 * ((7 * i) % 5) for i in range(vocab)]


def _seeded_sequence_alone(seed: int, steps: int = 20, sampler_seed: int = 0) -> list[int]:
    sampler = Sampler(seed=sampler_seed)
    gen = seeded(seed)
    row = make_row(generator=gen, temperature=1.0, seed=seed)
    logits = logits_1d(_near_uniform()).unsqueeze(0)
    return [sampler(logits, [row])[0].token_id for _ in range(steps)]


def test_seeded_row_is_reproducible_alone():
    assert _seeded_sequence_alone(1234) == _seeded_sequence_alone(1234)
    # the shared generator's seed does not matter for a seeded row
    assert _seeded_sequence_alone(1234) == _seeded_sequence_alone(1234, sampler_seed=77)


def test_different_seeds_give_different_sequences():
    seqs = {tuple(_seeded_sequence_alone(s)) for s in (1, 2, 3, 4)}
    assert len(seqs) == 4
    assert all(len(set(s)) > 3 for s in seqs)  # they really are random draws


@pytest.mark.parametrize("layout", ["first", "middle", "last", "rotating"])
def test_seeded_row_independent_of_batch_composition(layout):
    steps, seed = 20, 1234
    expected = _seeded_sequence_alone(seed, steps)

    sampler = Sampler(seed=5)
    target = make_row(generator=seeded(seed), temperature=1.0, seed=seed)
    all_others = [
        make_row(temperature=1.0),                                       # shared generator
        make_row(temperature=0.0),                                       # greedy
        make_row(generator=seeded(seed + 1), temperature=0.7, top_k=3),  # other seeded row
        make_row(temperature=1.3, top_p=0.5, min_p=0.1),
    ]
    got = []
    for step in range(steps):
        others = all_others[: 1 + step % 4]
        if layout == "first":
            pos = 0
        elif layout == "last":
            pos = len(others)
        elif layout == "middle":
            pos = len(others) // 2 + (len(others) > 1)
        else:
            pos = step % (len(others) + 1)
        rows = others[:pos] + [target] + others[pos:]
        g = torch.Generator().manual_seed(step)
        logits = torch.randn(len(rows), V, generator=g) * 3
        logits[pos] = logits_1d(_near_uniform())
        results = sampler(logits, rows)
        assert len(results) == len(rows)
        got.append(results[pos].token_id)
    assert got == expected


def test_two_rows_with_same_seed_in_one_batch_draw_identically():
    logits = logits_1d(_near_uniform()).unsqueeze(0).repeat(3, 1)
    sampler = Sampler()
    rows = [make_row(generator=seeded(9), temperature=1.0, seed=9),
            make_row(temperature=1.0),
            make_row(generator=seeded(9), temperature=1.0, seed=9)]
    a, b = [], []
    for _ in range(20):
        results = sampler(logits, rows)
        a.append(results[0].token_id)
        b.append(results[2].token_id)
    assert a == b


def test_seeded_row_distribution_follows_softmax():
    values = [1.2, 0.3, -0.5, 2.0, 0.0, 1.0, -1.5, 0.7]
    row = make_row(generator=seeded(2024), temperature=1.0, seed=2024)
    sampler = Sampler()
    logits = logits_1d(values).unsqueeze(0)
    tokens = [sampler(logits, [row])[0].token_id for _ in range(1500)]
    expected = softmax(values)
    for t, f in enumerate(frequencies(tokens, 8)):
        assert abs(f - expected[t]) < 0.045, (t, f, expected[t])


# --------------------------------------------------------------------------------------------
# logprobs


def _check_logprobs(result: SampleResult, raw: list[float], n: int) -> None:
    expected = log_softmax(raw)
    assert result.logprob == pytest.approx(expected[result.token_id], abs=1e-5)
    assert result.top_logprobs is not None
    assert len(result.top_logprobs) == n
    top_ids = sorted(range(len(raw)), key=lambda t: -raw[t])[:n]
    assert set(result.top_logprobs) == set(top_ids)
    for t, lp in result.top_logprobs.items():
        assert lp == pytest.approx(expected[t], abs=1e-5)


def test_logprobs_are_raw_and_top_n_is_exact():
    raw = [0.3, 2.1, -0.7, 1.4, 0.9, -2.0, 1.8, 0.0, 0.5, -0.2, 1.1, -1.1, 0.25, 0.6, -0.4, 1.6]
    # bias and penalties change the sampled token, but reported logprobs stay raw
    row = make_row(temperature=0.0, logprobs=4, logit_bias={5: 10.0}, prompt=[1],
                   repetition_penalty=2.0)
    result = sample_one(raw, row)
    assert result.token_id == 5
    _check_logprobs(result, raw, 4)
    assert result.logprob == pytest.approx(log_softmax(raw)[5], abs=1e-5)


def test_logprobs_unaffected_by_temperature_and_filters():
    raw = [0.3, 2.1, -0.7, 1.4, 0.9, -2.0, 1.8, 0.0]
    n = 200
    logits = logits_1d(raw).unsqueeze(0).repeat(n, 1)
    rows = [make_row(temperature=0.5, top_k=3, min_p=0.05, logprobs=2,
                     outputs=[1], presence_penalty=0.5) for _ in range(n)]
    results = Sampler(seed=8)(logits, rows)
    assert len({r.token_id for r in results}) > 1
    for r in results:
        _check_logprobs(r, raw, 2)


def test_logprobs_mixed_batch():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 12, generator=g)
    counts = [3, 0, None, 5, 1]
    rows = [make_row(temperature=0.8 if i % 2 else 0.0, logprobs=c)
            for i, c in enumerate(counts)]
    results = Sampler(seed=0)(logits, rows)
    for i, (r, c) in enumerate(zip(results, counts)):
        raw = logits[i].tolist()
        if c is None:
            assert r.logprob is None
            assert not r.top_logprobs
        elif c == 0:
            assert r.logprob == pytest.approx(log_softmax(raw)[r.token_id], abs=1e-5)
            assert r.top_logprobs == {}
        else:
            _check_logprobs(r, raw, c)
    # greedy rows picked the argmax
    assert results[0].token_id == int(logits[0].argmax())
    assert results[2].token_id == int(logits[2].argmax())


def test_logprobs_zero_only_reports_sampled_token():
    raw = [0.0, 1.0, 2.0, 0.5, 0.0, 0.0, 0.0, 0.0]
    result = sample_one(raw, make_row(temperature=0.0, logprobs=0))
    assert result.token_id == 2
    assert result.logprob == pytest.approx(log_softmax(raw)[2], abs=1e-5)
    assert result.top_logprobs == {}


def test_logprobs_none_reports_nothing():
    raw = [0.0, 1.0, 2.0, 0.5, 0.0, 0.0, 0.0, 0.0]
    result = sample_one(raw, make_row(temperature=1.0, logprobs=None))
    assert result.logprob is None
    assert not result.top_logprobs


def test_logprobs_equal_to_vocab_size():
    raw = [0.3, 2.1, -0.7, 1.4, 0.9, -2.0, 1.8, 0.0]
    result = sample_one(raw, make_row(temperature=0.0, logprobs=8))
    _check_logprobs(result, raw, 8)


def test_logprobs_larger_than_vocab_does_not_crash():
    """A request asking for more top logprobs than the vocabulary has must not take down the
    whole batch: it gets every token's logprob (neighbouring rows are unaffected)."""
    raw = [0.3, 2.1, -0.7, 1.4, 0.9, -2.0, 1.8, 0.0]
    logits = logits_1d(raw).unsqueeze(0).repeat(2, 1)
    rows = [make_row(temperature=0.0, logprobs=20), make_row(temperature=0.0, logprobs=2)]
    results = Sampler()(logits, rows)
    _check_logprobs(results[0], raw, 8)
    _check_logprobs(results[1], raw, 2)


# --------------------------------------------------------------------------------------------
# input handling


def test_sampler_does_not_modify_callers_logits():
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(4, V, generator=g)
    before = logits.clone()
    rows = [
        make_row(temperature=0.0, logit_bias={2: 5.0}, prompt=[1, 2, 3], outputs=[4, 4],
                 repetition_penalty=1.7, frequency_penalty=0.5, presence_penalty=0.5,
                 eos=(0,), min_tokens=5, stop_token_ids=[6], logprobs=3),
        make_row(temperature=0.7, top_k=4, top_p=0.8, min_p=0.05, logit_bias={9: -5.0},
                 eos=(1,), min_tokens=3),
        make_row(temperature=1.3, generator=seeded(1), prompt=[5], repetition_penalty=0.5),
        make_row(temperature=1.0, outputs=[7, 7, 8], frequency_penalty=-1.0, logprobs=0),
    ]
    Sampler()(logits, rows)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_input_dtypes(dtype):
    raw = [0.25, 2.0, -0.75, 1.5, 0.5, -2.0, 1.75, 0.0]
    logits = logits_1d(raw).to(dtype).unsqueeze(0)
    result = Sampler()(logits, [make_row(temperature=0.0, logprobs=2)])[0]
    assert result.token_id == 1
    assert isinstance(result.token_id, int)
    _check_logprobs(result, raw, 2)


def test_result_per_row_in_order():
    logits = torch.full((5, V), -5.0)
    for i in range(5):
        logits[i, i * 3] = 5.0
    rows = [make_row(temperature=0.0 if i % 2 else 1.0, top_k=1 if i % 2 == 0 else 0)
            for i in range(5)]
    results = Sampler()(logits, rows)
    assert all(isinstance(r, SampleResult) for r in results)
    assert [r.token_id for r in results] == [0, 3, 6, 9, 12]
