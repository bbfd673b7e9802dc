"""The audit page: one self-contained, offline HTML file rendered from ``<log_dir>/saliency``.

``lightning-saliency report LOG_DIR -o audit.html`` calls :func:`write_page`. The page holds:

* **Overlays**: per method, the saliency maps of the first ``max_images`` probe images over their thumbnails,
  with one epoch slider (``<input type=range>`` and a few lines of inline JavaScript) choosing which audited
  epoch is shown. Each overlay is the probe thumbnail (``maps/probe.npz``, embedded once, as a CSS background)
  under the map colorized with :func:`lightning_saliency.render.colorize` (a palette PNG, exact jet colors) at
  opacity 0.5: the same blend as :func:`lightning_saliency.render.overlay` with ``alpha=0.5``, at a fraction of
  the bytes because a smooth colorized map compresses far better than a blended photo. The caption under a tile
  is ``target → prediction`` (red when they differ); hovering shows the image index and group.
* **Metric curves** over epochs as inline SVG (:mod:`lightning_saliency.charts`): one chart per metric name, one polyline per method, alarm
  thresholds from ``report["alarms"]`` drawn dashed and alarm firings marked.
* The **latest audit's metrics** (metric × method) and **health** (:mod:`lightning_saliency.health`; an unhealthy
  audit has a red badge naming the problem there, in the header and on its epoch's overlays), the **per-group
  table** (``<method>/<metric>/<group>`` keys, with the probe's group sizes), the run's **alarm firings**,
  **audit errors**, and the run / probe / config header.

Bounds, so that a long run stays a reasonable page: at most ``max_images`` images per method per epoch
(default 16) and ``MAX_METHODS`` methods; at most ``max_epochs`` audited epochs with maps (default 50, evenly
subsampled, first and last always kept; the audits whose maps file the monitor thinned, ``SaliencyMonitor(keep_maps=)``,
are not on the slider and the note counts them); each curve reduced to at most ``2 * MAX_POINTS`` points (per bucket
of audits the minimum and maximum are kept, so spikes survive); at most ``MAX_SERIES`` curves; the most
recent ``MAX_ROWS`` errors and alarm firings (the count of the others is shown).

Safety: every string that comes from the report (keys, messages, names, paths) goes through
:func:`html.escape`; no report data is placed inside the script. Non-finite or non-numeric values are shown as
``n/a`` and leave gaps in curves. A strict Content-Security-Policy (``default-src 'none'; img-src data:;
style-src 'unsafe-inline'; script-src 'unsafe-inline'``) means the page cannot make any network request. Map
paths from the report are only read when they lie inside the ``saliency`` folder, with ``allow_pickle=False``.

Example:
    >>> import tempfile, json, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()) / "saliency"; d.mkdir()
    >>> _ = (d / "report.json").write_text(json.dumps({"schema": "lightning-saliency/report/v1", "audits": []}))
    >>> "<!doctype html>" in render_page({"audits": []}, d)
    True
"""

from __future__ import annotations

import base64
import io
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from .charts import MAX_POINTS, _chart, _e, _reduce
from .health import health_line, problems
from .page_assets import _SCRIPT, _STYLE
from .page_discovery import DISCOVERY_CSS, section_discovery
from .page_scorecard import section_scorecard
from .report import split_key

__all__ = ["render_page", "write_page", "CSP", "MAX_POINTS", "MAX_SERIES", "MAX_ROWS"]

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
MAX_SERIES = 200
MAX_ROWS = 200
MAX_METHODS = 24


# ----------------------------------------------------------------------------------------------- helpers


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def _int(x: Any) -> int | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return int(x) if math.isfinite(x) else None


def _fmt(x: Any) -> str:
    v = _num(x)
    return "n/a" if v is None else f"{v:.4g}"


def _cell(x: Any) -> str:
    v = _num(x)
    if v is None:
        return '<td class="num na">n/a</td>'
    return f'<td class="num">{_e(f"{v:.4g}")}</td>'


def _dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def _list(x: Any) -> list:
    return x if isinstance(x, list) else []


def _unhealthy(health: Any, where: str = "") -> str:
    """A red badge naming what makes ``health`` unhealthy, or ``""``."""
    bad = problems(health)
    return f'<span class="badge bad health">{where}unhealthy: {_e("; ".join(bad), 500)}</span>' if bad else ""


def _clean_audits(data: dict) -> list[dict]:
    """Audits as dicts with a metrics dict; anything else is dropped (a hostile report cannot crash us)."""
    out = []
    for a in _list(data.get("audits")):
        if isinstance(a, dict):
            a = dict(a)
            a["metrics"] = _dict(a.get("metrics"))
            out.append(a)
    return out


def _png(array: np.ndarray, palette: np.ndarray | None = None) -> str:
    """A ``data:image/png;base64`` URI for an RGB ``uint8 [H,W,3]`` array, or an index array with a palette."""
    from PIL import Image

    if palette is not None:
        im = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), "L").convert("P")
        im.putpalette(palette.astype(np.uint8).reshape(-1).tolist())
    else:
        im = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _jet_palette(cmap: str = "jet") -> np.ndarray:
    """The 256 colors :func:`render.colorize` uses: index ``i`` is the color of value ``i / 255``."""
    from lightning_saliency.render import colorize

    return colorize(np.linspace(0.0, 1.0, 256)[None, :], cmap)[0]


def _subsample(n: int, k: int) -> list[int]:
    """``k`` evenly spaced indices of ``range(n)``, first and last included (all of them when n <= k)."""
    if n <= k:
        return list(range(n))
    if k <= 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


# ----------------------------------------------------------------------------------------------- maps


def _safe_npz(saliency_dir: Path, rel: Any) -> Path | None:
    """The npz path for a report's ``maps`` entry when it is a relative path inside ``saliency_dir``."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        return None
    root = saliency_dir.resolve()
    try:
        p = (root / rel).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    if root not in p.parents or p.suffix != ".npz" or not p.is_file():
        return None
    return p


def _load_probe(saliency_dir: Path, max_images: int) -> dict[str, Any]:
    """Thumbnails, targets and groups from maps/probe.npz (empty dict when absent or unreadable)."""
    from lightning_saliency.report import load_probe_thumbnails

    if not (saliency_dir / "maps" / "probe.npz").is_file():
        return {}
    try:
        z = load_probe_thumbnails(saliency_dir)
    except Exception:  # noqa: BLE001 - a broken file only costs the thumbnails
        return {}
    out: dict[str, Any] = {}
    images = z.get("images")
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[-1] == 3 and images.dtype == np.uint8:
        out["images"] = images[:max_images]
    for name in ("targets", "groups"):
        a = z.get(name)
        if isinstance(a, np.ndarray) and a.ndim == 1:
            out[name] = a[:max_images].tolist()
    return out


def _map_indices(m: np.ndarray) -> np.ndarray | None:
    """A map ``[h,w]`` in [0,1] (float16 on disk) as palette indices, the way colorize bins values."""
    if m.ndim != 2 or m.size == 0 or not np.issubdtype(m.dtype, np.number):
        return None
    step = max(1, math.ceil(max(m.shape) / 256))  # guard against absurd sizes
    a = np.nan_to_num(m[::step, ::step].astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip((np.clip(a, 0.0, 1.0) * 256).astype(np.int64), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- sections


def _section_overlays(audits: list[dict], saliency_dir: Path, config: dict, max_images: int,
                      max_epochs: int, cmap: str) -> tuple[str, str]:
    """The overlays section and the CSS rules of the probe thumbnails (embedded once each)."""
    with_maps = [a for a in audits if isinstance(a.get("maps"), str) and a.get("maps")]
    if not with_maps or max_images <= 0 or max_epochs <= 0:
        note = "No maps were saved for this run." if not with_maps else "Overlays disabled (--max-images 0)."
        return f'<section id="overlays"><h2>Overlays</h2><p class="note">{note}</p></section>', ""
    chosen = [with_maps[i] for i in _subsample(len(with_maps), max_epochs)]
    thinned = sum(1 for a in audits if a.get("maps_thinned") and not a.get("maps"))  # SaliencyMonitor(keep_maps=)
    probe = _load_probe(saliency_dir, max_images)
    images = probe.get("images")
    targets = probe.get("targets") or []
    groups = probe.get("groups") or []
    css = []
    if images is not None:
        for i, img in enumerate(images):
            h, w = img.shape[:2]
            css.append(f".p{i}{{background-image:url({_png(img)});aspect-ratio:{w}/{h}}}")
    palette = _jet_palette(cmap)
    from lightning_saliency.mapfiles import RESERVED_KEYS  # predictions, discovery masks: not methods
    from lightning_saliency.report import load_maps

    config_methods = [m for m in _list(config.get("methods")) if isinstance(m, str)]
    per_epoch: list[tuple[Any, dict[str, np.ndarray], list, str | None]] = []
    methods: list[str] = list(config_methods)
    for audit in chosen:
        path = _safe_npz(saliency_dir, audit.get("maps"))
        arrays: dict[str, np.ndarray] = {}
        preds_list: list = []
        problem = None
        z: dict[str, np.ndarray] = {}
        if path is None:
            problem = f"maps file {str(audit.get('maps'))[:200]!r} not found inside {saliency_dir.name}/"
        else:
            try:
                z = load_maps(path)
            except Exception as exc:  # noqa: BLE001 - one unreadable file must not sink the page
                problem = f"cannot read {path.name}: {type(exc).__name__}: {exc}"
        for k, a in z.items():
            if k == "predictions":
                if a.ndim == 1:
                    preds_list = a[:max_images].tolist()
            elif k not in RESERVED_KEYS and a.ndim == 3 and (k in methods or len(methods) < MAX_METHODS):
                arrays[k] = a[:max_images].copy()  # a copy: the full array is freed now
                if k not in methods:
                    methods.append(k)
        per_epoch.append((audit.get("epoch"), arrays, preds_list, problem))

    methods = [m for m in methods if any(m in arrays for _, arrays, _, _ in per_epoch)] or methods
    last = len(per_epoch) - 1
    labels = [f"{_int(a.get('epoch')) if _int(a.get('epoch')) is not None else f'#{i}'}"  # + a validate/test stage
              + ("" if a.get("stage") in (None, "fit") else f" {str(a.get('stage'))[:10]}".replace(",", " ")) for i, a in enumerate(chosen)]
    out = [
        '<section id="overlays"><h2>Overlays</h2>',
        '<div class="slider"><label for="epoch-slider">Epoch</label>'
        f'<input type="range" id="epoch-slider" min="0" max="{last}" step="1" value="{last}" '
        f'data-epochs="{_e(",".join(str(x) for x in labels))}">'
        f'<output id="epoch-label" for="epoch-slider">epoch {_e(labels[last])}</output></div>',
        f'<p class="note">{len(per_epoch)} of {len(with_maps)} audited epochs with maps'
        + (" (evenly subsampled)" if len(per_epoch) < len(with_maps) else "")
        + (f"; {thinned} audits' maps files were thinned by keep_maps" if thinned else "")
        + f"; the first {max_images if images is None else len(images)} probe images; "
        "caption: target → prediction (red when wrong). Map colors: "
        f'<img class="cbar" alt="colormap from 0 (low) to 1 (high)" src="{_png(np.tile(np.arange(256, dtype=np.uint8), (8, 1)), palette)}"> '
        "low → high.</p>",
    ]
    for method in methods:
        out.append(f'<div class="method"><h3>{_e(method)}</h3>')
        for i, (_epoch, arrays, preds, problem) in enumerate(per_epoch):
            hidden = "" if i == last else " hidden"
            out.append(f'<div class="epoch-view" data-epoch-index="{i}" data-epoch="{_e(labels[i])}"{hidden}>')
            health = _dict(chosen[i].get("health"))  # this method's and the logits' problems at this epoch
            out.append(_unhealthy({k: v for k, v in health.items() if k in (method, "logits")}))
            a = arrays.get(method)
            if a is None:
                out.append(f'<p class="note">{_e(problem or f"no {method} maps at this epoch")}</p></div>')
                continue
            out.append('<div class="tiles">')
            for j in range(a.shape[0]):
                idx = _map_indices(a[j])
                if idx is None:
                    continue
                t = targets[j] if j < len(targets) else None
                p = preds[j] if j < len(preds) else None
                g = groups[j] if j < len(groups) else None
                tip = f"image {j}" + (f", target {t}" if t is not None else "") + (
                    f", predicted {p}" if p is not None else "") + (f", group {g}" if g is not None else "")
                wrong = " wrong" if t is not None and p is not None and t != p else ""
                cap = f"{t if t is not None else '?'} → {p if p is not None else '?'}"
                bg = f" p{j}" if images is not None and j < len(images) else ""
                out.append(
                    f'<figure class="tile" title="{_e(tip, 300)}"><div class="ov{bg}">'
                    f'<img alt="{_e(method, 100)} map, {_e(tip, 300)}" src="{_png(idx, palette)}"></div>'
                    f'<figcaption class="cap{wrong}">{_e(cap, 60)}</figcaption></figure>'
                )
            out.append("</div></div>")
        out.append("</div>")
    out.append("</section>")
    return "".join(out), "\n".join(css)


def _section_curves(audits: list[dict], alarms: list[dict]) -> str:
    keys: OrderedDict[str, None] = OrderedDict()
    for a in audits:
        for k in a["metrics"]:
            if isinstance(k, str) and split_key(k)[2] is None:
                keys.setdefault(k, None)
                if len(keys) >= MAX_SERIES:
                    break
    if not keys:
        return '<section id="curves"><h2>Metrics over epochs</h2><p class="note">No metrics recorded.</p></section>'
    xs = []
    for i, a in enumerate(audits):
        e = _num(a.get("epoch"))
        xs.append(float(i) if e is None else e)
    alarmed = {a for a in (al.get("metric") for al in alarms) if isinstance(a, str)}
    by_metric: OrderedDict[str, list[str]] = OrderedDict()
    for k in sorted(keys, key=lambda k: (split_key(k)[1], split_key(k)[0])):
        by_metric.setdefault(split_key(k)[1], []).append(k)

    def has_alarm(item: tuple[str, list[str]]) -> bool:
        return any(a == k or a.startswith(k + "/") for k in item[1] for a in alarmed)

    # charts watched by an alarm first, then the metrics in the registry's order, then the rest by name
    from .metrics.registry import metric_names

    chart_order = metric_names()

    def rank(item: tuple[str, list[str]]) -> tuple[bool, int]:
        order = chart_order.index(item[0]) if item[0] in chart_order else len(chart_order)
        return not has_alarm(item), order

    by_metric = OrderedDict(sorted(by_metric.items(), key=rank))
    thresholds: dict[str, set[tuple[float, str]]] = {}
    firings: dict[str, list[tuple[float, float]]] = {}
    for al in alarms:
        metric, thr = al.get("metric"), _num(al.get("threshold"))
        if not isinstance(metric, str):
            continue
        if thr is not None and len(thresholds.get(metric, ())) < 10:
            thresholds.setdefault(metric, set()).add((thr, str(al.get("mode", ""))[:8]))
        x, v = _num(al.get("epoch")), _num(al.get("value"))
        if x is not None and v is not None and len(firings.get(metric, [])) < MAX_ROWS:
            firings.setdefault(metric, []).append((x, v))
    charts = []
    for metric, ks in by_metric.items():
        series, sparse = [], set()
        for k in ks:
            pts = [(xs[i], _num(a["metrics"].get(k))) for i, a in enumerate(audits) if k in a["metrics"]]
            label = split_key(k)[0] or k
            series.append((label, _reduce(pts)))
            if len(pts) < len(audits):  # a periodic metric: the dots show where it was measured
                sparse.add(label)
        thr = [(k, t, mode) for k in ks for t, mode in sorted(thresholds.get(k, ()))]
        fire = [f for k in ks for f in firings.get(k, []) if min(xs) <= f[0] <= max(xs)]
        charts.append(_chart(metric, series, thr, fire, (min(xs), max(xs)), frozenset(sparse)))
    note = (
        f'<p class="note">{len(audits)} audits; dashed lines: alarm thresholds, red circles: alarm firings'
        + (f"; each curve reduced to at most {2 * MAX_POINTS} points (bucket minimum and maximum)"
           if len(audits) > 2 * MAX_POINTS else "")
        + "</p>"
    )
    return f'<section id="curves"><h2>Metrics over epochs</h2>{note}<div class="charts">{"".join(charts)}</div></section>'


def _section_latest(latest: dict | None) -> str:
    head = '<section id="latest"><h2>Latest audit</h2>'
    if latest is None:
        return head + '<p class="note">No audits yet.</p></section>'
    metrics = latest["metrics"]
    rows: OrderedDict[str, dict[str, Any]] = OrderedDict()
    methods: list[str] = []
    for k in sorted(k for k in metrics if isinstance(k, str)):
        method, metric, group = split_key(k)
        if group is not None:
            continue
        rows.setdefault(metric, {})[method] = metrics[k]
        if method not in methods:
            methods.append(method)
    info = (
        f'<p class="note">{_e(latest.get("stage") or "fit")} audit, epoch {_e(latest.get("epoch"))}, step {_e(latest.get("global_step"))}, '
        f'{_e(latest.get("time", ""))}, took {_e(_fmt(latest.get("duration_s")))} s, '
        f'precision {_e(latest.get("precision", "n/a"))}; health: {_e(health_line(latest.get("health")), 500)}</p>'
        + _unhealthy(latest.get("health"))
    )
    if not rows:
        return head + info + '<p class="note">This audit recorded no metrics.</p></section>'
    table = ['<table class="metrics"><thead><tr><th>metric</th>']
    table += [f"<th>{_e(m or '—', 200)}</th>" for m in methods]
    table.append("</tr></thead><tbody>")
    for metric, vals in rows.items():
        table.append(f"<tr><th>{_e(metric, 200)}</th>")
        table += [_cell(vals.get(m)) if m in vals else '<td class="num">—</td>' for m in methods]
        table.append("</tr>")
    table.append("</tbody></table>")
    return head + info + "".join(table) + "</section>"


def _section_groups(latest: dict | None, probe: dict) -> str:
    head = '<section id="groups"><h2>Per group (latest audit)</h2>'
    rows: OrderedDict[str, dict[str, Any]] = OrderedDict()
    groups: list[str] = []
    if latest is not None:
        for k in sorted(k for k in latest["metrics"] if isinstance(k, str)):
            method, metric, group = split_key(k)
            if group is None:
                continue
            rows.setdefault(f"{method}/{metric}", {})[group] = latest["metrics"][k]
            if group not in groups:
                groups.append(group)
    sizes = _dict(probe.get("groups"))
    for g in sizes:
        if isinstance(g, str) and g not in groups:
            groups.append(g)
    if not rows:
        return head + '<p class="note">No per-group metrics (the probe has no groups, or none were computed).</p></section>'
    groups = groups[:MAX_SERIES]
    t = ['<table class="metrics"><thead><tr><th>metric</th>']
    t += [f"<th>{_e(g, 200)}</th>" for g in groups]
    t.append("</tr></thead><tbody>")
    if sizes:
        t.append('<tr class="sizes"><th>images in probe</th>')
        t += [f'<td class="num">{_e(sizes.get(g, "—"))}</td>' for g in groups]
        t.append("</tr>")
    for key, vals in rows.items():
        t.append(f"<tr><th>{_e(key, 200)}</th>")
        t += [_cell(vals.get(g)) if g in vals else '<td class="num">—</td>' for g in groups]
        t.append("</tr>")
    t.append("</tbody></table>")
    return head + "".join(t) + "</section>"


def _section_alarms(alarms: list[dict]) -> str:
    head = f'<section id="alarms"><h2>Alarm firings ({len(alarms)})</h2>'
    if not alarms:
        return head + '<p class="note">No alarm fired.</p></section>'
    shown = alarms[-MAX_ROWS:]
    t = [head]
    if len(shown) < len(alarms):
        t.append(f'<p class="note">the last {len(shown)} of {len(alarms)} firings</p>')
    t.append('<table><thead><tr><th>epoch</th><th>step</th><th>alarm</th><th>metric</th><th>value</th>'
             "<th>threshold</th><th>action</th></tr></thead><tbody>")
    for al in shown:
        mode = al.get("mode")
        op = "≤" if mode == "max" else "≥" if mode == "min" else _e(mode, 20)
        t.append(
            f"<tr><td class=\"num\">{_e(al.get('epoch'), 40)}</td><td class=\"num\">{_e(al.get('global_step'), 40)}</td>"
            f"<td>{_e(al.get('name'), 200)}</td><td>{_e(al.get('metric'), 300)}</td>{_cell(al.get('value'))}"
            f"<td class=\"num\">{op} {_e(_fmt(al.get('threshold')))}</td><td>{_e(al.get('action'), 40)}</td></tr>"
        )
    t.append("</tbody></table></section>")
    return "".join(t)


def _section_errors(audits: list[dict]) -> str:
    errors = []
    for a in audits:
        for err in _list(a.get("errors")):
            if isinstance(err, dict):
                errors.append((a.get("epoch"), a.get("global_step"), err))
    head = f'<section id="errors"><h2>Audit errors ({len(errors)})</h2>'
    if not errors:
        return head + '<p class="note">No audit raised an error.</p></section>'
    shown = errors[-MAX_ROWS:]
    t = [head]
    if len(shown) < len(errors):
        t.append(f'<p class="note">the last {len(shown)} of {len(errors)} errors</p>')
    t.append("<table><thead><tr><th>epoch</th><th>step</th><th>method</th><th>type</th><th>message</th>"
             "</tr></thead><tbody>")
    for epoch, step, err in shown:
        t.append(
            f'<tr><td class="num">{_e(epoch, 40)}</td><td class="num">{_e(step, 40)}</td>'
            f"<td>{_e(err.get('method') if err.get('method') is not None else '—', 200)}</td>"
            f"<td>{_e(err.get('type'), 200)}</td><td class=\"msg\">{_e(err.get('message'))}</td></tr>"
        )
    t.append("</tbody></table></section>")
    return "".join(t)


def _section_run(data: dict) -> str:
    rows = []
    for title, block in (("run", data.get("run")), ("probe", data.get("probe")), ("config", data.get("config"))):
        for k, v in list(_dict(block).items())[:50]:
            if isinstance(v, dict):
                v = ", ".join(f"{a}: {b}" for a, b in list(v.items())[:50])
            elif isinstance(v, list):
                v = ", ".join(str(x) for x in v[:50])
            rows.append(f"<tr><th>{_e(title)}</th><th>{_e(k, 200)}</th><td>{_e(v, 500)}</td></tr>")
    for k in ("schema", "created", "updated"):
        if k in data:
            rows.append(f"<tr><th>report</th><th>{k}</th><td>{_e(data.get(k), 200)}</td></tr>")
    return f'<section id="run"><h2>Run</h2><table class="kv"><tbody>{"".join(rows)}</tbody></table></section>'


def render_page(data: dict, saliency_dir: str | os.PathLike, max_images: int = 16, max_epochs: int = 50,
                cmap: str = "jet") -> str:
    """Render report ``data`` (maps read from ``saliency_dir``) to a self-contained HTML string.

    Example:
        >>> page = render_page({"audits": [{"epoch": 0, "metrics": {"<b>": float("nan")}}]}, ".")
        >>> "<b>" in page, "&lt;b&gt;" in page
        (False, True)
    """
    from lightning_saliency import __version__

    saliency_dir = Path(saliency_dir)
    data = _dict(data)
    audits = _clean_audits(data)
    alarms = [a for a in _list(data.get("alarms")) if isinstance(a, dict)]
    run, probe, config = _dict(data.get("run")), _dict(data.get("probe")), _dict(data.get("config"))
    latest = audits[-1] if audits else None
    n_errors = sum(len(_list(a.get("errors"))) for a in audits)
    overlays, thumbs_css = _section_overlays(audits, saliency_dir, config, max_images, max_epochs, cmap)
    model = run.get("model") or "model"
    epochs = [e for e in (_int(a.get("epoch")) for a in audits) if e is not None]
    span = f"epochs {min(epochs)}–{max(epochs)}" if epochs else "no epochs"
    badges = [f'<span class="badge">{len(audits)} audits, {span}</span>']
    badges.append(f'<span class="badge{" bad" if alarms else ""}">{len(alarms)} alarm firings</span>')
    badges.append(f'<span class="badge{" bad" if n_errors else ""}">{n_errors} audit errors</span>')
    badges.append(_unhealthy(_dict(latest).get("health"), "latest audit "))
    body = [
        "<header>",
        f"<h1>Saliency audit: {_e(model, 200)}</h1>",
        f"<p>{_e(run.get('log_dir') or saliency_dir.parent, 500)} · methods "
        f"{_e(', '.join(str(m) for m in _list(config.get('methods'))[:20]) or 'n/a', 300)} · layer "
        f"{_e(config.get('layer', 'n/a'), 200)} · updated {_e(data.get('updated', 'n/a'), 60)}</p>",
        f'<div class="badges">{"".join(badges)}</div>',
        "</header>",
        '<nav><a href="#overlays">Overlays</a><a href="#curves">Curves</a><a href="#latest">Latest audit</a>'
        '<a href="#suspects">Suspects</a><a href="#scorecard">Scorecard</a><a href="#groups">Groups</a><a href="#alarms">Alarms</a><a href="#errors">Errors</a><a href="#run">Run</a></nav>',
        "<main>",
        overlays,
        _section_curves([a for a in audits if a.get("stage") in (None, "fit")] or audits, alarms),  # over fit epochs
        _section_latest(latest),
        section_discovery(audits, saliency_dir),
        section_scorecard(data),
        _section_groups(latest, probe),
        _section_alarms(alarms),
        _section_errors(audits),
        _section_run(data),
        "</main>",
        f"<footer>Rendered by lightning-saliency {_e(__version__)} from {_e(saliency_dir / 'report.json', 500)}. "
        "Offline: every image is inline; the page makes no network request.</footer>",
    ]
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>Saliency audit: {_e(model, 200)}</title>\n"
        f"<style>{_STYLE}\n{DISCOVERY_CSS}\n{thumbs_css}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + f"\n<script>{_SCRIPT}</script>\n</body></html>\n"
    )


def write_page(report: str | os.PathLike, out: str | os.PathLike, max_images: int = 16, max_epochs: int = 50,
               cmap: str = "jet") -> Path:
    """Load the report (a ``report.json`` path or a log dir) and write the page to ``out`` atomically.

    Raises :class:`lightning_saliency.report.ReportError` when the report is missing, unreadable or of an unknown
    schema, and ``ValueError`` for a negative bound (the CLI turns both into exit code 2). The page is written
    with :func:`lightning_saliency.files.atomic_write`: a failed render leaves ``out`` as it was.

    Example:
        >>> write_page("runs/demo/lightning_logs/version_0", "audit.html")  # doctest: +SKIP
        PosixPath('audit.html')
    """
    from lightning_saliency.files import atomic_write
    from lightning_saliency.report import load_report

    loaded = load_report(report)
    if max_images < 0 or max_epochs < 0:
        raise ValueError("--max-images and --max-epochs must be >= 0")
    page = render_page(loaded.data, loaded.path.parent, max_images=max_images, max_epochs=max_epochs, cmap=cmap)
    payload = page.encode("utf-8")
    out = Path(out)
    atomic_write(out, lambda f: f.write(payload))
    return out
