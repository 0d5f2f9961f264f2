"""`pagedserve bench profile`: where one engine step's time goes, at a fixed decode batch or
over a batch of prompts' prefill.

Decode (the default): adds --batch-size random prompts of --input-len tokens (greedy,
ignore_eos), steps the engine until every prompt is prefilled plus --warmup-steps decode steps,
then times --steps decode steps twice: once split into the step's phases (schedule, input
preparation, model forward, logits, sampling, update), once under torch.profiler for the ops that
take the time (the compiled CPU kernels listed as `pagedserve::NAME`). The two passes are separate
so that the profiler's overhead does not show in the phase times.

--prefill: the steps that carry prompt tokens only. Each pass adds --batch-size fresh prompts
(max_tokens=1, so none decodes) and steps the engine until they finish, in steps of up to
--max-num-batched-tokens; a warm-up pass, then the same two measured passes.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from server.bench.serve import make_prompts
from server.config_flags import add_engine_flags, engine_flag_kwargs

PHASES = ("schedule", "prepare", "forward", "logits", "sample", "update")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every `bench profile` flag (the CLI adds --log-level)."""
    parser.add_argument("--model", default=None,
                        help="Hugging Face model directory (default: the bundled stories260k)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences decoding together")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per sequence")
    parser.add_argument("--vocab-size", type=int, default=500,
                        help="random prompt token ids are drawn below this")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="decode steps measured per pass")
    parser.add_argument("--prefill", action="store_true",
                        help="profile the prompts' prefill steps instead of decode steps")
    parser.add_argument("--top", type=int, default=15, help="ops listed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the summary")
    add_engine_flags(parser.add_argument_group("engine"))


def _wrap(owner: Any, name: str, totals: dict[str, float], phase: str) -> Callable[[], None]:
    """Times every call of `owner.name` into totals[phase]; returns the undo."""
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[phase] += time.perf_counter() - start

    own = vars(owner)
    had_own, previous = name in own, own.get(name)
    setattr(owner, name, timed)

    def undo() -> None:
        if had_own:
            setattr(owner, name, previous)
        else:
            delattr(owner, name)
    return undo


def _drive(engine, steps: int | None) -> int:
    """Steps the engine `steps` times, or until no request is left (None); returns the count."""
    if steps is not None:
        for _ in range(steps):
            engine.step()
        return steps
    count = 0
    while engine.has_unfinished_requests():
        engine.step()
        count += 1
    return count


def phase_times(engine, steps: int | None) -> tuple[float, dict[str, float]]:
    """Mean step time and mean time per phase, both in ms, over `steps` engine steps (None: until
    no request is left)."""
    totals: dict[str, float] = defaultdict(float)
    runner, scheduler = engine.runner, engine.scheduler
    undo = [_wrap(scheduler, "schedule", totals, "schedule"),
            _wrap(runner, "_prepare", totals, "prepare"),
            _wrap(runner, "_forward", totals, "forward"),
            _wrap(runner.model, "compute_logits", totals, "logits"),
            _wrap(runner, "sampler", totals, "sample"),
            _wrap(scheduler, "update_from_output", totals, "update")]
    try:
        start = time.perf_counter()
        steps = max(1, _drive(engine, steps))
        elapsed = time.perf_counter() - start
    finally:
        for u in undo:
            u()
    return 1e3 * elapsed / steps, {p: 1e3 * totals[p] / steps for p in PHASES}


def _labelled(owner: Any, name: str) -> Callable[[], None]:
    """Calls of `owner.name` show as `pagedserve::name` under torch.profiler (the compiled CPU
    kernels are ctypes calls, no torch ops); returns the undo."""
    from torch.profiler import record_function

    original = getattr(owner, name)

    def labelled(*args, **kwargs):
        with record_function(f"pagedserve::{name}"):
            return original(*args, **kwargs)

    setattr(owner, name, labelled)
    return lambda: setattr(owner, name, original)


def top_ops(engine, steps: int | None, top: int) -> list[dict]:
    """The ops with the most self CPU time over `steps` steps (None: until no request is left),
    per step."""
    from torch.profiler import ProfilerActivity, profile

    from pagedserve_kernels import cpu_attention, cpu_decoder, cpu_fused, cpu_linear

    undo = [_labelled(cpu_attention, "paged_decode"), _labelled(cpu_linear, "linear"),
            _labelled(cpu_decoder, "decode_step")]
    undo += [_labelled(cpu_fused, name) for name in ("add_rms_norm", "silu_and_mul", "rotary_")]
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steps = max(1, _drive(engine, steps))
    finally:
        for u in undo:
            u()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
             "calls_per_step": e.count / steps, "share": e.self_cpu_time_total / total}
            for e in events[:top]]


def _reach_decode(engine, warmup_steps: int) -> None:
    scheduler = engine.scheduler
    while scheduler.waiting or any(r.num_computed_tokens < len(r.prompt_token_ids)
                                   for r in scheduler.running):
        engine.step()
    for _ in range(warmup_steps):
        engine.step()


def format_profile(summary: dict) -> str:
    if summary.get("prefill"):
        tokens = summary["batch_size"] * summary["input_len"]
        head = (f"prefill of {summary['batch_size']} prompts x {summary['input_len']} tokens in "
                f"{summary['steps']} steps: {summary['step_ms']:.1f} ms per step, "
                f"{tokens / (summary['steps'] * summary['step_ms'] / 1e3):.0f} prompt tokens/s")
    else:
        head = (f"decode batch {summary['batch_size']}, context {summary['input_len']}+ tokens: "
                f"{summary['step_ms']:.1f} ms per step")
    lines = [head]
    for phase in PHASES:
        ms = summary["phases_ms"][phase]
        lines.append(f"  {phase:<9} {ms:8.2f} ms  {100 * ms / summary['step_ms']:5.1f}%")
    lines.append("ops by self CPU time (torch.profiler, separate pass):")
    width = max((len(o["op"]) for o in summary["ops"]), default=10)
    for o in summary["ops"]:
        lines.append(f"  {o['op']:<{width}}  {o['self_ms_per_step']:8.2f} ms/step  "
                     f"{100 * o['share']:5.1f}%  {o['calls_per_step']:7.1f} calls/step")
    return "\n".join(lines)


def _prefill_pass(engine, args, seed: int) -> None:
    """Adds --batch-size fresh prompts (their own seed: no prefix-cache hits) that finish with
    their first token."""
    from server import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(make_prompts(args.batch_size, args.input_len, args.vocab_size,
                                            seed)):
        engine.add_request(f"prefill-{seed}-{i}", prompt, params)


def profile_prefill(engine, args) -> dict:
    if args.input_len > engine.max_model_len:
        raise SystemExit(f"--input-len {args.input_len} exceeds max_model_len="
                         f"{engine.max_model_len}")
    _prefill_pass(engine, args, args.seed)
    steps = _drive(engine, None)
    _prefill_pass(engine, args, args.seed + 1)
    step_ms, phases = phase_times(engine, None)
    _prefill_pass(engine, args, args.seed + 2)
    return {"prefill": True, "steps": steps, "step_ms": step_ms, "phases_ms": phases,
            "ops": top_ops(engine, None, args.top)}


def profile_decode(engine, args) -> dict:
    from server import SamplingParams

    total_steps = args.warmup_steps + 2 * args.steps + 2
    if args.input_len + total_steps > engine.max_model_len:
        raise SystemExit(f"--input-len {args.input_len} plus {total_steps} decode steps exceeds "
                         f"max_model_len={engine.max_model_len}")
    params = SamplingParams(max_tokens=total_steps + 8, temperature=0.0, ignore_eos=True)
    prompts = make_prompts(args.batch_size, args.input_len, args.vocab_size, args.seed)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"profile-{i}", prompt, params)
    _reach_decode(engine, args.warmup_steps)
    step_ms, phases = phase_times(engine, args.steps)
    return {"steps": args.steps, "step_ms": step_ms, "phases_ms": phases,
            "ops": top_ops(engine, args.steps, args.top)}


def main(args) -> int:
    from server import LLM

    engine = LLM(args.model, **engine_flag_kwargs(args)).engine
    measured = (profile_prefill if args.prefill else profile_decode)(engine, args)
    summary = {"batch_size": args.batch_size, "input_len": args.input_len, **measured,
               "model": str(engine.model_dir), "engine": engine_flag_kwargs(args)}
    print(format_profile(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0
