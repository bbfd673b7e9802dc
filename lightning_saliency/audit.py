"""One audit of a model on (a shard of) a probe set: maps, per-image metric values, and their summary.

This is the layer between the pure functions (``methods/``, ``metrics/``) and the Lightning callbacks: it
knows which metrics need which inputs and how to reduce them into the report's ``<method>/<metric>`` keys, but
nothing about trainers, ranks or loggers. The callback runs :func:`audit_shard` on each rank's shard, gathers
the :class:`ShardResult` objects, :func:`merge` s them on rank 0 and calls :func:`summarize`.

Metric names (``metrics=`` of :class:`~lightning_saliency.SaliencyMonitor`): the rows of the metric registry,
:mod:`lightning_saliency.metrics.registry` (its module docstring has the table; ``print(metric_table())``), the one
place that lists them with their direction, what they need and whether they are periodic. ``audit_shard`` loops
over the rows: each row's ``compute`` gives per-image values, and ``summarize`` reduces them (and calls the
probe-level rows' ``summary``).

The periodic rows run the model again (:func:`~lightning_saliency.metrics.registry.metric_names` with
``periodic=True``: stability and the expensive ones); the monitor computes them every
``expensive_every_n_audits`` audits and at the last audit of a fit, validate or test, so that the final report
(the one a CI gate reads) always has them. The others come from the audit's own maps, every audit.

Besides the metrics, every audit reports the probe's accuracy: ``probe/accuracy``, per class
``probe/accuracy/class_<k>`` and per group ``probe/accuracy/<group>``, because disparity is read next to accuracy.

Every audit also checks its own health (:mod:`lightning_saliency.health`): images with non-finite logits, and
per method the images whose map is non-finite or constant (all zero included), are flagged per image in the
:class:`ShardResult` (so that :func:`merge` pools them under DDP), and their metric values are NaN (``null``),
never chance level or a perfect score; :func:`lightning_saliency.health.describe` turns the flags into the
record's ``health``.

Example:
    >>> import torch
    >>> from lightning_saliency.probe import ProbeSet
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
    ...                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    >>> probe = ProbeSet(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]))
    >>> spec = AuditSpec(methods=("gradient",), metrics=("stability",))
    >>> result = audit_shard(model, probe, spec)
    >>> summary = summarize(result, probe, spec)
    >>> sorted(k for k in summary if k.startswith("gradient/"))
    ['gradient/stability']
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import health as _health
from .labels import iou_counts, mean_iou, multilabel_accuracy
from .layers import TargetLayer
from .methods.engine import attribute
from .methods.registry import SIGNED_METHODS, method_names
from .metrics.registry import AuditContext, get_metric, metric_names, specs
from .probe import ProbeSet
from .report import error_record
from .tasks import TaskModel, check_task, output_adapter

__all__ = [
    "ALL_METRICS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_METRICS",
    "PERIODIC_METRICS",
    "AuditSpec",
    "Reference",
    "ShardResult",
    "audit_shard",
    "failed_shard",
    "lacks_periodic",
    "merge",
    "summarize",
    "validate_metrics",
]

#: images per pass through the model in an audit (:attr:`AuditSpec.batch_size`): the shared attribution pass, the
#: methods' own passes, and every metric that runs the model again (on the probe or on perturbed copies of it),
#: so that the audit's working memory is that of a chunk of this many images, whatever the size of the probe
DEFAULT_BATCH_SIZE = 64

# derived from the metric registry (the built-in rows; metric_names() also lists registered metrics)
ALL_METRICS = metric_names(builtin=True)
DEFAULT_METRICS = metric_names(default=True)  # the expensive ones are opt-in, and then run every few audits only
# the metrics that run the model again (the others are computed from the audit's own maps): the monitor runs
# them every `expensive_every_n_audits` audits and at the last audit of a fit, validate or test
PERIODIC_METRICS = metric_names(builtin=True, periodic=True)


def validate_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """Check metric names; an unknown one is a ``ValueError`` listing the known ones.

    Example:
        >>> validate_metrics(["spurious_mass"])
        ('spurious_mass',)
    """
    import difflib

    out, known = [], metric_names()
    for name in metrics:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown metric {name!r}.{hint} Known metrics: {', '.join(known)} (or add yours "
                             "with lightning_saliency.register_metric)")
        out.append(str(name))
    return tuple(dict.fromkeys(out))


@dataclass
class AuditSpec:
    """What one audit computes.

    Args:
        methods: attribution methods (see :func:`lightning_saliency.methods.registry.method_names`).
        metrics: metric names (see the module docstring); masks-based ones are skipped when the probe has no
            masks, group-based ones when it has no groups.
        layer: the target layer for CAM-family methods: ``"auto"``, a dotted name, a module or a resolved
            :class:`~lightning_saliency.layers.TargetLayer` (fastest when auditing repeatedly).
        reshape: token-to-grid reshape for the layer, when it is not found automatically.
        batch_size: the most images per pass through the model, in every pass of the audit: the attribution
            passes and the metrics that run the model again (:data:`DEFAULT_BATCH_SIZE`; ``None``: the whole
            probe, or shard, at once). The results do not depend on it, only the memory and the time do.
        target: explain the model's ``"prediction"`` (default) or the probe's ``"label"``.
        method_options: extra keyword options for :func:`~lightning_saliency.attribute`.
        stability_k, stability_sigma, stability_images: stability's draws, noise scale (relative to each
            image's std) and the number of probe images it uses (the first ones of the whole probe, also when
            it is sharded; ``None`` = all).
        expensive_images: images used by the expensive metrics (the first ones; ``None`` = all).
        seed: seed of every random draw the metrics make (they never touch the global generators).
        output, task: which tensor of the model's output to explain and the task giving its class scores
            (:mod:`lightning_saliency.tasks`; ``task=None`` infers it at each audit); ``task_inferred`` records
            that a caller (the monitor's setup check) inferred ``task``.
    """

    methods: tuple[str, ...] = ("gradcam", "gradient")
    metrics: tuple[str, ...] = DEFAULT_METRICS
    layer: Any = "auto"
    reshape: Callable[[Tensor], Tensor] | None = None
    batch_size: int | None = DEFAULT_BATCH_SIZE
    target: str = "prediction"
    method_options: dict[str, Any] = field(default_factory=dict)
    stability_k: int = 4
    stability_sigma: float = 0.1
    stability_images: int | None = 8
    expensive_images: int | None = 16
    seed: int = 0
    output: Any = None
    task: str | None = None
    task_inferred: bool = False

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        unknown = [m for m in self.methods if m not in method_names()]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known methods: {', '.join(method_names())}")
        if not self.methods:
            raise ValueError("methods is empty; pass at least one method, e.g. methods=('gradcam',)")
        self.metrics = validate_metrics(self.metrics)
        from .checks import check_method_options  # an unknown key: the closest option and its method

        self.method_options = check_method_options(self.method_options, self.methods)
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                                            or self.batch_size < 1):
            raise ValueError(f"batch_size must be a positive int (images per pass through the model) or None (the "
                             f"whole probe at once), got {self.batch_size!r}")
        if self.target not in ("prediction", "label"):
            raise ValueError(f"target must be 'prediction' or 'label', got {self.target!r}")
        if getattr(check_task(self.task), "masks", None) is not None:
            raise ValueError("task=Segmentation(masks) holds one mask per image of one attribute() call; an audit "
                             "explains its probe in parts (noisy copies, subsets): pass task='segmentation'")
        output_adapter(self.output)  # a bad output= fails now

    def explain(self, model: nn.Module, inputs: Tensor, targets: Tensor,
                methods: Sequence[str] | None = None, positions: Tensor | None = None) -> dict[str, Tensor]:
        """Maps of ``methods`` (default: all of the spec's) for ``inputs`` and ``targets``; ``positions`` key the
        methods' per-image draws (``attribute``'s ``positions=``: the images' places in the whole probe).

        A resolved :class:`~lightning_saliency.layers.TargetLayer` is used as is on the model it was resolved
        on; on any other model (the re-initialised copy of the sanity check) its name is resolved again."""
        layer = self.layer
        if isinstance(layer, TargetLayer) and not any(m is layer.module for m in model.modules()):
            layer = layer.name
        return attribute(model, inputs, targets, methods=tuple(methods or self.methods), layer=layer,
                         reshape=self.reshape, batch_size=self.batch_size, output=self.output, task=self.task,
                         positions=positions, **self.method_options)


@dataclass
class ShardResult:
    """What one rank computed for its shard of the probe (all tensors on the CPU).

    ``indices`` are the shard's positions in the full probe; ``per_image`` maps ``<method>/<metric>`` to ``[n]``
    values (NaN where a metric did not cover an image, or the image is degenerate); ``errors`` are report error
    records; ``finite_logits`` (``[n]`` bool, ``None``: unknown) and ``degenerate`` (method -> ``[n]`` int8 codes
    of :mod:`lightning_saliency.health`) are the per-image health flags.
    """

    indices: Tensor
    predictions: Tensor
    maps: dict[str, Tensor] = field(default_factory=dict)
    per_image: dict[str, Tensor] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    dtype: str = "float32"
    ranks: dict[str, Tensor] = field(default_factory=dict)  # |M| ranked, for the next audit's drift (not merged)
    finite_logits: Tensor | None = None
    degenerate: dict[str, Tensor] = field(default_factory=dict)
    # a multi-label probe's logit > 0 ([n, C] bool) or a segmentation probe's IoU counts ([n, 3, C]): the accuracy
    label_predictions: Tensor | None = None
    logits: Tensor | None = None  # [n, K] float32 class scores of the audit's forward (discovery reuses them)


def _nan(n: int) -> Tensor:
    return torch.full((n,), math.nan)


def _padded(values: Tensor, n: int, where: Tensor | None = None) -> Tensor:
    """``[n]`` values with NaN where a metric did not cover an image; ``where`` are the covered positions."""
    out = _nan(n)
    if where is None:
        out[: len(values)] = values.detach().float().cpu()
    else:
        out[where] = values.detach().float().cpu()
    return out


def audit_shard(model: nn.Module, probe: ProbeSet, spec: AuditSpec, previous_maps: Mapping[str, Tensor] | None = None,
                expensive: bool = True, on_error: str = "warn",
                previous_ranks: Mapping[str, Tensor] | None = None, full_probe: ProbeSet | None = None) -> ShardResult:
    """Run one audit on ``probe`` (a whole probe set or one rank's shard).

    Computes the maps of every method in one shared pass, then the per-image values of the chosen metrics.
    A method or metric that raises is recorded in ``errors`` and warned about (``on_error="warn"``), recorded only
    (``"collect"``), or raised (``"raise"``): :data:`lightning_saliency.methods.engine.ON_ERROR`.
    ``previous_maps`` (the last audit's maps of the same images) feed ``drift``, or ``previous_ranks`` (the last
    result's ``ranks``: the same, already ranked, so each map is ranked once); ``expensive=False`` skips
    the metrics that run the model again (the registry's periodic rows: stability and the expensive ones).
    ``full_probe``: the whole probe when ``probe`` is one shard of it (the spurious swaps draw their donors from
    it, so that a sharded audit equals the unsharded one; without it a shard draws donors from itself).

    Example:
        >>> import torch
        >>> from lightning_saliency.probe import ProbeSet
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        >>> r = audit_shard(model, ProbeSet(torch.rand(2, 1, 4, 4), torch.tensor([0, 1])),
        ...                 AuditSpec(methods=("gradient",), metrics=("drift",)))
        >>> tuple(r.maps["gradient"].shape)
        (2, 4, 4)
    """
    n = len(probe)
    inputs, labels = probe.inputs, probe.targets
    errors: list[dict[str, Any]] = []

    def fail(exc: BaseException, method: str | None, what: str) -> None:
        if on_error == "raise":
            raise exc
        errors.append(error_record(exc, method=method))
        if on_error == "warn":
            warnings.warn(f"lightning-saliency: {what} failed ({type(exc).__name__}: {exc}); recorded in the "
                          "report, training goes on (pass on_error='raise' to stop instead)", RuntimeWarning,
                          stacklevel=3)

    explain_targets = None if spec.target == "prediction" else labels
    # each image's position in the whole probe: it picks the metric subsets and keys the methods' random draws
    # (smoothgrad's noise), so that a sharded (DDP) audit scores the same images with the same maps
    positions = getattr(probe, "indices", None)
    positions = torch.as_tensor(positions).cpu() if positions is not None else torch.arange(n)

    def explain_with_info(methods: Sequence[str]) -> tuple[dict[str, Tensor], Any]:
        return attribute(model, inputs, explain_targets, methods=tuple(methods), layer=spec.layer,
                         reshape=spec.reshape, batch_size=spec.batch_size, return_info=True, output=spec.output,
                         task=spec.task, positions=positions,
                         on_error="raise" if on_error == "raise" else "collect", **spec.method_options)

    try:
        maps, info = explain_with_info(spec.methods)
        for method, exc in info.errors.items():
            fail(exc, method, f"method {method!r}")
    except Exception:  # the shared pass failed (e.g. the layer is gone): keep what does not need it
        if on_error == "raise":
            raise
        maps, info = {}, None
        for method in spec.methods:
            try:
                one, info1 = explain_with_info((method,))
                maps.update(one)
                info = info or info1
            except Exception as e1:
                fail(e1, method, f"method {method!r}")
        if info is None:
            from .guard import SideEffectGuard

            with SideEffectGuard(model), torch.no_grad():
                wrapped, step = TaskModel(model, spec.output, spec.task), spec.batch_size or max(n, 1)
                out = torch.cat([wrapped.tensor(inputs[i : i + step]) for i in range(0, n, step)])
                logits = wrapped.task.class_scores(out)
            predictions, finite = wrapped.task.predict(out), torch.isfinite(logits).all(1)
            dtype = str(logits.dtype).replace("torch.", "")
            targets = predictions if explain_targets is None else explain_targets
        else:
            predictions, targets, dtype, finite = info.predictions, info.targets, info.forward_dtype, info.finite
    else:
        predictions, targets, dtype, finite = info.predictions, info.targets, info.forward_dtype, info.finite
    finite = torch.ones(n, dtype=torch.bool) if finite is None else finite.detach().bool().cpu()
    # the metrics that run the model again see its class-score matrix: every task alike
    model = TaskModel(model, spec.output, info.task if info is not None else wrapped.task)
    label_predictions = None
    labels = getattr(probe, "labels", None)
    if labels is not None and model.task.name in ("multilabel", "segmentation"):
        from .guard import SideEffectGuard

        with SideEffectGuard(model), torch.no_grad():  # the decisions the probe accuracy needs
            step = spec.batch_size or n
            outs = [model.tensor(inputs[i : i + step]) for i in range(0, n, step)]
            if model.task.name == "multilabel":
                label_predictions = torch.cat([o > 0 for o in outs]).cpu()
            else:
                label_predictions = torch.cat([iou_counts(o.argmax(1), labels[i * step : (i + 1) * step], o.shape[1])
                                               for i, o in enumerate(outs)]).cpu()
    methods = [m for m in spec.methods if m in maps]
    per_image: dict[str, Tensor] = {}

    where = {"all": None}
    for subset, limit in (("stability", spec.stability_images), ("expensive", spec.expensive_images)):
        where[subset] = (positions < (limit if limit is not None else n + 1)).nonzero()[:, 0]
    ctx = AuditContext(model=model, probe=probe, spec=spec, maps=maps, targets=targets,
                       subsets={k: v.to(inputs.device) for k, v in where.items() if v is not None},
                       signed=frozenset(SIGNED_METHODS), previous_maps=previous_maps, previous_ranks=previous_ranks,
                       full_probe=full_probe)
    have = {"object_masks": probe.object_masks is not None, "spurious_masks": probe.spurious_masks is not None}
    wanted = set(spec.metrics)
    for row in specs():  # the per-image rows of the metric registry, each for every method it applies to
        rows = where[row.images]
        if row.name not in wanted or row.compute is None or (row.periodic and not expensive) \
                or any(not have[k] for k in row.needs if k in have) or (rows is not None and not len(rows)):
            continue
        scored = [m for m in methods if "signed" not in row.needs or m in SIGNED_METHODS]
        for group in ([()] if row.probe_level else [tuple(scored)] if row.one_pass and scored
                      else [(m,) for m in scored]):
            prefixes = {m: f"{m}/" for m in group} if group else {"": "probe/"}  # probe-level: probe/<name>
            keys = {m + suffix: f"{p}{row.name}{suffix}" for m, p in prefixes.items() for suffix in ("", *row.extra_keys)}
            try:
                for key, values in row.compute(ctx, group).items():
                    per_image[keys[key]] = _padded(values, n, rows)
            except Exception as e:
                method = None if row.one_pass or not group else group[0]
                fail(e, method, f"metric {row.name!r}" + (f" of {method!r}" if method else ""))
    # a degenerate image's values are NaN, never chance level or 1.0 (see lightning_saliency.health)
    degenerate = _health.flag_maps(maps, SIGNED_METHODS)
    _health.mask_degenerate(per_image, degenerate, finite,
                            _health.stale_previous(previous_ranks, previous_maps, SIGNED_METHODS))
    return ShardResult(
        indices=getattr(probe, "indices", None) if getattr(probe, "indices", None) is not None
        else torch.arange(n),
        predictions=predictions.detach().cpu(),
        maps={k: v.detach().float().cpu() for k, v in maps.items()},
        per_image=per_image,
        errors=errors,
        dtype=dtype,
        ranks={k: v.detach().cpu() for k, v in ctx.ranks.items()},
        finite_logits=finite,
        degenerate=degenerate,
        label_predictions=label_predictions,
        logits=(info.logits if info is not None else logits).detach().float().cpu(),
    )


def failed_shard(exc: Exception, on_error: str, indices: torch.Tensor) -> ShardResult:
    """The result of a shard whose audit raised: the error recorded (and warned about), or raised again.

    Example:
        >>> failed_shard(ValueError("boom"), "collect", torch.arange(2)).errors[0]["message"]
        'boom'
    """
    if on_error == "raise":
        raise exc
    if on_error == "warn":
        warnings.warn(f"lightning-saliency: the audit failed ({type(exc).__name__}: {exc}); recorded in the "
                      "report, training goes on (pass on_error='raise' to stop instead)", RuntimeWarning, stacklevel=4)
    return ShardResult(indices=indices, predictions=torch.full((len(indices),), -1), errors=[error_record(exc)])


def lacks_periodic(record: Mapping[str, Any], metrics: Sequence[str]) -> bool:
    """Whether an audit record has none of the periodic metrics among ``metrics`` (that audit skipped them).

    Example:
        >>> lacks_periodic({"metrics": {"gradcam/drift": 0.9}}, ("drift", "stability"))
        True
    """
    wanted = set(metric_names(periodic=True)) & set(metrics)
    return bool(wanted) and not any(k.split("/")[1] in wanted for k in record.get("metrics", {}) if "/" in k)


def _recompute_merged(per_image: dict[str, Tensor]) -> None:
    """The rows with a ``merged`` step (the agreements' calibration): their values recomputed from the whole
    probe's merged parts, in place."""
    for key in list(per_image):
        row = get_metric(key.split("/", 1)[-1])
        if row is None or row.merged is None or not all(key + s in per_image for s in row.extra_keys):
            continue
        parts = {"value": per_image[key], **{s.lstrip("_"): per_image[key + s] for s in row.extra_keys}}
        per_image[key] = row.merged(parts).to(per_image[key].dtype)


def merge(results: Sequence[ShardResult]) -> ShardResult:
    """Concatenate shard results in probe order (by ``indices``); errors are pooled without duplicates, the
    per-image health flags concatenated like the values (a shard without them counts as healthy). A row whose
    value depends on the images scored together (``MetricSpec.merged``: the agreements' calibration) is
    recomputed on the merged rows.

    Example:
        >>> import torch
        >>> a = ShardResult(torch.tensor([1]), torch.tensor([5]), {"g": torch.ones(1, 2, 2)})
        >>> b = ShardResult(torch.tensor([0]), torch.tensor([7]), {"g": torch.zeros(1, 2, 2)})
        >>> merge([a, b]).predictions.tolist()
        [7, 5]
    """
    results = [r for r in results if r is not None]
    if len(results) == 1:
        return results[0]
    indices = torch.cat([r.indices.reshape(-1) for r in results])
    order = torch.argsort(indices)
    maps = {}
    for key in results[0].maps:
        if all(key in r.maps for r in results):
            maps[key] = torch.cat([r.maps[key] for r in results])[order]
    per_image = {}
    # a shard may hold none of a subset metric's images (stability_images, expensive_images): NaN there
    for key in dict.fromkeys(k for r in results for k in r.per_image):
        per_image[key] = torch.cat([r.per_image[key] if key in r.per_image else _nan(len(r.indices.reshape(-1)))
                                    for r in results])[order]
    _recompute_merged(per_image)
    errors: list[dict[str, Any]] = []
    for r in results:
        errors.extend(e for e in r.errors if e not in errors)
    sizes = [len(r.indices.reshape(-1)) for r in results]
    finite = None
    if any(r.finite_logits is not None for r in results):
        finite = torch.cat([torch.ones(k, dtype=torch.bool) if r.finite_logits is None else r.finite_logits.bool()
                            for r, k in zip(results, sizes)])[order]
    degenerate = {key: torch.cat([r.degenerate.get(key, torch.zeros(k, dtype=torch.int8))
                                  for r, k in zip(results, sizes)])[order] for key in maps}
    labels = None
    if all(r.label_predictions is not None for r in results):
        labels = torch.cat([r.label_predictions for r in results])[order]
    logits = torch.cat([r.logits for r in results])[order] if all(r.logits is not None for r in results) else None
    return ShardResult(indices=indices[order], predictions=torch.cat([r.predictions for r in results])[order],
                       maps=maps, per_image=per_image, errors=errors, dtype=results[0].dtype,
                       finite_logits=finite, degenerate=degenerate, label_predictions=labels, logits=logits)


def _nanmean(v: Tensor) -> float:
    v = v[torch.isfinite(v)]
    return float(v.mean()) if len(v) else math.nan


def summarize(result: ShardResult, probe: ProbeSet, spec: AuditSpec) -> dict[str, float]:
    """Reduce a (merged) result over the whole probe into the report's metric dict.

    Keys: ``<method>/<metric>`` (mean over images), ``<method>/<metric>/<group>`` (per-group means of the rows
    reported ``per_group``), the probe-level rows' values (their ``summary``: ``attention_disparity``,
    ``group_divergence``), ``probe/accuracy``, ``probe/accuracy/class_<k>`` and ``probe/accuracy/<group>``; on a
    multi-label probe (``labels``) these are per-label accuracies, plus ``probe/f1``; on a segmentation probe, IoUs
    (``probe/accuracy`` is the mean IoU): :mod:`lightning_saliency.labels`.

    Degenerate images (:mod:`lightning_saliency.health`) are left out: the accuracies are NaN when any logit is not
    finite; a probe-level row uses a method's usable images only, and is NaN when none (or no image of some group)
    is left.
    """
    out: dict[str, float] = {}
    groups = probe.groups
    labels = probe.targets.cpu()
    correct = (result.predictions.cpu() == labels).float()
    if result.finite_logits is not None and not bool(result.finite_logits.all()):
        correct = torch.full_like(correct, math.nan)  # the argmax of NaN logits is no prediction
    out["probe/accuracy"] = float(correct.mean()) if len(correct) else math.nan
    for k in sorted(set(labels.tolist())):
        out[f"probe/accuracy/class_{k}"] = float(correct[labels == k].mean())
    if groups is not None:
        for g in sorted(set(groups)):
            sel = torch.tensor([x == g for x in groups])
            out[f"probe/accuracy/{g}"] = float(correct[sel].mean())
    if result.label_predictions is not None and getattr(probe, "labels", None) is not None:
        # multi-label: per-label accuracy and F1; segmentation: mean IoU (NaN like the above when a logit is not
        # finite)
        multi = multilabel_accuracy(result.label_predictions, probe.labels, groups) \
            if result.label_predictions.ndim == 2 else mean_iou(result.label_predictions, groups)
        out.update({k: v if bool(correct.isfinite().all()) else math.nan for k, v in multi.items()})
    for key, values in result.per_image.items():
        out[key] = _nanmean(values)
        row = get_metric(key.split("/", 1)[1])
        if groups is not None and row is not None and row.per_group:
            for g in sorted(set(groups)):
                sel = torch.tensor([x == g for x in groups])
                out[f"{key}/{g}"] = _nanmean(values[sel])
    for row in specs():  # the probe-level rows: computed over the groups from the merged result
        if row.summary is None or row.name not in spec.metrics or ("groups" in row.needs and groups is None):
            continue
        for method in spec.methods:
            if method in result.maps:
                value = _summary(row, result, probe, method)
                if value is not None:
                    out[f"{method}/{row.name}"] = value
    return out


def _summary(row: Any, result: ShardResult, probe: ProbeSet, method: str) -> float | None:
    """A probe-level row's value over the images whose ``method`` map is usable; NaN when none, or no image of
    some group, is left (a disparity between the groups that are left is not the probe's)."""
    ok = _health.healthy_images(result, method)
    if bool(ok.all()):
        return row.summary(result, probe, method)
    groups = probe.groups
    kept = None if groups is None else {g for g, keep in zip(groups, ok.tolist()) if keep}
    if not bool(ok.any()) or (kept is not None and len(kept) < len(set(groups))):
        return math.nan
    where = ok.nonzero()[:, 0]
    sub = ShardResult(indices=result.indices[where], predictions=result.predictions[where],
                      maps={k: v[where] for k, v in result.maps.items()},
                      per_image={k: v[where] for k, v in result.per_image.items()}, dtype=result.dtype)
    return row.summary(sub, probe.subset(where), method)


class Reference:
    """The maps drift compares with: the last fit audit's, and the ones that audit itself compared with (so the
    last audit can be completed later from the same reference). Validate/test maps never become the reference.

    A method whose maps drift has ranked is kept as its ranks only (``ranks``; ``maps`` holds the others): drift
    reads nothing else, and the monitor holds one ``[N, H*W]`` tensor per method and kept audit, not two."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.maps: dict[str, torch.Tensor] | None = None
        self.ranks: dict[str, torch.Tensor] | None = None  # the same maps ranked (drift ranks each map once)
        self.used: tuple[Any, Any] = (None, None)

    def advance(self, result: ShardResult) -> None:
        self.used = self.maps, self.ranks
        if result.maps:
            ranks = result.ranks or {}
            self.maps, self.ranks = {k: v for k, v in result.maps.items() if k not in ranks}, ranks or None

    @contextlib.contextmanager
    def rewound(self) -> Iterator[None]:
        """Within: the reference the last audit used (to complete that audit)."""
        current = self.maps, self.ranks
        self.maps, self.ranks = self.used
        try:
            yield
        finally:
            self.maps, self.ranks = current
