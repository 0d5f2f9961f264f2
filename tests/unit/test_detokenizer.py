"""Incremental detokenization and stop strings, with the bundled SentencePiece tokenizer
(byte fallback, so multi-byte characters span several tokens)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from server.api.detokenizer import IncrementalDetokenizer, StopStringMatcher, TokenTexts
from server.assets import BUNDLED_MODEL_DIR


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR)


@pytest.mark.parametrize("text", [
    "Once upon a time, there was a little girl.",
    "Café naïve — über 😀 emoji and 日本語 text",
    "  double  spaces\tand tabs\nnewlines",
])
def test_deltas_concatenate_to_the_full_decode(tokenizer, text):
    prompt = tokenizer("Hello").input_ids
    output = tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add([t], final=i == len(output) - 1) for i, t in enumerate(output)]
    assert "".join(deltas) == tokenizer.decode(prompt + output)[len(tokenizer.decode(prompt)):]
    assert all("\ufffd" not in d for d in deltas)


def test_multibyte_character_is_held_until_complete(tokenizer):
    output = tokenizer("😀", add_special_tokens=False).input_ids
    assert len(output) > 2  # byte fallback: one token per byte
    detok = IncrementalDetokenizer(tokenizer, [1])
    deltas = [detok.add([t]) for t in output]
    assert deltas[:-1] == [""] * (len(output) - 1)
    assert deltas[-1].strip() == "😀"


def test_incomplete_character_is_flushed_when_final(tokenizer):
    first_byte = tokenizer("😀", add_special_tokens=False).input_ids[:-1]
    detok = IncrementalDetokenizer(tokenizer, [1])
    assert detok.add(first_byte, final=True) != ""


def stream(matcher: StopStringMatcher, pieces: list[str]) -> list[str]:
    out = []
    for i, piece in enumerate(pieces):
        out.append(matcher.add(piece, final=i == len(pieces) - 1))
        if matcher.stopped_by:
            break
    return out


def test_stop_string_across_pieces_never_leaks():
    matcher = StopStringMatcher(["girl named"])
    out = stream(matcher, [", there", " was a little", " gi", "rl na", "med Lily"])
    assert "".join(out) == ", there was a little "
    assert all("gi" not in piece for piece in out)
    assert matcher.stopped_by == "girl named"


def test_include_stop_string_and_earliest_match_wins():
    matcher = StopStringMatcher(["b", "abc"], include_stop_str_in_output=True)
    assert "".join(stream(matcher, ["xa", "bc"])) == "xabc"
    assert matcher.stopped_by == "abc"
    matcher = StopStringMatcher(["c", "bcd"])
    assert "".join(stream(matcher, ["ab", "cd"])) == "a"
    assert matcher.stopped_by == "bcd"


def test_without_stop_strings_everything_is_emitted_at_once():
    matcher = StopStringMatcher([])
    assert [matcher.add("ab"), matcher.add("c")] == ["ab", "c"]


def test_held_back_text_is_released_at_the_end():
    matcher = StopStringMatcher(["xyz"])
    assert matcher.add("hello x") == "hello"
    assert matcher.add("y", final=True) == " xy"
    assert matcher.stopped_by is None


def test_token_texts_keep_leading_spaces(tokenizer):
    texts = TokenTexts(tokenizer)
    prompt = tokenizer("Once upon a time,").input_ids
    ids = tokenizer(" there was", add_special_tokens=False).input_ids
    full = tokenizer.decode(prompt + ids)
    assert "".join(texts(t) for t in ids) == full[len(tokenizer.decode(prompt)):]
    assert texts(ids[0]) == " there"
