"""Where the audit's output goes: TensorBoard, Weights & Biases, MLflow and PNG files, behind one small interface.

A :class:`Sink` receives an audit's scalars, overlay images, per-image tables, text, alerts and final summary,
and puts them where the user looks. :func:`sinks_for_loggers` builds one sink per logger of a ``Trainer``
(``trainer.loggers``: every logger is served, not only the first) plus a :class:`PngSink` that always writes the
overlay grids to disk:

- ``TensorBoardLogger`` (from ``pytorch_lightning.loggers`` or ``lightning.pytorch.loggers``) ->
  :class:`TensorBoardSink`: one grid image per method under ``saliency/<method>/overlays``, scalars under
  ``saliency/<method>/<metric>``, a custom-scalars layout that puts every method's value of one metric in one
  chart, tables and text as markdown text.
- ``WandbLogger`` (either distribution) -> :class:`WandbSink`: a list of ``wandb.Image`` (with captions) per
  method under ``saliency/<method>/overlays``, ``wandb.Table`` for tables, scalars; every ``log`` call carries
  ``trainer/global_step`` and ``saliency/*`` is defined with that step metric, as Lightning does for its own
  metrics, so nothing conflicts with W&B's internal step. Final metrics go to ``run.summary``; alerts to
  ``run.alert`` (ignored where unavailable, e.g. offline).
- ``MLFlowLogger`` (either distribution) -> :class:`~lightning_saliency.sink_mlflow.MlflowSink`: scalars through
  its ``log_metrics``, the overlay grids as PNG artifacts under ``saliency/images/``, texts and tables as text
  artifacts, ``report.json`` as ``saliency/report.json`` (its own module, which never imports ``mlflow``).
- Any other logger (CSV, ...): the scalars through its ``log_metrics`` (:class:`ScalarSink`). Without any logger
  that takes images, a :class:`PngSink` writes the grids to disk.

Sinks are called on rank 0 only (the callback gathers results first). Errors raised by a logger propagate, except
from :meth:`Sink.alert`, which never fails.

Example:
    >>> import numpy as np, tempfile
    >>> sinks = sinks_for_loggers([], save_dir=tempfile.mkdtemp())  # no logger: PNG files only
    >>> [type(s).__name__ for s in sinks]
    ['PngSink']
    >>> sinks[0].log_overlays("gradcam", [np.zeros((8, 8, 3), np.uint8)], ["cat / cat"], step=10, epoch=0).name
    'epoch_0000.png'
"""

from __future__ import annotations

import html
import importlib
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .render import Picture, grid, save_png
from .report import split_key as _split_key

__all__ = ["Sink", "ScalarSink", "TensorBoardSink", "WandbSink", "PngSink", "grid_path", "sinks_for_loggers", "PREFIX"]

PREFIX = "saliency"
_STEP_KEY = "trainer/global_step"


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _tag(key: str) -> str:
    key = str(key)
    return key if key.startswith(PREFIX + "/") else f"{PREFIX}/{key}"


class Sink:
    """Base class: every method is a no-op, so a sink implements only what its backend can show.

    Metric keys are ``"<method>/<metric>[/<group>]"``; sinks publish them under ``"saliency/<key>"``.

    Example:
        >>> class Printer(Sink):
        ...     def log_metrics(self, metrics, step):
        ...         print(step, metrics)
        >>> Printer().log_metrics({"gradcam/object_mass": 0.7}, step=3)
        3 {'gradcam/object_mass': 0.7}
    """

    def log_metrics(self, metrics: Mapping[str, float | None], step: int) -> None:
        """Log scalars ``{"<method>/<metric>": value}`` at ``step`` (the trainer's global step)."""

    def log_overlays(self, method: str, images: Sequence[np.ndarray], captions: Sequence[str], step: int,
                     epoch: int | None = None, picture: np.ndarray | Picture | None = None) -> None:
        """Log one method's overlays (``uint8 [H, W, 3]`` each) with one caption each.

        ``epoch`` (optional) names files by epoch where a sink writes files (:class:`PngSink`). ``picture``
        (optional) is :func:`~lightning_saliency.render.grid` of these overlays and captions, when the caller
        already drew it (the monitor draws it once per audit for all sinks).
        """

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """Log a table (e.g. one row per probe image: label, prediction, group, metrics)."""

    def log_text(self, tag: str, text: str, step: int) -> None:
        """Log free text (markdown where the backend renders it)."""

    def alert(self, title: str, text: str) -> None:
        """Raise an alert (an alarm fired). Never raises."""

    def summary(self, metrics: Mapping[str, float | None]) -> None:
        """Record final metric values (end of fit)."""

    def flush(self) -> None:
        """Push buffered output to storage (called after each audit; sinks may also flush on their own)."""


# -- any other Lightning logger --------------------------------------------------------------------------------
class ScalarSink(Sink):
    """The scalars of every audit, through any Lightning logger's public ``log_metrics`` (CSV gets
    ``saliency/<key>`` columns in its ``metrics.csv``); for the loggers without a dedicated sink. A null value
    is left out, as the dashboards do.

    Example:
        >>> class Logger:
        ...     def log_metrics(self, metrics, step):
        ...         print(step, metrics)
        >>> ScalarSink(Logger()).log_metrics({"gradcam/object_mass": 0.5, "gradient/drift": None}, step=4)
        4 {'saliency/gradcam/object_mass': 0.5}
    """

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def log_metrics(self, metrics: Mapping[str, float | None], step: int) -> None:
        finite = {_tag(k): float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
        if finite:
            self.logger.log_metrics(finite, step=step)

    def flush(self) -> None:
        save = getattr(self.logger, "save", None)
        if callable(save):
            save()


# -- TensorBoard ----------------------------------------------------------------------------------------------
def _markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, np.ndarray):
            v = f"array{tuple(v.shape)}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def custom_scalars_layout(keys: Iterable[str]) -> dict[str, dict[str, list[Any]]]:
    """The TensorBoard custom-scalars layout for metric keys: one chart per metric, a line per method.

    Per-group keys (``<method>/<metric>/<group>``) get a chart per method and metric, a line per group, in a
    second category. Charts follow the metric registry's order (the headline metrics first), then by name.

    Example:
        >>> custom_scalars_layout(["gradcam/object_mass", "gradient/object_mass", "gradcam/object_mass/a"])
        {'saliency': {'object_mass': ['Multiline', ['saliency/gradcam/object_mass', 'saliency/gradient/object_mass']]}, 'saliency per group': {'gradcam/object_mass': ['Multiline', ['saliency/gradcam/object_mass/a']]}}
    """
    by_metric: dict[str, list[str]] = {}
    by_group: dict[str, list[str]] = {}
    for key in sorted(set(keys)):
        method, metric, group = _split_key(key)
        if group is None:
            by_metric.setdefault(metric, []).append(_tag(key))
        else:
            by_group.setdefault(f"{method}/{metric}", []).append(_tag(key))
    from .metrics.registry import metric_names

    order = {name: i for i, name in enumerate(metric_names())}  # the registry's chart order, then by name
    layout: dict[str, dict[str, list[Any]]] = {}
    if by_metric:
        layout[PREFIX] = {m: ["Multiline", tags]
                          for m, tags in sorted(by_metric.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))}
    if by_group:
        layout[f"{PREFIX} per group"] = {m: ["Multiline", tags] for m, tags in sorted(by_group.items())}
    return layout


def _torch_file_writer(writer: Any) -> Any:
    """``torch.utils.tensorboard``'s way to its event file (``_get_file_writer``), which takes ``tensorboard``'s
    protos as they are; ``None`` for any other writer (tensorboardX has its own protos: use its public API)."""
    if not type(writer).__module__.startswith("torch.utils.tensorboard"):
        return None
    return getattr(writer, "_get_file_writer", None)


class TensorBoardSink(Sink):
    """Writes to a TensorBoard ``SummaryWriter``: overlay grids, scalars, a custom-scalars layout, text.

    ``target`` is a Lightning ``TensorBoardLogger`` (its ``experiment`` is used, created on first use) or a
    ``SummaryWriter`` (``torch.utils.tensorboard`` or ``tensorboardX``). Text and alerts (alarm firings) flush
    at once; the rest goes through the writer's own thread, which flushes every ``flush_secs``, and
    :meth:`flush`, which the monitor calls when fit, validate or test ends.

    Example:
        >>> import numpy as np, tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> sink = TensorBoardSink(SummaryWriter(tempfile.mkdtemp()))
        >>> sink.log_metrics({"gradcam/object_mass": 0.7, "gradient/object_mass": 0.5}, step=10)
        >>> sink.log_overlays("gradcam", [np.zeros((8, 8, 3), np.uint8)] * 4, ["a", "b", "c", "d"], step=10)
    """

    def __init__(self, target: Any, ncols: int | None = None) -> None:
        self._target = target
        self.ncols = ncols
        self._layout_keys: set[str] = set()
        self._step = 0

    @property
    def writer(self) -> Any:
        """The ``SummaryWriter``."""
        t = self._target
        return t.experiment if hasattr(t, "experiment") and not hasattr(t, "add_scalar") else t

    def _update_layout(self, keys: Iterable[str]) -> None:
        new = set(keys) - self._layout_keys
        if not new:
            return
        self._layout_keys |= new
        self.writer.add_custom_scalars(custom_scalars_layout(self._layout_keys))

    def log_metrics(self, metrics: Mapping[str, float | None], step: int) -> None:
        self._step = int(step)
        w = self.writer
        # a value the audit could not compute (None) is skipped; NaN is kept: TensorBoard shows the gap
        values = {_tag(key): float(value) for key, value in metrics.items() if value is not None}
        file_writer = _torch_file_writer(w)
        if file_writer is not None and values:
            # one event holding every scalar of the audit, as add_scalar would write each: one record for the
            # writer's thread to checksum and one slot of its small queue, instead of one per metric
            from tensorboard.compat.proto.summary_pb2 import Summary

            summary = Summary(value=[Summary.Value(tag=tag, simple_value=v) for tag, v in values.items()])
            file_writer().add_summary(summary, self._step)
        else:  # another writer (tensorboardX): its own API
            for tag, v in values.items():
                w.add_scalar(tag, v, self._step)
        self._update_layout(key for key, value in metrics.items() if value is not None)

    def log_overlays(self, method: str, images: Sequence[np.ndarray], captions: Sequence[str], step: int,
                     epoch: int | None = None, picture: np.ndarray | Picture | None = None) -> None:
        if not images:
            return
        self._step = int(step)
        if picture is None:
            picture = grid(list(images), list(captions) if captions is not None else None, ncols=self.ncols)
        self._add_png(f"{PREFIX}/{method}/overlays", picture if isinstance(picture, Picture) else Picture(picture))

    def _add_png(self, tag: str, picture: Picture) -> None:
        """An image summary from already-encoded PNG bytes (``add_image`` would encode it again)."""
        file_writer = _torch_file_writer(self.writer)
        if file_writer is None:  # another writer (tensorboardX): let it encode
            self.writer.add_image(tag, picture.array, self._step, dataformats="HWC")
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        h, w = picture.array.shape[:2]
        image = Summary.Image(height=h, width=w, colorspace=3 if picture.array.ndim == 3 else 1,
                              encoded_image_string=picture.png)
        file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), self._step)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        self._step = int(step)
        w = self.writer
        w.add_text(_tag(name), _markdown_table(columns, rows), self._step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self._step = int(step)
        w = self.writer
        w.add_text(_tag(tag), str(text), self._step)
        w.flush()

    def alert(self, title: str, text: str) -> None:
        try:
            w = self.writer
            w.add_text(f"{PREFIX}/alerts", f"**{title}**\n\n{text}", self._step)
            w.flush()
        except Exception:  # an alert must never break training
            pass

    def summary(self, metrics: Mapping[str, float | None]) -> None:
        rows = [[k, _finite(v)] for k, v in sorted(metrics.items())]
        w = self.writer
        w.add_text(f"{PREFIX}/summary", _markdown_table(["metric", "value"], rows), self._step)

    def flush(self) -> None:
        self.writer.flush()


# -- Weights & Biases -----------------------------------------------------------------------------------------
class WandbSink(Sink):
    """Logs to a W&B run: ``wandb.Image`` lists, ``wandb.Table``, scalars, summary and alerts.

    ``target`` is a Lightning ``WandbLogger`` (its ``experiment``, the run, is created on first use) or a
    ``wandb`` run. Every ``run.log`` call includes ``{"trainer/global_step": step}`` and ``saliency/*`` is
    defined with ``step_metric="trainer/global_step"``: the audit's points line up with Lightning's own metrics
    and W&B's monotonic internal step is never passed explicitly, so there are no step conflicts.
    Table cells that are ``uint8 [H, W, 3]`` arrays become ``wandb.Image``.

    Example (needs a W&B run, so not run here)::

        sink = WandbSink(WandbLogger(project="audit"))
        sink.log_overlays("gradcam", overlays, ["cat / dog / siteA", ...], step=trainer.global_step)
    """

    def __init__(self, target: Any) -> None:
        self._target = target
        self._defined = False

    @property
    def run(self) -> Any:
        """The W&B run."""
        t = self._target
        run = t.experiment if hasattr(t, "experiment") and not hasattr(t, "log") else t
        if not self._defined and hasattr(run, "define_metric"):
            run.define_metric(_STEP_KEY)
            run.define_metric(f"{PREFIX}/*", step_metric=_STEP_KEY, step_sync=True)
            self._defined = True
        return run

    def _log(self, payload: dict[str, Any], step: int) -> None:
        payload[_STEP_KEY] = int(step)
        self.run.log(payload)

    def log_metrics(self, metrics: Mapping[str, float | None], step: int) -> None:
        payload = {_tag(k): float(v) for k, v in metrics.items() if v is not None}
        if payload:
            self._log(payload, step)

    def log_overlays(self, method: str, images: Sequence[np.ndarray], captions: Sequence[str], step: int,
                     epoch: int | None = None, picture: np.ndarray | Picture | None = None) -> None:
        import wandb

        if not images:
            return
        caps = list(captions) if captions is not None else [None] * len(images)
        if len(caps) != len(images):
            raise ValueError(f"got {len(images)} overlays but {len(caps)} captions; pass one caption per image")
        pics = [wandb.Image(np.ascontiguousarray(im, dtype=np.uint8), caption=c) for im, c in zip(images, caps)]
        self._log({f"{PREFIX}/{method}/overlays": pics}, step)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        import wandb

        def cell(v: Any) -> Any:
            if isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.ndim == 3:
                return wandb.Image(v)
            if isinstance(v, np.generic):
                return v.item()
            if isinstance(v, float) and not math.isfinite(v):
                return None
            return v

        table = wandb.Table(columns=list(columns), data=[[cell(v) for v in row] for row in rows])
        self._log({_tag(name): table}, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        import wandb

        self._log({_tag(tag): wandb.Html(f"<pre>{html.escape(str(text))}</pre>", inject=False)}, step)

    def alert(self, title: str, text: str) -> None:
        try:
            import wandb

            run = self.run
            if hasattr(run, "alert"):
                run.alert(title=str(title), text=str(text), level=wandb.AlertLevel.WARN)
        except Exception:  # offline runs, no network, old wandb: an alert must never break training
            pass

    def summary(self, metrics: Mapping[str, float | None]) -> None:
        values = {_tag(k): _finite(v) for k, v in metrics.items()}
        self.run.summary.update({k: v for k, v in values.items() if v is not None})


# -- files ----------------------------------------------------------------------------------------------------
def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+\-]", "_", str(name)) or "_"


def grid_path(method: str, step: int, epoch: int | None = None) -> str:
    """The grid of ``method`` for one audit, relative to the ``saliency`` folder: ``images/<method>/epoch_XXXX.png``,
    or ``step_XXXXXXXX.png`` (global step) without an epoch.

    Example:
        >>> grid_path("gradcam++", step=40, epoch=3), grid_path("discovery/suspect_0", step=40)
        ('images/gradcam++/epoch_0003.png', 'images/discovery_suspect_0/step_00000040.png')
    """
    name = f"epoch_{int(epoch):04d}.png" if epoch is not None else f"step_{int(step):08d}.png"
    return f"images/{_safe_name(method)}/{name}"


class PngSink(Sink):
    """Writes each method's overlay grid to ``<save_dir>/images/<method>/epoch_XXXX.png``.

    Without an ``epoch`` the file is ``step_XXXXXXXX.png`` (global step). Paths written are kept in
    :attr:`written`.

    Example:
        >>> import numpy as np, tempfile
        >>> sink = PngSink(tempfile.mkdtemp())
        >>> p = sink.log_overlays("gradcam++", [np.zeros((8, 8, 3), np.uint8)], ["x"], step=7, epoch=3)
        >>> p.relative_to(sink.save_dir).as_posix()
        'images/gradcam++/epoch_0003.png'
    """

    def __init__(self, save_dir: str | os.PathLike, ncols: int | None = None) -> None:
        self.save_dir = Path(save_dir)
        self.ncols = ncols
        self.written: list[Path] = []

    def path_for(self, method: str, step: int, epoch: int | None = None) -> Path:
        """Where the grid of ``method`` for this audit goes."""
        return self.save_dir / grid_path(method, step, epoch)

    def log_overlays(self, method: str, images: Sequence[np.ndarray], captions: Sequence[str], step: int,
                     epoch: int | None = None, picture: np.ndarray | Picture | None = None) -> Path | None:
        if not images:
            return None
        if picture is None:
            picture = grid(list(images), list(captions) if captions is not None else None, ncols=self.ncols)
        path = save_png(picture if isinstance(picture, Picture) else Picture(picture), self.path_for(method, step, epoch))
        self.written.append(path)
        return path


# -- logger dispatch ------------------------------------------------------------------------------------------
_DISTRIBUTIONS = ("pytorch_lightning", "lightning.pytorch")


def _logger_classes(name: str) -> tuple[type, ...]:
    """``name`` (e.g. ``"TensorBoardLogger"``) from every Lightning distribution already imported.

    A logger of a distribution that was never imported cannot exist, so ``lightning`` is never imported here
    just to check.
    """
    classes = []
    for dist in _DISTRIBUTIONS:
        if dist.split(".")[0] not in sys.modules:
            continue
        try:
            mod = importlib.import_module(f"{dist}.loggers")
        except Exception:  # a broken optional install must not break the audit
            continue
        cls = getattr(mod, name, None)
        if isinstance(cls, type):
            classes.append(cls)
    return tuple(classes)


def sinks_for_loggers(loggers: Any, save_dir: str | os.PathLike, ncols: int | None = None,
                      always_png: bool = False) -> list[Sink]:
    """One sink per supported logger in ``loggers`` (``trainer.loggers``; a single logger or ``None`` work
    too); when none of them is a dashboard, a :class:`PngSink` writing to ``save_dir`` (``<log_dir>/saliency``).

    TensorBoard, W&B and MLflow loggers of ``pytorch_lightning`` and of ``lightning.pytorch`` get a sink that
    takes images; any other logger (CSV, ...) gets the scalars through its ``log_metrics`` (:class:`ScalarSink`).
    Without a logger that takes images the overlays go to PNG files beside the report; ``always_png=True``
    writes them even beside one.

    Example:
        >>> import tempfile
        >>> from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
        >>> d = tempfile.mkdtemp()
        >>> [type(s).__name__ for s in sinks_for_loggers([TensorBoardLogger(d), CSVLogger(d)], d)]
        ['TensorBoardSink', 'ScalarSink']
        >>> [type(s).__name__ for s in sinks_for_loggers([CSVLogger(d)], d)]
        ['ScalarSink', 'PngSink']
    """
    if loggers is None or loggers is False:
        loggers = []
    elif not isinstance(loggers, (list, tuple)):
        loggers = [loggers]
    tb_classes = _logger_classes("TensorBoardLogger")
    wandb_classes = _logger_classes("WandbLogger")
    mlflow_classes = _logger_classes("MLFlowLogger")
    sinks: list[Sink] = []
    seen: set[int] = set()
    for logger in loggers:
        if id(logger) in seen:
            continue
        seen.add(id(logger))
        if tb_classes and isinstance(logger, tb_classes):
            sinks.append(TensorBoardSink(logger, ncols=ncols))
        elif wandb_classes and isinstance(logger, wandb_classes):
            sinks.append(WandbSink(logger))
        elif mlflow_classes and isinstance(logger, mlflow_classes):
            from .sink_mlflow import MlflowSink  # its own module; it never imports mlflow

            sinks.append(MlflowSink(logger, save_dir, ncols=ncols))
        elif callable(getattr(logger, "log_metrics", None)):
            sinks.append(ScalarSink(logger))
    if always_png or not any(not isinstance(s, ScalarSink) for s in sinks):
        sinks.append(PngSink(save_dir, ncols=ncols))
    return sinks
