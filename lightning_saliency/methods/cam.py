"""Class activation maps: CAM, Grad-CAM, Grad-CAM++, HiResCAM and LayerCAM (DESIGN §4).

Every function here is a pure formula over the target layer's activations ``A`` ``[N, K, h, w]`` and the
gradient of the class score with respect to them, ``G = dy^c/dA`` (same shape). They return maps at the
layer's resolution ``[N, h, w]``, float32, ReLU'd; the engine upsamples them bilinearly to the input size with
:func:`lightning_saliency.maps.resize`. Where ``A`` and ``G`` come from (one forward and one backward shared by
every method) is the engine's business: see :mod:`lightning_saliency.methods.engine`. Each formula is a row of
:mod:`lightning_saliency.methods.registry` (``rides="cam"``); a new variant is a formula here plus one row there.

Example:
    >>> import torch
    >>> A = torch.rand(2, 3, 4, 4)
    >>> G = torch.ones(2, 3, 4, 4)
    >>> gradcam(A, G).shape
    torch.Size([2, 4, 4])
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cam", "gradcam", "gradcam_plus_plus", "hirescam", "layercam", "check_gap_linear_head"]


def _check(A: Tensor, G: Tensor | None = None) -> None:
    if A.ndim != 4:
        raise ValueError(f"activations must be [N, K, h, w], got shape {tuple(A.shape)}: pass reshape= to attribute()")
    if G is not None and G.shape != A.shape:
        raise ValueError(f"gradients {tuple(G.shape)} and activations {tuple(A.shape)} must have the same shape")


def gradcam(A: Tensor, G: Tensor) -> Tensor:
    """Grad-CAM: ``alpha_k = mean_ij G_k,ij``; map ``ReLU(sum_k alpha_k A_k)``.

    Example:
        >>> import torch
        >>> A = torch.tensor([[[[1.0, -1.0]], [[2.0, 0.0]]]])  # N=1, K=2, h=1, w=2
        >>> gradcam(A, torch.ones_like(A)).tolist()
        [[[3.0, 0.0]]]
    """
    _check(A, G)
    A, G = A.float(), G.float()
    alpha = G.mean(dim=(2, 3), keepdim=True)
    return torch.relu((alpha * A).sum(dim=1))


def gradcam_plus_plus(A: Tensor, G: Tensor) -> Tensor:
    """Grad-CAM++ with the closed form for an exponential score (Chattopadhyay et al. 2018, eq. 19):
    ``a_k,ij = G^2 / (2 G^2 + (sum_ab A_k,ab) G^3)`` (a zero denominator counts as 1), ``w_k = sum_ij a_k,ij
    ReLU(G_k,ij)``, map ``ReLU(sum_k w_k A_k)``.

    Example:
        >>> import torch
        >>> A = torch.ones(1, 1, 2, 2)
        >>> gradcam_plus_plus(A, torch.zeros_like(A)).tolist()  # no gradient, no map
        [[[0.0, 0.0], [0.0, 0.0]]]
    """
    _check(A, G)
    A, G = A.float(), G.float()
    g2 = G * G
    g3 = g2 * G
    total = A.sum(dim=(2, 3), keepdim=True)
    denom = 2.0 * g2 + total * g3
    denom = torch.where(denom == 0, torch.ones_like(denom), denom)
    a = g2 / denom
    w = (a * torch.relu(G)).sum(dim=(2, 3), keepdim=True)
    return torch.relu((w * A).sum(dim=1))


def hirescam(A: Tensor, G: Tensor) -> Tensor:
    """HiResCAM: ``ReLU(sum_k G_k * A_k)`` (element-wise, no spatial averaging of the gradient).

    Example:
        >>> import torch
        >>> A = torch.tensor([[[[1.0, 2.0]]]])
        >>> hirescam(A, torch.tensor([[[[1.0, -1.0]]]])).tolist()
        [[[1.0, 0.0]]]
    """
    _check(A, G)
    return torch.relu((G.float() * A.float()).sum(dim=1))


def layercam(A: Tensor, G: Tensor) -> Tensor:
    """LayerCAM: ``ReLU(sum_k ReLU(G_k) * A_k)``.

    Example:
        >>> import torch
        >>> A = torch.tensor([[[[1.0, 2.0]]]])
        >>> layercam(A, torch.tensor([[[[-1.0, 3.0]]]])).tolist()
        [[[0.0, 6.0]]]
    """
    _check(A, G)
    return torch.relu((torch.relu(G.float()) * A.float()).sum(dim=1))


def cam(A: Tensor, class_weights: Tensor) -> Tensor:
    """CAM (Zhou et al. 2016): ``ReLU(sum_k W[c, k] A_k)`` for a global-average-pool + linear head.

    Args:
        A: activations ``[N, K, h, w]`` feeding the global average pool.
        class_weights: ``[N, K]``, the head's weight row for each image's class (``W[P] - W[Q]`` for a contrast).

    Example:
        >>> import torch
        >>> cam(torch.ones(1, 2, 1, 1), torch.tensor([[1.0, -3.0]])).tolist()
        [[[0.0]]]
    """
    _check(A)
    if class_weights.shape != A.shape[:2]:
        raise ValueError(f"class_weights must be [N, K] = {tuple(A.shape[:2])}, got {tuple(class_weights.shape)}")
    return torch.relu((class_weights.float()[:, :, None, None] * A.float()).sum(dim=1))


def check_gap_linear_head(A: Tensor, linear: torch.nn.Linear, linear_input: Tensor, layer_name: str) -> None:
    """Raise a ``ValueError`` unless ``linear`` reads the global average pool of ``A`` (what CAM requires).

    ``linear_input`` is what the linear layer received in the same forward pass.

    Example:
        >>> import torch
        >>> A = torch.rand(2, 3, 4, 4)
        >>> check_gap_linear_head(A, torch.nn.Linear(3, 5), A.mean(dim=(2, 3)), "features")
    """
    hint = ("CAM needs a global-average-pool + linear head right after the target layer (like ResNet's "
            "avgpool + fc); use method 'gradcam' instead, which equals CAM up to a positive factor on such heads")
    K = A.shape[1]
    if linear.in_features != K:
        raise ValueError(f"the last linear layer has in_features={linear.in_features} but the target layer "
                         f"{layer_name!r} has {K} channels. {hint}")
    pooled = A.detach().float().mean(dim=(2, 3))
    seen = linear_input.detach().float().reshape(pooled.shape[0], -1)
    if seen.shape != pooled.shape:
        raise ValueError(f"the last linear layer reads a {tuple(seen.shape)} input, not the pooled target layer "
                         f"{layer_name!r} {tuple(pooled.shape)}. {hint}")
    scale = pooled.abs().max().clamp_min(1e-6)
    if not torch.allclose(seen, pooled, rtol=1e-2, atol=1e-3 * float(scale)):
        raise ValueError(f"the last linear layer's input is not the global average of the target layer "
                         f"{layer_name!r}'s output. {hint}")
