"""Per-parameter weight loading: every parameter carries its own `weight_loader` and the shard
ids the checkpoint must fill (`shard_ids`; (None,) for a whole tensor), so fused, sharded or
stacked weights need no central table (models/base.py's `load_weights` calls them)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from server.models.errors import ModelLoadError

WeightLoader = Callable[[nn.Parameter, torch.Tensor, Any], None]  # (param, tensor, shard_id)


def check_shape(got: Sequence[int], expected: Sequence[int]) -> None:
    """Raises ShapeMismatch (the caller names the tensor) unless a checkpoint tensor's shape
    is the one the config implies."""
    if tuple(got) != tuple(expected):
        raise ShapeMismatch(f"the checkpoint has {tuple(got)}, the config implies "
                            f"{tuple(expected)}")


def copy_weight(dest: torch.Tensor, tensor: torch.Tensor) -> None:
    """Raises ShapeMismatch (the caller names the tensor) unless the shapes agree."""
    check_shape(tensor.shape, dest.shape)
    with torch.no_grad():
        dest.copy_(tensor)


class ShapeMismatch(ModelLoadError):
    pass


def default_weight_loader(param: nn.Parameter, tensor: torch.Tensor, shard_id: Any = None) -> None:
    copy_weight(param.data, tensor)


def set_weight_loader(param: nn.Parameter, loader: WeightLoader = default_weight_loader,
                      shard_ids: Sequence[Any] = (None,)) -> nn.Parameter:
    param.weight_loader = loader  # type: ignore[attr-defined]
    param.shard_ids = tuple(shard_ids)  # type: ignore[attr-defined]
    return param


def weight_loader_of(param: nn.Parameter) -> WeightLoader:
    return getattr(param, "weight_loader", default_weight_loader)


def shard_ids_of(param: nn.Parameter) -> tuple[Any, ...]:
    return getattr(param, "shard_ids", (None,))
