"""lightning-saliency: audit what a vision model looks at while it trains.

The public API (DESIGN §3): :func:`attribute` computes saliency maps, :class:`ProbeSet` is the fixed set of
images an audit explains, :class:`SaliencyMonitor` and :class:`ShortcutAlarm` are the Lightning callbacks, and
:mod:`lightning_saliency.metrics` scores maps; :func:`register_metric` adds a metric of yours (its rows:
:class:`MetricSpec`); :func:`scorecard` compares methods on one model ("which map should I trust?").

The names are imported on first use, so that ``lightning-saliency gate`` (which only reads a JSON report) does not
pay for importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "attribute": "lightning_saliency.methods.engine",
    "METHODS": "lightning_saliency.methods.engine",
    "MethodSpec": "lightning_saliency.methods.registry",
    "method_names": "lightning_saliency.methods.registry",
    "register_method": "lightning_saliency.methods.registry",
    "unregister_method": "lightning_saliency.methods.registry",
    "MetricSpec": "lightning_saliency.metrics.registry",
    "register_metric": "lightning_saliency.metrics.registry",
    "ProbeSet": "lightning_saliency.probe",
    "SaliencyMonitor": "lightning_saliency.callbacks",
    "ShortcutAlarm": "lightning_saliency.callbacks",
    "ShortcutDetected": "lightning_saliency.callbacks",
    "scorecard": "lightning_saliency.scorecards",
    "Scorecard": "lightning_saliency.scorecards",
}

__all__ = ["METHODS", "MethodSpec", "ProbeSet", "SaliencyMonitor", "ShortcutAlarm", "ShortcutDetected", "attribute",
           "method_names", "register_method", "unregister_method"]
_LIVE = ("METHODS",)  # read at each access (methods registered later included), never cached
__all__ = ["METHODS", "MetricSpec", "ProbeSet", "SaliencyMonitor", "Scorecard", "ShortcutAlarm", "ShortcutDetected",
           "attribute", "register_metric", "scorecard"]

if TYPE_CHECKING:
    from lightning_saliency.callbacks import SaliencyMonitor, ShortcutAlarm, ShortcutDetected
    from lightning_saliency.methods.engine import METHODS, attribute
    from lightning_saliency.methods.registry import (
        MethodSpec,
        method_names,
        register_method,
        unregister_method,
    )
    from lightning_saliency.metrics.registry import MetricSpec, register_metric
    from lightning_saliency.probe import ProbeSet
    from lightning_saliency.scorecards import Scorecard, scorecard


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        if name not in _LIVE:
            globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_saliency' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
