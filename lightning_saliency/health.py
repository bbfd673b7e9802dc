"""The health of an audit: are its logits and maps things a metric can be computed from?

A model whose weights turned NaN, or whose maps are all zero, still yields plausible-looking numbers: an all-zero
map scores the region's area fraction as its mass (chance level) and two constant maps correlate perfectly
(stability 1.0). So every audit checks, per image, what its numbers stand on (DESIGN §5, invariant 9):

* **non-finite logits**: some logit of the image is NaN or ±inf (the shared forward's
  :attr:`~lightning_saliency.methods.engine.AttributionInfo.finite`); its prediction is meaningless, and so are
  its maps, for every method;
* **non-finite maps**: some pixel of a method's map is NaN or ±inf;
* **constant maps**: a method's map (``|M|`` for a signed method) has ``max - min <= 1e-12``, what min-max
  normalisation turns all zero (all-zero maps included): it ranks no pixel.

What follows (:mod:`lightning_saliency.audit` applies it): every per-image metric value of such an image is NaN,
so it is ``null`` in the report and left out of the means; the probe-level rows (``attention_disparity``,
``group_divergence``) use the other images only, and are ``null`` when a group keeps no image; ``drift``
against a constant or non-finite previous map is ``null``; a method none of whose images is usable has ``null``
for every metric; ``probe/accuracy`` (and its per-class and per-group values) is ``null`` when any logit is not
finite. Never chance level, never 1.0.

The audit record's ``health`` (written by the monitor, read by the gate, the page and ``show``): one entry for
the logits and one per method that produced maps, each ``"ok"`` or its problems with counts, joined by ``"; "``::

    "health": {"logits": "non-finite logits: 64 of 64",
               "gradcam": "non-finite maps: 64 of 64", "gradient": "ok"}

Unhealthy (:func:`problems`; the gate exits 1, ``lightning-saliency gate --allow-unhealthy`` turns that off): any
non-finite logits or maps; constant maps of more than half of a method's images. Fewer constant maps are
tolerated, because a randomly initialised CNN legitimately zeroes a few Grad-CAM maps under its ReLUs: their
metrics are ``null`` all the same and the count stays in ``health``. Each problem is also an entry of the
audit's ``errors`` (:func:`health_errors`).

This module does not import torch at import time: the ``lightning-saliency`` command reads health records.

Example:
    >>> health = {"logits": "ok", "gradcam": "constant maps: 64 of 64", "gradient": "constant maps: 2 of 64"}
    >>> problems(health)
    ['gradcam: constant maps: 64 of 64']
    >>> health_line(health)
    'UNHEALTHY: gradcam: constant maps: 64 of 64 (also: gradient: constant maps: 2 of 64)'
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: importing this module must not import torch
    from torch import Tensor

__all__ = [
    "CONSTANT",
    "NONFINITE",
    "OK",
    "describe",
    "flag_maps",
    "health_errors",
    "health_line",
    "healthy_images",
    "mask_degenerate",
    "notes",
    "problems",
    "stale_previous",
]

OK, NONFINITE, CONSTANT = 0, 1, 2  # per-image codes of ShardResult.degenerate[method]
EPS = 1e-12  # the span below which lightning_saliency.maps.normalize makes a map all zero
LOGITS = "logits"  # the health entry of the model's outputs
_PART = re.compile(r"^(?P<what>[^:]+): (?P<k>\d+) of (?P<n>\d+)$")
_HINTS = {
    "non-finite logits": "the model outputs NaN or inf, e.g. its weights diverged: every metric and probe/accuracy "
                         "are null",
    "non-finite maps": "NaN or inf in the maps: their metrics are null",
    "constant maps": "constant or all-zero maps rank no pixel: their metrics are null (an untrained or dead "
                     "network, or a target layer whose output is all zero?)",
}


# -- detection (per shard, on tensors) --------------------------------------------------------------------------
def flag_maps(maps: Mapping[str, Tensor], signed: Collection[str] = ()) -> dict[str, Tensor]:
    """Per method, an int8 code per image on the CPU: :data:`OK`, :data:`NONFINITE` or :data:`CONSTANT`.

    Example:
        >>> import torch
        >>> maps = torch.stack([torch.rand(4, 4), torch.zeros(4, 4), torch.full((4, 4), math.nan)])
        >>> flag_maps({"gradient": maps})["gradient"].tolist()
        [0, 2, 1]
    """
    import torch

    out = {}
    for method, m in maps.items():
        flat = m.detach().reshape(m.shape[0], -1).float()
        nonfinite = ~torch.isfinite(flat).all(dim=1)
        mag = flat.abs() if method in signed else flat
        span = mag.amax(dim=1) - mag.amin(dim=1) if flat.shape[1] else torch.zeros(len(flat), device=flat.device)
        code = torch.where(nonfinite, NONFINITE, torch.where(span > EPS, OK, CONSTANT))
        out[method] = code.to(torch.int8).cpu()
    return out


def stale_previous(previous_ranks: Mapping[str, Tensor] | None, previous_maps: Mapping[str, Tensor] | None,
                   signed: Collection[str] = ()) -> dict[str, Tensor]:
    """Per method, the images whose previous map (what ``drift`` compares with) was constant or non-finite.

    Example:
        >>> import torch
        >>> stale_previous({"gradient": torch.tensor([[1.0, 2.0], [1.5, 1.5]])}, None)["gradient"].tolist()
        [False, True]
    """
    if previous_ranks:  # ranks of a constant map (NaN is ranked as 0) are all equal
        return {m: (r.amax(dim=1) - r.amin(dim=1) <= 0).cpu() for m, r in previous_ranks.items() if r.ndim == 2}
    return {m: code != OK for m, code in flag_maps(previous_maps or {}, signed).items()}


def mask_degenerate(per_image: dict[str, Tensor], degenerate: Mapping[str, Tensor], finite_logits: Tensor,
                    stale: Mapping[str, Tensor] | None = None) -> None:
    """Set to NaN, in place, every ``<method>/...`` value of an image whose map is degenerate or whose logits are
    not finite, and the ``<method>/drift`` values of images whose previous map was degenerate (``stale``).

    Example:
        >>> import torch
        >>> values = {"gradient/stability": torch.tensor([0.5, 1.0, 0.7])}
        >>> mask_degenerate(values, {"gradient": torch.tensor([0, 2, 0])}, torch.tensor([True, True, False]))
        >>> values["gradient/stability"].tolist()
        [0.5, nan, nan]
    """
    for key, values in per_image.items():
        method = key.split("/", 1)[0]
        bad = ~finite_logits.to(values.device).bool()
        if method in degenerate:
            bad = bad | (degenerate[method].to(values.device) != OK)
        if stale and method in stale and key == f"{method}/drift" and len(stale[method]) == len(bad):
            bad = bad | stale[method].to(values.device)
        values[bad] = math.nan


def healthy_images(result: Any, method: str) -> Tensor:
    """``[n]`` bool: the images of a (merged) :class:`~lightning_saliency.audit.ShardResult` whose ``method`` map
    and logits are usable."""
    import torch

    n = len(result.predictions)
    ok = torch.ones(n, dtype=torch.bool) if result.finite_logits is None else result.finite_logits.bool().cpu()
    if method in result.degenerate:
        ok = ok & (result.degenerate[method].cpu() == OK)
    return ok


def describe(result: Any) -> dict[str, str]:
    """The ``health`` entry of a (merged) result: ``{"logits": ..., <method>: ...}``, each ``"ok"`` or problems.

    Example:
        >>> import torch
        >>> from lightning_saliency.audit import ShardResult
        >>> r = ShardResult(torch.arange(4), torch.zeros(4, dtype=torch.long),
        ...                 finite_logits=torch.tensor([True, True, True, False]),
        ...                 degenerate={"gradcam": torch.tensor([2, 2, 0, 1], dtype=torch.int8)})
        >>> describe(r)
        {'logits': 'non-finite logits: 1 of 4', 'gradcam': 'non-finite maps: 1 of 4; constant maps: 2 of 4'}
    """
    out: dict[str, str] = {}
    n = len(result.predictions)
    if result.finite_logits is not None:
        bad = int((~result.finite_logits.bool()).sum())
        out[LOGITS] = f"non-finite logits: {bad} of {n}" if bad else "ok"
    for method, code in result.degenerate.items():
        parts = [f"{what}: {int((code == c).sum())} of {n}" for what, c in
                 (("non-finite maps", NONFINITE), ("constant maps", CONSTANT)) if bool((code == c).any())]
        out[method] = "; ".join(parts) or "ok"
    return out


# -- reading (torch-free: the gate, the page and `show`) --------------------------------------------------------
def _entries(health: Any) -> list[tuple[str, str, bool]]:
    """``(name, problem, unhealthy)`` for every part of ``health`` that is not ``"ok"``."""
    if not isinstance(health, Mapping):
        return []
    out = []
    for name, text in health.items():
        for part in (text.split("; ") if isinstance(text, str) else [f"unreadable health entry {text!r}"]):
            if part.strip() == "ok":
                continue
            found = _PART.match(part)
            minority = found is not None and found["what"] == "constant maps" and 2 * int(found["k"]) <= int(found["n"])
            out.append((str(name), part, not minority))
    return out


def _label(name: str, part: str) -> str:
    return part if name == LOGITS else f"{name}: {part}"


def problems(health: Any) -> list[str]:
    """The problems that make an audit unhealthy (empty: healthy, or no ``health`` recorded, as in old reports).

    Example:
        >>> problems({"logits": "non-finite logits: 64 of 64", "gradcam": "ok"})
        ['non-finite logits: 64 of 64']
    """
    return [_label(name, part) for name, part, bad in _entries(health) if bad]


def notes(health: Any) -> list[str]:
    """The tolerated findings (a minority of constant maps): recorded, not failing.

    Example:
        >>> notes({"gradcam": "constant maps: 3 of 64"})
        ['gradcam: constant maps: 3 of 64']
    """
    return [_label(name, part) for name, part, bad in _entries(health) if not bad]


def health_line(health: Any) -> str:
    """One line for a terminal or a dashboard: ``"ok"``, ``"ok (...)"`` or ``"UNHEALTHY: ..."``.

    Example:
        >>> health_line({"logits": "ok", "gradcam": "ok"}), health_line(None)
        ('ok', 'not recorded')
    """
    if not isinstance(health, Mapping) or not health:
        return "not recorded"
    bad, minor = problems(health), notes(health)
    also = f" (also: {'; '.join(minor)})" if minor else ""
    if bad:
        return f"UNHEALTHY: {'; '.join(bad)}{also}"
    return f"ok ({'; '.join(minor)}: their metrics are null)" if minor else "ok"


def health_errors(health: Any) -> list[dict[str, Any]]:
    """One :func:`~lightning_saliency.report.error_record`-shaped entry per problem of :func:`problems`.

    Example:
        >>> health_errors({"gradcam": "constant maps: 64 of 64"})[0]["method"]
        'gradcam'
    """
    out = []
    for name, part, bad in _entries(health):
        if bad:
            found = _PART.match(part)
            hint = _HINTS.get(found["what"] if found else "", "")
            out.append({"method": None if name == LOGITS else name, "type": "UnhealthyAudit",
                        "message": part + (f" ({hint})" if hint else "")})
    return out
