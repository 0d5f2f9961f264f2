"""The model runner's own state of a scheduled request, built from the scheduler's
NewRequestData and kept in step by the runner's samples; the sampler reads it row by row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.sampling_params import SamplingParams
from server.scheduler.output import NewRequestData
from server.structured.matcher import GrammarState


@dataclass(slots=True)
class RequestState:
    request_id: str
    token_ids: list[int]  # prompt, then every sampled token
    num_prompt_tokens: int
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    block_ids: list[int]
    generator: torch.Generator | None  # None: the sampler's shared generator
    grammar: GrammarState | None = None  # the request's structured-outputs constraint

    @classmethod
    def from_new(cls, request_id: str, new: NewRequestData, block_ids: list[int],
                 generator: torch.Generator | None,
                 grammar: GrammarState | None = None) -> RequestState:
        return cls(request_id, list(new.token_ids), new.num_prompt_tokens, new.sampling_params,
                   new.eos_token_ids, list(block_ids), generator, grammar)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]
