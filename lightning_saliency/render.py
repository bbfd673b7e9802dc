"""Pixels for humans: colormaps, heatmap overlays, captioned grids and PNG files.

This is the only module that turns maps into pictures. Everything it returns is a ``uint8`` array of shape
``[H, W, 3]`` (RGB, "HWC"), which every logger accepts as is (TensorBoard with ``dataformats="HWC"``,
``wandb.Image``, Pillow).

- :func:`to_image` turns an input image (a ``[C, H, W]`` tensor, 1 or 3 channels) into displayable pixels:
  min-max scaled, or in its true colours with ``denormalize=(mean, std)`` (the ``Normalize`` the model's inputs
  went through, undone: ``x * std + mean`` per channel, clipped to ``[0, 1]``; :func:`check_denormalize`).
- :func:`colorize` maps a saliency map in ``[0, 1]`` through a matplotlib colormap (``"jet"``, ``"viridis"``,
  or any other name ``matplotlib.colormaps`` knows).
- :func:`overlay` alpha-blends a colorized map over an image; :func:`overlays` does a batch at once.
- :func:`outline` draws a rectangle's border on an image (a suspected shortcut's region).
- :func:`grid` lays tiles out in rows with a caption under each tile (Pillow's default font).
- :func:`save_png` writes an array to a PNG file atomically.

Example:
    >>> import torch
    >>> img = to_image(torch.rand(3, 32, 32))
    >>> heat = overlay(img, torch.rand(32, 32).numpy(), alpha=0.5)
    >>> grid([heat, heat, heat], captions=["cat / cat", "dog / cat", "cat / dog"]).dtype
    dtype('uint8')
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .files import atomic_write

__all__ = ["to_image", "colorize", "overlay", "overlays", "outline", "outline_mask", "grid", "save_png", "get_cmap",
           "Picture", "check_denormalize"]

ArrayLike = Any  # np.ndarray | Tensor
Denormalize = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std), one value per channel or one for all


def _is_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor, without importing torch: no tensor exists before torch is imported, and
    the HTML page and the report reader, which only see NumPy arrays and JSON, never import it."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if _is_tensor(x):
        torch = sys.modules["torch"]
        return x.detach().to("cpu", torch.float32 if x.is_floating_point() else x.dtype).numpy()
    return np.asarray(x)


@lru_cache(maxsize=16)
def get_cmap(name: str = "jet") -> Any:
    """The matplotlib colormap called ``name`` (``"jet"``, ``"viridis"``, ...), imported on first use.

    Example:
        >>> get_cmap("viridis").name
        'viridis'
    """
    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        known = ", ".join(sorted(n for n in matplotlib.colormaps if not n.endswith("_r"))[:20])
        raise ValueError(f"unknown colormap {name!r}: use 'jet', 'viridis' or another matplotlib "
                         f"colormap name (e.g. {known}, ...)") from None


def _values(value: Any, what: str) -> tuple[float, ...]:
    if _is_tensor(value) or isinstance(value, np.ndarray):
        value = _to_numpy(value).reshape(-1).tolist()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"denormalize: the {what} must be a number or a sequence of numbers (one per channel), "
                         f"got {value!r}") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise ValueError(f"denormalize: the {what} must be finite numbers, one per channel (or one for all), "
                         f"got {list(out)}")
    return out


def check_denormalize(value: Any, channels: int | None = None) -> Denormalize | None:
    """Check a ``denormalize`` setting and return it as ``(mean, std)`` tuples of floats, or ``None``.

    ``value`` is ``None``, a pair ``(mean, std)`` (the arguments of the ``torchvision.transforms.Normalize`` the
    inputs went through: numbers, sequences, arrays or tensors) or a dict with ``"mean"`` and ``"std"`` keys (as
    a report's ``config["denormalize"]`` holds it). Each must have one value per channel or one for all
    (``channels``, when given, is checked) and every std must be > 0; anything else is a ``ValueError`` that
    says what to pass.

    Example:
        >>> check_denormalize(([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), channels=3)[1]
        (0.229, 0.224, 0.225)
        >>> check_denormalize({"mean": 0.5, "std": 0.5})
        ((0.5,), (0.5,))
    """
    if value is None:
        return None
    if isinstance(value, dict):
        if "mean" not in value or "std" not in value:
            raise ValueError(f"denormalize as a dict needs the keys 'mean' and 'std', got {sorted(value)}")
        value = (value["mean"], value["std"])
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"denormalize must be a pair (mean, std), the arguments of the Normalize the inputs went "
                         f"through, e.g. ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)); got {value!r}")
    mean, std = _values(value[0], "mean"), _values(value[1], "std")
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != 1 and channels is not None and len(values) != channels:
            raise ValueError(f"denormalize: the {name} has {len(values)} values but the images have {channels} "
                             f"channel(s): give one value per channel, or one for all")
    if len(mean) != 1 and len(std) != 1 and len(mean) != len(std):
        raise ValueError(f"denormalize: the mean has {len(mean)} values and the std {len(std)}: give one per "
                         "channel for both (or one for all)")
    if min(std) <= 0:
        raise ValueError(f"denormalize: every std must be > 0, got {list(std)}")
    return mean, std


def to_image(x: ArrayLike, denormalize: Any = None) -> np.ndarray:
    """Make an input image displayable: ``uint8 [H, W, 3]``.

    Accepts a tensor ``[C, H, W]`` (C = 1 or 3), a NumPy array ``[C, H, W]``, ``[H, W, C]`` or ``[H, W]``.
    Float inputs (any range, e.g. normalised with ImageNet statistics) are min-max scaled per image to
    ``0..255`` (a constant image becomes black), which shifts the colours of a normalised image; with
    ``denormalize=(mean, std)`` (:func:`check_denormalize`) they are shown in their true colours instead:
    ``x * std + mean`` per channel, clipped to ``[0, 1]``, times 255. ``uint8`` inputs are taken as pixels
    already. One channel is repeated to three.

    Example:
        >>> import torch
        >>> to_image(torch.zeros(1, 4, 5)).shape
        (4, 5, 3)
        >>> to_image(torch.zeros(3, 1, 1), denormalize=([0.5, 0.2, 1.0], 0.25))[0, 0].tolist()
        [128, 51, 255]
    """
    is_tensor = _is_tensor(x)
    a = _to_numpy(x)
    if a.ndim == 2:
        a = a[:, :, None]
    elif a.ndim == 3:
        if is_tensor or (a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3)):
            a = np.transpose(a, (1, 2, 0))  # CHW -> HWC
    else:
        raise ValueError(f"to_image expects one image [C, H, W] (or [H, W, C] / [H, W] arrays), got shape "
                         f"{tuple(a.shape)}; pass images one at a time, e.g. to_image(batch[i])")
    if a.shape[-1] not in (1, 3):
        raise ValueError(f"to_image supports 1 or 3 channels, got {a.shape[-1]} (shape {tuple(a.shape)}); "
                         f"select the channels to show first, e.g. x[:3]")
    pair = check_denormalize(denormalize, channels=a.shape[-1]) if denormalize is not None else None
    if a.dtype == np.uint8:
        out = a
    elif pair is not None:  # undo the Normalize: true colours
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        a = a * np.asarray(pair[1]) + np.asarray(pair[0])
        out = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min()), float(a.max())
        if hi - lo > 1e-12:
            out = np.round((a - lo) / (hi - lo) * 255.0).astype(np.uint8)
        else:
            out = np.zeros(a.shape, dtype=np.uint8)
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return np.ascontiguousarray(out)


def colorize(m: ArrayLike, cmap: str = "jet") -> np.ndarray:
    """Map a saliency map ``[H, W]`` with values in ``[0, 1]`` through a colormap: ``uint8 [H, W, 3]``.

    Values outside ``[0, 1]`` are clipped and NaN counts as 0; normalise maps first
    (:func:`lightning_saliency.maps.normalize`).

    Example:
        >>> import numpy as np
        >>> colorize(np.ones((2, 2)), "jet")[0, 0].tolist()  # the hot end of jet
        [127, 0, 0]
    """
    a = _to_numpy(m)
    if a.ndim != 2:
        raise ValueError(f"colorize expects one map [H, W], got shape {tuple(a.shape)}")
    a = np.clip(np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    rgba = get_cmap(cmap)(a, bytes=True)
    return np.ascontiguousarray(rgba[..., :3], dtype=np.uint8)


def overlay(image: ArrayLike, m: ArrayLike, alpha: float = 0.5, cmap: str = "jet",
            denormalize: Any = None) -> np.ndarray:
    """Alpha-blend a colorized map over an image: ``(1 - alpha) * image + alpha * colorize(m)``.

    ``image`` is ``uint8 [H, W, 3]`` (anything :func:`to_image` accepts is converted first, with
    ``denormalize``: true colours for a normalised tensor); ``m`` is a map
    ``[h, w]`` in ``[0, 1]``, resized bilinearly to the image's size when it differs. ``alpha=0`` returns the
    image, ``alpha=1`` the colormap.

    Example:
        >>> import numpy as np
        >>> img = np.zeros((8, 8, 3), np.uint8)
        >>> overlay(img, np.zeros((8, 8)), alpha=0.0).max()
        np.uint8(0)
    """
    img = _to_numpy(image)
    if not (img.dtype == np.uint8 and img.ndim == 3 and img.shape[-1] == 3):
        img = to_image(image, denormalize)
    a = _to_numpy(m)
    if a.ndim != 2:
        raise ValueError(f"overlay expects one map [H, W], got shape {tuple(a.shape)}")
    return overlays(img[None], a[None], alpha=alpha, cmap=cmap)[0]


def overlays(images: ArrayLike, maps: ArrayLike, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """:func:`overlay` for a batch, in a few array operations: ``uint8 [N, H, W, 3]``.

    ``images`` is ``uint8 [N, H, W, 3]`` (e.g. stacked :func:`to_image` results); ``maps`` is ``[N, h, w]`` in
    ``[0, 1]``, resized bilinearly to ``H x W`` when it differs. Image ``i`` of the result equals
    ``overlay(images[i], maps[i], alpha, cmap)``.

    Example:
        >>> import numpy as np
        >>> imgs, ms = np.zeros((2, 4, 4, 3), np.uint8), np.random.rand(2, 4, 4)
        >>> bool((overlays(imgs, ms)[1] == overlay(imgs[1], ms[1])).all())
        True
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = _to_numpy(images)
    a = _to_numpy(maps)
    if img.dtype != np.uint8 or img.ndim != 4 or img.shape[-1] != 3:
        raise ValueError(f"overlays expects images uint8 [N, H, W, 3], got {img.dtype} {tuple(img.shape)}; "
                         "stack to_image() results with np.stack")
    if a.ndim != 3 or a.shape[0] != img.shape[0]:
        raise ValueError(f"overlays expects one map [h, w] per image: maps {tuple(a.shape)} for {img.shape[0]} images")
    if a.shape[1:] != img.shape[1:3]:
        import torch

        from .maps import resize

        a = resize(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)), img.shape[1:3]).numpy()
    a = np.clip(np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    heat = get_cmap(cmap)(a, bytes=True)[..., :3]
    out = (1.0 - alpha) * img.astype(np.float32) + alpha * heat.astype(np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


@lru_cache(maxsize=1)
def _font() -> Any:
    from PIL import ImageFont

    return ImageFont.load_default()


def _text_width(font: Any, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(math.ceil(right - left))


@lru_cache(maxsize=4096)  # captions repeat from audit to audit and method to method
def _wrap(font: Any, text: str, width: int, max_lines: int) -> tuple[str, ...]:
    """Split ``text`` into at most ``max_lines`` lines no wider than ``width`` px (words first, then characters)."""
    lines: list[str] = []
    for paragraph in str(text).splitlines() or [""]:
        current = ""
        for word in paragraph.split(" "):
            candidate = word if not current else f"{current} {word}"
            if _text_width(font, candidate) <= width or not current:
                current = candidate
            else:
                lines.append(current)
                current = word
        lines.append(current)
    # hard-cut lines that are still too wide (one long word)
    cut: list[str] = []
    for line in lines:
        while len(line) > 1 and _text_width(font, line) > width:
            lo, hi = 1, len(line) - 1  # the longest prefix that fits (at least one character), by bisection
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if _text_width(font, line[:mid]) <= width:
                    lo = mid
                else:
                    hi = mid - 1
            n = lo
            cut.append(line[:n])
            line = line[n:]
        cut.append(line)
    if len(cut) > max_lines:
        cut = cut[:max_lines]
        last = cut[-1]
        while last and _text_width(font, last + "…") > width:
            last = last[:-1]
        cut[-1] = last + "…"
    return tuple(cut)


@lru_cache(maxsize=1024)  # one caption is drawn once, then pasted under every method's tile, audit after audit
def _caption_block(font: Any, lines: tuple[str, ...], width: int, line_h: int, top: int,
                   background: tuple[int, ...], text_color: tuple[int, ...]) -> np.ndarray:
    """A read-only ``uint8 [len(lines) * line_h + 2, width, 3]`` band with ``lines`` drawn from its top-left."""
    from PIL import Image, ImageDraw

    pil = Image.new("RGB", (width, len(lines) * line_h + 2), tuple(int(v) for v in background))
    draw = ImageDraw.Draw(pil)
    for k, line in enumerate(lines):
        draw.text((1, 1 + k * line_h - top), line, fill=tuple(int(v) for v in text_color), font=font)
    block = np.asarray(pil, dtype=np.uint8).copy()
    block.flags.writeable = False
    return block


def outline(image: ArrayLike, box: Sequence[int], color: tuple[int, int, int] = (255, 0, 255),
            width: int = 1) -> np.ndarray:
    """A copy of ``image`` (``uint8 [H, W, 3]``) with the border of ``box = [top, left, bottom, right]`` (bottom
    and right exclusive, clipped to the image) drawn ``width`` pixels wide, inside the box.

    Example:
        >>> import numpy as np
        >>> out = outline(np.zeros((6, 6, 3), np.uint8), [1, 1, 4, 5])
        >>> (out[..., 0] > 0).astype(int)[1:4].tolist()
        [[0, 1, 1, 1, 1, 0], [0, 1, 0, 0, 1, 0], [0, 1, 1, 1, 1, 0]]
    """
    out = np.array(_to_numpy(image), dtype=np.uint8, copy=True)
    h, w = out.shape[:2]
    top, left = max(0, int(box[0])), max(0, int(box[1]))
    bottom, right = min(h, int(box[2])), min(w, int(box[3]))
    if bottom <= top or right <= left:
        return out
    k = max(1, int(width))
    c = np.asarray(color, dtype=np.uint8)
    out[top:min(bottom, top + k), left:right] = c
    out[max(top, bottom - k):bottom, left:right] = c
    out[top:bottom, left:min(right, left + k)] = c
    out[top:bottom, max(left, right - k):right] = c
    return out


def outline_mask(image: ArrayLike, mask: ArrayLike, color: tuple[int, int, int] = (255, 0, 255),
                 width: int = 1) -> np.ndarray:
    """A copy of ``image`` (``uint8 [H, W, 3]``) with the inner border of a boolean ``mask`` drawn ``width``
    pixels wide: the mask's pixels within ``width`` (4-neighbour steps) of a pixel outside it or of the image's
    edge. A mask of another size is scaled to the image (nearest).

    Example:
        >>> import numpy as np
        >>> m = np.zeros((6, 6), bool); m[1:5, 1:5] = True; m[1, 1] = False
        >>> (outline_mask(np.zeros((6, 6, 3), np.uint8), m)[..., 0] > 0).astype(int)[1:5].tolist()
        [[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 1, 0], [0, 1, 0, 0, 1, 0], [0, 1, 1, 1, 1, 0]]
    """
    out = np.array(_to_numpy(image), dtype=np.uint8, copy=True)
    h, w = out.shape[:2]
    m = np.asarray(_to_numpy(mask)).astype(bool)
    if m.ndim != 2 or m.size == 0:
        return out
    if m.shape != (h, w):
        m = m[(np.arange(h) * m.shape[0]) // h][:, (np.arange(w) * m.shape[1]) // w]
    inner = m.copy()
    for _ in range(max(1, int(width))):  # erode: a pixel stays when its 4 neighbours are in the mask
        p = np.pad(inner, 1, constant_values=False)
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    out[m & ~inner] = np.asarray(color, dtype=np.uint8)
    return out


def grid(images: Sequence[ArrayLike], captions: Sequence[str] | None = None, ncols: int | None = None,
         pad: int = 2, max_caption_lines: int = 3, background: tuple[int, int, int] = (0, 0, 0),
         text_color: tuple[int, int, int] = (255, 255, 255), denormalize: Any = None) -> np.ndarray:
    """Lay images out in a grid, with a caption under each tile: ``uint8 [H, W, 3]``.

    Tiles that are not ``uint8 [H, W, 3]`` already go through :func:`to_image` (with ``denormalize``).

    Shape arithmetic: with ``n`` tiles, ``ncols`` (default ``ceil(sqrt(n))``, at most ``n``) and
    ``nrows = ceil(n / ncols)``; a cell is the largest tile's ``h x w`` plus, when captions are given, a band of
    ``caption_h`` pixels (the wrapped captions' line height times the most lines any caption needs, at most
    ``max_caption_lines``, plus 2). The result is ``nrows * (h + caption_h) + (nrows + 1) * pad`` high and
    ``ncols * w + (ncols + 1) * pad`` wide; padding and empty cells are ``background``. Captions are drawn with
    Pillow's default font, wrapped to the tile width.

    Example:
        >>> import numpy as np
        >>> tiles = [np.zeros((10, 12, 3), np.uint8)] * 5
        >>> grid(tiles, pad=2).shape  # 3 columns, 2 rows
        (26, 44, 3)
    """
    tiles = []
    for i, im in enumerate(images):
        a = _to_numpy(im)
        if not (a.dtype == np.uint8 and a.ndim == 3 and a.shape[-1] == 3):
            try:
                a = to_image(im, denormalize)
            except ValueError as e:
                raise ValueError(f"grid: tile {i}: {e}") from None
        tiles.append(a)
    n = len(tiles)
    if n == 0:
        raise ValueError("grid needs at least one image")
    if captions is not None and len(captions) != n:
        raise ValueError(f"grid got {n} images but {len(captions)} captions; pass one caption per image "
                         f"(or captions=None)")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if ncols is None:
        ncols = math.ceil(math.sqrt(n))
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    ncols = min(int(ncols), n)
    nrows = math.ceil(n / ncols)
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)

    wrapped: list[tuple[str, ...]] = []
    caption_h = 0
    font = None
    line_h = 0
    if captions is not None:
        font = _font()
        _, top, _, bottom = font.getbbox("Ag|y")
        line_h = int(math.ceil(bottom - top)) + 1
        wrapped = [_wrap(font, c, max(w - 2, 1), max(1, max_caption_lines)) for c in captions]
        caption_h = line_h * max(len(lines) for lines in wrapped) + 2

    cell_h = h + caption_h
    height = nrows * cell_h + (nrows + 1) * pad
    width = ncols * w + (ncols + 1) * pad
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = np.asarray(background, dtype=np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, ncols)
        y = pad + r * (cell_h + pad)
        x = pad + c * (w + pad)
        canvas[y:y + t.shape[0], x:x + t.shape[1]] = t

    if captions is not None:
        _, top, _, _ = font.getbbox("Ag|y")
        for i, lines in enumerate(wrapped):
            r, c = divmod(i, ncols)
            y0 = pad + r * (cell_h + pad) + h
            x0 = pad + c * (w + pad)
            block = _caption_block(font, lines, w, line_h, int(top), tuple(background), tuple(text_color))
            canvas[y0:y0 + block.shape[0], x0:x0 + w] = block
    return canvas


class Picture:
    """An image to log, with its PNG encoding made once however many sinks write it.

    ``colors`` (2..256) makes the PNG a palette image of at most that many colours (Pillow's fast octree
    quantizer, no dithering). The monitor uses 256 for its overlay grids: on the shortcut example's grids the
    mean error is about 2% of the range, which the eye does not see, and the file is less than half the
    full-colour one (TensorBoard's writer checksums every byte in pure Python). ``array`` stays full colour.

    Example:
        >>> import numpy as np
        >>> pic = Picture(np.zeros((4, 6, 3), np.uint8))
        >>> pic.png[:4], pic.png is pic.png
        (b'\\x89PNG', True)
        >>> import io
        >>> from PIL import Image
        >>> noisy = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
        >>> decoded = Image.open(io.BytesIO(Picture(noisy, colors=16).png))
        >>> decoded.mode, len(decoded.getcolors())
        ('P', 16)
    """

    def __init__(self, array: ArrayLike, colors: int | None = None) -> None:
        a = _to_numpy(array)
        if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (1, 3))):
            raise ValueError(f"a picture is a uint8 array [H, W, 3] or [H, W], got {a.dtype} {tuple(a.shape)}; "
                             "convert with to_image() or overlay() first")
        if colors is not None and not 2 <= int(colors) <= 256:
            raise ValueError(f"colors must be between 2 and 256 (a PNG palette), or None for full colour; got {colors}")
        self.array = np.ascontiguousarray(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a)
        self.colors = None if colors is None else int(colors)
        self._png: bytes | None = None

    @property
    def png(self) -> bytes:
        """PNG bytes (zlib level 1: these are dashboards' pictures, written every audit)."""
        if self._png is None:
            import io

            from PIL import Image

            image = Image.fromarray(self.array, "RGB" if self.array.ndim == 3 else "L")
            if self.colors is not None and self.array.ndim == 3:
                image = image.quantize(colors=self.colors, method=Image.Quantize.FASTOCTREE,
                                       dither=Image.Dither.NONE)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", compress_level=1)
            self._png = buffer.getvalue()
        return self._png


def save_png(array: ArrayLike | Picture, path: str | os.PathLike) -> Path:
    """Write a ``uint8 [H, W, 3]`` (or ``[H, W]``) array, or a :class:`Picture`, to ``path`` as PNG, creating
    parent folders.

    The file is written to a temporary name in the same folder and renamed, so a reader never sees half a PNG.

    Example:
        >>> import numpy as np, tempfile, os
        >>> p = save_png(np.zeros((4, 4, 3), np.uint8), os.path.join(tempfile.mkdtemp(), "a.png"))
        >>> p.name
        'a.png'
    """
    pic = array if isinstance(array, Picture) else Picture(array)
    path = Path(path)
    atomic_write(path, lambda f: f.write(pic.png))
    return path
