"""The audit record on disk: ``report.json`` (schema ``lightning-saliency/report/v1``) and the saved maps.

Layout, under ``<log_dir>/saliency/``::

    report.json                 the audit report (below), rewritten atomically after every audit
    maps/probe.npz              probe thumbnails, written once: "images" uint8 [N, h, w, 3], "targets" int64 [N],
                                optional "groups" str [N], "object_masks" / "spurious_masks" bool [N, h, w]
    maps/epoch_XXXX.npz         one array per method, float16 [N, h, w], each map min-max normalised to [0, 1]
                                (a constant map is all 0), plus "predictions" int64 [N] when known; a validate
                                or test audit's maps are maps/validate_NNN.npz, maps/test_NNN.npz (n-th of its stage)
    previous/<created>/         the report (and its maps/, images/, audit.html) of another run that wrote into this
                                folder before: moved aside by :mod:`lightning_saliency.runs`, never deleted

The maps files are written and read by :mod:`lightning_saliency.mapfiles` (size bounds there); its functions
are importable from here too. Reading is one path for every reader (the gate, the HTML page, ``show``):
:func:`load_report` = :func:`find_report` (which file a path names) + :func:`validate_report` (one validation
pass), raising :class:`ReportError`; none of it imports torch. :func:`split_key` splits metric keys.

``report.json``::

    {"schema": "lightning-saliency/report/v1", "created": iso8601, "updated": iso8601,
     "run": {"id", "log_dir", "model", "torch", "lightning", "precision", "world_size"},
     "probe": {"size", "fingerprint", "groups": {name: count} | null, "object_masks", "spurious_masks"},
     "config": {"methods", "layer", "metrics", "every_n_epochs", "task", "task_inferred",
                "denormalize": {"mean", "std", "source": "argument" | "dataset transform"} | null},
     "audits": [{"stage", "epoch", "global_step", "time", "duration_s", "precision",
                 "metrics": {"<method>/<metric>[/<group>]": float | null},
                 "health": {"logits": "ok" | "<problem>: k of n", "<method>": "ok" | "<problem>: k of n[; ...]"},
                 "errors": [{"method", "type", "message"}], "maps": "maps/epoch_0003.npz" | null,
                 "maps_thinned": "maps/epoch_0002.npz" (only where keep_maps removed the audit's maps file)}],
     "alarms": [{"name", "metric", "threshold", "mode", "stage", "epoch", "global_step", "value", "action"}],
     "scorecard": {"epoch", "global_step", "columns": [{"name", "higher_is_better", "kind", "of", "doc"}],
                   "rows": [{"method", "<column>": float | null}], "best": {"<column>": [method]},
                   "reasons": {method: {"<column>": why it is null}}, "notes": [str], "images", "device"}}

``scorecard`` (:mod:`lightning_saliency.scorecards`) is written once, at the end of fit, by
``SaliencyMonitor(scorecard=True)``; a report without it is just as valid.

``stage`` is ``"fit"``, ``"validate"`` or ``"test"`` (a report written before stages existed reads as
``"fit"``); ``epoch`` is the last trained epoch of the weights audited (``-1``: not known, e.g. a validate of
weights neither trained nor restored from a checkpoint under the monitor). ``run.id`` names the run
(:mod:`lightning_saliency.runs`): one run, one report.

``health`` (:mod:`lightning_saliency.health`: non-finite logits, non-finite or constant maps, with counts; every
problem that makes the audit unhealthy is also in ``errors``) is absent from reports written before it existed,
which read as before. Non-finite numbers (NaN, +-inf) anywhere in the report are written as ``null``, so the
file is strict JSON.
Writes go through :func:`lightning_saliency.files.atomic_write` (a temporary file in the same folder, flushed
and fsync'ed, then renamed over ``report.json`` with ``os.replace``): a killed run leaves the previous complete
report, never half of one. Fit audits are keyed by epoch (:func:`place_record`): appending a fit audit for an
epoch already present replaces it, and :meth:`AuditReport.truncate_after` drops the fit audits after a resumed
checkpoint's epoch, so a resumed run never duplicates an epoch. Validate and test audits are appended, never
replaced by another audit. Records are sorted by epoch, then in the order they were made.

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

from .files import atomic_write
from .mapfiles import (  # the saved maps' home; re-exported here, where readers have always found them
    KEEP_MAPS,
    MAPS_DIR,
    MAX_IMAGES,
    MAX_SIDE,
    check_keep_maps,
    load_maps,
    load_probe_thumbnails,
    maps_filename,
    remove_maps_file,
    save_maps,
    save_probe_thumbnails,
    thin_maps,
)
from .render import _is_tensor

__all__ = [
    "SCHEMA", "REPORT_NAME", "MAPS_DIR", "MAX_IMAGES", "MAX_SIDE", "ReportError", "AuditReport",
    "error_record", "probe_info", "save_probe_thumbnails", "save_maps", "load_maps", "load_probe_thumbnails",
    "maps_filename", "split_key", "find_report", "validate_report", "load_report", "STAGES", "stage_of",
    "place_record", "KEEP_MAPS", "check_keep_maps", "thin_maps", "remove_maps_file",
]

SCHEMA = "lightning-saliency/report/v1"
REPORT_NAME = "report.json"
STAGES = ("fit", "validate", "test")


def stage_of(record: Mapping[str, Any]) -> str:
    """The stage of an audit or alarm record: its ``"stage"``, ``"fit"`` when it has none (older reports).

    Example:
        >>> stage_of({"epoch": 0}), stage_of({"stage": "test"})
        ('fit', 'test')
    """
    return str(record.get("stage") or "fit")


def place_record(records: list[dict[str, Any]], record: dict[str, Any], replace: bool | None = None
                 ) -> list[dict[str, Any]]:
    """``records`` with ``record`` added: the one rule of the report and the monitor's history.

    ``replace`` (default: ``True`` for a fit audit, ``False`` for validate and test) replaces the last record of
    the same stage and epoch in place (a fit audit redone after a resume, an audit completed at fit end);
    otherwise the record is added. The result is sorted by epoch, stably: the records of one epoch keep the
    order they were made in (fit, then validate, then test; a validate in a fresh process is at its trainer's
    ``global_step``, 0, whatever the checkpoint's).

    Example:
        >>> recs = place_record([], {"stage": "fit", "epoch": 1, "global_step": 6, "v": 1})
        >>> recs = place_record(recs, {"stage": "validate", "epoch": 1, "global_step": 6, "v": 2})
        >>> recs = place_record(recs, {"stage": "validate", "epoch": 1, "global_step": 6, "v": 3})
        >>> recs = place_record(recs, {"stage": "fit", "epoch": 1, "global_step": 6, "v": 4})
        >>> [(stage_of(r), r["v"]) for r in recs]
        [('fit', 4), ('validate', 2), ('validate', 3)]
    """
    out = list(records)
    replace = stage_of(record) == "fit" if replace is None else replace
    key = (stage_of(record), record["epoch"])
    same = [i for i, r in enumerate(out) if (stage_of(r), r["epoch"]) == key] if replace else []
    if same:
        out[same[-1]] = record
    else:
        out.append(record)
    out.sort(key=lambda r: r["epoch"])
    return out


class ReportError(ValueError):
    """A report or maps file that is missing, unreadable, truncated or of an unknown schema."""


def split_key(key: str) -> tuple[str, str, str | None]:
    """Split a metric key ``<method>/<metric>[/<group>]`` into ``(method, metric, group)``.

    Method and metric names never contain ``/``; a group name may (groups are the user's strings), so the key
    is split at its first two slashes only and everything after the second one is the group. A key without
    ``/`` (``"accuracy"``) has method ``""``; a key without a group has group ``None``.

    Example:
        >>> split_key("gradcam/object_mass")
        ('gradcam', 'object_mass', None)
        >>> split_key("gradcam/object_mass/site/A")
        ('gradcam', 'object_mass', 'site/A')
        >>> split_key("accuracy")
        ('', 'accuracy', None)
    """
    parts = str(key).split("/", 2)
    if len(parts) == 1:
        return "", parts[0], None
    if len(parts) == 2:
        return parts[0], parts[1], None
    return parts[0], parts[1], parts[2]


def _reports_below(root: Path, depth: int = 3) -> list[Path]:
    """``saliency/report.json`` files up to ``depth`` folders below ``root`` (for a hint; stops after 50)."""
    out: list[Path] = []
    for level in range(depth + 1):
        out.extend(root.glob("/".join(["*"] * level + [f"saliency/{REPORT_NAME}"])))
        if len(out) > 50:
            break
    return out


def find_report(path: str | os.PathLike) -> Path:
    """The ``report.json`` that ``path`` names: the file itself, or the report of a folder.

    A folder is searched in this order, closest first: ``<folder>/report.json`` (the folder is the run's
    ``saliency`` folder), then ``<folder>/saliency/report.json`` (the folder is the run's log dir). Nothing
    deeper is read; when neither exists, the :class:`ReportError` lists the reports found up to three folders
    below, so a wrong level (``lightning_logs`` instead of ``lightning_logs/version_0``) says where to look.

    Example:
        >>> import os, tempfile
        >>> log_dir = tempfile.mkdtemp()
        >>> os.makedirs(os.path.join(log_dir, "saliency"))
        >>> _ = open(os.path.join(log_dir, "saliency", "report.json"), "w").close()
        >>> find_report(log_dir).relative_to(log_dir).as_posix()
        'saliency/report.json'
    """
    p = Path(path)
    if p.is_dir():
        for cand in (p / REPORT_NAME, p / "saliency" / REPORT_NAME):
            if cand.is_file():
                return cand
        found = sorted(str(c) for c in _reports_below(p))
        hint = ""
        if found:
            hint = "; found: " + ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise ReportError(f"no {REPORT_NAME} in folder {p} (looked in {p / REPORT_NAME} and "
                          f"{p / 'saliency' / REPORT_NAME}){hint}; pass the report file, usually "
                          f"<log_dir>/saliency/{REPORT_NAME}, or the run's log dir (e.g. lightning_logs/version_0)")
    if not p.exists():
        raise ReportError(f"no audit report at {p} (not found): check the path (SaliencyMonitor writes "
                          f"<log_dir>/saliency/{REPORT_NAME} after its first audit)")
    return p


def _read_json(p: Path) -> Any:
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"cannot read audit report {p}: {e}") from e
    if not text.strip():
        raise ReportError(f"audit report {p} is empty: the run that wrote it did not finish an audit; "
                          f"re-run the audit or point to another report")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportError(f"audit report {p} is truncated or not valid JSON (line {e.lineno}, column "
                          f"{e.colno}: {e.msg}); it was not written by lightning-saliency's atomic "
                          f"writer or was edited by hand; re-run the audit or restore the file") from e


def validate_report(data: Any, path: str | os.PathLike = "report") -> dict[str, Any]:
    """Check that ``data`` (parsed JSON) is a report this version reads; return it, or raise :class:`ReportError`.

    The one validation pass of a loaded report (the gate, the page and ``show`` all read through
    :func:`load_report`): a JSON object of schema :data:`SCHEMA`; ``audits`` a list of objects, each with an
    int ``epoch`` and a ``metrics`` object, and a ``health`` object of strings and a ``discovery`` object (its
    ``candidates`` a list) when present; ``alarms`` a list;
    ``run``, ``probe``, ``config`` and ``scorecard`` objects when present. ``path`` only names the file in
    messages.

    Example:
        >>> validate_report({"schema": SCHEMA, "audits": [{"epoch": 0, "metrics": {}}]})["audits"][0]["epoch"]
        0
        >>> validate_report({"schema": SCHEMA, "audits": {}})  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ReportError: report: 'audits' must be a list, got dict
    """
    p = path
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
        health = a.get("health")
        if health is not None and not (isinstance(health, dict) and all(isinstance(v, str) for v in health.values())):
            raise ReportError(f"{p}: audits[{i}] 'health' must be an object of strings (\"ok\" or the problems), "
                              f"got {health!r:.200}")
        disc = a.get("discovery")
        if disc is not None and not (isinstance(disc, dict) and isinstance(disc.get("candidates", []), list)):
            raise ReportError(f"{p}: audits[{i}] 'discovery' must be an object with a 'candidates' list, got "
                              f"{disc!r:.200}")
        if a.get("stage") is not None and a["stage"] not in STAGES:
            raise ReportError(f"{p}: audits[{i}] has stage {a['stage']!r}; expected one of {', '.join(STAGES)}")
    alarms = data.get("alarms", [])
    if not isinstance(alarms, list):
        raise ReportError(f"{p}: 'alarms' must be a list, got {type(alarms).__name__}")
    for key in ("run", "probe", "config", "scorecard"):
        value = data.get(key) or {}
        if not isinstance(value, dict):
            raise ReportError(f"{p}: {key!r} must be an object, got {type(value).__name__}")
    return data


def load_report(path: str | os.PathLike) -> AuditReport:
    """Find (:func:`find_report`), read and validate (:func:`validate_report`) a report; :class:`ReportError`
    on any problem. The one way the gate, the page and ``show`` read a report; it never imports torch.

    Example:
        >>> import os, tempfile
        >>> rep = AuditReport(os.path.join(tempfile.mkdtemp(), "saliency", "report.json"))
        >>> rep.write()
        >>> load_report(rep.path.parent.parent).path == rep.path
        True
    """
    return AuditReport.load(path)


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
    if _is_tensor(obj):
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
_ALARM_KEYS = ("name", "metric", "threshold", "mode", "stage", "epoch", "global_step", "value", "action")


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
        """The audit records, sorted by epoch (then in the order they were made)."""
        return self.data["audits"]

    @property
    def alarms(self) -> list[dict[str, Any]]:
        """The alarm records, in the order they fired."""
        return self.data["alarms"]

    @property
    def directory(self) -> Path:
        """The folder holding ``report.json`` (``<log_dir>/saliency``); saved maps are relative to it."""
        return self.path.parent

    def latest(self, stage: str | None = None) -> dict[str, Any] | None:
        """The last audit record (of ``stage`` when given), or ``None`` when there is none."""
        audits = [a for a in self.audits if stage is None or stage_of(a) == stage]
        return audits[-1] if audits else None

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

    def set_scorecard(self, scorecard: Mapping[str, Any]) -> None:
        """Set the ``scorecard`` section (:meth:`lightning_saliency.scorecards.Scorecard.to_dict`), replaced whole."""
        self.data["scorecard"] = _clean(dict(scorecard), "scorecard")

    def append_audit(self, record: Mapping[str, Any], replace: bool | None = None) -> dict[str, Any]:
        """Add one audit record, placed by :func:`place_record` (a fit audit for an epoch already present
        replaces it; validate and test audits are added unless ``replace=True``). Returns the stored record.

        Required keys: ``epoch`` (int), ``global_step`` (int), ``metrics`` (``{key: number}``). Optional:
        ``stage`` (default ``"fit"``), ``time`` (default now), ``duration_s``, ``precision``, ``health``
        (``{name: "ok" | problems}``), ``errors`` (list of :func:`error_record` dicts or exceptions), ``maps`` (path
        relative to the report's folder). Non-finite values become ``None``.
        """
        rec = {"stage": "fit", **dict(record)}
        if rec["stage"] not in STAGES:
            raise ValueError(f"audit stage must be one of {', '.join(STAGES)}, got {rec['stage']!r}")
        missing = [k for k in ("epoch", "global_step", "metrics") if k not in rec]
        if missing:
            raise ValueError(f"audit record lacks {missing}: pass at least epoch, global_step and metrics")
        for k in ("epoch", "global_step"):
            v = rec[k]
            if _is_tensor(v) or isinstance(v, np.generic):
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
        self.data["audits"] = place_record(self.audits, rec, replace)
        return rec

    def append_alarm(self, rec: Mapping[str, Any]) -> dict[str, Any]:
        """Record an alarm that fired; the same alarm (name and metric) at the same fit epoch replaces the old one.

        Keys: ``name, metric, threshold, mode ("max"|"min"), epoch, global_step, value, action
        ("warn"|"stop"|"raise")``, and ``stage`` (default ``"fit"``; a validate or test firing is added).
        """
        rec = _clean({"stage": "fit", **dict(rec)}, "alarm")
        missing = [k for k in _ALARM_KEYS if k not in rec]
        if missing:
            raise ValueError(f"alarm record lacks {missing}: pass {', '.join(_ALARM_KEYS)}")
        key = (rec["name"], rec["metric"], rec["epoch"])
        kept = [a for a in self.alarms if stage_of(rec) != "fit" or stage_of(a) != "fit"
                or (a["name"], a["metric"], a["epoch"]) != key]
        self.data["alarms"] = kept + [rec]
        return rec

    def truncate_after(self, epoch: int) -> int:
        """Drop the fit audits and fit alarms of epochs after ``epoch`` (for resuming a fit from a checkpoint
        taken at ``epoch``: those epochs are trained again). Validate and test audits are kept: they audited
        weights that existed. Returns how many audits were dropped.
        """
        before = len(self.audits)
        self.data["audits"] = [a for a in self.audits if stage_of(a) != "fit" or a["epoch"] <= epoch]
        self.data["alarms"] = [a for a in self.alarms if stage_of(a) != "fit" or a.get("epoch", -1) <= epoch]
        scored = (self.data.get("scorecard") or {}).get("epoch")
        if isinstance(scored, int) and scored > epoch:  # it scored weights that the resumed run no longer has
            self.data.pop("scorecard")
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

        ``path`` is ``report.json`` or a folder holding it, found with :func:`find_report`; the content is checked
        with :func:`validate_report`. Raises :class:`ReportError` with what to do for a missing, unreadable,
        truncated or non-JSON file, or an unknown schema.
        """
        p = find_report(path)
        data = validate_report(_read_json(p), p)
        rep = cls(p)
        rep.data.update(copy.deepcopy(data))
        rep.data.setdefault("audits", [])
        rep.data.setdefault("alarms", [])
        return rep

    def __repr__(self) -> str:
        return f"AuditReport({str(self.path)!r}, audits={len(self.audits)}, alarms={len(self.alarms)})"
