"""Fragility (Ghorbani et al. 2019): how far a small, class-preserving change of the input moves the map.

:func:`fragility` runs the *top-k attack*: a few signed-gradient steps inside the L∞ ball of radius ``ε``
around ``x`` that lower ``D(x') = Σ_{p ∈ T} M(x')_p / Σ_p M(x')_p``, the share of the map's mass on ``T``, the
original map's top-``k`` pixels::

    x' ← clip_ε(x' − α · sign(∇ D(x'))),   α = 2.5 ε / steps  (Madry et al.'s step for a few steps)

and clipped to the value range: each image's own ``[min, max]`` unless ``value_range`` is given (so the value of
an image does not depend on the other images it is scored with, e.g. a DDP shard). ``ε`` defaults to
:data:`DEFAULT_EPSILON` of that range. A step that changes the real model's predicted class is rejected
(``x'`` stays, and that image's step is halved). The map of every accepted ``x'`` is measured on the **real**
model, and the value per image is the best attack found::

    fragility = max over the accepted x' of  1 − |top_k(M(x)) ∩ top_k(M(x'))| / k        (0 at x' = x)

:func:`fragility_random` is the control: ``steps`` draws of random-sign noise ``x + ε·s``, ``s ∈ {−1, +1}^d``
(same ``ε``, same clipping, same class-preserving rejection, same measurement; each image's signs seeded by
``seed``, its position and the draw), averaged over the draws that keep the class: what noise of the attack's size does to the map by chance. ``fragility`` well above
``fragility_random`` means the map can be steered, not merely that it is noisy. Lower is better for both.

**The surrogate.** For a ReLU network a gradient map is piecewise constant in ``x`` (its gradient with respect
to the input is zero almost everywhere), so an attack that differentiates the real network does not move. As
Ghorbani et al. and Dombrowski et al. 2019 do, the attack's *direction* is computed on a surrogate, a deep copy
of the model with every ``nn.ReLU`` module replaced by ``nn.Softplus(beta)`` (``beta=30`` by default: close to
ReLU, with curvature), while every *measurement* uses the real model. The user's model is never modified. A
ReLU applied functionally (``F.relu``/``torch.relu`` in ``forward``) cannot be swapped: such a model's
surrogate keeps it, and where the surrogate's direction is exactly zero for an image (nothing to follow) that
image falls back to the random-restart search below. ``nn.ReLU6``, ``nn.LeakyReLU`` and smooth activations
are kept as they are (the last two have useful curvature already).

**Which methods are attacked by gradient** is read from the method registry, never from a list of names: a
method whose map is a formula over the shared pass (``rides`` ``"shared"``: gradient, input x gradient;
``"cam"``: Grad-CAM and its variants; ``"head"``: CAM, whose map equals HiResCAM's formula up to a positive
factor on the global-average-pool + linear head CAM requires, so that formula gives its direction) is
differentiated through on the surrogate (double backprop with ``create_graph=True``); a ``"combined"`` method
is when all its parts are. Methods with a pass of their own (``"own"``: SmoothGrad, Integrated Gradients,
guided backprop, occlusion, the patch-grid methods and any registered method) get a **random-restart search**
within the same budget instead: ``steps`` random corners ``x + ε·s`` of the ball, the best class-preserving one
kept; these are the same draws as the control's, so for those methods ``fragility`` is the worst of the draws
and ``fragility_random`` their mean.

Undefined cases: an image whose original map is constant (all zero included) has no top-``k`` pixels: NaN for
both values, with an :class:`~lightning_saliency.metrics.UndefinedMetricWarning` (never 0, which would read as
robust); so is a control none of whose draws kept the class. An attacked map that is constant has lost its
top-``k`` pixels altogether (intersection 0, fragility 1). Ties in a map are broken by pixel index.

Cost per call, for ``steps = 5``: five surrogate double-backprops (attack), ten map computations and ten
forwards on the real model (attack and control); a random-searched method needs only the control's five.
Everything runs inside a :class:`~lightning_saliency.guard.SideEffectGuard` (flags, gradients, RNGs restored);
the random signs come from a private seeded generator.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..guard import SideEffectGuard
from ..maps import resize
from ._common import _check_maps, _forward, _generator, _is_constant, _position_keys, _warn

__all__ = ["fragility", "fragility_random", "fragility_scores", "gradient_attackable", "softplus_surrogate",
           "top_k_mask", "DEFAULT_EPSILON", "DEFAULT_K", "DEFAULT_STEPS", "DEFAULT_BETA"]

#: ``ε`` when none is given: this fraction of the value range ``max − min`` (about 5/255 for [0, 1] images).
DEFAULT_EPSILON = 0.02
#: attack steps (and random draws of the control).
DEFAULT_STEPS = 5
#: ``k`` when none is given: this fraction of the map's pixels (at least one).
DEFAULT_K = 0.08
#: ``β`` of the softplus that replaces ReLU in the surrogate.
DEFAULT_BETA = 30.0

Explain = Callable[[Tensor, Tensor], Tensor]


def softplus_surrogate(model: nn.Module, beta: float = DEFAULT_BETA) -> tuple[nn.Module, int]:
    """A deep copy of ``model`` with each ``nn.ReLU`` module replaced by ``nn.Softplus(beta)``, in eval mode and
    with its parameters frozen; returns ``(copy, number of modules replaced)``. ``model`` is not touched.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> sur, swapped = softplus_surrogate(net)
        >>> type(sur[1]).__name__, swapped, type(net[1]).__name__
        ('Softplus', 1, 'ReLU')
    """
    sur = copy.deepcopy(model)
    swapped = 0
    for parent in list(sur.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.ReLU:
                setattr(parent, name, nn.Softplus(beta=beta))
                swapped += 1
    sur.eval()
    sur.requires_grad_(False)
    return sur, swapped


def gradient_attackable(method: str) -> bool:
    """Whether ``method``'s map is a formula over the shared pass, so the attack can differentiate it (the
    registry's ``rides``: ``"shared"``, ``"cam"``, ``"head"``, or ``"combined"`` of such parts).

    Example:
        >>> gradient_attackable("gradcam"), gradient_attackable("gradient"), gradient_attackable("occlusion")
        (True, True, False)
    """
    from ..methods.registry import get_method

    spec = get_method(method)
    if spec.rides == "combined":
        return all(gradient_attackable(p) for p in spec.parts)
    return spec.rides in ("shared", "cam", "head")


def top_k_mask(maps: Tensor, k: int) -> Tensor:
    """``[N, H·W]`` bool: each map's ``k`` largest ``|M|`` pixels (ties to the lower pixel index); a constant map
    has none (all ``False``).

    Example:
        >>> top_k_mask(torch.tensor([[[0.1, 0.9], [0.5, 0.5]]]), 2).tolist()
        [[False, True, True, False]]
    """
    flat = _check_maps(maps).abs().reshape(maps.shape[0], -1)
    order = flat.sort(dim=1, descending=True, stable=True).indices[:, :k]
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, True)
    return mask & ~_is_constant(flat).unsqueeze(1)


def _k_of(k: int | float | None, pixels: int) -> int:
    if k is None:
        k = DEFAULT_K
    if isinstance(k, bool) or not isinstance(k, (int, float)) or k <= 0:
        raise ValueError(f"fragility: k must be a pixel count >= 1 or a fraction in (0, 1), got {k!r}")
    if isinstance(k, float) and k < 1:
        return max(1, round(k * pixels))
    if int(k) != k or k > pixels:
        raise ValueError(f"fragility: k={k!r} must be a whole number of pixels <= {pixels} (the map's size)")
    return int(k)


class _Surrogate:
    """A differentiable map of one method on the softplus copy ``net`` (``module``: its target layer)."""

    def __init__(self, spec: Any, net: nn.Module, module: nn.Module | None, reshape: Any, parts: list):
        self.spec, self.net, self.module, self.reshape, self.parts = spec, net, module, reshape, parts

    @classmethod
    def build(cls, model: nn.Module, method: str, beta: float, layer: Any, reshape: Any,
              example: Tensor) -> _Surrogate:
        """The copy (made once, shared by a combined method's parts) and the target layer found in it."""
        from ..layers import TargetLayer, resolve_layer
        from ..methods.registry import get_method

        net, _ = softplus_surrogate(model, beta)
        module, specs = None, [get_method(method)]
        specs += [get_method(p) for p in specs[0].parts]
        if any(s.needs_layer and s.rides != "combined" for s in specs):
            target = layer if isinstance(layer, TargetLayer) else resolve_layer(model, layer, reshape, example)
            name = next((n for n, m in model.named_modules() if m is target.module), target.name)
            module, reshape = net.get_submodule(name), target.reshape if reshape is None else reshape
        parts = [cls(s, net, module, reshape, []) for s in specs[1:]]
        return cls(specs[0], net, module, reshape, parts)

    def map(self, x: Tensor, t: Tensor) -> Tensor:
        """``|M(x)|`` ``[n, H, W]`` on the surrogate, differentiable with respect to ``x``."""
        from ..methods import cam as cam_mod
        from ..methods.scoring import check_logits, class_scores

        if self.spec.rides == "combined":
            return self.spec.fn(*(p.map(x, t) for p in self.parts)).abs()
        seen: list[Tensor] = []

        def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
            seen.append(output)
            return output.clone()  # an in-place op downstream must not change the activations kept

        handle = self.module.register_forward_hook(hook) if self.module is not None else None
        try:
            score = class_scores(check_logits(self.net(x)), t)
        finally:
            if handle is not None:
                handle.remove()
        if self.spec.rides == "shared":
            (g,) = torch.autograd.grad(score.sum(), [x], create_graph=True)
            return self.spec.fn(x, g).abs()
        (G,) = torch.autograd.grad(score.sum(), [seen[-1]], create_graph=True)
        A = seen[-1]
        if self.reshape is not None:
            A, G = self.reshape(A), self.reshape(G)
        formula = self.spec.fn if self.spec.rides == "cam" else cam_mod.hirescam  # "head": CAM ∝ HiResCAM
        return resize(formula(A, G), tuple(x.shape[-2:])).abs()

    def direction(self, x: Tensor, t: Tensor, top: Tensor) -> Tensor:
        """``∇_x D`` with ``D`` the share of the surrogate map's mass on ``top`` (``[n, H·W]`` bool)."""
        x = x.detach().clone().requires_grad_(True)
        flat = self.map(x, t).reshape(x.shape[0], -1)
        share = (flat * top).sum(1) / flat.sum(1).clamp_min(1e-12)
        if not share.requires_grad:
            return torch.zeros_like(x)
        (d,) = torch.autograd.grad(share.sum(), [x], allow_unused=True)
        return torch.zeros_like(x) if d is None else torch.nan_to_num(d.detach(), nan=0.0)


def _draw_seed(seed: int, position: int, draw: int) -> int:
    """The seed of one image's ``draw``-th random signs: a function of the seed, the position and the draw only."""
    return (int(seed) * 2_654_435_761 + position * 40_503 + draw * 1_000_003 + 97_531) % (2**63 - 1)


def _chunks(n: int, batch_size: int | None) -> list[slice]:
    step = n if not batch_size else int(batch_size)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def fragility_scores(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None = None,
    method: str = "gradient",
    epsilon: float | None = None,
    steps: int = DEFAULT_STEPS,
    k: int | float | None = None,
    *,
    layer: Any = "auto",
    reshape: Callable[[Tensor], Tensor] | None = None,
    beta: float = DEFAULT_BETA,
    seed: int = 0,
    maps: Tensor | None = None,
    explain: Explain | None = None,
    value_range: tuple[float, float] | None = None,
    batch_size: int | None = None,
    attack: bool = True,
    positions: Tensor | None = None,
    **options: Any,
) -> dict[str, Tensor]:
    """The top-k attack and its random control (module docstring), per image.

    Args:
        model: the classifier; never modified (the attack's direction comes from a softplus deep copy).
        inputs: ``[N, C, H, W]``. targets: ``[N]`` classes explained, held fixed (None: the predictions).
        method: the attribution method (a name of :func:`~lightning_saliency.methods.registry.method_names`).
        epsilon: the L∞ radius in input units; default :data:`DEFAULT_EPSILON` × the value range.
        steps: attack steps, and random draws of the control (the budget of both).
        k: the top-``k`` pixels: a count, or a fraction of the pixels; default :data:`DEFAULT_K` (8 %).
        layer, reshape: the target layer of CAM-family methods (as for :func:`~lightning_saliency.attribute`).
        beta: the surrogate's softplus ``β``.
        seed: seeds the random signs (a private generator; the global RNG is untouched).
        maps: ``M(x)`` if already computed (signed maps are read by magnitude).
        explain: ``explain(inputs, targets) -> maps [n, H, W]`` on the real model; default
            :func:`~lightning_saliency.attribute` with ``method``, ``layer``, ``reshape`` and ``options``.
        value_range: ``(lo, hi)`` to clip attacked inputs to and to scale ``ε``; default each image's own min
            and max.
        batch_size: most images per surrogate pass and per forward.
        attack: ``False`` computes the control only (what :func:`fragility_random` returns); ``"fragility"``
            is then the random-restart search of the control's draws.
        positions: ``[N]`` each image's position in the whole probe, which seeds its random signs (and the
            default ``explain``'s own draws, e.g. SmoothGrad's; default ``0..N-1``): the same image gets the same
            draws whichever images it is scored with.

    Returns:
        ``{"fragility": [N], "random": [N], "inputs": [N, C, H, W] the best attacked inputs (``x`` where no
        accepted step moved the map), "gradient": [N] bool, whether the image was attacked along the
        surrogate's gradient (``False``: random-restart search)}``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
        >>> r = fragility_scores(net, torch.rand(2, 1, 4, 4), method="gradient", steps=2)
        >>> sorted(r), tuple(r["fragility"].shape)
        (['fragility', 'gradient', 'inputs', 'random'], (2,))
    """
    from ..methods.engine import attribute
    from ..methods.registry import get_method

    get_method(method)  # an unknown name raises here, naming the closest known one
    if not isinstance(inputs, Tensor) or inputs.ndim != 4 or not inputs.is_floating_point():
        got = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"fragility: inputs must be float images [N, C, H, W], got {got}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"fragility: steps must be a positive int, got {steps!r}")
    model = getattr(model, "_orig_mod", model) if type(model).__name__ == "OptimizedModule" else model
    n, _, h, w = inputs.shape
    kk = _k_of(k, h * w)
    x0 = inputs.detach()
    view = (n,) + (1,) * (x0.ndim - 1)
    if value_range is None:
        lo, hi = x0.reshape(n, -1).amin(1).reshape(view), x0.reshape(n, -1).amax(1).reshape(view)
    else:
        lo, hi = (torch.full(view, float(v), device=x0.device, dtype=x0.dtype) for v in value_range)
    if epsilon is not None and (isinstance(epsilon, bool) or not isinstance(epsilon, (int, float))
                                or not math.isfinite(epsilon) or epsilon < 0):
        raise ValueError(f"fragility: epsilon must be a finite number >= 0 (input units), got {epsilon!r}")
    eps = DEFAULT_EPSILON * (hi - lo) if epsilon is None else torch.full(view, float(epsilon), device=x0.device,
                                                                         dtype=x0.dtype)
    positions = _position_keys(positions, n, "fragility")
    if explain is None:
        def explain(x: Tensor, t: Tensor) -> Tensor:
            return attribute(model, x, t, methods=(method,), layer=layer, reshape=reshape,
                             batch_size=batch_size, positions=positions, **options)[method]

    with SideEffectGuard(model):
        with torch.no_grad():
            pred0 = _forward(model, x0, batch_size).argmax(1)
        t = pred0 if targets is None else torch.as_tensor(targets, device=x0.device).reshape(-1).long()
        if t.shape[0] != n:
            raise ValueError(f"fragility: {n} inputs but {t.shape[0]} targets")

        def measure(x: Tensor) -> tuple[Tensor, Tensor]:
            """(value 1 − intersection [N], class kept [N]) of candidates ``x`` on the real model."""
            with torch.no_grad():
                kept = _forward(model, x, batch_size).argmax(1) == pred0
            top = top_k_mask(_check_maps(explain(x, t)).to(x0.device), kk)
            return 1.0 - (top & top0).sum(1).float() / kk, kept

        def clip(x: Tensor) -> Tensor:
            return torch.minimum(torch.maximum(x, torch.maximum(x0 - eps, lo)), torch.minimum(x0 + eps, hi))

        m0 = _check_maps(explain(x0, t) if maps is None else maps).to(x0.device)
        if tuple(m0.shape) != (n, h, w):
            raise ValueError(f"fragility: maps must be [N, H, W] = {(n, h, w)}, got {tuple(m0.shape)}")
        top0 = top_k_mask(m0, kk)
        undefined = ~top0.any(1)
        def corner(draw: int) -> Tensor:
            s = torch.stack([torch.randint(0, 2, x0.shape[1:], generator=_generator(torch.device("cpu"),
                                                                                    _draw_seed(seed, int(p), draw)))
                             for p in positions])
            return clip(x0 + eps * (s.to(device=x0.device, dtype=x0.dtype) * 2 - 1))

        # the control: `steps` random corners, each measured; their mean over the class-preserving ones
        total, count = torch.zeros(n, device=x0.device), torch.zeros(n, device=x0.device)
        searched, searched_x = torch.zeros(n, device=x0.device), x0.clone()
        for draw in range(steps):
            xr = corner(draw)
            value, kept = measure(xr)
            total += torch.where(kept, value, torch.zeros_like(value))
            count += kept.float()
            better = kept & (value > searched)
            searched = torch.where(better, value, searched)
            searched_x[better] = xr[better]
        random = torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))

        gradient = torch.zeros(n, dtype=torch.bool, device=x0.device)
        best, best_x = searched.clone(), searched_x
        if attack and gradient_attackable(method):
            try:
                sur = _Surrogate.build(model, method, beta, layer, reshape, x0[:1])
            except Exception as err:  # noqa: BLE001 - a model that cannot be copied: the search stands
                warnings.warn(f"fragility: no softplus surrogate of the model ({type(err).__name__}: {err}); "
                              f"{method!r} is scored by the random-restart search", RuntimeWarning, stacklevel=2)
                sur = None
            if sur is not None:
                best, best_x, gradient = _attack(sur, x0, t, top0, clip, measure, eps, steps, batch_size,
                                                 searched, searched_x)
        if bool(undefined.any()):
            _warn(f"fragility: {int(undefined.sum())} constant map(s) have no top-k pixels; NaN for them")
        nan = torch.full_like(best, math.nan)
        best, random = torch.where(undefined, nan, best), torch.where(undefined, nan, random)
    return {"fragility": best, "random": random, "inputs": best_x, "gradient": gradient}


def _attack(sur: _Surrogate, x0: Tensor, t: Tensor, top0: Tensor, clip: Callable[[Tensor], Tensor],
            measure: Callable[[Tensor], tuple[Tensor, Tensor]], eps: Tensor, steps: int, batch_size: int | None,
            searched: Tensor, searched_x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """PGD on the surrogate's ``D``; images with no gradient to follow keep the random search's result."""
    n = x0.shape[0]
    view = (-1,) + (1,) * (x0.ndim - 1)
    step = (2.5 / steps) * eps.reshape(n)
    x, best, best_x = x0.clone(), torch.zeros(n, device=x0.device), x0.clone()
    followed = torch.ones(n, dtype=torch.bool, device=x0.device)
    for j in range(steps):
        d = torch.cat([sur.direction(x[s], t[s], top0[s]) for s in _chunks(n, batch_size)])
        if j == 0:
            followed = d.reshape(n, -1).abs().amax(1) > 0
            if not bool(followed.any()):
                break
        cand = clip(x - step.reshape(view) * d.sign())
        value, kept = measure(cand)
        x = torch.where(kept.reshape(view), cand, x)
        step = torch.where(kept, step, step / 2)
        better = kept & (value > best)
        best = torch.where(better, value, best)
        best_x[better] = cand[better]
    best = torch.where(followed, best, searched)
    best_x[~followed] = searched_x[~followed]
    return best, best_x, followed


def fragility(model: nn.Module, inputs: Tensor, targets: Tensor | None = None, method: str = "gradient",
              epsilon: float | None = None, steps: int = DEFAULT_STEPS, k: int | float | None = None,
              **kwargs: Any) -> Tensor:
    """``1 −`` the top-``k`` intersection of ``M(x)`` and the map after the top-k attack, per image -> ``[N]``
    (0: the attack could not move the top-``k`` pixels; lower is better). Arguments: :func:`fragility_scores`.

    Example:
        >>> lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))   # its gradient map |W| does not depend on x
        >>> fragility(lin, torch.rand(4, 1, 4, 4), method="gradient").tolist()
        [0.0, 0.0, 0.0, 0.0]
    """
    return fragility_scores(model, inputs, targets, method, epsilon, steps, k, **kwargs)["fragility"]


def fragility_random(model: nn.Module, inputs: Tensor, targets: Tensor | None = None, method: str = "gradient",
                     epsilon: float | None = None, steps: int = DEFAULT_STEPS, k: int | float | None = None,
                     **kwargs: Any) -> Tensor:
    """The control of :func:`fragility`: the mean over ``steps`` random-sign draws ``x ± ε`` (class kept) of
    ``1 −`` the top-``k`` intersection, per image -> ``[N]``. Arguments: :func:`fragility_scores`.

    Example:
        >>> lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> fragility_random(lin, torch.rand(4, 1, 4, 4)).tolist()
        [0.0, 0.0, 0.0, 0.0]
    """
    kwargs.setdefault("attack", False)  # the control's draws come first: the same values as with the attack
    return fragility_scores(model, inputs, targets, method, epsilon, steps, k, **kwargs)["random"]
