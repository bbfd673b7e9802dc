"""The method registry: one :class:`MethodSpec` row per attribution method, built-in or registered by a user.

Every list of method names, option defaults and flags (which methods need a target layer, which maps are signed)
is read from here; :func:`~lightning_saliency.methods.engine.attribute` loops over the rows. A row says which
pass its method rides, and so what its ``fn`` is called with:

- ``"shared"``: a formula over the shared pass's input gradient: ``fn(inputs, input_grad) -> [n, H, W]``
  (``gradient``, ``input_x_gradient``);
- ``"cam"``: a formula over the target layer's activations ``A`` and their gradient ``G``, both ``[n, K, h, w]``:
  ``fn(A, G) -> [n, h, w]``, upsampled by the engine (``gradcam``, ``gradcam++``, ``hirescam``, ``layercam``);
- ``"head"``: like ``"cam"`` but the weights come from the global-average-pool + linear head, no gradient:
  ``fn(A, class_weights [n, K]) -> [n, h, w]`` (``cam``);
- ``"own"``: a pass of its own. Built-ins (``takes_pass=True``) get the engine's :class:`OwnPass` (its scorer
  handles contrast, autocast, batching and pass counting): ``fn(own_pass, **options)``. A user method
  (``takes_pass=False``) gets ``fn(model, inputs, targets, **options)``, plus ``layer=`` (the resolved
  :class:`~lightning_saliency.layers.TargetLayer`) when it needs one;
- ``"combined"``: ``fn(*maps)`` over the maps of the methods named in ``parts`` (``guided_gradcam`` =
  guided backprop x Grad-CAM); a part nobody asked for is computed for it and not returned.

Adding a CAM variant is its formula in :mod:`.cam` plus one row: ``MethodSpec("name", "cam", formula,
needs_layer=True)``. Option names are flat (``ig_steps``, ``occlusion_patch``, ...) and unique across methods.

Example:
    >>> get_method("gradcam").rides, needs_layer("gradcam"), is_signed("integrated_gradients")
    ('cam', True, True)
    >>> all_options()["ig_steps"]
    32
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from ..patches import check_baseline, grid_pair
from . import cam as cam_mod
from .gradients import (
    IG_METHODS,
    gradient_map,
    guided_backprop,
    guided_gradcam,
    input_x_gradient_map,
    integrated_gradients,
    smoothgrad,
)
from .occlusion import occlusion
from .perturbation import lime, shapley

__all__ = [
    "RIDES",
    "SIGNED_METHODS",
    "MethodSpec",
    "add_method",
    "OwnPass",
    "all_options",
    "builtin_names",
    "get_method",
    "is_signed",
    "option_owner",
    "method_names",
    "needs_layer",
    "register_method",
    "registered",
    "unregister_method",
]

#: The passes a method can ride (see the module docstring for what ``fn`` receives in each).
RIDES = ("shared", "cam", "head", "own", "combined")


@dataclass(frozen=True)
class MethodSpec:
    """One attribution method: its name, the pass it rides, its flags, its options and its function.

    Attributes:
        name: the name ``attribute(methods=...)`` and the report use.
        rides: one of :data:`RIDES` (module docstring: what ``fn`` is called with).
        fn: the method's function.
        needs_layer: uses the target layer (the engine resolves ``layer=`` when any requested method does).
        signed: its maps are signed: metrics and pictures use ``|M|``.
        options: the keyword options it reads, with their defaults (flat names, unique across methods).
        parts: for ``"combined"`` rows, the methods whose maps ``fn`` combines, in argument order.
        validate: ``validate(options, inputs)`` raises a ``ValueError`` saying the fix for a bad option value;
            run on every call of :func:`attribute`, before any pass.
        takes_pass: for ``"own"`` rows, ``fn`` takes the engine's :class:`OwnPass` (built-ins) rather than
            ``(model, inputs, targets)``.
        builtin: a row of this module (cannot be unregistered or shadowed).

    Example:
        >>> spec = get_method("smoothgrad")
        >>> spec.rides, dict(spec.options)["smoothgrad_samples"], spec.builtin
        ('own', 16, True)
    """

    name: str
    rides: str
    fn: Callable[..., Tensor]
    needs_layer: bool = False
    signed: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    parts: tuple[str, ...] = ()
    validate: Callable[[dict[str, Any], Tensor], None] | None = None
    takes_pass: bool = False
    builtin: bool = False

    def __post_init__(self) -> None:
        if self.rides not in RIDES:
            raise ValueError(f"rides must be one of {', '.join(RIDES)}, got {self.rides!r}")
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))


@dataclass
class OwnPass:
    """What a built-in ``"own"`` row gets from the engine (inside its side-effect guard).

    Attributes:
        model: the model (eval mode, hooks of the shared pass removed).
        inputs: the inputs ``[N, C, H, W]``, detached (a copy when they are inference tensors): read them, never
            write to them.
        targets: ``[N]`` the classes explained.
        scorer: :class:`~lightning_saliency.methods.scoring.Scorer` (contrast, autocast, batching, counts).
        scores: ``[N]`` the shared pass's class scores.
        add_hook: ``add_hook(module, fn)``, the guard's forward-hook registration (removed on exit).
        layer: the resolved target layer, or ``None``.
        positions: ``[N]`` long (CPU), each input's position in the set it is a part of (``attribute``'s
            ``positions=``; default ``0..N-1``): what keys a method's per-image random draws.
    """

    model: nn.Module
    inputs: Tensor
    targets: Tensor
    scorer: Any
    scores: Tensor
    add_hook: Callable[..., Any]
    layer: Any = None
    positions: Tensor | None = None


# ------------------------------------------------------------------------------------------------ built-ins


def _check_baseline(value: Any, shape: tuple[int, ...], name: str) -> None:
    """A ``ValueError`` saying the fix unless ``value`` is None, a number or a tensor broadcastable to ``shape``."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be None, a number or a tensor, got {type(value).__name__}")
    try:
        ok = torch.broadcast_shapes(tuple(value.shape), shape) == tuple(shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to the inputs {tuple(shape)}: "
                         "pass a number or a tensor [C, 1, 1], [C, H, W] or [N, C, H, W]")


def _baseline(value: Any, x: Tensor, name: str) -> Tensor:
    """``value`` (None: zeros, a number, a tensor) as a tensor shaped like ``x``."""
    _check_baseline(value, tuple(x.shape), name)
    if value is None:
        return torch.zeros_like(x)
    if isinstance(value, Tensor):
        return torch.broadcast_to(value.detach().to(device=x.device, dtype=x.dtype), x.shape).clone()
    return torch.full_like(x, float(value))


def _positive_int(opts: dict[str, Any], key: str) -> None:
    value = opts[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{key} must be a positive int, got {value!r}")


def _gradient(inputs: Tensor, input_grad: Tensor) -> Tensor:
    """Gradient map ``max_c |dy/dx_c|`` (formula: :func:`.gradients.gradient_map`)."""
    return gradient_map(input_grad)


def _smoothgrad(p: OwnPass, *, smoothgrad_samples: int, smoothgrad_sigma: float, smoothgrad_seed: int) -> Tensor:
    """SmoothGrad over the engine's scorer (formula: :func:`.gradients.smoothgrad`)."""
    return smoothgrad(p.scorer, p.inputs, smoothgrad_samples, smoothgrad_sigma, smoothgrad_seed,
                      positions=p.positions)


def _check_smoothgrad(opts: dict[str, Any], inputs: Tensor) -> None:
    _positive_int(opts, "smoothgrad_samples")
    if not isinstance(opts["smoothgrad_sigma"], (int, float)) or opts["smoothgrad_sigma"] < 0:
        raise ValueError(f"smoothgrad_sigma must be a number >= 0, got {opts['smoothgrad_sigma']!r}")


def _integrated_gradients(p: OwnPass, *, ig_steps: int, ig_baseline: Any, ig_method: str) -> Tensor:
    """Integrated Gradients over the engine's scorer (formula: :func:`.gradients.integrated_gradients`)."""
    base = _baseline(ig_baseline, p.inputs, "ig_baseline")
    return integrated_gradients(p.scorer, p.inputs, base, ig_steps, ig_method)


def _check_ig(opts: dict[str, Any], inputs: Tensor) -> None:
    _positive_int(opts, "ig_steps")
    if opts["ig_method"] not in IG_METHODS:
        raise ValueError(f"unknown ig_method {opts['ig_method']!r}; choose one of {', '.join(IG_METHODS)}")
    _check_baseline(opts["ig_baseline"], tuple(inputs.shape), "ig_baseline")  # raised before any pass


def _guided_backprop(p: OwnPass) -> Tensor:
    """Guided backprop over the engine's scorer, hooks through the guard (:func:`.gradients.guided_backprop`)."""
    return guided_backprop(p.scorer, p.inputs, add_hook=p.add_hook)


def _occlusion(p: OwnPass, *, occlusion_patch: Any, occlusion_stride: Any, occlusion_baseline: Any) -> Tensor:
    """Occlusion over the engine's scorer (formula: :func:`.occlusion.occlusion`)."""
    fill = occlusion_baseline
    if isinstance(fill, Tensor):
        fill = _baseline(fill, p.inputs, "occlusion_baseline")
    return occlusion(p.scorer, p.inputs, p.scores, occlusion_patch, occlusion_stride, fill)


def _check_occlusion(opts: dict[str, Any], inputs: Tensor) -> None:
    for key in ("occlusion_patch", "occlusion_stride"):
        value = opts[key]
        pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else ()
        if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
            raise ValueError(f"{key} must be a positive int or a pair (h, w) of them, got {value!r}")
    if isinstance(opts["occlusion_baseline"], Tensor):
        _check_baseline(opts["occlusion_baseline"], tuple(inputs.shape), "occlusion_baseline")


def _shapley(p: OwnPass, *, shapley_grid: Any, shapley_permutations: int, shapley_baseline: Any,
             shapley_seed: int) -> Tensor:
    """Shapley value sampling over the grid cells (formula: :func:`.perturbation.shapley`)."""
    return shapley(p.scorer, p.inputs, shapley_grid, shapley_permutations, shapley_baseline, shapley_seed)


def _lime(p: OwnPass, *, lime_grid: Any, lime_samples: int, lime_baseline: Any, lime_kernel_width: float,
          lime_ridge: float, lime_seed: int) -> Tensor:
    """LIME over the grid cells (formula: :func:`.perturbation.lime`)."""
    return lime(p.scorer, p.inputs, lime_grid, lime_samples, lime_baseline, lime_kernel_width, lime_ridge, lime_seed)


def _check_patch_grid(opts: dict[str, Any], prefix: str, counts: str) -> None:
    """The option checks ``shapley`` and ``lime`` share (the grid against the image size is checked when the
    method runs, since these checks run for every call of :func:`attribute`)."""
    grid_pair(opts[f"{prefix}_grid"], f"{prefix}_grid")
    _positive_int(opts, counts)
    check_baseline(opts[f"{prefix}_baseline"], f"{prefix}_baseline")
    seed = opts[f"{prefix}_seed"]
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"{prefix}_seed must be an int >= 0, got {seed!r}")


def _check_shapley(opts: dict[str, Any], inputs: Tensor) -> None:
    _check_patch_grid(opts, "shapley", "shapley_permutations")


def _check_lime(opts: dict[str, Any], inputs: Tensor) -> None:
    _check_patch_grid(opts, "lime", "lime_samples")
    for key in ("lime_kernel_width", "lime_ridge"):
        value = opts[key]
        positive = key == "lime_kernel_width"
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (positive and value == 0):
            raise ValueError(f"{key} must be a number {'> 0' if positive else '>= 0'}, got {value!r}")


_BUILTINS = (
    MethodSpec("cam", "head", cam_mod.cam, needs_layer=True, builtin=True),
    MethodSpec("gradcam", "cam", cam_mod.gradcam, needs_layer=True, builtin=True),
    MethodSpec("gradcam++", "cam", cam_mod.gradcam_plus_plus, needs_layer=True, builtin=True),
    MethodSpec("hirescam", "cam", cam_mod.hirescam, needs_layer=True, builtin=True),
    MethodSpec("layercam", "cam", cam_mod.layercam, needs_layer=True, builtin=True),
    MethodSpec("gradient", "shared", _gradient, builtin=True),
    MethodSpec("input_x_gradient", "shared", input_x_gradient_map, signed=True, builtin=True),
    MethodSpec("smoothgrad", "own", _smoothgrad, takes_pass=True, builtin=True, validate=_check_smoothgrad,
               options={"smoothgrad_samples": 16, "smoothgrad_sigma": 0.15, "smoothgrad_seed": 0}),
    MethodSpec("integrated_gradients", "own", _integrated_gradients, signed=True, takes_pass=True, builtin=True,
               options={"ig_steps": 32, "ig_baseline": None, "ig_method": "gausslegendre"}, validate=_check_ig),
    MethodSpec("guided_backprop", "own", _guided_backprop, takes_pass=True, builtin=True),
    MethodSpec("guided_gradcam", "combined", guided_gradcam, needs_layer=True, parts=("guided_backprop", "gradcam"),
               builtin=True),
    MethodSpec("occlusion", "own", _occlusion, takes_pass=True, builtin=True, validate=_check_occlusion,
               options={"occlusion_patch": 8, "occlusion_stride": 4, "occlusion_baseline": 0.0}),
    MethodSpec("shapley", "own", _shapley, signed=True, takes_pass=True, builtin=True, validate=_check_shapley,
               options={"shapley_grid": 8, "shapley_permutations": 16, "shapley_baseline": 0.0, "shapley_seed": 0}),
    MethodSpec("lime", "own", _lime, signed=True, takes_pass=True, builtin=True, validate=_check_lime,
               options={"lime_grid": 8, "lime_samples": 500, "lime_baseline": 0.0, "lime_kernel_width": 0.25,
                        "lime_ridge": 1.0, "lime_seed": 0}),
)

_REGISTRY: dict[str, MethodSpec] = {spec.name: spec for spec in _BUILTINS}

#: Options of the engine itself (not of a method), with their defaults; method options may not reuse them.
ENGINE_OPTIONS: dict[str, Any] = {"autocast": True, "on_error": "raise", "return_info": False}


# ------------------------------------------------------------------------------------------------ lookups


def method_names() -> tuple[str, ...]:
    """Every method name, the built-ins first (DESIGN §3's order) then registered ones in registration order.

    Example:
        >>> method_names()[:3]
        ('cam', 'gradcam', 'gradcam++')
    """
    return tuple(_REGISTRY)


def builtin_names() -> tuple[str, ...]:
    """The built-in method names (DESIGN §3), in a stable order.

    Example:
        >>> len(builtin_names())
        14
    """
    return tuple(spec.name for spec in _BUILTINS)


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``name``; an unknown name is a ``ValueError`` naming the closest known one.

    Example:
        >>> get_method("layercam").fn.__name__
        'layercam'
    """
    spec = _REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown method {name!r}{hint}; known methods: {', '.join(_REGISTRY)}")
    return spec


def is_signed(name: str) -> bool:
    """Whether ``name``'s maps are signed (metrics and pictures then use ``|M|``); unknown names are unsigned.

    Example:
        >>> is_signed("input_x_gradient"), is_signed("gradcam")
        (True, False)
    """
    spec = _REGISTRY.get(name)
    return bool(spec and spec.signed)


def needs_layer(name: str) -> bool:
    """Whether ``name`` uses the target layer.

    Example:
        >>> needs_layer("guided_gradcam"), needs_layer("gradient")
        (True, False)
    """
    return get_method(name).needs_layer


def all_options() -> dict[str, Any]:
    """Every option :func:`attribute` accepts, with its default: each method's, then the engine's own.

    Example:
        >>> all_options()["occlusion_patch"], all_options()["on_error"]
        (8, 'raise')
    """
    out: dict[str, Any] = {}
    for spec in _REGISTRY.values():
        out.update(spec.options)
    out.update(ENGINE_OPTIONS)
    return out


def option_owner(option: str) -> str | None:
    """The method (or ``"attribute"`` for the engine's own options) that reads ``option``, else ``None``.

    Example:
        >>> option_owner("ig_steps"), option_owner("return_info"), option_owner("nope")
        ('integrated_gradients', 'attribute', None)
    """
    if option in ENGINE_OPTIONS:
        return "attribute"
    return next((s.name for s in _REGISTRY.values() if option in s.options), None)


class _SignedNames:
    """The signed method names, read from the registry at each use (registered methods included).

    Example:
        >>> "integrated_gradients" in SIGNED_METHODS, "gradcam" in SIGNED_METHODS
        (True, False)
    """

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and is_signed(name)

    def __iter__(self) -> Iterator[str]:
        return iter([name for name, spec in _REGISTRY.items() if spec.signed])

    def __len__(self) -> int:
        return len(list(iter(self)))

    def __repr__(self) -> str:
        return repr(tuple(self))


#: ``name in SIGNED_METHODS``: whether its maps are signed (metrics and pictures use ``|M|``); a live view.
SIGNED_METHODS = _SignedNames()


# ------------------------------------------------------------------------------------------------ extension


def register_method(name: str, fn: Callable[..., Tensor], *, needs_layer: bool = False, signed: bool = False,
                    options: Mapping[str, Any] | None = None) -> MethodSpec:
    """Register a method that runs a pass of its own; it is then accepted by name wherever a built-in is.

    ``fn(model, inputs, targets, **options) -> Tensor [N, H, W]``: ``inputs`` a detached copy ``[N, C, H, W]``,
    ``targets`` ``[N]`` long (the explained classes: the predictions when the caller passed none; a
    ``contrast=`` class is not passed on), ``options`` this method's options (defaults overridden by the
    caller's keyword arguments to :func:`attribute`). With ``needs_layer=True`` it also gets ``layer=``, the
    resolved :class:`~lightning_saliency.layers.TargetLayer` (``.name``, ``.module``, ``.reshape``). It runs in
    the engine's side-effect guard, with gradients on and the model in eval mode (both re-set after it returns,
    should it change them); training flags, ``requires_grad``, ``.grad`` and the random states are restored when
    :func:`attribute` returns. Forward hooks it adds itself it must remove itself; use ``torch.autograd.grad``
    rather than ``.backward()``.

    Args:
        name: a new method name; a built-in or already registered name is a ``ValueError``.
        fn: the function above.
        needs_layer: pass the resolved target layer as ``layer=``.
        signed: its maps are signed (metrics and pictures take ``|M|``).
        options: option names with defaults; each name must be new (not another method's or the engine's):
            prefix them with the method name, e.g. ``{"mymethod_steps": 8}``.

    Returns:
        the registered :class:`MethodSpec`.

    Example:
        >>> import torch
        >>> def ones(model, inputs, targets, ones_scale=1.0):
        ...     return torch.full((inputs.shape[0], *inputs.shape[2:]), ones_scale)
        >>> spec = register_method("ones", ones, options={"ones_scale": 2.0})
        >>> "ones" in method_names(), all_options()["ones_scale"]
        (True, 2.0)
        >>> unregister_method("ones")
    """
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"a method name must be a non-empty string without '/', got {name!r}")
    if not callable(fn):
        raise ValueError(f"fn must be callable fn(model, inputs, targets, **options), got {type(fn).__name__}")
    opts = dict(options or {})
    return add_method(MethodSpec(name, "own", fn, needs_layer=bool(needs_layer), signed=bool(signed), options=opts))


def add_method(spec: MethodSpec) -> MethodSpec:
    """Add a row of any kind, e.g. a new CAM variant: ``add_method(MethodSpec("mycam", "cam", formula,
    needs_layer=True))`` with ``formula(A, G) -> [n, h, w]`` (see the module docstring for each ``rides``).

    A taken name or an option name another method (or the engine) already uses is a ``ValueError``; remove the
    row with :func:`unregister_method`.

    Example:
        >>> spec = add_method(MethodSpec("absgradcam", "cam", lambda A, G: (A * G.abs()).sum(1), needs_layer=True))
        >>> needs_layer("absgradcam")
        True
        >>> unregister_method("absgradcam")
    """
    if spec.name in _REGISTRY:
        kind = "a built-in method" if _REGISTRY[spec.name].builtin else "already registered"
        raise ValueError(f"method {spec.name!r} is {kind}: choose another name"
                         + ("" if _REGISTRY[spec.name].builtin else " or unregister_method() it first"))
    for key in spec.options:
        owner = option_owner(key)
        if not isinstance(key, str) or owner is not None or key in ("layer", "model", "inputs", "targets"):
            whose = f"{owner!r}'s" if owner else "a reserved"
            raise ValueError(f"option {key!r} of method {spec.name!r} clashes with {whose} option: option names "
                             f"are shared by all methods, so prefix it, e.g. {spec.name}_{key}")
    for part in spec.parts:
        get_method(part)
    _REGISTRY[spec.name] = spec
    return spec


def unregister_method(name: str) -> None:
    """Remove a method added by :func:`register_method` (built-ins cannot be removed).

    Example:
        >>> unregister_method("gradcam")
        Traceback (most recent call last):
        ...
        ValueError: 'gradcam' is a built-in method and cannot be unregistered
    """
    spec = get_method(name)
    if spec.builtin:
        raise ValueError(f"{name!r} is a built-in method and cannot be unregistered")
    del _REGISTRY[name]


@contextlib.contextmanager
def registered(name: str, fn: Callable[..., Tensor], **kwargs: Any) -> Iterator[MethodSpec]:
    """:func:`register_method` for the duration of a ``with`` block (tests, notebooks).

    Example:
        >>> import torch
        >>> with registered("zeros", lambda model, inputs, targets: torch.zeros(inputs.shape[0], 2, 2)):
        ...     "zeros" in method_names()
        True
        >>> "zeros" in method_names()
        False
    """
    spec = register_method(name, fn, **kwargs)
    try:
        yield spec
    finally:
        _REGISTRY.pop(name, None)

