"""Attribution methods: pure functions from (model, inputs, targets) to saliency maps; no Lightning here.

:func:`attribute` is the entry point (one shared forward and backward for every method that can share them);
the formulas live in :mod:`.cam`, :mod:`.gradients`, :mod:`.occlusion` and :mod:`.perturbation` (shapley,
lime), each in the file named after it or its family.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    >>> attribute(model, torch.rand(1, 3, 2, 2), methods="gradient")["gradient"].shape
    torch.Size([1, 2, 2])
"""

from typing import Any

from .engine import ON_ERROR, AttributionInfo, attribute, default_options
from .registry import MethodSpec, method_names, register_method, unregister_method

__all__ = ["attribute", "method_names", "default_options", "register_method", "unregister_method", "MethodSpec",
           "AttributionInfo", "ON_ERROR"]


def __getattr__(name: str) -> Any:
    # METHODS / DEFAULT_OPTIONS: read from the registry at each access (see engine.__getattr__)
    if name in ("METHODS", "DEFAULT_OPTIONS"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
