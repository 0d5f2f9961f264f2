"""Incremental detokenization and stop-string matching, on the API side.

`IncrementalDetokenizer` turns one token at a time into text deltas that never end in half a
UTF-8 character: it decodes a short window of tokens before the new ones and emits only what
the new tokens added. `StopStringMatcher` holds back the last few characters so that a stop
string split across tokens never leaks into a delta, and trims it when it appears.
"""

from __future__ import annotations

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int],
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_ids: list[int], final: bool = False) -> str:
        """Append tokens; return the text they complete (all of it when `final`)."""
        self.token_ids.extend(token_ids)
        prefix = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset:])
        if len(full) <= len(prefix) or (full.endswith(_REPLACEMENT) and not final):
            return ""  # nothing new yet, or a multi-byte character still incomplete
        # The window's text normally starts with the prefix; if a tokenizer re-merges across
        # the boundary, fall back to the longest common prefix.
        start = len(prefix)
        if not full.startswith(prefix):
            start = next((i for i, (a, b) in enumerate(zip(full, prefix)) if a != b), start)
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return full[start:]


class StopStringMatcher:
    def __init__(self, stop: list[str], include_stop_str_in_output: bool = False) -> None:
        self.stop = [s for s in stop if s]
        self.include = include_stop_str_in_output
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # all text so far, trimmed at a stop string once one matched
        self.emitted = 0
        self.stopped_by: str | None = None

    def add(self, delta: str, final: bool = False) -> str:
        """Add decoded text; return the part now safe to show. Once a stop string appears,
        `stopped_by` is set and the text ends before it (or after it, with include)."""
        if self.stopped_by is not None:
            return ""
        search_from = max(0, len(self.text) - self.hold)
        self.text += delta
        if self.stop:
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
            if hits:
                index, stop = min(hits)
                self.stopped_by = stop
                self.text = self.text[:index + (len(stop) if self.include else 0)]
                final = True
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out


class TokenTexts:
    """The text one token adds after other text (e.g. " there", not "there"), for logprobs.

    Decoding a token alone drops the leading space of SentencePiece tokens; decoding it after a
    fixed anchor and removing the anchor's text keeps it, for byte-level BPE tokenizers too.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.anchor = list(tokenizer("a", add_special_tokens=False).input_ids)[-1:]
        self.anchor_text = tokenizer.decode(self.anchor)
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            full = self.tokenizer.decode(self.anchor + [token_id])
            text = (full[len(self.anchor_text):] if full.startswith(self.anchor_text)
                    else self.tokenizer.decode([token_id]))
            self._cache[token_id] = text
        return text
