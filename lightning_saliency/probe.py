"""The probe: a fixed, fingerprinted set of images that every audit explains.

A :class:`ProbeSet` holds inputs ``[N, C, H, W]``, targets ``[N]``, optional group names (for disparity
metrics) and optional object / spurious masks ``[N, H, W]`` (for localisation metrics). It is built once,
deterministically, and its :attr:`~ProbeSet.fingerprint` (a SHA-256 of its tensors and groups) goes into every
report and checkpoint, so that two audits are only compared when they looked at the same images.

Building one:

* ``ProbeSet(inputs, targets, ...)`` from tensors;
* :meth:`ProbeSet.from_dataset` from a map-style dataset whose items are dicts (``{"image", "label", ...}``)
  or tuples (``(image, label, ...)``): ``size`` items drawn with ``torch.Generator().manual_seed(seed)``
  (the global RNG is never touched), optionally stratified so that every class gets the same share;
* :meth:`ProbeSet.from_dataloader` from a DataLoader: batches are read until a pool of ``pool_size`` samples
  is filled (or the loader ends), and the same seeded selection is made within that pool.

Display: :attr:`ProbeSet.denormalize` is the ``(mean, std)`` that undoes the inputs' normalisation for pictures
(:func:`lightning_saliency.render.to_image`), found in the dataset's transform by the builders
(:func:`~lightning_saliency.sampling.find_normalize`) or given; it is not part of the fingerprint (the same
images are the same probe, however they are shown).

Selection rules: a ``size`` larger than what is available takes everything, with a warning; ``size < 1`` and
an empty dataset are errors. The selected items keep the dataset's order (sorted indices). Stratification
gives every class ``size // K`` items and hands the remainder to classes in a seed-drawn order; a class with
too few items gives its share to the others.

For distributed audits :meth:`ProbeSet.shard` splits the probe into contiguous slices of sizes that differ by
at most one (shards may be uneven, and empty when ``world_size > len(probe)``); :attr:`ProbeSet.indices` keeps
each item's position in the full probe, so per-rank results can be gathered back in order.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, RandomSampler

from .labels import label_rows
from .render import check_denormalize
from .sampling import (
    Sample,
    _build,
    _check_masks,
    _check_size,
    _clip_size,
    _dataset_targets,
    _from_pool,
    _row_masks,
    _shape,
    _stratified,
    _take_stream,
    _to_name,
    with_normalize,
)

__all__ = ["ProbeSet"]

_STATE_VERSION = 1


def _check_inputs(inputs: Any) -> Tensor:
    if not isinstance(inputs, Tensor):
        if isinstance(inputs, np.ndarray):
            inputs = torch.from_numpy(inputs)
        else:
            raise ValueError(
                f"inputs must be a tensor [N, C, H, W], got {type(inputs).__name__}; stack your images with "
                "torch.stack([...]) (PIL images: apply torchvision.transforms.ToTensor() first)"
            )
    if inputs.ndim != 4:
        fix = (
            "add the batch dimension with inputs.unsqueeze(0) for one image [C, H, W], or the channel "
            "dimension with inputs.unsqueeze(1) for grayscale [N, H, W]"
            if inputs.ndim == 3
            else "reshape them to [N, C, H, W]"
        )
        raise ValueError(f"inputs must be [N, C, H, W], got shape {_shape(inputs)}: {fix}")
    if not inputs.is_floating_point():
        raise ValueError(
            f"inputs must be floating point, got {inputs.dtype}: convert them as the model sees them, e.g. "
            "inputs.float() / 255 for uint8 images (or transforms.ConvertImageDtype(torch.float32))"
        )
    if inputs.shape[0] > 0 and not bool(torch.isfinite(inputs).all()):
        raise ValueError(
            "inputs contain NaN or infinite values; clean the images (e.g. torch.nan_to_num) first"
        )
    return inputs.detach()


def _check_targets(targets: Any, n: int, device: torch.device) -> Tensor:
    if not isinstance(targets, Tensor):
        try:
            targets = torch.as_tensor(np.asarray(targets))
        except Exception as err:
            raise ValueError(
                f"targets must be a tensor [N] of class indices, got {type(targets).__name__}"
            ) from err
    if targets.ndim == 2 and targets.shape[0] == n and targets.shape[1] > 1:
        raise ValueError(
            f"targets must be one class index per image [N] or multi-hot labels [N, C] of 0 and 1, got shape "
            f"{_shape(targets)} (one-hot or scores?): pass targets.argmax(dim=1) for one class per image"
        )
    if targets.ndim != 1 or targets.shape[0] != n:
        raise ValueError(
            f"targets must have shape [N] = [{n}] (one class index per input), got {_shape(targets)}"
        )
    if targets.dtype == torch.bool or (targets.is_floating_point() or targets.is_complex()):
        if targets.is_floating_point() and n > 0 and bool((targets == targets.round()).all()):
            raise ValueError(
                f"targets must be integer class indices, got {targets.dtype}: pass targets.long()"
            )
        raise ValueError(f"targets must be integer class indices (torch.long), got {targets.dtype}")
    if n > 0 and int(targets.min()) < 0:
        raise ValueError(f"targets must be class indices >= 0, got a minimum of {int(targets.min())}")
    return targets.detach().to(device=device, dtype=torch.long)


def _check_groups(groups: Any, n: int) -> list[str] | None:
    if groups is None:
        return None
    if isinstance(groups, str):
        raise ValueError("groups must be a sequence of N names (one per input), not a single string")
    if isinstance(groups, Tensor):
        groups = groups.tolist()
    groups = [_to_name(g) for g in groups]
    if len(groups) != n:
        raise ValueError(f"groups must have one name per input: got {len(groups)} names for {n} inputs")
    return groups


class ProbeSet:
    """A fixed set of probe images with targets and optional groups and masks, checked and fingerprinted.

    Args:
        inputs: float tensor ``[N, C, H, W]``, as the model takes it (already normalised).
        targets: integer class indices ``[N]`` (any int dtype, list or array; stored as ``torch.long``), or
            multi-hot labels ``[N, C]`` (multi-label), or integer label maps ``[N, H, W]`` (segmentation; 255 and
            negative values: no class): each positive label or class present of an image becomes its own probe
            row (targeting it; inputs, groups and masks repeated), and :attr:`labels` keeps each row's image's
            multi-hot labels ``[rows, C]`` or label map ``[rows, H, W]`` (:mod:`lightning_saliency.labels`: for
            per-label accuracy and F1, or mean IoU). One-hot labels are refused: pass their ``argmax(dim=1)``.
        groups: optional names ``[N]`` (anything ``str()`` turns into a name), e.g. the acquisition site.
        object_masks: optional ``[N, H, W]`` (or ``[N, 1, H, W]``) bool or 0/1: where the object is; with
            multi-hot targets or label maps also one mask per label ``[N, C, H, W]`` (each row gets its label's).
        spurious_masks: optional, same forms: where a known shortcut lives (a watermark, a border).
        indices: positions in the full probe (set by :meth:`subset` / :meth:`shard`; default ``0..N-1``).
        denormalize: optional ``(mean, std)`` of the ``Normalize`` the inputs went through, to show them in true
            colours (:attr:`denormalize`; :func:`~lightning_saliency.render.check_denormalize`). The builders
            find it in the dataset's transform (:attr:`denormalize_source` ``"dataset transform"``).

    Example:
        >>> import torch
        >>> p = ProbeSet(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]), groups=["a", "a", "b", "b"])
        >>> len(p), p.group_names, len(p.fingerprint)
        (4, ['a', 'b'], 64)
        >>> [len(p.shard(r, 3)) for r in range(3)], p.shard(2, 3).indices.tolist()
        ([2, 1, 1], [3])
    """

    def __init__(
        self,
        inputs: Tensor,
        targets: Tensor | Sequence[int],
        groups: Sequence[Any] | None = None,
        object_masks: Tensor | None = None,
        spurious_masks: Tensor | None = None,
        *,
        indices: Tensor | Sequence[int] | None = None,
        labels: Tensor | None = None,
        denormalize: Any = None,
        _allow_empty: bool = False,
    ) -> None:
        inputs = _check_inputs(inputs)
        n = int(inputs.shape[0])
        expanded = label_rows(targets, n, (int(inputs.shape[2]), int(inputs.shape[3])))
        if expanded is not None:  # multi-hot labels or label maps: one row per (image, label or class present)
            image, targets, labels = expanded
            hw0, rows = (int(inputs.shape[2]), int(inputs.shape[3])), image.to(inputs.device)
            object_masks = _row_masks(object_masks, image, targets, n, hw0, "object_masks", inputs.device)
            spurious_masks = _row_masks(spurious_masks, image, targets, n, hw0, "spurious_masks", inputs.device)
            groups = None if groups is None else [_check_groups(groups, n)[i] for i in image.tolist()]
            inputs, n = inputs[rows], int(image.numel())
        if n == 0 and not _allow_empty:
            raise ValueError(
                "the probe is empty (0 inputs): pass at least one image (a non-empty dataset, size > 0)"
            )
        device = inputs.device
        hw = (int(inputs.shape[2]), int(inputs.shape[3]))
        self.inputs: Tensor = inputs
        self.targets: Tensor = _check_targets(targets, n, device)
        self.groups: list[str] | None = _check_groups(groups, n)
        self.object_masks: Tensor | None = _check_masks(object_masks, n, hw, "object_masks", device)
        self.spurious_masks: Tensor | None = _check_masks(spurious_masks, n, hw, "spurious_masks", device)
        self.labels: Tensor | None = None if labels is None else labels.detach().to(device)
        if self.labels is not None and self.labels.shape[0] != n:
            raise ValueError(f"labels must have one row per target, [{n}, ...], got {_shape(self.labels)}")
        if indices is None:
            self.indices: Tensor = torch.arange(n, dtype=torch.long)
        else:
            idx = torch.as_tensor(indices, dtype=torch.long).detach().cpu()
            if idx.shape != (n,):
                raise ValueError(f"indices must have shape [{n}], got {_shape(idx)}")
            self.indices = idx
        # for pictures only: not in the fingerprint
        self.denormalize = check_denormalize(denormalize, channels=int(inputs.shape[1]))
        self.denormalize_source: str | None = "argument" if self.denormalize is not None else None
        self._fp_key: tuple | None = None
        self._fp: str = ""

    # ----------------------------------------------------------------------------------------- basics

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def device(self) -> torch.device:
        """The device the tensors live on."""
        return self.inputs.device

    @property
    def group_names(self) -> list[str]:
        """Sorted unique group names (``[]`` without groups)."""
        return sorted(set(self.groups)) if self.groups is not None else []

    def group_counts(self) -> dict[str, int] | None:
        """``{group: count}`` in :attr:`group_names` order, or ``None`` without groups."""
        if self.groups is None:
            return None
        return {g: self.groups.count(g) for g in self.group_names}

    def class_counts(self) -> dict[int, int]:
        """``{class index: count}`` sorted by class."""
        values, counts = torch.unique(self.targets.cpu(), return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts)}

    def __repr__(self) -> str:
        if len(self) == 0:
            return f"ProbeSet(n=0, device={self.device})"
        shape = list(self.inputs.shape[1:])
        parts = [
            f"n={len(self)}",
            f"inputs={shape} {str(self.inputs.dtype).replace('torch.', '')}",
            f"classes={self.class_counts()}",
        ]
        if self.groups is not None:
            parts.append(f"groups={self.group_counts()}")
        parts.append(f"object_masks={'yes' if self.object_masks is not None else 'no'}")
        parts.append(f"spurious_masks={'yes' if self.spurious_masks is not None else 'no'}")
        parts.append(f"device={self.device}")
        parts.append(f"fingerprint={self.fingerprint[:12]}")
        return "ProbeSet(" + ", ".join(parts) + ")"

    # ----------------------------------------------------------------------------------------- fingerprint

    def _tensors(self) -> list[tuple[str, Tensor | None]]:
        return [
            ("inputs", self.inputs),
            ("targets", self.targets),
            ("object_masks", self.object_masks),
            ("spurious_masks", self.spurious_masks),
        ] + ([("labels", self.labels)] if self.labels is not None else [])

    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex) over every tensor's dtype, shape and bytes (on CPU, contiguous) and the group names.

        The same images, targets, groups and masks give the same fingerprint on any device; positions
        (:attr:`indices`) are not part of it. Cached until a tensor is replaced or modified in place.
        """
        key = tuple(
            (name, None) if t is None else (name, id(t), t.data_ptr(), t._version, tuple(t.shape))
            for name, t in self._tensors()
        ) + (tuple(self.groups) if self.groups is not None else None,)
        if key == self._fp_key:
            return self._fp
        h = hashlib.sha256()
        h.update(f"lightning-saliency/probe/v{_STATE_VERSION}".encode())
        for name, t in self._tensors():
            if t is None:
                h.update(f"|{name}:none".encode())
                continue
            h.update(f"|{name}:{str(t.dtype)}:{list(t.shape)}:".encode())
            flat = t.detach().cpu().contiguous().reshape(-1)
            if flat.numel():
                h.update(flat.view(torch.uint8).numpy())  # buffer protocol: no copy
        h.update(b"|groups:")
        h.update(json.dumps(self.groups).encode())
        self._fp_key, self._fp = key, h.hexdigest()
        return self._fp

    # ----------------------------------------------------------------------------------------- views

    def _new(
        self, idx: Tensor | None = None, device: Any = None, dtype: torch.dtype | None = None,
        rows: slice | None = None,
    ) -> ProbeSet:
        def take(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            if rows is not None:  # a contiguous range (a shard): a view, no copy of the probe
                t = t[rows]
            elif idx is not None:
                t = t[idx.to(t.device)]
            return t.to(device) if device is not None else t

        inputs = take(self.inputs)
        if dtype is not None:
            inputs = inputs.to(dtype)  # type: ignore[union-attr]
        sel = idx.tolist() if idx is not None else None
        groups = (
            None if self.groups is None else [self.groups[i] for i in sel] if sel is not None else self.groups
        )
        out = ProbeSet(
            inputs,  # type: ignore[arg-type]
            take(self.targets),  # type: ignore[arg-type]
            groups=groups,
            object_masks=take(self.object_masks),
            spurious_masks=take(self.spurious_masks),
            indices=self.indices[idx] if idx is not None else self.indices.clone(),
            labels=take(self.labels),
            _allow_empty=True,
        )
        out.denormalize, out.denormalize_source = self.denormalize, self.denormalize_source
        return out

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ProbeSet:
        """A copy on ``device`` (inputs optionally cast to ``dtype``); the fingerprint is unchanged by moves.

        Example:
            >>> import torch
            >>> p = ProbeSet(torch.rand(2, 1, 4, 4), [0, 1])
            >>> p.to("cpu").fingerprint == p.fingerprint
            True
        """
        return self._new(device=torch.device(device), dtype=dtype)

    def subset(self, indices: Tensor | Sequence[int] | Sequence[bool]) -> ProbeSet:
        """The items at ``indices`` (ints, or a bool mask of length N), keeping their global :attr:`indices`.

        Example:
            >>> import torch
            >>> ProbeSet(torch.rand(3, 1, 4, 4), [0, 1, 2]).subset([2, 0]).targets.tolist()
            [2, 0]
        """
        idx = torch.as_tensor(indices).detach().cpu()
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise ValueError(f"a bool subset mask must have shape [{len(self)}], got {_shape(idx)}")
            idx = idx.nonzero().reshape(-1)
        if idx.numel() == 0:
            idx = idx.reshape(0).long()
        if idx.is_floating_point() or idx.ndim != 1:
            raise ValueError(f"subset indices must be a 1-D sequence of ints, got {_shape(idx)} {idx.dtype}")
        idx = idx.long()
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise ValueError(f"subset indices must lie in [0, {len(self)}) for a probe of {len(self)} items")
        return self._new(idx=idx % max(len(self), 1))

    def shard(self, rank: int, world_size: int) -> ProbeSet:
        """Rank ``rank``'s contiguous slice out of ``world_size``: sizes differ by at most one (the first
        ``N % world_size`` ranks get one more), a shard is empty when ``world_size > N``. The slice's
        :attr:`indices` are its positions in this probe, for gathering results back in order. Its tensors are
        views of this probe's (no copy: an audit does not hold the probe twice).

        Example:
            >>> import torch
            >>> p = ProbeSet(torch.rand(5, 1, 4, 4), [0] * 5)
            >>> [p.shard(r, 2).indices.tolist() for r in range(2)]
            [[0, 1, 2], [3, 4]]
        """
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        n = len(self)
        base, extra = divmod(n, world_size)
        start = rank * base + min(rank, extra)
        stop = start + base + (1 if rank < extra else 0)
        return self._new(idx=torch.arange(start, stop, dtype=torch.long), rows=slice(start, stop))

    # ----------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, lists and strings (CPU; safe for ``torch.load(weights_only=True)``).

        Example:
            >>> import torch
            >>> p = ProbeSet(torch.rand(2, 1, 4, 4), [0, 1])
            >>> ProbeSet.from_state_dict(p.state_dict()).fingerprint == p.fingerprint
            True
        """

        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().cpu().clone()

        return {
            "version": _STATE_VERSION,
            "inputs": cpu(self.inputs),
            "targets": cpu(self.targets),
            "groups": list(self.groups) if self.groups is not None else None,
            "object_masks": cpu(self.object_masks),
            "spurious_masks": cpu(self.spurious_masks),
            "indices": cpu(self.indices),
            "labels": cpu(self.labels),
            "denormalize": None if self.denormalize is None else [list(v) for v in self.denormalize],
            "denormalize_source": self.denormalize_source,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this probe's content with ``state`` (from :meth:`state_dict`), kept on this probe's device.

        Raises ``ValueError`` for a missing key, an unknown version, or a fingerprint that does not match the
        stored tensors (a corrupted or hand-edited state).
        """
        other = ProbeSet.from_state_dict(state)
        if len(self):
            other = other.to(self.device)
        self.__dict__.update(other.__dict__)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> ProbeSet:
        """Build a probe from :meth:`state_dict`'s output (see :meth:`load_state_dict` for the checks)."""
        if not isinstance(state, Mapping):
            raise ValueError(
                f"a ProbeSet state must be a dict from ProbeSet.state_dict(), got {type(state).__name__}"
            )
        version = state.get("version")
        if version != _STATE_VERSION:
            raise ValueError(
                f"unknown ProbeSet state version {version!r} (this version reads {_STATE_VERSION}); rebuild the probe"
            )
        missing = [k for k in ("inputs", "targets") if k not in state]
        if missing:
            raise ValueError(
                f"ProbeSet state is missing {missing}; pass the dict returned by ProbeSet.state_dict()"
            )

        def copy(value: Any) -> Any:  # never share memory with the state dict
            return value.detach().clone() if isinstance(value, Tensor) else value

        probe = cls(
            copy(state["inputs"]),
            copy(state["targets"]),
            groups=state.get("groups"),
            object_masks=copy(state.get("object_masks")),
            spurious_masks=copy(state.get("spurious_masks")),
            indices=copy(state.get("indices")),
            labels=copy(state.get("labels")),
            _allow_empty=True,
        )
        if state.get("denormalize") is not None:
            probe.denormalize = check_denormalize(state["denormalize"], channels=int(probe.inputs.shape[1]))
            probe.denormalize_source = state.get("denormalize_source")
        stored = state.get("fingerprint")
        if stored is not None and stored != probe.fingerprint:
            raise ValueError(
                f"ProbeSet state fingerprint {str(stored)[:12]}... does not match its tensors "
                f"({probe.fingerprint[:12]}...): the state was modified or corrupted; rebuild the probe"
            )
        return probe

    # ----------------------------------------------------------------------------------------- builders

    @classmethod
    def from_dataset(
        cls,
        dataset: Any,
        size: int = 64,
        seed: int = 0,
        stratify: bool = False,
        group_fn: Callable[[Sample], Any] | None = None,
        object_mask_fn: Callable[[Sample], Any] | None = None,
        spurious_mask_fn: Callable[[Sample], Any] | None = None,
        input_key: str | int | None = None,
        target_key: str | int | None = None,
    ) -> ProbeSet:
        """Draw ``size`` items from a map-style dataset, deterministically from ``seed``.

        Items may be dicts (``input_key`` defaults to ``"image"``, ``target_key`` to ``"label"``; the usual
        alternatives such as ``"input"``/``"target"`` are found too) or tuples (defaults ``0`` and ``1``).
        ``group_fn``, ``object_mask_fn`` and ``spurious_mask_fn`` receive the whole item; masks may also come
        from the item's ``"object_mask"`` / ``"spurious_mask"`` keys. With ``stratify=True`` the targets of
        all items are read first (from ``dataset.targets`` / ``dataset.labels`` when present, else by loading
        every item), then each class gets an equal share. An ``IterableDataset`` is read as a stream (a pool
        of ``2 * size`` items), like :meth:`from_dataloader`. A torchvision ``Normalize`` in the dataset's
        transform (also in a ``Compose``) becomes the probe's :attr:`denormalize`, for true-colour pictures.

        Example:
            >>> import torch
            >>> data = [{"image": torch.rand(1, 4, 4), "label": i % 2} for i in range(10)]
            >>> p = ProbeSet.from_dataset(data, size=4, seed=0, stratify=True)
            >>> len(p), p.class_counts()
            (4, {0: 2, 1: 2})
        """
        _check_size(size)
        if isinstance(dataset, IterableDataset) or not (
            hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
        ):
            if isinstance(dataset, Iterable):
                samples = _take_stream(((s,) for s in dataset), 2 * size, batched=False)
                return with_normalize(dataset, _from_pool(cls, samples, size, seed, stratify, group_fn,
                                                          object_mask_fn, spurious_mask_fn, input_key, target_key))
            raise ValueError(
                f"dataset must be a map-style dataset (with __len__ and __getitem__) or an iterable, got "
                f"{type(dataset).__name__}"
            )
        total = len(dataset)
        if total == 0:
            raise ValueError("the dataset is empty: pass a non-empty dataset to build the probe")
        size = _clip_size(size, total, "the dataset")
        gen = torch.Generator().manual_seed(int(seed))
        if stratify:
            labels = _dataset_targets(dataset, target_key)
            chosen = _stratified(labels, size, gen)
        else:
            chosen = torch.randperm(total, generator=gen)[:size].sort().values.tolist()
        samples = [(i, dataset[i]) for i in chosen]
        return with_normalize(dataset, _build(cls, samples, group_fn, object_mask_fn, spurious_mask_fn, input_key,
                                              target_key))

    @classmethod
    def from_dataloader(
        cls,
        dataloader: Iterable[Any],
        size: int = 64,
        seed: int = 0,
        stratify: bool = False,
        group_fn: Callable[[Sample], Any] | None = None,
        object_mask_fn: Callable[[Sample], Any] | None = None,
        spurious_mask_fn: Callable[[Sample], Any] | None = None,
        input_key: str | int | None = None,
        target_key: str | int | None = None,
        pool_size: int | None = None,
    ) -> ProbeSet:
        """Read batches until ``pool_size`` samples (default ``2 * size``) are pooled or the loader ends,
        then draw ``size`` of them with ``seed`` (stratified when asked), in loader order.

        Batches may be dicts of batched values, tuples/lists ``(inputs, targets, ...)``; each is split into
        per-sample dicts/tuples before ``group_fn`` and the mask functions see it. A shuffling DataLoader
        without a seeded ``generator`` gives a different probe each run: a warning says so (use the
        validation loader, or :meth:`from_dataset`). A torchvision ``Normalize`` in the transform of the
        loader's dataset becomes the probe's :attr:`denormalize`, as in :meth:`from_dataset`.

        Example:
            >>> import torch
            >>> from torch.utils.data import DataLoader, TensorDataset
            >>> loader = DataLoader(TensorDataset(torch.rand(10, 1, 4, 4), torch.arange(10) % 2), batch_size=4)
            >>> len(ProbeSet.from_dataloader(loader, size=3))
            3
        """
        _check_size(size)
        if pool_size is None:
            pool_size = 2 * size
        if pool_size < size:
            raise ValueError(f"pool_size must be >= size ({size}), got {pool_size}")
        sampler = getattr(dataloader, "sampler", None)
        if isinstance(sampler, RandomSampler) and sampler.generator is None:
            warnings.warn(
                "ProbeSet.from_dataloader: this DataLoader shuffles without a seeded generator, so the probe "
                "will differ between runs; pass the validation loader (shuffle=False) or use "
                "ProbeSet.from_dataset",
                UserWarning,
                stacklevel=2,
            )
        samples = _take_stream(iter(dataloader), pool_size, batched=True)
        return with_normalize(dataloader, _from_pool(cls, samples, size, seed, stratify, group_fn, object_mask_fn,
                                                     spurious_mask_fn, input_key, target_key))
