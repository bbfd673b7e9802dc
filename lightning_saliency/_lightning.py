"""Every lookup of the callbacks into Lightning beyond its documented API, in one place.

Checked against pytorch-lightning 2.6.6 and lightning 2.6.6 (``lightning.pytorch``). When Lightning moves one of
these, only this module changes; each lookup degrades to "not known" rather than failing the fit:

- :func:`eval_source` reads the evaluation loop's private ``_data_source`` (``trainer.fit_loop.epoch_loop.val_loop``,
  ``trainer.validate_loop``, ``trainer.test_loop``);
- :func:`stage` reads ``trainer.state.fn`` (public, but an enum whose module is internal);
- :func:`trained_epoch` reads a checkpoint's saved ``loops`` (``fit_loop.epoch_progress``);
- :func:`overrides` compares a model's hook with both distributions' ``LightningModule`` defaults;
- :data:`Base` is a ``Callback`` of both distributions; the callbacks' ``state_key`` uses the protected
  ``Callback._generate_state_key``, which Lightning documents for subclasses.

Example:
    >>> import pytorch_lightning as pl
    >>> issubclass(Base, pl.Callback), stage(object())
    (True, 'None')
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytorch_lightning as pl

__all__ = ["Base", "audit_stage", "eval_source", "final_epoch", "overrides", "stage", "trained_epoch"]


def _callback_bases() -> tuple[type, ...]:
    bases: list[type] = [pl.Callback]
    try:
        import lightning.pytorch as lpt

        if lpt.Callback is not pl.Callback:
            bases.append(lpt.Callback)
    except ImportError:  # only pytorch-lightning is installed
        pass
    return tuple(bases)


Base = type("_Base", _callback_bases(), {"__doc__": "A callback for both Lightning distributions."})


def overrides(module: Any, name: str) -> bool:
    """Whether ``module``'s class defines hook ``name`` itself (not Lightning's default).

    Example:
        >>> import pytorch_lightning as pl
        >>> class Net(pl.LightningModule):
        ...     def val_dataloader(self):
        ...         return []
        >>> overrides(Net(), "val_dataloader"), overrides(Net(), "test_dataloader")
        (True, False)
    """
    fn = getattr(type(module), name, None)
    bases = [getattr(pl.LightningModule, name, None)]
    with contextlib.suppress(ImportError):  # a lightning.pytorch module inherits that distribution's default hook
        import lightning.pytorch as lpt

        bases.append(getattr(lpt.LightningModule, name, None))
    return fn is not None and all(fn is not base for base in bases)


def eval_source(trainer: Any) -> Any:
    """Where the running stage's evaluation data comes from, as Lightning recorded it: loaders passed to
    ``fit(val_dataloaders=...)``, ``validate(dataloaders=...)`` or ``test(dataloaders=...)``, a datamodule or the
    model. ``None`` when there is none or when this Lightning version keeps it elsewhere (a private attribute).

    Example:
        >>> eval_source(object()) is None
        True
    """
    try:
        loop = {"fit": lambda: trainer.fit_loop.epoch_loop.val_loop, "validate": lambda: trainer.validate_loop,
                "test": lambda: trainer.test_loop}[stage(trainer)]()
        source = loop._data_source
        return source if source.instance is not None and source.is_defined() else None
    except Exception:
        return None


def stage(trainer: Any) -> str:
    """The running entry point: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` (``"None"`` outside one).

    Example:
        >>> stage(object())
        'None'
    """
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return str(getattr(fn, "value", fn))


def audit_stage(trainer: Any) -> str:
    """The stage an audit records: ``"validate"`` or ``"test"`` inside those entry points, else ``"fit"``.

    Example:
        >>> audit_stage(object())
        'fit'
    """
    fn = stage(trainer)
    return fn if fn in ("validate", "test") else "fit"


def trained_epoch(checkpoint: Any) -> int:
    """The last epoch whose training the weights of a checkpoint went through (``-1``: none), from the fit loop's
    epoch progress saved in it: epochs started, less one (a checkpoint saved at the end of epoch 1, during its
    validation or after the fit: 1). ``-1`` too when the checkpoint does not say.

    Example:
        >>> trained_epoch({"loops": {"fit_loop": {"epoch_progress": {"current": {"started": 2}}}}})
        1
        >>> trained_epoch({})
        -1
    """
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["started"]) - 1
    except Exception:
        return -1


def final_epoch(trainer: Any) -> bool:
    """Whether the epoch ending now is the fit's last one, as far as can be told before it ends.

    Example:
        >>> from types import SimpleNamespace
        >>> final_epoch(SimpleNamespace(should_stop=False, max_epochs=3, current_epoch=2, max_steps=-1))
        True
    """
    if getattr(trainer, "should_stop", False):
        return True
    max_epochs = getattr(trainer, "max_epochs", None)
    if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs:
        return True
    max_steps = getattr(trainer, "max_steps", -1)
    return max_steps is not None and max_steps > 0 and trainer.global_step >= max_steps
