"""The audit page's "Scorecard" section: one row per method, the best method of each column marked.

Rendered from the report's ``scorecard`` section (:class:`lightning_saliency.scorecards.Scorecard`, read with
:meth:`~lightning_saliency.scorecards.Scorecard.from_dict`, which drops anything malformed); a best cell has the
class ``best`` and a visible ★, a random control is shown under its value, a ``n/a`` cell carries its reason
as a tooltip and in the list below the table. Every string goes through :func:`lightning_saliency.charts._e`.
Never imports torch.

Example:
    >>> html = section_scorecard({"scorecard": {"columns": [{"name": "stability", "higher_is_better": True}],
    ...                                         "rows": [{"method": "gradcam", "stability": 0.9}]}})
    >>> 'class="num best"' in html and "★" in html
    True
"""

from __future__ import annotations

from .charts import _e

__all__ = ["SCORECARD_CSS", "section_scorecard"]

SCORECARD_CSS = """table.scorecard td.best{background:#e6f4ea;font-weight:700}table.scorecard .mark{color:#1e7b34}
table.scorecard .ref{display:block;font-size:11px;font-weight:400;color:var(--muted)}
table.scorecard tr.better th{font-weight:400;color:var(--muted);font-size:12px}"""
_MAX_REASONS = 60


def section_scorecard(data: dict) -> str:
    """The ``<section id="scorecard">`` of report ``data`` (a note when the run has no scorecard)."""
    from .scorecards import Scorecard

    head = '<section id="scorecard"><h2>Scorecard: which map to trust?</h2>'
    raw = data.get("scorecard") if isinstance(data, dict) else None
    if not isinstance(raw, dict):
        return head + ('<p class="note">No scorecard in this run: pass SaliencyMonitor(scorecard=True) (scored '
                       "once at the end of fit), or call lightning_saliency.scorecard(model, probe).</p></section>")
    card = Scorecard.from_dict(raw)
    notes = "".join(f'<p class="note">{_e(n, 500)}</p>' for n in card.notes[:20])
    if not card.rows or not card.shown():
        return head + notes + '<p class="note">The scorecard has no rows.</p></section>'
    best, shown = card.best(), card.shown()
    images = card.info.get("images") if isinstance(card.info.get("images"), dict) else {}
    where = ", ".join(f"{_e(k, 40)} images: {_e(v, 40)}" for k, v in list(images.items())[:5])
    epoch = card.info.get("epoch")
    better = {True: "higher is better", False: "lower is better", None: "not ranked"}
    t = [f'<p class="note">Scored once{f" at epoch {_e(epoch, 20)}" if epoch is not None else ""}'
         f'{f" ({where})" if where else ""}. <span class="mark">★</span> marks the best method of each column '
         "(ties: all); under a value, its random control (a map worth trusting beats it); cost is measured "
         "(one attribution call of the method alone, per image).</p>",
         '<table class="metrics scorecard"><thead><tr><th>method</th>']
    t += [f'<th title="{_e(col.doc, 300)}">{_e(col.name, 100)}</th>' for col, _ in shown]
    t.append('</tr><tr class="better"><th>better</th>')
    t += [f"<th>{better[col.higher_is_better]}</th>" for col, _ in shown]
    t.append("</tr></thead><tbody>")
    reasons = []
    for method in card.methods[:50]:
        t.append(f"<tr><th>{_e(method, 200)}</th>")
        for col, ref in shown:
            v = card.value(method, col.name)
            if v is None:
                why = card.reasons.get(method, {}).get(col.name, "not computed")
                reasons.append((method, col.name, why))
                t.append(f'<td class="num na" title="{_e(why, 500)}">n/a</td>')
                continue
            is_best = method in best.get(col.name, [])
            cell = _e(f"{v:.4g}") + (' <span class="mark">★</span>' if is_best else "")
            if ref is not None:
                r = card.value(method, ref.name)
                cell += f'<span class="ref">random {_e("n/a" if r is None else f"{r:.3g}")}</span>'
            t.append(f'<td class="num{" best" if is_best else ""}">{cell}</td>')
        t.append("</tr>")
    t.append("</tbody></table>")
    if reasons:
        t += [f'<p class="note">n/a: {_e(m, 200)} / {_e(c, 100)}: {_e(w, 500)}</p>' for m, c, w in reasons[:_MAX_REASONS]]
        if len(reasons) > _MAX_REASONS:
            t.append(f'<p class="note">... and {len(reasons) - _MAX_REASONS} more</p>')
    return head + "".join(t) + notes + "</section>"
