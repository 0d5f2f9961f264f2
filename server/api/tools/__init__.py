"""Tool calling: the parsers that find tool calls in a model's text (one per format), and the
per-choice extraction that turns generated text into OpenAI's `tool_calls`, whole or streamed."""
