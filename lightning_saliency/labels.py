"""Probe labels beyond one class per image: multi-hot labels and per-pixel label maps, expanded into probe rows,
and the probe accuracies they call for.

A saliency map explains one score, so a probe row explains one class. An image with several labels (multi-label)
or several classes on its pixels (segmentation) becomes several rows, one per positive label or class present
(:func:`label_rows`, used by :class:`~lightning_saliency.ProbeSet`); each row keeps its image's full labels
(``ProbeSet.labels``): the multi-hot vector ``[C]`` or the label map ``[H, W]``.

The accuracy of such a probe is not "the prediction equals the target":

- multi-label (:func:`multilabel_accuracy`): the share of right (image, label) decisions (``logit > 0``), per
  label and overall, and the micro F1;
- segmentation (:func:`iou_counts`, :func:`mean_iou`): the intersection over union of the predicted (argmax) and
  the labelled pixels of each class, summed over images, averaged over classes (mean IoU).

Every row of an image carries the same full labels, so each row weighs ``1 / (rows of its image)``: every image
counts once, also after a probe is sharded and merged back.

Example:
    >>> import torch
    >>> image, targets, labels = label_rows(torch.tensor([[1, 1, 0], [0, 1, 1]]), 2, (4, 4))
    >>> image.tolist(), targets.tolist(), tuple(labels.shape)
    ([0, 0, 1, 1], [0, 1, 1, 2], (4, 3))
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "iou_counts", "label_rows", "mean_iou", "multilabel_accuracy"]

#: label-map value of pixels that belong to no class (the VOC convention); negative values are ignored too
IGNORE_INDEX = 255


def label_rows(targets: Any, n: int, hw: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(image, targets, labels)`` of the probe rows when ``targets`` are multi-hot labels ``[N, C]`` (0 and 1,
    some image with several) or integer label maps ``[N, H, W]`` at the inputs' size; else ``None`` (one class
    index per image, or something :class:`~lightning_saliency.ProbeSet` refuses with its own message).

    ``image`` ``[R]``: the source image of each row; ``targets`` ``[R]``: the row's label or class; ``labels``:
    the image's multi-hot labels ``[R, C]`` (bool) or label map ``[R, H, W]`` (long). One-hot labels (exactly one
    per image) give ``None``: they are class indices in disguise.

    Example:
        >>> import torch
        >>> maps = torch.tensor([[[0, 0], [2, 255]]])
        >>> [t.tolist() for t in label_rows(maps, 1, (2, 2))[:2]]
        [[0, 0], [0, 2]]
    """
    t = targets if isinstance(targets, Tensor) else None
    if t is None or t.is_complex() or not t.shape or t.shape[0] != n:
        return None
    if t.ndim == 2 and t.shape[1] >= 2:
        if not bool(((t == 0) | (t == 1)).all()) or bool(((t != 0).sum(1) == 1).all()):
            return None
        sets = t.detach().bool()
        image, label = sets.nonzero(as_tuple=True)
        return image, label, sets[image]
    if t.ndim == 3 and tuple(t.shape[1:]) == tuple(hw) and not t.is_floating_point() and t.dtype != torch.bool:
        maps = t.detach().long()
        valid = (maps >= 0) & (maps != IGNORE_INDEX)
        classes = int(maps[valid].max()) + 1 if bool(valid.any()) else 0
        present = torch.zeros(n, max(classes, 1), dtype=torch.bool, device=maps.device)
        for c in range(classes):
            present[:, c] = ((maps == c) & valid).flatten(1).any(1)
        image, label = present.nonzero(as_tuple=True)
        return image, label, maps[image]
    return None


def _weights(rows_per_image: Tensor) -> Tensor:
    return 1.0 / rows_per_image.clamp(min=1).double()


def multilabel_accuracy(predicted: Tensor, label_sets: Tensor, groups: list[str] | None = None) -> dict[str, float]:
    """Per-label accuracy and micro F1 of a multi-label probe, whose rows are (image, positive label) pairs.

    ``predicted`` and ``label_sets`` are ``[rows, C]`` bool (the model's ``logit > 0`` and the image's labels,
    the same for every row of an image); each row weighs ``1 / (its image's positives)``, so every image counts
    once. Keys: ``probe/accuracy`` (the share of (image, label) decisions that are right), ``probe/f1``,
    ``probe/accuracy/class_<k>`` per label and ``probe/accuracy/<group>``.

    Example:
        >>> import torch
        >>> sets = torch.tensor([[True, True], [True, True]])  # one image with labels 0 and 1: two rows
        >>> pred = torch.tensor([[True, False], [True, False]])
        >>> multilabel_accuracy(pred, sets)
        {'probe/accuracy': 0.5, 'probe/f1': 0.6666666666666666, 'probe/accuracy/class_0': 1.0, 'probe/accuracy/class_1': 0.0}
    """
    predicted, sets = predicted.bool().cpu(), label_sets.bool().cpu()
    w = _weights(sets.sum(1))
    hit = (predicted == sets).double()

    def mean(values: Tensor, sel: Tensor | None = None) -> float:
        ww = w if sel is None else w[sel]
        return float((ww * (values if sel is None else values[sel])).sum() / ww.sum()) if len(ww) else math.nan

    tp, fp, fn = ((w[:, None] * (a & b)).sum() for a, b in ((predicted, sets), (predicted, ~sets), (~predicted, sets)))
    out = {"probe/accuracy": mean(hit.mean(1)),
           "probe/f1": float(2 * tp / (2 * tp + fp + fn)) if float(2 * tp + fp + fn) > 0 else math.nan}
    for k in range(sets.shape[1]):
        if bool(sets[:, k].any()):
            out[f"probe/accuracy/class_{k}"] = mean(hit[:, k])
    for g in sorted(set(groups or [])):
        out[f"probe/accuracy/{g}"] = mean(hit.mean(1), torch.tensor([x == g for x in groups]))
    return out


def iou_counts(predicted: Tensor, label_maps: Tensor, num_classes: int) -> Tensor:
    """``[rows, 3, C]`` float: per row and class, the pixels in the intersection and in the union of the predicted
    class map and the label map, and the labelled pixels (ignored pixels left out).

    Example:
        >>> import torch
        >>> iou_counts(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 0]]]), 2)[0].tolist()
        [[1.0, 0.0], [2.0, 1.0], [2.0, 0.0]]
    """
    valid = ((label_maps >= 0) & (label_maps != IGNORE_INDEX)).unsqueeze(1)
    classes = torch.arange(num_classes, device=predicted.device).view(1, -1, 1, 1)
    p, y = (predicted.unsqueeze(1) == classes) & valid, (label_maps.unsqueeze(1) == classes) & valid
    return torch.stack([(p & y).flatten(2).sum(2), (p | y).flatten(2).sum(2), y.flatten(2).sum(2)], 1).float()


def mean_iou(counts: Tensor, groups: list[str] | None = None) -> dict[str, float]:
    """Mean IoU of a segmentation probe from :func:`iou_counts` (every image once): ``probe/accuracy`` (the mean
    over classes of intersection / union summed over images; classes with an empty union left out),
    ``probe/accuracy/class_<k>`` (each class's IoU) and ``probe/accuracy/<group>``.

    Example:
        >>> import torch
        >>> counts = torch.tensor([[[1.0, 0.0], [2.0, 1.0], [2.0, 0.0]]])  # class 0: 1 of 2 pixels right
        >>> mean_iou(counts)
        {'probe/accuracy': 0.25, 'probe/accuracy/class_0': 0.5, 'probe/accuracy/class_1': 0.0}
    """
    counts = counts.double().cpu()
    w = _weights((counts[:, 2] > 0).sum(1))  # an image has one row per class it shows

    def miou(sel: Tensor | None = None) -> tuple[float, Tensor]:
        c = counts if sel is None else counts[sel]
        ww = w if sel is None else w[sel]
        inter, union = (ww[:, None] * c[:, 0]).sum(0), (ww[:, None] * c[:, 1]).sum(0)
        iou = torch.where(union > 0, inter / union.clamp(min=1e-12), torch.full_like(union, math.nan))
        kept = iou[torch.isfinite(iou)]
        return (float(kept.mean()) if len(kept) else math.nan), iou

    out: dict[str, float] = {}
    out["probe/accuracy"], iou = miou()
    for k in range(counts.shape[2]):
        if math.isfinite(float(iou[k])):
            out[f"probe/accuracy/class_{k}"] = float(iou[k])
    for g in sorted(set(groups or [])):
        out[f"probe/accuracy/{g}"] = miou(torch.tensor([x == g for x in groups]))[0]
    return out
