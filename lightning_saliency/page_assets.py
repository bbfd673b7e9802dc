"""The audit page's static text: its stylesheet (with the charts' rules, :data:`lightning_saliency.charts.CHART_CSS`)
and the few lines of inline JavaScript behind the epoch slider. :mod:`lightning_saliency.page` puts them inline:
the page makes no network request.

Example:
    >>> "epoch-slider" in _SCRIPT and ".badge.bad" in _STYLE
    True
"""

from __future__ import annotations

from .charts import CHART_CSS
from .page_scorecard import SCORECARD_CSS

__all__: list[str] = []

_STYLE = """
:root{color-scheme:light;--fg:#1b1f24;--muted:#5b6570;--line:#d8dde3;--bg:#fff;--soft:#f4f6f8;--bad:#c62828}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--fg);background:var(--bg)}header{padding:16px 24px;background:#14213d;color:#fff}
header h1{margin:0 0 4px;font-size:20px}header p{margin:0;color:#cfd8e3}
.badges{margin-top:8px}.badge{display:inline-block;padding:2px 8px;margin-right:6px;border-radius:10px;
background:#2c3e64;font-size:12px;color:#fff}.badge.bad{background:var(--bad)}.health{margin:4px 0}
nav{padding:6px 24px;background:var(--soft);border-bottom:1px solid var(--line)}nav a{margin-right:14px;
color:#1f4e8c;text-decoration:none}main{padding:8px 24px 32px}h2{font-size:17px;margin:22px 0 8px;
border-bottom:1px solid var(--line);padding-bottom:4px}h3{font-size:14px;margin:12px 0 6px}
.note{color:var(--muted);margin:4px 0 8px}.slider{display:flex;align-items:center;gap:12px;
position:sticky;top:0;background:var(--bg);padding:6px 0;z-index:1}.slider input{width:min(520px,60vw)}
#epoch-label{font-weight:600;min-width:90px}.cbar{height:10px;width:120px;vertical-align:middle;
image-rendering:pixelated}.tiles{display:flex;flex-wrap:wrap;gap:6px}.tile{margin:0;width:64px}
.ov{width:64px;background-size:100% 100%;background-color:#000;aspect-ratio:1/1}
.ov img{display:block;width:100%;height:100%;opacity:.5}.cap{font-size:11px;text-align:center;
color:var(--muted)}.cap.wrong{color:var(--bad);font-weight:600}""" + CHART_CSS + SCORECARD_CSS + """table{border-collapse:collapse;margin:4px 0 8px}
th,td{border:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top}thead th{background:var(--soft)}
td.num{text-align:right;font-variant-numeric:tabular-nums}td.na{color:var(--muted)}
td.msg{max-width:720px;white-space:pre-wrap;word-break:break-word}tr.sizes td,tr.sizes th{color:var(--muted)}
footer{padding:12px 24px;color:var(--muted);font-size:12px;border-top:1px solid var(--line)}
"""

_SCRIPT = """
(function () {
  var slider = document.getElementById("epoch-slider");
  if (!slider) { return; }
  var label = document.getElementById("epoch-label");
  var epochs = (slider.getAttribute("data-epochs") || "").split(",");
  function show(i) {
    var views = document.querySelectorAll(".epoch-view");
    for (var k = 0; k < views.length; k++) {
      views[k].hidden = views[k].getAttribute("data-epoch-index") !== String(i);
    }
    label.textContent = "epoch " + epochs[i];
    document.body.setAttribute("data-shown-epoch", epochs[i]);
  }
  slider.addEventListener("input", function () { show(slider.value); });
  show(slider.value);
})();
"""
