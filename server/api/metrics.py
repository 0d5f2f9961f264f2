"""Prometheus metrics (names follow vLLM's, prefixed `pagedserve:`), one registry per app."""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server.outputs import EngineCoreOutput, EngineStats

logger = logging.getLogger("server.stats")

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0)


class Metrics:
    def __init__(self, model_name: str, log_interval: float = 10.0) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"pagedserve:{name}", doc, labels, registry=r)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(f"pagedserve:{name}", doc, labels + list(extra), registry=r)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(f"pagedserve:{name}", doc, labels, buckets=_LATENCY_BUCKETS,
                             registry=r)

        self.model_name = model_name
        m = model_name
        self.running = gauge("num_requests_running", "Requests in the running batch").labels(m)
        self.waiting = gauge("num_requests_waiting", "Requests waiting to run").labels(m)
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use").labels(m)
        self.prefix_queries = counter("prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache").labels(m)
        self.prefix_hits = counter("prefix_cache_hits",
                                   "Prompt tokens found in the prefix cache").labels(m)
        self.preemptions = counter("num_preemptions", "Requests preempted").labels(m)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of admitted requests")
        self.generation_tokens = counter("generation_tokens", "Generated tokens").labels(m)
        self.finished = counter("request_success", "Finished requests by reason",
                                ("finished_reason",))
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token").labels(m)
        self.itl = histogram("inter_token_latency_seconds", "Time between output tokens").labels(m)
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency").labels(m)
        self.queue_time = histogram("request_queue_time_seconds",
                                    "Time from arrival to first scheduling").labels(m)
        self._last: EngineStats | None = None
        self._log_interval = log_interval
        self._log_tokens = 0
        self._log_prompt_tokens = 0
        self._log_time = time.monotonic()

    def on_step(self, outputs: list[EngineCoreOutput], stats: EngineStats) -> None:
        """Called on the event loop's thread after each engine step."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        last = self._last
        self.prefix_queries.inc(stats.prefix_cache_queries - (last.prefix_cache_queries
                                                              if last else 0))
        self.prefix_hits.inc(stats.prefix_cache_hits - (last.prefix_cache_hits if last else 0))
        self.preemptions.inc(stats.num_preemptions - (last.num_preemptions if last else 0))
        self._last = stats
        num_tokens = sum(len(o.new_token_ids) for o in outputs)
        self.generation_tokens.inc(num_tokens)
        self._log_tokens += num_tokens
        for out in outputs:
            if out.queue_time is not None:
                self.queue_time.observe(out.queue_time)
        self.maybe_log(stats)

    def on_prompt(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.labels(self.model_name).inc(num_prompt_tokens)
        self._log_prompt_tokens += num_prompt_tokens

    def on_finished(self, finish_reason: str) -> None:
        self.finished.labels(self.model_name, finish_reason).inc()

    def maybe_log(self, stats: EngineStats, force: bool = False) -> None:
        now = time.monotonic()
        elapsed = now - self._log_time
        if not force and elapsed < self._log_interval:
            return
        hit_rate = (stats.prefix_cache_hits / stats.prefix_cache_queries
                    if stats.prefix_cache_queries else 0.0)
        logger.info("prompt throughput: %.1f tok/s, generation throughput: %.1f tok/s, "
                    "running: %d, waiting: %d, KV cache usage: %.1f%%, prefix cache hit rate: "
                    "%.1f%%", self._log_prompt_tokens / max(elapsed, 1e-9),
                    self._log_tokens / max(elapsed, 1e-9), stats.num_running,
                    stats.num_waiting, 100 * stats.kv_cache_usage, 100 * hit_rate)
        self._log_time, self._log_tokens, self._log_prompt_tokens = now, 0, 0
