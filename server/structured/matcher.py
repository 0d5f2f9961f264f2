"""A request's place in its grammar, and the batched token bitmask the sampler applies to the
rows that have one."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import xgrammar as xgr

from pagedserve_kernels.token_bitmask import apply_token_bitmask_


class GrammarState:
    """One request's matcher. Built for a request the runner (re)starts, it replays the output
    tokens already sampled, so a request resumed after preemption goes on where it was."""

    __slots__ = ("_matcher", "ended")

    def __init__(self, matcher: xgr.GrammarMatcher, output_token_ids: Sequence[int]) -> None:
        self._matcher = matcher
        self.ended = False
        for token_id in output_token_ids:
            if not self.accept(token_id):
                break

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; False once the grammar has ended (it accepted a stop
        token) or cannot take the token (only possible when the mask was not applied)."""
        if not self.ended:
            self.ended = (not self._matcher.accept_token(token_id)
                          or self._matcher.is_terminated())
        return not self.ended

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)


def apply_grammar_masks(logits: torch.Tensor, states: Sequence[tuple[int, GrammarState]]) -> None:
    """Set to -inf, in place, the logits each row's grammar does not allow next; `states` pairs
    a row of `logits` with its grammar."""
    if not states:
        return
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])
    for row, state in states:
        state.fill(bitmask, row)
    rows = [row for row, _ in states]
    if logits.device.type == "cpu":  # xgrammar's CPU kernel is 6x slower on sparse masks
        apply_token_bitmask_(logits, bitmask, rows)
    else:
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                        indices=rows)
