"""How a :class:`~lightning_saliency.probe.ProbeSet` is drawn from data: seeded selection (plain or stratified),
reading dict or tuple items and batches, and finding the input, target and mask of an item.

:meth:`ProbeSet.from_dataset <lightning_saliency.probe.ProbeSet.from_dataset>` and
:meth:`~lightning_saliency.probe.ProbeSet.from_dataloader` are the public entry points; this module holds the
item-level rules they share (which keys are looked for, how a batch is split into items, how masks are made
binary, which ``Normalize`` a dataset's transform applies: :func:`find_normalize`), so that the probe module keeps
the probe itself: its checks, fingerprint, sharding and state.

Example:
    >>> import torch
    >>> _stratified([0, 0, 1, 1, 1], 2, torch.Generator().manual_seed(0))
    [0, 2]
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from .probe import ProbeSet

_INPUT_KEYS = ("image", "input", "inputs", "img", "x", "pixel_values")
_TARGET_KEYS = ("label", "target", "targets", "labels", "y", "class")
_MASK_KEYS = {"object_masks": "object_mask", "spurious_masks": "spurious_mask"}

Sample = Any  # a dataset item: a dict, a tuple/list, as the dataset returns it


def _shape(t: Any) -> str:
    return str(list(t.shape)) if hasattr(t, "shape") else type(t).__name__


# --------------------------------------------------------------------------------------------- validation


def _to_name(value: Any) -> str:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    return str(value)


def _binary(mask: Tensor, what: str) -> Tensor:
    if mask.dtype == torch.bool:
        return mask.detach()
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        lo, hi = float(mask.min()), float(mask.max())
        raise ValueError(
            f"{what} must be binary (bool, or 0/1 values), got values in [{lo:g}, {hi:g}]: threshold them, "
            "e.g. mask > 0.5 (or mask > 127 for 0-255 images)"
        )
    return mask.detach() != 0


# --------------------------------------------------------------------------------------------- Normalize

_FOLLOW = ("transform", "transforms")  # a dataset's or a Compose's transforms (never target_transform)


def _normalizes(obj: Any, seen: set[int], depth: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """The ``(mean, std)`` of every torchvision ``Normalize`` reachable from ``obj``, in the order applied."""
    if obj is None or depth > 8 or id(obj) in seen:
        return []
    seen.add(id(obj))
    kind = type(obj)
    if kind.__name__ == "Normalize" and kind.__module__.startswith("torchvision.transforms"):
        mean, std = (np.asarray(v.tolist() if hasattr(v, "tolist") else v, dtype=np.float64).reshape(-1)
                     for v in (obj.mean, obj.std))
        return [(mean, std)]
    if isinstance(obj, (list, tuple)) or kind.__name__ == "Sequential":
        return [n for item in obj for n in _normalizes(item, seen, depth + 1)]
    found = []
    inner = getattr(obj, "dataset", None)  # a DataLoader's, a Subset's or a wrapper's dataset: applied first
    if inner is None and isinstance(getattr(obj, "datasets", None), (list, tuple)) and obj.datasets:
        inner = obj.datasets[0]  # a ConcatDataset: its first dataset's
    if inner is not None and not isinstance(inner, (str, bytes)) and not inspect.ismethod(inner):
        found += _normalizes(inner, seen, depth + 1)
    for name in _FOLLOW:  # torchvision datasets hold both: transform, and transforms wrapping it (one is enough)
        own = getattr(obj, name, None)
        if own is not None and not isinstance(own, (str, bytes)) and not inspect.ismethod(own):  # v2: a method
            return found + _normalizes(own, seen, depth + 1)
    return found


def find_normalize(data: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The ``(mean, std)`` that a dataset's (or a DataLoader's dataset's) transform normalises its images with:
    a torchvision ``transforms.Normalize`` (or ``transforms.v2.Normalize``), also inside a ``Compose``, a
    ``Subset`` or a ``ConcatDataset`` (its first dataset); several in a row are composed into one. ``None``
    when there is none.

    Example:
        >>> from torchvision import transforms
        >>> class Data:
        ...     transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5, 0.4, 0.3], [0.2] * 3)])
        >>> find_normalize(Data())
        ((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    """
    found = _normalizes(data, set())
    if not found:
        return None
    mean, std = found[0]
    for m, s in found[1:]:  # ((x - mean) / std - m) / s = (x - (mean + m * std)) / (std * s)
        mean, std = mean + m * std, std * s
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def with_normalize(data: Any, probe: ProbeSet) -> ProbeSet:
    """``probe`` with the ``(mean, std)`` of the ``Normalize`` in ``data``'s transform (:func:`find_normalize`)
    as its ``denormalize`` (``denormalize_source``: ``"dataset transform"``), when one fits its channels."""
    found = find_normalize(data)
    if found is not None and all(len(v) in (1, probe.inputs.shape[1]) for v in found) and min(found[1]) > 0:
        probe.denormalize, probe.denormalize_source = found, "dataset transform"
    return probe


# --------------------------------------------------------------------------------------------- helpers


def _check_size(size: Any) -> None:
    if isinstance(size, bool) or not isinstance(size, int):
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    if size < 1:
        raise ValueError(f"size must be >= 1 (got {size}): the probe needs at least one image")


def _clip_size(size: int, available: int, what: str) -> int:
    if size > available:
        warnings.warn(
            f"ProbeSet: size={size} but {what} has only {available} items; using all {available}",
            UserWarning,
            stacklevel=3,
        )
        return available
    return size


def _stratified(labels: list[int], size: int, gen: torch.Generator) -> list[int]:
    """Equal shares per class (remainder to classes in a seed-drawn order), each class's items seed-shuffled."""
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        by_class.setdefault(int(c), []).append(i)
    classes = sorted(by_class)
    pools = {}
    for c in classes:  # one permutation per class, in class order: reproducible from the seed
        members = by_class[c]
        pools[c] = [members[j] for j in torch.randperm(len(members), generator=gen).tolist()]
    order = [classes[j] for j in torch.randperm(len(classes), generator=gen).tolist()]
    chosen: list[int] = []
    taken = dict.fromkeys(classes, 0)
    while len(chosen) < size:
        progressed = False
        for c in order:
            if len(chosen) == size:
                break
            if taken[c] < len(pools[c]):
                chosen.append(pools[c][taken[c]])
                taken[c] += 1
                progressed = True
        if not progressed:
            break
    return sorted(chosen)


def _dataset_targets(dataset: Any, target_key: str | int | None) -> list[int]:
    """All targets of a map-style dataset, without loading images where the dataset lists them."""
    try:
        own = _dataset_targets_attr(dataset)
    except (TypeError, ValueError):
        own = None
    if own is not None:
        return own
    indices = getattr(dataset, "indices", None)
    base = getattr(dataset, "dataset", None)
    if indices is not None and base is not None:  # torch.utils.data.Subset
        try:
            base_targets = _dataset_targets_attr(base)
        except (TypeError, ValueError):
            base_targets = None
        if base_targets is not None:
            return [base_targets[int(i)] for i in indices]
    return [_target_of(dataset[i], i, target_key) for i in range(len(dataset))]


def _dataset_targets_attr(dataset: Any) -> list[int] | None:
    for attr in ("targets", "labels"):
        values = getattr(dataset, attr, None)
        if values is not None and not callable(values):
            values = [int(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]
            if len(values) == len(dataset):
                return values
    return None


def _resolve_key(
    sample: Sample, key: str | int | None, defaults: tuple[str, ...], position: int, what: str, index: int
) -> Any:
    if isinstance(sample, Mapping):
        if key is None:
            for k in defaults:
                if k in sample:
                    return sample[k]
            raise ValueError(
                f"item {index} is a dict with keys {sorted(map(str, sample))} and none of the usual {what} keys "
                f"{list(defaults)}: pass {what}_key=<the key>"
            )
        if key not in sample:
            raise ValueError(f"{what}_key={key!r} is not in item {index}'s keys {sorted(map(str, sample))}")
        return sample[key]
    if isinstance(sample, (tuple, list)):
        k = position if key is None else key
        if not isinstance(k, int):
            raise ValueError(
                f"item {index} is a {type(sample).__name__}, so {what}_key must be a position (int), got {k!r}"
            )
        if not -len(sample) <= k < len(sample):
            raise ValueError(
                f"item {index} has {len(sample)} elements, so {what}_key={k} is out of range; dataset items "
                "must be (input, target, ...) tuples or dicts"
            )
        return sample[k]
    raise ValueError(
        f"item {index} is a {type(sample).__name__}; dataset items must be dicts (e.g. {{'image': x, 'label': y}}) "
        "or tuples (x, y): wrap the dataset so it returns one of these"
    )


def _target_of(sample: Sample, index: int, target_key: str | int | None) -> int:
    value = _resolve_key(sample, target_key, _TARGET_KEYS, 1, "target", index)
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"item {index}'s target has shape {_shape(value)}; targets must be one class index per item "
                "(for one-hot labels, wrap the dataset to return label.argmax())"
            )
        value = value.item()
    elif isinstance(value, np.ndarray | np.generic):
        if np.size(value) != 1:
            raise ValueError(
                f"item {index}'s target has shape {_shape(value)}; targets must be one class index"
            )
        value = np.asarray(value).item()
    if isinstance(value, bool) or not (
        isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    ):
        raise ValueError(f"item {index}'s target {value!r} is not an integer class index")
    return int(value)


def _label_of(sample: Sample, index: int, target_key: str | int | None, hw: tuple[int, int]) -> int | Tensor:
    """The item's target: a class index, or a tensor when it holds multi-hot labels ``[C]`` (0 and 1) or an
    integer label map ``[H, W]`` at the input's size (:mod:`lightning_saliency.labels` expands them into rows)."""
    value = _resolve_key(sample, target_key, _TARGET_KEYS, 1, "target", index)
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if isinstance(value, Tensor) and value.numel() > 1:
        if value.ndim == 1 and bool(((value == 0) | (value == 1)).all()):
            return value.detach().cpu()
        label_map = value.squeeze(0) if value.ndim == 3 else value
        if label_map.ndim == 2 and tuple(label_map.shape) == hw and not label_map.is_floating_point():
            return label_map.detach().cpu().long()
    return _target_of(sample, index, target_key)


def _input_of(sample: Sample, index: int, input_key: str | int | None) -> Tensor:
    value = _resolve_key(sample, input_key, _INPUT_KEYS, 0, "input", index)
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, Tensor):
        raise ValueError(
            f"item {index}'s input is a {type(value).__name__}, not a tensor: add a transform that returns "
            "tensors, e.g. torchvision.transforms.ToTensor()"
        )
    if value.ndim != 3:
        raise ValueError(
            f"item {index}'s input has shape {_shape(value)}; each input must be [C, H, W] "
            + ("(add the channel dimension with x.unsqueeze(0))" if value.ndim == 2 else "")
        )
    if not value.is_floating_point():
        raise ValueError(
            f"item {index}'s input is {value.dtype}, not floating point: convert images as the model sees them, "
            "e.g. with transforms.ToTensor() or transforms.ConvertImageDtype(torch.float32)"
        )
    return value


def _mask_of(
    sample: Sample, fn: Callable[[Sample], Any] | None, key: str, index: int, hw: tuple[int, int]
) -> Tensor | None:
    if fn is not None:
        value = fn(sample)
        origin = f"{key}_fn"
    elif isinstance(sample, Mapping) and key in sample:
        value = sample[key]
        origin = f"item key {key!r}"
    else:
        return None
    if value is None:
        return None
    mask = value if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value))
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if tuple(mask.shape) != hw:
        raise ValueError(
            f"item {index}: the mask from {origin} has shape {_shape(mask)} but the input is {hw[0]}x{hw[1]}; "
            "masks must be [H, W] matching the input (resize them with the image transform, nearest "
            "interpolation)"
        )
    return _binary(mask, f"item {index}'s mask from {origin}")


def _build(
    cls: type[ProbeSet],
    samples: list[tuple[int, Sample]],
    group_fn: Callable | None,
    object_mask_fn: Callable | None,
    spurious_mask_fn: Callable | None,
    input_key: str | int | None,
    target_key: str | int | None,
) -> ProbeSet:
    inputs, targets, groups = [], [], []
    masks: dict[str, list[Tensor | None]] = {"object_mask": [], "spurious_mask": []}
    fns = {"object_mask": object_mask_fn, "spurious_mask": spurious_mask_fn}
    for index, sample in samples:
        x = _input_of(sample, index, input_key)
        if inputs and x.shape != inputs[0].shape:
            raise ValueError(
                f"item {index}'s input has shape {_shape(x)} but item {samples[0][0]}'s is {_shape(inputs[0])}: "
                "the probe images must share one size; add a Resize/CenterCrop transform"
            )
        inputs.append(x)
        hw = (int(x.shape[1]), int(x.shape[2]))
        targets.append(_label_of(sample, index, target_key, hw))
        if isinstance(targets[-1], Tensor) != isinstance(targets[0], Tensor) or (
                isinstance(targets[0], Tensor) and targets[-1].shape != targets[0].shape):
            raise ValueError(f"item {index}'s target does not match item {samples[0][0]}'s: the probe's targets are "
                             "all class indices, all multi-hot labels [C] or all label maps [H, W]")
        if group_fn is not None:
            groups.append(_to_name(group_fn(sample)))
        for key in masks:
            masks[key].append(_mask_of(sample, fns[key], key, index, hw))
    stacked: dict[str, Tensor | None] = {}
    for key, values in masks.items():
        present = [v is not None for v in values]
        if all(present):
            stacked[key] = torch.stack(values)  # type: ignore[arg-type]
        elif any(present):
            missing = [samples[i][0] for i, p in enumerate(present) if not p][:5]
            raise ValueError(
                f"{key} is given for some items but not for items {missing}: give a mask for every item "
                f"(an all-False mask where there is none) or for none"
            )
        else:
            stacked[key] = None
    return cls(
        torch.stack(inputs),
        torch.stack(targets) if targets and isinstance(targets[0], Tensor) else torch.tensor(targets, dtype=torch.long),
        groups=groups if group_fn is not None else None,
        object_masks=stacked["object_mask"],
        spurious_masks=stacked["spurious_mask"],
    )


def _unbatch(batch: Any) -> list[Sample]:
    """Split one collated batch into per-sample dicts / tuples."""
    if isinstance(batch, Tensor):
        raise ValueError(
            "the DataLoader yields bare tensors; the probe needs targets too: yield (inputs, targets) or "
            "{'image': ..., 'label': ...}"
        )
    if isinstance(batch, Mapping):
        sizes = {len(v) for v in batch.values() if isinstance(v, (Tensor, list, tuple, np.ndarray))}
        if len(sizes) != 1:
            raise ValueError(f"cannot split a batch dict whose values have batch sizes {sorted(sizes)}")
        n = sizes.pop()
        return [
            {k: (v[i] if isinstance(v, (Tensor, list, tuple, np.ndarray)) else v) for k, v in batch.items()}
            for i in range(n)
        ]
    if isinstance(batch, (tuple, list)):
        parts = [v for v in batch if isinstance(v, (Tensor, list, tuple, np.ndarray))]
        if not parts:
            raise ValueError("cannot split a batch without tensors")
        n = len(parts[0])
        return [
            tuple(v[i] if isinstance(v, (Tensor, list, tuple, np.ndarray)) else v for v in batch)
            for i in range(n)
        ]
    raise ValueError(
        f"the DataLoader yields {type(batch).__name__}; batches must be (inputs, targets, ...) or dicts"
    )


def _take_stream(stream: Iterable[Any], limit: int, batched: bool) -> list[tuple[int, Sample]]:
    out: list[tuple[int, Sample]] = []
    for item in stream:
        samples = _unbatch(item) if batched else [item[0]]
        for s in samples:
            out.append((len(out), s))
            if len(out) >= limit:
                return out
    return out


def _from_pool(
    cls: type[ProbeSet],
    pool: list[tuple[int, Sample]],
    size: int,
    seed: int,
    stratify: bool,
    group_fn: Callable | None,
    object_mask_fn: Callable | None,
    spurious_mask_fn: Callable | None,
    input_key: str | int | None,
    target_key: str | int | None,
) -> ProbeSet:
    if not pool:
        raise ValueError("the data yielded no samples: pass a non-empty dataset / DataLoader")
    size = _clip_size(size, len(pool), "the data read")
    gen = torch.Generator().manual_seed(int(seed))
    if stratify:
        chosen = _stratified([_target_of(s, i, target_key) for i, s in pool], size, gen)
    else:
        chosen = torch.randperm(len(pool), generator=gen)[:size].sort().values.tolist()
    return _build(
        cls, [pool[i] for i in chosen], group_fn, object_mask_fn, spurious_mask_fn, input_key, target_key
    )


def _check_masks(masks: Any, n: int, hw: tuple[int, int], what: str, device: torch.device) -> Tensor | None:
    if masks is None:
        return None
    if not isinstance(masks, Tensor):
        masks = torch.as_tensor(np.asarray(masks))
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3 or masks.shape[0] != n or tuple(masks.shape[1:]) != hw:
        raise ValueError(
            f"{what} must be [N, H, W] = [{n}, {hw[0]}, {hw[1]}] to match the inputs, got {_shape(masks)}; "
            "resize the masks with the same transform as the images (nearest interpolation) and give one per input"
        )
    return _binary(masks, what).to(device)


def _row_masks(masks: Any, image: Tensor, label: Tensor, n: int, hw: tuple[int, int], what: str,
               device: torch.device) -> Tensor | None:
    """The masks of the rows (image, label) that multi-hot targets or label maps expand to: one mask per image
    ``[N, H, W]`` repeated on its rows, or one per label ``[N, C, H, W]`` (each row gets its own label's)."""
    if masks is None:
        return None
    m = masks if isinstance(masks, Tensor) else torch.as_tensor(np.asarray(masks))
    if m.ndim == 4 and m.shape[1] > 1:
        if m.shape[0] != n or tuple(m.shape[2:]) != hw or (label.numel() and int(label.max()) >= m.shape[1]):
            raise ValueError(f"{what} per label must be [N, C, H, W] = [{n}, C, {hw[0]}, {hw[1]}] with a mask for "
                             f"every label of the targets, got {_shape(m)}; or give one mask per image [N, H, W]")
        return _binary(m[image.to(m.device), label.to(m.device)], what).to(device)
    return _check_masks(m, n, hw, what, device)[image.to(device)]
