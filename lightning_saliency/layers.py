"""Target-layer resolution: which activation the CAM-family methods explain, and how to view it as a grid.

:func:`resolve_layer` turns what the user wrote (``layer="auto"``, a dotted name such as ``"layer4"`` or
``"features[-1]"``, or the module itself) into a :class:`TargetLayer`: the module, its dotted name, and a
``reshape`` that maps the module's raw output to ``[N, K, h, w]`` (``None`` when it already is).

``layer="auto"`` runs one forward pass on ``example_input`` (or on a dummy image when the input channels and
size can be read off the model) with a forward hook on every module, in eval mode, recording autograd (to tell
which layers the explained output depends on; no backward runs, no ``.grad`` is touched), and restores the
training flags, the hooks and the RNG states afterwards. It then picks:

* CNNs: the last block whose output still has spatial extent (``h, w > 1``), preferring whole blocks over
  single layers, e.g. ``layer4`` of a ResNet, ``features`` of DenseNet, MobileNet, EfficientNet and ConvNeXt.
  Trailing element-wise layers (BatchNorm, activations, dropout) after a bare convolution are included.
  Only layers that the explained output depends on count (an auxiliary head of a torchvision segmentation model
  does not), and a map of class scores with no parametrised layer after it (the last convolution of a
  segmentation head, SqueezeNet's convolutional classifier) is the output itself, not evidence for it: the
  layer that feeds it is taken instead (``classifier.3`` of torchvision's FCN and DeepLabV3 heads).
* Channels-last stages (Swin: ``[N, h, w, D]``): the stage container, with a reshape that permutes to
  ``[N, D, h, w]``.
* ViTs whose patch tokens ``[N, P + h*w, D]`` come after the last spatial map: the *first norm of the last
  block* (``encoder.layers.encoder_layer_11.ln_1`` in torchvision, ``blocks.11.norm1`` in timm), because after
  the last block only the class token reaches the head and the patch tokens' gradients are zero there. The
  grid size comes from the token count (the patch embedding's grid when seen, else a perfect square), never
  from a hard-coded 14.

Pass ``example_input`` (one or two real probe images) whenever you can: the spatial sizes, hence the choice,
depend on the input size.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .layer_trace import _dummy_input, _ForwardFailed, _Rec, _run_hooked
from .tasks import output_adapter
from .tokens import _MAX_PREFIX_TOKENS, TokenReshape, _split_tokens, vit_reshape

__all__ = ["TargetLayer", "TokenReshape", "resolve_layer", "vit_reshape"]

# Leaf layers that only act element-wise: a "last conv block" that is a bare convolution extends through them.
_ELEMENTWISE = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
)


@dataclass
class TargetLayer:
    """The layer whose activations the CAM-family methods explain.

    Attributes:
        name: dotted name in ``model.named_modules()``.
        module: the module itself (hook its forward output).
        reshape: maps the module's raw output to ``[N, K, h, w]``; ``None`` when the output already is.

    Example:
        >>> import torch
        >>> t = TargetLayer("conv", torch.nn.Conv2d(3, 4, 3), None)
        >>> t.name
        'conv'
    """

    name: str
    module: nn.Module
    reshape: Callable[[Tensor], Tensor] | None = None


# --------------------------------------------------------------------------------------------- reshapes


class _LazyReshape:
    """Used when no forward pass could be run to see the layer's output: 4-D passes through (assumed
    channels-first unless it is clearly channels-last), 3-D tokens go through :func:`vit_reshape`."""

    def __call__(self, out: Tensor) -> Tensor:
        if out.ndim == 4:
            _, a, b, c = out.shape
            if a == b and c != b and c > a:  # [N, h, w, D] with a square grid
                return out.permute(0, 3, 1, 2)
            return out
        return vit_reshape(out)

    def __repr__(self) -> str:
        return "_LazyReshape()"


# --------------------------------------------------------------------------------------------- names


def _get_by_path(model: nn.Module, path: str) -> nn.Module | None:
    """Follow ``a.b[2].c`` / ``a.b.-1`` style paths; None when any step is missing."""
    tokens = [t for t in re.split(r"\.|\[|\]", path) if t != ""]
    mod: Any = model
    for tok in tokens:
        if re.fullmatch(r"-?\d+", tok) and isinstance(mod, (nn.Sequential, nn.ModuleList)):
            idx = int(tok)
            if not -len(mod) <= idx < len(mod):
                return None
            mod = mod[idx]
        elif tok in getattr(mod, "_modules", {}):
            mod = mod._modules[tok]
        else:
            return None
        if not isinstance(mod, nn.Module):
            return None
    return mod


def _find_by_name(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return name, modules[name]
    found = _get_by_path(model, name)
    if found is not None and found is not model:
        return _name_of(model, found), found
    suffix = [n for n in modules if n.endswith("." + name)]
    if len(suffix) == 1:  # e.g. "layer4" on a LightningModule that holds the network as self.net
        return suffix[0], modules[suffix[0]]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    if suffix:
        hint = f"it matches several modules: {suffix[:5]}; pass the full dotted name"
    elif close:
        hint = f"did you mean one of {close}?"
    else:
        top = [n for n in names if "." not in n][:12]
        hint = f"top-level modules are {top}; list all with [n for n, _ in model.named_modules()]"
    raise ValueError(f"layer {name!r} not found in {type(model).__name__}: {hint}")


def _name_of(model: nn.Module, module: nn.Module) -> str:
    for n, m in model.named_modules():
        if m is module:
            return n
    raise ValueError(
        f"the layer module {type(module).__name__} is not a submodule of {type(model).__name__}; pass a module "
        "taken from this model (e.g. model.layer4) or its dotted name"
    )


# --------------------------------------------------------------------------------------------- choosing


def _input_hw(x: Any) -> tuple[int, int] | None:
    if isinstance(x, (tuple, list)) and x:
        x = x[0]
    if isinstance(x, Tensor) and x.ndim >= 3:
        return int(x.shape[-2]), int(x.shape[-1])
    return None


def _batch(x: Any) -> int | None:
    if isinstance(x, (tuple, list)) and x:
        x = x[0]
    return int(x.shape[0]) if isinstance(x, Tensor) and x.ndim >= 1 else None


def _aspect_err(h: int, w: int, hw: tuple[int, int] | None) -> float:
    if hw is None:
        return 0.0
    return abs(math.log(h / w) - math.log(hw[0] / hw[1]))


def _spatial_layout(rec: _Rec, batch: int | None, hw: tuple[int, int] | None) -> str | None:
    """'nchw', 'nhwc' or None for a 4-D output with an h x w > 1 grid (both h, w > 1, at most the input's)."""
    s = rec.shape
    if len(s) != 4 or (batch is not None and s[0] != batch):
        return None
    H, W = hw if hw is not None else (10**9, 10**9)
    nchw = 1 < s[2] <= H and 1 < s[3] <= W
    nhwc = 1 < s[1] <= H and 1 < s[2] <= W
    if nchw and nhwc:
        m = rec.module
        if isinstance(m, nn.LayerNorm) or (isinstance(m, nn.Linear) and m.out_features == s[3]):
            return "nhwc"
        e1, e2 = _aspect_err(s[2], s[3], hw), _aspect_err(s[1], s[2], hw)
        return "nhwc" if e2 + 1e-9 < e1 else "nchw"
    return "nchw" if nchw else "nhwc" if nhwc else None


def _token_grid(rec: _Rec, batch: int | None) -> bool:
    s = rec.shape
    if len(s) != 3 or (batch is not None and s[0] != batch) or s[1] < 4:
        return False
    try:
        _split_tokens(s[1], None, None)
    except ValueError:
        return False
    return True


def _significant(module: nn.Module) -> bool:
    """A convolution, or a block: a container that holds parameters (conv stages, transformer blocks)."""
    if any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules()):
        return True
    has_children = next(module.children(), None) is not None
    return has_children and next(module.parameters(), None) is not None


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def _parent_name(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _no_layer_error(model: nn.Module, detail: str) -> ValueError:
    return ValueError(
        f'layer="auto" could not find a target layer in {type(model).__name__}: {detail}. Pass layer= with the '
        'dotted name of a module whose output is [N, C, h, w] with h, w > 1 (e.g. layer="layer4"; see '
        "[n for n, _ in model.named_modules()]), and, if that output is not channels-first, reshape= with a "
        "callable that maps it to [N, C, h, w] (lightning_saliency.layers.vit_reshape handles ViT tokens "
        "[N, 1+h*w, D] and channels-last [N, h, w, D]). If the probe images are so small that every late layer "
        "is 1x1, use larger images or an earlier layer."
    )


def _class_map(rec: _Rec, layout: str, out_shape: tuple[int, ...] | None, recs: list[_Rec]) -> bool:
    """A spatial map of the explained output's class scores: as many channels as the output has classes and no
    layer with parameters of its own running after it (other than the blocks holding it)."""
    if out_shape is None or len(out_shape) < 2:
        return False
    if rec.shape[1 if layout == "nchw" else 3] != out_shape[1]:
        return False
    return not any(
        r.order > rec.order
        and next(r.module.parameters(recurse=False), None) is not None
        and not rec.name.startswith(r.name + ".")
        for r in recs
    )


def _auto(model: nn.Module, x: Any, output: Any) -> TargetLayer:
    recs, out_shape = _run_hooked(model, x, output=output)
    batch, hw = _batch(x), _input_hw(x)
    on_path = [r for r in recs if r.on_path]
    if any(_spatial_layout(r, batch, hw) is not None for r in on_path):
        recs = on_path  # else (a detached backbone, say) keep them all: the maps' health will tell
    spatial = [(r, lay) for r in recs if (lay := _spatial_layout(r, batch, hw)) is not None]
    spatial = [(r, lay) for r, lay in spatial if not _class_map(r, lay, out_shape, recs)] or spatial
    once = [(r, lay) for r, lay in spatial if r.calls == 1] or spatial
    if not once:
        if any(len(r.shape) == 3 and r.shape[0] == batch for r in recs):
            raise _no_layer_error(
                model,
                "its outputs are 3-D but no token count leaves a square grid after up to "
                f"{_MAX_PREFIX_TOKENS} prefix tokens",
            )
        raise _no_layer_error(model, "no module produced a 4-D output with spatial extent (h, w > 1)")
    sig = [(r, lay) for r, lay in once if _significant(r.module)]
    last, layout = (sig or once)[-1]

    # ViT: patch tokens flow through blocks after the last spatial map -> last block's first norm.
    tokens = [r for r in recs if r.order > last.order and _token_grid(r, batch)]
    blocks = [r for r in tokens if r.calls == 1 and _significant(r.module)]
    if blocks:
        return _vit_choice(model, recs, last, layout, blocks, tokens, hw)

    if layout == "nchw" and next(last.module.children(), None) is None:
        # a bare conv: extend through the element-wise layers that directly follow it (bn, relu, ...)
        for r in recs:
            if r.order <= last.order:
                continue
            if isinstance(r.module, _ELEMENTWISE) and r.shape == last.shape and r.calls == 1:
                last = r
            else:
                break
    return TargetLayer(last.name, last.module, vit_reshape if layout == "nhwc" else None)


def _vit_choice(
    model: nn.Module,
    recs: list[_Rec],
    grid_rec: _Rec,
    layout: str,
    blocks: list[_Rec],
    tokens: list[_Rec],
    hw: tuple[int, int] | None,
) -> TargetLayer:
    modules = dict(model.named_modules())

    def repeated(r: _Rec) -> bool:
        parent = modules.get(_parent_name(r.name))
        if not isinstance(parent, (nn.Sequential, nn.ModuleList)):
            return False
        return sum(type(c) is type(r.module) for c in parent.children()) >= 2

    stacked = [r for r in blocks if repeated(r)] or blocks
    block = stacked[-1]
    num_tokens = block.shape[1]
    # the patch grid seen before the tokens fixes the prefix count; otherwise search for a square
    s = grid_rec.shape
    gh, gw = (s[2], s[3]) if layout == "nchw" else (s[1], s[2])
    prefix: int | None = num_tokens - gh * gw
    aspect: float | None = gh / gw
    if not 0 <= prefix <= _MAX_PREFIX_TOKENS:
        prefix, aspect = None, None
    elif aspect == 1.0:
        aspect = None
    reshape = TokenReshape(prefix=prefix, aspect=aspect)
    inner = [
        r
        for r in tokens
        if r.name.startswith(block.name + ".")
        and _is_norm(r.module)
        and r.shape[1] == num_tokens
        and r.calls == 1
    ]
    if inner:
        norm = inner[0]
        return TargetLayer(norm.name, norm.module, reshape)
    earlier = [r for r in stacked if r.order < block.order and r.shape[1] == num_tokens]
    if earlier:  # no norm inside the last block: its input, i.e. the previous block's output
        return TargetLayer(earlier[-1].name, earlier[-1].module, reshape)
    raise _no_layer_error(
        model,
        f"found transformer tokens but no norm inside the last block {block.name!r} and no earlier block",
    )


def _reshape_for(model: nn.Module, module: nn.Module, name: str, x: Any) -> Callable[[Tensor], Tensor] | None:
    recs, _ = _run_hooked(model, x, only=module)
    if not recs:
        raise ValueError(
            f"layer {name!r} did not run during the forward pass of {type(model).__name__}; pick a module that "
            "the forward pass uses"
        )
    rec = recs[0]
    batch, hw = _batch(x), _input_hw(x)
    layout = _spatial_layout(rec, batch, hw)
    if layout == "nchw" or (len(rec.shape) == 4 and layout is None):
        return None  # 4-D channels-first (possibly 1x1: the engine's maps will be flat, which is the truth)
    if layout == "nhwc":
        return vit_reshape
    if len(rec.shape) == 3:
        aspect = None if hw is None or hw[0] == hw[1] else hw[0] / hw[1]
        try:
            prefix, _, _ = _split_tokens(rec.shape[1], None, aspect)
        except ValueError as err:
            raise ValueError(f"layer {name!r} outputs {rec.shape}: {err}") from None
        return TokenReshape(prefix=prefix, aspect=aspect)
    raise ValueError(
        f"layer {name!r} outputs {rec.shape or 'a non-tensor'}, which is not [N, C, h, w]; pass reshape= with a "
        "callable that maps it to [N, C, h, w], or choose another layer"
    )


# --------------------------------------------------------------------------------------------- public


def resolve_layer(
    model: nn.Module,
    layer: str | nn.Module = "auto",
    reshape: Callable[[Tensor], Tensor] | None = None,
    example_input: Tensor | None = None,
    output: Any = None,
) -> TargetLayer:
    """Resolve ``layer`` (``"auto"``, a dotted name or a module of ``model``) to a :class:`TargetLayer`.

    Args:
        model: the network (a LightningModule works: names are looked up by unique suffix too).
        layer: ``"auto"``; a dotted name (``"layer4"``, ``"features.7"``, ``"features[-1]"``); or a module.
        reshape: maps the layer's output to ``[N, C, h, w]``; found automatically when ``None``.
        example_input: a small batch (1-2 probe images) used for one hooked forward pass that shows each
            module's output shape. Without it, a dummy zero image is built from the first ``Conv2d``'s input
            channels and the model's ``image_size`` (default 224).
        output: which tensor of the model's output the maps explain, as ``output=`` of
            :func:`~lightning_saliency.attribute` (``None``: a tensor, a tuple's first element, a dict's
            ``"logits"`` else ``"out"``, ``.logits``); ``"auto"`` only considers layers that tensor depends on.

    Raises:
        ValueError: unknown name (with the closest names), a module not in ``model``, or nothing suitable
            found by ``"auto"`` (with how to pass ``layer=`` and ``reshape=``).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
        ...                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2))
        >>> t = resolve_layer(net, "auto", example_input=torch.zeros(1, 3, 16, 16))
        >>> t.name, t.reshape
        ('1', None)
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(layer, str) and layer == "auto":
        x = example_input if example_input is not None else _dummy_input(model)
        try:
            target = _auto(model, x, output_adapter(output))
        except _ForwardFailed as failed:
            raise _forward_error(model, x, failed, "auto") from failed.__cause__
        if reshape is not None:
            target.reshape = reshape
        return target

    if isinstance(layer, nn.Module):
        name, module = _name_of(model, layer), layer
        if module is model:
            raise ValueError(
                "layer must be a submodule of the model, not the model itself; e.g. layer=model.layer4"
            )
    elif isinstance(layer, str):
        name, module = _find_by_name(model, layer)
    else:
        raise ValueError(
            f'layer must be "auto", a dotted module name or an nn.Module, got {type(layer).__name__}'
        )

    if reshape is not None:
        if example_input is not None:
            try:
                recs, _ = _run_hooked(model, example_input, only=module)
            except _ForwardFailed as failed:
                raise _forward_error(model, example_input, failed, name) from failed.__cause__
            if recs and len(recs[0].shape) > 0:
                return _checked(TargetLayer(name, module, reshape), recs[0])
        return TargetLayer(name, module, reshape)
    x = example_input
    if x is None:
        try:
            x = _dummy_input(model)
        except ValueError:
            return TargetLayer(name, module, _LazyReshape())
        try:
            return TargetLayer(name, module, _reshape_for(model, module, name, x))
        except _ForwardFailed:  # the dummy input does not suit this model: decide per call instead
            return TargetLayer(name, module, _LazyReshape())
    try:
        return TargetLayer(name, module, _reshape_for(model, module, name, x))
    except _ForwardFailed as failed:
        raise _forward_error(model, x, failed, name) from failed.__cause__


def _forward_error(model: nn.Module, x: Any, failed: _ForwardFailed, layer: str) -> ValueError:
    err = failed.__cause__ or failed
    shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
    return ValueError(
        f"resolving layer {layer!r} needs one forward pass of {type(model).__name__}, which failed on an input of "
        f"shape {shape} ({type(err).__name__}: {err}); pass example_input= (1-2 real inputs the model accepts)"
    )


def _checked(target: TargetLayer, rec: _Rec) -> TargetLayer:
    """Check a user's reshape on a tensor of the layer's output shape."""
    probe = torch.zeros(rec.shape)
    try:
        out = target.reshape(probe)  # type: ignore[misc]
    except Exception as err:
        raise ValueError(
            f"reshape= failed on layer {target.name!r}'s output of shape {rec.shape}: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(out, Tensor) or out.ndim != 4 or out.shape[0] != rec.shape[0]:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"reshape= must map layer {target.name!r}'s output {rec.shape} to [N, C, h, w]; it returned {got}"
        )
    return target
