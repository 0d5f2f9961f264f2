"""The command line: help, flag parsing, and the CPU side of `bench kernels`."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from server.cli import _BENCH_COMMANDS, build_parser, main, server_config
from server.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, ServerConfig
from server.config_flags import add_engine_flags, engine_flag_kwargs, engine_kwargs

REPO_ROOT = Path(__file__).resolve().parents[2]
ENGINE_CONFIGS = (ModelConfig, CacheConfig, SchedulerConfig)


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("serve", "generate", "bench"):
        assert command in out


def test_serve_flags_map_to_config_fields():
    args = build_parser().parse_args([
        "serve", "/m", "--max-model-len", "128", "--block-size", "32", "--kv-cache-memory",
        "1000000", "--max-num-seqs", "3", "--max-num-batched-tokens", "64", "--dtype",
        "bfloat16", "--device", "cpu", "--seed", "7", "--no-enable-prefix-caching",
        "--attention-backend", "torch", "--long-prefill-token-threshold", "48",
        "--no-compiled-decode", "--quantization", "none", "--num-blocks", "40",
        "--cpu-gemm", "onednn"])
    assert engine_kwargs(args) == dict(
        model="/m", dtype="bfloat16", device="cpu", seed=7, attention_backend="torch",
        compiled_decode=False, quantization="none", cpu_gemm="onednn", max_model_len=128,
        block_size=32,
        kv_cache_memory=1000000, num_blocks=40, enable_prefix_caching=False, max_num_seqs=3,
        max_num_batched_tokens=64, long_prefill_token_threshold=48)
    assert args.host == "127.0.0.1" and args.port == 8000 and args.engine_mode == "thread"
    assert EngineConfig.from_kwargs(**engine_kwargs(args)).scheduler.long_prefill_token_threshold \
        == 48


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


@pytest.mark.parametrize("config_class", [*ENGINE_CONFIGS, ServerConfig])
def test_every_config_field_has_one_flag_with_the_dataclass_default(config_class):
    """A config field without a `serve` flag, or a flag whose default is not the field's,
    fails here: the defaults are written once, in server/config.py."""
    actions = {a.dest: a for a in _subcommand(build_parser(), "serve")._actions}
    for field in dataclasses.fields(config_class):
        action = actions.get(field.name)
        assert action is not None, f"no serve flag for {config_class.__name__}.{field.name}"
        if field.name == "model":
            assert action.option_strings == []  # the positional argument
        else:
            assert "--" + field.name.replace("_", "-") in action.option_strings, field.name
        assert action.default == field.default, field.name
        if isinstance(field.default, bool):  # both spellings, --x and --no-x
            assert "--no-" + field.name.replace("_", "-") in action.option_strings


def test_default_flags_build_the_default_configs(monkeypatch):
    monkeypatch.delenv("PAGEDSERVE_API_KEY", raising=False)
    args = build_parser().parse_args(["serve"])
    assert EngineConfig.from_kwargs(**engine_kwargs(args)) == EngineConfig(
        ModelConfig(), CacheConfig(), SchedulerConfig())
    assert server_config(args) == ServerConfig()
    args = build_parser().parse_args(["serve", "--allowed-origins", "http://a", "http://b",
                                      "--chat-template", "{{ x }}", "--log-level", "error"])
    assert server_config(args) == ServerConfig(
        allowed_origins=("http://a", "http://b"), chat_template="{{ x }}", log_level="error")
    monkeypatch.setenv("PAGEDSERVE_API_KEY", "k")
    assert server_config(args).api_key == "k"


def test_engine_flags_cover_every_engine_field_but_model_and_seed():
    """The flag set the offline benchmarks share (`add_engine_flags`)."""
    parser = argparse.ArgumentParser()
    add_engine_flags(parser.add_argument_group("engine"))
    assert engine_flag_kwargs(parser.parse_args([])) == {
        f.name: f.default for c in ENGINE_CONFIGS for f in dataclasses.fields(c)
        if f.name not in ("model", "seed")}
    generate = {a.dest for a in _subcommand(build_parser(), "generate")._actions}
    assert {f.name for c in ENGINE_CONFIGS for f in dataclasses.fields(c)} <= generate


def test_serve_imports_no_bench_module():
    """Building the parser and parsing `serve` loads no bench module (nor torch.profiler, nor
    tests); choosing `bench NAME` loads that module only."""
    code = textwrap.dedent("""
        import sys
        from server.cli import build_parser

        def loaded(*prefixes):
            return sorted(m for m in sys.modules
                          if any(m == p or m.startswith(p + ".") for p in prefixes))

        args = build_parser().parse_args(["serve", "/m", "--port", "0"])
        assert args.func.__name__ == "_serve", args.func
        assert not loaded("server.bench", "torch.profiler", "tests"), loaded(
            "server.bench", "torch.profiler", "tests")
        args = build_parser().parse_args(["bench", "make-model", "--preset", "tiny", "--out", "x"])
        assert args.func.__module__ == "server.bench.make_model", args.func
        assert loaded("server.bench") == ["server.bench", "server.bench.make_model"], loaded(
            "server.bench")
        assert not loaded("tests"), loaded("tests")
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_bench_help_lists_every_command_with_its_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for name, (_, help_text) in _BENCH_COMMANDS.items():
        assert f"{name} {' '.join(help_text.split())}" in out, name


@pytest.mark.parametrize("command,flags", [
    ("make-model", ["--preset", "--out", "--seed", "--dtype", "--log-level"]),
    ("roofline", ["--log-level"]),
])
def test_bench_command_help_shows_its_flags(command, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in flags:
        assert flag in out, flag


def test_bench_kernels_dry_run_prints_the_plan(capsys):
    assert main(["bench", "kernels", "--dry-run", "--decode-batches", "1,256",
                 "--decode-contexts", "512,32768", "--prefill-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "plan decode batch=1 tokens=512" in out
    assert "skip decode batch=256 context=32768" in out
    assert "plan cache_write batch=1 tokens=8" in out


@pytest.mark.parametrize("argv,message", [
    (["bench", "kernels", "--dry-run", "--num-heads", "6", "--num-kv-heads", "4"],
     "multiple of --num-kv-heads"),
    (["bench", "kernels", "--dry-run", "--block-size", "8"], "power of two >= 16"),
])
def test_bench_kernels_rejects_bad_arguments(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bench_kernels_list_arguments_are_checked(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "kernels", "--decode-batches", "1,x"])
    assert "comma-separated integers" in capsys.readouterr().err


def test_bench_kernels_without_cuda_says_so(capsys):
    assert main(["bench", "kernels", "--prefill-tokens", "8"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_generate_reports_a_missing_model(capsys, tmp_path):
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
