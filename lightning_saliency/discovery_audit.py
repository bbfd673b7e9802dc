"""Discovery in the audit: find the shortcut nobody annotated, at every audit, and confirm it by intervention.

:class:`~lightning_saliency.SaliencyMonitor` (``discover=True``, the default) calls :class:`DiscoveryAudit` on
rank 0 after the shards are merged, so that under DDP the maps of the whole probe are clustered and the report
equals a single-process one. :func:`run_discovery` is the orchestration, over the pure functions:

1. one method's merged maps (``discover_method``; default :func:`default_method`: the first CAM-family method
   configured, else the first), of the images whose map and logits are healthy (:mod:`lightning_saliency.health`;
   a method that is unhealthy as a whole is skipped, and the section says why);
2. :func:`lightning_saliency.metrics.discover` with the class each map explains (the audit's targets: the
   model's predictions, or the probe's labels with ``target="label"``);
3. :func:`lightning_saliency.metrics.confirm` of each candidate on the whole probe (its inputs moved to the
   model's device and floating dtype once, and reused while the model stays there), with the probe's labels,
   at every audit. It reuses the audit's own logits (``ShardResult.logits``, merged from the shards), so its
   only forward is one batch holding the pastes onto at most 16 other-class images (``max_recipients``), both
   nulls and at most 16 erased members: on the find_shortcut example discovery and confirmation together cost
   0.35-0.37x the maps on one thread, 0.40-0.45x on two (``benchmarks/bench_metrics.py --only discovery``, the
   monitor's own code path).

The model is the audited one seen through the audit's ``output=`` and ``task=``
(:class:`~lightning_saliency.tasks.TaskModel`): the class scores the maps explain.

The record's ``discovery`` section (JSON-safe: the masks are dropped, their bounding box ``region`` stays; the
masks themselves go into the audit's maps file as ``"discovery_masks"``, row ``k`` for candidate ``k``)::

    "discovery": {"method": "gradcam", "too_small": [2], "skipped": null, "n_clusters": {"0": 2, "1": 1},
                  "image_size": [32, 32], "untested": 0,
                  "candidates": [{"class": 0, "members": [3, 5, 9], "region": [0, 24, 8, 32],
                                  "flip_rate": 0.6, "null_flip_rate": 0.05, "rest_flip_rate": 0.0,
                                  "logit_gain": 3.1, "erase_accuracy_drop": 0.4, "score": 0.4,
                                  "confirmed": true, ...}]}

and two metrics, which a :class:`~lightning_saliency.ShortcutAlarm` and ``lightning-saliency gate`` read like any
other key: ``discovery/suspects`` (the confirmed candidates; mode max: ``threshold=0`` fires on the first) and
``discovery/max_flip_rate`` (the largest flip rate of any candidate; ``null`` when there is none). A candidate that
does not flip the other classes is recorded, never counted: a map can point at a region the model does not
depend on (Adebayo et al. 2022).

Options (``discover_options``): the keyword arguments of :func:`~lightning_saliency.metrics.discover` and of
:func:`~lightning_saliency.metrics.confirm` (e.g. ``{"min_class_size": 8, "min_flip": 0.2}``), and
``max_tested`` (default 8; ``None``: all): the most candidates tested per audit, the best scored first, one
batched forward each; the others are recorded untested (null rates, a ``reason``, never counted as suspects).
An unknown option fails when the monitor is built. ``seed`` defaults to the monitor's.

Example:
    >>> DiscoveryAudit(True, None, None, ("gradient", "gradcam")).method
    'gradcam'
    >>> DiscoveryAudit(False, None, None, ("gradcam",)).enabled
    False
"""

from __future__ import annotations

import difflib
import inspect
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .health import describe, healthy_images, problems
from .methods.registry import get_method
from .metrics.causal import confirm
from .metrics.discovery import discover
from .metrics.registry import DISCOVERY_KEYS
from .report import error_record

__all__ = ["DiscoveryAudit", "default_method", "run_discovery"]

_CAM_RIDES = ("cam", "head")  # the method registry's CAM family (Grad-CAM and friends, CAM)


def _keywords(fn: Any) -> tuple[str, ...]:
    return tuple(p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY
                 and p.name not in ("indices", "logits", "batch_size"))


_DISCOVER_OPTIONS, _CONFIRM_OPTIONS = _keywords(discover), _keywords(confirm)
#: candidates tested per audit by default (the best scored; :func:`run_discovery`'s ``max_tested``)
DEFAULT_MAX_TESTED = 8
_RATES = ("flip_rate", "null_flip_rate", "rest_flip_rate", "logit_gain", "null_logit_gain", "rest_logit_gain",
          "erase_accuracy_drop")


def default_method(methods: Sequence[str]) -> str:
    """The method discovery clusters by default: the first CAM-family method of ``methods``, else the first.

    CAM-family maps are coarse and spatially coherent, which is what clustering per region needs. Measured on the
    find_shortcut example (the watermark on half of the squares, the model after one epoch, seeds 0-2): clustering
    the Grad-CAM maps gives a candidate of exactly the 16 watermarked probe squares in every seed, clustering the
    gradient maps of the same model gives no candidate in any (the 4x4 watermark holds 0.06-0.10 of a
    watermarked square's Grad-CAM mass against 0.00 on the other squares; of its gradient mass 0.03-0.06
    against 0.01-0.02).

    Example:
        >>> default_method(("gradient", "gradcam++")), default_method(("gradient",))
        ('gradcam++', 'gradient')
    """
    return next((m for m in methods if get_method(m).rides in _CAM_RIDES), methods[0])


def _split_options(options: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any], int | None]:
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"discover_options must be a dict of option -> value, got {type(options).__name__}")
    options = dict(options or {})
    tested = options.pop("max_tested", DEFAULT_MAX_TESTED)
    if tested is not None and (isinstance(tested, bool) or not isinstance(tested, int) or tested < 1):
        raise ValueError(f"discover_options: max_tested must be an int >= 1 (candidates tested per audit, the best "
                         f"scored) or None (every one), got {tested!r}; discover=False turns discovery off")
    known = sorted({*_DISCOVER_OPTIONS, *_CONFIRM_OPTIONS, "max_tested"})
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            raise ValueError(f"discover_options: unknown option {key!r}" + (f" (did you mean {close[0]!r}?)"
                             if close else "") + f"; the options are: {', '.join(known)}")
    return ({k: v for k, v in options.items() if k in _DISCOVER_OPTIONS},
            {k: v for k, v in options.items() if k in _CONFIRM_OPTIONS}, tested)


def _json(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_discovery(model: nn.Module, probe: Any, result: Any, method: str, options: Mapping[str, Any] | None = None,
                  *, target: str = "prediction", inputs: torch.Tensor | None = None,
                  batch_size: int | None = None) -> tuple[dict[str, Any], dict[str, float]]:
    """Discovery and confirmation on one audit: ``(record section, metrics)`` (module docstring).

    The section also holds ``"masks"``: the candidates' regions, ``[K, H, W]`` bool in candidate order (the
    recorder writes them into the maps file and leaves them out of the JSON record).

    Args:
        model: the audited model (forward passes only, under the side-effect guard), returning class scores.
        probe: the whole probe (a :class:`~lightning_saliency.ProbeSet`).
        result: the audit's merged :class:`~lightning_saliency.audit.ShardResult` (maps of the whole probe; its
            ``logits``, when known, spare the confirmation a forward of the probe).
        method: the method whose maps are clustered.
        options: keyword options of ``discover`` and ``confirm``, and ``max_tested`` (default 8): the candidates
            tested per audit, the best scored; the others are recorded with null rates and a ``reason``
            (``None``: every one), which bounds the audit's cost on a probe of many classes.
        target: the audit's ``target``: the maps explain the ``"prediction"`` or the ``"label"``.
        inputs: the probe's inputs on the model's device and dtype (default: moved here).
        batch_size: chunk size of the confirmation's forward passes.

    Example:
        >>> from lightning_saliency.audit import ShardResult
        >>> from lightning_saliency.probe import ProbeSet
        >>> model = torch.nn.Flatten()  # 16 logits (no random weights: the global generator is left alone)
        >>> probe = ProbeSet(torch.linspace(0, 1, 64).reshape(4, 1, 4, 4), torch.tensor([0, 1, 0, 1]))
        >>> maps = torch.linspace(0, 1, 64).reshape(4, 4, 4)
        >>> result = ShardResult(torch.arange(4), torch.tensor([0, 1, 0, 1]), {"gradient": maps})
        >>> section, metrics = run_discovery(model, probe, result, "gradient")
        >>> section["too_small"], section["candidates"], tuple(section["masks"].shape), metrics
        ([0, 1], [], (0, 4, 4), {'discovery/suspects': 0.0, 'discovery/max_flip_rate': nan})
    """
    discover_opts, confirm_opts, limit = _split_options(options)
    size = [int(v) for v in probe.inputs.shape[-2:]]
    section: dict[str, Any] = {"method": method, "too_small": [], "candidates": [], "skipped": None,
                               "image_size": size, "masks": torch.zeros(0, *size, dtype=torch.bool)}
    metrics = {"discovery/suspects": math.nan, "discovery/max_flip_rate": math.nan}
    if method not in result.maps:
        section["skipped"] = f"the audit has no {method} maps (the method failed: see the audit's errors)"
        return section, metrics
    health = describe(result)
    bad = [p for p in problems(health) if p.split(":", 1)[0] in (method, "logits")]
    if bad:
        section["skipped"] = f"unhealthy maps or logits, nothing to cluster: {'; '.join(bad)}"
        return section, metrics
    ok = healthy_images(result, method)
    where = ok.nonzero()[:, 0]
    labels = probe.targets.cpu().long()
    explained = labels if target == "label" else result.predictions.cpu().long()
    with torch.inference_mode():  # (no tensor made here is kept: the masks are stacked below, outside)
        found = discover(result.maps[method][where], explained[where], indices=where, **discover_opts)
    section["too_small"] = list(found["too_small"])
    section["n_clusters"] = {str(c): int(q) for c, q in found["n_clusters"].items()}  # per clustered class
    if inputs is None:
        param = next(model.parameters(), None)
        inputs = probe.inputs.to(param.device if param is not None else "cpu")
        if param is not None and param.is_floating_point() and inputs.is_floating_point():
            inputs = inputs.to(param.dtype)
    logits = getattr(result, "logits", None)
    if found["candidates"] and (logits is None or logits.shape[0] != len(labels)):
        from .metrics._common import _evaluating, _forward

        with _evaluating(model):  # one forward of the probe shared by every candidate's confirmation
            logits = _forward(model, inputs, batch_size)
    best, rest = (found["candidates"], []) if limit is None else (found["candidates"][:limit],
                                                                   found["candidates"][limit:])
    with torch.inference_mode():
        tested = [confirm(model, inputs, labels.to(inputs.device), c, logits=logits, batch_size=batch_size,
                          **confirm_opts) for c in best]
    untested = [{**c, **dict.fromkeys(_RATES, math.nan), "recipients": 0, "confirmed": False,
                 "reason": f"not tested: only the {limit} best-scored candidates are tested per audit "
                           f"(discover_options={{'max_tested': ...}})"} for c in rest]
    section["candidates"] = [{k: _json(v) for k, v in c.items() if k != "mask"} for c in tested + untested]
    section["untested"] = len(untested)
    if tested or untested:
        section["masks"] = torch.stack([torch.as_tensor(c["mask"]).bool().cpu() for c in tested + untested])
    flips = [c["flip_rate"] for c in tested if math.isfinite(c["flip_rate"])]
    metrics = {"discovery/suspects": float(sum(c["confirmed"] for c in tested)),
               "discovery/max_flip_rate": max(flips) if flips else math.nan}
    return section, metrics


class DiscoveryAudit:
    """The monitor's discovery step: its settings, checked at construction, and one call per audit.

    Args:
        enabled: ``SaliencyMonitor(discover=...)``.
        method: the method to cluster (``None``: :func:`default_method` of ``methods``); must be one of ``methods``.
        options: keyword options of ``discover`` and ``confirm`` (module docstring).
        methods: the monitor's methods.
        seed: the default ``seed`` of both.

    Example:
        >>> DiscoveryAudit(True, "gradcam", {"min_flp": 0.2}, ("gradcam",))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: discover_options: unknown option 'min_flp' (did you mean 'min_flip'?); the options are: ...
    """

    def __init__(self, enabled: bool, method: str | None, options: Mapping[str, Any] | None,
                 methods: Sequence[str], seed: int = 0) -> None:
        self.enabled = bool(enabled)
        if method is not None and method not in methods:
            close = difflib.get_close_matches(str(method), list(methods), n=1)
            raise ValueError(f"discover_method={method!r} is not among the monitor's methods ({', '.join(methods)})"
                             + (f"; did you mean {close[0]!r}?" if close else "; add it to methods=..."))
        self.method = method if method is not None else default_method(methods)
        _split_options(options)  # an unknown option fails now, not at the first audit
        self.options = {"seed": int(seed), **dict(options or {})}
        self._inputs: tuple[Any, torch.Tensor] | None = None  # the probe on the model's device and dtype

    def _moved(self, model: nn.Module, probe: Any) -> torch.Tensor:
        param = next(model.parameters(), None)
        where = (param.device, param.dtype) if param is not None else (torch.device("cpu"), None)
        if self._inputs is None or self._inputs[0] != (where, id(probe)):
            x = probe.inputs.to(where[0])
            if where[1] is not None and where[1].is_floating_point and x.is_floating_point():
                x = x.to(where[1])
            self._inputs = ((where, id(probe)), x)  # moved once, reused audit after audit
        return self._inputs[1]

    def __call__(self, model: nn.Module, probe: Any, result: Any, spec: Any, metrics: dict[str, float],
                 on_error: str = "warn") -> dict[str, Any] | None:
        """Run discovery and confirmation on a merged audit (rank 0), at every audit: add its keys to
        ``metrics``, return the record's section with its ``masks`` (``None`` when disabled). ``model`` is seen
        through ``spec``'s ``output`` and ``task``. A failure is recorded in ``result.errors`` and warned about
        (never raised unless ``on_error="raise"``); its metrics are then ``null``."""
        if not self.enabled or not result.maps:
            return None
        from .guard import SideEffectGuard
        from .tasks import TaskModel

        try:
            scores = TaskModel(model, getattr(spec, "output", None), getattr(spec, "task", None))
            with SideEffectGuard(scores, enable_grad=False):  # forward passes only (confirm's nest in it)
                section, found = run_discovery(scores, probe, result, self.method, self.options, target=spec.target,
                                               inputs=self._moved(model, probe), batch_size=spec.batch_size)
        except Exception as e:
            if on_error == "raise":
                raise
            result.errors.append(error_record(e, method=self.method))
            if on_error == "warn":
                warnings.warn(f"lightning-saliency: discovery failed ({type(e).__name__}: {e}); recorded in the "
                              "report, training goes on", RuntimeWarning, stacklevel=3)
            section = {"method": self.method, "too_small": [], "candidates": [],
                       "skipped": f"discovery failed: {type(e).__name__}: {e}"}
            found = {k: math.nan for k in DISCOVERY_KEYS}
        metrics.update(found)
        return section
