"""Structured outputs: grammars built from a request's constraint (xgrammar, chosen by
measurement in docs/structured-outputs.md), compiled off the engine loop and cached per
constraint, and the per-request matchers whose token bitmasks the sampler applies."""
