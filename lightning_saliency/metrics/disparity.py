"""Disparity metrics: does the model look at different things for different subgroups of the probe?

* :func:`attention_disparity`: from a per-image statistic ``s`` (by default the monitor passes
  ``spurious_mass``, else ``object_mass``), ``max_g mean(s | g) − min_g mean(s | g)`` with the per-group
  means and counts.
* :func:`group_divergence`: ``1 − Pearson`` between the groups' mean maps, the largest over pairs of groups;
  needs no masks.

Both return a plain dict of Python floats/ints (so the monitor can log ``<method>/<metric>/<group>``):

* ``attention_disparity -> {"disparity": float, "per_group": {g: mean}, "counts": {g: n},
  "small_groups": [g, ...]}``
* ``group_divergence -> {"divergence": float, "per_pair": {(g1, g2): 1 − r}, "counts": {g: n},
  "small_groups": [g, ...]}``

Groups are ordered by name. Groups smaller than ``min_group_size`` (default 2) are not dropped: they take part
in the result like the others and are listed in ``small_groups`` with an
:class:`~lightning_saliency.metrics.stability.UndefinedMetricWarning`, because one image's value is a noisy
mean. A single group (a single-class or single-site probe) gives 0.0 with a warning; so does an empty one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..maps import normalize as _normalize
from ._common import _check_maps, _row_blocks, _warn, pearson

__all__ = ["attention_disparity", "group_divergence"]


def _group_index(groups: Sequence[str], n: int, name: str) -> tuple[list[str], list[list[int]]]:
    groups = [str(g) for g in groups]
    if len(groups) != n:
        raise ValueError(f"{name}: {n} values/maps but {len(groups)} group labels; pass one label per image")
    names = sorted(set(groups))
    members = [[i for i, g in enumerate(groups) if g == name_] for name_ in names]
    return names, members


def _small(names: list[str], counts: dict[str, int], min_group_size: int, name: str) -> list[str]:
    small = [g for g in names if counts[g] < min_group_size]
    if small:
        _warn(
            f"{name}: group(s) {small} have fewer than {min_group_size} images; they are kept, but their "
            "means are noisy: give the probe more images of these groups"
        )
    return small


def attention_disparity(
    values: Tensor | Sequence[float], groups: Sequence[str], min_group_size: int = 2
) -> dict:
    """Largest gap between group means of a per-image statistic.

    Args:
        values: ``[N]`` per-image values (e.g. ``region_mass(maps, spurious_masks)``). Non-finite values are
            left out of their group's mean, with a warning.
        groups: ``N`` group labels.
        min_group_size: groups below it are reported in ``small_groups`` (and warned about), not dropped.

    Returns:
        ``{"disparity": float, "per_group": {g: float}, "counts": {g: int}, "small_groups": [g, ...]}``;
        ``counts`` are the images with a finite value. A group with no finite value has mean NaN in
        ``per_group`` and is left out of ``disparity``.

    Example:
        >>> r = attention_disparity(torch.tensor([0.1, 0.3, 0.5, 0.9]), ["a", "a", "b", "b"])
        >>> round(r["disparity"], 3), round(r["per_group"]["a"], 3)
        (0.5, 0.2)
    """
    values = torch.as_tensor(values).detach().reshape(-1).double().cpu()
    names, members = _group_index(groups, values.shape[0], "attention_disparity")
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        _warn(f"attention_disparity: {int((~finite).sum())} non-finite value(s) left out of the group means")
    per_group: dict[str, float] = {}
    counts: dict[str, int] = {}
    for g, idx in zip(names, members):
        v = values[idx][finite[idx]]
        counts[g] = int(v.numel())
        per_group[g] = float(v.mean()) if v.numel() else math.nan
    small = _small(names, counts, min_group_size, "attention_disparity")
    means = [m for m in per_group.values() if not math.isnan(m)]
    if len(means) < 2:
        _warn(
            f"attention_disparity: {len(means)} group(s) with values ({names}); disparity needs two groups, "
            "reported as 0.0"
        )
        disparity = 0.0
    else:
        disparity = max(means) - min(means)
    return {"disparity": float(disparity), "per_group": per_group, "counts": counts, "small_groups": small}


def group_divergence(
    maps: Tensor, groups: Sequence[str], normalize: bool = True, min_group_size: int = 2
) -> dict:
    """``1 − Pearson`` between groups' mean maps, the largest over pairs of groups (in ``[0, 2]``, low is good).

    Args:
        maps: ``[N, H, W]`` (read as ``|M|``, min-max normalised per image unless ``normalize=False``).
        groups: ``N`` group labels.

    Returns:
        ``{"divergence": float, "per_pair": {(g1, g2): float}, "counts": {g: int}, "small_groups": [...]}``
        with ``g1 < g2``. Constant mean maps (e.g. every map of a group all zero): two constant means give
        divergence 0, one constant mean gives 1 (see :func:`~lightning_saliency.metrics.stability.pearson`).

    Example:
        >>> m = torch.rand(1, 8, 8).repeat(4, 1, 1)
        >>> round(group_divergence(m, ["a", "a", "b", "b"])["divergence"], 6)
        0.0
    """
    maps = _check_maps(maps, copy=False)
    names, members = _group_index(groups, maps.shape[0], "group_divergence")
    counts = {g: len(idx) for g, idx in zip(names, members)}
    small = _small(names, counts, min_group_size, "group_divergence")
    if len(names) < 2:
        _warn(
            f"group_divergence: {len(names)} group(s) ({names}); divergence needs two groups, reported as 0.0"
        )
        return {"divergence": 0.0, "per_pair": {}, "counts": counts, "small_groups": small}
    of = torch.empty(maps.shape[0], dtype=torch.long, device=maps.device)  # each image's group
    for k, idx in enumerate(members):
        of[torch.tensor(idx, dtype=torch.long, device=maps.device)] = k
    sums = torch.zeros(len(names), maps.shape[1] * maps.shape[2], dtype=torch.float64, device=maps.device)
    for rows in _row_blocks(maps.shape[0], sums.shape[1]):  # a block of maps at a time: no full-size copies
        block = _check_maps(maps[rows]).abs()
        block = _normalize(block) if normalize else block
        sums.index_add_(0, of[rows], block.reshape(block.shape[0], -1).double())
    counts_t = torch.tensor([len(idx) for idx in members], dtype=torch.float64, device=maps.device)
    means = sums / counts_t[:, None]
    pairs = list(itertools.combinations(range(len(names)), 2))
    left = means[[i for i, _ in pairs]]
    right = means[[j for _, j in pairs]]
    div = (1.0 - pearson(left, right, _name="group_divergence")).clamp(0.0, 2.0).tolist()
    per_pair = {(names[i], names[j]): float(d) for (i, j), d in zip(pairs, div)}
    return {"divergence": float(max(div)), "per_pair": per_pair, "counts": counts, "small_groups": small}
