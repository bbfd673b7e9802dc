"""What to explain: the model's output adapted to one tensor, and the task turning it into class scores.

Two questions stand between a model's ``forward()`` and a saliency map:

1. **Which tensor?** :func:`output_adapter` (the ``output=`` argument of :func:`~lightning_saliency.attribute`
   and :class:`~lightning_saliency.SaliencyMonitor`):

   - ``None`` (default): a tensor as is; a tuple or list: its first element; a dict (or a Hugging Face
     ``ModelOutput``): key ``"logits"``, else ``"out"`` (torchvision segmentation models), else an error
     listing the keys found; any other object with a ``.logits`` tensor;
   - a string: that dict key or attribute;
   - a callable: ``output(raw_output) -> Tensor``.

2. **Which score?** A :class:`Task` (``task=``) turns that tensor into a *class-score matrix* ``[N, K]``, whose
   column ``c`` is the differentiable score ``y^c`` explained for class ``c``; a target is a column index:

   ============== ======================== ===========================================================
   task           output                   score of class ``c``
   ============== ======================== ===========================================================
   multiclass     logits ``[N, C]``        the logit of ``c``
   binary         one logit ``[N]``/``[N,  target 1: the logit ``z``; target 0: ``-z`` (columns
                  1]``                     ``[-z, z]``), so the prediction is ``z > 0``
   multilabel     logits ``[N, C]``        the logit of label ``c`` (before the sigmoid)
   segmentation   logits ``[N, C, H, W]``  the sum of class ``c``'s logits over the pixels predicted
                                           as ``c`` (the argmax over classes)
   ============== ======================== ===========================================================

   ``task=None`` infers it (:func:`infer_task`) from the output's shape and the targets; an ambiguous case is a
   ``ValueError`` saying which ``task=`` to pass.

:class:`TaskModel` wraps a model so that its forward returns the class-score matrix: the metrics that run the
model again (faithfulness, fragility, ...) then work for every task unchanged, and
:func:`~lightning_saliency.attribute` sees through the wrapper.

Example:
    >>> import torch
    >>> adapter = output_adapter(None)
    >>> adapter({"logits": torch.zeros(2, 3), "aux": 1}).shape
    torch.Size([2, 3])
    >>> task = get_task("binary")
    >>> task.class_scores(torch.tensor([[2.0], [-1.0]])).tolist()
    [[-2.0, 2.0], [1.0, -1.0]]
    >>> infer_task(torch.zeros(4, 1), torch.tensor([0, 1, 1, 0])).name
    'binary'
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "TASKS",
    "OutputAdapter",
    "Segmentation",
    "Task",
    "TaskModel",
    "check_probe_fit",
    "check_task",
    "get_task",
    "infer_task",
    "output_adapter",
    "probe_task",
    "unwrap",
]

#: the default dict keys, in the order they are tried
_KEYS = ("logits", "out")


class OutputAdapter:
    """``adapter(raw_output) -> Tensor``: the tensor to explain, picked as ``output=`` says (see the module
    docstring). ``picked`` describes what the last call took, e.g. ``"dict key 'logits'"`` (for the report).

    Example:
        >>> import torch
        >>> a = OutputAdapter("out")
        >>> a({"out": torch.ones(1, 2)}).tolist(), a.picked
        ([[1.0, 1.0]], "key 'out'")
    """

    def __init__(self, output: None | str | Callable[[Any], Tensor] = None):
        if output is not None and not isinstance(output, str) and not callable(output):
            raise ValueError(f"output= must be None, a dict key or attribute name (str), or a callable mapping "
                             f"the model's output to the tensor to explain, got {type(output).__name__}")
        self.output = output
        self.picked = "tensor"

    def __repr__(self) -> str:
        return f"OutputAdapter({self.output!r})"

    def __call__(self, raw: Any) -> Tensor:
        if callable(self.output):
            out, self.picked = self.output(raw), "output=callable"
            if not isinstance(out, Tensor):
                raise ValueError(f"output= (a callable) returned {type(out).__name__}, not a tensor: make it "
                                 "return the tensor to explain, e.g. output=lambda out: out['logits']")
            return out
        if isinstance(self.output, str):
            return self._named(raw, self.output)
        return self._default(raw)

    def _named(self, raw: Any, name: str) -> Tensor:
        if isinstance(raw, Mapping):
            if name not in raw:
                raise ValueError(f"output={name!r}: the model's output has no key {name!r}; its keys are "
                                 f"{_keys(raw)}: pass output= one of them (or a callable)")
            out, self.picked = raw[name], f"key {name!r}"
        elif hasattr(raw, name):
            out, self.picked = getattr(raw, name), f"attribute {name!r}"
        else:
            raise ValueError(f"output={name!r}: the model returned {type(raw).__name__}, which has no key or "
                             f"attribute {name!r}: pass output= a callable that picks the tensor to explain")
        if not isinstance(out, Tensor):
            raise ValueError(f"output={name!r} picks a {type(out).__name__}, not a tensor: pass output= a "
                             "callable that returns the tensor to explain")
        return out

    def _default(self, raw: Any) -> Tensor:
        if isinstance(raw, Tensor):
            self.picked = "tensor"
            return raw
        if isinstance(raw, (tuple, list)) and raw and isinstance(raw[0], Tensor):
            self.picked = "first element"
            return raw[0]
        if isinstance(raw, Mapping):
            for key in _KEYS:
                if key in raw and isinstance(raw[key], Tensor):
                    self.picked = f"key {key!r}"
                    return raw[key]
            raise ValueError(f"the model returned a {type(raw).__name__} with keys {_keys(raw)} and none of "
                             f"{list(_KEYS)}: pass output='<key>' (the one holding the scores to explain) or a "
                             "callable, e.g. output=lambda out: out['scores']")
        if isinstance(getattr(raw, "logits", None), Tensor):
            self.picked = "attribute 'logits'"
            return raw.logits
        raise ValueError(f"the model returned {type(raw).__name__}, not a tensor, a tuple, a dict with 'logits' "
                         "or 'out', or an object with .logits: pass output= a key, an attribute name or a "
                         "callable that returns the tensor to explain")


def _keys(raw: Mapping) -> list[str]:
    return [str(k) for k in raw.keys()]


def output_adapter(output: None | str | Callable[[Any], Tensor] | OutputAdapter = None) -> OutputAdapter:
    """The adapter for ``output=`` (an :class:`OutputAdapter` is returned as is).

    Example:
        >>> import torch
        >>> output_adapter(lambda out: out[1])((torch.zeros(1), torch.ones(2))).tolist()
        [1.0, 1.0]
    """
    return output if isinstance(output, OutputAdapter) else OutputAdapter(output)


# ------------------------------------------------------------------------------------------------ tasks


class Task:
    """How one kind of output becomes class scores. Subclasses set ``name`` and ``shape`` (for messages) and
    implement :meth:`check` and :meth:`class_scores`; the rest derive from them.

    ``class_scores(out)`` is the ``[N, K]`` class-score matrix (differentiable, in the output's dtype): a target
    is a column, the explained score of row ``i`` is ``class_scores(out)[i, target_i]``. ``images`` (``[N]``, the
    explained image each row derives from) lets a task hold per-image data, as :class:`Segmentation`'s masks.
    """

    name = "task"
    shape = ""

    def check(self, out: Tensor) -> None:
        """A ``ValueError`` naming ``task=`` and ``output=`` when ``out`` is not this task's shape."""
        raise NotImplementedError

    def _shape_error(self, out: Tensor, extra: str = "") -> ValueError:
        return ValueError(f"task={self.name!r} needs model outputs {self.shape}, but the tensor to explain has "
                          f"shape {tuple(out.shape)}{extra}: pass the task that fits (task='multiclass', "
                          "'binary', 'multilabel' or 'segmentation'), or output= to pick another tensor")

    def class_scores(self, out: Tensor, images: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def num_classes(self, out: Tensor) -> int:
        """``K``: the columns of the class-score matrix (the valid targets are ``0..K-1``)."""
        return int(out.shape[1]) if self.name != "binary" else 2

    def score(self, out: Tensor, targets: Tensor, contrast: Tensor | None = None) -> Tensor:
        """``[N]`` float32: the score of each row's target, minus its contrast's when given."""
        scores = self.class_scores(out).float()
        s = scores.gather(1, targets.view(-1, 1)).squeeze(1)
        if contrast is not None:
            s = s - scores.gather(1, contrast.view(-1, 1)).squeeze(1)
        return s

    def predict(self, out: Tensor) -> Tensor:
        """``[N]`` long: the class explained when no target is given (the argmax of the class scores)."""
        return self.class_scores(out.detach()).argmax(dim=1)

    def probabilities(self, out: Tensor) -> Tensor:
        """``[N, K]``: the model's confidence in each class (softmax for multiclass)."""
        return self.class_scores(out).float().softmax(dim=1)

    def head_weight(self, weight: Tensor) -> Tensor:
        """The CAM weights ``[K, D]`` of each class from the final linear layer's ``weight`` ``[O, D]``."""
        return weight

    def check_targets(self, t: Tensor | None, out: Tensor, name: str = "targets") -> None:
        """A ``ValueError`` when a target is not a column of the class-score matrix."""
        if t is None:
            return
        k = self.num_classes(out)
        bad = ((t < 0) | (t >= k)).nonzero()
        if len(bad):
            i = int(bad[0, 0])
            what = "0 (explain -logit) or 1 (+logit)" if self.name == "binary" else f"class indices in [0, {k})"
            raise ValueError(f"{name}[{i}] = {int(t[i])} is out of range [0, {k}) for task={self.name!r} on model "
                             f"outputs {tuple(out.shape[1:])} ({k} classes): pass {what}, or the task= that fits")

    def __repr__(self) -> str:
        return f"Task({self.name!r})"


class Multiclass(Task):
    """Softmax classifiers: logits ``[N, C]``, a target is a class."""

    name, shape = "multiclass", "[N, num_classes]"

    def check(self, out: Tensor) -> None:
        if out.ndim != 2:
            hint = " (a segmentation model? task='segmentation')" if out.ndim == 4 else ""
            raise self._shape_error(out, hint)

    def class_scores(self, out: Tensor, images: Tensor | None = None) -> Tensor:
        return out


class Binary(Task):
    """One logit per image, ``[N]`` or ``[N, 1]``: target 1 explains the logit ``z``, target 0 explains ``-z``."""

    name, shape = "binary", "[N] or [N, 1] (one logit)"

    def check(self, out: Tensor) -> None:
        if not (out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1)):
            hint = " (two logits with a softmax: task='multiclass')" if out.ndim == 2 else ""
            raise self._shape_error(out, hint)

    def class_scores(self, out: Tensor, images: Tensor | None = None) -> Tensor:
        z = out.reshape(-1)
        return torch.stack([-z, z], dim=1)

    def probabilities(self, out: Tensor) -> Tensor:
        p = torch.sigmoid(out.reshape(-1).float())
        return torch.stack([1 - p, p], dim=1)

    def head_weight(self, weight: Tensor) -> Tensor:
        return torch.cat([-weight[:1], weight[:1]])


class Multilabel(Multiclass):
    """Independent sigmoid labels: logits ``[N, C]``, a target is one label (its logit, before the sigmoid)."""

    name, shape = "multilabel", "[N, num_labels]"

    def probabilities(self, out: Tensor) -> Tensor:
        return torch.sigmoid(out.float())


class Segmentation(Task):
    """Per-pixel logits ``[N, C, H, W]``: the score of class ``c`` is the sum of its logits over the pixels
    predicted as ``c`` (zero when no pixel is), or over a given target mask: ``Segmentation(masks)`` with one mask
    ``[H, W]`` per explained image (``[N, H, W]`` bool, at the output's resolution), e.g. the labelled pixels of
    the target class. Its confidence is the mean softmax probability of ``c``; with no target, the class predicted
    on the most pixels is explained.

    Example:
        >>> import torch
        >>> out = torch.tensor([[[[1.0, 3.0]], [[2.0, 0.0]]]])  # [1, 2 classes, 1, 2]: pixel 0 is class 1
        >>> Segmentation().class_scores(out).tolist(), Segmentation(torch.tensor([[[True, True]]])).class_scores(
        ...     out, torch.tensor([0])).tolist()
        ([[3.0, 2.0]], [[4.0, 2.0]])
    """

    name, shape = "segmentation", "[N, num_classes, H, W]"

    def __init__(self, masks: Tensor | None = None):
        self.masks = None if masks is None else torch.as_tensor(masks).bool()

    def __repr__(self) -> str:
        return "Task('segmentation')" if self.masks is None else f"Segmentation(masks {tuple(self.masks.shape)})"

    def check(self, out: Tensor) -> None:
        if out.ndim != 4:
            raise self._shape_error(out)
        if self.masks is not None and (self.masks.ndim != 3 or tuple(self.masks.shape[1:]) != tuple(out.shape[2:])):
            raise ValueError(f"task=Segmentation(masks): the masks are {tuple(self.masks.shape)}, but they must be "
                             f"[N, H, W] = [N, {out.shape[2]}, {out.shape[3]}], one per image at the output's size")

    @staticmethod
    def _predicted(out: Tensor) -> Tensor:
        return nn.functional.one_hot(out.detach().argmax(dim=1), out.shape[1]).permute(0, 3, 1, 2)

    def class_scores(self, out: Tensor, images: Tensor | None = None) -> Tensor:
        if self.masks is not None and images is not None:
            region = self.masks.to(out.device)[images.to(out.device)].unsqueeze(1)  # [n, 1, H, W], every class
            return (out * region.to(out.dtype)).sum(dim=(2, 3))
        return (out * self._predicted(out).to(out.dtype)).sum(dim=(2, 3))

    def predict(self, out: Tensor) -> Tensor:
        return self._predicted(out).sum(dim=(2, 3)).argmax(dim=1)

    def probabilities(self, out: Tensor) -> Tensor:
        return out.float().softmax(dim=1).mean(dim=(2, 3))

    def head_weight(self, weight: Tensor) -> Tensor:
        raise ValueError("CAM needs a global-average-pool + linear head, which a segmentation model has not: use "
                         "method 'gradcam' instead")


_TASKS: dict[str, Task] = {t.name: t for t in (Multiclass(), Binary(), Multilabel(), Segmentation())}
#: the task names ``task=`` accepts
TASKS = tuple(_TASKS)


def check_task(task: Any) -> str | None:
    """``task`` if it is ``None`` or a known name, else a ``ValueError`` listing them (the closest first).

    Example:
        >>> check_task("binary")
        'binary'
    """
    if task is None or isinstance(task, Task):
        return task
    if task not in _TASKS:
        import difflib

        close = difflib.get_close_matches(str(task), TASKS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown task={task!r}.{hint} Known tasks: {', '.join(TASKS)} (or None to infer it)")
    return task


def get_task(task: str | Task) -> Task:
    """The :class:`Task` named ``task`` (a ``ValueError`` listing the names when unknown).

    Example:
        >>> get_task("segmentation").name
        'segmentation'
    """
    return task if isinstance(task, Task) else _TASKS[check_task(task)]


def infer_task(out: Tensor, targets: Tensor | None = None) -> Task:
    """The task that fits an output tensor (and the targets, when given); a ``ValueError`` naming ``task=`` when
    the shapes do not decide it or fit none.

    - ``[N, C, H, W]``: segmentation; ``[N]`` or ``[N, 1]``: binary (targets must be 0 or 1);
    - ``[N, C]`` with targets ``[N, C]`` holding several positives in some row: multilabel; with one class index
      per row, or no targets: multiclass. One-hot targets ``[N, C]`` are ambiguous (one positive per row could be
      either).

    Example:
        >>> import torch
        >>> infer_task(torch.zeros(2, 3), torch.tensor([[1, 1, 0], [0, 1, 0]])).name
        'multilabel'
    """
    shape = tuple(out.shape)
    if out.ndim == 4:
        return _TASKS["segmentation"]
    if out.ndim == 1 or (out.ndim == 2 and shape[1] == 1):
        if targets is not None and targets.numel() and bool(((targets != 0) & (targets != 1)).any()):
            raise ValueError(f"the model gives one score per image {shape}, which is task='binary', but the "
                             f"targets hold values other than 0 and 1 (e.g. {int(targets.max())}): pass binary "
                             "targets, or output= to pick the tensor of class scores, or task= explicitly")
        return _TASKS["binary"]
    if out.ndim == 2:
        if targets is None or targets.ndim == 1:
            return _TASKS["multiclass"]
        if targets.ndim == 2 and targets.shape[1] == shape[1]:
            positives = (targets != 0).sum(dim=1)
            if bool((positives > 1).any()):
                return _TASKS["multilabel"]
            raise ValueError(f"targets {tuple(targets.shape)} with at most one positive per image are ambiguous: "
                             "pass task='multilabel' for multi-hot labels, or task='multiclass' with class "
                             "indices (targets.argmax(1)) for one-hot ones")
        raise ValueError(f"targets {tuple(targets.shape)} do not fit model outputs {shape}: pass class indices "
                         "[N] (task='multiclass') or multi-hot labels [N, C] (task='multilabel')")
    raise ValueError(f"cannot tell the task of model outputs {shape}: pass output= to pick (or compute) logits "
                     f"[N, C] (multiclass or multilabel), one logit [N] (binary) or [N, C, H, W] "
                     f"(segmentation), and task= to say which")


def resolve(out: Tensor, task: str | Task | None, targets: Tensor | None = None) -> tuple[Task, bool]:
    """``(task, inferred)``: the named task checked against ``out``, or the inferred one.

    Example:
        >>> import torch
        >>> resolve(torch.zeros(2), None)
        (Task('binary'), True)
    """
    if task is None:
        return infer_task(out, targets), True
    t = get_task(task)
    t.check(out)
    return t, False


def check_probe_fit(raw: Any, targets: Tensor, output: Any = None, task: str | Task | None = None,
                    who: str = "SaliencyMonitor") -> tuple[Task, bool]:
    """``(task, inferred)`` for a probe whose ``targets`` are explained on the model's output ``raw`` (of a forward
    of a few probe images): a ``ValueError`` starting with ``who`` and naming ``output=`` or ``task=`` when no
    tensor can be picked, the task does not fit, or a target is not one of the model's classes.

    Example:
        >>> import torch
        >>> check_probe_fit({"logits": torch.zeros(2, 1)}, torch.tensor([0, 1, 1]))
        (Task('binary'), True)
    """
    try:
        out = output_adapter(output)(raw)
        resolved, inferred = resolve(out, task, targets)
        if targets.ndim == 1:
            resolved.check_targets(targets, out, "the probe's targets")
        elif out.ndim != 2 or out.shape[1] != targets.shape[1]:
            raise ValueError(f"the probe's multi-hot labels have {targets.shape[1]} columns, but the model gives "
                             f"{tuple(out.shape)}: task='multilabel' needs one logit per label, [N, "
                             f"{targets.shape[1]}]; pass output= to pick that tensor")
    except ValueError as e:
        raise ValueError(f"{who}: {e}") from e
    return resolved, inferred


def probe_task(model: nn.Module, example: Tensor, probe: Any, output: Any = None, task: str | Task | None = None,
               who: str = "SaliencyMonitor") -> tuple[Task, bool]:
    """:func:`check_probe_fit` on one guarded forward of ``example`` (a few of ``probe``'s inputs, on the model's
    device): the setup check of :class:`~lightning_saliency.SaliencyMonitor`. A forward that fails is a
    ``ValueError`` saying that the probe does not fit the model.

    Example:
        >>> import torch
        >>> from lightning_saliency.probe import ProbeSet
        >>> probe = ProbeSet(torch.rand(2, 1, 2, 2), torch.tensor([0, 1]))
        >>> probe_task(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 1)), probe.inputs, probe)
        (Task('binary'), True)
    """
    from .guard import SideEffectGuard

    try:
        with SideEffectGuard(model), torch.no_grad():
            raw = model(example)
    except Exception as e:
        raise ValueError(f"the probe's inputs {tuple(probe.inputs.shape)} do not fit the model "
                         f"({type(e).__name__}: {e}). Build the probe from the data the model trains on, "
                         f"e.g. ProbeSet.from_dataset(val_set)") from e
    labels = getattr(probe, "labels", None)  # a multi-label probe: its multi-hot labels decide the task
    multi_hot = labels is not None and labels.dtype == torch.bool
    return check_probe_fit(raw, labels if multi_hot else probe.targets, output, task, who)


# ------------------------------------------------------------------------------------------------ wrapper


class TaskModel(nn.Module):
    """``model`` whose forward returns the class-score matrix ``[N, K]`` of ``task`` (see the module docstring),
    after ``output`` picked the tensor; :meth:`probabilities` gives the task's confidences.

    :func:`~lightning_saliency.attribute` given a ``TaskModel`` explains the wrapped model with its ``output``
    and ``task`` (layer names are the wrapped model's). ``task=None`` infers the task at the first forward.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(3, 1)
        >>> TaskModel(net, task="binary")(torch.zeros(2, 3)).shape
        torch.Size([2, 2])
    """

    def __init__(self, model: nn.Module, output: Any = None, task: str | Task | None = "multiclass"):
        super().__init__()
        self.model = model
        self.adapter = output_adapter(output)
        self.task: Task | None = None if task is None else get_task(task)

    def tensor(self, x: Any) -> Tensor:
        """The adapted output (checked against the task)."""
        out = self.adapter(self.model(x))
        if self.task is None:
            self.task = infer_task(out)
        self.task.check(out)
        return out

    def forward(self, x: Any) -> Tensor:
        out = self.tensor(x)  # first: with task=None it infers the task
        return self.task.class_scores(out)

    def probabilities(self, x: Any) -> Tensor:
        out = self.tensor(x)
        return self.task.probabilities(out)


def unwrap(model: nn.Module, output: Any, task: Any) -> tuple[nn.Module, Any, Any]:
    """``(model, output, task)``, looking through a :class:`TaskModel` (whose own output and task are used).

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> unwrap(TaskModel(net, task="binary"), None, None)[0] is net
        True
    """
    if isinstance(model, TaskModel):
        return model.model, model.adapter, model.task if model.task is not None else task
    return model, output, task
