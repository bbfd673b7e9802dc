"""Saved maps on disk: the probe thumbnails and each audit's maps under ``<log_dir>/saliency/maps/``.

Layout (see :mod:`lightning_saliency.report` for ``report.json`` beside it)::

    maps/probe.npz              probe thumbnails, written once: "images" uint8 [N, h, w, 3], "targets" int64 [N],
                                optional "groups" str [N], "object_masks" / "spurious_masks" bool [N, h, w]
    maps/epoch_XXXX.npz         one array per method, float16 [N, h, w], each map min-max normalised to [0, 1]
                                (a constant map is all 0), plus "predictions" int64 [N] when known and
                                "discovery_masks" bool [K, h, w] when discovery found candidates: the region of
                                the record's k-th discovery candidate, downsampled like the maps
    maps/validate_NNN.npz       the same for the n-th validate audit of the report (test_NNN.npz: test audits)

Size bound: at most ``MAX_IMAGES`` = 64 images, each downsampled (bilinear, antialiased, aspect ratio kept) so
that its longer side is at most ``MAX_SIDE`` = 64 pixels: at most 512 KiB per method and audit (uncompressed
``numpy.savez``), 768 KiB of thumbnails once. Files are written with :func:`lightning_saliency.files.atomic_write`.
torch is imported only by the writers, so reading maps (the HTML page) does not need it.

Bound on the number of files: ``SaliencyMonitor(keep_maps=N)`` (default :data:`KEEP_MAPS` = 20) keeps every
audit's maps up to ``N`` files, then thins them (:func:`thin_maps`): the first and the last audit always keep
theirs, and each new audit past ``N`` takes the file of the audit between two others whose neighbours are
closest (the earliest on ties), so the audits with maps stay nearly evenly spaced over the run (gaps within a
factor of two). A thinned audit's record has ``"maps": null`` and ``"maps_thinned"``, the path its file had; the
report is written before the file is deleted (:func:`remove_maps_file`), so a crash in between leaves an extra
file, never a report pointing at a missing one (the next thinning deletes it). With 3 methods and a probe of 64
or more images the maps folder then holds at most 20 files of 1.5 MiB and the thumbnails, about 31 MiB, however
long the run (``keep_maps=None`` keeps every file: 91 MiB after 60 audits; ``benchmarks/bench_memory.py``).

Every name here is also importable from :mod:`lightning_saliency.report`.

Example:
    >>> import numpy as np, tempfile
    >>> d = tempfile.mkdtemp()
    >>> save_maps(d, 1, {"gradient": np.ones((2, 8, 8))})
    'maps/epoch_0001.npz'
    >>> load_maps(d, 1)["gradient"].shape
    (2, 8, 8)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .files import atomic_write

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["KEEP_MAPS", "MAPS_DIR", "MAX_IMAGES", "MAX_SIDE", "RESERVED_KEYS", "check_keep_maps", "maps_filename",
           "remove_maps_file", "save_probe_thumbnails", "save_maps", "load_maps", "load_probe_thumbnails",
           "thin_maps"]

MAPS_DIR = "maps"
MAX_IMAGES = 64
MAX_SIDE = 64
KEEP_MAPS = 20  # audits whose maps files are kept (SaliencyMonitor(keep_maps=...)); None: every audit's
#: the arrays of a maps file that are not a method's maps (a reader that lists methods skips these)
RESERVED_KEYS = ("predictions", "discovery_masks")


def maps_filename(epoch: int, stage: str = "fit", index: int = 1) -> str:
    """The maps file of an audit, relative to the report's folder: ``maps/epoch_0003.npz`` for a fit audit;
    ``maps/validate_001.npz`` for the ``index``-th validate audit (``test_NNN``: test), whatever its epoch.

    Example:
        >>> maps_filename(3), maps_filename(3, stage="test", index=2)
        ('maps/epoch_0003.npz', 'maps/test_002.npz')
    """
    if stage != "fit":
        if stage not in ("validate", "test") or isinstance(index, bool) or not isinstance(index, int) or index < 1:
            raise ValueError(f"stage must be 'fit', 'validate' or 'test' and index an int >= 1, got {stage!r}, "
                             f"{index!r}")
        return f"{MAPS_DIR}/{stage}_{index:03d}.npz"
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    return f"{MAPS_DIR}/epoch_{epoch:04d}.npz"


def _thumb_size(h: int, w: int, max_side: int) -> tuple[int, int]:
    if max(h, w) <= max_side:
        return h, w
    s = max_side / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def _as_float_cpu(x: Any) -> Tensor:
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float32)
    return torch.as_tensor(np.asarray(x), dtype=torch.float32)


def _downsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, antialiased resize of ``[N, C, H, W]`` (a no-op at the same size)."""
    import torch

    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _savez(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    # uncompressed: float16 maps shrink by only ~20% under zlib, which costs ~10 ms per audit on a small CPU
    atomic_write(path, lambda f: np.savez(f, **arrays))


def save_probe_thumbnails(dir: str | os.PathLike, probe: Any, max_images: int = MAX_IMAGES,
                          max_side: int = MAX_SIDE, denormalize: Any = None) -> str:
    """Write ``<dir>/maps/probe.npz``: thumbnails of the first ``max_images`` probe images and their labels.

    ``dir`` is the report's folder (``<log_dir>/saliency``); ``probe`` a ProbeSet (``inputs [N, C, H, W]``,
    ``targets [N]``, optional ``groups``, ``object_masks``, ``spurious_masks``). Images are min-max scaled per
    image to uint8 (in true colours with ``denormalize``: :func:`~lightning_saliency.render.to_image`) and downsampled so the longer side is at most ``max_side``. Returns the path relative to
    ``dir`` (``"maps/probe.npz"``).

    Example:
        >>> import torch, tempfile
        >>> from types import SimpleNamespace
        >>> p = SimpleNamespace(inputs=torch.rand(2, 3, 128, 96), targets=torch.tensor([0, 1]), groups=None)
        >>> d = tempfile.mkdtemp()
        >>> save_probe_thumbnails(d, p)
        'maps/probe.npz'
        >>> load_probe_thumbnails(d)["images"].shape
        (2, 64, 48, 3)
    """
    import torch

    from .render import to_image

    inputs = probe.inputs[:max_images]
    if inputs.ndim != 4:
        raise ValueError(f"probe inputs must be [N, C, H, W], got {tuple(inputs.shape)}")
    n, _, h, w = inputs.shape
    size = _thumb_size(h, w, max_side)
    images = np.stack([to_image(_as_float_cpu(x), denormalize) for x in inputs]) if n else np.zeros((0, h, w, 3), np.uint8)
    if size != (h, w) and n:
        t = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        images = _downsample(t, size).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    arrays: dict[str, np.ndarray] = {
        "images": np.ascontiguousarray(images, dtype=np.uint8),
        "targets": np.asarray(_as_float_cpu(probe.targets[:max_images]).numpy(), dtype=np.int64),
    }
    groups = getattr(probe, "groups", None)
    if groups is not None:
        arrays["groups"] = np.asarray([str(g) for g in list(groups)[:max_images]], dtype=str)
    for key in ("object_masks", "spurious_masks"):
        m = getattr(probe, key, None)
        if m is not None:
            mt = _as_float_cpu(m[:max_images])[:, None]
            arrays[key] = (_downsample(mt, size)[:, 0] >= 0.5).numpy()
    rel = f"{MAPS_DIR}/probe.npz"
    _savez(Path(dir) / rel, arrays)
    return rel


def save_maps(dir: str | os.PathLike, epoch: int, maps: Mapping[str, Any], predictions: Any = None,
              max_images: int = MAX_IMAGES, max_side: int = MAX_SIDE, stage: str = "fit", index: int = 1,
              discovery_masks: Any = None) -> str:
    """Write one audit's maps to ``<dir>/maps/epoch_XXXX.npz`` (``stage``, ``index``: :func:`maps_filename`);
    returns the path relative to ``dir``.

    ``maps`` is ``{method: [N, H, W]}`` (tensors or arrays, any device). The first ``max_images`` maps are
    downsampled (longer side <= ``max_side``), min-max normalised per image to [0, 1] and stored as float16;
    ``predictions`` ([N] ints) as int64; ``discovery_masks`` (``[K, H, W]`` bool, the discovery candidates'
    regions) downsampled like the maps (a pixel is in when at least half of it is) as ``"discovery_masks"``. The
    returned string is what an audit record's ``"maps"`` holds.

    Example:
        >>> import torch, tempfile
        >>> d = tempfile.mkdtemp()
        >>> save_maps(d, 3, {"gradcam": torch.rand(100, 224, 224)}, predictions=torch.zeros(100, dtype=torch.long))
        'maps/epoch_0003.npz'
        >>> m = load_maps(d, 3); m["gradcam"].shape, m["predictions"].shape
        ((64, 64, 64), (64,))
    """
    import torch

    from .maps import normalize

    rel = maps_filename(epoch, stage, index)
    if not maps:
        raise ValueError("save_maps got no maps; pass {method: tensor [N, H, W]}")
    arrays: dict[str, np.ndarray] = {}
    n = None
    for method, m in maps.items():
        if method in RESERVED_KEYS:
            raise ValueError(f"{method!r} is reserved in the maps file; rename that method")
        t = _as_float_cpu(m)
        if t.ndim != 3:
            raise ValueError(f"maps[{method!r}] must be [N, H, W], got {tuple(t.shape)}")
        if n is not None and t.shape[0] != n:
            raise ValueError(f"maps[{method!r}] has {t.shape[0]} maps but another method has {n}; "
                             f"pass the same images for every method")
        n = t.shape[0]
        t = torch.nan_to_num(t[:max_images], nan=0.0, posinf=0.0, neginf=0.0)
        size = _thumb_size(t.shape[1], t.shape[2], max_side)
        if len(t):
            t = normalize(_downsample(t[:, None], size)[:, 0])
        else:
            t = t.new_zeros((0, *size))
        arrays[str(method)] = t.clamp(0, 1).numpy().astype(np.float16)
    if predictions is not None:
        pred = np.asarray(_as_float_cpu(predictions).numpy(), dtype=np.int64).reshape(-1)
        if n is not None and len(pred) != n:
            raise ValueError(f"predictions has {len(pred)} entries but the maps have {n}")
        arrays["predictions"] = pred[:max_images]
    if discovery_masks is not None:
        mt = _as_float_cpu(discovery_masks)
        if mt.ndim != 3:
            raise ValueError(f"discovery_masks must be [K, H, W], got {tuple(mt.shape)}")
        size = _thumb_size(mt.shape[1], mt.shape[2], max_side)
        arrays["discovery_masks"] = (_downsample(mt[:, None], size)[:, 0] >= 0.5).numpy() if len(mt) else \
            np.zeros((0, *size), dtype=bool)
    _savez(Path(dir) / rel, arrays)
    return rel


def check_keep_maps(keep_maps: Any) -> int | None:
    """``keep_maps`` if it is an int >= 2 or ``None``, else a ``ValueError`` saying what to pass.

    Example:
        >>> check_keep_maps(20), check_keep_maps(None)
        (20, None)
    """
    if keep_maps is None:
        return None
    if isinstance(keep_maps, bool) or not isinstance(keep_maps, int) or keep_maps < 2:
        raise ValueError(f"keep_maps must be an int >= 2 (the first and the last audit always keep their maps) or "
                         f"None (every audit's maps are kept), got {keep_maps!r}; save_maps=False keeps none")
    return keep_maps


def thin_maps(audits: Sequence[Mapping[str, Any]], keep: int | None) -> list[int]:
    """Positions in ``audits`` of the audits whose maps file goes, so that at most ``keep`` keep theirs.

    One at a time, the audit with maps whose two neighbours with maps are closest (positions in ``audits``;
    the earliest on ties) goes; the first and the last are never chosen. Called after every audit, this keeps the
    audits with maps nearly evenly spaced over the run (module docstring). ``keep=None``: none goes.

    Example:
        >>> audits = [{"maps": f"maps/epoch_{e:04d}.npz"} for e in range(6)]
        >>> thin_maps(audits, 3)
        [1, 3, 4]
        >>> kept = [{"maps": a["maps"] if i in (0, 2, 3, 4) else None} for i, a in enumerate(audits[:5])]
        >>> thin_maps(kept, 3)  # what the audit of epoch 4 left: 0, 2, 3, 4 -> 3 goes (gap 2 vs 3 for 2)
        [3]
    """
    have = [i for i, a in enumerate(audits) if isinstance(a.get("maps"), str) and a.get("maps")]
    gone = []
    while keep is not None and len(have) > max(int(keep), 2):
        j = min(range(1, len(have) - 1), key=lambda j: (have[j + 1] - have[j - 1], j))
        gone.append(have.pop(j))
    return sorted(gone)


def remove_maps_file(dir: str | os.PathLike, rel: Any) -> bool:
    """Delete the maps file ``rel`` (an audit's ``maps`` entry, relative to ``dir``) when it is a ``.npz`` inside
    ``<dir>/maps/``; ``True`` when a file was deleted (a missing one is no error: deleting is idempotent).

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> rel = save_maps(d, 0, {"gradient": np.ones((1, 4, 4))})
        >>> remove_maps_file(d, rel), remove_maps_file(d, rel), remove_maps_file(d, "../report.json")
        (True, False, False)
    """
    if not isinstance(rel, str) or not rel.endswith(".npz") or "\x00" in rel:
        return False
    root = (Path(dir) / MAPS_DIR).resolve()
    path = (Path(dir) / rel).resolve()
    if path.parent != root:
        return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _report_error(message: str) -> Exception:
    from .report import ReportError  # imported here: report.py imports this module

    return ReportError(message)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise _report_error(f"no maps file at {path}: maps are saved under <log_dir>/saliency/{MAPS_DIR}/ by "
                          f"SaliencyMonitor; check the path and the audit's 'maps' entry")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError, EOFError ...
        raise _report_error(f"cannot read maps file {path} ({type(e).__name__}: {e}); it is truncated or not "
                          f"a lightning-saliency maps file") from e


def load_maps(path: str | os.PathLike, epoch: int | None = None) -> dict[str, np.ndarray]:
    """Read an audit's maps: ``load_maps(report_dir, epoch)`` or ``load_maps(path_to_npz)``.

    Returns ``{method: float32 [N, h, w] in [0, 1], "predictions": int64 [N], "discovery_masks": bool [K, h, w]
    (each when saved)}``: the keys other than methods are :data:`RESERVED_KEYS`. Raises
    :class:`lightning_saliency.report.ReportError` for a missing or unreadable file.

    Example:
        >>> import torch, tempfile
        >>> d = tempfile.mkdtemp()
        >>> rel = save_maps(d, 0, {"gradient": torch.rand(2, 8, 8)})
        >>> sorted(load_maps(f"{d}/{rel}"))
        ['gradient']
    """
    p = Path(path) if epoch is None else Path(path) / maps_filename(epoch)
    out = _load_npz(p)
    return {k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in out.items()}


def load_probe_thumbnails(dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read ``<dir>/maps/probe.npz`` written by :func:`save_probe_thumbnails` (``images``, ``targets``, ...)."""
    return _load_npz(Path(dir) / MAPS_DIR / "probe.npz")

