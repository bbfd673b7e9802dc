"""What :class:`~lightning_saliency.SaliencyMonitor` leaves behind after each audit: ``report.json``, the maps
files and probe thumbnails on disk, and scalars, overlay grids, captions and a per-image table on every logger.

One :class:`Recorder` per monitor holds the open report, the sinks (one per logger of the trainer) and the probe
images shown under the overlays (converted once). The monitor decides when to audit and computes the numbers; the
recorder only writes them, on rank 0 (under DDP the other ranks call :meth:`Recorder.open` for its collective
path lookup and nothing else). Writing never kills training: a disk or dashboard failure becomes an error in the
record, and one warning; a report that could not be written (a full disk) keeps the failure in its record, in
memory, and the next write that succeeds puts it on disk. The report on disk is only ever replaced whole. The
audit's health (:mod:`lightning_saliency.health`) goes into the record as ``health``, each problem also into its
``errors`` (warned about once per monitor, never raised), and onto every dashboard as the text
``saliency/health``.

One run, one report: :meth:`Recorder.open` continues the folder's report only for the same run
(:func:`lightning_saliency.runs.same_run`); another run's report is moved aside first
(:func:`lightning_saliency.runs.move_aside`).

Example:
    >>> recorder = Recorder(log_images=4, cmap="viridis")
    >>> recorder.report is None, recorder.sinks
    (True, [])
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import pytorch_lightning as pl
import torch

from .audit import SIGNED_METHODS, ShardResult
from .distributed import broadcast, world
from .health import describe, health_errors, health_line, problems
from .maps import normalize
from .probe import ProbeSet
from .report import (
    KEEP_MAPS,
    AuditReport,
    check_keep_maps,
    error_record,
    probe_info,
    remove_maps_file,
    save_maps,
    save_probe_thumbnails,
    stage_of,
    thin_maps,
)

__all__ = ["Recorder", "run_dir"]

_MIN_TILE = 96  # smallest side, in pixels, of an overlay on the dashboard


def run_dir(trainer: Any) -> str:
    """The run's own folder: the first logger's ``log_dir`` (TensorBoard, CSV); for loggers without one
    (W&B, MLflow) ``<save_dir>/<name>/<version>`` as checkpoints use, so that runs never share a report, with the
    trainer's ``default_root_dir`` for a logger without a ``save_dir`` (MLflow on a database or a server).

    ``trainer.log_dir`` is a collective under DDP (it broadcasts rank 0's path): every rank must call this.

    Example:
        >>> class Trainer:  # no logger
        ...     log_dir, default_root_dir, loggers = None, "runs", []
        >>> run_dir(Trainer())
        'runs'
    """
    root = trainer.log_dir or trainer.default_root_dir
    loggers = list(getattr(trainer, "loggers", []) or [])
    if loggers and getattr(loggers[0], "log_dir", None) is None:
        path = None
        if world(trainer)[0] == 0:
            logger = loggers[0]
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            path = os.path.join(str(logger.save_dir or trainer.default_root_dir), str(logger.name), version)
        root = broadcast(trainer, path)
    return str(root)


class Recorder:
    """Writes the monitor's audits: the report and maps on disk, scalars and pictures on the dashboards.

    Args:
        dirpath: where ``report.json``, maps and PNG grids go (default ``<run dir>/saliency``).
        save_maps: keep downsampled float16 maps of every audit under ``<dirpath>/maps``, and probe thumbnails.
        keep_maps: keep the maps files of at most this many audits, thinned evenly over the run past it (the first
            and the last always kept: :func:`lightning_saliency.mapfiles.thin_maps`); ``None``: every audit's.
        log_images: overlays logged per method and audit (0 disables images).
        class_names: names for captions (default: class indices).
        cmap: colormap of the overlays.
        image_colors: colours of the overlay grids' PNG palette (``None``: full colour).
        on_error: the monitor's ``on_error``: ``"collect"`` records an unhealthy audit without a warning.
        scorecard: score every method once at the end of fit (:meth:`record_scorecard`).

    Example:
        >>> Recorder(class_names=["cat", "dog"]).class_names
        ['cat', 'dog']
    """

    def __init__(self, dirpath: str | None = None, save_maps: bool = True, log_images: int = 16,
                 class_names: Sequence[str] | None = None, cmap: str = "jet", image_colors: int | None = 256,
                 on_error: str = "warn", scorecard: bool = False, keep_maps: int | None = KEEP_MAPS) -> None:
        self.dirpath, self.save_maps, self.log_images = dirpath, bool(save_maps), int(log_images)
        self.keep_maps = check_keep_maps(keep_maps)  # a bad value fails when the monitor is built
        self.scorecard = bool(scorecard)  # score the methods once at the end of fit (record_scorecard)
        self.on_error, self.warned_health = on_error, False
        self._last_texts: dict[str, str] = {}  # the dashboard texts last logged, by tag
        self.class_names = list(class_names) if class_names is not None else None
        self.cmap, self.image_colors = cmap, image_colors
        self.log_dir: str | None = None
        self.directory: str | None = None
        self.report: AuditReport | None = None
        self.sinks: list[Any] = []
        self.display: Any = None  # the probe images shown under the overlays, uint8 [n, H, W, 3]
        self.denormalize: Any = None  # {"mean", "std", ...}: the probe's pictures in true colours (config's)
        self.warned = False  # one warning per monitor for a failing sink or audit
        self.report_on_disk = False  # the last write of the report succeeded (thinned maps files may go)

    # -- one run ------------------------------------------------------------------------------------------------
    def open(self, trainer: Any, pl_module: Any, probe: ProbeSet, config: dict[str, Any],
             history: Sequence[dict[str, Any]], run_id: str | None = None, stage: str = "fit") -> str:
        """Find the run's folder (on every rank) and, on rank 0, open its report and one sink per logger; return
        the run id (``run_id``, or a new one when ``None``).

        ``config`` goes into the report's header, the run id too (:mod:`lightning_saliency.runs`): a report of
        another run in the folder is moved aside. ``history`` (audits restored from a checkpoint or made
        earlier by the monitor) is the truth for a fit: the report's fit audits after its last fit epoch are
        dropped (they are trained again). A validate or test continues the report as it is.
        """
        from .runs import new_run_id

        self.display, self._last_texts = None, {}  # new sinks: their first audit gets every text
        self.denormalize = config.get("denormalize")
        self.log_dir = run_dir(trainer)
        self.directory = str(self.dirpath) if self.dirpath else os.path.join(self.log_dir, "saliency")
        run_id = run_id or new_run_id()  # under DDP rank 0's is the one written and checkpointed
        if world(trainer)[0] == 0:
            self._open_report(trainer, pl_module, probe, config, history, run_id, stage)
        return run_id

    def _open_report(self, trainer: Any, pl_module: Any, probe: ProbeSet, config: dict[str, Any],
                     history: Sequence[dict[str, Any]], run_id: str | None, stage: str) -> None:
        from pytorch_lightning.utilities import rank_zero_info

        from .files import remove_leftovers
        from .runs import move_aside, same_run
        from .sinks import sinks_for_loggers

        directory = self.directory
        assert directory is not None
        os.makedirs(directory, exist_ok=True)
        for folder in (directory, os.path.join(directory, "maps")):  # what a killed run left half-written
            remove_leftovers(folder)
        report = AuditReport(os.path.join(directory, "report.json"))
        fresh = True
        if os.path.exists(report.path):
            old = None
            with contextlib.suppress(Exception):  # unreadable: another run's, kept aside like any other
                old = AuditReport.load(report.path)
            if old is not None and same_run(old.data, run_id, probe.fingerprint, history):
                report, fresh = old, False
            else:
                try:
                    moved = move_aside(directory, old.data if old is not None else None)
                except OSError as e:  # never written over: this run keeps no report, its dashboards go on
                    self.report, self.sinks = None, sinks_for_loggers(list(trainer.loggers), directory)
                    return self._failed(e, f"moving another run's {report.path} aside", "no report is written")
                rank_zero_info(f"lightning-saliency: {report.path} belonged to another run; moved it (and its "
                               f"maps) to {moved}, a new report starts")
        report.set_header(
            run={"id": run_id, "log_dir": self.log_dir, "model": type(pl_module).__name__,
                 "torch": torch.__version__, "lightning": pl.__version__, "precision": str(trainer.precision),
                 "world_size": world(trainer)[1]},
            probe=probe_info(probe),
            config=dict(config),
        )
        fit = [r for r in history if stage_of(r) == "fit"]
        if fit and stage == "fit" and not fresh:  # resumed: the checkpoint's audits are the truth
            report.truncate_after(fit[-1]["epoch"])
        for record in history:  # already there: replaced by the same record; missing (a new folder): added
            if fresh or stage_of(record) == "fit" and stage == "fit":
                if isinstance(record.get("maps"), str) and not os.path.isfile(os.path.join(directory, record["maps"])):
                    record = {**record, "maps": None}  # thinned (keep_maps) or in another folder: not here
                report.append_audit(record)
        self.report = report
        if self.save_maps:
            try:
                save_probe_thumbnails(directory, probe, denormalize=self.denormalize)
            except Exception as e:  # disk trouble must not kill training
                self._failed(e)
        self._write()
        self.sinks = sinks_for_loggers(list(trainer.loggers), directory)

    def _failed(self, exc: BaseException, what: str = "writing the maps", then: str = "recorded in the report") -> None:
        if not self.warned:
            self.warned = True
            warnings.warn(f"lightning-saliency: {what} failed ({type(exc).__name__}: {exc}); {then}, training "
                          "goes on", RuntimeWarning, stacklevel=3)

    def _write(self, record: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Write the report; when that fails (``ENOSPC``...), warn once and keep the failure in ``record`` (in
        memory) for the next write that succeeds. The file on disk stays the last complete report."""
        if self.report is None:
            return record
        try:
            self.report.write()
            self.report_on_disk = True  # what the report holds is on disk
        except Exception as e:
            self.report_on_disk = False
            self._failed(e, f"writing {self.report.path}")
            if record is not None:
                record = self.report.append_audit(
                    {**record, "errors": [*record["errors"], error_record(e, method=None)]}, replace=True)
        return record

    # -- one audit ----------------------------------------------------------------------------------------------
    def record(self, trainer: Any, result: ShardResult, metrics: dict[str, Any], probe: ProbeSet, epoch: int,
               started: float, images: bool = True, stage: str = "fit",
               discovery: dict[str, Any] | None = None) -> dict[str, Any]:
        """Build the audit's record, write it (report, maps) and log it (scalars, overlays, table); rank 0 only.

        ``result`` is the merged audit, ``metrics`` its summary; ``images=False`` logs no pictures (an audit
        being completed was already drawn). ``stage``: ``"fit"``, ``"validate"`` or ``"test"``. ``discovery``:
        the record's section (:mod:`lightning_saliency.discovery_audit`), also logged as the text
        ``saliency/discovery`` and one grid per confirmed candidate.
        """
        health = describe(result)
        record: dict[str, Any] = {
            "stage": stage, "epoch": int(epoch), "global_step": int(trainer.global_step),
            "duration_s": round(time.perf_counter() - started, 4), "precision": result.dtype, "metrics": metrics,
            "health": health, "errors": result.errors + health_errors(health), "maps": None,
        }
        masks = None
        if discovery is not None:  # the candidates' region masks go into the maps file, not the JSON record
            masks = discovery.get("masks")
            record["discovery"] = {k: v for k, v in discovery.items() if k != "masks"}
        if problems(health) and self.on_error != "collect" and not self.warned_health:
            self.warned_health = True
            warnings.warn(f"lightning-saliency: the audit at epoch {epoch} is unhealthy ({'; '.join(problems(health))}"
                          "): its metrics are null and `lightning-saliency gate` fails on it; recorded in the report, "
                          "training goes on", RuntimeWarning, stacklevel=3)
        report = self.report
        if result.maps and self.save_maps:
            index = 1 + sum(stage_of(a) == stage for a in report.audits) if report is not None else 1
            try:
                record["maps"] = save_maps(self.directory, epoch, result.maps, result.predictions, stage=stage,
                                           index=index, discovery_masks=masks)
            except Exception as e:  # disk trouble must not kill training
                record["errors"].append(error_record(e, method=None))
                self._failed(e)
        if report is not None:
            stored = report.append_audit(record)
            doomed = self._thin(report)  # the report says so first; the files go once it is on disk
            record = self._write(stored)
            self._remove(doomed)
        step = int(trainer.global_step)
        finite = {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}
        overlays = []
        if result.maps and self.log_images > 0 and self.sinks and images:
            from .render import Picture, grid

            # drawn and encoded once per audit, whatever the number of sinks
            overlays = [(method, tiles, captions, Picture(grid(tiles, captions), colors=self.image_colors))
                        for method, tiles, captions in self.overlays(result, probe)]
        logging_errors = len(record["errors"])
        table = self.table(result, probe) if overlays else None
        suspects = self.suspects(discovery, probe) if discovery and self.log_images > 0 and images else []
        texts = self._changed_texts(health, discovery) if self.sinks else {}
        for sink in self.sinks:
            try:
                sink.log_metrics(finite, step)
                for method, tiles, captions, picture in overlays:
                    sink.log_overlays(method, tiles, captions, step, epoch=epoch if stage == "fit" else None,
                                      picture=picture)  # a validate/test grid is named by step: fit's stay
                if table is not None:
                    sink.log_table("saliency/probe", *table, step)
                for tag, text in texts.items():
                    sink.log_text(tag, f"{stage} epoch {epoch}: {text}", step)
                for name, tiles, captions, picture in suspects:
                    sink.log_overlays(name, tiles, captions, step, epoch=epoch if stage == "fit" else None,
                                      picture=picture)
                sink.summary(finite)
            except Exception as e:
                record["errors"].append(error_record(e, method=None))
                if not self.warned:
                    self.warned = True
                    warnings.warn(f"lightning-saliency: logging to {type(sink).__name__} failed ({e}); the report "
                                  "on disk is complete", RuntimeWarning, stacklevel=2)
        if report is not None and len(record["errors"]) > logging_errors:  # keep the logging failure on disk too
            record = self._write(report.append_audit(record, replace=True))
        if result.errors and not self.warned:
            self.warned = True
        return dict(record)

    def _thin(self, report: AuditReport) -> list[str]:
        """Mark the audits whose maps file goes (``keep_maps``: :func:`~lightning_saliency.mapfiles.thin_maps`) in
        ``report``: ``maps`` null, ``maps_thinned`` the file's path. Returns every file to delete once the report is
        written: those, and any that an earlier thinning marked but did not delete (a crash in between)."""
        audits = report.audits
        for i in thin_maps(audits, self.keep_maps):
            audits[i]["maps_thinned"], audits[i]["maps"] = audits[i]["maps"], None
        return [a["maps_thinned"] for a in audits if isinstance(a.get("maps_thinned"), str) and not a.get("maps")]

    def _remove(self, files: Sequence[str]) -> None:
        """Delete thinned maps files, once the report that no longer points at them is on disk."""
        if not files or self.directory is None or not self.report_on_disk:
            return
        for rel in files:
            try:
                remove_maps_file(self.directory, rel)
            except OSError as e:  # a file that cannot go stays; the report is right either way
                self._failed(e, f"deleting {rel}", "it stays on disk")

    def _changed_texts(self, health: dict[str, str], discovery: dict[str, Any] | None) -> dict[str, str]:
        """The dashboard texts of this audit that differ from the last ones logged (health, discovery): a
        dashboard shows each change, not the same line at every audit."""
        texts = {"saliency/health": health_line(health)}
        if discovery is not None:
            from .suspects import section_lines

            texts["saliency/discovery"] = "\n".join(section_lines(discovery, self.class_names))
        changed = {tag: text for tag, text in texts.items() if self._last_texts.get(tag) != text}
        self._last_texts.update(changed)
        return changed

    def caption(self, probe: ProbeSet, i: int, prediction: int) -> str:
        """``"<label> / <prediction>[ / <group>]"`` of probe image ``i``, with class names when given.

        Example:
            >>> probe = ProbeSet(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), groups=["a", "b"])
            >>> Recorder(class_names=["cat", "dog"]).caption(probe, 1, 0)
            'dog / cat / b'
        """
        def name(k: int) -> str:
            return self.class_names[k] if self.class_names and 0 <= k < len(self.class_names) else str(k)

        parts = [name(int(probe.targets[i])), name(int(prediction))]
        if probe.groups is not None:
            parts.append(str(probe.groups[i]))
        return " / ".join(parts)

    def overlays(self, result: ShardResult, probe: ProbeSet) -> Iterator[tuple[str, list[Any], list[str]]]:
        """Per method: the first ``log_images`` overlays (uint8 ``[H, W, 3]`` each) and their captions."""
        import numpy as np

        from .render import overlays, to_image

        n = min(self.log_images, len(probe))
        # small inputs (CIFAR-sized) are blended at their own size, then enlarged with pixels kept sharp, so
        # overlays and captions stay legible; blocks of equal pixels also keep the PNG small (3x smaller here)
        scale = max(1, -(-_MIN_TILE // max(probe.inputs.shape[-2:])))
        if self.display is None or len(self.display) != n:  # the probe is fixed: converted once
            self.display = np.stack([to_image(probe.inputs[i].float(), self.denormalize) for i in range(n)])
        captions = [self.caption(probe, i, int(result.predictions[i])) for i in range(n)]
        for method, maps in result.maps.items():
            shown = normalize(maps[:n].abs() if method in SIGNED_METHODS else maps[:n])
            tiles = overlays(self.display, shown.numpy(), cmap=self.cmap)
            if scale > 1:
                tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
            yield method, list(tiles), captions

    def suspects(self, discovery: dict[str, Any], probe: ProbeSet) -> list[tuple[str, list[Any], list[str], Any]]:
        """Per confirmed candidate: ``("discovery/suspect_<i>", tiles, captions, picture)``, its first
        ``log_images`` members with the region outlined (its mask when the section has them, else its box), the
        first caption with the flip rate and its null (the text ``saliency/discovery`` has the whole
        :func:`~.suspects.candidate_line`)."""
        from .render import Picture, grid, outline, outline_mask, to_image
        from .suspects import class_name

        out = []
        scale = max(1, -(-_MIN_TILE // max(probe.inputs.shape[-2:])))
        cands, masks = discovery.get("candidates") or [], discovery.get("masks")
        for i, k in enumerate(k for k, c in enumerate(cands) if c.get("confirmed")):
            c, members = cands[k], list(cands[k]["members"])[: self.log_images]
            box = [int(v) * scale for v in c["region"]]
            mask = masks[k] if masks is not None and k < len(masks) else None
            tiles = [outline_mask(t, mask, width=scale) if mask is not None else outline(t, box, width=scale)
                     for t in (to_image(probe.inputs[j].float(), self.denormalize).repeat(scale, 0).repeat(scale, 1) for j in members)]
            captions = [f"#{j}: {class_name(int(probe.targets[j]), self.class_names)}" for j in members]
            captions[0] += f" | flip {c['flip_rate']:.2f} vs null {c['null_flip_rate']:.2f}"  # the text has the rest
            out.append((f"discovery/suspect_{i}", tiles, captions,
                        Picture(grid(tiles, captions), colors=self.image_colors)))
        return out

    @staticmethod
    def table(result: ShardResult, probe: ProbeSet) -> tuple[list[str], list[list[Any]]]:
        """One row per probe image: index, label, prediction, group and its per-image metric values."""
        keys = sorted(result.per_image)
        values = [result.per_image[k].tolist() for k in keys]
        labels, predictions = probe.targets.tolist(), result.predictions.tolist()
        groups = probe.groups if probe.groups is not None else [""] * len(probe)
        rows = [[i, labels[i], predictions[i], str(groups[i]), *(column[i] for column in values)]
                for i in range(len(probe))]
        return ["index", "label", "prediction", "group", *keys], rows

    # -- alarms and the end of a run ----------------------------------------------------------------------------
    def record_alarm(self, firing: dict[str, Any]) -> None:
        """Write an alarm firing into the report and onto the dashboards (call on rank 0)."""
        if self.report is not None:
            self.report.append_alarm(firing)
            self._write()
        text = (f"{firing['name']}: {firing['metric']} = {firing['value']:.4g} "
                f"{'>' if firing['mode'] == 'max' else '<'} {firing['threshold']:.4g} at epoch {firing['epoch']} "
                f"(action: {firing['action']})")
        for sink in self.sinks:
            with contextlib.suppress(Exception):
                sink.log_text("saliency/alarms", text, int(firing["global_step"]))
                sink.alert("lightning-saliency alarm", text)

    def record_scorecard(self, trainer: Any, pl_module: Any, probe: ProbeSet, spec: Any) -> None:
        """With ``scorecard=True``: score every method of ``spec`` once (:func:`lightning_saliency.scorecards.score`,
        the scorecard's default metrics) into the report's ``scorecard`` section and onto the dashboards as text.

        Rank 0 only, on the whole probe: the other ranks return at once (the scorecard runs no collective). A
        failure is recorded in the section (``rows`` empty, the reason in ``notes``) and warned about, unless
        ``on_error="raise"``.
        """
        if not self.scorecard or world(trainer)[0] != 0:
            return
        import dataclasses

        from .scorecards import Scorecard, default_metrics, score

        try:
            card = score(pl_module, probe, dataclasses.replace(spec, metrics=default_metrics()), on_error=self.on_error)
        except Exception as e:
            if self.on_error == "raise":
                raise
            if self.on_error == "warn":
                warnings.warn(f"lightning-saliency: the scorecard failed ({type(e).__name__}: {e}); recorded in the "
                              "report", RuntimeWarning, stacklevel=2)
            card = Scorecard([], [], notes=[f"the scorecard failed: {type(e).__name__}: {e}"])
        card.info.update(epoch=max(int(trainer.current_epoch) - 1, 0), global_step=int(trainer.global_step))
        if self.report is not None:
            self.report.set_scorecard(card.to_dict())
            self._write()
        for sink in self.sinks:
            with contextlib.suppress(Exception):
                sink.log_text("saliency/scorecard", card.to_text(), int(trainer.global_step))

    def flush(self) -> None:
        """Push every sink's buffered output to disk. Between audits the writers flush on their own schedule
        (TensorBoard: its writer thread, every ``flush_secs``), off the training thread."""
        for sink in self.sinks:
            with contextlib.suppress(Exception):
                sink.flush()
