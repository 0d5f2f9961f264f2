"""`bench compare`: ratio and spread arithmetic, the mirrored alternation, and that the servers
are stopped however a comparison ends (the process layer is faked; nothing is started)."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys

import pytest

from server.bench import compare, server_process
from server.bench.compare import (
    METRICS,
    PAGEDSERVE,
    Metric,
    ServerProcess,
    alternation,
    compare_metric,
    compare_runs,
    format_comparison,
    mean_spread,
    paired_ratios,
    run_comparison,
)


def summary(tok_s: float, ttft: float = 0.1, tpot: float = 0.05, failed: int = 0,
            total_output_tokens: int = 64) -> dict:
    def p(v: float) -> dict:
        return {"p50": v, "p90": 2 * v, "p99": 3 * v, "mean": v}

    return {"output_throughput": tok_s, "ttft_s": p(ttft), "tpot_s": p(tpot), "itl_s": p(tpot),
            "e2e_s": p(ttft + 31 * tpot), "completed": 8 - failed, "failed": failed,
            "total_output_tokens": total_output_tokens}


# --- arithmetic -------------------------------------------------------------------------------

def test_mean_spread_and_paired_ratios():
    assert mean_spread([100.0, 120.0]) == (110.0, 10.0)
    assert mean_spread([1.0, 4.0, 2.0]) == (pytest.approx(7 / 3), 1.5)
    assert all(math.isnan(v) for v in mean_spread([]))
    assert paired_ratios([100.0, 120.0], [50.0, 80.0]) == [2.0, 1.5]
    r = paired_ratios([1.0, 1.0, math.nan], [0.0, 2.0, 1.0])
    assert math.isnan(r[0]) and r[1] == 0.5 and math.isnan(r[2])
    with pytest.raises(ValueError):
        paired_ratios([1.0], [1.0, 2.0])


def test_compare_metric_on_hand_made_summaries():
    ours = [summary(100.0, ttft=0.2), summary(120.0, ttft=0.3)]
    other = [summary(50.0, ttft=0.4), summary(80.0, ttft=1.2)]
    tok = compare_metric(8, ours, other, METRICS[0])
    assert (tok.ours_mean, tok.ours_spread) == (110.0, 10.0)
    assert (tok.other_mean, tok.other_spread) == (65.0, 15.0)
    # per-round ratios 2.0 and 1.5: the mean of ratios, not the ratio of means (1.69)
    assert (tok.ratio_mean, tok.ratio_min, tok.ratio_max) == (1.75, 1.5, 2.0)
    ttft = compare_metric(8, ours, other, Metric("TTFT p50 (ms)", "ttft_s", "p50", 1e3))
    assert ttft.ours_mean == pytest.approx(250.0) and ttft.other_mean == pytest.approx(800.0)
    assert ttft.ratio_min == pytest.approx(0.25) and ttft.ratio_max == pytest.approx(0.5)
    assert ttft.ratio_mean == pytest.approx(0.375)


def test_compare_runs_pairs_rounds_and_formats():
    runs = {1: {PAGEDSERVE: [summary(20.0), summary(22.0), summary(99.0)],
                "vllm": [summary(10.0), summary(11.0)]},  # third round unpaired: left out
            8: {PAGEDSERVE: [summary(90.0)]}}  # nothing to pair with
    rows = compare_runs(runs, "vllm")
    assert [r.metric for r in rows] == [m.name for m in METRICS]
    assert {r.concurrency for r in rows} == {1}
    assert rows[0].ratio_mean == pytest.approx(2.0) and rows[0].ours_mean == 21.0
    text = format_comparison(rows, "vllm")
    assert "concurrency 1" in text and "pagedserve/vllm" in text
    assert "21.0" in text and "2.00 [2.00–2.00]" in text


def test_zero_or_missing_values_give_nan_not_an_error():
    rows = compare_runs({4: {PAGEDSERVE: [summary(10.0)], "o": [summary(0.0)]}}, "o")
    assert math.isnan(rows[0].ratio_mean) and math.isnan(rows[0].ratio_min)


def test_alternation_mirrors_the_order_each_round():
    assert alternation([1, 8], 2, ["A", "B"]) == [
        (0, 0, "A"), (0, 0, "B"), (0, 1, "B"), (0, 1, "A"),
        (1, 0, "A"), (1, 0, "B"), (1, 1, "B"), (1, 1, "A")]
    assert [name for _, _, name in alternation([1], 3, ["A", "B", "C"])] == list("ABCCBAABC")


def test_default_num_prompts_matches_the_issue_table():
    assert [compare.default_num_prompts(c) for c in (1, 8, 32, 64, 128)] == [8, 32, 64, 64, 128]


# --- orchestration with fake servers ----------------------------------------------------------

class FakeServer:
    def __init__(self, name: str, events: list, fail_start: bool = False) -> None:
        self.name, self.cmd, self.events, self.fail_start = name, [name], events, fail_start
        self.started = self.stopped = False
        self.cpu = 0.0

    def start(self) -> None:
        self.started = True
        self.events.append(("start", self.name))

    def wait_ready(self, timeout: float) -> str:
        if self.fail_start:
            raise RuntimeError(f"{self.name} was not ready")
        return f"{self.name}-model"

    def check_alive(self) -> None:
        assert self.started and not self.stopped

    def cpu_seconds(self) -> float:
        return self.cpu

    def stop(self) -> None:
        self.stopped = True
        self.events.append(("stop", self.name))


def make_runner(events: list, servers: list, fail_at: int | None = None,
                exc: BaseException | None = None):
    def run_one(server, concurrency, prompts, output_len):
        assert all(s.started and not s.stopped for s in servers)  # both kept running
        if fail_at is not None and len(events) - len(servers) == fail_at:
            raise exc or RuntimeError("the warm-up request failed")
        events.append(("run", server.name, concurrency, tuple(prompts), output_len))
        for s in servers:  # the busy server burns CPU, the idle one a little
            s.cpu += 5.0 if s is server else 0.25
        return summary(10.0 if server.name == PAGEDSERVE else 5.0)
    return run_one


def test_run_comparison_alternates_with_the_same_prompts_per_round():
    events: list = []
    servers = [FakeServer(PAGEDSERVE, events), FakeServer("other", events)]
    results: dict = {}
    run_comparison(servers, [1, 8], 2, lambda ci, r: [f"prompt-{ci}-{r}"], 32,
                   make_runner(events, servers), 5.0, results, report=lambda line: None)
    assert events[:2] == [("start", PAGEDSERVE), ("start", "other")]
    runs = [e for e in events if e[0] == "run"]
    assert [(e[1], e[2]) for e in runs] == [
        (PAGEDSERVE, 1), ("other", 1), ("other", 1), (PAGEDSERVE, 1),
        (PAGEDSERVE, 8), ("other", 8), ("other", 8), (PAGEDSERVE, 8)]
    prompts = [e[3] for e in runs]
    assert prompts[0] == prompts[1] != prompts[2] == prompts[3]  # fresh prompts per round
    assert sorted(events[-2:]) == [("stop", "other"), ("stop", PAGEDSERVE)]
    assert {c: {k: len(v) for k, v in by.items()} for c, by in results.items()} == {
        1: {PAGEDSERVE: 2, "other": 2}, 8: {PAGEDSERVE: 2, "other": 2}}
    assert results[1][PAGEDSERVE][0]["idle_cpu_s"] == {"other": 0.25}
    assert {e[4] for e in runs} == {32}


def test_warmup_runs_each_concurrency_per_server_before_measuring():
    events: list = []
    servers = [FakeServer(PAGEDSERVE, events), FakeServer("other", events)]
    results: dict = {}
    run_comparison(servers, [1, 8], 2, lambda ci, r: [f"prompt-{ci}-{r}"], 32,
                   make_runner(events, servers), 5.0, results, report=lambda line: None,
                   warmup_for=lambda ci: ([f"warm-{ci}"], 4))
    runs = [(e[1], e[2], e[3], e[4]) for e in events if e[0] == "run"]
    assert runs[:4] == [(PAGEDSERVE, 1, ("warm-0",), 4), (PAGEDSERVE, 8, ("warm-1",), 4),
                        ("other", 1, ("warm-0",), 4), ("other", 8, ("warm-1",), 4)]
    assert all(r[3] == 32 for r in runs[4:]) and len(runs) == 12
    assert all(len(v) == 2 for by in results.values() for v in by.values())  # not measured


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_servers_are_stopped_when_a_run_fails(exc):
    events: list = []
    servers = [FakeServer(PAGEDSERVE, events), FakeServer("other", events)]
    results: dict = {}
    with pytest.raises(type(exc)):
        run_comparison(servers, [1, 8], 2, lambda ci, r: [ci, r], 32,
                       make_runner(events, servers, fail_at=3, exc=exc), 5.0, results,
                       report=lambda line: None)
    assert all(s.stopped for s in servers)
    # A B, then B A with the A failing (fail_at counts from 0): the mirrored second round.
    assert {k: len(v) for k, v in results[1].items()} == {PAGEDSERVE: 1, "other": 2}


def test_every_server_is_stopped_even_if_stopping_one_fails():
    events: list = []
    servers = [FakeServer(PAGEDSERVE, events), FakeServer("other", events)]

    def broken_stop():
        raise OSError("cannot signal")

    servers[0].stop = broken_stop
    lines: list[str] = []
    run_comparison(servers, [1], 2, lambda ci, r: [], 32, make_runner(events, servers), 5.0,
                   {}, report=lines.append)
    assert servers[1].stopped and any("cannot signal" in line for line in lines)


def test_servers_are_stopped_when_one_does_not_start():
    events: list = []
    servers = [FakeServer(PAGEDSERVE, events), FakeServer("other", events, fail_start=True)]
    with pytest.raises(RuntimeError, match="not ready"):
        run_comparison(servers, [1], 2, lambda ci, r: [], 32, make_runner(events, servers),
                       5.0, {}, report=lambda line: None, warmup_for=lambda ci: ([], 4))
    assert all(s.stopped for s in servers)
    assert not [e for e in events if e[0] == "run"]


# --- the process layer, mocked ----------------------------------------------------------------

class FakePopen:
    def __init__(self, cmd, exits_on=(signal.SIGTERM,), **kwargs) -> None:
        self.cmd, self.kwargs, self.pid, self.returncode = cmd, kwargs, 4242, None
        self.exits_on = exits_on
        self.signals: list = []

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        if self.signals and self.signals[-1] in self.exits_on:
            self.returncode = -self.signals[-1]
            return self.returncode
        raise subprocess.TimeoutExpired(self.cmd, timeout)


@pytest.fixture
def popen(monkeypatch):
    made: list[FakePopen] = []

    def fake_popen(cmd, **kwargs):
        made.append(FakePopen(cmd, **kwargs))
        return made[-1]

    def fake_killpg(pgid, sig):
        for p in made:
            if p.pid == pgid:
                p.signals.append(sig)

    monkeypatch.setattr(server_process.subprocess, "Popen", fake_popen)
    monkeypatch.setattr(server_process.os, "killpg", fake_killpg)
    return made


def test_stop_terminates_the_group_then_kills_it(popen, tmp_path):
    server = ServerProcess("s", ["serve"], 1, {}, tmp_path / "s.log")
    server.stop()  # never started: nothing to do
    server.start()
    proc = popen[0]
    assert proc.kwargs["start_new_session"] is True
    assert proc.kwargs["env"] == {}
    proc.exits_on = (signal.SIGKILL,)  # ignores SIGTERM
    server.stop(grace=0.01)
    assert proc.signals[:2] == [signal.SIGTERM, signal.SIGKILL]
    num_signals = len(proc.signals)
    server.stop()  # a second stop sends nothing
    assert len(proc.signals) == num_signals
    assert "$ serve" in (tmp_path / "s.log").read_text()


def test_wait_ready_returns_the_served_name_or_reports_a_dead_server(popen, monkeypatch,
                                                                     tmp_path):
    class Response:
        def __init__(self, status_code: int) -> None:
            self.status_code = status_code

        def json(self):
            return {"data": [{"id": "served-name"}]}

    urls = []
    health = iter([503, 503, 200])  # /v1/models answers while the engine still loads

    def get(url, timeout):
        urls.append(url)
        return Response(next(health) if url.endswith("/health") else 200)

    monkeypatch.setattr(server_process.httpx, "get", get)
    server = ServerProcess("s", ["serve"], 1234, {}, tmp_path / "s.log")
    server.start()
    assert server.wait_ready(timeout=5, poll=0.001) == "served-name" == server.served_model
    assert urls == ["http://127.0.0.1:1234/health"] * 3 + ["http://127.0.0.1:1234/v1/models"]
    popen[0].returncode = 1
    (tmp_path / "s.log").write_text("Traceback: out of memory\n")
    with pytest.raises(RuntimeError, match="out of memory"):
        server.wait_ready(timeout=1)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    return parser.parse_args(argv)


def test_build_servers_commands_and_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "8")
    args = parse(["--other-python", "/v/bin/python", "--model", "/m", "--pagedserve-args",
                  "--max-num-seqs 64", "--other-args", "--block-size 32"])
    ours, other = compare.build_servers(args, str(tmp_path / "log"))
    assert ours.cmd[:5] == [sys.executable, "-m", "server", "serve", "/m"]
    assert ours.cmd[-6:] == ["--dtype", "float32", "--max-model-len", "2048", "--max-num-seqs",
                             "64"]
    assert "--port" in ours.cmd and str(ours.port) in ours.cmd
    assert other.cmd[:5] == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server",
                             "--model", "/m"]
    assert other.cmd[-6:] == ["--dtype", "float32", "--max-model-len", "2048", "--block-size",
                              "32"]
    assert other.name == "vllm-cpu" and other.port != ours.port
    assert other.env["VLLM_CPU_KVCACHE_SPACE"] == "8"  # the caller's value wins
    assert other.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert other.env["HF_HUB_OFFLINE"] == "1" and "PYTHONPATH" not in other.env
    assert ours.env["PYTHONPATH"] == "/somewhere"


def test_group_cpu_seconds_and_rss_read_proc():
    if not os.path.isdir("/proc"):
        pytest.skip("no /proc")
    value = server_process.group_cpu_seconds(os.getpgrp())
    assert value is not None and value > 0
    rss = server_process.group_rss_bytes(os.getpgrp())
    assert rss is not None and rss > 10 << 20  # this Python process alone holds more


# --- main, end to end with the process layer and the load generator faked ---------------------

@pytest.fixture
def fake_layer(monkeypatch):
    calls: dict = {"run": [], "stop": []}

    def start(self):
        self.proc = FakePopen(self.cmd)

    def wait_ready(self, timeout):
        self.served_model = f"{self.name}-model"
        return self.served_model

    def run_workload(server, concurrency, prompts, output_len, seed):
        if output_len != 16:  # the warm-up pass
            calls.setdefault("warmup", []).append((server.name, concurrency, len(prompts),
                                                   output_len))
            return summary(1.0)
        calls["run"].append((server.name, server.served_model, concurrency, len(prompts)))
        calls.setdefault("prompts", []).append(prompts)
        if calls.get("fail") == len(calls["run"]):
            raise RuntimeError("the warm-up request failed: HTTP 500")
        tok_s = 30.0 if server.name == PAGEDSERVE else 20.0
        return summary(tok_s, total_output_tokens=len(prompts) * output_len)

    monkeypatch.setattr(ServerProcess, "start", start)
    monkeypatch.setattr(ServerProcess, "wait_ready", wait_ready)
    monkeypatch.setattr(ServerProcess, "stop", lambda self: calls["stop"].append(self.name))
    monkeypatch.setattr(ServerProcess, "cpu_seconds", lambda self: 1.0)
    monkeypatch.setattr(compare, "run_workload", run_workload)
    return calls


def test_main_prints_ratios_and_writes_json(fake_layer, tmp_path, capsys):
    out = tmp_path / "cmp.json"
    args = parse(["--other-python", "/v/bin/python", "--model", "/m", "--concurrency", "1,4",
                  "--output-len", "16", "--warmup-output-len", "8", "--json", str(out),
                  "--log-prefix", str(tmp_path / "cmp")])
    assert compare.main(args) == 0
    assert fake_layer["run"] == [
        (PAGEDSERVE, "pagedserve-model", 1, 8), ("vllm-cpu", "vllm-cpu-model", 1, 8),
        ("vllm-cpu", "vllm-cpu-model", 1, 8), (PAGEDSERVE, "pagedserve-model", 1, 8),
        (PAGEDSERVE, "pagedserve-model", 4, 16), ("vllm-cpu", "vllm-cpu-model", 4, 16),
        ("vllm-cpu", "vllm-cpu-model", 4, 16), (PAGEDSERVE, "pagedserve-model", 4, 16)]
    assert sorted(fake_layer["stop"]) == [PAGEDSERVE, "vllm-cpu"]
    assert fake_layer["warmup"] == [(PAGEDSERVE, 1, 1, 8), (PAGEDSERVE, 4, 4, 8),
                                    ("vllm-cpu", 1, 1, 8), ("vllm-cpu", 4, 4, 8)]
    prompts = fake_layer["prompts"]
    assert prompts[0] == prompts[1] and prompts[2] == prompts[3]  # same within a round
    assert prompts[0] != prompts[2]  # new ones each round: no prefix-cache hits across rounds
    assert all(len(p) == 128 for p in prompts[0])
    text = capsys.readouterr().out
    assert "concurrency 4" in text and "1.50 [1.50–1.50]" in text
    data = json.loads(out.read_text())
    assert data["num_prompts"] == [8, 16] and data["error"] is None
    tok = [r for r in data["comparison"]["vllm-cpu"] if r["metric"] == "output tok/s"]
    assert [(r["concurrency"], r["ratio_mean"]) for r in tok] == [(1, 1.5), (4, 1.5)]


def test_main_stops_servers_and_fails_when_a_run_fails(fake_layer, tmp_path, capsys):
    fake_layer["fail"] = 3
    args = parse(["--other-python", "/v/bin/python", "--model", "/m", "--concurrency", "2",
                  "--output-len", "16", "--warmup-output-len", "0",
                  "--log-prefix", str(tmp_path / "cmp")])
    assert compare.main(args) == 1
    assert sorted(fake_layer["stop"]) == [PAGEDSERVE, "vllm-cpu"]
    assert "warm-up request failed" in capsys.readouterr().err


def test_llama_cpp_runs_in_the_same_alternation(fake_layer, tmp_path, capsys):
    out = tmp_path / "cmp.json"
    args = parse(["--other-python", "/v/bin/python", "--llamacpp-server", "/l/llama-server",
                  "--gguf", "/m.gguf", "--model", "/m", "--concurrency", "2",
                  "--output-len", "16", "--warmup-output-len", "0", "--json", str(out),
                  "--log-prefix", str(tmp_path / "cmp")])
    assert compare.main(args) == 0
    assert [run[0] for run in fake_layer["run"]] == [PAGEDSERVE, "vllm-cpu", "llama.cpp",
                                                     "llama.cpp", "vllm-cpu", PAGEDSERVE]
    prompts = fake_layer["prompts"]
    assert prompts[0] == prompts[1] == prompts[2] and prompts[3] == prompts[5]
    text = capsys.readouterr().out
    assert "pagedserve/vllm-cpu" in text and "pagedserve/llama.cpp" in text
    assert set(json.loads(out.read_text())["comparison"]) == {"vllm-cpu", "llama.cpp"}


def test_llama_cpp_command_serves_the_gguf_with_a_slot_per_request(tmp_path):
    args = parse(["--llamacpp-server", "/l/llama-server", "--gguf", "/m.gguf", "--model", "/m",
                  "--concurrency", "1,64", "--max-model-len", "1024", "--llamacpp-args",
                  "-t 2 -tb 2"])
    ours, llamacpp = compare.build_servers(args, str(tmp_path / "log"))
    assert ours.name == PAGEDSERVE and llamacpp.name == "llama.cpp"
    cmd = llamacpp.cmd
    assert cmd[:3] == ["/l/llama-server", "-m", "/m.gguf"] and cmd[-4:] == ["-t", "2", "-tb", "2"]
    assert cmd[cmd.index("-np") + 1] == "64" and cmd[cmd.index("-c") + 1] == str(64 * 1024)
    assert "--dtype" not in cmd and str(llamacpp.port) in cmd


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "1"], "rounds"),
    (["--concurrency", "1,8", "--num-prompts", "8,16,32"], "num-prompts"),
    (["--llamacpp-server", "/l/llama-server"], "--gguf"),
])
def test_main_rejects_bad_arguments(fake_layer, argv, message):
    args = parse(["--other-python", "p", "--model", "/m", *argv])
    with pytest.raises(ValueError, match=message):
        compare.main(args)
    assert fake_layer["run"] == []


def test_main_needs_a_peer(fake_layer):
    with pytest.raises(ValueError, match="nothing to compare with"):
        compare.main(parse(["--model", "/m"]))
    assert fake_layer["run"] == []
