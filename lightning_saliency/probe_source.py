"""A probe drawn from the trainer's data, and how the probe's images are shown.

:class:`~lightning_saliency.SaliencyMonitor` with ``probe=None`` draws its probe at the start of fit (validate,
test) from the running stage's evaluation dataloader, else the datamodule's or the model's
``val_dataloader()`` (:func:`probe_from_data`). Dict batches give their masks under the keys
``"object_mask"`` / ``"spurious_mask"``; ``group_key=``, ``object_mask_key=`` and ``spurious_mask_key=`` name
the keys (or, for tuple batches, the positions) to read groups and masks from instead (:func:`reader`). A key the
batches do not have fails there, before the first training step, listing the keys they have, closest first.

How the probe is shown (:func:`display`): the monitor's ``denormalize=(mean, std)`` wins, else the ``Normalize``
found in the probe's dataset transform (:attr:`ProbeSet.denormalize <lightning_saliency.probe.ProbeSet>`), else
min-max per image; the report's ``config["denormalize"]`` says which.

Example:
    >>> read = reader("site", "group_key")
    >>> read({"image": 0, "label": 1, "site": "b"})
    'b'
    >>> read({"image": 0, "label": 1, "sight": "b"})
    Traceback (most recent call last):
    ...
    ValueError: SaliencyMonitor(group_key='site'): the validation batches have no key 'site'; their keys, closest first: ['sight', 'image', 'label']
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

from ._lightning import eval_source
from .probe import ProbeSet
from .render import check_denormalize

__all__ = ["DATA_KEYS", "closest_first", "data_settings", "display", "probe_from_data", "reader"]

DATA_KEYS = {"group_key": "group_fn", "object_mask_key": "object_mask_fn", "spurious_mask_key": "spurious_mask_fn"}


def closest_first(name: Any, names: Any) -> list[str]:
    """``names`` as strings, the most similar to ``name`` first (difflib's ratio; ties by name).

    Example:
        >>> closest_first("grup", ["label", "group", "image"])[0]
        'group'
    """
    def score(other: str) -> tuple[float, str]:
        return -difflib.SequenceMatcher(None, str(name), other).ratio(), other

    return sorted((str(n) for n in names), key=score)


def reader(key: str | int, what: str) -> Callable[[Any], Any]:
    """A function returning item ``[key]`` of a dict item (or position ``key`` of a tuple item), with an error
    naming ``what`` (the monitor's argument) and the keys the item has when it has no such key."""
    def read(sample: Any) -> Any:
        if isinstance(sample, Mapping):
            if key in sample:
                return sample[key]
            raise ValueError(f"SaliencyMonitor({what}={key!r}): the validation batches have no key {key!r}; their "
                             f"keys, closest first: {closest_first(key, sample)}")
        if isinstance(sample, (tuple, list)):
            if isinstance(key, int) and not isinstance(key, bool) and -len(sample) <= key < len(sample):
                return sample[key]
            raise ValueError(f"SaliencyMonitor({what}={key!r}): the validation batches are tuples of {len(sample)} "
                             f"elements, so {what} must be a position 0..{len(sample) - 1} (or yield dict batches)")
        raise ValueError(f"SaliencyMonitor({what}={key!r}): the validation batches are {type(sample).__name__}s; "
                         "keys are read from dict (or tuple) batches")

    return read


def data_settings(probe: ProbeSet | None, denormalize: Any, **keys: Any) -> tuple[Any, dict[str, Any]]:
    """The monitor's ``denormalize`` (checked: :func:`~lightning_saliency.render.check_denormalize`, against the
    probe's channels when it is given) and its batch keys (:data:`DATA_KEYS`), checked: each ``None``, a string
    or a position, and only with ``probe=None`` (a given probe brings its own groups and masks).

    Example:
        >>> data_settings(None, ((0.5,), (0.25,)), group_key="site")
        (((0.5,), (0.25,)), {'group_key': 'site'})
    """
    pair = check_denormalize(denormalize, channels=int(probe.inputs.shape[1]) if probe is not None else None)
    unknown = sorted(set(keys) - set(DATA_KEYS))
    if unknown:
        raise TypeError(f"unknown batch key argument(s) {unknown}; known: {list(DATA_KEYS)}")
    given = {name: key for name, key in keys.items() if key is not None}
    for name, key in given.items():
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise ValueError(f"SaliencyMonitor({name}=...) must be a key of the validation batches (a string, or a "
                             f"position for tuple batches) or None, got {key!r}")
    if given and probe is not None:
        fns = ", ".join(f"{DATA_KEYS[name]}=lambda item: item[{key!r}]" for name, key in given.items())
        raise ValueError(f"SaliencyMonitor({', '.join(given)}=...) reads the validation batches, which happens only "
                         f"with probe=None; with a probe, build it with them: ProbeSet.from_dataset(..., {fns})")
    return pair, given


def display(denormalize: Any, probe: ProbeSet) -> dict[str, Any] | None:
    """The report's ``config["denormalize"]``: ``{"mean", "std", "source"}``. ``source`` is ``"argument"`` for
    the monitor's ``denormalize=`` (which wins) or one given to the probe, ``"dataset transform"`` for the
    ``Normalize`` found in the probe's dataset. ``None``: pictures are min-max scaled per image. A mean or std
    that does not fit the probe's channels is a ``ValueError``.

    Example:
        >>> import torch
        >>> display(((0.5,), (0.25,)), ProbeSet(torch.rand(2, 3, 4, 4), [0, 1]))
        {'mean': [0.5], 'std': [0.25], 'source': 'argument'}
    """
    source = "argument" if denormalize is not None else getattr(probe, "denormalize_source", None) or "argument"
    pair = denormalize if denormalize is not None else getattr(probe, "denormalize", None)
    if pair is None:
        return None
    try:
        mean, std = check_denormalize(pair, channels=int(probe.inputs.shape[1]))  # type: ignore[misc]
    except ValueError as e:
        raise ValueError(f"SaliencyMonitor(denormalize=...): {e}") from e
    return {"mean": list(mean), "std": list(std), "source": source}


def probe_from_data(trainer: Any, pl_module: Any, size: int, seed: int, group_key: str | int | None = None,
                    object_mask_key: str | int | None = None,
                    spurious_mask_key: str | int | None = None) -> ProbeSet:
    """A probe drawn from the running stage's evaluation data (else the datamodule's or model's validation), with
    groups and masks read from the batches' ``group_key``, ``object_mask_key``, ``spurious_mask_key``."""
    source = trainer.datamodule if getattr(trainer, "datamodule", None) is not None else pl_module
    try:
        evaluation = eval_source(trainer)
        loader = evaluation.dataloader() if evaluation is not None else source.val_dataloader()
        if isinstance(loader, dict):  # several evaluation loaders: the first one
            loader = next(iter(loader.values()))
        elif isinstance(loader, (list, tuple)):
            loader = loader[0]
    except Exception as e:
        raise ValueError("SaliencyMonitor could not draw a probe from val_dataloader() "
                         f"({type(e).__name__}: {e}); pass probe=ProbeSet.from_dataset(...)") from e
    keys = {"group_key": group_key, "object_mask_key": object_mask_key, "spurious_mask_key": spurious_mask_key}
    fns = {DATA_KEYS[name]: reader(key, name) for name, key in keys.items() if key is not None}
    return ProbeSet.from_dataloader(loader, size=size, seed=seed, **fns)
