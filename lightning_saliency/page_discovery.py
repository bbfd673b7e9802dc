"""The audit page's "Suspected shortcuts" section: what discovery found, and whether pasting it flips the model.

Rendered from the audits' ``discovery`` sections (:mod:`lightning_saliency.discovery_audit`): the candidates of the
latest audit that has a section, confirmed ones first (each a shortcut the model depends on: pasting its region
onto other classes' images flips them), the others marked "recorded, not raised"; per candidate its class, the
first audit where a like candidate (same class, overlapping region, same verdict) was seen, its region, the flip
rate against its nulls, the members' accuracy drop when the region is erased, and thumbnails of its members (the
probe thumbnails of ``maps/probe.npz``, when saved) with the region outlined: the region's own mask (the audit's
maps file, ``"discovery_masks"``), else its bounding box. Every string goes through
:func:`lightning_saliency.charts._e`. Never imports torch.

Example:
    >>> audit = {"epoch": 0, "metrics": {}, "discovery": {"method": "gradcam", "too_small": [], "candidates": [
    ...     {"class": 0, "members": [1, 2, 3], "region": [0, 0, 4, 4], "flip_rate": 0.6, "null_flip_rate": 0.0,
    ...      "confirmed": True}]}}
    >>> html = section_discovery([audit], ".")
    >>> "Suspected shortcuts" in html and "CONFIRMED" in html
    True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .charts import _e
from .suspects import candidate_line, class_name, first_seen

__all__ = ["DISCOVERY_CSS", "section_discovery"]

DISCOVERY_CSS = """section#suspects .suspect{border-left:4px solid #b00020;padding:4px 10px;margin:10px 0}
section#suspects .suspect.recorded{border-left-color:#999;color:var(--muted)}
section#suspects .strong{font-weight:700}
section#suspects .members img{width:64px;height:64px;image-rendering:pixelated;margin:2px}"""
_MAX_MEMBERS = 12
_MAX_CANDIDATES = 20


def _thumbs(saliency_dir: str | os.PathLike) -> np.ndarray | None:
    from .report import load_probe_thumbnails

    try:
        images = load_probe_thumbnails(saliency_dir).get("images")
    except Exception:  # noqa: BLE001 - no thumbnails (save_maps=False) or a broken file: the text stays
        return None
    ok = isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[-1] == 3 and images.dtype == np.uint8
    return images if ok else None


def _masks(saliency_dir: str | os.PathLike, audit: dict, n: int) -> np.ndarray | None:
    """The audit's ``discovery_masks`` (``[n, h, w]`` bool, one per candidate) from its maps file, or ``None``."""
    from .page import _safe_npz
    from .report import load_maps

    path = _safe_npz(Path(saliency_dir), audit.get("maps"))
    try:
        masks = load_maps(path).get("discovery_masks") if path is not None else None
    except Exception:  # noqa: BLE001 - an unreadable maps file: the boxes stay
        return None
    ok = isinstance(masks, np.ndarray) and masks.ndim == 3 and masks.dtype == bool and len(masks) == n
    return masks if ok else None


def _members_html(c: dict, thumbs: np.ndarray | None, size: Any, mask: np.ndarray | None = None) -> str:
    if thumbs is None or not isinstance(size, list) or len(size) != 2:
        return ""
    from .page import _png  # the page's PNG encoder (page.py imports this module)
    from .render import outline, outline_mask

    h, w = thumbs.shape[1:3]
    sy, sx = h / max(1, int(size[0])), w / max(1, int(size[1]))
    top, left, bottom, right = (list(c.get("region") or []) + [0, 0, 0, 0])[:4]
    box = [int(top * sy), int(left * sx), max(int(top * sy) + 1, round(bottom * sy)),
           max(int(left * sx) + 1, round(right * sx))]
    shown = [int(i) for i in (c.get("members") or []) if isinstance(i, int) and 0 <= i < len(thumbs)]
    drawn = (outline_mask(thumbs[i], mask) if mask is not None and mask.any() else outline(thumbs[i], box)
             for i in shown[:_MAX_MEMBERS])
    imgs = "".join(f'<img src="{_png(t)}" alt="probe image {i}" title="probe image {i}">'
                   for i, t in zip(shown, drawn))
    more = len(c.get("members") or []) - len(shown[:_MAX_MEMBERS])
    return f'<div class="members">{imgs}{f" (+{more} not shown)" if more > 0 else ""}</div>' if imgs else ""


def section_discovery(audits: list[dict], saliency_dir: str | os.PathLike, class_names: Any = None) -> str:
    """The ``<section id="suspects">`` of the page for the report's (clean) ``audits`` (module docstring)."""
    head = '<section id="suspects"><h2>Suspected shortcuts</h2>'
    found = [a for a in audits if isinstance(a.get("discovery"), dict)]
    if not found:
        return head + ('<p class="note">No discovery in this run: SaliencyMonitor(discover=True) (the default) '
                       "clusters each class's maps and tests each minority pattern by pasting it.</p></section>")
    latest = found[-1]
    section = latest["discovery"]
    raised = [a.get("epoch") for a in found if a["metrics"].get("discovery/suspects")]
    parts = [f'<p>Discovery on <span class="strong">{_e(section.get("method"), 100)}</span> maps, latest audit '
             f'(epoch {_e(latest.get("epoch"))}). A candidate is a minority cluster of a class whose maps share a '
             'region the rest of the class does not use; it is <span class="strong">confirmed</span> (counted in '
             "discovery/suspects) only when pasting that region onto other classes' images flips them to its class, "
             "well above pasting a random region of the same size. Audits with confirmed suspects: "
             f"{_e(', '.join(str(e) for e in raised[:50]) or 'none', 400)}.</p>"]
    if section.get("skipped"):
        parts.append(f'<p class="note">Skipped: {_e(section["skipped"], 500)}</p>')
    listed = list(section.get("candidates") or [])
    order = sorted(range(len(listed)), key=lambda k: not (isinstance(listed[k], dict) and listed[k].get("confirmed")))
    if not listed and not section.get("skipped"):
        parts.append('<p class="note">No candidate in the latest audit.</p>')
    thumbs = _thumbs(saliency_dir) if listed else None
    masks = _masks(saliency_dir, latest, len(listed)) if thumbs is not None else None
    names = class_names if isinstance(class_names, list) else None
    for k in order[:_MAX_CANDIDATES]:
        c = listed[k]
        if not isinstance(c, dict):
            continue
        verdict = "CONFIRMED" if c.get("confirmed") else "recorded, not raised"
        parts.append(
            f'<div class="suspect{"" if c.get("confirmed") else " recorded"}"><div><span class="strong">class '
            f'{_e(class_name(c.get("class"), names), 100)}</span>: {_e(verdict)} · first seen at epoch '
            f'{_e(first_seen(found, c))}</div><div>{_e(candidate_line(c, names), 600)}</div>'
            f'{_members_html(c, thumbs, section.get("image_size"), None if masks is None else masks[k])}</div>')
    small = section.get("too_small") or []
    if small:
        parts.append(f'<p class="note">Too few probe images to cluster: class '
                     f'{_e(", ".join(class_name(k, names) for k in small), 300)}.</p>')
    return head + "".join(parts) + "</section>"
