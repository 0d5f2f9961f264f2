"""Continuous-batching scheduler: one token budget per step, chunked prefill, preemption."""
