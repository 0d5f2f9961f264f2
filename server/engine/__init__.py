"""The engine core, the request model and the offline `LLM` front door."""
