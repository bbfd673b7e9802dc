"""Faithfulness metrics: does the map point at what the model actually uses?

* :func:`deletion_auc` / :func:`insertion_auc` (RISE, Petsiuk et al. 2018): rank pixels by ``|M|``, move them
  from the image to a baseline (deletion) or from the baseline to the image (insertion) in ``steps`` equal
  steps, and take the area under the softmax probability of the target class, by the trapezoid rule over
  ``x ∈ [0, 1]`` (the share of pixels moved). Deletion low / insertion high is good; the same curves for a
  seeded random ranking are the reference. Batched over images and steps.
* :func:`infidelity` (Yeh et al. 2019): ``E_I[(Iᵀ M − (y(x) − y(x − I)))²]``, ``I ~ N(0, σ²)``, with ``y`` the
  target logit; agrees with ``captum.metrics.infidelity`` given the same perturbations.
* :func:`completeness_gap`: ``|Σ M − (y(x) − y(x′))| / |y(x) − y(x′)|`` for maps that claim completeness
  (Integrated Gradients, input x gradient), ``x′`` the baseline.

Every function takes the model (``model(x) -> logits [N, K]``), runs its forwards under ``torch.no_grad()`` in
eval mode inside a :class:`~lightning_saliency.guard.SideEffectGuard` (each module's ``training`` flag, the
gradients and the global RNGs are restored afterwards); nothing else about the model is touched.
Per-image results are float32 tensors ``[N]`` on the inputs' device. ``targets=None`` explains the class the
model predicts for the clean input.

Maps: ``[N, H, W]`` (channel-summed, as the engine returns them). :func:`infidelity` and
:func:`completeness_gap` also accept attributions shaped like the inputs ``[N, C, H, W]`` and then use them
as they are; for ``[N, H, W]`` maps the perturbation ``I`` is one value per pixel shared by all channels, so
``Iᵀ M = Σ_hw I_hw M_hw`` is the exact first-order term for a channel-summed attribution.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..patches import gaussian_blur
from ._common import (
    _check_maps,
    _evaluating,
    _forward,
    _position_keys,
    _probabilities,
    _row_noise,
    _targets,
    _warn,
)

__all__ = ["deletion_auc", "insertion_auc", "infidelity", "completeness_gap", "gaussian_blur"]


def _check_inputs(inputs: Tensor, name: str) -> None:
    if not isinstance(inputs, Tensor) or inputs.ndim != 4:
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"{name}: inputs must be [N, C, H, W] images, got {shape}")


def _baseline(inputs: Tensor, baseline: str | float | Tensor, blur_sigma: float | None) -> Tensor:
    if isinstance(baseline, str):
        if baseline == "blur":
            sigma = blur_sigma if blur_sigma is not None else max(1.5, max(inputs.shape[-2:]) / 32)
            return gaussian_blur(inputs, sigma)
        if baseline == "zeros":
            return torch.zeros_like(inputs)
        if baseline == "mean":
            return inputs.mean(dim=(2, 3), keepdim=True).expand_as(inputs)
        raise ValueError(f"unknown baseline {baseline!r}: use 'blur', 'zeros', 'mean', a number or a tensor")
    return torch.as_tensor(baseline, dtype=inputs.dtype, device=inputs.device).expand_as(inputs)


def _positions(order: Tensor) -> Tensor:
    """Inverse permutation per row: ``pos[i, p]`` is pixel ``p``'s place in image ``i``'s ranking."""
    pos = torch.empty_like(order)
    ar = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return pos.scatter_(1, order, ar)


def _curves(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    base: Tensor,
    positions: Tensor,
    steps: int,
    insertion: bool,
    batch_size: int | None,
) -> Tensor:
    n, c, h, w = inputs.shape
    counts = torch.round(torch.arange(steps + 1, device=inputs.device) * (h * w) / steps).long()
    total = n * (steps + 1)
    chunk = total if not batch_size else batch_size
    probs = []
    for start in range(0, total, chunk):
        j = torch.arange(start, min(start + chunk, total), device=inputs.device)
        img, t = j // (steps + 1), j % (steps + 1)
        moved = (positions[img] < counts[t].unsqueeze(1)).reshape(-1, 1, h, w)
        x, b = inputs[img], base[img]
        mixed = torch.where(moved, x, b) if insertion else torch.where(moved, b, x)
        p = _probabilities(model, mixed)
        probs.append(p.gather(1, targets[img].unsqueeze(1)).squeeze(1))
    return torch.cat(probs).reshape(n, steps + 1)


def _auc(curve: Tensor) -> Tensor:
    return ((curve[:, :-1] + curve[:, 1:]) / 2).mean(dim=1)


def _rise(
    name: str,
    insertion: bool,
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None,
    maps: Tensor,
    steps: int,
    baseline: str | float | Tensor,
    blur_sigma: float | None,
    batch_size: int | None,
    random_reference: bool,
    seed: int,
    positions: Tensor | None,
) -> dict[str, Tensor]:
    _check_inputs(inputs, name)
    maps = _check_maps(maps).to(inputs.device).abs()
    if maps.shape != (inputs.shape[0], *inputs.shape[2:]):
        raise ValueError(
            f"{name}: maps {tuple(maps.shape)} do not match inputs {tuple(inputs.shape)}; maps are [N, H, W] "
            "at input resolution (lightning_saliency.maps.resize)"
        )
    if steps < 1:
        raise ValueError(f"{name}: steps must be >= 1, got {steps}")
    n = inputs.shape[0]
    flat = maps.reshape(n, -1)
    keys = _position_keys(positions, n, name)  # each image's random ranking is keyed by its position, not its row
    random_order = _row_noise("uniform", flat.shape[1:], seed, keys, torch.zeros_like(keys)).to(
        inputs.device).argsort(dim=1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    constant = (flat.max(dim=1).values - flat.min(dim=1).values) <= 0
    if bool(constant.any()):
        _warn(
            f"{name}: {int(constant.sum())} constant or all-zero map(s) rank no pixel first; they use the "
            "random ranking, so their AUC equals the random reference"
        )
        order = torch.where(constant.unsqueeze(1), random_order, order)
    with _evaluating(model):
        targets = _targets(model, inputs, targets, batch_size)
        base = _baseline(inputs, baseline, blur_sigma)
        curve = _curves(model, inputs, targets, base, _positions(order), steps, insertion, batch_size)
        out = {"auc": _auc(curve), "curve": curve}
        if random_reference:
            rcurve = _curves(
                model, inputs, targets, base, _positions(random_order), steps, insertion, batch_size
            )
            out.update(random_auc=_auc(rcurve), random_curve=rcurve)
    return out


def deletion_auc(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None,
    maps: Tensor,
    steps: int = 16,
    baseline: str | float | Tensor = "blur",
    blur_sigma: float | None = None,
    batch_size: int | None = 64,
    random_reference: bool = True,
    seed: int = 0,
    positions: Tensor | None = None,
) -> dict[str, Tensor]:
    """RISE deletion: area under the target probability as the top-ranked pixels are removed (low is good).

    Args:
        model: ``model(x) -> logits``; run in eval mode under no_grad, its flags restored.
        inputs: ``[N, C, H, W]``; targets: ``[N]`` or None (the predicted class); maps: ``[N, H, W]``.
        steps: ``T``; step ``t`` replaces the top ``round(t·H·W/T)`` pixels (all channels) by the baseline.
        baseline: ``"blur"`` (Gaussian blur of the input, ``blur_sigma`` default ``max(1.5, max(H, W)/32)``),
            ``"zeros"``, ``"mean"`` (per-image channel means), a number or a tensor broadcastable to inputs.
        batch_size: most images per forward over all ``N·(T+1)`` (image, step) pairs; None = all at once.
        random_reference: also run a random ranking (seeded by ``seed`` and each image's position, identical for
            deletion and insertion).
        positions: ``[N]`` each image's position in the whole probe, which keys its random ranking (default
            ``0..N-1``): an image gets the same ranking whichever images it is scored with.

    Returns:
        ``{"auc": [N], "curve": [N, T+1], "random_auc": [N], "random_curve": [N, T+1]}`` (the random keys
        only with ``random_reference``). AUC is in ``[0, 1]``: trapezoid rule over ``x = t/T``. Ties in the
        ranking keep row-major order; a constant or all-zero map uses the random ranking (warning).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> r = deletion_auc(model, torch.rand(2, 3, 8, 8), None, torch.rand(2, 8, 8), steps=4)
        >>> r["auc"].shape, r["curve"].shape
        (torch.Size([2]), torch.Size([2, 5]))
    """
    return _rise(
        "deletion_auc", False, model, inputs, targets, maps, steps, baseline, blur_sigma, batch_size,
        random_reference, seed, positions,
    )  # fmt: skip


def insertion_auc(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None,
    maps: Tensor,
    steps: int = 16,
    baseline: str | float | Tensor = "blur",
    blur_sigma: float | None = None,
    batch_size: int | None = 64,
    random_reference: bool = True,
    seed: int = 0,
    positions: Tensor | None = None,
) -> dict[str, Tensor]:
    """RISE insertion: area under the target probability as the top-ranked pixels are put back into the
    baseline (high is good). Arguments and return value as :func:`deletion_auc`.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> r = insertion_auc(model, torch.rand(2, 3, 8, 8), None, torch.rand(2, 8, 8), steps=4)
        >>> bool(((r["auc"] >= 0) & (r["auc"] <= 1)).all())
        True
    """
    return _rise(
        "insertion_auc", True, model, inputs, targets, maps, steps, baseline, blur_sigma, batch_size,
        random_reference, seed, positions,
    )  # fmt: skip


def _attributions(maps: Tensor, inputs: Tensor, name: str) -> Tensor:
    if not isinstance(maps, Tensor):
        raise TypeError(f"{name}: maps must be a tensor [N, H, W] or [N, C, H, W]")
    maps = torch.nan_to_num(maps.detach().float()).to(inputs.device)
    if maps.shape == inputs.shape:
        return maps
    if maps.shape == (inputs.shape[0], *inputs.shape[2:]):
        return maps.unsqueeze(1)
    raise ValueError(
        f"{name}: maps {tuple(maps.shape)} fit neither [N, H, W] {(inputs.shape[0], *inputs.shape[2:])} nor the "
        f"inputs' shape {tuple(inputs.shape)}"
    )


def _pick(logits: Tensor, targets: Tensor) -> Tensor:
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1)


def infidelity(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None,
    maps: Tensor,
    n_perturb: int = 10,
    sigma: float = 0.1,
    seed: int = 0,
    perturb: Callable[[Tensor], Tensor] | None = None,
    normalize: bool = False,
    batch_size: int | None = None,
    positions: Tensor | None = None,
) -> Tensor:
    """``E_I[(Iᵀ M − (y(x) − y(x − I)))²]`` per image over ``n_perturb`` draws -> ``[N]`` (low is good).

    Args:
        model: ``model(x) -> logits``; ``y`` is the target logit. inputs: ``[N, C, H, W]``.
        maps: ``[N, H, W]`` (then ``I`` is ``[N, 1, H, W]``, shared by the channels) or attributions shaped
            like the inputs (then ``I`` is input-shaped). Used as given (signed, unnormalised): the metric
            is in squared logit units, so compare methods with ``normalize=True``.
        sigma: std of the default draw ``I ~ N(0, σ²)`` (absolute, in input units), from a generator per image
            and draw seeded by ``seed`` (so the draws do not depend on ``batch_size``).
        perturb: replaces the default draw: ``perturb(x_expanded) -> I`` (broadcastable to ``x_expanded``),
            called once per chunk on the inputs expanded with ``repeat_interleave`` (Captum's layout: pass
            Captum ``lambda x: (I := perturb(x), x - I)`` to get the same draws).
        normalize: Captum's ``normalize``: scale ``Iᵀ M`` by the least-squares ``β`` first, which makes the
            value invariant to the scale of the map.
        batch_size: Captum's ``max_examples_per_batch`` (most perturbed images per forward; also when one draw of
            every image is more, the forward runs in chunks of ``batch_size``).
        positions: ``[N]`` each image's position in the whole probe, keying its default draws with ``seed``
            (default ``0..N-1``): an image gets the same draws whichever images it is scored with.

    An all-zero map is well defined (the mean of ``Δy²``); no undefined case.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
        >>> x = torch.rand(2, 3, 4, 4)
        >>> w = model[1].weight[0].detach().reshape(1, 3, 4, 4).expand(2, -1, -1, -1)
        >>> bool((infidelity(model, x, torch.zeros(2, dtype=torch.long), w) < 1e-8).all())
        True
    """
    _check_inputs(inputs, "infidelity")
    if n_perturb < 1:
        raise ValueError(f"infidelity needs n_perturb >= 1, got {n_perturb}")
    attr = _attributions(maps, inputs, "infidelity")
    n = inputs.shape[0]
    keys = _position_keys(positions, n, "infidelity")

    def draw(x: Tensor, done: int, m: int) -> Tensor:
        if perturb is not None:
            return perturb(x)
        rows = _row_noise("normal", (attr.shape[1], *x.shape[2:]), seed, keys.repeat_interleave(m),
                          torch.arange(done, done + m).repeat(n))
        return sigma * rows.to(device=x.device, dtype=x.dtype)

    per_chunk = n_perturb if batch_size is None else min(max(batch_size // n, 1), n_perturb)
    sums = torch.zeros(3, n, dtype=torch.float64, device=inputs.device)
    with _evaluating(model):
        targets = _targets(model, inputs, targets, batch_size)
        y = _pick(_forward(model, inputs, batch_size), targets)
        done = 0
        while done < n_perturb:
            m = min(per_chunk, n_perturb - done)
            expanded = inputs.repeat_interleave(m, dim=0)
            noise = draw(expanded, done, m)
            y_pert = _pick(_forward(model, expanded - noise, batch_size), targets.repeat_interleave(m))
            delta = (y.repeat_interleave(m) - y_pert).reshape(n, m)
            dot = (attr.repeat_interleave(m, dim=0) * noise).reshape(n * m, -1).sum(dim=1).reshape(n, m)
            dot, delta = dot.double(), delta.double()
            if normalize:
                sums += torch.stack([(dot * dot).sum(1), (dot * delta).sum(1), (delta * delta).sum(1)])
            else:
                sums[0] += ((dot - delta) ** 2).sum(1)
            done += m
    if normalize:
        beta = torch.where(sums[0] != 0, sums[1] / sums[0].clamp_min(1e-300), torch.zeros_like(sums[0]))
        value = beta * beta * sums[0] - 2 * beta * sums[1] + sums[2]
    else:
        value = sums[0]
    return (value / n_perturb).float()


def completeness_gap(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None,
    maps: Tensor,
    baseline: float | Tensor = 0.0,
    eps: float = 1e-6,
    batch_size: int | None = None,
) -> Tensor:
    """``|Σ M − (y(x) − y(x′))| / |y(x) − y(x′)|`` per image -> ``[N]`` (low is good; IG converges to 0).

    Args:
        maps: signed ``[N, H, W]`` (channel-summed) or input-shaped attributions, as returned (no abs).
        baseline: ``x′``, the baseline the attribution integrated from (IG's default: zeros); a number or a
            tensor broadcastable to ``inputs``.
        eps: when ``|y(x) − y(x′)| < eps`` the ratio is undefined: the absolute gap ``|Σ M − Δy|`` is
            returned instead (denominator 1), with a warning.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
        >>> x = torch.rand(2, 3, 4, 4)
        >>> ixg = (x * model[1].weight[0].detach().reshape(3, 4, 4)).sum(1)   # exact for a linear model
        >>> bool((completeness_gap(model, x, torch.zeros(2, dtype=torch.long), ixg) < 1e-4).all())
        True
    """
    _check_inputs(inputs, "completeness_gap")
    attr = _attributions(maps, inputs, "completeness_gap")
    total = attr.reshape(attr.shape[0], -1).double().sum(dim=1)
    with _evaluating(model):
        targets = _targets(model, inputs, targets, batch_size)
        ref = torch.as_tensor(baseline, dtype=inputs.dtype, device=inputs.device).expand_as(inputs)
        y = _pick(_forward(model, inputs, batch_size), targets).double()
        y0 = _pick(_forward(model, ref, batch_size), targets).double()
    delta = y - y0
    small = delta.abs() < eps
    if bool(small.any()):
        _warn(
            f"completeness_gap: {int(small.sum())} image(s) with y(x) ≈ y(x') (|Δy| < {eps}); their gap is "
            "the absolute |Σ M − Δy| instead of a ratio"
        )
    denom = torch.where(small, torch.ones_like(delta), delta.abs())
    return ((total - delta).abs() / denom).float()
