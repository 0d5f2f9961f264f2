"""Compiled grammars, one per constraint, kept in a bounded LRU. Compiling (the tokenizer's
setup the first time, then each new constraint) runs on a worker thread, so the engine loop
goes on stepping other requests meanwhile; xgrammar releases the GIL for most of it."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import xgrammar as xgr

from server.sampling_params import StructuredOutputsParams
from server.structured.grammar import build_grammar

DEFAULT_MAX_GRAMMARS = 256


class GrammarCache:
    def __init__(self, load_tokenizer: Callable[[], Any], vocab_size: int,
                 stop_token_ids: Iterable[int], max_entries: int = DEFAULT_MAX_GRAMMARS) -> None:
        self._load_tokenizer = load_tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids) or None  # None: the tokenizer's own
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self._compiled: OrderedDict[StructuredOutputsParams, xgr.CompiledGrammar] = OrderedDict()
        self._pending: dict[StructuredOutputsParams, Future[xgr.CompiledGrammar]] = {}
        self._compiler: xgr.GrammarCompiler | None = None
        self._compiler_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    def get(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar | None:
        with self._lock:
            compiled = self._compiled.get(spec)
            if compiled is not None:
                self._compiled.move_to_end(spec)
            return compiled

    def compile_async(self, spec: StructuredOutputsParams,
                      grammar: xgr.Grammar | None = None) -> Future[xgr.CompiledGrammar]:
        """The compiled grammar, now (a cache hit) or once the worker thread has built it; a
        constraint already being compiled is compiled once. `grammar`: the constraint's
        `build_grammar`, when the caller has it already."""
        with self._lock:
            future = self._pending.get(spec)
            if future is not None:
                return future
            compiled = self._compiled.get(spec)
            future = Future()
            if compiled is not None:
                future.set_result(compiled)
                return future
            self._pending[spec] = future
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        self._executor.submit(self._run, spec, future, grammar)
        return future

    def compile(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """The compiled grammar, compiled on this thread on a miss (raises ValueError)."""
        compiled = self.get(spec)
        return compiled if compiled is not None else self._store(spec, self._build(spec))

    def matcher(self, spec: StructuredOutputsParams) -> xgr.GrammarMatcher:
        return xgr.GrammarMatcher(self.compile(spec))

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _run(self, spec: StructuredOutputsParams, future: Future,
             grammar: xgr.Grammar | None) -> None:
        try:
            compiled = self._store(spec, self._build(spec, grammar))
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
            with self._lock:
                self._pending.pop(spec, None)
            future.set_exception(e)
            return
        with self._lock:
            self._pending.pop(spec, None)
        future.set_result(compiled)

    def _build(self, spec: StructuredOutputsParams,
               grammar: xgr.Grammar | None = None) -> xgr.CompiledGrammar:
        return self._get_compiler().compile_grammar(grammar or build_grammar(spec))

    def _store(self, spec: StructuredOutputsParams,
               compiled: xgr.CompiledGrammar) -> xgr.CompiledGrammar:
        with self._lock:
            self._compiled[spec] = compiled
            self._compiled.move_to_end(spec)
            while len(self._compiled) > self._max_entries:
                self._compiled.popitem(last=False)
        return compiled

    def _get_compiler(self) -> xgr.GrammarCompiler:
        with self._compiler_lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self._load_tokenizer(), vocab_size=self._vocab_size,
                    stop_token_ids=self._stop_token_ids)
                # One thread: the forward pass needs the cores more than a compile does.
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler
