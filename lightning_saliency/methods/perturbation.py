"""Patch-grid perturbation methods, DESIGN §4: Shapley value sampling (``shapley``) and LIME (``lime``).

Both treat the cells of a ``g x g`` grid over the image as the features (cell geometry and fill values:
:mod:`lightning_saliency.patches`). A coalition ``S`` of cells is the image with the cells of ``S`` kept and the
others replaced by the baseline; ``v(S)`` is its class score (the target logit, or target minus contrast).
Each map is at input resolution with every pixel holding its cell's value; the maps are signed.

- :func:`shapley` (Štrumbelj & Kononenko 2010; Castro et al. 2009): for permutations ``π`` of the cells, a
  cell's contribution is ``v(cells before it in π, plus it) - v(cells before it in π)``; its value is the mean
  over the permutations. The permutations come in antithetic pairs, each drawn permutation followed by its
  reverse (a cell early in one walk is late in the other, which cancels much of the sampling error). One walk
  costs ``g²`` forwards, plus one forward of the all-off image per image.
- :func:`lime` (Ribeiro et al. 2016): ``samples`` random on/off cell masks ``z`` (each cell on with probability
  1/2; the first mask is all on), weighted by the exponential kernel ``exp(-d² / (2 w²))`` on the cosine
  distance ``d = 1 - cos(z, 1)`` to the all-on mask (``d = 1`` for the all-off mask; the kernel LIME and Captum
  use), and a weighted ridge regression of ``v(z)`` on ``z`` with an unpenalised intercept, solved in closed form
  (``torch.linalg.solve``, float64). A cell's value is its coefficient.

The random draws come from private ``torch.Generator`` s seeded by ``shapley_seed`` / ``lime_seed`` (the same
permutations and masks for every image): the maps are reproducible and the global random state is untouched.
The perturbed images of all probe images go through the model in batches (:class:`~.scoring.Scorer`).

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    >>> scorer = Scorer(model, targets=torch.tensor([0]), batch_size=64)
    >>> x = torch.rand(1, 1, 4, 4)
    >>> shapley(scorer, x, grid=2, permutations=2).shape
    torch.Size([1, 4, 4])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..patches import baseline_images, cell_index, check_grid
from .scoring import Scorer

__all__ = ["antithetic_permutations", "lime", "lime_kernel", "lime_masks", "ridge_fit", "shapley"]


def antithetic_permutations(cells: int, count: int, generator: torch.Generator) -> Tensor:
    """``[count, cells]`` permutations: ``ceil(count / 2)`` drawn ones, each followed by its reverse.

    Example:
        >>> p = antithetic_permutations(4, 4, torch.Generator().manual_seed(0))
        >>> bool((p[1] == p[0].flip(0)).all()), bool((p[3] == p[2].flip(0)).all())
        (True, True)
    """
    drawn = torch.stack([torch.randperm(cells, generator=generator) for _ in range((count + 1) // 2)])
    return torch.stack([drawn, drawn.flip(1)], dim=1).reshape(-1, cells)[:count]


def _cells(x: Tensor, grid: Any, baseline: float | str, method: str) -> tuple[int, Tensor, Tensor]:
    """The patch-grid features of ``x``: the number of cells, each pixel's cell index and the baseline images
    (options named ``<method>_grid`` and ``<method>_baseline`` in errors)."""
    _, _, H, W = x.shape
    gh, gw = check_grid(grid, H, W, f"{method}_grid")
    return gh * gw, cell_index(H, W, (gh, gw)).to(x.device), baseline_images(x, baseline, f"{method}_baseline")


def _coalition_scores(scorer: Scorer, x: Tensor, base: Tensor, on: Tensor, idx: Tensor) -> Tensor:
    """Scores ``[N, R]`` of the ``R`` coalitions ``on [R, cells]`` (1 = keep the cell, 0 = baseline) of every
    image; the rows are built a batch at a time."""
    N = x.shape[0]
    on = on.to(device=x.device, dtype=x.dtype)

    def rows(i: int, start: int, stop: int) -> Tensor:
        keep = on[start:stop][:, idx].unsqueeze(1)  # [r, 1, H, W]
        return base[i : i + 1] + keep * (x[i : i + 1] - base[i : i + 1])

    scores = torch.empty(N, on.shape[0], device=x.device, dtype=torch.float32)
    for parts, _, s in scorer.stream(N, on.shape[0], rows, grads=False):
        for p in parts:
            scores[p.image, p.start : p.stop] = s[p.offset : p.offset + p.stop - p.start]
    return scores


def shapley(scorer: Scorer, x: Tensor, grid: Any = 8, permutations: int = 16, baseline: float | str = 0.0,
            seed: int = 0) -> Tensor:
    """Shapley values of the grid cells by antithetic permutation sampling, painted onto the pixels ``[N, H, W]``.

    Args:
        scorer: the model and the explained classes.
        x: inputs ``[N, C, H, W]``.
        grid: cells per side (an int, or ``(rows, cols)``).
        permutations: the permutations walked (in antithetic pairs; an odd count drops the last reverse).
        baseline: a switched-off cell's fill: a number, ``"mean"`` or ``"blur"`` (:mod:`lightning_saliency.patches`).
        seed: seed of the private generator drawing the permutations.

    For a model additive over the cells (``v(S) = Σ_{c ∈ S} a_c + const``) every permutation gives the exact
    value ``a_c``, so the estimate is exact whatever the number of permutations.

    Example:
        >>> import torch
        >>> w = torch.tensor([1.0, -2.0])  # logit = 1 * mean(left half) - 2 * mean(right half)
        >>> class Halves(torch.nn.Module):
        ...     def forward(self, x):
        ...         return torch.stack([x[..., :2].mean((1, 2, 3)) * w[0] + x[..., 2:].mean((1, 2, 3)) * w[1]], 1)
        >>> scorer = Scorer(Halves(), targets=torch.tensor([1]))  # one logit (binary): target 1 explains it
        >>> shapley(scorer, torch.ones(1, 1, 4, 4), grid=(1, 2), permutations=1)[0, 0].tolist()
        [1.0, 1.0, -2.0, -2.0]
    """
    N = x.shape[0]
    cells, idx, base = _cells(x, grid, baseline, "shapley")
    perms = antithetic_permutations(cells, int(permutations), torch.Generator().manual_seed(int(seed)))
    order = torch.argsort(perms, dim=1)  # order[k, c]: the step at which walk k switches cell c on
    steps = torch.arange(cells)
    walks = (order[:, None, :] <= steps[None, :, None]).reshape(-1, cells)  # [P * cells, cells]: cells on
    on = torch.cat([torch.zeros(1, cells, dtype=torch.bool), walks])  # row 0: every cell off
    scores = _coalition_scores(scorer, x, base, on, idx).double()
    P = perms.shape[0]
    walk = scores[:, 1:].reshape(N, P, cells)
    before = torch.cat([scores[:, :1, None].expand(N, P, 1), walk[:, :, :-1]], dim=2)
    gains = walk - before  # gains[n, k, j]: the contribution of cell perms[k, j]
    phi = torch.zeros_like(gains).scatter_(2, perms.to(x.device).expand(N, P, cells), gains).mean(dim=1)
    return phi.float()[:, idx]  # every pixel holds its cell's value (patches.paint, with the index at hand)


def lime_masks(cells: int, samples: int, generator: torch.Generator) -> Tensor:
    """``[samples, cells]`` float on/off masks, each cell on with probability 1/2; the first mask is all on.

    Example:
        >>> lime_masks(3, 4, torch.Generator().manual_seed(0))[0].tolist()
        [1.0, 1.0, 1.0]
    """
    z = (torch.rand(samples, cells, generator=generator) < 0.5).float()
    z[0] = 1.0
    return z


def lime_kernel(masks: Tensor, width: float) -> Tensor:
    """LIME's sample weights ``exp(-d² / (2 width²))``, ``d = 1 - cos(z, 1)`` (``d = 1`` for the all-off mask).

    Example:
        >>> [round(v, 6) for v in lime_kernel(torch.tensor([[1.0, 1.0], [0.0, 0.0]]), 0.25).tolist()]
        [1.0, 0.000335]
    """
    cells = masks.shape[1]
    on = masks.sum(dim=1)
    d = torch.where(on > 0, 1.0 - torch.sqrt(on / cells), torch.ones_like(on))
    return torch.exp(-(d**2) / (2.0 * float(width) ** 2))


def ridge_fit(features: Tensor, targets: Tensor, weights: Tensor, ridge: float) -> Tensor:
    """Weighted ridge regression with an unpenalised intercept, for several targets at once.

    Minimises ``Σ_i w_i (y_i - b - z_iᵀ β)² + ridge · |β|²`` for each column of ``targets`` ``[S, T]``, with
    ``features`` ``[S, F]`` and ``weights`` ``[S]``; returns ``β`` ``[T, F]`` (float64).

    Example:
        >>> z = torch.tensor([[0.0], [1.0], [2.0]])
        >>> round(ridge_fit(z, 3 * z + 1, torch.ones(3), 0.0).item(), 6)
        3.0
    """
    X = torch.cat([torch.ones(features.shape[0], 1, dtype=torch.float64, device=features.device),
                   features.double()], dim=1)
    w = weights.double().to(features.device)[:, None]
    penalty = torch.full((X.shape[1],), float(ridge), dtype=torch.float64, device=features.device)
    penalty[0] = 0.0
    A = X.T @ (w * X) + torch.diag(penalty)
    B = X.T @ (w * targets.double())
    try:
        return torch.linalg.solve(A, B)[1:].T
    except RuntimeError as err:  # torch.linalg.LinAlgError: a singular system (ridge 0, too few samples)
        raise ValueError(f"the weighted ridge fit is singular ({features.shape[0]} samples, {features.shape[1]} "
                         f"features, ridge strength {ridge}): use lime_ridge > 0 or more lime_samples") from err


def lime(scorer: Scorer, x: Tensor, grid: Any = 8, samples: int = 500, baseline: float | str = 0.0,
         kernel_width: float = 0.25, ridge: float = 1.0, seed: int = 0) -> Tensor:
    """LIME over the grid cells: the weighted ridge coefficients, painted onto the pixels ``[N, H, W]``.

    Args:
        scorer: the model and the explained classes.
        x: inputs ``[N, C, H, W]``.
        grid: cells per side (an int, or ``(rows, cols)``).
        samples: random on/off masks per image (the first is all on); the same masks serve every image.
        baseline: a switched-off cell's fill: a number, ``"mean"`` or ``"blur"``.
        kernel_width: ``w`` of the kernel ``exp(-d² / (2 w²))`` (:func:`lime_kernel`).
        ridge: the ridge strength (the intercept is not penalised); 1.0 as in LIME.
        seed: seed of the private generator drawing the masks.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        >>> scorer = Scorer(model, targets=torch.tensor([1, 0]))
        >>> lime(scorer, torch.rand(2, 1, 4, 4), grid=2, samples=50).shape
        torch.Size([2, 4, 4])
    """
    cells, idx, base = _cells(x, grid, baseline, "lime")
    z = lime_masks(cells, int(samples), torch.Generator().manual_seed(int(seed)))
    scores = _coalition_scores(scorer, x, base, z, idx)  # [N, samples]
    z = z.to(x.device)
    coef = ridge_fit(z, scores.T, lime_kernel(z, kernel_width), ridge)  # [N, cells]
    return coef.float()[:, idx]
