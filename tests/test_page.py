"""The audit page: content read back from the HTML, bounds, hostile reports, and a real headless browser."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from lightning_saliency import page as page_mod
from lightning_saliency.charts import _reduce
from lightning_saliency.cli import main
from lightning_saliency.page import CSP, MAX_POINTS, MAX_ROWS, render_page
from lightning_saliency.render import colorize
from lightning_saliency.report import load_maps, load_probe_thumbnails
from tests.browser_harness import Browser, find_chromium
from tests.report_fixtures import make_report_data, make_run, write_maps, write_report

ALLOWED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "h3", "p", "div", "span", "nav", "a",
    "main", "section", "label", "input", "output", "img", "figure", "figcaption", "svg", "text", "rect", "line",
    "polyline", "circle", "table", "thead", "tbody", "tr", "th", "td", "footer", "script",
}


class Page(HTMLParser):
    """Every element (tag, attrs, parent chain) and the text of script/style elements."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self.text: list[str] = []
        self._in_script = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if tag == "script":
            self.scripts.append("")

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data
        else:
            self.text.append(data)

    def find(self, tag: str, **attrs: str) -> list[dict]:
        out = []
        for t, a in self.elements:
            if t == tag and all((a.get(k.replace("_", "-")) or "") == v for k, v in attrs.items()):
                out.append(a)
        return out

    def with_class(self, cls: str) -> list[tuple[str, dict]]:
        return [(t, a) for t, a in self.elements if cls in (a.get("class") or "").split()]


def assert_safe(html_text: str) -> Page:
    """The structural safety properties every rendered page must have."""
    doc = Page(html_text)
    tags = {t for t, _ in doc.elements}
    assert tags <= ALLOWED_TAGS, tags - ALLOWED_TAGS
    assert doc.scripts == [page_mod._SCRIPT], "exactly one script element: ours, unchanged"
    csp = doc.find("meta", http_equiv="Content-Security-Policy")
    assert len(csp) == 1 and csp[0]["content"] == CSP
    for tag, attrs in doc.elements:
        for name, value in attrs.items():
            assert not name.startswith("on"), (tag, name, value)  # no event handler attributes
            if name in ("src", "href", "action", "formaction", "xlink:href"):
                assert value and (value.startswith("data:image/png;base64,") or value.startswith("#")), (tag, value)
    # style rules may only reference inline data: images
    for url in re.findall(r"url\(([^)]*)\)", html_text):
        assert url.startswith("data:image/png;base64,"), url[:80]
    return doc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("page"), n_epochs=6, n=12, size=32)


@pytest.fixture(scope="module")
def page_file(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("html") / "audit.html"
    assert main(["report", str(run_dir), "-o", str(out)]) == 0
    return out


def _png_array(uri: str) -> np.ndarray:
    from PIL import Image

    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def test_page_structure_and_slider_markup(page_file):
    doc = assert_safe(page_file.read_text())
    slider = doc.find("input", id="epoch-slider")
    assert len(slider) == 1
    assert (slider[0]["type"], slider[0]["min"], slider[0]["max"], slider[0]["value"]) == ("range", "0", "5", "5")
    assert slider[0]["data-epochs"] == "0,1,2,3,4,5"
    views = doc.with_class("epoch-view")
    assert len(views) == 2 * 6  # two methods, six epochs
    visible = [a for _, a in views if "hidden" not in a]
    assert [a["data-epoch"] for a in visible] == ["5", "5"]  # without JavaScript the latest epoch shows
    tiles = doc.with_class("tile")
    assert len(tiles) == 2 * 6 * 12
    assert [h for h in doc.text if h in ("gradcam", "gradient")][:2] == ["gradcam", "gradient"]


def test_overlay_pixels_are_the_colorized_maps(run_dir, page_file):
    doc = Page(page_file.read_text())
    saliency = run_dir / "saliency"
    maps = load_maps(saliency, 5)
    probe = load_probe_thumbnails(saliency)
    # tiles are in order: method, epoch, image; the gradcam epoch-5 view is the 6th view of the first method
    imgs = [a["src"] for t, a in doc.elements if t == "img" and (a.get("alt") or "").startswith("gradcam map")]
    first_of_epoch5 = imgs[5 * 12]
    np.testing.assert_array_equal(_png_array(first_of_epoch5), colorize(maps["gradcam"][0]))
    last = imgs[5 * 12 + 11]
    np.testing.assert_array_equal(_png_array(last), colorize(maps["gradcam"][11]))
    # the probe thumbnail under tile j is embedded once, as the CSS class .p<j>
    css = re.search(r"\.p3\{background-image:url\(([^)]*)\)", page_file.read_text())
    np.testing.assert_array_equal(_png_array(css.group(1)), probe["images"][3])
    # captions: target -> prediction, marked wrong where the fixture flipped predictions (first 5 at epoch 5)
    caps = [a for _, a in doc.with_class("cap")]
    wrong = ["wrong" in a["class"] for a in caps[5 * 12 : 6 * 12]]
    assert wrong == [True] * 5 + [False] * 7


def test_latest_and_group_tables(page_file):
    text = page_file.read_text()
    data = make_report_data(6)
    latest = data["audits"][-1]["metrics"]
    groups_section = text[text.index('<section id="groups">') : text.index('<section id="alarms">')]
    rows = re.findall(r"<tr><th>([^<]*)</th>(.*?)</tr>", groups_section)
    table = {k: re.findall(r'<td class="num[^"]*">([^<]*)</td>', cells) for k, cells in rows}
    assert table["gradcam/spurious_mass"] == [f"{latest['gradcam/spurious_mass/hospital_a']:.4g}",
                                              f"{latest['gradcam/spurious_mass/hospital_b']:.4g}"]
    assert '<tr class="sizes"><th>images in probe</th><td class="num">6</td><td class="num">6</td>' in groups_section
    latest_section = text[text.index('<section id="latest">') : text.index('<section id="groups">')]
    rows = dict(re.findall(r"<tr><th>([^<]*)</th>(.*?)</tr>", latest_section))
    assert re.findall(r">([^<]*)</td>", rows["stability"]) == [f"{latest['gradcam/stability']:.4g}",
                                                              f"{latest['gradient/stability']:.4g}"]
    # errors and alarm firings
    assert "CUDA out of memory (simulated)" in text
    alarms = text[text.index('<section id="alarms">') : text.index('<section id="errors">')]
    assert alarms.count("<tr><td") == 2 and "ShortcutAlarm" in alarms


def test_curves_threshold_gap_and_firings(page_file):
    text = page_file.read_text()
    svg = re.search(r'<svg[^>]*aria-label="spurious_mass".*?</svg>', text, re.S).group(0)
    # y axis 0..1 over the plot rectangle: the threshold 0.35 lies 35% of the way up from its bottom edge
    top, height = map(float, re.search(r'<rect x="\d+" y="(\d+)" width="\d+" height="(\d+)" class="plot"/>', svg).groups())
    thr = re.search(r'<line x1="\d+" x2="\d+" y1="([\d.]+)" y2="([\d.]+)" class="threshold">', svg)
    assert thr and float(thr.group(1)) == pytest.approx(top + height - 0.35 * height, abs=0.06)
    polylines = re.findall(r'<polyline points="([^"]*)"[^>]*><title>([^<]*)</title>', svg)
    by_label: dict[str, list[int]] = {}
    for pts, label in polylines:
        by_label.setdefault(label, []).append(len(pts.split()))
    assert by_label["gradcam"] == [6]
    assert by_label["gradient"] == [2, 3]  # null at epoch 2 leaves a gap
    assert svg.count('class="firing"') == 2


def test_bounds_on_images_and_epochs(tmp_path):
    log_dir = make_run(tmp_path, n_epochs=30, n=12, size=16)
    out = tmp_path / "audit.html"
    assert main(["report", str(log_dir), "-o", str(out), "--max-images", "5", "--max-epochs", "7"]) == 0
    doc = assert_safe(out.read_text())
    views = [a for _, a in doc.with_class("epoch-view")]
    epochs = [a["data-epoch"] for a in views[:7]]
    assert len(views) == 2 * 7 and epochs[0] == "0" and epochs[-1] == "29" and len(set(epochs)) == 7
    assert len(doc.with_class("tile")) == 2 * 7 * 5
    assert len(doc.with_class("ov")) == 70
    assert "7 of 30 audited epochs" in out.read_text()


def test_reduce_keeps_spikes_and_bounds_points():
    pts = [(float(i), 0.1) for i in range(10_000)]
    pts[7_777] = (7777.0, 0.9)
    pts[1_234] = (1234.0, None)
    red = _reduce(pts)
    assert len(red) <= 2 * MAX_POINTS + MAX_POINTS
    assert (7777.0, 0.9) in red
    assert [x for x, _ in red] == sorted(x for x, _ in red)


HOSTILE = "<script>alert(1)</script>"


def _hostile_report(tmp_path: Path, n_audits: int = 6) -> Path:
    data = make_report_data(n_audits)
    evil_attr = '"><img src=x onerror=alert(2)>'
    data["run"]["model"] = evil_attr + HOSTILE
    data["run"]["log_dir"] = "</title><script>alert(3)</script>"
    data["config"]["methods"] = [HOSTILE, "gradcam"]
    data["config"]["layer"] = "<iframe src=//evil.example>"
    data["probe"]["groups"] = {HOSTILE: 3, "ok": 3}
    for a in data["audits"]:
        a["metrics"][HOSTILE] = 0.5
        a["metrics"][f"gradcam/{HOSTILE}"] = 0.25
        a["metrics"][f"gradcam/spurious_mass/{evil_attr}"] = 0.125
        a["metrics"]["gradcam/huge"] = 1e308
        a["metrics"]["gradcam/negative_huge"] = -1e308
        a["errors"].append({"method": HOSTILE, "type": "<b>Boom</b>", "message": "</td></tr></table>" + HOSTILE})
    data["audits"][1]["metrics"]["gradcam/stability"] = "NaN-placeholder"
    data["audits"][2]["metrics"]["gradcam/stability"] = "Inf-placeholder"
    data["audits"][0]["maps"] = "../../../../../../etc/passwd"
    data["audits"][1]["maps"] = "maps/../../secret.npz"
    data["audits"][2]["maps"] = "javascript:alert(4)"
    data["alarms"].append({"name": HOSTILE, "metric": f"gradcam/{HOSTILE}", "threshold": 0.2, "mode": "<max>",
                           "epoch": 1, "global_step": 2, "value": 0.5, "action": "</table>"})
    text = json.dumps(data)
    text = text.replace('"NaN-placeholder"', "NaN").replace('"Inf-placeholder"', "Infinity")
    saliency = tmp_path / "run" / "saliency"
    write_report(saliency, text)
    write_maps(saliency, list(range(n_audits)), n=4, size=8)
    # a maps file outside the saliency folder: the page must not read it
    np.savez(tmp_path / "run" / "secret.npz", gradcam=np.full((4, 8, 8), 0.5, np.float16))
    return tmp_path / "run"


def test_hostile_report_is_escaped(tmp_path):
    run = _hostile_report(tmp_path)
    out = tmp_path / "audit.html"
    assert main(["report", str(run), "-o", str(out)]) == 0
    text = out.read_text()
    doc = assert_safe(text)
    assert "alert(" not in "".join(doc.scripts)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in text
    assert "&lt;iframe src=//evil.example&gt;" in text and "<iframe" not in text
    visible = "".join(doc.text)
    assert HOSTILE in visible  # shown to the reader as text
    # NaN/Infinity are n/a, huge values do not break the chart coordinates
    numbers = re.findall(r'\s(?:x1|x2|y1|y2|cx|cy|x|y)="([^"]*)"', text) + " ".join(
        re.findall(r'points="([^"]*)"', text)).replace(",", " ").split()
    assert numbers and all(math.isfinite(float(v)) for v in numbers)
    # traversal and odd map paths were not followed; epochs 3..5 still show their maps
    assert text.count("not found inside saliency/") == 2 * 3  # epochs 0..2, for both methods
    assert "etc/passwd" in visible and "javascript:alert(4)" in visible  # named in the note, never loaded
    assert len(doc.with_class("tile")) == 2 * 3 * 4  # gradcam and gradient, epochs 3..5, 4 images
    assert [a["data-epoch"] for _, a in doc.with_class("epoch-view")][:6] == ["0", "1", "2", "3", "4", "5"]


def test_hostile_report_show_and_gate_do_not_crash(tmp_path, capsys):
    run = _hostile_report(tmp_path)
    assert main(["show", str(run)]) == 0
    out = capsys.readouterr().out
    assert "epoch 5" in out and "\x1b" not in out
    assert main(["gate", str(run), "--max", f"gradcam/{HOSTILE}=0.3", "--min", "gradcam/huge=0"]) == 0
    assert main(["gate", str(run), "--min", "gradcam/stability=0", "--epoch", "1"]) == 1  # NaN fails


def test_render_page_survives_garbage():
    data = {
        "schema": "x", "run": [1, 2], "probe": {"groups": ["a"]}, "config": {"methods": {"a": 1}},
        "alarms": [None, 3, {"metric": 5, "threshold": "x"}, {"metric": "a/b", "threshold": float("nan"), "epoch": "e"}],
        "audits": [None, "x", {"epoch": "seven", "metrics": [1, 2], "errors": "oops", "maps": 12},
                   {"epoch": 2.5, "metrics": {"a/b": float("inf"), "a/b/c": "s", 3: 4}, "errors": [None, {"message": 1}]},
                   {"epoch": None, "global_step": {}, "metrics": {"a/b": 0.5}, "maps": "maps/none.npz"}],
    }
    text = render_page(data, Path("/nonexistent/saliency"))
    assert_safe(text)


def test_many_audits_render_bounded_and_fast(tmp_path):
    n = 5000
    data = make_report_data(2)
    template = data["audits"][-1]
    audits = []
    rng = np.random.default_rng(0)
    for e in range(n):
        a = json.loads(json.dumps(template))
        a["epoch"], a["global_step"] = e, 10 * e
        for k in a["metrics"]:
            a["metrics"][k] = float(rng.random())
        a["maps"] = "maps/epoch_0000.npz"
        a["errors"] = [{"method": "gradcam", "type": "RuntimeError", "message": f"failure {e}"}] if e % 5 == 0 else []
        audits.append(a)
    data["audits"] = audits
    data["alarms"] = [dict(data["alarms"][0], epoch=e, global_step=10 * e) for e in range(0, n, 3)]
    saliency = tmp_path / "saliency"
    write_report(saliency, data)
    write_maps(saliency, [0], n=12, size=32)
    out = tmp_path / "audit.html"
    t0 = time.perf_counter()
    assert main(["report", str(tmp_path), "-o", str(out)]) == 0
    elapsed = time.perf_counter() - t0
    assert elapsed < 30, elapsed
    text = out.read_text()
    assert len(text) < 6_000_000, len(text)
    doc = assert_safe(text)
    assert len([a for _, a in doc.with_class("epoch-view")]) == 2 * 50  # evenly subsampled to 50 epochs
    for pts in re.findall(r'points="([^"]*)"', text):
        assert len(pts.split()) <= 2 * MAX_POINTS + MAX_POINTS
    errors = text[text.index('<section id="errors">') :]
    assert errors.count("<tr><td") == MAX_ROWS and f"the last {MAX_ROWS} of 1000 errors" in errors
    assert "failure 4995" in errors and "failure 0<" not in errors


def test_report_command_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing"), "-o", str(tmp_path / "a.html")]) == 2
    assert "not found" in capsys.readouterr().err
    write_report(tmp_path / "saliency", '{"schema": "lightning-saliency/report/v1", "audits": [')
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "a.html")]) == 2
    assert "truncated" in capsys.readouterr().err
    assert not (tmp_path / "a.html").exists()


def test_report_default_output_and_no_maps(tmp_path, capsys):
    log_dir = make_run(tmp_path, n_epochs=3, with_maps=False)
    assert main(["report", str(log_dir)]) == 0
    out = log_dir / "saliency" / "audit.html"
    assert str(out) in capsys.readouterr().out
    doc = assert_safe(out.read_text())
    assert not doc.find("input", id="epoch-slider") and "No maps were saved" in out.read_text()


# ----------------------------------------------------------------------------------------------- browser


def _require_chromium() -> str:
    exe = find_chromium()
    if exe is None:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail("chromium is not installed and CI=true: the page must be checked in a real browser "
                        "(apt-get install -y chromium; .ci/run installs it)")
        pytest.skip("chromium not installed (apt-get install -y chromium); with CI=true this test fails instead")
    return exe


def test_page_in_headless_chromium(page_file, tmp_path):
    """Loads with no console error and no network request, the slider changes the epoch, screenshot produced."""
    exe = _require_chromium()
    url = page_file.resolve().as_uri()
    with Browser(exe, width=1200, height=900) as b:
        b.open(url)
        assert b.problems() == []
        requests = b.requests()
        assert requests[0] == url
        assert all(u == url or u.startswith("data:image/png;base64,") for u in requests), [u[:80] for u in requests]
        assert len(requests) > 10  # the inline images were loaded (as data: URIs), not skipped

        def state() -> dict:
            return b.evaluate(
                "(() => { const vis = [...document.querySelectorAll('.epoch-view')].filter(v => !v.hidden);"
                " const imgs = vis.flatMap(v => [...v.querySelectorAll('img')]);"
                " return {label: document.getElementById('epoch-label').textContent,"
                " epochs: vis.map(v => v.dataset.epoch), visible: vis.length,"
                " shown: vis.map(v => v.getBoundingClientRect().height > 0),"
                " loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length, imgs: imgs.length}; })()"
            )

        s = state()
        assert s["label"] == "epoch 5" and s["epochs"] == ["5", "5"] and all(s["shown"])
        assert s["imgs"] == 24 and s["loaded"] == 24
        # a real click at the slider's left end moves it to the first epoch
        rect = b.evaluate("(() => { const r = document.getElementById('epoch-slider').getBoundingClientRect();"
                          " return [r.left, r.top, r.width, r.height]; })()")
        x, y = rect[0] + 2, rect[1] + rect[3] / 2
        for kind in ("mousePressed", "mouseReleased"):
            b.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
        s = state()
        assert s["label"] == "epoch 0" and s["epochs"] == ["0", "0"] and all(s["shown"]) and s["loaded"] == 24
        # the keyboard moves it one epoch at a time
        for kind in ("rawKeyDown", "keyUp"):
            b.call("Input.dispatchKeyEvent", type=kind, key="ArrowRight", code="ArrowRight",
                   windowsVirtualKeyCode=39)
        assert state()["epochs"] == ["1", "1"]
        assert b.problems() == []
        shot = b.screenshot(tmp_path / "report.png")
        # the detectors work: an external image is blocked by the CSP and reported; without a CSP it is requested
        bad = tmp_path / "bad.html"
        bad.write_text(f'<meta http-equiv="Content-Security-Policy" content="{CSP}"><img src="http://127.0.0.1:9/x.png">')
        b.open(bad.resolve().as_uri())
        assert any("Content Security Policy" in p for p in b.problems())
        leaky = tmp_path / "leaky.html"
        leaky.write_text('<img src="http://127.0.0.1:9/y.png">')
        b.open(leaky.resolve().as_uri())
        assert "http://127.0.0.1:9/y.png" in b.requests()
        # the hostile report's page runs no injected script (no alert dialog), requests nothing, logs nothing
        hostile = tmp_path / "hostile.html"
        assert main(["report", str(_hostile_report(tmp_path)), "-o", str(hostile)]) == 0
        b.events.clear()
        b.open(hostile.resolve().as_uri())
        assert b.problems() == []
        assert not [e for e in b.events if e["method"] == "Page.javascriptDialogOpening"]
        assert all(u.startswith("data:image/png;base64,") for u in b.requests()[1:])
        assert b.evaluate("document.querySelectorAll('script').length") == 1
        assert b.evaluate("document.getElementById('epoch-label').textContent") == "epoch 5"
    from PIL import Image

    im = np.asarray(Image.open(shot).convert("RGB"))
    assert im.shape == (900, 1200, 3) and im.std() > 20  # a real rendering, not a blank page
    target = os.environ.get("LIGHTNING_SALIENCY_SCREENSHOT")
    if target:  # refresh docs/report-screenshot.png: LIGHTNING_SALIENCY_SCREENSHOT=docs/report-screenshot.png
        Path(target).write_bytes(shot.read_bytes())


def test_a_periodic_metric_gets_dots_where_it_was_measured(tmp_path):
    """stability is measured at audits 0 and 3 of 5 only: its curve gets a dot on each value, a metric measured
    at every audit gets none."""
    audits = [{"epoch": e, "global_step": 10 * e,
               "metrics": {"gradcam/spurious_mass": 0.1 * e, **({"gradcam/stability": 0.9} if e in (0, 3) else {})}}
              for e in range(5)]
    html = render_page({"schema": "lightning-saliency/report/v1", "audits": audits}, tmp_path)
    stability = re.search(r'<svg[^>]*aria-label="stability".*?</svg>', html, re.S).group(0)
    mass = re.search(r'<svg[^>]*aria-label="spurious_mass".*?</svg>', html, re.S).group(0)
    line = re.search(r'<polyline points="([^"]*)"', stability).group(1).split()
    dots = re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)" r="2.5"', stability)
    assert len(line) == 2 and [f"{x},{y}" for x, y in dots] == line
    assert "<circle" not in mass
