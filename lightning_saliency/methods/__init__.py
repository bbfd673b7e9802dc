"""Attribution methods: pure functions from (model, inputs, targets) to saliency maps; no Lightning here.

:func:`attribute` is the entry point (one shared forward and backward for every method that can share them);
the formulas live in :mod:`.cam`, :mod:`.gradients` and :mod:`.occlusion`, each in the file named after it.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    >>> attribute(model, torch.rand(1, 3, 2, 2), methods="gradient")["gradient"].shape
    torch.Size([1, 2, 2])
"""

from .engine import DEFAULT_OPTIONS, METHODS, AttributionInfo, attribute

__all__ = ["attribute", "METHODS", "DEFAULT_OPTIONS", "AttributionInfo"]
