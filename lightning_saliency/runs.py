"""One run, one report: which run a ``report.json`` belongs to, and moving another run's report aside.

A *run* is one :class:`~lightning_saliency.SaliencyMonitor` and the checkpoints it saved: its id
(:func:`new_run_id`) is made at its first audit set-up, written in the report's header (``run.id``) and kept in
the monitor's ``state_dict``. A fit, validate or test that opens a folder already holding a report continues
that report only when it is the same run (:func:`same_run`): the same monitor object (fit, then validate, then
test), or one restored from that run's checkpoint (``ckpt_path=...``, fit or evaluation) with the same probe.
Anything else (a new script writing into a fixed folder, another probe) is another run: :func:`move_aside`
moves the old report with its maps, overlay images and page to ``<saliency>/previous/<created>/``, where it
still opens (``lightning-saliency show <saliency>/previous/<created>``: maps paths are relative to the report),
and the new run starts a new report. Nothing is ever deleted.

Example:
    >>> import os, tempfile
    >>> from lightning_saliency.report import AuditReport
    >>> d = tempfile.mkdtemp()
    >>> old = AuditReport(os.path.join(d, "report.json"))
    >>> old.data["created"] = "2026-01-02T03:04:05+00:00"
    >>> old.write()
    >>> moved = move_aside(d)
    >>> os.path.relpath(moved, d), os.path.exists(os.path.join(d, "report.json"))
    ('previous/2026-01-02T03-04-05/report.json', False)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .report import REPORT_NAME, stage_of

__all__ = ["PREVIOUS_DIR", "RUN_FILES", "new_run_id", "same_run", "move_aside"]

PREVIOUS_DIR = "previous"
# what a run leaves in its saliency folder, moved with its report (the maps paths in the report stay valid)
RUN_FILES = (REPORT_NAME, "maps", "images", "audit.html")


def new_run_id() -> str:
    """A fresh run id (32 hex digits).

    Example:
        >>> len(new_run_id()), new_run_id() != new_run_id()
        (32, True)
    """
    return uuid.uuid4().hex


def same_run(data: Mapping[str, Any], run_id: str | None, fingerprint: str,
             history: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the report ``data`` is the run of a monitor with ``run_id``, probe ``fingerprint`` and audit
    ``history`` (restored from a checkpoint, or made in this process).

    A different probe is always another run. With both ids known, the ids decide. A report or a checkpoint
    written before run ids existed is the same run when the monitor's history is not empty and each of its fit
    audits is in the report (same epoch and step): a resume.

    Example:
        >>> data = {"run": {"id": "a"}, "probe": {"fingerprint": "f"}, "audits": []}
        >>> same_run(data, "a", "f", []), same_run(data, "b", "f", []), same_run(data, "a", "g", [])
        (True, False, False)
    """
    probe = data.get("probe") if isinstance(data.get("probe"), Mapping) else {}
    if probe.get("fingerprint") not in (None, "", fingerprint):
        return False
    run = data.get("run") if isinstance(data.get("run"), Mapping) else {}
    if run.get("id") and run_id:
        return run.get("id") == run_id
    fit = [(r["epoch"], r["global_step"]) for r in history if stage_of(r) == "fit"]
    on_disk = {(a.get("epoch"), a.get("global_step")) for a in data.get("audits") or [] if isinstance(a, Mapping)}
    return bool(fit) and all(k in on_disk for k in fit)


def _stamp(data: Mapping[str, Any] | None, report: Path) -> str:
    """A folder name from the report's ``created`` time (its file's time when unreadable): ``2026-01-02T03-04-05``."""
    created = data.get("created") if isinstance(data, Mapping) else None
    if not isinstance(created, str) or not re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", created):
        from datetime import datetime, timezone

        created = datetime.fromtimestamp(report.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    return created[:19].replace(":", "-")


def move_aside(directory: str | os.PathLike, data: Mapping[str, Any] | None = None) -> Path | None:
    """Move the report in ``directory`` and the files of its run (:data:`RUN_FILES`) to
    ``<directory>/previous/<created>/`` (``-2``, ``-3``... when taken); return the moved report's path (``None``
    when there is no report). ``data``: the report's content when already read (for its ``created`` time).
    A report that cannot be read (truncated by hand, another schema) is moved the same way.

    Renames only (the same file system): nothing is copied, nothing deleted.
    """
    directory = Path(directory)
    report = directory / REPORT_NAME
    if not report.exists():
        return None
    if data is None:
        with contextlib.suppress(Exception):  # unreadable: named by its file's time
            data = json.loads(report.read_text(encoding="utf-8"))
    stamp = _stamp(data, report)
    target = directory / PREVIOUS_DIR / stamp
    n = 1
    while target.exists():
        n += 1
        target = directory / PREVIOUS_DIR / f"{stamp}-{n}"
    target.mkdir(parents=True)
    for name in RUN_FILES:
        if (directory / name).exists():
            os.replace(directory / name, target / name)
    return target / REPORT_NAME
