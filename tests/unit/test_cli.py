"""The command line: help, flag parsing, and the CPU side of `bench kernels`."""

from __future__ import annotations

import pytest

from server.cli import build_parser, engine_kwargs, main


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
        "--attention-backend", "torch"])
    assert engine_kwargs(args) == dict(
        model="/m", dtype="bfloat16", device="cpu", seed=7, attention_backend="torch",
        max_model_len=128, block_size=32, kv_cache_memory=1000000,
        enable_prefix_caching=False, max_num_seqs=3, max_num_batched_tokens=64)
    assert args.host == "127.0.0.1" and args.port == 8000 and args.engine_mode == "thread"


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
