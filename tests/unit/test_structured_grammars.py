"""The grammar side of structured outputs: constraints built (or refused with a message that
names the problem), compiled once per constraint off the calling thread, kept in a bounded LRU,
and matchers that replay tokens already sampled."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from xgrammar.testing import _is_grammar_accept_string as accepts

from server.assets import BUNDLED_MODEL_DIR
from server.engine.tokenizer import load_tokenizer
from server.sampling_params import StructuredOutputsParams as Spec
from server.structured.cache import GrammarCache
from server.structured.grammar import build_grammar
from server.structured.matcher import GrammarState, apply_grammar_masks

VOCAB = 512


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(BUNDLED_MODEL_DIR)


def cache(tokenizer, **kw) -> GrammarCache:
    return GrammarCache(lambda: tokenizer, VOCAB, [tokenizer.eos_token_id], **kw)


@pytest.mark.parametrize("spec, message", [
    (Spec(json='{"type": "nope"}'), 'Unsupported type "nope"'),
    (Spec(json="{not json"), "Failed to parse JSON"),
    (Spec(regex="(("), "parenthesis is not closed"),
    (Spec(grammar="root ::= missing"), 'Rule "missing" is not defined'),
    (Spec(grammar="start: missing"), "unknown name 'missing'"),
])
def test_a_bad_constraint_names_its_problem(spec, message):
    with pytest.raises(ValueError) as info:
        build_grammar(spec)
    assert message in str(info.value)
    assert ".cc:" not in str(info.value)  # no C++ source location


def test_a_spec_holds_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        Spec()
    with pytest.raises(ValueError, match="exactly one"):
        Spec(regex="a", choice=("b",))
    with pytest.raises(ValueError, match="must not be empty"):
        Spec(choice=())


def test_choices_are_literal_strings():
    grammar = build_grammar(Spec(choice=("yes", 'say "no"', "back\\slash\nnewline", "é")))
    for text in ("yes", 'say "no"', "back\\slash\nnewline", "é"):
        assert accepts(grammar, text)
    assert not accepts(grammar, "ye") and not accepts(grammar, "yesyes")


@pytest.mark.parametrize("schema, good, bad", [
    ({"type": "string", "maxLength": 6}, '"ab"', '"a\x19"'),
    ({"type": "string", "minLength": 1}, '"ab"', '"a\tb"'),
    ({"type": "string"}, '"a\\u0019"', '"a\x19"'),
    ({"type": "object", "properties": {"a": {"type": "string", "maxLength": 3}},
      "required": ["a"]}, '{"a": "ab"}', '{"a": "\x01b"}'),
])
def test_json_strings_never_hold_raw_control_characters(schema, good, bad):
    grammar = build_grammar(Spec(json=json.dumps(schema), any_whitespace=False))
    assert accepts(grammar, good) and not accepts(grammar, bad)


def test_json_object_is_any_object_and_nothing_else():
    grammar = build_grammar(Spec(json_object=True))
    assert accepts(grammar, '{"a": [1, {"b": null}]}')
    assert not accepts(grammar, "[1, 2]") and not accepts(grammar, '"text"')


def test_compiles_once_per_constraint_off_the_calling_thread(tokenizer):
    grammars = cache(tokenizer)
    threads: set[str] = set()
    build = grammars._build

    def spy(spec, grammar=None):
        threads.add(threading.current_thread().name)
        return build(spec, grammar)

    grammars._build = spy  # type: ignore[method-assign]
    spec = Spec(regex="[0-9]{3}")
    first, second = grammars.compile_async(spec), grammars.compile_async(spec)
    assert first is second or first.result() is second.result()
    assert first.result(timeout=60) is grammars.get(spec)
    assert grammars.compile_async(spec).result() is first.result()  # a hit: no new compile
    assert len(threads) == 1 and threading.current_thread().name not in threads
    grammars.shutdown()


def test_a_failed_compile_reaches_the_future(tokenizer):
    grammars = cache(tokenizer)
    future = grammars.compile_async(Spec(regex="(("))
    with pytest.raises(ValueError, match="parenthesis"):
        future.result(timeout=60)
    assert grammars.get(Spec(regex="((")) is None
    grammars.shutdown()


def test_the_cache_is_bounded_and_compiles_again_on_a_miss(tokenizer):
    grammars = cache(tokenizer, max_entries=2)
    specs = [Spec(regex=f"a{{{i}}}") for i in range(1, 4)]
    for spec in specs:
        grammars.compile(spec)
    assert grammars.get(specs[0]) is None and grammars.get(specs[2]) is not None
    assert grammars.matcher(specs[0]) is not None  # compiled again, here
    assert grammars.get(specs[0]) is not None


def test_a_state_replays_the_tokens_already_sampled(tokenizer):
    grammars = cache(tokenizer)
    spec = Spec(choice=(" cat", " dog"))
    ids = tokenizer("dog", add_special_tokens=False).input_ids  # sentencepiece: " dog"
    fresh = GrammarState(grammars.matcher(spec), [])
    for token in ids:
        assert fresh.accept(token)
    replayed = GrammarState(grammars.matcher(spec), ids)
    masks = []
    for state in (fresh, replayed):
        logits = torch.zeros(1, VOCAB)
        apply_grammar_masks(logits, [(0, state)])
        masks.append(torch.isfinite(logits[0]).nonzero().flatten().tolist())
    assert masks[0] == masks[1] == [tokenizer.eos_token_id]  # only the end may follow
    assert not replayed.accept(tokenizer.eos_token_id) and replayed.ended


def test_masks_touch_only_their_rows(tokenizer):
    grammars = cache(tokenizer)
    state = GrammarState(grammars.matcher(Spec(regex="[0-9]")), [])
    logits = torch.randn(3, VOCAB)
    before = logits.clone()
    apply_grammar_masks(logits, [(1, state)])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(tokenizer.decode([t]).strip() in "0123456789" for t in allowed)
