"""The tensor arguments of :func:`~lightning_saliency.methods.engine.attribute`, checked: the inputs, the classes
explained (``targets``, ``contrast``) and the images' ``positions``, each a ``ValueError`` that says the fix.

``positions`` say where each input sits in a larger set that the call is a part of (a shard of a probe: its
:attr:`~lightning_saliency.probe.ProbeSet.indices`). They key the per-image random draws of the methods that
make any (SmoothGrad's noise), so that explaining part of a set with its positions gives that part of the
whole set's maps; the default ``0..N-1`` is the image's place in the call.

Example:
    >>> import torch
    >>> as_classes(2, 3, "targets", torch.device("cpu")).tolist()
    [2, 2, 2]
    >>> as_positions(None, 3).tolist(), as_positions([5, 6, 7], 3).tolist()
    ([0, 1, 2], [5, 6, 7])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["as_classes", "as_positions", "check_inputs"]


def check_inputs(inputs: Any) -> Tensor:
    """``inputs`` if it is a non-empty float tensor ``[N, C, H, W]``, else a ``ValueError`` saying the fix.

    Example:
        >>> import torch
        >>> check_inputs(torch.zeros(1, 3, 4, 4)).shape
        torch.Size([1, 3, 4, 4])
    """
    if not isinstance(inputs, Tensor):
        raise ValueError(f"inputs must be a float tensor [N, C, H, W], got {type(inputs).__name__}")
    if inputs.ndim != 4:
        fix = " (one image? add the batch dimension: inputs.unsqueeze(0))" if inputs.ndim == 3 else ""
        raise ValueError(f"inputs must be a float tensor [N, C, H, W], got shape {tuple(inputs.shape)}{fix}")
    if not inputs.is_floating_point():
        raise ValueError(f"inputs must be a float tensor, got {inputs.dtype}: convert with inputs.float()")
    if inputs.shape[0] == 0:
        raise ValueError("inputs is empty (N = 0): pass at least one image [N >= 1, C, H, W]")
    return inputs


def _integers(value: Any, name: str, what: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach()
    try:
        return torch.as_tensor(list(value))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be {what} (an int or an int tensor [N]), got {type(value).__name__}") from err


def as_classes(value: Any, n: int, name: str, device: torch.device) -> Tensor | None:
    """``value`` (``None``, an int, or one int per image) as ``[n]`` long class indices on ``device``.

    Example:
        >>> import torch
        >>> as_classes([1, 0], 2, "contrast", torch.device("cpu")).tolist()
        [1, 0]
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be class indices (an int or an int tensor [N]), got a bool")
    if isinstance(value, int):
        return torch.full((n,), value, dtype=torch.long, device=device)
    t = _integers(value, name, "class indices")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class indices, got dtype {t.dtype}: convert with .long()")
    if t.ndim == 0:
        t = t.expand(n)
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have one class index per image: expected shape [{n}], got {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.long)


def as_positions(value: Any, n: int) -> Tensor:
    """``positions`` as ``[n]`` long on the CPU: one int ``>= 0`` per input (``None``: ``0..n-1``).

    Example:
        >>> as_positions(torch.tensor([3, 1]), 2).tolist()
        [3, 1]
    """
    if value is None:
        return torch.arange(n)
    t = _integers(value, "positions", "one position per image")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"positions must hold integers (each image's position in the whole set), got dtype "
                         f"{t.dtype}: convert with .long()")
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"positions must hold one position per image: expected shape [{n}], got {tuple(t.shape)}")
    if n and int(t.min()) < 0:
        raise ValueError(f"positions must be >= 0, got a minimum of {int(t.min())}")
    return t.cpu().long()
