"""lightning-saliency: audit what a vision model looks at while it trains.

The public API (DESIGN §3): :func:`attribute` computes saliency maps, :class:`ProbeSet` is the fixed set of
images an audit explains, :class:`SaliencyMonitor` and :class:`ShortcutAlarm` are the Lightning callbacks, and
:mod:`lightning_saliency.metrics` scores maps.
"""

from lightning_saliency.callbacks import SaliencyMonitor, ShortcutAlarm, ShortcutDetected
from lightning_saliency.methods.engine import METHODS, attribute
from lightning_saliency.probe import ProbeSet

__version__ = "0.1.0"

__all__ = ["METHODS", "ProbeSet", "SaliencyMonitor", "ShortcutAlarm", "ShortcutDetected", "attribute"]
