"""Transformer activations as grids: :func:`vit_reshape` folds ViT tokens ``[N, P + h*w, D]`` (or channels-last
``[N, h, w, D]`` Swin stages) into ``[N, D, h, w]`` so CAM-family methods can explain them.

The prefix-token count ``P`` (class, distillation and register tokens) and the grid come from the token count
of each call, never from a hard-coded 14: the smallest ``P`` (0..16) that leaves a perfect square, or a grid of
a given aspect ratio. :class:`TokenReshape` is a picklable :func:`vit_reshape` bound to a known ``P``;
:func:`lightning_saliency.layers.resolve_layer` picks one for a ViT. Both are importable from
:mod:`lightning_saliency.layers` too.

Example:
    >>> import torch
    >>> vit_reshape(torch.zeros(1, 5 + 4 * 4, 8)).shape  # 5 prefix tokens, a 4 x 4 grid
    torch.Size([1, 8, 4, 4])
"""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["TokenReshape", "vit_reshape"]

_MAX_PREFIX_TOKENS = 16  # class token, distillation token, registers


def _grid_for(n: int, aspect: float | None) -> tuple[int, int] | None:
    """Factor ``n`` tokens into an ``h x w`` grid with ``h / w`` close to ``aspect`` (square when None)."""
    if n < 1:
        return None
    if aspect is None or abs(aspect - 1.0) < 1e-6:
        r = math.isqrt(n)
        return (r, r) if r * r == n else None
    h = max(1, round(math.sqrt(n * aspect)))
    for cand in sorted({h, h - 1, h + 1}):
        if cand >= 1 and n % cand == 0:
            w = n // cand
            if abs(math.log(cand / w) - math.log(aspect)) < 0.35:
                return cand, w
    return None


def _split_tokens(num_tokens: int, prefix: int | None, aspect: float | None) -> tuple[int, int, int]:
    if prefix is not None:
        grid = _grid_for(num_tokens - prefix, aspect)
        if grid is None:
            raise ValueError(
                f"cannot arrange {num_tokens} tokens minus {prefix} prefix token(s) into a grid"
                + (f" of aspect ratio {aspect:.3g}" if aspect else " (not a perfect square)")
                + "; pass reshape= with a callable that maps this layer's output to [N, D, h, w]"
            )
        return prefix, grid[0], grid[1]
    for p in range(0, min(_MAX_PREFIX_TOKENS, num_tokens - 1) + 1):
        grid = _grid_for(num_tokens - p, aspect)
        if grid is not None and grid[0] * grid[1] > 1:
            return p, grid[0], grid[1]
    raise ValueError(
        f"cannot find a grid in {num_tokens} tokens: no count of up to {_MAX_PREFIX_TOKENS} prefix tokens "
        "leaves a perfect square; pass reshape= with a callable that maps this layer's output to [N, D, h, w]"
    )


def vit_reshape(tokens: Tensor, prefix: int | None = None, aspect: float | None = None) -> Tensor:
    """View transformer activations as a channels-first grid ``[N, D, h, w]``.

    * ``[N, P + h*w, D]`` (ViT tokens): drops the ``P`` prefix tokens (class, distillation, registers) and
      folds the rest into ``h x w``. ``P`` defaults to the smallest count (0..16) that leaves a perfect
      square, or an ``h/w == aspect`` grid when ``aspect`` is given.
    * ``[N, h, w, D]`` (Swin, channels-last): permuted to ``[N, D, h, w]``.

    Example:
        >>> import torch
        >>> vit_reshape(torch.zeros(2, 1 + 14 * 14, 768)).shape
        torch.Size([2, 768, 14, 14])
        >>> vit_reshape(torch.zeros(2, 7, 7, 96)).shape
        torch.Size([2, 96, 7, 7])
    """
    if not isinstance(tokens, Tensor):
        raise ValueError(
            f"vit_reshape expects a tensor, got {type(tokens).__name__}; pass reshape= for this layer"
        )
    if tokens.ndim == 4:
        return tokens.permute(0, 3, 1, 2)
    if tokens.ndim != 3:
        raise ValueError(
            f"vit_reshape expects tokens [N, P + h*w, D] or channels-last [N, h, w, D], got {tuple(tokens.shape)}; "
            "pass reshape= with a callable that maps this layer's output to [N, D, h, w]"
        )
    n, t, d = tokens.shape
    p, h, w = _split_tokens(t, prefix, aspect)
    return tokens[:, p:, :].transpose(1, 2).reshape(n, d, h, w)


class TokenReshape:
    """A picklable :func:`vit_reshape` bound to a known prefix-token count and grid aspect ratio.

    The grid size is still computed from the token count of each call, so a probe of another input size works.

    Example:
        >>> import torch
        >>> TokenReshape(prefix=1)(torch.zeros(1, 1 + 4 * 4, 8)).shape
        torch.Size([1, 8, 4, 4])
    """

    def __init__(self, prefix: int | None = None, aspect: float | None = None) -> None:
        self.prefix = prefix
        self.aspect = aspect

    def __call__(self, tokens: Tensor) -> Tensor:
        return vit_reshape(tokens, prefix=self.prefix, aspect=self.aspect)

    def __repr__(self) -> str:
        return f"TokenReshape(prefix={self.prefix}, aspect={self.aspect})"
