"""A context manager that lets an audit run a model without leaving a trace on it (DESIGN §5, invariant 1).

Inside :class:`SideEffectGuard` the model is in eval mode and gradients are enabled, even when the caller sits
under ``torch.no_grad()`` or ``torch.inference_mode()``. On the way out, also when the body raised, it restores:

- every module's ``training`` flag (one by one: a model with some modules frozen in eval stays that way),
- every parameter's ``requires_grad`` and ``.grad`` (a ``None`` gradient stays ``None``),
- the random number generators: Python's ``random``, NumPy's global generator, torch's CPU generator and, when
  CUDA is initialised, every CUDA device's generator,
- the hooks registered through the guard (:meth:`SideEffectGuard.add_forward_hook`): all removed.

The attribution engine (:func:`lightning_saliency.methods.attribute`) runs every method inside one of these;
metrics that call the model can use it the same way.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Dropout(0.5)).train()
    >>> with torch.no_grad(), SideEffectGuard(model) as guard:
    ...     assert not model.training and torch.is_grad_enabled()
    ...     handle = guard.add_forward_hook(model[0], lambda module, args, output: None)
    >>> model.training, len(model[0]._forward_hooks)
    (True, 0)
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["RNGState", "SideEffectGuard", "guarded"]

_ACTIVE = threading.local()  # .guards: this thread's entered guards, innermost last


class RNGState:
    """A snapshot of every global random number generator an audit could touch.

    Example:
        >>> import torch
        >>> state = RNGState.capture()
        >>> a = torch.rand(1)
        >>> state.restore()
        >>> bool(torch.rand(1) == a)
        True
    """

    def __init__(self, python: Any, numpy: Any, torch_cpu: torch.Tensor, cuda: list[torch.Tensor] | None):
        self.python = python
        self.numpy = numpy
        self.torch_cpu = torch_cpu
        self.cuda = cuda

    @classmethod
    def capture(cls) -> RNGState:
        """Snapshot the generators now. CUDA's are included only when CUDA is already initialised (querying
        them would otherwise initialise CUDA as a side effect)."""
        cuda = None
        if torch.cuda.is_initialized():  # (is_available() would probe the driver on every call)
            cuda = torch.cuda.get_rng_state_all()
        return cls(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)

    def restore(self) -> None:
        """Put every generator back to the captured state."""
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class SideEffectGuard:
    """Run a model for an audit and leave it exactly as found (see the module docstring for what is restored).

    Args:
        model: the module to protect; every submodule and parameter is covered.
        eval_mode: put the whole model in eval mode inside the block (default ``True``).
        enable_grad: enable autograd inside the block, also under an outer ``inference_mode``/``no_grad``
            (default ``True``).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> with SideEffectGuard(model):
        ...     x = torch.ones(1, 3, requires_grad=True)
        ...     (g,) = torch.autograd.grad(model(x).sum(), [x])
        >>> model.weight.grad is None
        True
    """

    def __init__(self, model: nn.Module, *, eval_mode: bool = True, enable_grad: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"SideEffectGuard needs a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.eval_mode = eval_mode
        self.enable_grad = enable_grad
        self._handles: list[RemovableHandle] = []
        self._stack: contextlib.ExitStack | None = None

    # -- hooks -------------------------------------------------------------------------------------------------
    def add_forward_hook(self, module: nn.Module, hook: Callable[..., Any]) -> RemovableHandle:
        """Register ``hook`` as a forward hook on ``module``; it is removed when the guard exits (or earlier with
        :meth:`remove`)."""
        handle = module.register_forward_hook(hook)
        self._handles.append(handle)
        return handle

    def remove(self, handles: list[RemovableHandle] | None = None) -> None:
        """Remove ``handles`` (default: every hook this guard registered) now."""
        targets = list(self._handles) if handles is None else list(handles)
        for handle in targets:
            handle.remove()
            if handle in self._handles:
                self._handles.remove(handle)

    @staticmethod
    def covers(model: nn.Module) -> bool:
        """Whether this thread is inside a forward-only guard (``eval_mode=True, enable_grad=False``) of this very
        module, which restores everything when it exits: a forward-only block nested in it needs no snapshot of
        its own (:func:`lightning_saliency.metrics._common._evaluating` then only turns gradients off).

        Example:
            >>> import torch
            >>> net = torch.nn.Linear(2, 2)
            >>> with SideEffectGuard(net, enable_grad=False):
            ...     SideEffectGuard.covers(net), SideEffectGuard.covers(torch.nn.Linear(2, 2))
            (True, False)
        """
        return any(g.model is model and g.eval_mode and not g.enable_grad for g in getattr(_ACTIVE, "guards", ()))

    # -- context -----------------------------------------------------------------------------------------------
    def __enter__(self) -> SideEffectGuard:
        self._training = [(m, m.training) for m in self.model.modules()]
        self._params = [(p, p.requires_grad, p.grad) for p in self.model.parameters()]
        self._rng = RNGState.capture()
        stack = contextlib.ExitStack()
        try:
            if self.enable_grad:
                stack.enter_context(torch.inference_mode(False))
                stack.enter_context(torch.enable_grad())
            if self.eval_mode:
                for module, flag in self._training:
                    if flag:
                        module.training = False
        except BaseException:
            stack.close()
            self._restore()
            raise
        self._stack = stack
        _ACTIVE.guards = [*getattr(_ACTIVE, "guards", ()), self]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _ACTIVE.guards = [g for g in getattr(_ACTIVE, "guards", ()) if g is not self]
        try:
            if self._stack is not None:
                self._stack.close()
                self._stack = None
        finally:
            self._restore()

    def _restore(self) -> None:
        self.remove()
        for module, flag in self._training:
            if module.training != flag:
                module.training = flag
        for param, requires_grad, grad in self._params:
            if param.requires_grad != requires_grad:
                param.requires_grad_(requires_grad)
            if param.grad is not grad:
                param.grad = grad
        self._rng.restore()


def guarded(model: nn.Module, *, eval_mode: bool = True, enable_grad: bool = True) -> SideEffectGuard:
    """Shorthand for :class:`SideEffectGuard` (``with guarded(model) as guard: ...``).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2).train()
        >>> with guarded(model):
        ...     model.training
        False
    """
    return SideEffectGuard(model, eval_mode=eval_mode, enable_grad=enable_grad)
