"""The audit record on disk: ``report.json`` (schema ``lightning-saliency/report/v1``) and the saved maps.

Layout, under ``<log_dir>/saliency/``::

    report.json                 the audit report (below), rewritten atomically after every audit
    maps/probe.npz              probe thumbnails, written once: "images" uint8 [N, h, w, 3], "targets" int64 [N],
                                optional "groups" str [N], "object_masks" / "spurious_masks" bool [N, h, w]
    maps/epoch_XXXX.npz         one array per method, float16 [N, h, w], each map min-max normalised to [0, 1]
                                (a constant map is all 0), plus "predictions" int64 [N] when known

Size bound of the saved maps: at most ``MAX_IMAGES`` = 64 images, each downsampled (bilinear, antialiased,
aspect ratio kept) so that its longer side is at most ``MAX_SIDE`` = 64 pixels. One method therefore takes at
most 64 * 64 * 64 * 2 bytes = 512 KiB per audit (files are written uncompressed with ``numpy.savez``);
the probe thumbnails at most 64 * 64 * 64 * 3 bytes = 768 KiB, once.

``report.json``::

    {"schema": "lightning-saliency/report/v1", "created": iso8601, "updated": iso8601,
     "run": {"log_dir", "model", "torch", "lightning", "precision", "world_size"},
     "probe": {"size", "fingerprint", "groups": {name: count} | null, "object_masks", "spurious_masks"},
     "config": {"methods", "layer", "metrics", "every_n_epochs"},
     "audits": [{"epoch", "global_step", "time", "duration_s", "precision",
                 "metrics": {"<method>/<metric>[/<group>]": float | null},
                 "errors": [{"method", "type", "message"}], "maps": "maps/epoch_0003.npz" | null}],
     "alarms": [{"name", "metric", "threshold", "mode", "epoch", "global_step", "value", "action"}]}

Non-finite numbers (NaN, +-inf) anywhere in the report are written as ``null``, so the file is strict JSON.
Writes go through :func:`lightning_saliency.files.atomic_write` (a temporary file in the same folder, flushed
and fsync'ed, then renamed over ``report.json`` with ``os.replace``): a killed run leaves the previous complete
report, never half of one. Audits are keyed by epoch: appending an audit for an epoch already present replaces
it, and :meth:`AuditReport.truncate_after` drops everything after a resumed checkpoint's epoch, so a resumed run
never duplicates an epoch.

Example:
    >>> import tempfile, os
    >>> rep = AuditReport(os.path.join(tempfile.mkdtemp(), "saliency", "report.json"))
    >>> _ = rep.append_audit({"epoch": 0, "global_step": 10, "metrics": {"gradcam/spurious_mass": 0.4}})
    >>> rep.write()
    >>> AuditReport.load(rep.path).latest()["metrics"]
    {'gradcam/spurious_mass': 0.4}
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .files import atomic_write

__all__ = [
    "SCHEMA", "REPORT_NAME", "MAPS_DIR", "MAX_IMAGES", "MAX_SIDE", "ReportError", "AuditReport",
    "error_record", "probe_info", "save_probe_thumbnails", "save_maps", "load_maps", "load_probe_thumbnails",
    "maps_filename",
]

SCHEMA = "lightning-saliency/report/v1"
REPORT_NAME = "report.json"
MAPS_DIR = "maps"
MAX_IMAGES = 64
MAX_SIDE = 64


class ReportError(ValueError):
    """A report or maps file that is missing, unreadable, truncated or of an unknown schema."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _clean(obj: Any, where: str = "report") -> Any:
    """JSON-ready copy: non-finite floats -> None, NumPy/torch scalars -> Python, tuples -> lists."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int) and not isinstance(obj, bool):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Tensor):
        if obj.numel() != 1:
            raise TypeError(f"{where}: expected a number, got a tensor of shape {tuple(obj.shape)}")
        return _clean(obj.detach().cpu().item(), where)
    if isinstance(obj, np.generic):
        return _clean(obj.item(), where)
    if isinstance(obj, np.ndarray) and obj.ndim == 0:
        return _clean(obj.item(), where)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        return {str(k): _clean(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(f"{where}: {type(obj).__name__} is not JSON-serialisable; pass numbers, strings, lists "
                    f"or dicts")


def error_record(exc: BaseException | str, method: str | None = None) -> dict[str, Any]:
    """An entry for an audit's ``"errors"`` list from an exception (or a message).

    Example:
        >>> error_record(ValueError("layer 'fc' vanished"), method="gradcam")
        {'method': 'gradcam', 'type': 'ValueError', 'message': "layer 'fc' vanished"}
    """
    if isinstance(exc, BaseException):
        return {"method": method, "type": type(exc).__name__, "message": str(exc)}
    return {"method": method, "type": "Error", "message": str(exc)}


def probe_info(probe: Any) -> dict[str, Any]:
    """The report's ``"probe"`` header for a :class:`~lightning_saliency.probe.ProbeSet`-like object.

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> p = SimpleNamespace(inputs=torch.zeros(3, 1, 4, 4), fingerprint="ab", groups=["a", "b", "a"],
        ...                     object_masks=None, spurious_masks=None)
        >>> probe_info(p)["groups"]
        {'a': 2, 'b': 1}
    """
    groups = getattr(probe, "groups", None)
    counts: dict[str, int] | None = None
    if groups is not None:
        counts = {}
        for g in groups:
            counts[str(g)] = counts.get(str(g), 0) + 1
        counts = dict(sorted(counts.items()))
    return {
        "size": int(len(probe.inputs)),
        "fingerprint": str(getattr(probe, "fingerprint", "")),
        "groups": counts,
        "object_masks": getattr(probe, "object_masks", None) is not None,
        "spurious_masks": getattr(probe, "spurious_masks", None) is not None,
    }


_AUDIT_DEFAULTS: dict[str, Any] = {"time": None, "duration_s": None, "precision": None, "errors": None,
                                   "maps": None}
_ALARM_KEYS = ("name", "metric", "threshold", "mode", "epoch", "global_step", "value", "action")


class AuditReport:
    """The audit report of one run: a JSON document held in :attr:`data` and written to :attr:`path`.

    Example:
        >>> import tempfile, os
        >>> rep = AuditReport(os.path.join(tempfile.mkdtemp(), "report.json"))
        >>> rep.set_header(config={"methods": ["gradcam"], "layer": "auto", "metrics": [], "every_n_epochs": 1})
        >>> _ = rep.append_audit({"epoch": 0, "global_step": 5, "metrics": {"gradcam/pointing_game": 1.0}})
        >>> _ = rep.append_audit({"epoch": 0, "global_step": 5, "metrics": {"gradcam/pointing_game": 0.5}})
        >>> [a["metrics"]["gradcam/pointing_game"] for a in rep.audits]  # same epoch replaced, not duplicated
        [0.5]
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        now = _now()
        self.data: dict[str, Any] = {
            "schema": SCHEMA, "created": now, "updated": now,
            "run": {}, "probe": {}, "config": {}, "audits": [], "alarms": [],
        }

    # -- reading ------------------------------------------------------------------------------------------
    @property
    def audits(self) -> list[dict[str, Any]]:
        """The audit records, sorted by epoch."""
        return self.data["audits"]

    @property
    def alarms(self) -> list[dict[str, Any]]:
        """The alarm records, in the order they fired."""
        return self.data["alarms"]

    @property
    def directory(self) -> Path:
        """The folder holding ``report.json`` (``<log_dir>/saliency``); saved maps are relative to it."""
        return self.path.parent

    def latest(self) -> dict[str, Any] | None:
        """The last audit record, or ``None`` before the first audit."""
        return self.audits[-1] if self.audits else None

    def epochs(self) -> list[int]:
        """The audited epochs, ascending."""
        return [a["epoch"] for a in self.audits]

    def metric_names(self) -> list[str]:
        """Every metric key that appears in any audit, sorted."""
        return sorted({k for a in self.audits for k in a.get("metrics", {})})

    def history(self, metric: str) -> list[tuple[int, int, float | None]]:
        """``(epoch, global_step, value)`` for ``metric`` in every audit that has it (``None`` = non-finite).

        Example:
            >>> rep = AuditReport("unused.json")
            >>> _ = rep.append_audit({"epoch": 1, "global_step": 4, "metrics": {"g/m": float("nan")}})
            >>> rep.history("g/m")
            [(1, 4, None)]
        """
        return [(a["epoch"], a["global_step"], a["metrics"][metric]) for a in self.audits
                if metric in a.get("metrics", {})]

    # -- editing ------------------------------------------------------------------------------------------
    def set_header(self, run: Mapping[str, Any] | None = None, probe: Mapping[str, Any] | None = None,
                   config: Mapping[str, Any] | None = None) -> None:
        """Set the ``run``, ``probe`` and/or ``config`` sections (each replaced as a whole when given).

        ``probe`` may be a ProbeSet, which is summarised with :func:`probe_info`.
        """
        if run is not None:
            self.data["run"] = _clean(dict(run), "run")
        if probe is not None:
            if not isinstance(probe, Mapping):
                probe = probe_info(probe)
            self.data["probe"] = _clean(dict(probe), "probe")
        if config is not None:
            self.data["config"] = _clean(dict(config), "config")

    def append_audit(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Add one audit record; an audit for an epoch already present replaces it. Returns the stored record.

        Required keys: ``epoch`` (int), ``global_step`` (int), ``metrics`` (``{key: number}``). Optional:
        ``time`` (default now), ``duration_s``, ``precision``, ``errors`` (list of :func:`error_record` dicts or
        exceptions), ``maps`` (path relative to the report's folder). Non-finite values become ``None``.
        """
        rec = dict(record)
        missing = [k for k in ("epoch", "global_step", "metrics") if k not in rec]
        if missing:
            raise ValueError(f"audit record lacks {missing}: pass at least epoch, global_step and metrics")
        for k in ("epoch", "global_step"):
            v = rec[k]
            if isinstance(v, Tensor | np.generic):
                v = v.item()
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"audit {k} must be an int, got {v!r}")
            rec[k] = int(v)
        if not isinstance(rec["metrics"], Mapping):
            raise ValueError(f"audit metrics must be a dict {{'<method>/<metric>': value}}, got "
                             f"{type(rec['metrics']).__name__}")
        metrics = {}
        for k, v in rec["metrics"].items():
            v = _clean(v, f"metrics[{k!r}]")
            if v is not None and not isinstance(v, (int, float)):
                raise ValueError(f"metric {k!r} must be a number, got {v!r}")
            metrics[str(k)] = None if v is None else float(v)
        rec["metrics"] = metrics
        for k, default in _AUDIT_DEFAULTS.items():
            rec.setdefault(k, default)
        if rec["time"] is None:
            rec["time"] = _now()
        rec["errors"] = [error_record(e) if isinstance(e, BaseException) else e for e in (rec["errors"] or [])]
        rec = _clean(rec, f"audit[epoch={rec['epoch']}]")
        audits = [a for a in self.audits if a["epoch"] != rec["epoch"]]
        audits.append(rec)
        audits.sort(key=lambda a: (a["epoch"], a["global_step"]))
        self.data["audits"] = audits
        return rec

    def append_alarm(self, rec: Mapping[str, Any]) -> dict[str, Any]:
        """Record an alarm that fired; the same alarm (name and metric) at the same epoch replaces the old one.

        Keys: ``name, metric, threshold, mode ("max"|"min"), epoch, global_step, value, action
        ("warn"|"stop"|"raise")``.
        """
        rec = _clean(dict(rec), "alarm")
        missing = [k for k in _ALARM_KEYS if k not in rec]
        if missing:
            raise ValueError(f"alarm record lacks {missing}: pass {', '.join(_ALARM_KEYS)}")
        key = (rec["name"], rec["metric"], rec["epoch"])
        self.data["alarms"] = [a for a in self.alarms if (a["name"], a["metric"], a["epoch"]) != key] + [rec]
        return rec

    def truncate_after(self, epoch: int) -> int:
        """Drop audits and alarms of epochs after ``epoch`` (for resuming from a checkpoint taken at ``epoch``).

        Returns how many audits were dropped.
        """
        before = len(self.audits)
        self.data["audits"] = [a for a in self.audits if a["epoch"] <= epoch]
        self.data["alarms"] = [a for a in self.alarms if a.get("epoch", -1) <= epoch]
        return before - len(self.audits)

    # -- files --------------------------------------------------------------------------------------------
    def to_json(self) -> str:
        """The report as strict JSON text (no NaN/Infinity tokens): indented, with one line per audit and alarm.

        One line per record keeps the file readable and lets the JSON encoder's C implementation write the
        records (it is not used with ``indent``), so a write stays cheap however many audits a long run has.
        """
        parts = []
        for key, value in self.data.items():
            if key in ("audits", "alarms") and isinstance(value, list) and value:
                lines = [json.dumps(_clean(v, f"{key}[{i}]"), allow_nan=False) for i, v in enumerate(value)]
                text = "[\n    " + ",\n    ".join(lines) + "\n  ]"
            else:
                text = json.dumps(_clean(value, str(key)), indent=2, allow_nan=False).replace("\n", "\n  ")
            parts.append(f"  {json.dumps(str(key))}: {text}")
        return "{\n" + ",\n".join(parts) + "\n}\n"

    def write(self) -> None:
        """Write the report atomically: temp file in the same folder, flush + fsync, ``os.replace``."""
        self.data["updated"] = _now()
        payload = self.to_json().encode("utf-8")
        atomic_write(self.path, lambda f: f.write(payload))

    @classmethod
    def load(cls, path: str | os.PathLike) -> AuditReport:
        """Read a report written by :meth:`write`.

        ``path`` is ``report.json`` or a folder holding it (``<log_dir>/saliency`` or ``<log_dir>``). Raises
        :class:`ReportError` with what to do for a missing, unreadable, truncated or non-JSON file, or an
        unknown schema.
        """
        p = Path(path)
        if p.is_dir():
            for cand in (p / REPORT_NAME, p / "saliency" / REPORT_NAME):
                if cand.is_file():
                    p = cand
                    break
            else:
                raise ReportError(f"no {REPORT_NAME} in folder {p} (looked in {p / REPORT_NAME} and "
                                  f"{p / 'saliency' / REPORT_NAME}); pass the report file, usually "
                                  f"<log_dir>/saliency/{REPORT_NAME}")
        if not p.exists():
            raise ReportError(f"no audit report at {p}: check the path (SaliencyMonitor writes "
                              f"<log_dir>/saliency/{REPORT_NAME} after its first audit)")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ReportError(f"cannot read audit report {p}: {e}") from e
        if not text.strip():
            raise ReportError(f"audit report {p} is empty: the run that wrote it did not finish an audit; "
                              f"re-run the audit or point to another report")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ReportError(f"audit report {p} is truncated or not valid JSON (line {e.lineno}, column "
                              f"{e.colno}: {e.msg}); it was not written by lightning-saliency's atomic "
                              f"writer or was edited by hand; re-run the audit or restore the file") from e
        if not isinstance(data, dict):
            raise ReportError(f"{p} holds a JSON {type(data).__name__}, not a lightning-saliency report object")
        schema = data.get("schema")
        if schema != SCHEMA:
            if schema is None:
                raise ReportError(f"{p} has no 'schema' field: it is not a lightning-saliency report "
                                  f"(expected schema {SCHEMA!r})")
            if isinstance(schema, str) and schema.startswith("lightning-saliency/report/"):
                raise ReportError(f"{p} has schema {schema!r} but this version of lightning-saliency reads "
                                  f"{SCHEMA!r}; install the version that wrote it (or upgrade)")
            raise ReportError(f"{p} has unknown schema {schema!r}; expected {SCHEMA!r}")
        audits = data.get("audits", [])
        if not isinstance(audits, list):
            raise ReportError(f"{p}: 'audits' must be a list, got {type(audits).__name__}")
        for i, a in enumerate(audits):
            if not (isinstance(a, dict) and isinstance(a.get("epoch"), int) and isinstance(a.get("metrics"), dict)):
                raise ReportError(f"{p}: audits[{i}] is malformed (needs an int 'epoch' and a 'metrics' object)")
        alarms = data.get("alarms", [])
        if not isinstance(alarms, list):
            raise ReportError(f"{p}: 'alarms' must be a list, got {type(alarms).__name__}")
        rep = cls(p)
        for key in ("run", "probe", "config"):
            value = data.get(key) or {}
            if not isinstance(value, dict):
                raise ReportError(f"{p}: {key!r} must be an object, got {type(value).__name__}")
        rep.data.update(copy.deepcopy(data))
        rep.data.setdefault("audits", [])
        rep.data.setdefault("alarms", [])
        return rep

    def __repr__(self) -> str:
        return f"AuditReport({str(self.path)!r}, audits={len(self.audits)}, alarms={len(self.alarms)})"


# -- maps on disk ---------------------------------------------------------------------------------------------
def maps_filename(epoch: int) -> str:
    """The maps file of an audit, relative to the report's folder: ``maps/epoch_0003.npz``.

    Example:
        >>> maps_filename(3)
        'maps/epoch_0003.npz'
    """
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    return f"{MAPS_DIR}/epoch_{epoch:04d}.npz"


def _thumb_size(h: int, w: int, max_side: int) -> tuple[int, int]:
    if max(h, w) <= max_side:
        return h, w
    s = max_side / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def _as_float_cpu(x: Any) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float32)
    return torch.as_tensor(np.asarray(x), dtype=torch.float32)


def _downsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, antialiased resize of ``[N, C, H, W]`` (a no-op at the same size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _savez(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    # uncompressed: float16 maps shrink by only ~20% under zlib, which costs ~10 ms per audit on a small CPU
    atomic_write(path, lambda f: np.savez(f, **arrays))


def save_probe_thumbnails(dir: str | os.PathLike, probe: Any, max_images: int = MAX_IMAGES,
                          max_side: int = MAX_SIDE) -> str:
    """Write ``<dir>/maps/probe.npz``: thumbnails of the first ``max_images`` probe images and their labels.

    ``dir`` is the report's folder (``<log_dir>/saliency``); ``probe`` a ProbeSet (``inputs [N, C, H, W]``,
    ``targets [N]``, optional ``groups``, ``object_masks``, ``spurious_masks``). Images are min-max scaled per
    image to uint8 and downsampled so the longer side is at most ``max_side``. Returns the path relative to
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
    from .render import to_image

    inputs = probe.inputs[:max_images]
    if inputs.ndim != 4:
        raise ValueError(f"probe inputs must be [N, C, H, W], got {tuple(inputs.shape)}")
    n, _, h, w = inputs.shape
    size = _thumb_size(h, w, max_side)
    images = np.stack([to_image(_as_float_cpu(x)) for x in inputs]) if n else np.zeros((0, h, w, 3), np.uint8)
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
              max_images: int = MAX_IMAGES, max_side: int = MAX_SIDE) -> str:
    """Write one audit's maps to ``<dir>/maps/epoch_XXXX.npz``; returns the path relative to ``dir``.

    ``maps`` is ``{method: [N, H, W]}`` (tensors or arrays, any device). The first ``max_images`` maps are
    downsampled (longer side <= ``max_side``), min-max normalised per image to [0, 1] and stored as float16;
    ``predictions`` ([N] ints) as int64. The returned string is what an audit record's ``"maps"`` holds.

    Example:
        >>> import torch, tempfile
        >>> d = tempfile.mkdtemp()
        >>> save_maps(d, 3, {"gradcam": torch.rand(100, 224, 224)}, predictions=torch.zeros(100, dtype=torch.long))
        'maps/epoch_0003.npz'
        >>> m = load_maps(d, 3); m["gradcam"].shape, m["predictions"].shape
        ((64, 64, 64), (64,))
    """
    from .maps import normalize

    rel = maps_filename(epoch)
    if not maps:
        raise ValueError("save_maps got no maps; pass {method: tensor [N, H, W]}")
    arrays: dict[str, np.ndarray] = {}
    n = None
    for method, m in maps.items():
        if method == "predictions":
            raise ValueError("'predictions' is reserved in the maps file; rename that method")
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
    _savez(Path(dir) / rel, arrays)
    return rel


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ReportError(f"no maps file at {path}: maps are saved under <log_dir>/saliency/{MAPS_DIR}/ by "
                          f"SaliencyMonitor; check the path and the audit's 'maps' entry")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError, EOFError ...
        raise ReportError(f"cannot read maps file {path} ({type(e).__name__}: {e}); it is truncated or not "
                          f"a lightning-saliency maps file") from e


def load_maps(path: str | os.PathLike, epoch: int | None = None) -> dict[str, np.ndarray]:
    """Read an audit's maps: ``load_maps(report_dir, epoch)`` or ``load_maps(path_to_npz)``.

    Returns ``{method: float32 [N, h, w] in [0, 1], "predictions": int64 [N] (when saved)}``. Raises
    :class:`ReportError` for a missing or unreadable file.

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

