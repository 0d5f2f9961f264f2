from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model directory that cannot be served; the message names the problem."""
