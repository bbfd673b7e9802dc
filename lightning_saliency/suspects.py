"""Reading an audit record's ``discovery`` section: the suspected shortcuts, as text (torch-free).

``show``, the HTML page and the dashboards' text entry all describe a candidate of
:mod:`lightning_saliency.discovery_audit` the same way: its class, how many probe images are its members, the
region (``[top, left, bottom, right]`` in input pixels, bottom and right exclusive), the flip rate of pasting the
region onto other classes' images against its null (a random region of the same size; the rest-of-class null too
when known), and whether it is confirmed (counted in ``discovery/suspects``) or only recorded.

Example:
    >>> c = {"class": 0, "members": [1, 4, 7], "region": [0, 24, 8, 32], "flip_rate": 0.5,
    ...      "null_flip_rate": 0.05, "rest_flip_rate": 0.0, "erase_accuracy_drop": 0.33, "confirmed": True}
    >>> candidate_line(c, ["square", "disk"])
    'class square: 3 members, region [0, 24, 8, 32], flip 0.50 vs null 0.05 (rest of class 0.00), erase drop 0.33: CONFIRMED'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["candidate_line", "class_name", "first_seen", "section_lines"]


def _num(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else "n/a"


def class_name(k: Any, names: Sequence[str] | None = None) -> str:
    """The name of class ``k`` (its index when ``names`` does not have it).

    Example:
        >>> class_name(1, ["cat", "dog"]), class_name(5, ["cat"])
        ('dog', '5')
    """
    if names and isinstance(k, int) and 0 <= k < len(names):
        return str(names[k])
    return str(k)


def candidate_line(c: Mapping[str, Any], names: Sequence[str] | None = None) -> str:
    """One line about one candidate (module docstring)."""
    rest = c.get("rest_flip_rate")
    rest_text = f" (rest of class {_num(rest)})" if rest is not None else ""
    verdict = "CONFIRMED" if c.get("confirmed") else "recorded, not raised"
    reason = f" ({c['reason']})" if c.get("reason") else ""
    return (f"class {class_name(c.get('class'), names)}: {len(c.get('members') or [])} members, region "
            f"{list(c.get('region') or [])}, flip {_num(c.get('flip_rate'))} vs null {_num(c.get('null_flip_rate'))}"
            f"{rest_text}, erase drop {_num(c.get('erase_accuracy_drop'))}: {verdict}{reason}")


def section_lines(section: Mapping[str, Any] | None, names: Sequence[str] | None = None) -> list[str]:
    """The lines describing a record's ``discovery`` section: the method, each candidate (confirmed first), the
    classes too small to cluster, or why it was skipped; ``[]`` without a section.

    Example:
        >>> section_lines({"method": "gradcam", "too_small": [2], "candidates": []})
        ['discovery on gradcam maps: no candidate', 'too few probe images to cluster: class 2']
    """
    if not isinstance(section, Mapping):
        return []
    cands = sorted(section.get("candidates") or [], key=lambda c: not c.get("confirmed"))
    n = sum(bool(c.get("confirmed")) for c in cands)
    head = f"discovery on {section.get('method')} maps: "
    if section.get("skipped"):
        return [head + f"skipped ({section['skipped']})"]
    head += f"{n} suspect(s) confirmed of {len(cands)} candidate(s)" if cands else "no candidate"
    lines = [head] + ["  " + candidate_line(c, names) for c in cands]
    small = section.get("too_small") or []
    if small:
        lines.append("too few probe images to cluster: " + ", ".join(f"class {class_name(k, names)}" for k in small))
    return lines


def first_seen(audits: Sequence[Mapping[str, Any]], candidate: Mapping[str, Any]) -> Any:
    """The epoch of the first audit with a confirmed candidate of the same class whose region overlaps this one's
    (the candidate's own audit when none earlier).

    Example:
        >>> a = [{"epoch": 0, "discovery": {"candidates": [{"class": 0, "region": [0, 0, 4, 4], "confirmed": True}]}},
        ...      {"epoch": 1, "discovery": {"candidates": [{"class": 0, "region": [1, 1, 5, 5], "confirmed": True}]}}]
        >>> first_seen(a, a[1]["discovery"]["candidates"][0])
        0
    """
    box = list(candidate.get("region") or [0, 0, 0, 0])
    for audit in audits:
        for c in (audit.get("discovery") or {}).get("candidates") or []:
            other = list(c.get("region") or [0, 0, 0, 0])
            overlap = min(box[2], other[2]) > max(box[0], other[0]) and min(box[3], other[3]) > max(box[1], other[1])
            if c.get("class") == candidate.get("class") and bool(c.get("confirmed")) == bool(
                    candidate.get("confirmed")) and overlap:
                return audit.get("epoch")
    return None
