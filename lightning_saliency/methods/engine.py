"""``attribute()``: every saliency method of DESIGN §4 behind one call, sharing work wherever the maths allows.

How the work is shared (DESIGN §5, invariant 2): per batch of inputs, **one forward** pass runs with a forward
hook on the target layer, and **one** ``torch.autograd.grad`` call differentiates the class score with respect
to the layer's activations and/or the input, whichever the requested methods need:

- ``cam`` needs the activations only (and the head's weights), no backward at all;
- ``gradcam``, ``gradcam++``, ``hirescam``, ``layercam`` need the activation gradient: when only these are asked
  for, autograd starts recording at the target layer (the forward hook switches it on) and the backward stops
  there, so the layers before it cost a plain inference forward;
- ``gradient`` and ``input_x_gradient`` need the input gradient: the same backward carries on to the input.

``smoothgrad``, ``integrated_gradients``, ``guided_backprop``, ``occlusion``, ``shapley`` and ``lime`` need passes
of their own (noisy inputs, interpolated inputs, modified ReLU backward, occluded inputs, patch-grid coalitions);
their rows go through the model in batches. ``guided_gradcam`` combines the guided backprop pass with the shared
pass's Grad-CAM.

Which method rides which pass, its flags and its options are rows of :mod:`.registry`; this module loops over the
requested rows (a method added with :func:`~lightning_saliency.methods.registry.register_method` runs its own pass,
inside the same guard).

Everything runs inside a :class:`~lightning_saliency.guard.SideEffectGuard`: eval mode, gradients enabled even
under ``torch.no_grad()``/``torch.inference_mode()``, no ``.backward()`` (parameters' ``.grad`` is never
touched), every hook removed and every flag and random state restored, also when a method raises.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ...                       nn.Linear(8, 5))
    >>> maps = attribute(model, torch.rand(2, 3, 16, 16), methods=("gradcam", "gradient"), layer="1")
    >>> {name: tuple(m.shape) for name, m in maps.items()}
    {'gradcam': (2, 16, 16), 'gradient': (2, 16, 16)}
"""

from __future__ import annotations

import difflib
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..guard import SideEffectGuard
from ..maps import resize
from ..tasks import check_task, output_adapter, unwrap
from . import cam as cam_mod
from .arguments import as_classes, as_positions, check_inputs
from .registry import MethodSpec, OwnPass, all_options, get_method, method_names
from .scoring import Scorer, class_scores

__all__ = ["ON_ERROR", "AttributionInfo", "attribute", "check_on_error", "default_options", "method_names"]

#: The one ``on_error`` vocabulary, shared by :func:`attribute`, :func:`~lightning_saliency.audit.audit_shard` and
#: :class:`~lightning_saliency.SaliencyMonitor` (each documents its default: ``"raise"`` here, ``"warn"`` there).
ON_ERROR: dict[str, str] = {
    "raise": "a failing method (or metric, or audit) raises",
    "warn": "it is left out, recorded (AttributionInfo.errors, the report's errors) and warned about",
    "collect": "it is left out and recorded, without a warning",
}


def check_on_error(value: Any) -> str:
    """``value`` if it is one of :data:`ON_ERROR`, else a ``ValueError`` listing them.

    Example:
        >>> check_on_error("collect")
        'collect'
    """
    if value not in ON_ERROR:
        raise ValueError(f"on_error must be one of {', '.join(map(repr, ON_ERROR))}, got {value!r}: "
                         + "; ".join(f"{k!r}: {v}" for k, v in ON_ERROR.items()))
    return value


def default_options() -> dict[str, Any]:
    """Options accepted by :func:`attribute` as keyword arguments, with their defaults (every method's, registered
    ones included, then the engine's: ``autocast``, ``on_error``, ``return_info``).

    Example:
        >>> default_options()["ig_steps"], default_options()["return_info"]
        (32, False)
    """
    return all_options()


def __getattr__(name: str) -> Any:
    # METHODS and DEFAULT_OPTIONS are read from the registry at each access (registered methods included); a
    # `from ... import METHODS` keeps the value of that moment: call method_names() for the live list.
    if name == "METHODS":
        return method_names()
    if name == "DEFAULT_OPTIONS":
        return all_options()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class AttributionInfo:
    """What else the shared forward saw, returned with the maps by ``attribute(..., return_info=True)``.

    Attributes:
        targets: ``[N]`` long, the classes explained (the predictions when ``targets=None``).
        predictions: ``[N]`` long, the argmax of the logits.
        scores: ``[N]`` float32, the explained score ``y^t`` (``y^t - y^q`` with a contrast).
        forward_dtype: dtype of the model's logits in the shared forward, e.g. ``"float32"``, or ``"bfloat16"``
            under an active autocast (the maps are float32 either way).
        layer: dotted name of the target layer used, ``None`` when no layer was needed.
        forwards, backwards: model forward passes and ``autograd.grad`` calls made (layer resolution excluded).
        seconds: wall time per stage: ``"shared"`` (the shared pass, including layer resolution) and each method
            that ran a pass of its own.
        errors: method -> the exception it raised, for methods that failed under ``on_error="collect"`` or
            ``"warn"`` (a combined method whose part failed holds the part's exception).
        finite, logits: ``[N]`` bool, True where every logit of an image is finite; the ``[N, K]`` float32 logits.
        task, task_inferred, output: the task explained, whether ``task=None`` inferred it, and what ``output=``
            took from the model's output, e.g. ``"key 'logits'"`` (:mod:`lightning_saliency.tasks`).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> maps, info = attribute(model, torch.rand(2, 1, 2, 2), methods=("gradient",), return_info=True)
        >>> info.forwards, info.backwards, info.forward_dtype
        (1, 1, 'float32')
    """

    targets: Tensor
    predictions: Tensor
    scores: Tensor
    forward_dtype: str
    layer: str | None
    forwards: int = 0
    backwards: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)
    finite: Tensor | None = None
    logits: Tensor | None = None
    task: str = "multiclass"
    task_inferred: bool = False
    output: str = "tensor"


# ------------------------------------------------------------------------------------------------ validation


def _check_methods(methods: str | Sequence[str]) -> list[str]:
    if isinstance(methods, str):
        methods = (methods,)
    names: list[str] = []
    for m in methods:
        get_method(m)  # an unknown name raises, naming the closest known one
        if m not in names:
            names.append(m)
    if not names:
        raise ValueError(f"methods is empty; choose one or more of: {', '.join(method_names())}")
    return names


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    defaults = all_options()
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        close = {k: difflib.get_close_matches(str(k), defaults, n=1) for k in unknown}
        hint = "".join(f" ({k!r}: did you mean {c[0]!r}?)" for k, c in close.items() if c)
        raise ValueError(f"unknown option(s) {unknown}{hint}; attribute() accepts: {', '.join(defaults)}")
    opts = {**defaults, **options}
    check_on_error(opts["on_error"])
    return opts


# ------------------------------------------------------------------------------------------------ shared pass


def _uncompiled(model: nn.Module, layer: Any) -> tuple[nn.Module, Any]:
    """A ``torch.compile``d model is explained through its original module (the same parameters, run eagerly):
    hooks on the submodules of a compiled graph do not see its activations, and new hooks would recompile it."""
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
        if isinstance(layer, str) and layer.startswith("_orig_mod."):
            layer = layer[len("_orig_mod."):]
        return inner, layer
    return model, layer


def _resolve(model: nn.Module, layer: Any, reshape: Any, example: Tensor, output: Any) -> Any:
    from ..layers import TargetLayer, resolve_layer

    if isinstance(layer, TargetLayer):
        return layer if reshape is None else TargetLayer(layer.name, layer.module, reshape)
    return resolve_layer(model, layer, reshape=reshape, example_input=example, output=output)


def _as_grid(tensor: Tensor, target: Any) -> Tensor:
    out = target.reshape(tensor) if target.reshape is not None else tensor
    if not isinstance(out, Tensor) or out.ndim != 4:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"layer {target.name!r} gives {got} after reshape, not [N, K, h, w]: pass reshape= "
                         "with a callable that maps this layer's output to [N, K, h, w], or choose another layer")
    return out


class _Capture:
    """Forward hooks for the shared pass: the target layer's activations and, for CAM, the linear layers."""

    def __init__(self, target: Any, watch_linear: bool, grad_from_here: bool = False):
        self.target = target
        self.watch_linear = watch_linear
        # True when the forward runs without autograd up to the target layer (only the activation gradient is
        # wanted): the hook turns autograd on for the rest of the network, so nothing before the layer is
        # recorded or kept for a backward that will never reach it.
        self.grad_from_here = grad_from_here
        self.reset()

    def reset(self) -> None:
        self.activation: Tensor | None = None
        self.linear_calls: list[tuple[nn.Linear, Tensor, Tensor]] = []

    def layer_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not isinstance(output, Tensor):
            raise ValueError(f"layer {self.target.name!r} returns {type(output).__name__}, not a tensor: choose "
                             "a layer whose output is one tensor (e.g. the block that contains it)")
        if self.grad_from_here:
            output = output.detach().requires_grad_(True)
            torch.set_grad_enabled(True)  # for the rest of this forward; the caller's `with` block restores it
        self.activation = output
        self.linear_calls = []  # only linear layers that run after the target layer count for CAM
        # The network continues with a copy: an in-place op downstream (DenseNet's F.relu(inplace=True) on its
        # features) then cannot change the activations we keep, and the gradient still flows back through them.
        return output.clone()

    def linear_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.activation is not None and args and isinstance(args[0], Tensor):
            self.linear_calls.append((module, args[0].detach(), output))


def _cam_weights(cap: _Capture, scorer: Scorer, A: Tensor, t: Tensor, q: Tensor | None) -> Tensor:
    hint = ("CAM needs a global-average-pool + linear head after the target layer (like ResNet's avgpool + fc); "
            "use method 'gradcam' instead")
    out = scorer.last_output  # the adapted output: the head's output, maybe reshaped ([N, 1] -> [N] for binary)
    heads = [c for c in cap.linear_calls if c[2] is out or (c[2].numel() == out.numel() and
                                                             torch.equal(c[2].detach().reshape(out.shape),
                                                                         out.detach()))]
    if not heads:
        raise ValueError(f"no nn.Linear layer after {cap.target.name!r} produces the logits. {hint}")
    linear, linear_input, _ = heads[-1]
    cam_mod.check_gap_linear_head(A, linear, linear_input, cap.target.name)
    weight = scorer.task.head_weight(linear.weight.detach().float())
    rows = weight[t]
    if q is not None:
        rows = rows - weight[q]
    return rows


def _shared_pass(model: nn.Module, x: Tensor, specs: list[MethodSpec], t_all: Tensor | None, q_all: Tensor | None,
                 target: Any, guard: SideEffectGuard, scorer: Scorer, batch_size: int,
                 collect: dict[str, BaseException] | None
                 ) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor, str, Tensor, Tensor]:
    """One forward and (at most) one ``autograd.grad`` per batch, computing what the union of ``specs`` needs:
    the input gradient for ``"shared"`` rows, the layer's activations and their gradient for ``"cam"`` rows, the
    activations and the linear head for ``"head"`` rows (no backward). Also the logits, and whether they are finite."""
    N, _, H, W = x.shape
    rows = [s for s in specs if s.rides in ("shared", "cam", "head")]
    need_act_grad = any(s.rides == "cam" for s in rows)
    need_input_grad = any(s.rides == "shared" for s in rows)
    want_head = any(s.rides == "head" for s in rows)
    # only the activation gradient wanted: no autograd before the target layer (less time and memory)
    grad_from_layer = need_act_grad and not need_input_grad
    cap = None
    if target is not None:
        cap = _Capture(target, want_head, grad_from_here=grad_from_layer)
        guard.add_forward_hook(target.module, cap.layer_hook)
        if want_head:
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    guard.add_forward_hook(m, cap.linear_hook)

    out: dict[str, Tensor] = {}  # each method's maps [N, H, W], allocated once, filled a batch at a time
    failed: set[str] = set()
    targets, preds, scores, finite, all_logits, dtype = [], [], [], [], [], "float32"

    def fail(method: str, err: Exception) -> None:
        if collect is None:
            raise err
        collect[method] = err
        failed.add(method)

    for s in range(0, N, batch_size):
        xc = x[s : s + batch_size].detach().clone().requires_grad_(need_input_grad)
        if cap is not None:
            cap.reset()
        with torch.set_grad_enabled(need_input_grad):
            logits = scorer.forward(xc, torch.arange(s, s + xc.shape[0], device=x.device))
        dtype = str(logits.dtype).replace("torch.", "")
        if s == 0:
            scorer.task.check_targets(t_all, scorer.last_output, "targets")
            scorer.task.check_targets(q_all, scorer.last_output, "contrast")
        pred = scorer.task.predict(scorer.last_output)
        t = pred if t_all is None else t_all[s : s + batch_size]
        q = None if q_all is None else q_all[s : s + batch_size]
        score = class_scores(logits, t, q)
        targets.append(t)
        preds.append(pred)
        finite.append(torch.isfinite(logits.detach()).all(dim=1))
        all_logits.append(logits.detach().float())
        scores.append(score.detach())

        A_raw = cap.activation if cap is not None else None
        layer_error: ValueError | None = None
        if cap is not None and A_raw is None:
            layer_error = ValueError(f"layer {target.name!r} did not run in the forward pass; choose a layer that "
                                     "the model's forward uses")
        act_grad = need_act_grad and layer_error is None
        wrt: list[Tensor] = []
        if act_grad:
            wrt.append(A_raw)
        if need_input_grad:
            wrt.append(xc)
        grads: list[Tensor | None] = []
        if wrt:
            grads = list(torch.autograd.grad(score.sum(), wrt, allow_unused=True))
            scorer.backwards += 1
        g_act = grads.pop(0) if act_grad else None
        g_x = grads.pop(0) if need_input_grad else None

        A = G = None
        try:
            if layer_error is not None:
                raise layer_error
            if A_raw is not None:
                A = _as_grid(A_raw.detach(), target).float()
            if act_grad:
                if g_act is None:
                    raise ValueError(f"the class score does not depend on layer {target.name!r}'s output (no "
                                     "gradient path): choose a layer that feeds the logits")
                G = _as_grid(g_act, target).float()
        except ValueError as err:  # every layer-based method fails alike; the input-gradient ones carry on
            for spec in rows:
                if spec.needs_layer and spec.name not in failed:
                    fail(spec.name, err)
        if g_x is None and need_input_grad:
            g_x = torch.zeros_like(xc)

        for spec in rows:
            if spec.name in failed:
                continue
            try:
                part = (resize(spec.fn(A, G), (H, W)) if spec.rides == "cam"
                        else resize(spec.fn(A, _cam_weights(cap, scorer, A, t, q)), (H, W)) if spec.rides == "head"
                        else spec.fn(xc.detach(), g_x))
                if spec.name not in out:
                    out[spec.name] = part.new_empty((N, *part.shape[1:]))
                out[spec.name][s : s + part.shape[0]] = part
            except ValueError as err:
                fail(spec.name, err)
        del logits, score, A_raw, grads, g_act, g_x, xc
    if cap is not None:
        guard.remove()
    for m in failed:
        out.pop(m, None)
    return out, *(torch.cat(v) for v in (targets, preds, scores)), dtype, torch.cat(finite), torch.cat(all_logits)


def _run_own(spec: MethodSpec, p: OwnPass, opts: dict[str, Any]) -> Tensor:
    """Call an ``"own"`` row: a built-in with the engine's :class:`OwnPass`, a user method with
    ``(model, inputs, targets, **options)`` (``layer=`` too when it needs one); check what a user method returns."""
    options = {k: opts[k] for k in spec.options}
    if spec.takes_pass:
        return spec.fn(p, **options)
    if spec.needs_layer:
        options["layer"] = p.layer
    try:
        with torch.enable_grad():
            out = spec.fn(p.model, p.inputs.clone(), p.targets.clone(), **options)
    finally:
        p.model.eval()  # a method that switched to train mode must not change the methods after it
    N, _, H, W = p.inputs.shape
    if not isinstance(out, Tensor) or tuple(out.shape) != (N, H, W):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"method {spec.name!r} returned {got}, not a tensor [N, H, W] = {(N, H, W)}: make its "
                         "function return one map per input at the input resolution")
    return out.detach().float()


# ------------------------------------------------------------------------------------------------ public


def attribute(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | Sequence[int] | int | None = None,
    methods: str | Sequence[str] = ("gradcam",),
    layer: str | nn.Module | Any = "auto",
    batch_size: int | None = None,
    contrast: Tensor | Sequence[int] | int | None = None,
    reshape: Callable[[Tensor], Tensor] | None = None,
    output: Any = None,
    task: str | None = None,
    positions: Tensor | Sequence[int] | None = None,
    **options: Any,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], AttributionInfo]:
    """Saliency maps of ``model`` for ``inputs``, one ``[N, H, W]`` float32 map per method.

    Args:
        model: a model whose ``forward(inputs)`` returns logits ``[N, num_classes]``, or anything ``output=`` and
            ``task=`` turn into class scores (a dict, a tuple, a ``ModelOutput``; one binary logit, multi-label
            or segmentation logits: :mod:`lightning_saliency.tasks`). It is run in eval mode
            and left exactly as found (training flags, ``requires_grad``, ``.grad``, hooks, random states). A
            ``torch.compile``d model is explained through its original module, run eagerly.
        inputs: ``[N, C, H, W]`` float tensor; never modified (the engine differentiates a detached copy).
        targets: the class to explain per image: ``None`` (default) explains the prediction (argmax of the
            logits of the same forward pass), an int explains that class for every image, an int tensor ``[N]``
            one class per image.
        methods: one or more of :func:`~lightning_saliency.methods.registry.method_names`: ``cam``,
            ``gradcam``, ``gradcam++``, ``hirescam``, ``layercam``, ``gradient``, ``input_x_gradient``,
            ``smoothgrad``, ``integrated_gradients``, ``guided_backprop``, ``guided_gradcam``, ``occlusion``,
            ``shapley``, ``lime``, and any method added with
            :func:`~lightning_saliency.methods.registry.register_method`. Formulas: DESIGN §4 and the docstrings
            in ``cam.py``, ``gradients.py``, ``occlusion.py``, ``perturbation.py``.
        layer: the target layer of the CAM family (ignored by the others): ``"auto"``, a dotted module name, a
            module of ``model``, or a :class:`~lightning_saliency.layers.TargetLayer` already resolved. Names and
            ``"auto"`` are resolved with one extra forward of a single image; pass a ``TargetLayer`` (from
            :func:`~lightning_saliency.layers.resolve_layer`) when calling repeatedly to skip it.
        batch_size: the most rows per forward pass. ``None``: the shared pass takes all ``N`` images at once and
            the multi-pass methods take ``max(N, 32)`` rows per pass.
        contrast: a second class per image (same forms as ``targets``): explain ``y^target - y^contrast``, i.e.
            "why the target and not the contrast class".
        reshape: maps the target layer's output to ``[N, K, h, w]`` (found automatically for ViT/Swin layers).
        output, task: which tensor of the model's output to explain (``None``: a tensor, a tuple's first element,
            a dict's ``"logits"`` else ``"out"``, ``.logits``; a key; a callable) and how it gives class scores
            (``"multiclass"``, ``"binary"``, ``"multilabel"``, ``"segmentation"``; ``None`` infers it):
            :mod:`lightning_saliency.tasks`.
        positions: each input's position in a larger set this call is a part of (a probe shard's
            ``ProbeSet.indices``; the audit passes them), which keys its random draws (SmoothGrad's noise): a part
            explained with its positions gets the whole set's maps (:mod:`.arguments`). Default ``0..N-1``.
        **options: (defaults from :func:`default_options`, registered methods' included; anything else is a
            ``ValueError`` naming the closest known option)

            - ``smoothgrad_samples=16``: noisy copies per image; ``smoothgrad_sigma=0.15``: noise standard
              deviation as a fraction of each image's value range; ``smoothgrad_seed=0``: the noise seed (drawn
              from a private generator, so maps are reproducible and the global random state is untouched).
            - ``ig_steps=32``: integration points; ``ig_method="gausslegendre"`` (or ``"riemann_trapezoid"``,
              ``"riemann_middle"``, ``"riemann_left"``, ``"riemann_right"``; the names Captum uses);
              ``ig_baseline=None``: the baseline ``x'`` (zeros), a number, or a tensor broadcastable to inputs.
            - ``occlusion_patch=8``, ``occlusion_stride=4``: patch side and stride in pixels (int or
              ``(h, w)``); ``occlusion_baseline=0.0``: the fill value (number or broadcastable tensor).
            - ``shapley_grid=8`` (cells per side), ``shapley_permutations=16`` (antithetic pairs),
              ``shapley_baseline=0.0`` (a number, ``"mean"`` or ``"blur"``), ``shapley_seed=0``; ``lime_grid=8``,
              ``lime_samples=500``, ``lime_baseline=0.0``, ``lime_kernel_width=0.25``, ``lime_ridge=1.0``,
              ``lime_seed=0`` (:mod:`~lightning_saliency.methods.perturbation`; private generators).
            - ``autocast=True``: keep the caller's autocast (mixed precision) for the forwards, as the model
              runs in training; ``False`` runs them in full precision. Maps are computed in float32 either way.
            - ``on_error="raise"``: a failing method raises. ``"collect"``: it is left out of the result and its
              exception recorded in ``AttributionInfo.errors``; ``"warn"``: the same plus a ``RuntimeWarning``
              (:data:`ON_ERROR`); bad arguments and a failing shared forward still raise.
            - ``return_info=False``: ``True`` returns ``(maps, AttributionInfo)`` (targets, predictions,
              scores, forward dtype, pass counts, timings, errors).

    Returns:
        ``{method: maps}`` in the order asked, each ``[N, H, W]`` float32, detached, on the inputs' device.
        CAM-family maps are ReLU'd and upsampled bilinearly; ``input_x_gradient``, ``integrated_gradients``,
        ``shapley`` and ``lime`` are signed (metrics take their absolute value). Not normalised: use
        :func:`lightning_saliency.maps.normalize` for display.

    Raises:
        ValueError: with the fix in the message: inputs not ``[N, C, H, W]`` or empty, a target out of
            ``[0, num_classes)``, an unknown method (the known ones listed) or option, CAM on a model without a
            global-average-pool + linear head, guided backprop on a model without ``nn.ReLU`` modules.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                       nn.Flatten(), nn.Linear(4, 3))
        >>> x = torch.rand(2, 3, 8, 8)
        >>> maps, info = attribute(model, x, methods=("cam", "gradcam", "integrated_gradients"), layer="1",
        ...                        ig_steps=8, return_info=True)
        >>> [tuple(m.shape) for m in maps.values()], info.forwards
        ([(2, 8, 8), (2, 8, 8), (2, 8, 8)], 2)
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model, layer = _uncompiled(model, layer)
    model, output, task = unwrap(model, output, check_task(task))
    output = output_adapter(output)  # a bad output= fails here
    opts = _check_options(options)
    requested = _check_methods(methods)
    check_inputs(inputs)
    for spec in map(get_method, method_names()):
        if spec.validate is not None:
            spec.validate(opts, inputs)
    # the requested rows, plus the parts of combined rows nobody asked for (computed for them, not returned)
    specs = [get_method(m) for m in requested]
    for spec in list(specs):
        specs += [get_method(p) for p in spec.parts if p not in [s.name for s in specs]]
    N, _, H, W = inputs.shape
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    shared_bs = batch_size or N
    extra_bs = batch_size or max(N, 32)
    device = inputs.device
    t_all = as_classes(targets, N, "targets", device)
    q_all = as_classes(contrast, N, "contrast", device)
    positions = as_positions(positions, N)
    collect: dict[str, BaseException] | None = None if opts["on_error"] == "raise" else {}

    with SideEffectGuard(model) as guard:
        # a clone of an inference tensor is one autograd can use; others are read as they are (passes copy their rows)
        x = inputs.detach().clone() if inputs.is_inference() else inputs.detach()
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        target = None
        if any(s.needs_layer for s in specs):
            try:
                target = _resolve(model, layer, reshape, x[:1], output)
            except ValueError as err:
                if collect is None:
                    raise
                collect.update({s.name: err for s in specs if s.needs_layer})
                specs = [s for s in specs if not s.needs_layer]
        scorer = Scorer(model, targets=torch.zeros(N, dtype=torch.long, device=device), contrast=q_all,
                        batch_size=extra_bs, autocast_off=not opts["autocast"], output=output, task=task,
                        task_targets=t_all)
        shared, t, pred, score, dtype, finite, logits = _shared_pass(model, x, specs, t_all, q_all, target, guard,
                                                             scorer, shared_bs, collect)
        scorer.targets = t
        seconds["shared"] = time.perf_counter() - start
        maps: dict[str, Tensor] = dict(shared)
        own = OwnPass(model, x, t, scorer, score, guard.add_forward_hook, target, positions)

        def run(method: str, fn: Callable[[], Tensor], timed: bool = True) -> None:
            begin = time.perf_counter()
            try:
                maps[method] = fn()
            except Exception as err:  # noqa: BLE001 - under "collect" any failure of one method is recorded
                if collect is None:
                    raise
                collect[method] = err
            if timed:
                seconds[method] = time.perf_counter() - begin

        wanted = {s.name for s in specs}
        for spec in map(get_method, method_names()):  # registry order: built-ins first, as before
            if spec.name in wanted and spec.rides == "own":
                run(spec.name, lambda spec=spec: _run_own(spec, own, opts))
        for spec in specs:
            if spec.rides == "combined":
                broken = [collect[p] for p in spec.parts if collect is not None and p in collect]
                if broken:
                    collect[spec.name] = broken[0]
                else:
                    run(spec.name, lambda spec=spec: spec.fn(*(maps[p] for p in spec.parts)), timed=False)

    errors = {m: e for m, e in (collect or {}).items() if m in requested}
    if opts["on_error"] == "warn":
        for m, e in errors.items():
            warnings.warn(f"lightning-saliency: method {m!r} failed ({type(e).__name__}: {e}); left out of the "
                          "result (pass on_error='raise' to raise instead)", RuntimeWarning, stacklevel=2)
    result = {m: maps[m].detach().float().to(device) for m in requested if m in maps}
    if not opts["return_info"]:
        return result
    info = AttributionInfo(logits=logits, targets=t.detach(), predictions=pred, scores=score.float(),
                           forward_dtype=dtype, layer=None if target is None else target.name,
                           forwards=scorer.forwards, backwards=scorer.backwards, seconds=seconds,
                           errors=errors, finite=finite.cpu(), task=scorer.task.name,
                           task_inferred=scorer.task_inferred, output=scorer.adapter.picked)
    return result, info
