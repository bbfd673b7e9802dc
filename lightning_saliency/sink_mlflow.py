"""MLflow: the audit's scalars as run metrics, its overlay grids, texts and report as run artifacts.

:func:`~lightning_saliency.sinks.sinks_for_loggers` gives a Lightning ``MLFlowLogger`` (``pytorch_lightning`` or
``lightning.pytorch``) an :class:`MlflowSink`. What the run gets:

- **metrics** through the logger's own ``log_metrics`` (its ``prefix`` applies), at the trainer's global step, one
  value per audit: ``saliency/<method>/<metric>[/<group>]``, with the characters MLflow refuses replaced
  (:func:`metric_name`: ``gradcam++/stability`` is ``saliency/gradcampp/stability``);
- **artifacts** under ``saliency/``, the same tree as the run's ``saliency`` folder on disk: the overlay grids
  ``saliency/images/<method>/epoch_XXXX.png`` (``step_XXXXXXXX.png`` for a validate or test audit; the discovery
  suspects as ``images/discovery_suspect_<i>``), the texts (health, discovery, alarms, scorecard) as
  ``saliency/<tag>/step_XXXXXXXX.txt``, the per-image table as ``saliency/probe/step_XXXXXXXX.csv``, and
  ``saliency/report.json``, uploaded again whenever fit, validate or test ends;
- a **tag** ``saliency/alarm`` holding the last alarm that fired, so that the runs table can show and filter it.

The final values need no summary: MLflow shows each metric's latest value. Nothing here imports ``mlflow``: the
sink calls the ``MlflowClient`` the logger already made (``logger.experiment``), so the ``mlflow`` extra is only
needed by whoever uses an ``MLFlowLogger``.

Example (a stand-in for ``MLFlowLogger``, printing what the real client would store):
    >>> import numpy as np, tempfile
    >>> class Client:
    ...     def log_artifact(self, run_id, local_path, artifact_path=None):
    ...         print("artifact", f"{artifact_path}/{os.path.basename(local_path)}")
    >>> class Logger:
    ...     experiment, run_id = Client(), "0123"
    ...     def log_metrics(self, metrics, step):
    ...         print(step, metrics)
    >>> sink = MlflowSink(Logger(), save_dir=tempfile.mkdtemp())
    >>> sink.log_metrics({"gradcam++/stability": 0.8, "gradient/drift": None}, step=12)
    12 {'saliency/gradcampp/stability': 0.8}
    >>> path = sink.log_overlays("gradcam", [np.zeros((8, 8, 3), np.uint8)], ["cat / cat"], step=12, epoch=1)
    artifact saliency/images/gradcam/epoch_0001.png
    >>> sink.log_text("saliency/health", "fit epoch 1: ok", step=12)
    artifact saliency/health/step_00000012.txt
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .render import Picture, grid
from .sinks import PREFIX, Sink, _tag, grid_path
from .sinks import _safe_name as _segment

__all__ = ["MlflowSink", "metric_name"]

_REFUSED = re.compile(r"[^A-Za-z0-9_/. -]")  # what Lightning's MLFlowLogger strips from a name (with a warning)
_MAX_TAG = 5000  # MLflow's tag values are bounded (5000 characters on its oldest stores)


def metric_name(key: str) -> str:
    """The MLflow name of a metric key: ``saliency/<key>``, each ``+`` as ``p`` and any other character MLflow
    refuses (it takes letters, digits, ``_ / . -`` and spaces) as ``_``.

    Lightning's ``MLFlowLogger`` would drop the characters instead, which logs ``gradcam++/stability`` under
    ``gradcam``'s name; the replacement keeps the two apart.

    Example:
        >>> metric_name("gradcam++/stability"), metric_name("gradient/object_mass/site:A")
        ('saliency/gradcampp/stability', 'saliency/gradient/object_mass/site_A')
    """
    return _REFUSED.sub("_", _tag(key).replace("+", "p"))


def _artifact_path(tag: str, name: str) -> str:
    """``saliency/<tag segments, made safe>/<name>``."""
    return "/".join([*(_segment(part) for part in _tag(tag).split("/") if part), name])


class MlflowSink(Sink):
    """Logs to the MLflow run of a Lightning ``MLFlowLogger``: metrics, PNG grids, texts and the report.

    Args:
        logger: the ``MLFlowLogger`` (its ``experiment``, an ``MlflowClient``, and ``run_id`` are used; the run is
            created on first use, as Lightning does).
        save_dir: the run's ``saliency`` folder on disk, where ``report.json`` is (uploaded by :meth:`flush`).
        ncols: columns of the overlay grid when the caller did not draw it.

    See the module's docstring for the names and an example.
    """

    def __init__(self, logger: Any, save_dir: str | os.PathLike, ncols: int | None = None) -> None:
        self.logger = logger
        self.save_dir = Path(save_dir)
        self.ncols = ncols
        self._uploaded: set[str] = set()  # artifact files written by this sink: a second one at a step gets _1
        self._step = 0

    def _upload(self, artifact_file: str, data: bytes, unique: bool = True) -> str:
        """Store ``data`` as the run's artifact ``artifact_file`` (a posix path) and return the path used."""
        if unique and artifact_file in self._uploaded:
            stem, ext = os.path.splitext(artifact_file)
            artifact_file = next(f"{stem}_{i}{ext}" for i in range(1, len(self._uploaded) + 2)
                                 if f"{stem}_{i}{ext}" not in self._uploaded)
        self._uploaded.add(artifact_file)
        folder, name = artifact_file.rsplit("/", 1)
        with tempfile.TemporaryDirectory(prefix="lightning-saliency-") as tmp:
            path = os.path.join(tmp, name)
            with open(path, "wb") as f:
                f.write(data)
            self.logger.experiment.log_artifact(self.logger.run_id, path, artifact_path=folder)
        return artifact_file

    def log_metrics(self, metrics: Mapping[str, float | None], step: int) -> None:
        self._step = int(step)
        finite = {metric_name(k): float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
        if finite:
            self.logger.log_metrics(finite, step=int(step))

    def log_overlays(self, method: str, images: Sequence[np.ndarray], captions: Sequence[str], step: int,
                     epoch: int | None = None, picture: np.ndarray | Picture | None = None) -> str | None:
        """Upload the grid as ``saliency/images/<method>/epoch_XXXX.png`` and return that artifact path."""
        if not images:
            return None
        self._step = int(step)
        if picture is None:
            picture = grid(list(images), list(captions) if captions is not None else None, ncols=self.ncols)
        png = (picture if isinstance(picture, Picture) else Picture(picture)).png
        return self._upload(f"{PREFIX}/{grid_path(method, step, epoch)}", png, unique=False)  # a redo replaces

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        def cell(v: Any) -> Any:
            if isinstance(v, np.ndarray):
                return f"array{tuple(v.shape)}"
            if isinstance(v, float) and not math.isfinite(v):
                return ""
            return v

        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(list(columns))
        writer.writerows([cell(v) for v in row] for row in rows)
        self._upload(_artifact_path(name, f"step_{int(step):08d}.csv"), out.getvalue().encode())

    def log_text(self, tag: str, text: str, step: int) -> None:
        self._step = int(step)
        self._upload(_artifact_path(tag, f"step_{int(step):08d}.txt"), str(text).encode())

    def alert(self, title: str, text: str) -> None:
        try:
            self.logger.experiment.set_tag(self.logger.run_id, f"{PREFIX}/alarm", f"{title}: {text}"[:_MAX_TAG])
        except Exception:  # an alert must never break training
            pass

    def flush(self) -> None:
        """Upload ``report.json`` (the latest, complete one: it is written atomically) as ``saliency/report.json``."""
        report = self.save_dir / "report.json"
        if report.is_file():
            self._upload(f"{PREFIX}/report.json", report.read_bytes(), unique=False)
