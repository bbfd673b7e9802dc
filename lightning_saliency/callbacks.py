"""Lightning callbacks: :class:`SaliencyMonitor` audits the model on a fixed probe set while it trains,
:class:`ShortcutAlarm` turns an audited metric into a warning, an early stop or an error.

Orchestration only: the maps come from :mod:`lightning_saliency.methods`, the numbers from
:mod:`lightning_saliency.metrics` (through :mod:`lightning_saliency.audit`), the files and the dashboards from
:mod:`lightning_saliency.recording` (which draws with :mod:`lightning_saliency.render`, writes with
:mod:`lightning_saliency.report` and logs through :mod:`lightning_saliency.sinks`), the collectives from
:mod:`lightning_saliency.distributed` and every lookup into Lightning's internals from
:mod:`lightning_saliency._lightning`.

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
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ._lightning import Base as _Base
from ._lightning import audit_stage as _audit_stage
from ._lightning import eval_source as _eval_source
from ._lightning import final_epoch as _final_epoch
from ._lightning import overrides as _overrides
from ._lightning import stage as _stage
from ._lightning import trained_epoch as _trained_epoch
from .audit import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_METRICS,
    AuditSpec,
    Reference,
    ShardResult,
    audit_shard,
    failed_shard,
    lacks_periodic,
    merge,
    summarize,
)
from .checks import check_alarm, key_problem
from .discovery_audit import DiscoveryAudit
from .distributed import broadcast as _broadcast
from .distributed import gather as _gather
from .distributed import rank0_buffers as _rank0_buffers
from .distributed import world as _world
from .guard import SideEffectGuard
from .mapfiles import KEEP_MAPS
from .methods.engine import check_on_error
from .methods.registry import all_options, get_method, needs_layer
from .metrics import registry as metric_registry
from .probe import ProbeSet
from .probe_source import data_settings, display, probe_from_data
from .recording import Recorder
from .report import place_record, stage_of
from .tasks import probe_task

__all__ = ["SaliencyMonitor", "ShortcutAlarm", "ShortcutDetected"]


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


def _check_arguments(probe: Any, every_n_epochs: int, on_error: str, expensive_every_n_audits: int,
                     probe_size: int, image_colors: int | None) -> None:
    """The constructor's checks: a bad argument fails when the monitor is built, not mid-training."""
    if probe is not None and not isinstance(probe, ProbeSet):
        raise TypeError(f"probe must be a lightning_saliency.ProbeSet (or None to draw one from the validation "
                        f"data), got {type(probe).__name__}; build one with ProbeSet.from_dataset(...)")
    if int(every_n_epochs) < 1:
        raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
    check_on_error(on_error)
    if int(expensive_every_n_audits) < 1:
        raise ValueError(f"expensive_every_n_audits must be >= 1, got {expensive_every_n_audits}")
    if int(probe_size) < 1:
        raise ValueError(f"probe_size must be >= 1, got {probe_size}")
    if image_colors is not None and not 2 <= int(image_colors) <= 256:
        raise ValueError(f"image_colors must be between 2 and 256 (a PNG palette) or None, got {image_colors}")


def _target_layer(pl_module: Any, probe: ProbeSet, layer: str | nn.Module, spec: AuditSpec,
                  alarms: Sequence[Any] = ()) -> Any:
    """Check that the probe fits the model (one guarded forward, at setup rather than at the first audit), the
    options' values and that each alarm can fire on this probe; resolve the target layer when a method of
    ``spec`` needs one (else ``None``)."""
    example = probe.inputs[:2].to(pl_module.device)
    param = next(pl_module.parameters(), None)
    if param is not None and param.is_floating_point() and example.is_floating_point():
        example = example.to(param.dtype)
    with _eager():  # the probe fits the model, its output gives class scores, the task is known
        task, inferred = probe_task(pl_module, example, probe, spec.output, None if spec.task_inferred else spec.task)
    spec.task, spec.task_inferred = task.name, inferred
    opts = {**all_options(), **spec.method_options}
    for method in (m for m in spec.methods if get_method(m).validate is not None):
        try:  # a bad value fails here, not at every audit
            get_method(method).validate(opts, probe.inputs)
        except ValueError as e:
            raise ValueError(f"SaliencyMonitor(method_options=...): {e}") from e
    for alarm in alarms:  # the probe's masks and groups are known now
        check_alarm(alarm.metric, spec.methods, spec.metrics, probe)
    if not any(needs_layer(m) for m in spec.methods):
        return None  # gradient-only (or any layer-free methods): a model without a spatial layer is fine
    from .layers import resolve_layer

    try:
        return resolve_layer(pl_module, layer, example_input=example, output=spec.output)
    except ValueError as e:
        raise ValueError(f"SaliencyMonitor(layer={layer!r}): {e}") from e


def _config(monitor: SaliencyMonitor) -> dict[str, Any]:
    """The report's ``config`` header: what the monitor audits, and the task (``task_inferred``: by the setup)."""
    spec = monitor.spec
    return {"methods": list(spec.methods), "layer": monitor.layer_name, "metrics": list(spec.metrics),
            "every_n_epochs": monitor.every_n_epochs, "task": spec.task, "task_inferred": spec.task_inferred,
            "denormalize": display(monitor.denormalize, monitor.probe)}  # how the pictures show the probe


def _on_device(shard: ProbeSet, pl_module: Any, moved: tuple[Any, ProbeSet] | None) -> tuple[Any, ProbeSet]:
    """``((device, dtype), shard)`` with the shard on the module's device and floating dtype; ``moved`` (the
    previous answer) is reused while the module stays where it was."""
    device = pl_module.device
    param = next(pl_module.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    if moved is not None and moved[0] == (device, dtype):  # moved once, reused audit after audit
        return moved
    out = shard.to(device)
    if dtype is not None and dtype != out.inputs.dtype:
        out = ProbeSet(out.inputs.to(dtype), out.targets, out.groups, out.object_masks,
                       out.spurious_masks, indices=out.indices)  # positions pick the metric subsets
    return (device, dtype), out


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
            :func:`lightning_saliency.methods.registry.method_names` (registered methods too).
        layer: target layer of the CAM-family methods: ``"auto"``, a dotted name or a module (unused without one).
        every_n_epochs: audit every n-th training epoch.
        metrics: metric names: the rows of :mod:`lightning_saliency.metrics.registry` (and metrics added with
            :func:`~lightning_saliency.register_metric`); default: the rows marked default (the cheap ones). The
            expensive ones (faithfulness, sanity) are opt-in.
        log_images: overlays logged per method and audit (0 disables images).
        batch_size: images per pass through the model, in every pass of the audit (default 64; ``None``: all at once).
        on_error: ``"warn"`` (default: a failing audit warns once, is recorded in the report, training goes on),
            ``"collect"`` (recorded, no warning) or ``"raise"``: :data:`lightning_saliency.methods.engine.ON_ERROR`.
        expensive_every_n_audits: how often the metrics that run the model again run (stability, and the
            expensive ones when listed): every n-th audit (1 = every audit) and always at the last audit of a
            fit, validate or test, so the final report has them. The others run at every audit.
        target: explain the model's ``"prediction"`` or the probe's ``"label"``.
        probe_size, probe_seed: used when ``probe`` is None.
        allow_probe_change: accept resuming from a checkpoint whose probe fingerprint differs.
        dirpath: where ``report.json``, maps and PNG grids go (default ``<trainer.log_dir>/saliency``).
        save_maps: keep downsampled float16 maps of the audits under ``<dirpath>/maps`` (for reports).
        keep_maps: at most this many audits keep their maps files (20; then thinned evenly, first and last kept; ``None``: all).
        class_names: names for captions (default: class indices).
        cmap: colormap of the overlays (``"jet"`` or ``"viridis"``, any matplotlib name).
        image_colors: colours of the overlay grids' PNG palette (256: the eye sees no difference and the
            file is less than half; ``None``: full-colour PNG).
        method_options: options for :func:`~lightning_saliency.attribute` (``{"ig_steps": 16}``), checked now.
        stability_images: probe images used by the stability metric (the first ones; ``None`` = all).
        expensive_images: probe images used by the expensive metrics.
        seed: seed of the metrics' own random draws (never the global generators).
        scorecard: at the end of fit, score every method once into the report (:func:`lightning_saliency.scorecard`).
        discover, discover_method, discover_options: find unannotated shortcuts at every audit and confirm them
            by pasting (the record's ``discovery``, keys ``discovery/suspects``): :mod:`~lightning_saliency.discovery_audit`.
        output, task: which tensor of the model's output to explain and the task giving its class scores, as in
            :func:`~lightning_saliency.attribute` (``task=None``: inferred at setup, recorded in the report).
        denormalize: ``(mean, std)`` of the inputs' ``Normalize``: pictures in true colours (default: the probe's, found in its dataset's transform).
        group_key, object_mask_key, spurious_mask_key: with ``probe=None``, the batch keys of groups and masks (:mod:`~lightning_saliency.probe_source`).

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
        batch_size: int | None = DEFAULT_BATCH_SIZE,
        on_error: Literal["warn", "collect", "raise"] = "warn",
        expensive_every_n_audits: int = 5,
        target: Literal["prediction", "label"] = "prediction",
        probe_size: int = 64,
        probe_seed: int = 0,
        allow_probe_change: bool = False,
        dirpath: str | None = None,
        save_maps: bool = True,
        keep_maps: int | None = KEEP_MAPS,
        class_names: Sequence[str] | None = None,
        cmap: str = "jet",
        image_colors: int | None = 256,
        method_options: dict[str, Any] | None = None,
        stability_images: int | None = 8,
        expensive_images: int | None = 16,
        seed: int = 0,
        scorecard: bool = False,
        discover: bool = True, discover_method: str | None = None, discover_options: dict[str, Any] | None = None,
        output: Any = None, task: Literal["multiclass", "binary", "multilabel", "segmentation"] | None = None,
        denormalize: tuple[Sequence[float], Sequence[float]] | None = None,
        group_key: str | int | None = None, object_mask_key: str | int | None = None, spurious_mask_key: str | int | None = None,
    ) -> None:
        _check_arguments(probe, every_n_epochs, on_error, expensive_every_n_audits, probe_size, image_colors)
        self.denormalize, self.data_keys = data_settings(probe, denormalize, group_key=group_key, object_mask_key=object_mask_key, spurious_mask_key=spurious_mask_key)
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
        self.image_colors = None if image_colors is None else int(image_colors)
        # validated now: an unknown method or metric is a configuration error, not a mid-training surprise
        self.spec = AuditSpec(methods=tuple(methods), metrics=tuple(metrics) if metrics is not None else DEFAULT_METRICS,
                              layer="auto", batch_size=batch_size, target=target,
                              method_options=dict(method_options or {}), stability_images=stability_images,
                              expensive_images=expensive_images, seed=seed, output=output, task=task)
        self.discovery = DiscoveryAudit(discover, discover_method, discover_options, self.spec.methods, seed)
        self.history: list[dict[str, Any]] = []
        self._alarms: list[ShortcutAlarm] = []
        self._loaded_fingerprint: str | None = None
        self._prepared_for: tuple[int, int] | None = None
        self._shard: ProbeSet | None = None
        self._moved: tuple[Any, ProbeSet] | None = None  # the shard on the module's device and dtype
        self._reference = Reference()  # the maps drift compares with
        self._last_audit: tuple[int, int] | None = None  # (trainer, epoch) of the last fit audit this process made
        self._run_id, self._weights_epoch = None, -1  # lightning_saliency.runs; the weights' last trained epoch
        # report.json, maps files, dashboards: written by the recorder, on rank 0
        self._recorder = Recorder(dirpath=dirpath, save_maps=save_maps, log_images=log_images, on_error=on_error,
                                  class_names=self.class_names, cmap=cmap, image_colors=self.image_colors,
                                  scorecard=scorecard, keep_maps=keep_maps)

    # -- identity and state ------------------------------------------------------------------------------------
    @property
    def methods(self) -> tuple[str, ...]:
        return self.spec.methods

    @property
    def state_key(self) -> str:
        return self._generate_state_key(methods=list(self.spec.methods), every_n_epochs=self.every_n_epochs)

    def state_dict(self) -> dict[str, Any]:
        fingerprint = self.probe.fingerprint if self.probe is not None else self._loaded_fingerprint
        return {"fingerprint": fingerprint, "history": [dict(r) for r in self.history], "run_id": self._run_id}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_fingerprint, self._run_id = state_dict.get("fingerprint"), state_dict.get("run_id")
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

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self._weights_epoch = _trained_epoch(checkpoint)  # the weights audited next are the checkpoint's (-1: ?)

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
                self.probe = probe_from_data(trainer, pl_module, self.probe_size, self.probe_seed, **self.data_keys)
        probe = self.probe
        if self._loaded_fingerprint is not None and self._loaded_fingerprint != probe.fingerprint:
            if not self.allow_probe_change:
                raise ValueError(
                    "the probe set differs from the one in the checkpoint being resumed (fingerprint "
                    f"{probe.fingerprint[:12]} vs {self._loaded_fingerprint[:12]}): audits before and after would not "
                    "be comparable. Resume with the same probe, or pass allow_probe_change=True")
            self.history, self._run_id = [], None  # another probe: another run, another report
        target = _target_layer(pl_module, probe, self.layer, self.spec, self._alarms)
        self.spec.layer, self.layer_name = (target, target.name) if target is not None else (self.layer, None)
        rank, world = _world(trainer)
        # positions are counted in this probe (a probe made with subset() keeps its parent's otherwise)
        self._shard = probe.shard(rank, world)
        self._moved = None
        self._prepared_for = (id(trainer), id(pl_module))
        self._reference.reset()
        # trainer.log_dir is a collective under DDP (it broadcasts rank 0's path): every rank opens, here
        self._run_id = self._recorder.open(trainer, pl_module, probe, history=self.history, run_id=self._run_id,
            stage=_audit_stage(trainer), config=_config(self))

    # -- when to audit ------------------------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if getattr(trainer, "sanity_checking", False):
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.audit(trainer, pl_module, epoch=trainer.current_epoch,
                       periodic=len(self.history) % self.expensive_every_n_audits == 0 or _final_epoch(trainer))

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        epoch = self._weights_epoch = max(int(trainer.current_epoch) - 1, 0)
        if self._prepared_for == (id(trainer), id(pl_module)):
            if not any(r["epoch"] == epoch and stage_of(r) == "fit" for r in self.history):
                self.audit(trainer, pl_module, epoch=epoch, periodic=True)
            elif lacks_periodic(self.history[-1], self.spec.metrics) and stage_of(self.history[-1]) == "fit" and \
                    self._last_audit == (id(trainer), self.history[-1]["epoch"]):
                # training ended where nobody could tell in advance (an alarm's stop, a time limit, ...): the last
                # audit, made in this fit, gets the periodic metrics it skipped, from the same weights and the same
                # previous maps
                self._complete(trainer, pl_module)
            self._recorder.record_scorecard(trainer, pl_module, self.probe, self.spec)  # when scorecard=True
        self._recorder.flush()

    def _complete(self, trainer: Any, pl_module: Any) -> None:
        last = self.history[-1]
        with self._reference.rewound():
            self.audit(trainer, pl_module, epoch=last["epoch"], periodic=True, _completing=last)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if _stage(trainer) == "validate" and not getattr(trainer, "sanity_checking", False):
            self.audit(trainer, pl_module, periodic=True)
            self._recorder.flush()

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self.audit(trainer, pl_module, periodic=True)
        self._recorder.flush()

    # -- one audit ----------------------------------------------------------------------------------------------
    def audit(self, trainer: Any, pl_module: Any, epoch: int | None = None, periodic: bool = True,
              _completing: dict[str, Any] | None = None) -> dict[str, Any]:
        """Audit now and return the record (on every rank). Called by the hooks; callable by hand too.

        ``stage``: the trainer's; ``epoch``: the weights' last trained epoch (-1: not known). ``periodic=False``
        skips the metrics that run the model again (:data:`~lightning_saliency.audit.PERIODIC_METRICS`); the hooks
        pass it for all but every ``expensive_every_n_audits``-th audit and the last one.
        """
        self._prepare(trainer, pl_module)
        (rank, _), epoch = _world(trainer), self._weights_epoch if epoch is None else epoch
        stage, started = _audit_stage(trainer), time.perf_counter()
        with _rank0_buffers(trainer, pl_module):
            result = self._audit_shard(pl_module, bool(periodic))
        if stage == "fit":  # drift compares with the last fit audit
            self._reference.advance(result)
        gathered = _gather(trainer, result)
        record = None
        if rank == 0:
            merged = merge(gathered)
            metrics = summarize(merged, self.probe, self.spec) if merged.maps else {}
            found = self.discovery(pl_module, self.probe, merged, self.spec, metrics, self.on_error)
            record = self._recorder.record(trainer, merged, metrics, self.probe, epoch, started,
                                           images=_completing is None, stage=stage, discovery=found)
        record = _broadcast(trainer, record)
        self.history = place_record(self.history, record)
        self._last_audit = (id(trainer), int(record["epoch"])) if stage == "fit" else self._last_audit
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
        self._moved = _on_device(shard, pl_module, self._moved)
        moved = self._moved[1]
        try:
            with _eager(), SideEffectGuard(pl_module):
                result = audit_shard(pl_module, moved, self.spec, previous_maps=self._reference.maps,
                                     previous_ranks=self._reference.ranks, expensive=expensive, on_error=self.on_error,
                                     full_probe=self.probe)
        except Exception as e:
            result = failed_shard(e, self.on_error, indices)
        result.indices = indices
        return result

    # -- alarms -------------------------------------------------------------------------------------------------
    def _register(self, alarm: ShortcutAlarm) -> None:
        if alarm not in self._alarms:
            self._alarms.append(alarm)

    def record_alarm(self, trainer: Any, firing: dict[str, Any]) -> None:
        """Write an alarm firing into the report and onto the dashboards (rank 0 only)."""
        if _world(trainer)[0] == 0:
            self._recorder.record_alarm(firing)


class ShortcutAlarm(_Base):
    """Watch one audited metric and act when it crosses a threshold for ``patience`` audits in a row.

    Needs a :class:`SaliencyMonitor` in the same ``Trainer``; it reads each of its audits as soon as it is
    recorded (the order of the callbacks does not matter). Several alarms may watch different metrics.

    Args:
        metric: a report key, e.g. ``"gradcam/spurious_mass"`` or ``"gradcam/spurious_mass/site_b"``; one the
            monitor never reports (a mask metric on a probe without masks, say) fails at setup, saying why.
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
        # the names now; the probe's masks and groups too when it is known, else when it is drawn (fit start)
        owner = [m for m in monitors if key_problem(self.metric, m.spec.methods, m.spec.metrics, m.probe,
                                                    discover=m.discovery.enabled) is None]
        if not owner:
            check_alarm(self.metric, monitors[0].spec.methods, monitors[0].spec.metrics, monitors[0].probe,
                        discover=monitors[0].discovery.enabled)
        owner[0]._register(self)

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
                  "stage": stage_of(record), "epoch": int(record["epoch"]), "global_step": int(record["global_step"]), "value": float(value),
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
