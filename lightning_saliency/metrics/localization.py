"""Localization metrics: how much of the map lies in a region (the object, or a known shortcut)?

* :func:`region_mass`: ``Σ_{p∈R} M_p / Σ_p M_p`` (relevance mass accuracy). With object masks it is the
  ``object_mass`` (high is good), with spurious masks the ``spurious_mass`` (low is good). Chance level, the
  value of a map that prefers no pixel, is the region's area fraction.
* :func:`pointing_game`: 1 when the map's maximum lies in the region, else 0; its mean is the hit rate.

Maps are read as ``|M|`` and, by default, min-max normalised per image (DESIGN §4: "for metrics, a map is
normalised per image"). Both functions return a float32 tensor ``[N]`` of per-image values on the maps'
device; the monitor averages it (or averages per group).

Undefined case, both functions: a constant map (all-zero included; after normalisation every constant map is
all zero) prefers no pixel, so it scores the region's area fraction, the chance level, with an
:class:`~lightning_saliency.metrics.stability.UndefinedMetricWarning`. An empty region scores 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..maps import normalize as _normalize
from ._common import _check_maps, _row_blocks, _warn

__all__ = ["region_mass", "pointing_game"]


def _check(maps: Tensor, masks: Tensor, name: str) -> list[slice]:
    """Check maps and masks; the blocks of rows the formula runs on (its temporaries stay a few MiB)."""
    _check_maps(maps, copy=False)
    if not isinstance(masks, Tensor):
        raise TypeError(f"{name}: masks must be a bool tensor [N, H, W], got {type(masks).__name__}")
    if masks.shape != maps.shape:
        raise ValueError(
            f"{name}: masks {tuple(masks.shape)} and maps {tuple(maps.shape)} differ in shape; masks are "
            "[N, H, W] at the maps' (input) resolution; resize maps with lightning_saliency.maps.resize"
        )
    return _row_blocks(maps.shape[0], maps.shape[1] * maps.shape[2])


def _prepare(maps: Tensor, masks: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    maps = _check_maps(maps).abs()
    if normalize:
        maps = _normalize(maps)
    return maps.reshape(maps.shape[0], -1), masks.to(device=maps.device, dtype=torch.bool).reshape(
        masks.shape[0], -1
    )


def region_mass(maps: Tensor, masks: Tensor, normalize: bool = True) -> Tensor:
    """Share of each map's mass inside its mask -> ``[N]`` in ``[0, 1]``.

    Args:
        maps: ``[N, H, W]`` saliency maps (read as ``|M|``).
        masks: ``[N, H, W]`` bool regions (object or spurious).
        normalize: min-max normalise each ``|M|`` first (default, as the monitor does).

    A map equal to its mask gives 1.0; a uniform or all-zero map gives the area fraction (with a warning).

    Example:
        >>> masks = torch.zeros(1, 4, 4, dtype=torch.bool); masks[0, :2] = True
        >>> region_mass(masks.float(), masks).tolist()
        [1.0]
    """
    parts = []
    for rows in _check(maps, masks, "region_mass"):
        flat, region = _prepare(maps[rows], masks[rows], normalize)
        parts.append(torch.stack([flat.sum(dim=1), (flat * region).sum(dim=1), region.float().mean(dim=1)]))
    total, inside, area = torch.cat(parts, dim=1)
    empty = total <= 0
    if bool(empty.any()):
        _warn(
            f"region_mass: {int(empty.sum())} constant or all-zero map(s) prefer no pixel; "
            "scored as the region's area fraction (chance level)"
        )
    return torch.where(empty, area, inside / total.clamp_min(1e-30)).clamp(0.0, 1.0)


def pointing_game(maps: Tensor, masks: Tensor, tolerance: int = 0, normalize: bool = True) -> Tensor:
    """1.0 where the map's maximum lies in the mask (grown by ``tolerance`` pixels), else 0.0 -> ``[N]``.

    Ties between maxima: the first in row-major order counts. A constant or all-zero map has no maximum and
    scores the mask's area fraction (the expected hit of a random pick), with a warning.

    Example:
        >>> masks = torch.zeros(1, 4, 4, dtype=torch.bool); masks[0, 0, 0] = True
        >>> m = torch.zeros(1, 4, 4); m[0, 0, 0] = 1.0
        >>> pointing_game(m, masks).tolist()
        [1.0]
    """
    if tolerance < 0:
        raise ValueError(f"pointing_game: tolerance must be >= 0 pixels, got {tolerance}")
    parts = []
    for rows in _check(maps, masks, "pointing_game"):
        flat, region = _prepare(maps[rows], masks[rows], normalize)
        area = region.float().mean(dim=1)
        if tolerance > 0:
            grown = F.max_pool2d(
                masks[rows].to(device=flat.device, dtype=torch.float32).unsqueeze(1),
                kernel_size=2 * tolerance + 1,
                stride=1,
                padding=tolerance,
            )
            region = grown.reshape(region.shape) > 0
        hit = region.gather(1, flat.argmax(dim=1, keepdim=True)).squeeze(1).float()
        parts.append(torch.stack([hit, area, ((flat.max(dim=1).values - flat.min(dim=1).values) <= 0).float()]))
    hit, area, constant = torch.cat(parts, dim=1)
    constant = constant.bool()
    if bool(constant.any()):
        _warn(
            f"pointing_game: {int(constant.sum())} constant or all-zero map(s) have no maximum; "
            "scored as the mask's area fraction (chance level)"
        )
    return torch.where(constant, area, hit)
