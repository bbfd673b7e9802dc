"""The audit page's charts: inline SVG line charts of metrics over epochs, with no plotting library.

:func:`_chart` draws one chart (one polyline per series, dashed alarm thresholds, circled alarm firings, dots
where a series was measured at some audits only); :func:`_reduce` bounds a curve to about ``2 * MAX_POINTS``
points, keeping each bucket's minimum and maximum so spikes survive; :func:`_ticks` picks "nice" axis ticks.
Every string that reaches the SVG goes through :func:`_e` (HTML escaping, quotes too). Used by
:mod:`lightning_saliency.page`.

Example:
    >>> svg = _chart("spurious_mass", [("gradcam", [(0, 0.5), (1, 0.25)])], [], [])
    >>> svg.startswith('<figure class="chartbox"><svg') and "polyline" in svg
    True
"""

from __future__ import annotations

import html
import math
from typing import Any

__all__ = ["CHART_CSS", "MAX_POINTS", "PALETTE"]

MAX_POINTS = 300
MAX_TEXT = 2000
# the charts' style sheet (the page's CSS variables --line, --muted, --fg, --bad)
CHART_CSS = """.charts{display:flex;flex-wrap:wrap;gap:12px}
.chartbox{margin:0;border:1px solid var(--line);border-radius:6px;padding:6px}.chart{max-width:100%;height:auto}
.chart .plot{fill:#fbfcfd;stroke:var(--line)}.chart .grid{stroke:#e8ebef}.chart text{font-size:11px;
fill:var(--muted)}.chart .ctitle{font-size:13px;font-weight:600;fill:var(--fg)}.chart .ytick{text-anchor:end}
.chart .xtick,.chart .xlabel{text-anchor:middle}.chart .threshold{stroke:var(--bad);stroke-dasharray:6 4;
stroke-width:1.4}.chart .tlabel{fill:var(--bad)}.chart .firing{fill:none;stroke:var(--bad);
stroke-width:2}.legend{font-size:12px}.key{margin-right:12px;white-space:nowrap}.swatch{display:inline-block;
width:12px;height:3px;margin-right:4px;vertical-align:middle}"""
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def _e(x: Any, limit: int = MAX_TEXT) -> str:
    """HTML-escape ``x`` (quotes too), shortened to ``limit`` characters."""
    s = str(x)
    if len(s) > limit:
        s = s[:limit] + f"… ({len(s) - limit} more characters)"
    return html.escape(s, quote=True)


def _reduce(points: list[tuple[float, float | None]]) -> list[tuple[float, float | None]]:
    """At most ~2 * MAX_POINTS points: per bucket keep the min and max (in order); gaps (None) survive."""
    if len(points) <= 2 * MAX_POINTS:
        return points
    size = math.ceil(len(points) / MAX_POINTS)
    out: list[tuple[float, float | None]] = []
    for start in range(0, len(points), size):
        bucket = points[start : start + size]
        vals = [p for p in bucket if p[1] is not None]
        if not vals:
            out.append((bucket[0][0], None))
            continue
        lo = min(vals, key=lambda p: p[1])
        hi = max(vals, key=lambda p: p[1])
        if bucket[0][1] is None:
            out.append((bucket[0][0], None))
        for p in sorted({lo, hi}, key=lambda p: p[0]):
            out.append(p)
    return out


def _scale(v: float, lo: float, hi: float, a: float, b: float) -> float:
    """Map v from [lo, hi] to [a, b] without overflow for any finite doubles."""
    span = hi / 2 - lo / 2
    if span <= 0:
        return (a + b) / 2
    return a + (v / 2 - lo / 2) / span * (b - a)


def _ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """About ``n`` "nice" tick values (steps of 1, 2 or 5 times a power of ten) within ``[lo, hi]``.

    Example:
        >>> _ticks(0.0, 7.0, 6, integer=True)
        [0, 2, 4, 6]
    """
    span = hi / 2 - lo / 2  # half the span: finite for any finite lo, hi
    if not (span > 0 and math.isfinite(span)):
        return [lo]
    raw = 2 * span / max(n, 1)
    if not math.isfinite(raw) or raw <= 0:
        return [lo, hi]
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), 10 * mag)
    if integer:
        step = max(1.0, round(step))
    if not math.isfinite(step) or step <= 0:
        return [lo, hi]
    first = math.ceil(lo / step)
    ticks = []
    k = first
    while len(ticks) < 2 * n + 2:
        t = k * step
        if not math.isfinite(t) or t > hi + step * 1e-9:
            break
        ticks.append(t)
        k += 1
    return ticks or [lo, hi]


def _chart(title: str, series: list[tuple[str, list[tuple[float, float | None]]]],
           thresholds: list[tuple[str, float, str]], firings: list[tuple[float, float]],
           x_range: tuple[float, float] | None = None, marked: frozenset[str] = frozenset()) -> str:
    """One SVG line chart. ``series``: (label, [(x, y or None)]); ``thresholds``: (label, y, mode);
    ``x_range``: the epoch axis shared by every chart (default: this chart's data); the series named in
    ``marked`` (measured at some audits only, such as the periodic metrics) get a dot at each value."""
    W, H, L, R, T, B = 350, 200, 44, 10, 24, 36
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts if y is not None] + [t[1] for t in thresholds]
    ys += [v for _, v in firings]
    if not xs:
        return ""
    x_lo, x_hi = x_range if x_range is not None else (min(xs), max(xs))
    if ys:
        y_lo, y_hi = min(ys), max(ys)
    else:
        y_lo, y_hi = 0.0, 1.0
    if y_lo >= 0.0 and y_hi <= 1.0:
        y_lo, y_hi = 0.0, 1.0
    elif y_hi <= y_lo:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    if x_hi <= x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1

    def px(x: float) -> float:
        return _scale(x, x_lo, x_hi, L, W - R)

    def py(y: float) -> float:
        return _scale(y, y_lo, y_hi, H - B, T)

    parts = [
        f'<svg class="chart" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
        f'aria-label="{_e(title)}" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="{L}" y="16" class="ctitle">{_e(title)}</text>',
        f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" class="plot"/>',
    ]
    for t in _ticks(y_lo, y_hi, 5):
        y = py(t)
        parts.append(f'<line x1="{L}" x2="{W - R}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{L - 6}" y="{y + 4:.1f}" class="ytick">{_e(f"{t:.3g}")}</text>')
    for t in _ticks(x_lo, x_hi, 6, integer=True):
        x = px(t)
        parts.append(f'<text x="{x:.1f}" y="{H - B + 16}" class="xtick">{_e(f"{t:.4g}")}</text>')
    parts.append(f'<text x="{(L + W - R) / 2:.0f}" y="{H - 6}" class="xlabel">epoch</text>')
    for label, y, mode in thresholds:
        yy = py(y)
        parts.append(
            f'<line x1="{L}" x2="{W - R}" y1="{yy:.1f}" y2="{yy:.1f}" class="threshold">'
            f"<title>{_e(f'alarm threshold {label} ({mode}) = {y:.4g}')}</title></line>"
        )
        parts.append(f'<text x="{L + 4}" y="{yy - 4:.1f}" class="tlabel">{_e(f"{mode} {y:.4g}")}</text>')
    for i, (label, pts) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        segments: list[list[str]] = [[]]
        for x, y in pts:
            if y is None:
                if segments[-1]:
                    segments.append([])
                continue
            segments[-1].append(f"{px(x):.1f},{py(y):.1f}")
        for seg in segments:
            if len(seg) == 1:
                cx, cy = seg[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{color}"><title>{_e(label)}</title></circle>')
            elif seg:
                parts.append(
                    f'<polyline points="{" ".join(seg)}" fill="none" stroke="{color}" stroke-width="1.8">'
                    f"<title>{_e(label)}</title></polyline>"
                )
                if label in marked:
                    for point in seg:
                        cx, cy = point.split(",")
                        parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{color}"/>')
    for x, v in firings:
        parts.append(
            f'<circle cx="{px(x):.1f}" cy="{py(v):.1f}" r="4" class="firing">'
            f"<title>{_e(f'alarm fired at epoch {x:.4g}: {v:.4g}')}</title></circle>"
        )
    parts.append("</svg>")
    legend = "".join(
        f'<span class="key"><span class="swatch" style="background:{PALETTE[i % len(PALETTE)]}"></span>'
        f"{_e(label, 200)}</span>"
        for i, (label, _) in enumerate(series)
    )
    return f'<figure class="chartbox">{"".join(parts)}<figcaption class="legend">{legend}</figcaption></figure>'
