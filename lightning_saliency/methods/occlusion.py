"""Occlusion sensitivity (Zeiler & Fergus 2014), DESIGN §4.

A ``p x p`` patch slides over the image with stride ``s``; each position replaces the patch by the baseline and
records how much the class score drops, ``y^c(x) - y^c(x_occluded)``. A pixel's value is the mean drop over the
patches that cover it. The last patch of each row and column is placed flush with the border, so every pixel is
covered. The occluded copies of all images go through the model in batches (see :class:`~.scoring.Scorer`).

Example:
    >>> patch_starts(10, 4, 3)
    [0, 3, 6]
    >>> patch_starts(11, 4, 3)
    [0, 3, 6, 7]
"""

from __future__ import annotations

import torch
from torch import Tensor

from .scoring import Scorer

__all__ = ["occlusion", "patch_starts"]


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair  # type: ignore[return-value]


def patch_starts(size: int, patch: int, stride: int) -> list[int]:
    """Start offsets of the patches along one axis: every ``stride`` pixels, plus one flush with the end.

    Example:
        >>> patch_starts(8, 8, 4)
        [0]
    """
    if patch > size:
        raise ValueError(f"occlusion_patch {patch} is larger than the image side {size}: choose a smaller patch")
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def occlusion(scorer: Scorer, x: Tensor, base_scores: Tensor, patch: int | tuple[int, int] = 8,
              stride: int | tuple[int, int] = 4, baseline: float | Tensor = 0.0) -> Tensor:
    """Occlusion map ``[N, H, W]`` (float32): mean score drop over the patches covering each pixel.

    Args:
        scorer: the model and the explained classes.
        x: inputs ``[N, C, H, W]``.
        base_scores: ``[N]``, the unoccluded scores ``y^c(x)`` (the engine's shared forward provides them).
        patch, stride: patch side and stride in pixels (an int or ``(height, width)``).
        baseline: the value the patch is filled with: a number, or a tensor broadcastable to ``x``.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        >>> scorer = Scorer(model, targets=torch.tensor([0]), batch_size=32)
        >>> x = torch.rand(1, 1, 4, 4)
        >>> occlusion(scorer, x, scorer.scores(x, torch.tensor([0])), patch=2, stride=2).shape
        torch.Size([1, 4, 4])
    """
    N, C, H, W = x.shape
    ph, pw = _pair(patch, "occlusion_patch")
    sh, sw = _pair(stride, "occlusion_stride")
    positions = [(r, c) for r in patch_starts(H, ph, sh) for c in patch_starts(W, pw, sw)]
    if isinstance(baseline, Tensor):
        try:
            fill = torch.broadcast_to(baseline.to(device=x.device, dtype=x.dtype), x.shape)
        except RuntimeError as err:
            raise ValueError(f"occlusion_baseline of shape {tuple(baseline.shape)} does not broadcast to the "
                             f"inputs {tuple(x.shape)}: pass a number or a tensor [C, 1, 1], [C, H, W] or "
                             "[N, C, H, W]") from err
    else:
        fill = torch.full_like(x, float(baseline))

    def rows(i: int, start: int, stop: int) -> Tensor:
        block = x[i : i + 1].repeat(stop - start, 1, 1, 1)
        for k, j in enumerate(range(start, stop)):
            r, c = positions[j]
            block[k, :, r : r + ph, c : c + pw] = fill[i, :, r : r + ph, c : c + pw]
        return block

    total = torch.zeros(N, H, W, device=x.device, dtype=torch.float32)
    count = torch.zeros(H, W, device=x.device, dtype=torch.float32)
    for r, c in positions:
        count[r : r + ph, c : c + pw] += 1
    base = base_scores.detach().float().to(x.device)
    for parts, _, scores in scorer.stream(N, len(positions), rows, grads=False):
        drops = (base[torch.cat([torch.full((p.stop - p.start,), p.image) for p in parts]).to(x.device)]
                 - scores).tolist()
        for p in parts:
            for k, j in enumerate(range(p.start, p.stop)):
                r, c = positions[j]
                total[p.image, r : r + ph, c : c + pw] += drops[p.offset + k]
    return total / count
