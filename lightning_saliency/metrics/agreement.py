"""Agreement with the patch-grid explanations: ``shap_agreement`` and ``lime_agreement`` (DESIGN §4).

Does a method rank the image's regions as Shapley values (or LIME) do? Any map is pooled onto the cells of the
reference's grid (the mean of ``|M|`` over each cell, :func:`lightning_saliency.patches.pool`) and compared with
the magnitude of the reference's cell values by the two measures of Krishna et al. 2022 ("The disagreement
problem in explainable machine learning"), per image:

* :func:`kendall_tau`: Kendall's τ-b between the two cell rankings (ties handled as τ-b does; equal to
  ``scipy.stats.kendalltau``);
* :func:`topk_agreement`: feature agreement, ``|top-k(a) ∩ top-k(b)| / k`` (ties broken by cell position).

A raw agreement means little alone: Shapley sampling with 16 permutations does not agree perfectly with itself,
and random maps agree a little by chance. So each measure ``a`` is calibrated (:func:`calibrate`):
``(a - floor) / (ceiling - floor)``, where the **ceiling** is the agreement of two runs of the reference with
different seeds and the **floor** the agreement of random maps (i.i.d. uniform cell values, a seeded private
generator) with the reference. 1 means "agrees with the reference as well as the reference agrees with
itself", 0 "no better than chance" (values above 1 or below 0 can occur). The ceiling and floor used are the
means over the scored images, so that the mean of the per-image calibrated values is the calibration of the mean
raw value (under DDP the merged audit calibrates again over the whole probe's scored images:
:func:`calibrated_value`, the row's ``merged``). When the ceiling is less than
``min_gap`` above the floor the reference cannot tell agreement from chance: the calibrated value is NaN (null
in the report) with an :class:`~lightning_saliency.metrics.UndefinedMetricWarning`, never a made-up 1.0; the
raw values and both references stay in the report and show why. A constant map has no ranking and no top-k:
its values are NaN too. :func:`agreement` puts it together; the metric's value is the mean of the calibrated τ
and the calibrated top-k agreement.

Example:
    >>> import torch
    >>> a, b = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[1.0, 3.0, 2.0, 4.0]])
    >>> round(kendall_tau(a, b).item(), 4), topk_agreement(a, b, k=2).item()
    (0.6667, 0.5)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from ._common import _is_constant, _row_noise, _warn

__all__ = ["DEFAULT_K", "agreement", "calibrate", "calibrated_value", "kendall_tau", "random_floor",
           "topk_agreement"]

#: Cells compared by the top-k agreement (at most half the grid's cells).
DEFAULT_K = 8


def _flat(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim < 2:
        raise ValueError(f"{name} must be a tensor [N, cells] (or [N, h, w]), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    return torch.nan_to_num(x.detach().reshape(x.shape[0], -1).double())


def _pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    fa, fb = _flat(a, "a"), _flat(b, "b")
    if fa.shape != fb.shape:
        raise ValueError(f"agreement: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}: pool both onto the same "
                         "grid (lightning_saliency.patches.pool)")
    return fa, fb


def kendall_tau(a: Tensor, b: Tensor, *, chunk: int = 256) -> Tensor:
    """Kendall's τ-b per row of ``a`` and ``b`` (``[N, L]``): ``(concordant - discordant) / sqrt(n1 · n2)`` with
    ``n1``, ``n2`` the pairs not tied in ``a``, in ``b``. A constant row has no ranking: NaN, with an
    :class:`~lightning_saliency.metrics.UndefinedMetricWarning`. ``[N]`` float32.

    Example:
        >>> import torch
        >>> kendall_tau(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]])).tolist()
        [-1.0]
    """
    fa, fb = _pair(a, b)
    out = torch.empty(fa.shape[0], dtype=torch.float64, device=fa.device)
    for s in range(0, fa.shape[0], chunk):  # the pair matrices are [chunk, L, L]
        sa = torch.sign(fa[s : s + chunk, :, None] - fa[s : s + chunk, None, :])
        sb = torch.sign(fb[s : s + chunk, :, None] - fb[s : s + chunk, None, :])
        num = (sa * sb).sum(dim=(1, 2))
        den = torch.sqrt(sa.abs().sum(dim=(1, 2)) * sb.abs().sum(dim=(1, 2)))
        out[s : s + chunk] = num / den.clamp_min(1e-300)
    constant = _is_constant(fa) | _is_constant(fb)
    if bool(constant.any()):
        _warn(f"kendall_tau: {int(constant.sum())} row(s) with a constant map have no ranking: NaN")
    return torch.where(constant, torch.full_like(out, math.nan), out.clamp(-1.0, 1.0)).float()


def _topk_sets(x: Tensor, k: int) -> Tensor:
    order = torch.sort(x, dim=1, descending=True, stable=True).indices[:, :k]
    member = torch.zeros_like(x, dtype=torch.bool)
    return member.scatter_(1, order, True)


def topk_agreement(a: Tensor, b: Tensor, k: int = DEFAULT_K) -> Tensor:
    """Feature agreement per row: the share of ``a``'s ``k`` largest entries that are among ``b``'s ``k`` largest
    (ties broken by position, the first cell first). A constant row has no top-k: NaN, with an
    :class:`~lightning_saliency.metrics.UndefinedMetricWarning`. ``[N]`` float32.

    Example:
        >>> import torch
        >>> topk_agreement(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), torch.tensor([[4.0, 1.0, 3.0, 2.0]]), k=2).tolist()
        [0.5]
    """
    fa, fb = _pair(a, b)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= fa.shape[1]:
        raise ValueError(f"k must be an int in [1, {fa.shape[1]}] (the number of cells), got {k!r}")
    both = (_topk_sets(fa, k) & _topk_sets(fb, k)).sum(dim=1).double() / k
    constant = _is_constant(fa) | _is_constant(fb)
    if bool(constant.any()):
        _warn(f"topk_agreement: {int(constant.sum())} row(s) with a constant map have no top-{k}: NaN")
    return torch.where(constant, torch.full_like(both, math.nan), both).float()


def random_floor(reference: Tensor, k: int = DEFAULT_K, draws: int = 32, seed: int = 0,
                 positions: Tensor | None = None) -> dict[str, Tensor]:
    """The agreement of random maps with ``reference`` ``[N, L]``: the mean over ``draws`` maps of i.i.d. uniform
    cell values (private generators seeded by ``seed``, each row's position and draw), per row:
    ``{"tau": [N], "topk": [N]}``. ``positions``: each row's position in the whole probe (default ``0..N-1``),
    so that a row gets the same random maps whichever rows it is scored with.

    Example:
        >>> import torch
        >>> floor = random_floor(torch.arange(64.0)[None], k=8, draws=256)
        >>> abs(floor["tau"].item()) < 0.02, abs(floor["topk"].item() - 8 / 64) < 0.03
        (True, True)
    """
    ref = _flat(reference, "reference")
    n, cells = ref.shape
    keys = torch.arange(n) if positions is None else torch.as_tensor(positions).reshape(-1).cpu().long()
    if keys.shape[0] != n:
        raise ValueError(f"random_floor: {n} rows but {keys.shape[0]} positions; pass one position per row")
    noise = _row_noise("uniform", (cells,), seed, keys.repeat_interleave(draws), torch.arange(draws).repeat(n))
    noise = noise.double().to(ref.device)
    rep = ref.repeat_interleave(draws, dim=0)
    tau = kendall_tau(noise, rep).double().reshape(n, draws).mean(1)
    topk = topk_agreement(noise, rep, k).double().reshape(n, draws).mean(1)
    return {"tau": tau.float(), "topk": topk.float()}


def calibrate(raw: Tensor, ceiling: Tensor, floor: Tensor, min_gap: float = 0.05) -> Tensor:
    """``(raw - F) / (C - F)`` per image, with ``C`` and ``F`` the means of the finite ``ceiling`` and ``floor``
    values; all NaN (with an :class:`~lightning_saliency.metrics.UndefinedMetricWarning`) when ``C - F < min_gap``
    or either reference is missing.

    Example:
        >>> import torch
        >>> calibrate(torch.tensor([0.5, 0.9]), torch.tensor([0.9, 0.9]), torch.tensor([0.1, 0.1])).tolist()
        [0.5, 1.0]
    """
    c, f = ceiling[torch.isfinite(ceiling)], floor[torch.isfinite(floor)]
    top = float(c.double().mean()) if len(c) else math.nan
    bottom = float(f.double().mean()) if len(f) else math.nan
    if not (top - bottom >= min_gap):  # NaN compares False too
        _warn(f"agreement calibration undefined: the ceiling {top:.3f} (two runs of the reference) is not "
              f"{min_gap} above the floor {bottom:.3f} (random maps); the raw values are kept")
        return torch.full_like(raw.float(), math.nan)
    return ((raw.double() - bottom) / (top - bottom)).float()


def agreement(maps: Tensor, reference: Tensor, second: Tensor, k: int = DEFAULT_K, draws: int = 32,
              seed: int = 0, min_gap: float = 0.05, positions: Tensor | None = None) -> dict[str, Tensor]:
    """Agreement of cell maps with a reference, calibrated between a random floor and a seed-to-seed ceiling.

    Args:
        maps: the method's cell values ``[N, L]`` (pooled ``|M|``).
        reference: the reference's cell values ``[N, L]`` (e.g. ``|shapley|``, pooled).
        second: the reference again with another seed ``[N, L]``; ``(second, reference)`` gives the ceiling.
        k: cells of the top-k agreement; ``draws``, ``seed``, ``positions``: the random maps of the floor
            (:func:`random_floor`); ``min_gap``: see :func:`calibrate`.

    Returns:
        ``[N]`` float32 tensors: ``"value"`` (the mean of the calibrated τ and top-k agreement), ``"tau"`` and
        ``"topk"`` (raw), ``"tau_ceiling"``, ``"tau_floor"``, ``"topk_ceiling"``, ``"topk_floor"``.

    Example:
        >>> import torch
        >>> ref = torch.rand(4, 16, generator=torch.Generator().manual_seed(0))
        >>> out = agreement(ref, ref, ref + 0.01 * torch.rand(4, 16, generator=torch.Generator().manual_seed(1)), k=4)
        >>> round(out["value"].mean().item(), 2), sorted(out)[:3]
        (1.0, ['tau', 'tau_ceiling', 'tau_floor'])
    """
    floor = random_floor(reference, k, draws, seed, positions)
    out = {"tau": kendall_tau(maps, reference), "topk": topk_agreement(maps, reference, k),
           "tau_ceiling": kendall_tau(second, reference), "topk_ceiling": topk_agreement(second, reference, k),
           "tau_floor": floor["tau"], "topk_floor": floor["topk"]}
    out["value"] = calibrated_value(out, min_gap)
    return out


def calibrated_value(parts: Mapping[str, Tensor], min_gap: float = 0.05) -> Tensor:
    """The agreement's ``value`` per image from its raw parts (the other keys of :func:`agreement`): the mean of
    the calibrated τ and the calibrated top-k agreement, with the means of the ceilings and floors over the rows
    given (NaN rows, images not scored, left out). A sharded audit recomputes it on the merged rows, so that
    its values are the single-process ones (a shard's own means are not the probe's).

    Example:
        >>> import torch
        >>> parts = {"tau": torch.tensor([0.5, math.nan]), "tau_ceiling": torch.tensor([0.9, math.nan]),
        ...          "tau_floor": torch.tensor([0.1, math.nan]), "topk": torch.tensor([0.5, math.nan]),
        ...          "topk_ceiling": torch.tensor([0.9, math.nan]), "topk_floor": torch.tensor([0.1, math.nan])}
        >>> [round(v, 4) for v in calibrated_value(parts).tolist()[:1]]
        [0.5]
    """
    tau = calibrate(parts["tau"], parts["tau_ceiling"], parts["tau_floor"], min_gap)
    topk = calibrate(parts["topk"], parts["topk_ceiling"], parts["topk_floor"], min_gap)
    return (tau + topk) / 2
