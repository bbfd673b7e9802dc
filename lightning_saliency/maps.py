"""Shared operations on saliency maps: per-image normalisation and resizing.

A saliency map here is a float tensor ``[N, H, W]``: one map per image. Every method returns maps of that
shape at input resolution; the metrics and the renderer normalise them with :func:`normalize` first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["normalize", "resize"]


def normalize(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Min-max normalise each map to ``[0, 1]``; a constant map (all zero included) becomes all zero, never NaN.

    Example:
        >>> import torch
        >>> normalize(torch.tensor([[[1.0, 3.0]], [[2.0, 2.0]]])).tolist()
        [[[0.0, 1.0]], [[0.0, 0.0]]]
    """
    if maps.ndim != 3:
        raise ValueError(f"normalize expects maps of shape [N, H, W], got {tuple(maps.shape)}")
    flat = maps.reshape(maps.shape[0], -1).float()
    flat = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > eps, (flat - lo) / span.clamp_min(eps), torch.zeros_like(flat))
    return out.reshape(maps.shape)


def resize(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize maps ``[N, h, w]`` to ``size`` bilinearly (``align_corners=False``, as CAM upsampling is defined).

    Example:
        >>> import torch
        >>> resize(torch.ones(2, 4, 4), (8, 8)).shape
        torch.Size([2, 8, 8])
    """
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False).squeeze(1)
