"""Lightning callbacks: :class:`SaliencyMonitor` audits the model on a fixed probe set while it trains,
:class:`ShortcutAlarm` turns an audited metric into a warning, an early stop or an error.

Orchestration only: the maps come from :mod:`lightning_saliency.methods`, the numbers from
:mod:`lightning_saliency.metrics` (through :mod:`lightning_saliency.audit`), the pictures from
:mod:`lightning_saliency.render`, the files from :mod:`lightning_saliency.report` and the dashboards from
:mod:`lightning_saliency.sinks`.

Both classes inherit from ``pytorch_lightning.Callback`` and, when the ``lightning`` distribution is installed
too, from ``lightning.pytorch.Callback``: the same object is accepted by either ``Trainer``.

Example:
    >>> import torch
    >>> from lightning_saliency import ProbeSet
    >>> probe = ProbeSet(torch.rand(8, 3, 32, 32), torch.zeros(8, dtype=torch.long))
    >>> monitor = SaliencyMonitor(probe, methods=("gradcam", "gradient"))
    >>> alarm = ShortcutAlarm(metric="gradcam/spurious_mass", threshold=0.35, patience=2, action="stop")
    >>> # pl.Trainer(callbacks=[monitor, alarm]).fit(model, datamodule)
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import nn

from .audit import (
    DEFAULT_METRICS,
    SIGNED_METHODS,
    AuditSpec,
    ShardResult,
    audit_shard,
    merge,
    summarize,
)
from .guard import SideEffectGuard
from .maps import normalize
from .metrics import registry as metric_registry
from .probe import ProbeSet
from .report import AuditReport, error_record, probe_info, save_maps, save_probe_thumbnails

__all__ = ["SaliencyMonitor", "ShortcutAlarm", "ShortcutDetected"]


def _callback_bases() -> tuple[type, ...]:
    bases: list[type] = [pl.Callback]
    try:
        import lightning.pytorch as lpt

        if lpt.Callback is not pl.Callback:
            bases.append(lpt.Callback)
    except ImportError:  # only pytorch-lightning is installed
        pass
    return tuple(bases)


_Base = type("_Base", _callback_bases(), {"__doc__": "A callback for both Lightning distributions."})


_MIN_TILE = 96  # smallest side, in pixels, of an overlay on the dashboard


class ShortcutDetected(RuntimeError):
    """Raised by :class:`ShortcutAlarm` with ``action="raise"``."""


@contextlib.contextmanager
def _eager() -> Iterator[None]:
    """Run ``torch.compile``-d code eagerly inside the audit, so the hooks on the target layer are honoured."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield


def _world(trainer: Any) -> tuple[int, int]:
    return int(getattr(trainer, "global_rank", 0)), int(getattr(trainer, "world_size", 1))


def _gather(trainer: Any, obj: Any) -> list[Any]:
    _, world = _world(trainer)
    if world == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _broadcast(trainer: Any, obj: Any) -> Any:
    _, world = _world(trainer)
    if world == 1:
        return obj
    return trainer.strategy.broadcast(obj, src=0)


@contextlib.contextmanager
def _rank0_buffers(trainer: Any, module: nn.Module) -> Iterator[None]:
    """Under DDP, audit every shard with rank 0's buffers (BatchNorm statistics, the model a checkpoint holds):
    each rank updated its own in its last training step. The rank's own buffers are restored afterwards."""
    _, world = _world(trainer)
    buffers = list(module.buffers())
    if world == 1 or not buffers or not torch.distributed.is_available() or \
            not torch.distributed.is_initialized():
        yield
        return
    with torch.inference_mode(False), torch.no_grad():
        saved = [b.detach().clone() for b in buffers]
        for b in buffers:
            torch.distributed.broadcast(b, src=0)
    try:
        yield
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


class SaliencyMonitor(_Base):
    """Audit what the model looks at, on a fixed probe set, every ``every_n_epochs`` training epochs.

    Each audit (at the end of an audited training epoch, after validation; at the end of fit if the last epoch
    was not audited; at the end of ``trainer.validate``/``trainer.test``; never during the sanity check)
    computes the maps of ``methods`` on the probe in eval mode with gradients enabled, scores them with
    ``metrics``, logs overlays and scalars to every logger of the trainer and appends a record to
    ``<log_dir>/saliency/report.json``. The model, its gradients, its train/eval flags and every random
    generator are left exactly as found: training with and without the monitor is bit-identical.

    Args:
        probe: the fixed probe set. ``None`` builds one at the start of fit from the datamodule's (or model's)
            validation dataloader with ``probe_size`` and ``probe_seed``.
        methods: attribution methods, e.g. ``("gradcam", "gradient")``; see
            :data:`lightning_saliency.methods.engine.METHODS`.
        layer: target layer of the CAM-family methods: ``"auto"``, a dotted module name, or a module.
        every_n_epochs: audit every n-th training epoch.
        metrics: metric names: the rows of :mod:`lightning_saliency.metrics.registry` (and metrics added with
            :func:`~lightning_saliency.register_metric`); default: the rows marked default (the cheap ones). The
            expensive ones (faithfulness, sanity) are opt-in.
        log_images: overlays logged per method and audit (0 disables images).
        batch_size: chunk size of the attribution passes (default: the whole probe shard at once).
        on_error: ``"warn"`` (default: a failing audit warns once, is recorded in the report, training goes on)
            or ``"raise"``.
        expensive_every_n_audits: how often the metrics that run the model again run (stability, and the
            expensive ones when listed): every n-th audit (1 = every audit) and always at the last audit of a
            fit, validate or test, so the final report has them. The others run at every audit.
        target: explain the model's ``"prediction"`` or the probe's ``"label"``.
        probe_size, probe_seed: used when ``probe`` is None.
        allow_probe_change: accept resuming from a checkpoint whose probe fingerprint differs.
        dirpath: where ``report.json``, maps and PNG grids go (default ``<trainer.log_dir>/saliency``).
        save_maps: keep downsampled float16 maps of every audit under ``<dirpath>/maps`` (for reports).
        class_names: names for captions (default: class indices).
        cmap: colormap of the overlays (``"jet"`` or ``"viridis"``, any matplotlib name).
        image_colors: colours of the overlay grids' PNG palette (256: the eye sees no difference and the
            file is less than half; ``None``: full-colour PNG).
        method_options: extra options for :func:`~lightning_saliency.attribute` (e.g. ``{"ig_steps": 16}``).
        stability_images: probe images used by the stability metric (the first ones; ``None`` = all).
        expensive_images: probe images used by the expensive metrics.
        seed: seed of the metrics' own random draws (never the global generators).

    Example:
        >>> import torch
        >>> from lightning_saliency import ProbeSet
        >>> probe = ProbeSet(torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 0, 1]))
        >>> SaliencyMonitor(probe, methods=("gradcam",), every_n_epochs=2).every_n_epochs
        2
    """

    def __init__(
        self,
        probe: ProbeSet | None = None,
        methods: Sequence[str] = ("gradcam", "gradient"),
        layer: str | nn.Module = "auto",
        every_n_epochs: int = 1,
        metrics: Sequence[str] | None = None,
        log_images: int = 16,
        batch_size: int | None = None,
        on_error: Literal["warn", "raise"] = "warn",
        expensive_every_n_audits: int = 5,
        target: Literal["prediction", "label"] = "prediction",
        probe_size: int = 64,
        probe_seed: int = 0,
        allow_probe_change: bool = False,
        dirpath: str | None = None,
        save_maps: bool = True,
        class_names: Sequence[str] | None = None,
        cmap: str = "jet",
        image_colors: int | None = 256,
        method_options: dict[str, Any] | None = None,
        stability_images: int | None = 8,
        expensive_images: int | None = 16,
        seed: int = 0,
    ) -> None:
        if probe is not None and not isinstance(probe, ProbeSet):
            raise TypeError(f"probe must be a lightning_saliency.ProbeSet (or None to draw one from the validation "
                            f"data), got {type(probe).__name__}; build one with ProbeSet.from_dataset(...)")
        if int(every_n_epochs) < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
        if int(expensive_every_n_audits) < 1:
            raise ValueError(f"expensive_every_n_audits must be >= 1, got {expensive_every_n_audits}")
        if int(probe_size) < 1:
            raise ValueError(f"probe_size must be >= 1, got {probe_size}")
        self.probe = probe
        self.layer = layer
        self.every_n_epochs = int(every_n_epochs)
        self.log_images = int(log_images)
        self.on_error = on_error
        self.expensive_every_n_audits = int(expensive_every_n_audits)
        self.probe_size, self.probe_seed = int(probe_size), int(probe_seed)
        self.allow_probe_change = bool(allow_probe_change)
        self.dirpath = dirpath
        self.save_maps = bool(save_maps)
        self.class_names = list(class_names) if class_names is not None else None
        self.cmap = cmap
        if image_colors is not None and not 2 <= int(image_colors) <= 256:
            raise ValueError(f"image_colors must be between 2 and 256 (a PNG palette) or None, got {image_colors}")
        self.image_colors = None if image_colors is None else int(image_colors)
        # validated now: an unknown method or metric is a configuration error, not a mid-training surprise
        self.spec = AuditSpec(methods=tuple(methods), metrics=tuple(metrics) if metrics is not None else DEFAULT_METRICS,
                              layer="auto", batch_size=batch_size, target=target,
                              method_options=dict(method_options or {}), stability_images=stability_images,
                              expensive_images=expensive_images, seed=seed)
        self.history: list[dict[str, Any]] = []
        self._alarms: list[ShortcutAlarm] = []
        self._loaded_fingerprint: str | None = None
        self._prepared_for: tuple[int, int] | None = None
        self._shard: ProbeSet | None = None
        self._moved: tuple[Any, ProbeSet] | None = None  # the shard on the module's device and dtype
        self._display: Any = None  # the probe images shown under the overlays, uint8 [n, H, W, 3]
        self._prev_maps: dict[str, torch.Tensor] | None = None
        self._prev_maps_used: dict[str, torch.Tensor] | None = None  # the ones the last audit compared with
        self._prev_ranks: dict[str, torch.Tensor] | None = None  # the same maps ranked (drift ranks each map once)
        self._prev_ranks_used: dict[str, torch.Tensor] | None = None
        self._last_audit: tuple[int, int] | None = None  # (trainer, epoch) of the last audit this process made
        self._report: AuditReport | None = None
        self._sinks: list[Any] = []
        self._warned = False

    # -- identity and state ------------------------------------------------------------------------------------
    @property
    def methods(self) -> tuple[str, ...]:
        return self.spec.methods

    @property
    def state_key(self) -> str:
        return self._generate_state_key(methods=list(self.spec.methods), every_n_epochs=self.every_n_epochs)

    def state_dict(self) -> dict[str, Any]:
        fingerprint = self.probe.fingerprint if self.probe is not None else self._loaded_fingerprint
        return {"fingerprint": fingerprint, "history": [dict(r) for r in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_fingerprint = state_dict.get("fingerprint")
        self.history = [dict(r) for r in state_dict.get("history", [])]
        self._prepared_for = None  # re-check the probe against the checkpoint's at the next start

    def expected_keys(self) -> list[str]:
        """The ``<method>/<metric>`` keys this monitor can report (per-group keys add ``/<group>``)."""
        keys = [f"{m}/{k}" for m in self.spec.methods for k in self.spec.metrics]
        keys += [f"{m}/{k}{suffix}" for m in self.spec.methods for k in self.spec.metrics
                 for suffix in metric_registry.get_metric(k).extra_keys]
        return keys + ["probe/accuracy"]

    @property
    def latest(self) -> dict[str, Any] | None:
        """The last audit record (``{"epoch", "global_step", "metrics", "errors", ...}``), on every rank."""
        return self.history[-1] if self.history else None

    # -- setup: every configuration error surfaces here, before the first training step -------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.probe is None and _eval_source(trainer) is None and getattr(trainer, "datamodule", None) is None \
                and not _overrides(pl_module, "val_dataloader"):
            raise ValueError("SaliencyMonitor has no probe: pass probe=ProbeSet.from_dataset(val_set, size=64), or "
                             "give the Trainer validation data to draw one from (val_dataloaders=..., a datamodule "
                             "or a model that defines val_dataloader())")

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._prepare(trainer, pl_module)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if _stage(trainer) == "validate":
            self._prepare(trainer, pl_module)

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._prepare(trainer, pl_module)

    def _prepare(self, trainer: Any, pl_module: Any) -> None:
        if self._prepared_for == (id(trainer), id(pl_module)):
            return
        if self.probe is None:
            with torch.inference_mode(False):  # validate/test get here under inference mode: no inference tensors
                self.probe = self._probe_from_data(trainer, pl_module)
        probe = self.probe
        if self._loaded_fingerprint is not None and self._loaded_fingerprint != probe.fingerprint:
            if not self.allow_probe_change:
                raise ValueError(
                    "the probe set differs from the one in the checkpoint being resumed (fingerprint "
                    f"{probe.fingerprint[:12]} vs {self._loaded_fingerprint[:12]}): audits before and after would not "
                    "be comparable. Resume with the same probe, or pass allow_probe_change=True")
            self.history = []
        device = pl_module.device
        example = probe.inputs[:2].to(device)
        param = next(pl_module.parameters(), None)
        if param is not None and param.is_floating_point() and example.is_floating_point():
            example = example.to(param.dtype)
        # the probe must fit the model: one guarded forward, here rather than at the first audit
        try:
            with _eager(), SideEffectGuard(pl_module), torch.no_grad():
                logits = pl_module(example)
        except Exception as e:
            raise ValueError(f"the probe's inputs {tuple(probe.inputs.shape)} do not fit the model "
                             f"({type(e).__name__}: {e}). Build the probe from the data the model trains on, "
                             f"e.g. ProbeSet.from_dataset(val_set)") from e
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            raise ValueError("SaliencyMonitor needs the model's forward to return logits [N, num_classes], got "
                             f"{type(logits).__name__} {tuple(getattr(logits, 'shape', ()))}; wrap the model so "
                             "that forward(x) returns class scores")
        if int(probe.targets.max()) >= logits.shape[1]:
            raise ValueError(f"the probe has target {int(probe.targets.max())} but the model has {logits.shape[1]} "
                             f"classes; build the probe from the model's own dataset")
        from .layers import resolve_layer

        try:
            target = resolve_layer(pl_module, self.layer, example_input=example)
        except ValueError as e:
            raise ValueError(f"SaliencyMonitor(layer={self.layer!r}): {e}") from e
        self.spec.layer = target
        self.layer_name = target.name
        rank, world = _world(trainer)
        # positions are counted in this probe (a probe made with subset() keeps its parent's otherwise)
        self._shard = probe.shard(rank, world)
        self._moved = None
        self._display = None
        self._prepared_for = (id(trainer), id(pl_module))
        self._prev_maps = None
        self._prev_ranks = None
        # trainer.log_dir is a collective under DDP (it broadcasts rank 0's path): every rank asks, here
        self._log_dir = self._run_dir(trainer)
        self._directory = str(self.dirpath) if self.dirpath else os.path.join(self._log_dir, "saliency")
        if rank == 0:
            self._open_report(trainer, pl_module)

    def _probe_from_data(self, trainer: Any, pl_module: Any) -> ProbeSet:
        source = trainer.datamodule if getattr(trainer, "datamodule", None) is not None else pl_module
        try:
            evaluation = _eval_source(trainer)
            loader = evaluation.dataloader() if evaluation is not None else source.val_dataloader()
            if isinstance(loader, dict):  # several evaluation loaders: the first one
                loader = next(iter(loader.values()))
            elif isinstance(loader, (list, tuple)):
                loader = loader[0]
        except Exception as e:
            raise ValueError("SaliencyMonitor could not draw a probe from val_dataloader() "
                             f"({type(e).__name__}: {e}); pass probe=ProbeSet.from_dataset(...)") from e
        return ProbeSet.from_dataloader(loader, size=self.probe_size, seed=self.probe_seed)

    @staticmethod
    def _run_dir(trainer: Any) -> str:
        """The run's own folder: the first logger's ``log_dir`` (TensorBoard, CSV); for loggers without one
        (W&B) ``<save_dir>/<name>/<version>`` as checkpoints use, so that runs never share a report."""
        root = trainer.log_dir or trainer.default_root_dir
        loggers = list(getattr(trainer, "loggers", []) or [])
        if loggers and getattr(loggers[0], "log_dir", None) is None and loggers[0].save_dir:
            path = None
            if _world(trainer)[0] == 0:
                logger = loggers[0]
                version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
                path = os.path.join(str(logger.save_dir), str(logger.name), version)
            root = _broadcast(trainer, path)
        return str(root)

    def _open_report(self, trainer: Any, pl_module: Any) -> None:
        from .files import remove_leftovers
        from .sinks import sinks_for_loggers

        directory = self._directory
        os.makedirs(directory, exist_ok=True)
        for folder in (directory, os.path.join(directory, "maps")):  # what a killed run left half-written
            remove_leftovers(folder)
        report = AuditReport(os.path.join(directory, "report.json"))
        if os.path.exists(report.path):
            with contextlib.suppress(Exception):
                report = AuditReport.load(report.path)
        report.set_header(
            run={"log_dir": self._log_dir, "model": type(pl_module).__name__,
                 "torch": torch.__version__, "lightning": pl.__version__, "precision": str(trainer.precision),
                 "world_size": _world(trainer)[1]},
            probe=probe_info(self.probe),
            config={"methods": list(self.spec.methods), "layer": self.layer_name, "metrics": list(self.spec.metrics),
                    "every_n_epochs": self.every_n_epochs},
        )
        if self.history:  # resumed: the checkpoint's audits are the truth, later ones are replaced
            report.truncate_after(self.history[-1]["epoch"])
            for record in self.history:
                report.append_audit(record)
        if self.save_maps:
            save_probe_thumbnails(directory, self.probe)
        report.write()
        self._report = report
        self._sinks = sinks_for_loggers(list(trainer.loggers), directory)

    # -- when to audit ------------------------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if getattr(trainer, "sanity_checking", False):
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.audit(trainer, pl_module, epoch=trainer.current_epoch,
                       periodic=len(self.history) % self.expensive_every_n_audits == 0 or self._final_epoch(trainer))

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        epoch = max(int(trainer.current_epoch) - 1, 0)
        if self._prepared_for == (id(trainer), id(pl_module)):
            if not any(r["epoch"] == epoch for r in self.history):
                self.audit(trainer, pl_module, epoch=epoch, periodic=True)
            elif self._lacks_periodic(self.history[-1]) and \
                    self._last_audit == (id(trainer), self.history[-1]["epoch"]):
                # training ended where nobody could tell in advance (an alarm's stop, a time limit, ...): the last
                # audit, made in this fit, gets the periodic metrics it skipped, from the same weights and the same
                # previous maps
                self._complete(trainer, pl_module)
        self._flush()

    def _lacks_periodic(self, record: dict[str, Any]) -> bool:
        wanted = set(metric_registry.metric_names(periodic=True)) & set(self.spec.metrics)
        return bool(wanted) and not any(k.split("/")[1] in wanted for k in record.get("metrics", {}) if "/" in k)

    def _final_epoch(self, trainer: Any) -> bool:
        """Whether the epoch ending now is the fit's last one, as far as can be told before it ends."""
        if getattr(trainer, "should_stop", False):
            return True
        max_epochs = getattr(trainer, "max_epochs", None)
        if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs:
            return True
        max_steps = getattr(trainer, "max_steps", -1)
        return max_steps is not None and max_steps > 0 and trainer.global_step >= max_steps

    def _complete(self, trainer: Any, pl_module: Any) -> None:
        last = self.history[-1]
        current = self._prev_maps, self._prev_ranks
        self._prev_maps, self._prev_ranks = self._prev_maps_used, self._prev_ranks_used
        try:
            self.audit(trainer, pl_module, epoch=last["epoch"], periodic=True, _completing=last)
        finally:
            self._prev_maps, self._prev_ranks = current

    def _flush(self) -> None:
        """Push every sink's buffered output to disk. Between audits the writers flush on their own schedule
        (TensorBoard: its writer thread, every ``flush_secs``), off the training thread."""
        for sink in self._sinks:
            with contextlib.suppress(Exception):
                sink.flush()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if _stage(trainer) == "validate" and not getattr(trainer, "sanity_checking", False):
            self.audit(trainer, pl_module, epoch=trainer.current_epoch, periodic=True)
            self._flush()

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self.audit(trainer, pl_module, epoch=trainer.current_epoch, periodic=True)
        self._flush()

    # -- one audit ----------------------------------------------------------------------------------------------
    def audit(self, trainer: Any, pl_module: Any, epoch: int, periodic: bool = True,
              _completing: dict[str, Any] | None = None) -> dict[str, Any]:
        """Audit now and return the record (on every rank). Called by the hooks; callable by hand too.

        ``periodic=False`` skips the metrics that run the model again (stability and the expensive ones; see
        :data:`~lightning_saliency.audit.PERIODIC_METRICS`); the hooks pass it for all but every
        ``expensive_every_n_audits``-th audit and the last one.
        """
        self._prepare(trainer, pl_module)
        rank, _ = _world(trainer)
        started = time.perf_counter()
        with _rank0_buffers(trainer, pl_module):
            result = self._audit_shard(pl_module, bool(periodic))
        self._prev_maps_used, self._prev_ranks_used = self._prev_maps, self._prev_ranks
        if result.maps:
            self._prev_maps, self._prev_ranks = result.maps, result.ranks or None
        gathered = _gather(trainer, result)
        record = None
        if rank == 0:
            record = self._record_and_log(trainer, merge(gathered), epoch, started, images=_completing is None)
        record = _broadcast(trainer, record)
        self.history = [r for r in self.history if r["epoch"] != record["epoch"]] + [record]
        self._last_audit = (id(trainer), int(record["epoch"]))
        for alarm in self._alarms:
            # completing an audit: only the alarms on the metrics it adds have something new to read
            if _completing is None or alarm.metric not in _completing.get("metrics", {}):
                alarm.check(trainer, self, record)
        return record

    def _audit_shard(self, pl_module: Any, expensive: bool) -> ShardResult:
        shard = self._shard
        assert shard is not None
        indices = getattr(shard, "indices", None)
        indices = torch.as_tensor(indices) if indices is not None else torch.arange(len(shard))
        if len(shard) == 0:
            return ShardResult(indices=indices, predictions=torch.zeros(0, dtype=torch.long))
        device = pl_module.device
        param = next(pl_module.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else None
        if self._moved is None or self._moved[0] != (device, dtype):  # moved once, reused audit after audit
            moved = shard.to(device)
            if dtype is not None and dtype != moved.inputs.dtype:
                moved = ProbeSet(moved.inputs.to(dtype), moved.targets, moved.groups, moved.object_masks,
                                 moved.spurious_masks, indices=moved.indices)  # positions pick the metric subsets
            self._moved = ((device, dtype), moved)
        moved = self._moved[1]
        try:
            with _eager(), SideEffectGuard(pl_module):
                result = audit_shard(pl_module, moved, self.spec, previous_maps=self._prev_maps,
                                     previous_ranks=self._prev_ranks, expensive=expensive, on_error=self.on_error)
        except Exception as e:
            if self.on_error == "raise":
                raise
            warnings.warn(f"lightning-saliency: the audit failed ({type(e).__name__}: {e}); recorded in the report, "
                          "training goes on (pass on_error='raise' to stop instead)", RuntimeWarning, stacklevel=2)
            result = ShardResult(indices=indices, predictions=torch.full((len(shard),), -1),
                                 errors=[error_record(e)])
        result.indices = indices
        return result

    def _record_and_log(self, trainer: Any, result: ShardResult, epoch: int, started: float,
                        images: bool = True) -> dict[str, Any]:
        probe = self.probe
        assert probe is not None
        metrics = summarize(result, probe, self.spec) if result.maps else {}
        record: dict[str, Any] = {
            "epoch": int(epoch), "global_step": int(trainer.global_step),
            "duration_s": round(time.perf_counter() - started, 4),
            "precision": result.dtype, "metrics": metrics, "errors": result.errors, "maps": None,
        }
        report = self._report
        directory = self._directory
        if result.maps and self.save_maps:
            try:
                record["maps"] = save_maps(directory, epoch, result.maps, result.predictions)
            except Exception as e:  # disk trouble must not kill training
                record["errors"].append(error_record(e, method=None))
        if report is not None:
            record = report.append_audit(record)
            report.write()
        step = int(trainer.global_step)
        finite = {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}
        overlays = []
        if result.maps and self.log_images > 0 and self._sinks and images:
            from .render import Picture, grid

            # drawn and encoded once per audit, whatever the number of sinks
            overlays = [(method, images, captions, Picture(grid(images, captions), colors=self.image_colors))
                        for method, images, captions in self._overlays(result)]
        logging_errors = len(record["errors"])
        table = self._table(result) if overlays else None
        for sink in self._sinks:
            try:
                sink.log_metrics(finite, step)
                for method, images, captions, picture in overlays:
                    sink.log_overlays(method, images, captions, step, epoch=epoch, picture=picture)
                if table is not None:
                    sink.log_table("saliency/probe", *table, step)
                sink.summary(finite)
            except Exception as e:
                record["errors"].append(error_record(e, method=None))
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"lightning-saliency: logging to {type(sink).__name__} failed ({e}); the report "
                                  "on disk is complete", RuntimeWarning, stacklevel=2)
        if report is not None and len(record["errors"]) > logging_errors:  # keep the logging failure on disk too
            record = report.append_audit(record)
            report.write()
        if result.errors and not self._warned:
            self._warned = True
        return dict(record)

    def _caption(self, i: int, prediction: int) -> str:
        probe = self.probe
        assert probe is not None
        def name(k: int) -> str:
            return self.class_names[k] if self.class_names and 0 <= k < len(self.class_names) else str(k)

        parts = [name(int(probe.targets[i])), name(int(prediction))]
        if probe.groups is not None:
            parts.append(str(probe.groups[i]))
        return " / ".join(parts)

    def _overlays(self, result: ShardResult) -> Iterator[tuple[str, list[Any], list[str]]]:
        import numpy as np

        from .render import overlays, to_image

        probe = self.probe
        assert probe is not None
        n = min(self.log_images, len(probe))
        # small inputs (CIFAR-sized) are blended at their own size, then enlarged with pixels kept sharp, so
        # overlays and captions stay legible; blocks of equal pixels also keep the PNG small (3x smaller here)
        scale = max(1, -(-_MIN_TILE // max(probe.inputs.shape[-2:])))
        if self._display is None or len(self._display) != n:  # the probe is fixed: converted once
            self._display = np.stack([to_image(probe.inputs[i].float()) for i in range(n)])
        captions = [self._caption(i, int(result.predictions[i])) for i in range(n)]
        for method, maps in result.maps.items():
            shown = normalize(maps[:n].abs() if method in SIGNED_METHODS else maps[:n])
            tiles = overlays(self._display, shown.numpy(), cmap=self.cmap)
            if scale > 1:
                tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
            yield method, list(tiles), captions

    def _table(self, result: ShardResult) -> tuple[list[str], list[list[Any]]]:
        """One row per probe image: index, label, prediction, group and its per-image metric values."""
        probe = self.probe
        assert probe is not None
        keys = sorted(result.per_image)
        values = [result.per_image[k].tolist() for k in keys]
        labels, predictions = probe.targets.tolist(), result.predictions.tolist()
        groups = probe.groups if probe.groups is not None else [""] * len(probe)
        rows = [[i, labels[i], predictions[i], str(groups[i]), *(column[i] for column in values)]
                for i in range(len(probe))]
        return ["index", "label", "prediction", "group", *keys], rows

    # -- alarms -------------------------------------------------------------------------------------------------
    def _register(self, alarm: ShortcutAlarm) -> None:
        if alarm not in self._alarms:
            self._alarms.append(alarm)

    def record_alarm(self, trainer: Any, firing: dict[str, Any]) -> None:
        """Write an alarm firing into the report and onto the dashboards (rank 0 only)."""
        if _world(trainer)[0] != 0:
            return
        if self._report is not None:
            self._report.append_alarm(firing)
            self._report.write()
        text = (f"{firing['name']}: {firing['metric']} = {firing['value']:.4g} "
                f"{'>' if firing['mode'] == 'max' else '<'} {firing['threshold']:.4g} at epoch {firing['epoch']} "
                f"(action: {firing['action']})")
        for sink in self._sinks:
            with contextlib.suppress(Exception):
                sink.log_text("saliency/alarms", text, int(firing["global_step"]))
                sink.alert("lightning-saliency alarm", text)


class ShortcutAlarm(_Base):
    """Watch one audited metric and act when it crosses a threshold for ``patience`` audits in a row.

    Needs a :class:`SaliencyMonitor` in the same ``Trainer``; it reads each of its audits as soon as it is
    recorded (the order of the callbacks does not matter). Several alarms may watch different metrics.

    Args:
        metric: a report key, e.g. ``"gradcam/spurious_mass"`` or ``"gradcam/spurious_mass/site_b"``.
        threshold: the limit.
        mode: ``"max"``: ``threshold`` is the largest acceptable value (fires when the metric is above it);
            ``"min"``: the smallest acceptable value (fires when below). ``None`` (default): from the metric
            registry, ``"min"`` for a metric where higher is better, else ``"max"`` (a metric you register
            must be registered before the alarm is made).
        patience: consecutive violating audits before it fires.
        action: ``"warn"`` (a warning, the report and the dashboard), ``"stop"`` (also ends training after this
            epoch, on every rank together) or ``"raise"`` (raises :class:`ShortcutDetected`).
        min_audits: audits to see before it may fire (lets the first, untrained epochs pass).
        name: a label for the report (default: ``"<metric> <op> <threshold>"``).

    Example:
        >>> alarm = ShortcutAlarm(metric="gradcam/spurious_mass", threshold=0.3, patience=2, action="stop")
        >>> alarm.violated(0.5), alarm.violated(0.1)
        (True, False)
    """

    def __init__(
        self,
        metric: str = "gradcam/spurious_mass",
        threshold: float = 0.35,
        mode: Literal["max", "min"] | None = None,
        patience: int = 1,
        action: Literal["warn", "stop", "raise"] = "warn",
        min_audits: int = 1,
        name: str | None = None,
    ) -> None:
        mode = metric_registry.alarm_mode(str(metric)) if mode is None else mode
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' (threshold is the largest acceptable value) or 'min', got {mode!r}")
        if action not in ("warn", "stop", "raise"):
            raise ValueError(f"action must be 'warn', 'stop' or 'raise', got {action!r}")
        if int(patience) < 1 or int(min_audits) < 1:
            raise ValueError("patience and min_audits must be >= 1")
        if not isinstance(threshold, (int, float)) or not math.isfinite(float(threshold)):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        self.metric, self.threshold, self.mode = str(metric), float(threshold), mode
        self.patience, self.action, self.min_audits = int(patience), action, int(min_audits)
        self.name = name or f"{self.metric} {'<=' if mode == 'max' else '>='} {self.threshold:g}"
        self.count = 0  # consecutive violating audits
        self.seen = 0  # audits seen
        self.fired_in_streak = False  # fires once per run of consecutive violations
        self.firings: list[dict[str, Any]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(metric=self.metric, threshold=self.threshold, mode=self.mode)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "seen": self.seen, "fired_in_streak": self.fired_in_streak,
                "firings": [dict(f) for f in self.firings]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.count = int(state_dict.get("count", 0))
        self.seen = int(state_dict.get("seen", 0))
        self.fired_in_streak = bool(state_dict.get("fired_in_streak", False))
        self.firings = [dict(f) for f in state_dict.get("firings", [])]

    def violated(self, value: float | None) -> bool:
        """Whether ``value`` breaks the rule (a missing or NaN value does not count as a violation)."""
        if value is None or not math.isfinite(value):
            return False
        return value > self.threshold if self.mode == "max" else value < self.threshold

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, SaliencyMonitor)]
        if not monitors:
            raise ValueError("ShortcutAlarm needs a SaliencyMonitor in the same Trainer: "
                             "Trainer(callbacks=[SaliencyMonitor(probe, ...), ShortcutAlarm(...)])")
        keys = {k for m in monitors for k in m.expected_keys()}
        owner = [m for m in monitors if self._matches(self.metric, m.expected_keys())]
        if not owner:
            close = difflib.get_close_matches(self.metric, sorted(keys), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"ShortcutAlarm(metric={self.metric!r}) watches a key no SaliencyMonitor reports.{hint} "
                             f"Available: {', '.join(sorted(keys))} (per-group keys add '/<group>')")
        owner[0]._register(self)

    @staticmethod
    def _matches(metric: str, keys: Sequence[str]) -> bool:
        return any(metric == k or metric.startswith(k + "/") for k in keys) or metric.startswith("probe/accuracy")

    def check(self, trainer: Any, monitor: SaliencyMonitor, record: dict[str, Any]) -> None:
        """Called by the monitor after each audit, on every rank with the same record.

        An audit that did not compute the metric (a periodic one, skipped this time) neither counts nor breaks
        a streak; a computed but undefined value (``None``/NaN) is not a violation.
        """
        if self.metric not in record.get("metrics", {}):
            return
        value = record["metrics"][self.metric]
        self.seen += 1
        self.count = self.count + 1 if self.violated(value) else 0
        if self.count == 0:
            self.fired_in_streak = False
        fire = self.count >= self.patience and self.seen >= self.min_audits and not self.fired_in_streak
        fire = bool(_broadcast(trainer, fire))
        if not fire:
            return
        self.fired_in_streak = True
        firing = {"name": self.name, "metric": self.metric, "threshold": self.threshold, "mode": self.mode,
                  "epoch": int(record["epoch"]), "global_step": int(record["global_step"]), "value": float(value),
                  "action": self.action}
        self.firings.append(firing)
        monitor.record_alarm(trainer, firing)
        message = (f"ShortcutAlarm: {self.metric} = {value:.4g} {'>' if self.mode == 'max' else '<'} "
                   f"{self.threshold:g} for {self.patience} audit(s) (epoch {record['epoch']})")
        if self.action == "raise":
            raise ShortcutDetected(message)
        if self.action == "stop":
            trainer.should_stop = True
            message += "; stopping training"
        if _world(trainer)[0] == 0:
            warnings.warn(message, UserWarning, stacklevel=2)


def _overrides(module: Any, name: str) -> bool:
    fn = getattr(type(module), name, None)
    bases = [getattr(pl.LightningModule, name, None)]
    with contextlib.suppress(ImportError):  # a lightning.pytorch module inherits that distribution's default hook
        import lightning.pytorch as lpt

        bases.append(getattr(lpt.LightningModule, name, None))
    return fn is not None and all(fn is not base for base in bases)


def _eval_source(trainer: Any) -> Any:
    """Where the running stage's evaluation data comes from, as Lightning recorded it: loaders passed to
    ``fit(val_dataloaders=...)``, ``validate(dataloaders=...)`` or ``test(dataloaders=...)``, a datamodule or the
    model. ``None`` when there is none or when this Lightning version keeps it elsewhere (a private attribute)."""
    try:
        stage = _stage(trainer)
        loop = {"fit": lambda: trainer.fit_loop.epoch_loop.val_loop, "validate": lambda: trainer.validate_loop,
                "test": lambda: trainer.test_loop}[stage]()
        source = loop._data_source
        return source if source.instance is not None and source.is_defined() else None
    except Exception:
        return None


def _stage(trainer: Any) -> str:
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return str(getattr(fn, "value", fn))

