"""`bench soak`'s workload over the fake engine: every request kind comes to the outcome it is
meant to (served, refused with the envelope, or left mid-stream), so a soak that reports no
failure has exercised each path; and its helpers (durations, RSS growth)."""

from __future__ import annotations

import argparse
import asyncio
import random

import pytest

from server.bench.soak import LEFT, OK, REFUSED, Interval, Workload, parse_duration, rss_growth

EXPECTED = {"completion": OK, "stream": OK, "chat": OK, "chat-stream": OK, "batch-stop": OK,
            "logprobs": OK, "disconnect": LEFT, "bad-input": REFUSED}


def test_each_kind_comes_to_its_outcome(fake_server):
    async def run() -> dict[str, set[str]]:
        seen: dict[str, set[str]] = {}
        async with fake_server.async_client() as client:
            workload = Workload(client, fake_server.model_name, random.Random(3))
            assert {name for name, _, _ in workload.kinds} == set(EXPECTED)
            for name, call, _ in workload.kinds:
                for _ in range(6):  # the random choices inside a kind vary
                    outcome = await call()
                    assert outcome.kind == name
                    seen.setdefault(name, set()).add(outcome.result)
                    assert outcome.result == EXPECTED[name], outcome
        return seen

    assert asyncio.run(run()) == {name: {result} for name, result in EXPECTED.items()}
    fake_server.wait_idle()


@pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("30m", 1800), ("2h", 7200),
                                          ("1.5m", 90)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5d", "m", "-3s"])
def test_bad_durations(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


def _interval(t: float, rss: float | None) -> Interval:
    return Interval(t, {}, 0.0, 0.0, rss, None)


def test_rss_growth_counts_from_the_first_sample_after_warmup():
    series = [_interval(60, 500), _interval(120, 1000), _interval(180, 1020),
              _interval(240, 1030)]
    assert rss_growth(series, warmup=100) == pytest.approx(0.03)
    assert rss_growth(series, warmup=230) is None  # one sample after warm-up: no growth
    assert rss_growth([_interval(60, None), _interval(120, None)], warmup=0) is None
