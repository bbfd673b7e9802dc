"""The metric registry: one :class:`MetricSpec` row per metric, the single list of metric names.

Every list of metric names the package uses is derived from these rows: the default set and the periodic set
(:mod:`lightning_saliency.audit`), the per-group set (``summarize``), the monitor's expected keys, the page's
chart order, TensorBoard's custom-scalars layout, the gate's key suggestions and :class:`ShortcutAlarm`'s
default direction. Adding a metric is its formula (a function in ``metrics/``) plus one row here, or, from user
code, one call to :func:`register_metric`.

This module never imports torch at import time (the ``lightning-saliency gate`` command reads the name-level
facts); the rows' ``compute`` and ``summary`` functions import the formulas when they run.

A row's ``compute(ctx, methods) -> {key: values [n]}`` scores the images of ``ctx.rows(spec.images)`` for
``methods`` (one method at a time, or all of them at once when ``one_pass``: the noisy passes are shared);
keys are the method name (the value reported as ``<method>/<name>``) or the method name plus one of the row's
``extra_keys`` (``<method>/<name><suffix>``). A ``probe_level`` row scores the model on the probe, not a
method's maps: its ``compute(ctx, ())`` is called once per audit and returns the keys ``""`` (plus the
``extra_keys``), reported as ``probe/<name>[<suffix>]``. A row's ``summary(result, probe, method) -> float | None`` is a
probe-level value computed when the audit is summarised (over groups), not per image.

The rows, in chart order (the page and the dashboards show the charts in this order; the table is generated
from the rows when this module is imported, see :func:`metric_table`):

{table}

Example:
    >>> get_metric("spurious_mass").higher_is_better, get_metric("spurious_mass").needs
    (False, ('spurious_masks',))
    >>> metric_names(periodic=True)[:2]
    ('stability', 'deletion_auc')
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._adapters import (  # the built-in rows' compute and summary functions
    _DISPARITY_READS,
    _agreement,
    _completeness_gap,
    _disparity,
    _divergence,
    _drift,
    _fragility,
    _infidelity,
    _mask_metric,
    _noisy,
    _randomization,
    _recalibrated,
    _rise,
    _spurious,
)

if TYPE_CHECKING:  # annotations only: importing this module must not import torch
    from torch import Tensor

__all__ = [
    "DISCOVERY_KEYS",
    "NEEDS",
    "AuditContext",
    "MetricSpec",
    "alarm_mode",
    "get_metric",
    "metric_table",
    "metric_names",
    "metric_of_key",
    "missing_key_hint",
    "need_text",
    "register_metric",
    "specs",
    "unmet_needs",
    "unregister_metric",
]

# what a metric may need: masks of a kind ("masks": either kind), probe groups, the model run again, the
# previous audit's maps, a signed map (completeness is a property of signed attributions)
NEEDS = ("object_masks", "spurious_masks", "masks", "groups", "model", "previous", "signed")
IMAGES = ("all", "stability", "expensive")  # which probe images a row scores (see AuditSpec)


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name-level facts and how the audit computes it.

    Args:
        name: the ``<metric>`` of report keys ``<method>/<metric>``.
        higher_is_better: ``True``, ``False``, or ``None`` for a metric to watch rather than optimise (drift).
        doc: one line for tables and messages.
        needs: what it needs (:data:`NEEDS`); a row whose masks or groups the probe lacks is skipped.
        per_group: reported per group too (``<method>/<metric>/<group>``, the mean over the group's images).
        periodic: runs the model again; the monitor computes it every ``expensive_every_n_audits`` audits.
        extra_keys: suffixes of the other keys it emits (``("_random",)``: ``<method>/<metric>_random``).
        default: in the default metric set.
        images: the probe images it scores: ``"all"``, ``"stability"`` (``stability_images``) or
            ``"expensive"`` (``expensive_images``).
        one_pass: ``compute`` scores every method from one shared pass (called once, not once per method).
        probe_level: ``compute`` does not read the maps: called once with ``methods=()``, its values are reported
            as ``probe/<name>`` (the causal tests of the spurious masks).
        compute: ``compute(ctx: AuditContext, methods) -> {method[+suffix]: values [n]}`` (per-image rows).
        summary: ``summary(result, probe, method) -> float | None`` (probe-level rows, computed over groups).
        builtin: a row of the package (``False``: added with :func:`register_metric`).
        reads: metrics whose per-image values ``summary`` reads, in order of preference (one suffices): a
            probe-level row is reported only when one of them is computed too.
        scorecard: a column of the method scorecard's default set (:func:`lightning_saliency.scorecard`).
        merged: ``merged(parts) -> values [N]``: the per-image values recomputed from the merged shards' rows, for
            a value that depends on the images scored together (the agreements' calibration); ``parts`` maps
            ``"value"`` and each extra key's suffix (without its ``_``) to the whole probe's rows.

    Example:
        >>> get_metric("object_mass").direction, get_metric("object_mass").per_group
        ('higher is better', True)
    """

    name: str
    higher_is_better: bool | None
    doc: str
    needs: tuple[str, ...] = ()
    per_group: bool = False
    periodic: bool = False
    extra_keys: tuple[str, ...] = ()
    default: bool = False
    images: str = "all"
    one_pass: bool = False
    probe_level: bool = False
    compute: Callable[..., Mapping[str, Any]] | None = field(default=None, repr=False, compare=False)
    summary: Callable[..., float | None] | None = field(default=None, repr=False, compare=False)
    builtin: bool = True
    reads: tuple[str, ...] = ()
    scorecard: bool = False
    merged: Callable[[Mapping[str, Tensor]], Tensor] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = [n for n in self.needs if n not in NEEDS]
        if unknown:
            raise ValueError(f"metric {self.name!r}: unknown needs {unknown}; choose from {', '.join(NEEDS)}")
        if self.images not in IMAGES:
            raise ValueError(f"metric {self.name!r}: images must be one of {IMAGES}, got {self.images!r}")
        if (self.compute is None) == (self.summary is None) and self.builtin:
            raise ValueError(f"metric {self.name!r}: give exactly one of compute (per image) or summary")

    @property
    def direction(self) -> str:
        """``"higher is better"``, ``"lower is better"`` or ``"watch"``."""
        if self.higher_is_better is None:
            return "watch"
        return "higher is better" if self.higher_is_better else "lower is better"


@dataclass
class AuditContext:
    """What a row's ``compute`` reads: the model, the probe (shard), the maps and the audit's settings.

    ``maps`` are the methods' raw maps ``[n, H, W]`` (:meth:`magnitude` gives ``|M|`` for signed methods);
    ``targets`` the explained classes; ``subsets`` the positions of the ``"stability"`` and ``"expensive"``
    images in the shard (on the inputs' device); ``ranks`` collects each method's ranked map for the next
    audit's drift; ``full_probe`` is the whole probe when ``probe`` is a shard of it (``None``: the same).
    """

    model: Any
    probe: Any
    spec: Any
    maps: dict[str, Tensor]
    targets: Tensor
    subsets: dict[str, Tensor]
    signed: frozenset[str] = frozenset()
    previous_maps: Mapping[str, Tensor] | None = None
    previous_ranks: Mapping[str, Tensor] | None = None
    ranks: dict[str, Tensor] = field(default_factory=dict)
    full_probe: Any = None  # the whole probe when ``probe`` is one shard of it (donors of the spurious swaps)

    def magnitude(self, method: str) -> Tensor:
        """``|M|`` of a signed method's maps, the maps themselves otherwise."""
        return self.maps[method].abs() if method in self.signed else self.maps[method]

    def rows(self, images: str) -> Tensor | None:
        """Positions of the images a row scores (``None``: all of them)."""
        return None if images == "all" else self.subsets[images]

    def positions(self, images: str) -> Tensor:
        """Positions in the whole probe (``[n]`` long, CPU) of the images a row scores: what keys their random
        draws, so that a shard draws what the whole probe draws for the same images."""
        import torch

        indices = getattr(self.probe, "indices", None)
        indices = torch.arange(len(self.probe)) if indices is None else torch.as_tensor(indices).cpu()
        rows = self.rows(images)
        return indices if rows is None else indices[rows.cpu()]

    def explain(self, inputs: Tensor, targets: Tensor, methods: tuple[str, ...], model: Any = None,
                positions: Tensor | None = None) -> dict:
        """Maps of ``methods`` for other inputs (noisy copies) or another model (a re-initialised copy);
        ``positions`` key the methods' per-image draws (:meth:`positions`; default: the rows' places in the call)."""
        return self.spec.explain(self.model if model is None else model, inputs, targets, methods,
                                 positions=positions)


_P = dict(periodic=True, images="expensive", needs=("model",))
_S = dict(_P, scorecard=True)  # also a column of the scorecard
_AGREEMENT_KEYS = ("_tau", "_topk", "_tau_ceiling", "_tau_floor", "_topk_ceiling", "_topk_floor")
# the causal tests of the spurious masks: probe-level (keys probe/<name>), forward passes over the whole probe
_CAUSAL = dict(periodic=True, probe_level=True, per_group=True, needs=("model", "spurious_masks"))
_BUILTIN = (
    MetricSpec("spurious_mass", False, "mean relevance mass inside the spurious masks, per group",
               needs=("spurious_masks",), per_group=True, default=True,
               compute=_mask_metric("region_mass", "spurious_masks")),
    MetricSpec("object_mass", True, "mean relevance mass inside the object masks, per group",
               needs=("object_masks",), per_group=True, default=True,
               compute=_mask_metric("region_mass", "object_masks")),
    MetricSpec("attention_disparity", False, "gap between group means of spurious (else object) mass",
               needs=("groups", "masks"), default=True, summary=_disparity, reads=_DISPARITY_READS),
    MetricSpec("pointing_game", True, "share of maps whose maximum lies in the object mask, per group",
               needs=("object_masks",), per_group=True, default=True,
               compute=_mask_metric("pointing_game", "object_masks")),
    MetricSpec("group_divergence", False, "1 - Pearson between groups' mean maps (no masks needed)",
               needs=("groups",), default=True, summary=_divergence),
    MetricSpec("stability", True, "Spearman of maps under input noise, k draws", needs=("model",),
               periodic=True, default=True, images="stability", one_pass=True, scorecard=True,
               compute=_noisy("stability", "stability")),
    MetricSpec("drift", None, "Spearman with the previous audit's maps", needs=("previous",), default=True,
               compute=_drift),
    MetricSpec("deletion_auc", False, "RISE deletion (and its random-ranking reference)",
               extra_keys=("_random",), compute=_rise("deletion_auc"), **_S),
    MetricSpec("insertion_auc", True, "RISE insertion (and its random-ranking reference)",
               extra_keys=("_random",), compute=_rise("insertion_auc"), **_S),
    MetricSpec("infidelity", False, "squared error of the map's linear prediction of drops",
               compute=_infidelity, **_S),
    MetricSpec("max_sensitivity", False, "worst relative change of the map under small noise", one_pass=True,
               compute=_noisy("max_sensitivity", "expensive"), **_P),
    MetricSpec("completeness_gap", False, "sum of the map vs the logit change (signed methods only)",
               compute=_completeness_gap, **{**_P, "needs": ("model", "signed")}),
    MetricSpec("randomization_similarity", False, "Spearman with the maps of a re-initialised copy",
               compute=_randomization, **_S),
    MetricSpec("fragility", False, "top-k attack within an L-inf ball vs random-sign noise (Ghorbani et al.)",
               extra_keys=("_random",), compute=_fragility, **_S),
    *(MetricSpec(f"{short}_agreement", True, f"Kendall tau and top-k cells vs {ref}, calibrated: seeds / random",
                 extra_keys=_AGREEMENT_KEYS, one_pass=True, compute=_agreement(ref), merged=_recalibrated, **_S)
      for short, ref in (("shap", "shapley"), ("lime", "lime"))),
    MetricSpec("spurious_flip_rate", False, "share of predictions moving to the donor's class when the spurious "
               "region is swapped between classes", compute=_spurious("flip"), **_CAUSAL),
    MetricSpec("spurious_logit_gain", False, "gain of the donor class's logit margin when the spurious region is "
               "swapped", compute=_spurious("logit_gain"), **_CAUSAL),
    MetricSpec("spurious_erase_drop", False, "accuracy lost when each image's spurious region is filled with a blur",
               compute=_spurious("erase"), **_CAUSAL),
)
_REGISTRY: dict[str, MetricSpec] = {s.name: s for s in _BUILTIN}
#: the keys of discovery (SaliencyMonitor(discover=True), lightning_saliency.discovery_audit), not metric rows: the
#: confirmed candidates (mode max) and the largest flip rate of any candidate
DISCOVERY_KEYS = ("discovery/suspects", "discovery/max_flip_rate")


def specs() -> tuple[MetricSpec, ...]:
    """Every row, built-ins first in chart order, then registered metrics in registration order.

    Example:
        >>> specs()[0].name
        'spurious_mass'
    """
    return tuple(_REGISTRY.values())


def get_metric(name: str) -> MetricSpec | None:
    """The row of ``name``, or ``None``.

    Example:
        >>> get_metric("drift").direction
        'watch'
    """
    return _REGISTRY.get(str(name))


def metric_names(*, default: bool | None = None, periodic: bool | None = None,
                 builtin: bool | None = None) -> tuple[str, ...]:
    """Metric names in chart order, optionally only those whose ``default``/``periodic``/``builtin`` match.

    Example:
        >>> metric_names(default=True)
        ('spurious_mass', 'object_mass', 'attention_disparity', 'pointing_game', 'group_divergence', 'stability', 'drift')
    """
    return tuple(s.name for s in _REGISTRY.values()
                 if (default is None or s.default == default) and (periodic is None or s.periodic == periodic)
                 and (builtin is None or s.builtin == builtin))


def metric_of_key(key: str) -> tuple[MetricSpec, str, str | None] | None:
    """``(row, suffix, group)`` of a report key ``<method>/<metric>[<suffix>][/<group>]``, or ``None``.

    Example:
        >>> spec, suffix, group = metric_of_key("gradcam/deletion_auc_random")
        >>> spec.name, suffix, group
        ('deletion_auc', '_random', None)
    """
    parts = str(key).split("/", 2)
    if len(parts) < 2:
        return None
    group = parts[2] if len(parts) == 3 else None
    for s in _REGISTRY.values():
        for suffix in ("", *s.extra_keys):
            if parts[1] == s.name + suffix:
                return s, suffix, group
    return None


def alarm_mode(key: str) -> str:
    """The alarm direction for a report key: ``"min"`` (fire when below) where higher is better, else ``"max"``.

    Example:
        >>> alarm_mode("gradcam/object_mass/site_a"), alarm_mode("gradcam/spurious_mass")
        ('min', 'max')
    """
    found = metric_of_key(key)
    return "min" if found is not None and found[0].higher_is_better else "max"


_NEED_TEXT = {
    "object_masks": "object masks on the probe (ProbeSet(object_masks=...), from_dataset(object_mask_fn=...) or, "
                    "with probe=None, SaliencyMonitor(object_mask_key=...))",
    "spurious_masks": "spurious masks on the probe (ProbeSet(spurious_masks=...), from_dataset(spurious_mask_fn=...) "
                      "or, with probe=None, SaliencyMonitor(spurious_mask_key=...))",
    "masks": "object or spurious masks on the probe",
    "groups": "groups on the probe (ProbeSet(groups=...), from_dataset(group_fn=...) or, with probe=None, "
              "SaliencyMonitor(group_key=...))",
    "previous": "a previous audit to compare with (it is missing from the first audit)",
    "signed": "a signed method (integrated_gradients, input_x_gradient)",
}


_PROBE_NEEDS = ("object_masks", "spurious_masks", "masks", "groups")  # what the probe, not the setup, provides


def need_text(need: str) -> str:
    """What a need (:data:`NEEDS`) asks for, with how to provide it.

    Example:
        >>> need_text("groups")
        'groups on the probe (ProbeSet(groups=...), from_dataset(group_fn=...) or, with probe=None, SaliencyMonitor(group_key=...))'
    """
    return _NEED_TEXT.get(need, need)


def unmet_needs(key: str, have: Iterable[str]) -> tuple[str, ...]:
    """The needs of report key ``key`` that a probe providing ``have`` leaves unmet (names of :data:`NEEDS`).

    Only what a probe provides is judged: masks (``"masks"`` is met by either kind) and groups, which a
    per-group key ``<method>/<metric>/<group>`` needs too. ``()`` for a key of no registered metric.

    Example:
        >>> unmet_needs("gradcam/spurious_mass/site_a", {"object_masks"})
        ('spurious_masks', 'groups')
        >>> unmet_needs("gradcam/attention_disparity", {"object_masks", "groups"})
        ()
    """
    found = metric_of_key(key)
    if found is None:
        return ()
    spec, _, group = found
    have = set(have) | ({"masks"} if set(have) & {"object_masks", "spurious_masks"} else set())
    wanted = [n for n in spec.needs if n in _PROBE_NEEDS]
    if group is not None and spec.per_group and "groups" not in wanted:
        wanted.append("groups")
    return tuple(n for n in wanted if n not in have)


def missing_key_hint(key: str, present: Iterable[str] = ()) -> str:
    """What the registry knows about a report key that an audit lacks: why it may be missing (``""``: nothing).

    ``present`` are the keys the audit has: a need they show met (the metric recorded for another method, or
    per-group keys) is not mentioned.

    Example:
        >>> missing_key_hint("gradcam/spurious_mass")
        'spurious_mass needs spurious masks on the probe (ProbeSet(spurious_masks=...), from_dataset(spurious_mask_fn=...) or, with probe=None, SaliencyMonitor(spurious_mask_key=...))'
        >>> missing_key_hint("gradcam/spurius_mass")
        "no metric is named 'spurius_mass' (did you mean 'spurious_mass'?)"
    """
    parts = str(key).split("/", 2)
    if len(parts) < 2:
        return ""
    if parts[0] == "discovery":  # lightning_saliency.discovery_audit: not a metric row, the monitor's discover=
        if key not in DISCOVERY_KEYS:
            close = difflib.get_close_matches(str(key), DISCOVERY_KEYS, n=1)
            return (f"no discovery key is named {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                    + f"; discovery reports {', '.join(DISCOVERY_KEYS)}")
        return ("discovery/ keys are written when SaliencyMonitor(discover=True) (the default) audits: this run's "
                "monitor had discover=False, or its discovery failed (see the audit's errors)")
    found = metric_of_key(key)
    if found is None:
        close = difflib.get_close_matches(parts[1], list(_REGISTRY), n=1, cutoff=0.6)
        return f"no metric is named {parts[1]!r} (did you mean {close[0]!r}?)" if close else ""
    spec, _, group = found
    present = [str(k).split("/", 2) for k in present]
    recorded = any(len(p) > 1 and p[1] == spec.name for p in present)  # then its needs are met
    grouped = any(len(p) == 3 and p[0] != "probe" for p in present)
    notes = []
    if group is not None and not spec.per_group:
        notes.append(f"{spec.name} is not reported per group")
    elif group is not None and not grouped:
        notes.append(f"per-group keys need {_NEED_TEXT['groups']}")
    if recorded:
        return "; ".join(notes)
    needs = [f"{spec.name} needs {_NEED_TEXT[n]}" for n in spec.needs
             if n in _NEED_TEXT and not (n == "groups" and grouped)]
    notes += needs
    if spec.periodic:
        notes.append(f"{spec.name} runs the model again: it is computed every expensive_every_n_audits audits and "
                     "at the last audit")
    if not spec.default:
        notes.append(f"{spec.name} is not in the default set: add it to SaliencyMonitor(metrics=...)")
    elif not needs:
        notes.append(f"{spec.name} was not computed: is it in SaliencyMonitor(metrics=...)?")
    return "; ".join(notes)


def _builtin_name_error(name: str) -> None:
    if name in _REGISTRY and _REGISTRY[name].builtin:
        raise ValueError(f"metric {name!r} is built in; register yours under another name")


def register_metric(name: str, fn: Callable[[Tensor, Any], Tensor], *, higher_is_better: bool | None,
                    per_group: bool = True, periodic: bool = False) -> MetricSpec:
    """Add a metric that the audit computes for every method like a built-in.

    Args:
        name: the ``<metric>`` of ``<method>/<metric>`` keys (no ``/``); a built-in name is a ``ValueError``;
            registering a name again replaces your earlier row.
        fn: ``fn(maps, probe) -> [N]``: ``maps`` are one method's maps ``[N, H, W]`` min-max normalised per
            image (``|M|`` first for signed methods), ``probe`` the aligned :class:`~lightning_saliency.ProbeSet`
            rows (one rank's shard under DDP).
        higher_is_better: ``True``, ``False`` or ``None`` (watch); sets :class:`ShortcutAlarm`'s default mode.
        per_group: also report ``<method>/<name>/<group>`` when the probe has groups.
        periodic: ``fn`` is costly: compute it every ``expensive_every_n_audits`` audits (and at the last) only.

    The audit reports ``<method>/<name>``, the mean over the images with a finite value. Name the metric in
    ``SaliencyMonitor(metrics=...)`` or ``AuditSpec(metrics=...)`` to compute it.

    Example:
        >>> spec = register_metric("peak_share", lambda maps, probe: (maps > 0.5).float().mean((1, 2)),
        ...                        higher_is_better=False)
        >>> get_metric("peak_share").per_group, alarm_mode("gradcam/peak_share")
        (True, 'max')
        >>> unregister_metric("peak_share")
    """
    name = str(name)
    if not name or "/" in name:
        raise ValueError(f"metric name {name!r} must be non-empty and without '/'")
    _builtin_name_error(name)
    if not callable(fn):
        raise TypeError(f"register_metric: fn must be callable fn(maps, probe) -> [N], got {type(fn).__name__}")
    if higher_is_better not in (True, False, None):
        raise ValueError(f"higher_is_better must be True, False or None (watch), got {higher_is_better!r}")

    def compute(ctx: AuditContext, methods: tuple[str, ...]) -> dict[str, Tensor]:
        from ..maps import normalize

        out = {}
        for m in methods:
            values = fn(normalize(ctx.magnitude(m)), ctx.probe)
            n = len(ctx.probe)
            if not hasattr(values, "shape") or tuple(values.shape) != (n,):
                raise ValueError(f"registered metric {name!r} returned {getattr(values, 'shape', type(values))} "
                                 f"for {n} images; fn(maps, probe) must return a tensor [N] of per-image values")
            out[m] = values
        return out

    doc = (getattr(fn, "__doc__", None) or f"registered metric {name}").strip().splitlines()[0]
    spec = MetricSpec(name, higher_is_better, doc,
                      per_group=bool(per_group), periodic=bool(periodic), compute=compute, builtin=False)
    _REGISTRY[name] = spec
    return spec


def unregister_metric(name: str) -> None:
    """Remove a metric added with :func:`register_metric` (a built-in is a ``ValueError``).

    Example:
        >>> unregister_metric("never_registered")
    """
    _builtin_name_error(str(name))
    _REGISTRY.pop(str(name), None)


def metric_table(rows: tuple[MetricSpec, ...] | None = None) -> str:
    """The rows as an RST table: name, which way is better, what is logged (and when it is periodic).

    Example:
        >>> print(metric_table(specs()[:1]))  # doctest: +NORMALIZE_WHITESPACE
        ============= ====== ========================================================
        name          better what is logged
        ============= ====== ========================================================
        spurious_mass low    mean relevance mass inside the spurious masks, per group
        ============= ====== ========================================================
    """
    rows = specs() if rows is None else rows
    better = {True: "high", False: "low", None: "watch"}
    lines = [(s.name, better[s.higher_is_better], s.doc + (" (periodic)" if s.periodic else "")) for s in rows]
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(("name", "better", "what is logged"))]
    rule = " ".join("=" * w for w in widths)
    fmt = " ".join(f"{{:<{w}}}" for w in widths)
    body = [fmt.format(*r).rstrip() for r in lines]
    return "\n".join([rule, fmt.format("name", "better", "what is logged").rstrip(), rule, *body, rule])


__doc__ = (__doc__ or "").replace("{table}", metric_table(_BUILTIN))
