"""Gradient-based maps: gradient, input x gradient, SmoothGrad, Integrated Gradients, guided backprop and
guided Grad-CAM (DESIGN §4).

``gradient`` and ``input_x_gradient`` are formulas over the input gradient that the engine's shared pass
already computed. The others need passes of their own and take a :class:`~.scoring.Scorer` (the model, the
classes explained, the batch size); their forwards are batched across images and rows, never one row at a
time.

Example:
    >>> import torch
    >>> g = torch.tensor([[[[1.0, -3.0]], [[-2.0, 0.5]]]])  # [N=1, C=2, H=1, W=2]
    >>> gradient_map(g).tolist()
    [[[2.0, 3.0]]]
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from .scoring import Scorer

__all__ = [
    "gradient_map", "input_x_gradient_map", "smoothgrad", "integrated_gradients", "ig_alphas",
    "guided_backprop", "guided_gradcam", "IG_METHODS",
]

#: Integration rules for Integrated Gradients (the names Captum uses for the same rules).
IG_METHODS = ("gausslegendre", "riemann_trapezoid", "riemann_middle", "riemann_left", "riemann_right")


def gradient_map(grad: Tensor) -> Tensor:
    """Saliency (Simonyan et al. 2014): ``max_c |dy/dx_c|`` per pixel, ``[N, C, H, W] -> [N, H, W]``.

    Example:
        >>> import torch
        >>> gradient_map(-torch.ones(1, 3, 2, 2)).tolist()
        [[[1.0, 1.0], [1.0, 1.0]]]
    """
    return grad.float().abs().amax(dim=1)


def input_x_gradient_map(x: Tensor, grad: Tensor) -> Tensor:
    """Input x gradient: ``sum_c x_c * dy/dx_c`` (signed), ``[N, C, H, W] -> [N, H, W]``.

    Example:
        >>> import torch
        >>> input_x_gradient_map(torch.full((1, 2, 1, 1), 2.0), torch.tensor([[[[1.0]], [[-3.0]]]])).tolist()
        [[[-4.0]]]
    """
    return (x.float() * grad.float()).sum(dim=1)


def _row_seed(seed: int, image: int, row: int) -> int:
    return (int(seed) * 1_000_003 + image * 7_919 + row * 104_729 + 12_345) % (2**63 - 1)


def smoothgrad(scorer: Scorer, x: Tensor, samples: int = 16, sigma: float = 0.15, seed: int = 0,
               positions: Tensor | None = None) -> Tensor:
    """SmoothGrad (Smilkov et al. 2017): the mean over ``samples`` draws of the gradient map at
    ``x + N(0, (sigma * (max x - min x))^2)`` (range per image).

    The noise is drawn on the CPU from a generator seeded by ``(seed, image position, draw)``, so maps do not
    depend on the batch size or the device and the global random state is never touched. ``positions``
    (``[N]`` ints, default ``0..N-1``: each image's index in ``x``) place the images in a larger set, e.g. a
    probe shard's positions in the whole probe: the shard's maps are then the whole probe's.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> scorer = Scorer(model, targets=torch.tensor([1]), batch_size=8)
        >>> smoothgrad(scorer, torch.rand(1, 1, 2, 2), samples=4).shape
        torch.Size([1, 2, 2])
    """
    N, C, H, W = x.shape
    keys = list(range(N)) if positions is None else [int(v) for v in positions.reshape(-1).tolist()]
    if len(keys) != N:
        raise ValueError(f"smoothgrad: {N} images but {len(keys)} positions; pass one position per image")
    spread = (x.detach().float().reshape(N, -1).amax(1) - x.detach().float().reshape(N, -1).amin(1)) * sigma

    def rows(i: int, start: int, stop: int) -> Tensor:
        noise = torch.stack([
            torch.randn(C, H, W, generator=torch.Generator().manual_seed(_row_seed(seed, keys[i], j)))
            for j in range(start, stop)
        ]).to(device=x.device, dtype=x.dtype)
        return x[i : i + 1] + noise * spread[i].to(x.dtype)

    total = torch.zeros(N, H, W, device=x.device, dtype=torch.float32)
    for parts, grads, _ in scorer.stream(N, samples, rows, grads=True):
        maps = gradient_map(grads)
        for p in parts:
            total[p.image] += maps[p.offset : p.offset + p.stop - p.start].sum(0)
    return total / samples


def ig_alphas(steps: int, method: str = "gausslegendre") -> tuple[Tensor, Tensor]:
    """Points ``alpha_j`` in ``[0, 1]`` and weights ``w_j`` (summing to 1) approximating ``int_0^1 f(alpha)``.

    Example:
        >>> alphas, weights = ig_alphas(3, "riemann_trapezoid")
        >>> alphas.tolist(), weights.tolist()
        ([0.0, 0.5, 1.0], [0.25, 0.5, 0.25])
    """
    n = int(steps)
    if n < 1 or (method == "riemann_trapezoid" and n < 2):
        raise ValueError(f"ig_steps must be >= {2 if method == 'riemann_trapezoid' else 1}, got {steps}")
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        alphas, weights = (nodes + 1.0) / 2.0, weights / 2.0
    elif method == "riemann_trapezoid":
        alphas = np.linspace(0.0, 1.0, n)
        weights = np.full(n, 1.0 / (n - 1))
        weights[0] = weights[-1] = 0.5 / (n - 1)
    elif method in ("riemann_middle", "riemann_left", "riemann_right"):
        offset = {"riemann_left": 0.0, "riemann_middle": 0.5, "riemann_right": 1.0}[method]
        alphas = (np.arange(n) + offset) / n
        weights = np.full(n, 1.0 / n)
    else:
        raise ValueError(f"unknown ig_method {method!r}; choose one of {', '.join(IG_METHODS)}")
    return torch.tensor(alphas, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64)


def integrated_gradients(scorer: Scorer, x: Tensor, baseline: Tensor, steps: int = 32,
                         method: str = "gausslegendre") -> Tensor:
    """Integrated Gradients (Sundararajan et al. 2017): ``(x - x') * int_0^1 dy/dx(x' + a (x - x')) da``,
    summed over channels (signed). Completeness: the map sums to about ``y(x) - y(x')``.

    Args:
        baseline: ``x'``, the same shape as ``x``.
        steps: the number of points of the integration rule ``method`` (see :func:`ig_alphas`).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> scorer = Scorer(model, targets=torch.tensor([0]), batch_size=16)
        >>> x = torch.rand(1, 1, 2, 2)
        >>> ig = integrated_gradients(scorer, x, torch.zeros_like(x), steps=8)
        >>> bool(torch.isclose(ig.sum(), model(x)[0, 0] - model(torch.zeros_like(x))[0, 0], atol=1e-5))
        True
    """
    N, C, H, W = x.shape
    alphas, weights = ig_alphas(steps, method)
    alphas = alphas.to(device=x.device, dtype=x.dtype)
    weights = weights.to(device=x.device, dtype=torch.float32)
    delta = x - baseline

    def rows(i: int, start: int, stop: int) -> Tensor:
        return baseline[i : i + 1] + alphas[start:stop, None, None, None] * delta[i : i + 1]

    total = torch.zeros(N, C, H, W, device=x.device, dtype=torch.float32)
    for parts, grads, _ in scorer.stream(N, len(alphas), rows, grads=True):
        for p in parts:
            g = grads[p.offset : p.offset + p.stop - p.start]
            total[p.image] += (weights[p.start : p.stop, None, None, None] * g).sum(0)
    return (delta.float() * total).sum(dim=1)


def guided_backprop(scorer: Scorer, x: Tensor, add_hook=None) -> Tensor:
    """Guided backprop (Springenberg et al. 2015): the gradient map (max over channels of the absolute value)
    with every ``nn.ReLU`` passing back only positive gradients at positive inputs.

    It works through forward hooks on the model's ``nn.ReLU`` modules (``inplace=True`` included) that clamp the
    gradient arriving at each ReLU's output. A model that applies ReLU only functionally (``F.relu``,
    ``torch.relu``) has nothing to hook: that is a ``ValueError``.

    Args:
        add_hook: ``add_hook(module, fn) -> handle`` to register forward hooks (the engine passes its guard's, so
            the hooks are removed even if something raises); default ``module.register_forward_hook``.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> scorer = Scorer(model, targets=torch.tensor([0]), batch_size=4)
        >>> guided_backprop(scorer, torch.rand(1, 1, 2, 2)).shape
        torch.Size([1, 2, 2])
    """
    relus = [m for m in scorer.model.modules() if isinstance(m, nn.ReLU)]
    no_relu = ("guided_backprop needs the model's ReLUs as nn.ReLU modules, but {}: functional F.relu/torch.relu "
               "cannot be hooked. Build the model with nn.ReLU modules or choose another method such as "
               "'gradient' or 'gradcam'")
    if not relus:
        raise ValueError(no_relu.format("the model has no nn.ReLU module"))
    fired = [0]

    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        fired[0] += 1
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(lambda grad: grad.clamp(min=0))

    handles = [add_hook(m, hook) if add_hook is not None else m.register_forward_hook(hook) for m in relus]
    N, C, H, W = x.shape
    out = torch.zeros(N, H, W, device=x.device, dtype=torch.float32)
    try:
        for parts, grads, _ in scorer.stream(N, 1, lambda i, a, b: x[i : i + 1], grads=True):
            if fired[0] == 0:
                raise ValueError(no_relu.format("none of its nn.ReLU modules ran in the forward pass"))
            maps = gradient_map(grads)
            for p in parts:
                out[p.image] = maps[p.offset]
    finally:
        for h in handles:
            h.remove()
    return out


def guided_gradcam(guided: Tensor, gradcam_upsampled: Tensor) -> Tensor:
    """Guided Grad-CAM (Selvaraju et al. 2017): the guided backprop map times the upsampled Grad-CAM map.

    Example:
        >>> import torch
        >>> guided_gradcam(torch.full((1, 2, 2), 2.0), torch.eye(2)[None]).tolist()
        [[[2.0, 0.0], [0.0, 2.0]]]
    """
    if guided.shape != gradcam_upsampled.shape:
        raise ValueError(f"guided backprop {tuple(guided.shape)} and Grad-CAM {tuple(gradcam_upsampled.shape)} "
                         "maps must have the same shape")
    return guided.float() * gradcam_upsampled.float()
