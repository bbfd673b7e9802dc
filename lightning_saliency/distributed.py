"""The collectives the monitor and the alarm need under DDP, each a no-op in a single process.

A ``trainer`` here is anything with ``global_rank``/``world_size`` (a Lightning ``Trainer``); :func:`broadcast`
goes through ``trainer.strategy`` so that every strategy Lightning supports works, :func:`gather` and
:func:`rank0_buffers` through ``torch.distributed`` once a process group exists.

Example:
    >>> class Single:  # what a one-process Trainer looks like to these helpers
    ...     global_rank, world_size = 0, 1
    >>> world(Single()), gather(Single(), {"a": 1}), broadcast(Single(), 3)
    ((0, 1), [{'a': 1}], 3)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["broadcast", "gather", "rank0_buffers", "world"]


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world(trainer: Any) -> tuple[int, int]:
    """``(rank, world size)`` of ``trainer``; ``(0, 1)`` for an object without them.

    Example:
        >>> world(object())
        (0, 1)
    """
    return int(getattr(trainer, "global_rank", 0)), int(getattr(trainer, "world_size", 1))


def gather(trainer: Any, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in a single process).

    Example:
        >>> gather(object(), 1.5)
        [1.5]
    """
    _, size = world(trainer)
    if size == 1 or not _initialized():
        return [obj]
    out: list[Any] = [None] * size
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast(trainer: Any, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a collective: every rank must call it).

    Example:
        >>> broadcast(object(), "rank 0's value")
        "rank 0's value"
    """
    _, size = world(trainer)
    if size == 1:
        return obj
    return trainer.strategy.broadcast(obj, src=0)


@contextlib.contextmanager
def rank0_buffers(trainer: Any, module: nn.Module) -> Iterator[None]:
    """Under DDP, audit every shard with rank 0's buffers (BatchNorm statistics, the model a checkpoint holds):
    each rank updated its own in its last training step. The rank's own buffers are restored afterwards.

    Example:
        >>> bn = nn.BatchNorm1d(2)
        >>> with rank0_buffers(object(), bn):  # one process: nothing to exchange
        ...     bn.running_mean.tolist()
        [0.0, 0.0]
    """
    _, size = world(trainer)
    buffers = list(module.buffers())
    if size == 1 or not buffers or not _initialized():
        yield
        return
    with torch.inference_mode(False), torch.no_grad():
        saved = [b.detach().clone() for b in buffers]
        for b in buffers:
            torch.distributed.broadcast(b, src=0)
    try:
        yield
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)
