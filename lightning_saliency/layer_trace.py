"""One traced forward pass for :func:`lightning_saliency.layers.resolve_layer`: each module's output shape, call
count and completion order, and, when asked, whether the explained output depends on it.

:func:`_run_hooked` hooks every module (or one), runs the model once inside a
:class:`~lightning_saliency.guard.SideEffectGuard` (eval mode; training flags, hooks and RNG states restored,
also when the forward raises) and returns one :class:`_Rec` per module that ran, in completion order. Given an
``output`` adapter it records autograd (no backward runs, no ``.grad`` is touched) and walks the explained
tensor's graph back from its ``grad_fn``: a module whose output is not in that graph gets ``on_path=False``
(the auxiliary head of a torchvision segmentation model, when ``"out"`` is explained).

Example:
    >>> import torch
    >>> from lightning_saliency.tasks import output_adapter
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    >>> recs, shape = _run_hooked(net, torch.zeros(1, 3, 8, 8), output=output_adapter(None))
    >>> [(r.name, r.shape, r.on_path) for r in recs], shape
    ([('0', (1, 4, 6, 6), True), ('1', (1, 4, 6, 6), True)], (1, 4, 6, 6))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .guard import SideEffectGuard


class _ForwardFailed(Exception):
    """The model's own forward pass raised (kept apart from our ValueErrors)."""


@dataclass
class _Rec:
    name: str
    module: nn.Module
    shape: tuple[int, ...]
    order: int  # completion order of the last call
    calls: int
    grad_fn: Any = None  # the autograd node of the last call's output, while the reachability check needs it
    on_path: bool = True  # the explained output depends on it (True when unknown)


def _dummy_input(model: nn.Module) -> Tensor:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(
            f"cannot build a dummy input for {type(model).__name__} (no Conv2d to read the input channels from); "
            "pass example_input= (a small batch of real inputs, e.g. probe.inputs[:2])"
        )
    size: Any = getattr(model, "image_size", None)
    if size is None:
        size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(size, int):
        hw = (size, size)
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        hw = (int(size[0]), int(size[1]))
    else:
        hw = (224, 224)
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return torch.zeros(1, conv.in_channels, *hw, device=device, dtype=dtype)


def _run_hooked(
    model: nn.Module, x: Any, only: nn.Module | None = None, output: Any = None
) -> tuple[list[_Rec], tuple[int, ...] | None]:
    """One forward pass with output-recording hooks; training flags, hooks and RNG states restored.

    With ``output`` (an :class:`~lightning_saliency.tasks.OutputAdapter`) the pass records autograd (for one
    small batch; no backward runs) and marks which records the explained tensor depends on; the second element
    is then that tensor's shape (``None`` when it cannot be told)."""
    records: dict[str, _Rec] = {}
    counter = [0]
    trace = output is not None

    def make_hook(name: str, module: nn.Module) -> Callable:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            counter[0] += 1
            rec = records.get(name)
            shape = tuple(out.shape) if isinstance(out, Tensor) else ()
            if rec is None:
                rec = records[name] = _Rec(name, module, shape, counter[0], 1)
            else:
                rec.shape, rec.order, rec.calls = shape, counter[0], rec.calls + 1
            rec.grad_fn = out.grad_fn if trace and isinstance(out, Tensor) else None

        return hook

    # the guard restores training flags and RNG states and removes the hooks, also when the forward raises
    with SideEffectGuard(model, enable_grad=trace) as guard, torch.set_grad_enabled(trace):
        for name, m in model.named_modules():
            if name and (only is None or m is only):
                guard.add_forward_hook(m, make_hook(name, m))
        if trace and isinstance(x, Tensor) and x.is_floating_point():
            x = x.detach().clone().requires_grad_(True)  # so that every layer after the input has a grad_fn
        try:
            if isinstance(x, (tuple, list)):
                raw = model(*x)
            elif isinstance(x, dict):
                raw = model(**x)
            else:
                raw = model(x)
        except Exception as err:
            raise _ForwardFailed(err) from err
        shape = _mark_path(records.values(), raw, output) if trace else None
    return sorted(records.values(), key=lambda r: r.order), shape


def _mark_path(records: Any, raw: Any, output: Any) -> tuple[int, ...] | None:
    """Set ``on_path`` False on the records whose output the explained tensor does not depend on (walking its
    autograd graph back from its ``grad_fn``); return that tensor's shape."""
    try:
        out = output(raw)
    except Exception:  # noqa: BLE001 - a bad output= gets its own error from the engine, with the fix
        out = None
    seen: set[Any] = set()
    stack = [getattr(out, "grad_fn", None)]
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            stack.extend(nxt for nxt, _ in fn.next_functions)
    for rec in records:
        if seen and rec.grad_fn is not None:
            rec.on_path = rec.grad_fn in seen
        rec.grad_fn = None  # release the graph
    return tuple(out.shape) if isinstance(out, Tensor) else None
