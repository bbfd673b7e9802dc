"""One audit of a model on (a shard of) a probe set: maps, per-image metric values, and their summary.

This is the layer between the pure functions (``methods/``, ``metrics/``) and the Lightning callbacks: it
knows which metrics need which inputs and how to reduce them into the report's ``<method>/<metric>`` keys, but
nothing about trainers, ranks or loggers. The callback runs :func:`audit_shard` on each rank's shard, gathers
the :class:`ShardResult` objects, :func:`merge` s them on rank 0 and calls :func:`summarize`.

Metric names (``metrics=`` of :class:`~lightning_saliency.SaliencyMonitor`):

========================== ======================================================== ===========
name                       what is logged                                           cost
========================== ======================================================== ===========
``object_mass``            mean relevance mass inside the object masks, per group   free
``spurious_mass``          mean relevance mass inside the spurious masks, per group free
``pointing_game``          share of maps whose maximum lies in the object mask       free
``stability``              Spearman of maps under input noise, k draws              k x maps on
                                                                                    a subset;
                                                                                    periodic
``drift``                  Spearman with the previous audit's maps                  free
``attention_disparity``    gap between group means of spurious (else object) mass   free
``group_divergence``       1 - Pearson between groups' mean maps (no masks needed)  free
``deletion_auc``           RISE deletion (and its random-ranking reference)         expensive
``insertion_auc``          RISE insertion (and its random-ranking reference)        expensive
``infidelity``             squared error of the map's linear prediction of drops    expensive
``max_sensitivity``        worst relative change of the map under small noise       expensive
``completeness_gap``       ``integrated_gradients`` and ``input_x_gradient`` only   expensive
``randomization_similarity`` Spearman with the maps of a re-initialised copy        expensive
========================== ======================================================== ===========

Stability and the expensive metrics run the model again (:data:`PERIODIC_METRICS`); the monitor computes them
every ``expensive_every_n_audits`` audits and at the last audit of a fit, validate or test, so that the final
report (the one a CI gate reads) always has them. The others come from the audit's own maps, every audit.

Besides the metrics, every audit reports the probe's accuracy: ``probe/accuracy``, per class
``probe/accuracy/class_<k>`` and per group ``probe/accuracy/<group>``, because disparity is read next to accuracy.

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

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import metrics as M
from .layers import TargetLayer
from .methods.engine import attribute
from .methods.registry import SIGNED_METHODS, method_names
from .probe import ProbeSet
from .report import error_record

__all__ = [
    "ALL_METRICS",
    "CHEAP_METRICS",
    "DEFAULT_METRICS",
    "EXPENSIVE_METRICS",
    "PERIODIC_METRICS",
    "AuditSpec",
    "ShardResult",
    "audit_shard",
    "merge",
    "summarize",
    "validate_metrics",
]

CHEAP_METRICS = ("object_mass", "spurious_mass", "pointing_game", "stability", "drift", "attention_disparity",
                 "group_divergence")
EXPENSIVE_METRICS = ("deletion_auc", "insertion_auc", "infidelity", "max_sensitivity", "completeness_gap",
                     "randomization_similarity")
ALL_METRICS = CHEAP_METRICS + EXPENSIVE_METRICS
DEFAULT_METRICS = CHEAP_METRICS  # the expensive ones are opt-in, and then run every few audits only
# the metrics that run the model again (the others are computed from the audit's own maps): the monitor runs
# them every `expensive_every_n_audits` audits and at the last audit of a fit, validate or test
PERIODIC_METRICS = ("stability",) + EXPENSIVE_METRICS


def validate_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """Check metric names; an unknown one is a ``ValueError`` listing the known ones.

    Example:
        >>> validate_metrics(["spurious_mass"])
        ('spurious_mass',)
    """
    import difflib

    out = []
    for name in metrics:
        if name not in ALL_METRICS:
            close = difflib.get_close_matches(str(name), ALL_METRICS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown metric {name!r}.{hint} Known metrics: {', '.join(ALL_METRICS)}")
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
        batch_size: chunk size for the attribution passes.
        target: explain the model's ``"prediction"`` (default) or the probe's ``"label"``.
        method_options: extra keyword options for :func:`~lightning_saliency.attribute`.
        stability_k, stability_sigma, stability_images: stability's draws, noise scale (relative to each
            image's std) and the number of probe images it uses (the first ones of the whole probe, also when
            it is sharded; ``None`` = all).
        expensive_images: images used by the expensive metrics (the first ones; ``None`` = all).
        seed: seed of every random draw the metrics make (they never touch the global generators).
    """

    methods: tuple[str, ...] = ("gradcam", "gradient")
    metrics: tuple[str, ...] = DEFAULT_METRICS
    layer: Any = "auto"
    reshape: Callable[[Tensor], Tensor] | None = None
    batch_size: int | None = None
    target: str = "prediction"
    method_options: dict[str, Any] = field(default_factory=dict)
    stability_k: int = 4
    stability_sigma: float = 0.1
    stability_images: int | None = 8
    expensive_images: int | None = 16
    seed: int = 0

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        unknown = [m for m in self.methods if m not in method_names()]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known methods: {', '.join(method_names())}")
        if not self.methods:
            raise ValueError("methods is empty; pass at least one method, e.g. methods=('gradcam',)")
        self.metrics = validate_metrics(self.metrics)
        if self.target not in ("prediction", "label"):
            raise ValueError(f"target must be 'prediction' or 'label', got {self.target!r}")

    def explain(self, model: nn.Module, inputs: Tensor, targets: Tensor,
                methods: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Maps of ``methods`` (default: all of the spec's) for ``inputs`` and ``targets``.

        A resolved :class:`~lightning_saliency.layers.TargetLayer` is used as is on the model it was resolved
        on; on any other model (the re-initialised copy of the sanity check) its name is resolved again."""
        layer = self.layer
        if isinstance(layer, TargetLayer) and not any(m is layer.module for m in model.modules()):
            layer = layer.name
        return attribute(model, inputs, targets, methods=tuple(methods or self.methods), layer=layer,
                         reshape=self.reshape, batch_size=self.batch_size, **self.method_options)


@dataclass
class ShardResult:
    """What one rank computed for its shard of the probe (all tensors on the CPU).

    ``indices`` are the shard's positions in the full probe; ``per_image`` maps ``<method>/<metric>`` to ``[n]``
    values (NaN where a metric did not cover an image); ``errors`` are report error records.
    """

    indices: Tensor
    predictions: Tensor
    maps: dict[str, Tensor] = field(default_factory=dict)
    per_image: dict[str, Tensor] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    dtype: str = "float32"
    ranks: dict[str, Tensor] = field(default_factory=dict)  # |M| ranked, for the next audit's drift (not merged)


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
                previous_ranks: Mapping[str, Tensor] | None = None) -> ShardResult:
    """Run one audit on ``probe`` (a whole probe set or one rank's shard).

    Computes the maps of every method in one shared pass, then the per-image values of the chosen metrics.
    A method or metric that raises is recorded in ``errors`` and warned about (``on_error="warn"``), recorded only
    (``"collect"``), or raised (``"raise"``): :data:`lightning_saliency.methods.engine.ON_ERROR`.
    ``previous_maps`` (the last audit's maps of the same images) feed ``drift``, or ``previous_ranks`` (the last
    result's ``ranks``: the same, already ranked, so each map is ranked once); ``expensive=False`` skips
    the metrics that run the model again (:data:`PERIODIC_METRICS`: stability and the expensive ones).

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

    def explain_with_info(methods: Sequence[str]) -> tuple[dict[str, Tensor], Any]:
        return attribute(model, inputs, explain_targets, methods=tuple(methods), layer=spec.layer,
                         reshape=spec.reshape, batch_size=spec.batch_size, return_info=True,
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
                logits = model(inputs)
            predictions = logits.argmax(1)
            dtype = str(logits.dtype).replace("torch.", "")
            targets = predictions if explain_targets is None else explain_targets
        else:
            predictions, targets, dtype = info.predictions, info.targets, info.forward_dtype
    else:
        predictions, targets, dtype = info.predictions, info.targets, info.forward_dtype
    methods = [m for m in spec.methods if m in maps]
    per_image: dict[str, Tensor] = {}
    ranks: dict[str, Tensor] = {}
    wanted = set(spec.metrics)

    def explain_all(x: Tensor, t: Tensor) -> dict[str, Tensor]:  # one pass serves every method's noisy maps
        return spec.explain(model, x, t, methods)

    # subsets are chosen by position in the whole probe, so a sharded (DDP) audit scores the same images
    positions = getattr(probe, "indices", None)
    positions = torch.as_tensor(positions).cpu() if positions is not None else torch.arange(n)
    stab = (positions < (spec.stability_images if spec.stability_images is not None else n + 1)).nonzero()[:, 0]
    exp = (positions < (spec.expensive_images if spec.expensive_images is not None else n + 1)).nonzero()[:, 0]

    def run(method: str, metric: str, fn: Callable[[], Tensor], where: Tensor | None = None) -> None:
        try:
            per_image[f"{method}/{metric}"] = _padded(fn(), n, where)
        except Exception as e:
            fail(e, method, f"metric {metric!r} of {method!r}")

    def run_multi(metric: str, fn: Callable[[], dict[str, Tensor]], where: Tensor) -> None:
        try:
            for method, values in fn().items():
                per_image[f"{method}/{metric}"] = _padded(values, n, where)
        except Exception as e:
            fail(e, None, f"metric {metric!r}")

    dev = inputs.device
    stab_d, exp_d = stab.to(dev), exp.to(dev)
    for method in methods:
        m = maps[method].abs() if method in SIGNED_METHODS else maps[method]
        if "object_mass" in wanted and probe.object_masks is not None:
            run(method, "object_mass", lambda m=m: M.region_mass(m, probe.object_masks))
        if "spurious_mass" in wanted and probe.spurious_masks is not None:
            run(method, "spurious_mass", lambda m=m: M.region_mass(m, probe.spurious_masks))
        if "pointing_game" in wanted and probe.object_masks is not None:
            run(method, "pointing_game", lambda m=m: M.pointing_game(m, probe.object_masks))
        if "drift" in wanted:
            try:
                ranks[method] = M.map_ranks(m)  # compared now, and kept for the next audit
            except Exception as e:
                fail(e, method, f"metric 'drift' of {method!r}")
            prev_ranks = None
            if previous_ranks is not None and method in previous_ranks:
                prev_ranks = previous_ranks[method].to(m.device)
            elif previous_maps is not None and method in previous_maps and previous_maps[method].shape == m.shape:
                prev_ranks = M.map_ranks(previous_maps[method].to(m.device))
            if method in ranks and prev_ranks is not None and prev_ranks.shape == ranks[method].shape:
                run(method, "drift", lambda r=ranks[method], prev=prev_ranks: M.drift_from_ranks(prev, r))
    if expensive and "stability" in wanted and len(stab) and methods:
        run_multi("stability", lambda: M.stability(
            explain_all, inputs[stab_d], targets[stab_d], k=spec.stability_k, sigma=spec.stability_sigma,
            seed=spec.seed, maps={m: maps[m][stab_d] for m in methods}, batch_size=spec.batch_size), stab)
    if expensive and len(exp) and methods and "max_sensitivity" in wanted:
        run_multi("max_sensitivity", lambda: M.max_sensitivity(
            explain_all, inputs[exp_d], targets[exp_d], seed=spec.seed,
            maps={m: maps[m][exp_d] for m in methods}, batch_size=spec.batch_size), exp)
    if expensive and len(exp):
        xs, ts = inputs[exp_d], targets[exp_d]
        ig_baseline = spec.method_options.get("ig_baseline")
        for method in methods:
            m = maps[method][exp_d]
            if "deletion_auc" in wanted or "insertion_auc" in wanted:
                for name, fn in (("deletion_auc", M.deletion_auc), ("insertion_auc", M.insertion_auc)):
                    if name not in wanted:
                        continue
                    try:
                        out = fn(model, xs, ts, m.abs(), seed=spec.seed, batch_size=spec.batch_size or 64)
                        per_image[f"{method}/{name}"] = _padded(out["auc"], n, exp)
                        if "random_auc" in out:
                            per_image[f"{method}/{name}_random"] = _padded(out["random_auc"], n, exp)
                    except Exception as e:
                        fail(e, method, f"metric {name!r} of {method!r}")
            if "infidelity" in wanted:
                run(method, "infidelity", lambda m=m: M.infidelity(model, xs, ts, m, seed=spec.seed,
                                                                    batch_size=spec.batch_size), exp)
            if "completeness_gap" in wanted and method in SIGNED_METHODS:
                # IG is complete with respect to its own baseline; input x gradient to zero
                base = ig_baseline if method == "integrated_gradients" and ig_baseline is not None else 0.0
                if isinstance(base, Tensor) and base.shape[:1] == inputs.shape[:1]:
                    base = base[exp_d]
                run(method, "completeness_gap", lambda m=m, base=base: M.completeness_gap(
                    model, xs, ts, m, baseline=base, batch_size=spec.batch_size), exp)
            if "randomization_similarity" in wanted:
                run(method, "randomization_similarity", lambda method=method, m=m: M.randomization_similarity(
                    model, lambda mdl, x, t, method=method: spec.explain(mdl, x, t, (method,))[method],
                    xs, ts, maps=m, seed=spec.seed)["all"], exp)
    return ShardResult(
        indices=getattr(probe, "indices", None) if getattr(probe, "indices", None) is not None
        else torch.arange(n),
        predictions=predictions.detach().cpu(),
        maps={k: v.detach().float().cpu() for k, v in maps.items()},
        per_image=per_image,
        errors=errors,
        dtype=dtype,
        ranks={k: v.detach().cpu() for k, v in ranks.items()},
    )


def merge(results: Sequence[ShardResult]) -> ShardResult:
    """Concatenate shard results in probe order (by ``indices``); errors are pooled without duplicates.

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
    errors: list[dict[str, Any]] = []
    for r in results:
        errors.extend(e for e in r.errors if e not in errors)
    return ShardResult(indices=indices[order], predictions=torch.cat([r.predictions for r in results])[order],
                       maps=maps, per_image=per_image, errors=errors, dtype=results[0].dtype)


def _nanmean(v: Tensor) -> float:
    v = v[torch.isfinite(v)]
    return float(v.mean()) if len(v) else math.nan


def summarize(result: ShardResult, probe: ProbeSet, spec: AuditSpec) -> dict[str, float]:
    """Reduce a (merged) result over the whole probe into the report's metric dict.

    Keys: ``<method>/<metric>`` (mean over images), ``<method>/<metric>/<group>`` (per-group means of the
    mask-based metrics), ``<method>/attention_disparity``, ``<method>/group_divergence``, ``probe/accuracy``,
    ``probe/accuracy/class_<k>`` and ``probe/accuracy/<group>``.
    """
    out: dict[str, float] = {}
    groups = probe.groups
    labels = probe.targets.cpu()
    correct = (result.predictions.cpu() == labels).float()
    out["probe/accuracy"] = float(correct.mean()) if len(correct) else math.nan
    for k in sorted(set(labels.tolist())):
        out[f"probe/accuracy/class_{k}"] = float(correct[labels == k].mean())
    if groups is not None:
        for g in sorted(set(groups)):
            sel = torch.tensor([x == g for x in groups])
            out[f"probe/accuracy/{g}"] = float(correct[sel].mean())
    for key, values in result.per_image.items():
        out[key] = _nanmean(values)
        method, metric = key.split("/", 1)
        if groups is not None and metric in ("object_mass", "spurious_mass", "pointing_game"):
            for g in sorted(set(groups)):
                sel = torch.tensor([x == g for x in groups])
                out[f"{key}/{g}"] = _nanmean(values[sel])
    wanted = set(spec.metrics)
    for method in spec.methods:
        if groups is None or method not in result.maps:
            continue
        if "attention_disparity" in wanted:
            stat = result.per_image.get(f"{method}/spurious_mass", result.per_image.get(f"{method}/object_mass"))
            if stat is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out[f"{method}/attention_disparity"] = M.attention_disparity(stat, groups)["disparity"]
        if "group_divergence" in wanted:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[f"{method}/group_divergence"] = M.group_divergence(result.maps[method], groups)["divergence"]
    return out
