"""Class scores and their input gradients, computed in batches: the plumbing under the multi-pass methods.

SmoothGrad, Integrated Gradients, guided backprop and occlusion all evaluate the model on many rows derived
from each image (noisy copies, interpolation steps, occluded copies). :class:`Scorer` owns the model, the
classes being explained and the batch size; :meth:`Scorer.stream` walks every ``(image, row)`` pair in order,
builds the rows a batch at a time (never the whole expansion at once) and returns the scores, and the input
gradients when asked, for each batch.

The score of a row derived from image ``i`` is ``y^{t_i}`` (the pre-softmax logit of image ``i``'s target), or
``y^{t_i} - y^{q_i}`` with a contrast ``q``; for other outputs and tasks (a dict, a single binary logit,
segmentation) the scorer's :class:`~lightning_saliency.tasks.OutputAdapter` and
:class:`~lightning_saliency.tasks.Task` say what ``y^c`` is (:mod:`lightning_saliency.tasks`).

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    >>> scorer = Scorer(model, targets=torch.tensor([2]), batch_size=8)
    >>> x = torch.ones(1, 1, 2, 2)
    >>> grads, scores = scorer.input_grads(x, torch.tensor([0]))
    >>> grads.shape, scores.shape
    (torch.Size([1, 1, 2, 2]), torch.Size([1]))
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..tasks import Task, get_task, output_adapter, resolve

__all__ = ["Scorer", "Part", "check_logits", "class_scores"]


def check_logits(out: object) -> Tensor:
    """Return the model output if it is a ``[N, num_classes]`` tensor, else raise a ``ValueError`` saying how to
    adapt the model.

    Example:
        >>> import torch
        >>> check_logits(torch.zeros(2, 5)).shape
        torch.Size([2, 5])
    """
    if not isinstance(out, Tensor):
        raise ValueError(f"the model returned {type(out).__name__}, but attribution needs a logits tensor "
                         "[N, num_classes]: wrap the model so that forward() returns the logits")
    if out.ndim != 2:
        raise ValueError(f"the model returned shape {tuple(out.shape)}, but attribution needs logits "
                         "[N, num_classes]: wrap the model so that forward() returns one score vector per image")
    return out


def class_scores(logits: Tensor, targets: Tensor, contrast: Tensor | None = None) -> Tensor:
    """``y^t`` per row in float32, minus ``y^q`` when a contrast ``q`` is given.

    Example:
        >>> import torch
        >>> class_scores(torch.tensor([[1.0, 5.0]]), torch.tensor([1]), torch.tensor([0])).tolist()
        [4.0]
    """
    logits = logits.float()
    score = logits.gather(1, targets.view(-1, 1)).squeeze(1)
    if contrast is not None:
        score = score - logits.gather(1, contrast.view(-1, 1)).squeeze(1)
    return score


@dataclass(frozen=True)
class Part:
    """Rows ``start:stop`` of image ``image`` inside one batch, at batch offset ``offset``."""

    image: int
    start: int
    stop: int
    offset: int


class Scorer:
    """The model, the explained classes and the batch size, shared by every multi-pass method.

    Args:
        model: the classifier (already in eval mode: the engine runs inside a
            :class:`~lightning_saliency.guard.SideEffectGuard`).
        targets: ``[N]`` long, the class explained for each image.
        contrast: ``[N]`` long or ``None``; when given, the score is ``y^target - y^contrast``.
        batch_size: the most rows per forward pass.
        autocast_off: run the forwards with autocast disabled (float32).
        output: what :func:`~lightning_saliency.tasks.output_adapter` takes: which tensor of the model's
            output to explain (``None``: a tensor, a tuple's first element, a dict's ``"logits"`` or ``"out"``).
        task: a :data:`~lightning_saliency.tasks.TASKS` name or ``None``: inferred at the first forward (from
            the output's shape and ``task_targets``; ``task_inferred`` says so).
    """

    def __init__(self, model: nn.Module, targets: Tensor, contrast: Tensor | None = None,
                 batch_size: int = 64, autocast_off: bool = False, output: Any = None,
                 task: str | Task | None = None, task_targets: Tensor | None = None):
        self.model = model
        self.adapter = output_adapter(output)
        self.task: Task | None = None if task is None else get_task(task)
        self.task_inferred = False
        self.task_targets = task_targets
        self.last_output: Tensor | None = None  # the adapted output of the last forward (CAM finds its head)
        self.targets = targets
        self.contrast = contrast
        self.batch_size = int(batch_size)
        self.autocast_off = autocast_off
        self.forwards = 0
        self.backwards = 0

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.autocast_off:
            return contextlib.nullcontext()
        return _no_autocast()

    def forward(self, x: Tensor, images: Tensor | None = None) -> Tensor:
        """One forward pass, counted; returns the class-score matrix ``[n, K]`` of the task (the logits for a
        multiclass model), in the output's dtype. ``images``: the explained image of each row (for a task holding
        per-image data, e.g. segmentation masks)."""
        with self._autocast():
            raw = self.model(x)
        self.forwards += 1
        out = self.adapter(raw)
        if self.task is None:
            self.task, self.task_inferred = resolve(out, None, self.task_targets)
        else:
            self.task.check(out)
        self.last_output = out
        return self.task.class_scores(out, images)

    def _rows_scores(self, logits: Tensor, image_idx: Tensor) -> Tensor:
        t = self.targets[image_idx]
        c = None if self.contrast is None else self.contrast[image_idx]
        return class_scores(logits, t, c)

    def scores(self, rows: Tensor, image_idx: Tensor) -> Tensor:
        """Scores ``[n]`` (float32, no graph) of ``rows`` derived from images ``image_idx``."""
        with torch.no_grad():
            return self._rows_scores(self.forward(rows, image_idx), image_idx).detach()

    def input_grads(self, rows: Tensor, image_idx: Tensor) -> tuple[Tensor, Tensor]:
        """``(d score / d rows, scores)`` for ``rows`` derived from images ``image_idx``: one forward, one
        ``torch.autograd.grad`` to the rows only (parameters' ``.grad`` is never touched)."""
        x = rows.detach().clone().requires_grad_(True)
        score = self._rows_scores(self.forward(x, image_idx), image_idx)
        (grad,) = torch.autograd.grad(score.sum(), [x])
        self.backwards += 1
        return grad.float(), score.detach()

    def stream(self, n_images: int, rows_per_image: int, make_rows: Callable[[int, int, int], Tensor],
               grads: bool) -> Iterator[tuple[list[Part], Tensor | None, Tensor]]:
        """Walk rows ``0..rows_per_image`` of every image in batches of at most ``batch_size`` rows.

        ``make_rows(i, start, stop)`` builds rows ``start:stop`` of image ``i`` (``[stop-start, C, H, W]``).
        Yields ``(parts, grads_or_None, scores)`` per batch; ``parts`` say which rows of the batch belong to which
        image (see :class:`Part`).
        """
        parts: list[Part] = []
        blocks: list[Tensor] = []
        filled = 0

        def flush() -> tuple[list[Part], Tensor | None, Tensor]:
            rows = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
            idx = torch.cat([torch.full((p.stop - p.start,), p.image, dtype=torch.long) for p in parts])
            idx = idx.to(self.targets.device)
            if grads:
                g, s = self.input_grads(rows, idx)
                return list(parts), g, s
            return list(parts), None, self.scores(rows, idx)

        for i in range(n_images):
            start = 0
            while start < rows_per_image:
                stop = min(rows_per_image, start + self.batch_size - filled)
                blocks.append(make_rows(i, start, stop))
                parts.append(Part(i, start, stop, filled))
                filled += stop - start
                start = stop
                if filled == self.batch_size:
                    yield flush()
                    parts, blocks, filled = [], [], 0
        if filled:
            yield flush()


@contextlib.contextmanager
def _no_autocast() -> Iterator[None]:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with contextlib.ExitStack() as stack:
        for device in devices:
            stack.enter_context(torch.autocast(device_type=device, enabled=False))
        yield
