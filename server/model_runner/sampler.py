"""Batched sampling over the logits of the requests that sample this step.

Order of operations per row: logit_bias, min_tokens masking, repetition / frequency / presence
penalties, the structured-outputs grammar's token mask, then greedy argmax or temperature,
top-k, top-p, min-p and an exponential race drawn from the request's own generator when it
has a seed (so its draws do not depend on the batch). Logprobs are those of the raw model
distribution, as vLLM reports them by default. A row with a grammar skips min_tokens: the
grammar decides where its output may end.
"""

from __future__ import annotations

import torch

from pagedserve_kernels.argmax import argmax_rows
from server.model_runner.request_state import RequestState
from server.outputs import SampleResult
from server.structured.matcher import apply_grammar_masks


def _edits_logits(row: RequestState) -> bool:
    params = row.sampling_params
    return bool(params.logit_bias or params.repetition_penalty != 1.0
                or params.frequency_penalty or params.presence_penalty
                or row.num_output_tokens < params.min_tokens or row.grammar is not None)


def _apply_logit_bias(logits: torch.Tensor, rows: list[RequestState]) -> None:
    idx_r, idx_t, vals = [], [], []
    vocab = logits.shape[1]
    for i, row in enumerate(rows):
        for token_id, bias in (row.sampling_params.logit_bias or {}).items():
            if 0 <= token_id < vocab:
                idx_r.append(i)
                idx_t.append(token_id)
                vals.append(bias)
    if idx_r:
        logits.index_put_((torch.tensor(idx_r), torch.tensor(idx_t)),
                          torch.tensor(vals, dtype=logits.dtype, device=logits.device),
                          accumulate=True)


def _apply_min_tokens(logits: torch.Tensor, rows: list[RequestState]) -> None:
    vocab = logits.shape[1]
    for i, row in enumerate(rows):
        params = row.sampling_params
        if row.num_output_tokens >= params.min_tokens or row.grammar is not None:
            continue
        banned = set(params.stop_token_ids)
        if not params.ignore_eos:
            banned |= row.eos_token_ids
        banned_ids = [t for t in banned if 0 <= t < vocab]
        if banned_ids:
            logits[i, banned_ids] = float("-inf")


def _apply_penalties(logits: torch.Tensor, rows: list[RequestState]) -> None:
    vocab = logits.shape[1]
    device = logits.device
    for i, row in enumerate(rows):
        params = row.sampling_params
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(sorted({t for t in row.token_ids if 0 <= t < vocab}),
                                dtype=torch.long, device=device)
            values = logits[i, seen]
            logits[i, seen] = torch.where(values > 0, values / params.repetition_penalty,
                                          values * params.repetition_penalty)
        if params.frequency_penalty or params.presence_penalty:
            output = [t for t in row.output_token_ids if 0 <= t < vocab]
            if output:
                counts = torch.bincount(torch.tensor(output, device=device), minlength=vocab)
                counts = counts[:vocab].to(logits.dtype)
                logits[i] -= params.frequency_penalty * counts
                logits[i] -= params.presence_penalty * (counts > 0).to(logits.dtype)


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
            min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens outside top-k / top-p / min-p with -inf (0 / 1.0 / 0.0 mean off)."""
    vocab = logits.shape[1]
    if bool((min_p > 0).any()):
        probs = torch.softmax(logits, dim=-1)
        threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if not bool(((top_k > 0) & (top_k < vocab)).any() or (top_p < 1.0).any()):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(1)
    remove = ranks >= k
    sorted_probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    remove |= before >= top_p.unsqueeze(1)
    remove[:, 0] = False
    return logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[device] = gen
        return gen

    def __call__(self, logits: torch.Tensor, rows: list[RequestState]) -> list[SampleResult]:
        """logits: [len(rows), vocab_size]; returns one SampleResult per row."""
        edits = any(_edits_logits(r) for r in rows)
        max_logprobs = max((r.sampling_params.logprobs or 0 for r in rows
                            if r.sampling_params.logprobs is not None), default=-1)
        max_logprobs = min(max_logprobs, logits.shape[1])
        if not edits and max_logprobs < 0 and all(r.sampling_params.greedy for r in rows):
            return [SampleResult(t) for t in argmax_rows(logits).tolist()]  # in its own dtype
        # The edits below are in place: copy only when some row has one to make.
        logits = logits.to(torch.float32, copy=edits)
        raw_logprobs = None
        if max_logprobs >= 0:
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        _apply_logit_bias(logits, rows)
        _apply_min_tokens(logits, rows)
        _apply_penalties(logits, rows)
        apply_grammar_masks(logits, [(i, r.grammar) for i, r in enumerate(rows)
                                     if r.grammar is not None])

        sampled = argmax_rows(logits)
        random_rows = [i for i, r in enumerate(rows) if not r.sampling_params.greedy]
        if random_rows:
            sampled[random_rows] = self._sample(logits[random_rows],
                                                [rows[i] for i in random_rows])
        return self._results(sampled, raw_logprobs, rows, max_logprobs)

    def _sample(self, logits: torch.Tensor, rows: list[RequestState]) -> torch.Tensor:
        device = logits.device
        params = [r.sampling_params for r in rows]
        temperature = torch.tensor([p.temperature for p in params], device=device)
        top_k = torch.tensor([p.top_k for p in params], device=device)
        top_p = torch.tensor([p.top_p for p in params], device=device)
        min_p = torch.tensor([p.min_p for p in params], device=device)
        logits = _filter(logits / temperature.unsqueeze(1), top_k, top_p, min_p)
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs)
        shared = [i for i, r in enumerate(rows) if r.generator is None]
        if shared:
            noise[shared] = torch.empty((len(shared), probs.shape[1]), device=device).exponential_(
                generator=self._shared_generator(device))
        for i, row in enumerate(rows):
            if row.generator is not None:
                noise[i].exponential_(generator=row.generator)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _results(sampled: torch.Tensor, raw_logprobs: torch.Tensor | None,
                 rows: list[RequestState], max_logprobs: int) -> list[SampleResult]:
        token_ids = sampled.tolist()
        if raw_logprobs is None:
            return [SampleResult(t) for t in token_ids]
        chosen = raw_logprobs.gather(1, sampled.unsqueeze(1)).squeeze(1).tolist()
        top_vals, top_ids = (raw_logprobs.topk(max_logprobs, dim=-1) if max_logprobs > 0
                             else (None, None))
        results = []
        for i, (token_id, row) in enumerate(zip(token_ids, rows)):
            num = row.sampling_params.logprobs
            if num is None:
                results.append(SampleResult(token_id))
                continue
            top = ({} if not num or top_ids is None or top_vals is None else
                   dict(zip(top_ids[i, :num].tolist(), top_vals[i, :num].tolist())))
            results.append(SampleResult(token_id, chosen[i], top))
        return results


def prompt_token_logprobs(logits: torch.Tensor, target_ids: list[int],
                          num_top: int) -> list[SampleResult]:
    """The raw logprob (no penalty, bias or temperature) and rank of each target token under
    its row of `logits`, with the row's `num_top` most likely tokens."""
    logprobs = torch.log_softmax(logits.to(torch.float32), dim=-1)
    targets = torch.tensor(target_ids, device=logits.device).unsqueeze(1)
    chosen = logprobs.gather(1, targets)
    ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
    tops: list[dict[int, float] | None] = [None] * len(target_ids)
    if num_top:
        values, ids = logprobs.topk(min(num_top, logprobs.shape[1]), dim=-1)
        tops = [dict(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return [SampleResult(t, lp, top, rank)
            for t, lp, top, rank in zip(target_ids, chosen.squeeze(1).tolist(), tops, ranks)]
