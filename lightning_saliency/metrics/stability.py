"""Stability metrics: does the map survive a small change of the input, and across audits?

* :func:`stability`: mean Spearman rank correlation between ``M(x)`` and ``M(x + δ)`` over ``k`` draws,
  ``δ ~ N(0, (σ·std(x))²)`` with ``std(x)`` the per-image standard deviation, target class held fixed.
* :func:`max_sensitivity`: ``max`` over draws of ``‖M(x+δ) − M(x)‖_F / ‖M(x)‖_F`` (the quantity Captum calls
  ``sensitivity_max``; with the same perturbation function the two agree to float precision).
* :func:`drift`: Spearman between this audit's maps and the previous audit's, per image.

The rank helpers the metric files share (:func:`rank`, :func:`spearman`, :func:`pearson`) and
:class:`UndefinedMetricWarning` live in :mod:`lightning_saliency.metrics._common` and are importable from here
too.

Conventions (all metrics in this package): maps are ``[N, H, W]``; the rank-based metrics compare ``|M|``
(signed maps such as input x gradient are read by magnitude); every function returns a float32 tensor
``[N]`` of per-image values on the inputs' device, never NaN. Noise is drawn from a private, seeded
:class:`torch.Generator`, so the global RNG is never touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from ._common import (
    UndefinedMetricWarning,
    _check_maps,
    _check_targets,
    _position_keys,
    _ranks,
    _row_noise,
    _seeded_global_rng,
    _warn,
    pearson,
    rank,
    spearman,
)

__all__ = [
    "UndefinedMetricWarning",
    "rank",
    "spearman",
    "pearson",
    "stability",
    "max_sensitivity",
    "drift",
    "drift_from_ranks",
    "map_ranks",
]

Explain = Callable[[Tensor, Tensor], "Tensor | dict[str, Tensor]"]
Perturb = Callable[[Tensor], Tensor]


def _perturbed_maps(
    explain: Explain,
    inputs: Tensor,
    targets: Tensor,
    n_draws: int,
    perturb: Perturb | _RowPerturb,
    batch_size: int | None,
    positions: Tensor,
) -> Iterator[dict[str, Tensor]]:
    """Yield ``{key: maps [N, m, H, W]}`` of perturbed inputs per chunk of ``m`` draws (key ``""`` when
    ``explain`` returns a single tensor).

    Layout as in Captum: each chunk expands the inputs with ``repeat_interleave(m)`` (the ``m`` copies of
    image ``i`` are contiguous) and calls ``perturb`` once on the whole expanded batch (a :class:`_RowPerturb`
    also gets each row's image position and draw). ``batch_size`` caps the number of images per ``explain`` call (at
    least one draw of every image).
    """
    n = inputs.shape[0]
    per_chunk = n_draws if batch_size is None else min(max(batch_size // n, 1), n_draws)
    done = 0
    while done < n_draws:
        m = min(per_chunk, n_draws - done)
        expanded = inputs.repeat_interleave(m, dim=0)
        if isinstance(perturb, _RowPerturb):
            perturbed = perturb(expanded, positions.repeat_interleave(m), torch.arange(done, done + m).repeat(n))
        else:
            perturbed = perturb(expanded)
        if perturbed.shape != expanded.shape:
            raise ValueError(
                f"perturbation function returned shape {tuple(perturbed.shape)} for inputs of shape "
                f"{tuple(expanded.shape)}; it must return perturbed inputs of the same shape"
            )
        maps = _as_dict(
            explain(perturbed, targets.repeat_interleave(m, dim=0)), "explain(...) output", inputs.device
        )
        yield {key: v.reshape(n, m, *v.shape[1:]) for key, v in maps.items()}
        done += m


def _as_dict(
    maps: Tensor | dict[str, Tensor], name: str = "maps", device: torch.device | None = None
) -> dict[str, Tensor]:
    if isinstance(maps, dict):
        out = {str(key): _check_maps(v, f"{name}[{key!r}]") for key, v in maps.items()}
    else:
        out = {"": _check_maps(maps, name)}
    return out if device is None else {key: v.to(device) for key, v in out.items()}


def _unwrap(result: dict[str, Tensor], multi: bool) -> Tensor | dict[str, Tensor]:
    return result if multi else result[""]


class _RowPerturb:
    """The default draws: ``x + δ`` with ``δ`` scaled by each image's own std, ``N(0, scale²)`` (``"normal"``) or
    uniform in ``[-scale, scale]`` (``"uniform"``), each (image position, draw) row from its own seeded generator
    (:func:`~lightning_saliency.metrics._common._row_noise`): the draws do not depend on ``batch_size``, nor on
    which other images are scored with an image (a probe shard draws what the whole probe draws)."""

    def __init__(self, kind: str, scale: float, seed: int) -> None:
        self.kind, self.scale, self.seed = kind, float(scale), int(seed)

    def __call__(self, x: Tensor, images: Tensor, draws: Tensor) -> Tensor:
        std = x.detach().float().reshape(x.shape[0], -1).std(dim=1, unbiased=False)
        std = std.reshape(-1, *([1] * (x.ndim - 1)))
        u = _row_noise(self.kind, tuple(x.shape[1:]), self.seed, images, draws).to(x.device)
        noise = u if self.kind == "normal" else 2.0 * u - 1.0
        return x + (noise * self.scale * std).to(x.dtype)


def _augment_perturb(augment: Callable[[Tensor], Tensor], seed: int) -> Perturb:
    calls = [0]

    def perturb(x: Tensor) -> Tensor:
        devices: list[int] = []
        if x.device.type == "cuda":
            devices = [x.device.index if x.device.index is not None else torch.cuda.current_device()]
        with _seeded_global_rng(seed + 7919 * calls[0], devices):
            calls[0] += 1
            return augment(x)

    return perturb


def stability(
    explain: Explain,
    inputs: Tensor,
    targets: Tensor,
    k: int = 4,
    sigma: float = 0.1,
    seed: int = 0,
    augment: Callable[[Tensor], Tensor] | None = None,
    maps: Tensor | dict[str, Tensor] | None = None,
    batch_size: int | None = None,
    positions: Tensor | None = None,
) -> Tensor | dict[str, Tensor]:
    """Mean Spearman correlation between ``|M(x)|`` and ``|M(x + δ)|`` over ``k`` draws, per image -> ``[N]``.

    Args:
        explain: ``explain(inputs, targets) -> maps [N, H, W]`` (e.g. a closure over ``attribute``), or
            ``-> {method: maps}``: then every method is scored from the same noisy passes and the result is
            ``{method: [N]}`` (``maps``, if given, is a dict with the same keys).
        inputs: ``[N, C, H, W]``; targets: ``[N]`` long, held fixed for every noisy copy.
        k: number of noisy copies per image. sigma: noise std relative to each image's own std.
        seed: seeds the draws' private generators, one per image and draw, so the draws do not depend on
            ``batch_size`` (the global RNG is untouched).
        augment: optional ``augment(x) -> x'`` used instead of the noise (it must keep pixel positions,
            e.g. colour jitter; it runs under a forked, seeded global RNG).
        maps: the already computed maps of ``inputs`` (saves one ``explain`` call).
        batch_size: most images per ``explain`` call (default: all ``N·k`` at once).
        positions: ``[N]`` each image's position in the whole probe, which keys its draws with ``seed`` (default
            ``0..N-1``): the same image gets the same noise whichever images it is scored with.

    Identical maps give 1.0, unrelated maps about 0. An all-zero or constant map has no ranking: see
    :func:`spearman` for the defined values (1.0 when both maps are constant, 0.0 when one is).

    Example:
        >>> explain = lambda x, t: x.mean(1)      # the image itself is the "map"
        >>> x = torch.rand(2, 3, 8, 8)
        >>> stability(explain, x, torch.zeros(2, dtype=torch.long), sigma=0.0).tolist()
        [1.0, 1.0]
    """
    if k < 1:
        raise ValueError(f"stability needs k >= 1 noisy copies, got k={k}")
    targets = _check_targets(targets, inputs.shape[0], "stability")
    raw = explain(inputs, targets) if maps is None else maps
    multi, base = isinstance(raw, dict), _as_dict(raw, device=inputs.device)
    if augment is not None:
        perturb = _augment_perturb(augment, seed)
    else:
        perturb = _RowPerturb("normal", sigma, seed)
    total = {key: torch.zeros(inputs.shape[0], device=v.device) for key, v in base.items()}
    base_ranks = {key: _ranks(v) for key, v in base.items()}  # ranked once, compared with every draw
    for chunk in _perturbed_maps(explain, inputs, targets, k, perturb, batch_size, _position_keys(positions, inputs.shape[0], "stability")):
        for key, r in base_ranks.items():
            c = _chunk_key(chunk, key)
            m = c.shape[1]
            rho = pearson(
                r.repeat_interleave(m, dim=0), _ranks(c.reshape(-1, *c.shape[2:])), _name="stability"
            )
            total[key] += rho.reshape(-1, m).sum(dim=1)
    return _unwrap({key: v / k for key, v in total.items()}, multi)


def _chunk_key(chunk: dict[str, Tensor], key: str) -> Tensor:
    if key not in chunk:
        raise ValueError(
            f"explain(...) on perturbed inputs returned keys {sorted(chunk)}, the clean maps have {key!r}; "
            "return the same methods every call"
        )
    return chunk[key]


def max_sensitivity(
    explain: Explain,
    inputs: Tensor,
    targets: Tensor,
    n_perturb: int = 10,
    radius: float = 0.02,
    seed: int = 0,
    perturb: Perturb | None = None,
    maps: Tensor | dict[str, Tensor] | None = None,
    batch_size: int | None = None,
    positions: Tensor | None = None,
) -> Tensor | dict[str, Tensor]:
    """``max`` over ``n_perturb`` draws of ``‖M(x+δ) − M(x)‖_F / ‖M(x)‖_F`` per image -> ``[N]`` (lower is better).

    Maps are compared as returned (signed, unnormalised), as Captum's ``sensitivity_max`` does.

    Args:
        explain: ``explain(inputs, targets) -> maps [N, H, W]``, or ``-> {method: maps}`` (then the result
            is ``{method: [N]}`` from the same draws, as in :func:`stability`).
        n_perturb: number of draws. radius: the default draw is uniform in the L-inf ball of radius
            ``radius · std(x)`` (each image's own std), from a generator per image and draw seeded by ``seed``.
        perturb: replaces the default draw: ``perturb(x_expanded) -> perturbed inputs``, called once per
            chunk on the inputs expanded with ``repeat_interleave`` (Captum's layout, so the same function
            gives the same draws to both).
        maps: precomputed ``M(x)``. batch_size: most images per ``explain`` call, with Captum's
            ``max_examples_per_batch`` semantics. positions: each image's position, keying its default draws
            (as in :func:`stability`).

    Undefined case: ``‖M(x)‖ = 0`` (all-zero map) divides by 1 instead (the absolute change), with an
    :class:`UndefinedMetricWarning`; Captum does the same.

    Example:
        >>> explain = lambda x, t: x.sum(1)
        >>> x = torch.rand(2, 3, 8, 8) + 1
        >>> bool((max_sensitivity(explain, x, torch.zeros(2, dtype=torch.long)) < 0.1).all())
        True
    """
    if n_perturb < 1:
        raise ValueError(f"max_sensitivity needs n_perturb >= 1, got {n_perturb}")
    targets = _check_targets(targets, inputs.shape[0], "max_sensitivity")
    raw = explain(inputs, targets) if maps is None else maps
    multi, base = isinstance(raw, dict), _as_dict(raw, device=inputs.device)
    if perturb is None:
        perturb = _RowPerturb("uniform", radius, seed)
    flats, norms, best = {}, {}, {}
    for key, b in base.items():
        flats[key] = b.reshape(b.shape[0], -1)
        norm = flats[key].norm(dim=1)
        zero = norm == 0
        if bool(zero.any()):
            _warn(f"max_sensitivity: {int(zero.sum())} all-zero map(s); their change is divided by 1 instead")
        norms[key] = torch.where(zero, torch.ones_like(norm), norm)
        best[key] = torch.full((b.shape[0],), -math.inf, device=b.device)
    for chunk in _perturbed_maps(explain, inputs, targets, n_perturb, perturb, batch_size,
                                 _position_keys(positions, inputs.shape[0], "stability")):
        for key, flat in flats.items():
            c = _chunk_key(chunk, key)
            diff = (c.reshape(c.shape[0], c.shape[1], -1) - flat.unsqueeze(1)).norm(dim=2)
            best[key] = torch.maximum(best[key], (diff / norms[key].unsqueeze(1)).max(dim=1).values)
    return _unwrap(best, multi)


def map_ranks(maps: Tensor) -> Tensor:
    """Each map's pixels ranked by ``|M|`` (average ranks for ties): ``[N, H*W]`` float32, what :func:`spearman`
    and :func:`drift` correlate. A caller comparing each audit with the previous one ranks every map once and
    hands the ranks to :func:`drift_from_ranks`.

    Example:
        >>> map_ranks(torch.tensor([[[0.5, -2.0], [1.0, 0.0]]])).tolist()
        [[2.0, 4.0, 3.0, 1.0]]
    """
    return _ranks(_check_maps(maps, copy=False), infinite_as_zero=True)  # as _check_maps reads them, by blocks


def drift_from_ranks(prev_ranks: Tensor, ranks: Tensor) -> Tensor:
    """:func:`drift` of maps already ranked with :func:`map_ranks` -> ``[N]`` (the same values).

    Example:
        >>> m = torch.rand(2, 4, 4)
        >>> torch.equal(drift_from_ranks(map_ranks(m), map_ranks(3 * m)), drift(m, 3 * m))
        True
    """
    if prev_ranks.shape[0] != ranks.shape[0]:
        raise ValueError(
            f"drift: previous audit has {prev_ranks.shape[0]} maps, this one {ranks.shape[0]}; the probe changed"
        )
    if prev_ranks.shape != ranks.shape:
        raise ValueError(f"drift: map sizes differ, {tuple(prev_ranks.shape)} vs {tuple(ranks.shape)} pixels")
    return pearson(prev_ranks.to(ranks.device), ranks, _name="drift")


def drift(prev_maps: Tensor, maps: Tensor) -> Tensor:
    """Spearman between each image's map at the previous audit and now (``|M|``, average ranks) -> ``[N]``.

    1.0 means the ranking of pixels did not move. Constant maps: see :func:`spearman`.

    Example:
        >>> m = torch.rand(2, 4, 4)
        >>> drift(m, 2 * m).tolist()
        [1.0, 1.0]
    """
    prev_maps, maps = _check_maps(prev_maps, "prev_maps"), _check_maps(maps)
    if prev_maps.shape[0] != maps.shape[0]:
        raise ValueError(
            f"drift: previous audit has {prev_maps.shape[0]} maps, this one {maps.shape[0]}; the probe changed"
        )
    if prev_maps.shape != maps.shape:
        raise ValueError(
            f"drift: map sizes differ, {tuple(prev_maps.shape)} vs {tuple(maps.shape)}; "
            "resize with lightning_saliency.maps.resize first"
        )
    return spearman(prev_maps.to(maps.device), maps, _name="drift")
