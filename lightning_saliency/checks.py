"""Setup checks: whether an audit's configuration can give what it is asked for, decided before training.

:class:`~lightning_saliency.SaliencyMonitor` and :class:`~lightning_saliency.ShortcutAlarm` call these at
construction and setup, so that a configuration that cannot work fails before the first training step with the
fix in the message, instead of warning at every audit or staying silent:

- :func:`check_method_options`: every ``method_options`` key is an option of some method (else the closest
  option and the method it belongs to); the options the audit sets itself are refused.
- :func:`key_problem`: why an audit of these methods and metrics on this probe never reports a key (an alarm's
  ``metric``): an unknown metric or method, a method or metric not configured, a need (masks, groups, a signed
  method) the probe or the method does not meet, a group or class the probe does not have.
- the ``discovery/...`` keys (:data:`~lightning_saliency.metrics.registry.DISCOVERY_KEYS`) are reported when the monitor
  has ``discover=True``: :func:`key_problem` takes the flag.
- :func:`check_alarm`: :func:`key_problem` as a ``ValueError`` that says the fix and lists the keys the
  configuration does report.

What a metric needs is read from the metric registry (``MetricSpec.needs``,
:func:`~lightning_saliency.metrics.registry.unmet_needs`), option names and owners from the method registry:
no method, metric or option of theirs is named here.

Example:
    >>> import torch
    >>> from lightning_saliency.probe import ProbeSet
    >>> probe = ProbeSet(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))
    >>> key_problem("gradcam/stability", ("gradcam",), ("stability",), probe) is None
    True
    >>> print(key_problem("gradcam/spurious_mass", ("gradcam",), ("spurious_mass",), probe))
    spurious_mass needs spurious masks on the probe (ProbeSet(spurious_masks=...), from_dataset(spurious_mask_fn=...) or, with probe=None, SaliencyMonitor(spurious_mask_key=...)), and the probe has none
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from .metrics import registry as metric_registry  # torch-free: the gate reads report_probe_problem from here
from .metrics.registry import DISCOVERY_KEYS

__all__ = ["AUDIT_SETS", "check_alarm", "check_method_options", "key_problem", "report_probe_problem", "reported_keys"]

#: engine options of :func:`~lightning_saliency.attribute` that the audit passes itself at every call
AUDIT_SETS = {"on_error": "SaliencyMonitor(on_error=...)", "return_info": "nothing: the audit always asks for it"}


def _methods() -> Any:
    """The method registry, imported on use: importing this module (the gate does) does not import torch."""
    from .methods import registry

    return registry


def check_method_options(options: Mapping[str, Any] | None, methods: Sequence[str]) -> dict[str, Any]:
    """``options`` as a dict, once every key is known to the method registry.

    An unknown key is a ``ValueError`` naming the closest option and its method; ``on_error`` and
    ``return_info`` (:data:`AUDIT_SETS`) are refused. An option of a method not in ``methods`` is accepted:
    a metric may run that method itself with the audit's options (the agreement metrics run ``shapley``), and a
    config file's options may outlive a method dropped on the command line; it changes nothing otherwise.

    Example:
        >>> check_method_options({"ig_steps": 8}, ("integrated_gradients",))
        {'ig_steps': 8}
        >>> check_method_options({"ig_step": 8}, ("integrated_gradients",))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: method_options: unknown option 'ig_step' (did you mean 'ig_steps', an option of integrated_gradients?); the options are: ...
    """
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"method_options must be a dict of option -> value, got {type(options).__name__}")
    options = dict(options or {})
    known = list(_methods().all_options())
    for key in options:
        if not isinstance(key, str) or _methods().option_owner(key) is None:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}, an option of {_methods().option_owner(close[0])}?)" \
                if close else ""
            raise ValueError(f"method_options: unknown option {key!r}{hint}; the options are: {', '.join(known)}")
        if key in AUDIT_SETS:
            raise ValueError(f"method_options: {key!r} is set by the audit itself; use {AUDIT_SETS[key]}")
    return options


def _have(probe: Any) -> set[str]:
    """The needs (:data:`~lightning_saliency.metrics.registry.NEEDS`) that ``probe`` meets."""
    return {name for name, value in (("object_masks", probe.object_masks), ("spurious_masks", probe.spurious_masks),
                                     ("groups", probe.groups)) if value is not None}


def _probe_level(spec: Any) -> bool:
    """Whether a row scores the model on the probe (keys ``probe/<name>``) rather than a method's maps."""
    return bool(getattr(spec, "probe_level", False))


def _accuracy_problem(key: str, probe: Any) -> str | None:
    parts = key.split("/", 2)
    if len(parts) == 3 and not parts[2]:
        return f"{key!r} is not a key the audit reports: probe/accuracy/class_<k> and probe/accuracy/<group> are"
    if len(parts) == 2 or probe is None or probe.targets.ndim != 1:
        return None
    names = [f"class_{k}" for k in sorted(set(probe.targets.tolist()))] + probe.group_names
    if parts[2] in names:
        return None
    close = difflib.get_close_matches(parts[2], names, n=1)
    return (f"the probe has no class or group {parts[2]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; probe/accuracy/<name> is reported for: {', '.join(names)}")


def _discovery_problem(key: str, discover: bool | None) -> str | None:
    """Why a monitor never reports a ``discovery/...`` key (:data:`DISCOVERY_KEYS`), or ``None``."""
    if key not in DISCOVERY_KEYS:
        close = difflib.get_close_matches(key, DISCOVERY_KEYS, n=1)
        return (f"{key!r} is not a discovery key" + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; discovery reports {', '.join(DISCOVERY_KEYS)}")
    if discover is False:
        return (f"{key} is reported only when the monitor discovers shortcuts, and this one has discover=False: "
                "pass SaliencyMonitor(discover=True)")
    return None


def key_problem(key: str, methods: Sequence[str], metrics: Sequence[str], probe: Any = None, *,
                discover: bool | None = None) -> str | None:
    """Why an audit of ``methods`` and ``metrics`` on ``probe`` never reports ``key`` (``None``: it may).

    With ``probe=None`` (a probe drawn at the start of fit) only the names are judged; the masks, groups and
    classes once the probe is known. ``discover``: the monitor's ``discover`` (``None``: not known), which
    decides the ``discovery/...`` keys.

    Example:
        >>> key_problem("gradcam/drift", ("gradcam",), ("drift",)) is None
        True
        >>> key_problem("gradcam/drift", ("gradient",), ("drift",))
        "the monitor does not compute 'gradcam' (its methods: gradient): add it to SaliencyMonitor(methods=...)"
    """
    key = str(key)
    parts = key.split("/", 2)
    if parts[0] == "discovery":
        return _discovery_problem(key, discover)
    if parts[:2] == ["probe", "accuracy"]:
        return _accuracy_problem(key, probe)
    if key == "probe/f1":  # multi-label probes only (lightning_saliency.labels)
        labels = getattr(probe, "labels", None)
        return None if probe is None or (labels is not None and labels.ndim == 2) else \
            "probe/f1 is reported for multi-label probes only (ProbeSet with multi-hot targets [N, C])"
    if len(parts) < 2 or not all(parts[:2]):
        return f"{key!r} is not a report key: keys are <method>/<metric> and, per group, <method>/<metric>/<group>"
    method = parts[0]
    found = metric_registry.metric_of_key(key)
    if found is None:
        close = difflib.get_close_matches(parts[1], metric_registry.metric_names(), n=1)
        return f"no metric is named {parts[1]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
    spec, _, group = found
    if (method == "probe") != _probe_level(spec):
        return f"{spec.name} scores the model on the probe: watch probe/{spec.name}" if _probe_level(spec) else \
            f"{spec.name} is reported per method, not for the probe: watch <method>/{spec.name}"
    if method not in methods and not _probe_level(spec):
        if method not in _methods().method_names():
            return f"no method is named {method!r} (the monitor's methods: {', '.join(methods)})"
        return f"the monitor does not compute {method!r} (its methods: {', '.join(methods)}): add it to " \
               "SaliencyMonitor(methods=...)"
    if spec.name not in metrics:
        return f"{spec.name} is not among the monitor's metrics ({', '.join(metrics)}): add it to " \
               "SaliencyMonitor(metrics=...)"
    if "signed" in spec.needs and not _methods().is_signed(method):
        return f"{spec.name} is computed for signed methods only ({', '.join(_methods().SIGNED_METHODS)}), " \
               f"and {method!r} is not one"
    if group is not None and not spec.per_group:
        return f"{spec.name} is not reported per group: watch {method}/{spec.name}"
    unmet = () if probe is None else metric_registry.unmet_needs(key, _have(probe))
    if unmet:
        who = {n: "per-group keys need" if n == "groups" and n not in spec.needs else f"{spec.name} needs"
               for n in unmet}
        return "; ".join(f"{who[n]} {metric_registry.need_text(n)}, and the probe has none" for n in unmet)
    read = {r: key_problem(f"{method}/{r}", methods, metrics, probe) for r in spec.reads}
    if read and all(read.values()):  # a probe-level row over other rows' values: none of them is computed
        absent = [r for r in spec.reads if r not in metrics]
        why = "; ".join(p for r, p in read.items() if r in metrics) or "none of them is among the monitor's metrics"
        return (f"{spec.name} is computed from {' or '.join(spec.reads)}: {why}"
                + (f"; add {' or '.join(absent)} to SaliencyMonitor(metrics=...)" if absent else ""))
    if probe is None:
        return None
    if group is not None and group not in probe.group_names:
        close = difflib.get_close_matches(group, probe.group_names, n=1)
        return (f"the probe has no group {group!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; its groups: {', '.join(probe.group_names)}")
    return None


def reported_keys(methods: Sequence[str], metrics: Sequence[str], probe: Any = None, *,
                  discover: bool | None = None) -> list[str]:
    """The probe-level keys (no per-group ones) an audit of ``methods`` and ``metrics`` on ``probe`` may report.

    Example:
        >>> reported_keys(("gradient",), ("drift", "deletion_auc"))
        ['gradient/drift', 'gradient/deletion_auc', 'gradient/deletion_auc_random', 'probe/accuracy']
    """
    rows = [metric_registry.get_metric(k) for k in metrics]
    keys = [f"{m}/{r.name}{suffix}" for r in rows for m in (("probe",) if _probe_level(r) else methods)
            for suffix in ("", *r.extra_keys)] + ["probe/accuracy"]
    keys += list(DISCOVERY_KEYS) if discover else []
    return [k for k in keys if key_problem(k, methods, metrics, probe, discover=discover) is None]


def check_alarm(metric: str, methods: Sequence[str], metrics: Sequence[str], probe: Any = None, *,
                discover: bool | None = None) -> None:
    """A ``ValueError`` saying why and how to fix it when an alarm on ``metric`` could never fire.

    Example:
        >>> check_alarm("gradient/drift", ("gradient",), ("drift",))
        >>> check_alarm("gradient/drfit", ("gradient",), ("drift",))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ShortcutAlarm(metric='gradient/drfit') watches a key this configuration never reports: no metric is named 'drfit' (did you mean 'drift'?). Did you mean 'gradient/drift'? Keys it reports: gradient/drift, probe/accuracy ...
    """
    problem = key_problem(metric, methods, metrics, probe, discover=discover)
    if problem is None:
        return
    keys = reported_keys(methods, metrics, probe, discover=discover)
    found = metric_registry.metric_of_key(metric)
    unmet = () if probe is None else metric_registry.unmet_needs(metric, _have(probe))
    hint = ""
    if str(metric).startswith("discovery/"):
        pass  # the problem says it
    elif found is None or str(metric).split("/", 1)[0] not in methods:  # a name problem: the closest name helps
        close = difflib.get_close_matches(str(metric), keys, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
    elif unmet:
        from .sampling import _MASK_KEYS  # the item keys a drawn probe reads its masks from

        drawn = [f"{key!r}" for need, key in _MASK_KEYS.items() if need in unmet or "masks" in unmet]
        hint = (" A probe drawn from the validation data (probe=None) takes masks from the items' "
                f"{' and '.join(drawn)} entries." if drawn else "") + " Or watch a key this configuration reports."
    groups = " (per-group keys add '/<group>')" if probe is None or probe.groups is not None else ""
    raise ValueError(f"ShortcutAlarm(metric={metric!r}) watches a key this configuration never reports: {problem}."
                     f"{hint} Keys it reports: {', '.join(keys)}{groups}")


def report_probe_problem(key: str, data: Mapping[str, Any]) -> str:
    """Why no audit of report ``data`` has ``key`` when its probe lacked the masks or groups ``key`` needs (the
    gate's message then says so instead of suggesting the closest other key), else ``""``. Torch-free.

    Example:
        >>> data = {"probe": {"object_masks": True, "spurious_masks": False, "groups": None},
        ...         "audits": [{"metrics": {"gradcam/object_mass": 0.5}}]}
        >>> print(report_probe_problem("gradcam/spurious_mass", data))  # doctest: +ELLIPSIS
        metric 'gradcam/spurious_mass' is in no audit of this report: spurious_mass needs spurious masks ..., and this report's probe had none; available keys: gradcam/object_mass
    """
    probe, audits = data.get("probe"), data.get("audits") or []
    found = metric_registry.metric_of_key(key)
    if not isinstance(probe, dict) or not audits or found is None or any(key in a["metrics"] for a in audits):
        return ""
    known = [n for n in ("object_masks", "spurious_masks", "groups") if n in probe]  # older reports: judge less
    unmet = [n for n in metric_registry.unmet_needs(key, {n for n in known if probe[n]})
             if n in known or (n == "masks" and len(known) >= 2)]
    who = {n: "per-group keys need" if n == "groups" and n not in found[0].needs else f"{found[0].name} needs"
           for n in unmet}
    why = "; ".join(f"{who[n]} {metric_registry.need_text(n)}, and this report's probe had none" for n in unmet)
    shown = ", ".join(sorted(audits[-1]["metrics"])[:60]) or "none"
    return f"metric {key!r} is in no audit of this report: {why}; available keys: {shown}" if why else ""
