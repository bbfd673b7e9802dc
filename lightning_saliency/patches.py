"""Patch grids and fill values: what the patch-grid methods and the agreement metrics share.

A ``gh x gw`` grid splits an ``H x W`` image into cells; the patch-grid methods (``shapley``, ``lime`` in
:mod:`lightning_saliency.methods.perturbation`) treat each cell as one feature, and the agreement metrics
(:mod:`lightning_saliency.metrics.agreement`) pool any map onto the same cells to compare it with theirs.

Cell geometry: along an axis of ``S`` pixels split into ``g`` cells, cell ``j`` covers the pixels
``floor(j*S/g) <= p < floor((j+1)*S/g)``. When ``g`` divides ``S`` every cell has ``S/g`` pixels; otherwise the
cells differ by at most one pixel (the extra pixels are spread evenly, never piled into the last cell). A grid
finer than the image (``g > S``) is an error.

Fill values (``baseline``): what a switched-off cell holds. A number; ``"mean"``, each image's per-channel mean;
``"blur"``, a Gaussian-blurred copy of the image (:func:`gaussian_blur`, sigma ``max(1.5, max(H, W) / 32)``, the
blur RISE's deletion and insertion also use).

Example:
    >>> cell_edges(10, 4)
    [0, 2, 5, 7, 10]
    >>> cell_index(4, 4, (2, 2)).tolist()
    [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["BASELINES", "baseline_images", "cell_edges", "cell_index", "check_baseline", "check_grid", "gaussian_blur",
           "grid_pair", "paint", "pool"]

#: The named fill values (a number is accepted too).
BASELINES = ("mean", "blur")


def grid_pair(grid: Any, name: str = "grid") -> tuple[int, int]:
    """``(rows, cols)`` of a grid given as an int ``g`` (``g x g``) or a pair; anything else is a ``ValueError``.

    Example:
        >>> grid_pair(8), grid_pair((2, 3))
        ((8, 8), (2, 3))
    """
    pair = (grid, grid) if isinstance(grid, int) else tuple(grid) if isinstance(grid, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair (rows, cols) of them, got {grid!r}")
    return pair  # type: ignore[return-value]


def check_grid(grid: Any, height: int, width: int, name: str = "grid") -> tuple[int, int]:
    """:func:`grid_pair`, plus a ``ValueError`` when the grid has more cells along an axis than the image pixels.

    Example:
        >>> check_grid(4, 3, 8, "shapley_grid")
        Traceback (most recent call last):
        ...
        ValueError: shapley_grid (4, 4) has more cells than the image has pixels (3 x 8): choose shapley_grid <= 3
    """
    gh, gw = grid_pair(grid, name)
    if gh > height or gw > width:
        raise ValueError(f"{name} {(gh, gw)} has more cells than the image has pixels ({height} x {width}): "
                         f"choose {name} <= {min(height, width)}")
    return gh, gw


def cell_edges(size: int, cells: int) -> list[int]:
    """The ``cells + 1`` pixel boundaries along an axis of ``size`` pixels: ``floor(j * size / cells)``.

    Example:
        >>> cell_edges(8, 4)
        [0, 2, 4, 6, 8]
    """
    return [(j * size) // cells for j in range(cells + 1)]


def cell_index(height: int, width: int, grid: Any) -> Tensor:
    """``[H, W]`` long: the cell (row-major, ``0 .. gh*gw - 1``) each pixel belongs to.

    Example:
        >>> cell_index(2, 3, (1, 3)).tolist()
        [[0, 1, 2], [0, 1, 2]]
    """
    gh, gw = check_grid(grid, height, width)
    rows = torch.bucketize(torch.arange(height), torch.tensor(cell_edges(height, gh)[1:]), right=True)
    cols = torch.bucketize(torch.arange(width), torch.tensor(cell_edges(width, gw)[1:]), right=True)
    return rows[:, None] * gw + cols[None, :]


def pool(maps: Tensor, grid: Any) -> Tensor:
    """Mean of each map over each cell: ``[N, H, W]`` -> ``[N, gh*gw]`` (float32, row-major cells).

    Example:
        >>> pool(torch.arange(16.0).reshape(1, 4, 4), 2).tolist()
        [[2.5, 4.5, 10.5, 12.5]]
    """
    if maps.ndim != 3:
        raise ValueError(f"pool expects maps [N, H, W], got shape {tuple(maps.shape)}")
    n, h, w = maps.shape
    idx = cell_index(h, w, grid).to(maps.device).reshape(-1)
    cells = int(idx.max()) + 1
    total = torch.zeros(n, cells, device=maps.device, dtype=torch.float32)
    total.index_add_(1, idx, maps.reshape(n, -1).float())
    count = torch.bincount(idx, minlength=cells).to(total.dtype)
    return total / count


def paint(values: Tensor, height: int, width: int, grid: Any) -> Tensor:
    """Cell values ``[N, gh*gw]`` -> maps ``[N, H, W]``: every pixel holds its cell's value.

    Example:
        >>> paint(torch.tensor([[1.0, 2.0]]), 2, 2, (1, 2)).tolist()
        [[[1.0, 2.0], [1.0, 2.0]]]
    """
    idx = cell_index(height, width, grid).to(values.device)
    return values[:, idx]


@functools.lru_cache(maxsize=32)
def _blur_matrix(size: int, sigma: float, radius: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[size, size]``: row ``o`` holds the Gaussian weights ``k_j`` (``j = -radius..radius``, summing to 1) at
    the pixels ``clamp(o + j, 0, size - 1)`` (replicate padding), so that ``K @ x`` blurs ``x`` along that axis
    (rows ``y0:y1`` of it blur that window only).

    Cached by image size and σ, a few per audit, the same audit after audit (never written to), and built
    outside inference mode, so that a matrix first made under ``torch.inference_mode()`` can later enter an
    autograd graph."""
    with torch.inference_mode(False):
        t = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        k = k / k.sum()
        src = (torch.arange(size, device=device)[:, None] + t.long()[None, :]).clamp(0, size - 1)
        weights = torch.zeros(size, size, device=device, dtype=torch.float32)
        return weights.scatter_add_(1, src, k.expand(size, -1).contiguous()).to(dtype)


def gaussian_blur(inputs: Tensor, sigma: float, window: tuple[slice, slice] | None = None) -> Tensor:
    """Separable Gaussian blur of ``[N, C, H, W]`` images (replicate padding, kernel radius ``ceil(3σ)``).

    Computed as ``K_H @ x @ K_Wᵀ``, one matrix per axis (:func:`_blur_matrix`: the kernel's weights, the
    replicate padding folded into the edge pixels), which on small images is several times faster than a
    depthwise convolution and gives the same values up to float rounding. ``window = (rows, cols)`` (two slices
    of the image) returns only that part of the blurred images: the matrices' rows of that window.

    Example:
        >>> torch.allclose(gaussian_blur(torch.ones(1, 3, 16, 16), 2.0), torch.ones(1, 3, 16, 16))
        True
        >>> x = torch.rand(1, 1, 16, 16)
        >>> torch.allclose(gaussian_blur(x, 2.0, (slice(0, 5), slice(8, 16))), gaussian_blur(x, 2.0)[..., :5, 8:])
        True
    """
    n, c, h, w = inputs.shape
    (y0, y1, _), (x0, x1, _) = (window[0].indices(h), window[1].indices(w)) if window else ((0, h, 1), (0, w, 1))
    if sigma <= 0:
        return inputs[:, :, y0:y1, x0:x1].clone()
    radius = max(1, min(int(math.ceil(3 * sigma)), max(h, w)))
    rows = _blur_matrix(h, sigma, radius, inputs.dtype, inputs.device)[y0:y1]
    cols = _blur_matrix(w, sigma, radius, inputs.dtype, inputs.device)[x0:x1]
    return rows @ inputs @ cols.T


def check_baseline(value: Any, name: str) -> None:
    """A ``ValueError`` saying the fix unless ``value`` is a number, ``"mean"`` or ``"blur"``.

    Example:
        >>> check_baseline("zero", "lime_baseline")
        Traceback (most recent call last):
        ...
        ValueError: lime_baseline must be a number, 'mean' (each image's per-channel mean) or 'blur' (a blurred copy), got 'zero'
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return
    if isinstance(value, str) and value in BASELINES:
        return
    raise ValueError(f"{name} must be a number, 'mean' (each image's per-channel mean) or 'blur' (a blurred "
                     f"copy), got {value!r}")


def baseline_images(x: Tensor, baseline: float | str, name: str = "baseline") -> Tensor:
    """The fill images ``[N, C, H, W]`` for ``x``: a constant, each image's per-channel mean, or its blur.

    Example:
        >>> x = torch.tensor([[[[0.0, 2.0], [4.0, 6.0]]]])
        >>> baseline_images(x, "mean").flatten().tolist(), baseline_images(x, 1).flatten().tolist()
        ([3.0, 3.0, 3.0, 3.0], [1.0, 1.0, 1.0, 1.0])
    """
    check_baseline(baseline, name)
    if baseline == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()
    if baseline == "blur":
        return gaussian_blur(x, max(1.5, max(x.shape[-2:]) / 32))
    return torch.full_like(x, float(baseline))
