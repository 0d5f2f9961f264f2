"""Structured outputs in the engine: every constrained output is a sentence of its grammar (a
JSON schema's output validates with jsonschema, a regex's matches, a choice is one of the
choices), whatever else shares the batch, with n > 1, prefix caching and preemption (whose
recomputed tokens rebuild the grammar state, so a resumed request goes on where it was)."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest

from server import LLM, SamplingParams
from server.sampling_params import StructuredOutputsParams
from tests.models.conftest import random_prompts

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 4},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "pet": {"enum": ["cat", "dog"]}},
          "required": ["name", "age", "pet"], "additionalProperties": False}
SPECS = {
    "json": StructuredOutputsParams(json=json.dumps(SCHEMA), any_whitespace=False),
    "regex": StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2,4}"),
    "choice": StructuredOutputsParams(choice=("yes", "no", 'a "quoted" one')),
    "grammar": StructuredOutputsParams(grammar='root ::= "cat" | "dog" " " [a-z] [a-z]? [a-z]?'),
    "lark": StructuredOutputsParams(grammar='start: "id-" DIGIT DIGIT\nDIGIT: /[0-9]/'),
}


def assert_valid(kind: str, text: str) -> None:
    if kind == "json":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "regex":
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text), text
    elif kind == "choice":
        assert text in ("yes", "no", 'a "quoted" one'), text
    elif kind == "grammar":
        assert text == "cat" or re.fullmatch(r"dog [a-z]{1,3}", text), text
    else:
        assert re.fullmatch(r"id-[0-9]{2}", text), text


def constrained(kind: str, **kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 80, "temperature": 1.0, "seed": 3,
                             "structured_outputs": SPECS[kind], **kw})


@pytest.fixture(scope="module")
def llm(model_dirs) -> LLM:
    return LLM(str(model_dirs["llama"]), max_model_len=128, kv_cache_memory=1 << 22)


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_each_kind_of_constraint_holds_with_n_and_sampling(llm, kind):
    prompts = random_prompts(seed=1, count=3, min_len=4, max_len=20)
    for out in llm.generate(prompts, constrained(kind, n=3)):
        for completion in out.outputs:
            assert completion.finish_reason == "stop", completion
            assert_valid(kind, completion.text)


def test_unconstrained_neighbours_are_untouched(llm):
    """Rows without a grammar sample as if no constrained row shared their batch."""
    prompts = random_prompts(seed=2, count=4, min_len=4, max_len=20)
    plain = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, plain)]
    mixed = llm.generate(prompts + prompts, [plain] * 4 + [constrained("json")] * 4)
    assert [o.outputs[0].token_ids for o in mixed[:4]] == alone
    for out in mixed[4:]:
        assert_valid("json", out.outputs[0].text)


def test_the_grammar_ends_a_request_even_with_ignore_eos(llm):
    out = llm.generate([[5, 6, 7]], constrained("choice", ignore_eos=True, max_tokens=40))[0]
    completion = out.outputs[0]
    assert completion.finish_reason == "stop" and len(completion.token_ids) < 40
    assert_valid("choice", completion.text)


def test_min_tokens_gives_way_to_the_grammar(llm):
    out = llm.generate([[5, 6, 7]], constrained("regex", min_tokens=30))[0].outputs[0]
    assert out.finish_reason == "stop"
    assert_valid("regex", out.text)


def test_a_bad_constraint_is_a_value_error_and_the_engine_goes_on(llm):
    with pytest.raises(ValueError, match="parenthesis"):
        llm.generate([[5, 6]], SamplingParams(
            structured_outputs=StructuredOutputsParams(regex="((")))
    with pytest.raises(ValueError, match="Unsupported type"):
        llm.generate([[5, 6]], SamplingParams(
            structured_outputs=StructuredOutputsParams(json='{"type": "nope"}')))
    assert not llm.engine.has_unfinished_requests()
    assert_valid("regex", llm.generate([[5, 6]], constrained("regex"))[0].outputs[0].text)


def test_preemption_rebuilds_the_grammar_state(model_dirs):
    """Seeded constrained requests give the same tokens when a tight pool preempts them (their
    recomputed output replays into a fresh matcher) as when each runs alone."""
    model_dir = str(model_dirs["llama"])
    prompts = random_prompts(seed=4, count=6, min_len=20, max_len=40)
    kinds = ["json", "regex", "lark", "json", "grammar", "json"]
    params = [constrained(kind, seed=50 + i, max_tokens=30) for i, kind in enumerate(kinds)]
    roomy = LLM(model_dir, max_model_len=80, kv_cache_memory=1 << 22)
    alone = [roomy.generate([p], sp)[0].outputs[0] for p, sp in zip(prompts, params)]
    tight = LLM(model_dir, max_model_len=80, max_num_batched_tokens=24,
                kv_cache_memory=9 * roomy.engine.runner.bytes_per_block)
    together = [o.outputs[0] for o in tight.generate(prompts, params)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    for kind, completion in zip(kinds, together):
        if completion.finish_reason == "stop":
            assert_valid(kind, completion.text)
    tight.engine.kv_cache.check_invariants()


def test_prefix_caching_and_the_grammar_cache(model_dirs):
    llm = LLM(str(model_dirs["llama"]), max_model_len=128, kv_cache_memory=1 << 22,
              enable_prefix_caching=True)
    prompt = random_prompts(seed=5, count=1, min_len=40, max_len=41)[0]
    first = llm.generate([prompt], constrained("json", temperature=0.0))[0]
    again = llm.generate([prompt], constrained("json", temperature=0.0))[0]
    assert again.num_cached_tokens > 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert_valid("json", again.outputs[0].text)
    # The second request found its grammar compiled: it never waited for the worker.
    assert llm.engine.grammars.get(SPECS["json"]) is not None


def test_the_engine_steps_others_while_a_grammar_compiles(model_dirs):
    """A constraint compiles on the grammar thread (held here by an event); the engine keeps
    stepping the unconstrained request, counts the waiting one, and can abort it or fail it."""
    llm = LLM(str(model_dirs["llama"]), max_model_len=128, kv_cache_memory=1 << 22)
    engine = llm.engine
    release = threading.Event()
    build = engine.grammars._build

    def held(spec, grammar=None):
        release.wait(60)
        if spec.regex == "never":
            raise ValueError("the worker refused it")
        return build(spec, grammar)

    engine.grammars._build = held
    engine.add_request("held", [5, 6, 7], constrained("regex"))
    engine.add_request("plain", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
    assert engine.stats().num_waiting == 2
    outputs = [o for _ in range(3) for o in engine.step()]
    assert {o.request_id for o in outputs} == {"plain"} and outputs[-1].finished
    assert engine.has_unfinished_requests() and engine.stats().num_waiting == 1
    engine.add_request("aborted", [5, 6], constrained("json"))
    engine.abort_request("aborted")
    engine.add_request("refused", [5, 6], SamplingParams(
        structured_outputs=StructuredOutputsParams(regex="never")))
    release.set()
    text: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == "held"
            text += out.new_token_ids
    assert engine.take_failed() == [("refused", "the structured-outputs grammar did not compile: "
                                                "the worker refused it")]
    assert_valid("regex", llm.tokenizer.decode(text, skip_special_tokens=True))
    assert engine.unfinished_request_ids() == [] and engine.stats().num_waiting == 0
