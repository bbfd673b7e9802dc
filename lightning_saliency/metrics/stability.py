"""Stability metrics: does the map survive a small change of the input, and across audits?

* :func:`stability`: mean Spearman rank correlation between ``M(x)`` and ``M(x + δ)`` over ``k`` draws,
  ``δ ~ N(0, (σ·std(x))²)`` with ``std(x)`` the per-image standard deviation, target class held fixed.
* :func:`max_sensitivity`: ``max`` over draws of ``‖M(x+δ) − M(x)‖_F / ‖M(x)‖_F`` (the quantity Captum calls
  ``sensitivity_max``; with the same perturbation function the two agree to float precision).
* :func:`drift`: Spearman between this audit's maps and the previous audit's, per image.

Also the rank helpers the other metric files share: :func:`rank` (average ranks for ties, batched),
:func:`spearman` and :func:`pearson` (per row, with defined values for constant rows), and
:class:`UndefinedMetricWarning`, the warning every metric emits when it returns a defined value for an
undefined case.

Conventions (all metrics in this package): maps are ``[N, H, W]``; the rank-based metrics compare ``|M|``
(signed maps such as input x gradient are read by magnitude); every function returns a float32 tensor
``[N]`` of per-image values on the inputs' device, never NaN. Noise is drawn from a private, seeded
:class:`torch.Generator`, so the global RNG is never touched.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

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


class UndefinedMetricWarning(UserWarning):
    """A metric met an undefined case (all-zero map, constant map, single group, ...) and returned the
    documented defined value instead of NaN."""


def _warn(message: str) -> None:
    warnings.warn(message, UndefinedMetricWarning, stacklevel=3)


def _check_maps(maps: Tensor, name: str = "maps") -> Tensor:
    if not isinstance(maps, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [N, H, W], got {type(maps).__name__}")
    if maps.ndim != 3:
        raise ValueError(
            f"{name} must have shape [N, H, W] (one map per image), got {tuple(maps.shape)}; "
            "squeeze a channel dimension or stack single maps with torch.stack"
        )
    return torch.nan_to_num(maps.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)


def rank(x: Tensor) -> Tensor:
    """Ranks ``1..L`` along the last dimension, ties get the average of their ranks (batched, float32).

    NaN has no rank: replace it first (e.g. ``torch.nan_to_num``). On the CPU, float32 rows of up to 2**31
    values are sorted as packed integer keys (see :func:`_sort_keys`), which NumPy sorts with SIMD instructions
    about twice as fast as a ``torch.sort`` that also returns the order; elsewhere ``torch.sort`` is used.

    Example:
        >>> rank(torch.tensor([[3.0, 1.0, 3.0, 2.0]])).tolist()
        [[3.5, 1.0, 3.5, 2.0]]
    """
    shape = x.shape
    length = shape[-1] if x.ndim else 1
    flat = x.reshape(-1, length)
    if flat.device.type == "cpu" and flat.dtype == torch.float32 and length < 2**31 and flat.numel():
        values, order = _sort_keys(flat)
    else:
        values, order = flat.sort(dim=1, stable=True)
    pos = torch.arange(length, device=x.device).expand_as(order)
    first = torch.ones_like(values, dtype=torch.bool)
    first[:, 1:] = values[:, 1:] != values[:, :-1]
    last = torch.ones_like(first)
    last[:, :-1] = first[:, 1:]
    start = torch.where(first, pos, torch.zeros_like(pos)).cummax(dim=1).values
    end = torch.where(last, pos, torch.full_like(pos, length)).flip(1).cummin(dim=1).values.flip(1)
    avg = (start + end).float() / 2.0 + 1.0
    return torch.empty_like(avg).scatter_(1, order, avg).reshape(shape)


def _sort_keys(flat: Tensor) -> tuple[Tensor, Tensor]:
    """Sort the rows of a CPU float32 ``[R, L]`` tensor: ``(keys, order)``, where ``keys`` increase with the
    sorted values (equal keys exactly for equal values) and ``order`` is a stable argsort.

    Each value's IEEE-754 bits become a signed int32 that orders like the float (negative floats have their
    31 lower bits flipped; ``-0.0`` is made ``+0.0`` first), then an int64 ``key << 32 | position``: sorting
    those sorts by value and breaks ties by position, i.e. stably, in one pass over plain integers.
    """
    import numpy as np

    a = np.ascontiguousarray((flat + 0.0).numpy())  # + 0.0 turns -0.0 into +0.0: equal floats, equal keys
    bits = a.view(np.int32)
    key32 = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))
    packed = (key32.astype(np.int64) << 32) | np.arange(a.shape[1], dtype=np.int64)
    packed.sort(axis=1)
    order = torch.from_numpy(packed & np.int64(0xFFFFFFFF))
    keys = torch.from_numpy(packed >> 32)
    return keys, order


def _is_constant(flat: Tensor) -> Tensor:
    span = flat.max(dim=1).values - flat.min(dim=1).values
    scale = flat.abs().max(dim=1).values.clamp_min(1.0)
    return span <= 1e-12 * scale


def pearson(a: Tensor, b: Tensor, *, _name: str = "pearson") -> Tensor:
    """Pearson correlation per row of ``a`` and ``b`` (``[N, ...]``, flattened after dim 0) -> ``[N]``.

    Undefined cases (a constant row): both rows constant -> 1.0 (nothing distinguishes them), exactly one
    constant -> 0.0; either way an :class:`UndefinedMetricWarning` names how many rows.

    Example:
        >>> round(pearson(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2.0, 4.0, 7.0]])).item(), 3)
        0.993
    """
    if a.shape != b.shape:
        raise ValueError(f"{_name}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    fa = torch.nan_to_num(a.reshape(a.shape[0], -1).double())
    fb = torch.nan_to_num(b.reshape(b.shape[0], -1).double())
    ca = fa - fa.mean(dim=1, keepdim=True)
    cb = fb - fb.mean(dim=1, keepdim=True)
    const_a, const_b = _is_constant(fa), _is_constant(fb)
    denom = ca.norm(dim=1) * cb.norm(dim=1)
    r = (ca * cb).sum(dim=1) / denom.clamp_min(1e-30)
    r = r.clamp(-1.0, 1.0).float()
    both, one = const_a & const_b, const_a ^ const_b
    if bool((both | one).any()):
        _warn(
            f"{_name}: {int(both.sum())} pair(s) of constant maps (defined as correlation 1.0) and "
            f"{int(one.sum())} pair(s) with one constant map (defined as 0.0); an all-zero map has no ranking"
        )
    r = torch.where(both, torch.ones_like(r), r)
    return torch.where(one, torch.zeros_like(r), r)


def spearman(a: Tensor, b: Tensor, *, absolute: bool = True, _name: str = "spearman") -> Tensor:
    """Spearman rank correlation per image of two map batches ``[N, H, W]`` (or ``[N, L]``) -> ``[N]``.

    ``absolute=True`` ranks ``|M|`` (the package convention for signed maps). Ties get average ranks.
    A constant map (all-zero included) has no ranking: both constant -> 1.0, one constant -> 0.0, with an
    :class:`UndefinedMetricWarning`.

    Example:
        >>> spearman(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[10.0, 20.0, 30.0]])).tolist()
        [1.0]
    """
    if a.shape != b.shape:
        raise ValueError(
            f"{_name}: map shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}; "
            "resize with lightning_saliency.maps.resize first"
        )
    return pearson(_ranks(a, absolute), _ranks(b, absolute), _name=_name)


def _ranks(maps: Tensor, absolute: bool = True) -> Tensor:
    flat = torch.nan_to_num(maps.detach().reshape(maps.shape[0], -1).float())
    return rank(flat.abs() if absolute else flat)


def _check_targets(targets: Tensor | None, n: int, name: str) -> Tensor:
    if targets is None:
        raise ValueError(
            f"{name} needs targets (a LongTensor [N]) so the explained class is held fixed under "
            "perturbation; pass e.g. model(inputs).argmax(1)"
        )
    targets = torch.as_tensor(targets).reshape(-1)
    if targets.shape[0] != n:
        raise ValueError(f"{name}: {n} inputs but {targets.shape[0]} targets")
    return targets


def _perturbed_maps(
    explain: Explain,
    inputs: Tensor,
    targets: Tensor,
    n_draws: int,
    perturb: Perturb,
    batch_size: int | None,
) -> Iterator[dict[str, Tensor]]:
    """Yield ``{key: maps [N, m, H, W]}`` of perturbed inputs per chunk of ``m`` draws (key ``""`` when
    ``explain`` returns a single tensor).

    Layout as in Captum: each chunk expands the inputs with ``repeat_interleave(m)`` (the ``m`` copies of
    image ``i`` are contiguous) and calls ``perturb`` once on the whole expanded batch. ``batch_size`` caps
    the number of images per ``explain`` call (at least one draw of every image).
    """
    n = inputs.shape[0]
    per_chunk = n_draws if batch_size is None else min(max(batch_size // n, 1), n_draws)
    done = 0
    while done < n_draws:
        m = min(per_chunk, n_draws - done)
        expanded = inputs.repeat_interleave(m, dim=0)
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


def _gaussian_perturb(sigma: float, generator: torch.Generator) -> Perturb:
    def perturb(x: Tensor) -> Tensor:
        std = x.detach().float().reshape(x.shape[0], -1).std(dim=1, unbiased=False)
        std = std.reshape(-1, *([1] * (x.ndim - 1)))
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        return x + (noise * sigma * std).to(x.dtype)

    return perturb


def _uniform_perturb(radius: float, generator: torch.Generator) -> Perturb:
    def perturb(x: Tensor) -> Tensor:
        std = x.detach().float().reshape(x.shape[0], -1).std(dim=1, unbiased=False)
        std = std.reshape(-1, *([1] * (x.ndim - 1)))
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        return x + ((2.0 * u - 1.0) * radius * std).to(x.dtype)

    return perturb


@contextlib.contextmanager
def _seeded_global_rng(seed: int, devices: list[int]) -> Iterator[None]:
    """Seed the global CPU generator (and those of the CUDA ``devices``) for the block, restoring them after.

    Seeds the generators directly rather than with ``torch.manual_seed``, which would also queue a seed for
    CUDA devices not initialised yet (a lasting side effect on their random state).
    """
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        for d in devices:
            torch.cuda.default_generators[d].manual_seed(seed)
        yield


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


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


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
) -> Tensor | dict[str, Tensor]:
    """Mean Spearman correlation between ``|M(x)|`` and ``|M(x + δ)|`` over ``k`` draws, per image -> ``[N]``.

    Args:
        explain: ``explain(inputs, targets) -> maps [N, H, W]`` (e.g. a closure over ``attribute``), or
            ``-> {method: maps}``: then every method is scored from the same noisy passes and the result is
            ``{method: [N]}`` (``maps``, if given, is a dict with the same keys).
        inputs: ``[N, C, H, W]``; targets: ``[N]`` long, held fixed for every noisy copy.
        k: number of noisy copies per image. sigma: noise std relative to each image's own std.
        seed: seeds a private generator (the global RNG is untouched).
        augment: optional ``augment(x) -> x'`` used instead of the noise (it must keep pixel positions,
            e.g. colour jitter; it runs under a forked, seeded global RNG).
        maps: the already computed maps of ``inputs`` (saves one ``explain`` call).
        batch_size: most images per ``explain`` call (default: all ``N·k`` at once).

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
        perturb = _gaussian_perturb(sigma, _generator(inputs.device, seed))
    total = {key: torch.zeros(inputs.shape[0], device=v.device) for key, v in base.items()}
    base_ranks = {key: _ranks(v) for key, v in base.items()}  # ranked once, compared with every draw
    for chunk in _perturbed_maps(explain, inputs, targets, k, perturb, batch_size):
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
) -> Tensor | dict[str, Tensor]:
    """``max`` over ``n_perturb`` draws of ``‖M(x+δ) − M(x)‖_F / ‖M(x)‖_F`` per image -> ``[N]`` (lower is better).

    Maps are compared as returned (signed, unnormalised), as Captum's ``sensitivity_max`` does.

    Args:
        explain: ``explain(inputs, targets) -> maps [N, H, W]``, or ``-> {method: maps}`` (then the result
            is ``{method: [N]}`` from the same draws, as in :func:`stability`).
        n_perturb: number of draws. radius: the default draw is uniform in the L-inf ball of radius
            ``radius · std(x)`` (each image's own std).
        perturb: replaces the default draw: ``perturb(x_expanded) -> perturbed inputs``, called once per
            chunk on the inputs expanded with ``repeat_interleave`` (Captum's layout, so the same function
            gives the same draws to both).
        maps: precomputed ``M(x)``. batch_size: most images per ``explain`` call, with Captum's
            ``max_examples_per_batch`` semantics.

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
        perturb = _uniform_perturb(radius, _generator(inputs.device, seed))
    flats, norms, best = {}, {}, {}
    for key, b in base.items():
        flats[key] = b.reshape(b.shape[0], -1)
        norm = flats[key].norm(dim=1)
        zero = norm == 0
        if bool(zero.any()):
            _warn(f"max_sensitivity: {int(zero.sum())} all-zero map(s); their change is divided by 1 instead")
        norms[key] = torch.where(zero, torch.ones_like(norm), norm)
        best[key] = torch.full((b.shape[0],), -math.inf, device=b.device)
    for chunk in _perturbed_maps(explain, inputs, targets, n_perturb, perturb, batch_size):
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
    return _ranks(_check_maps(maps))


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
