"""The method scorecard: which of these maps should I trust for this model?

:func:`scorecard` scores every method once on a probe set with the metrics that judge a map rather than a model:
faithfulness (``deletion_auc``, ``insertion_auc``, each next to its random-ranking control, and ``infidelity``),
``stability``, the randomization sanity check (``randomization_similarity``), agreement with the patch-grid
explanations (``shap_agreement``, ``lime_agreement``, when registered), ``fragility`` (next to its random-noise
control) and the measured cost per image. The default set is derived from the metric registry: the rows with
``scorecard=True`` (:class:`~lightning_saliency.metrics.registry.MetricSpec`).

The numbers are the audit's own: the scorecard runs :func:`lightning_saliency.audit.audit_shard` and
:func:`~lightning_saliency.audit.summarize` (the code path of :class:`~lightning_saliency.SaliencyMonitor`), one
metric at a time so that a failure is attributed to its metric, inside a
:class:`~lightning_saliency.guard.SideEffectGuard` (the model's flags, gradients and random states are left as
found). ``cost_ms_per_image`` is measured: the wall-clock time of one
:func:`~lightning_saliency.attribute` call of the method alone on the whole probe (after a warm-up), divided
by the number of images.

Null, never fake: a value that could not be computed is ``None``, with its reason in :attr:`Scorecard.reasons`.
The best method per column (ties: all of them; ``None`` is never best) follows the registry's direction;
the controls (``*_random``) and other reference keys are shown but not ranked.

Reading a stored scorecard (the report's ``scorecard`` section, ``lightning-saliency show --scorecard``, the HTML
page) never imports torch: only :func:`scorecard` does, when it runs.

Example:
    >>> card = Scorecard.from_dict({"columns": [{"name": "stability", "higher_is_better": True}],
    ...                             "rows": [{"method": "gradcam", "stability": 0.9},
    ...                                      {"method": "gradient", "stability": 0.4}]})
    >>> card.best()
    {'stability': ['gradcam']}
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["COST", "Column", "Scorecard", "best_per_column", "default_metrics", "scorecard"]

COST = "cost_ms_per_image"
_COST_DOC = ("measured: wall-clock ms of one attribute() call of the method alone on the probe, divided by the "
             "number of images")
_REFERENCE = "_random"  # the controls shown next to their metric: random ranking (RISE), random noise (fragility)


@dataclass(frozen=True)
class Column:
    """One column of the scorecard.

    ``kind``: ``"metric"`` (a registry row's value, ranked by ``higher_is_better``), ``"reference"`` (its
    random control, ``<metric>_random``: shown next to it, not ranked), ``"detail"`` (another extra key of the
    row, e.g. the raw agreement values: kept in :meth:`Scorecard.to_dict`, not shown) or ``"cost"``.
    """

    name: str
    higher_is_better: bool | None
    kind: str = "metric"
    of: str | None = None  # the metric a reference or detail belongs to
    doc: str = ""

    @property
    def ranked(self) -> bool:
        """Whether a best method is marked in this column."""
        return self.kind in ("metric", "cost") and self.higher_is_better is not None


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def best_per_column(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> dict[str, list[str]]:
    """The best method(s) of each ranked column: the highest (or lowest) finite value; ties: all of them;
    ``None``/NaN are never best; a column where no method has a value has no best.

    Example:
        >>> cols = [Column("deletion_auc", False), Column("stability", True), Column("drift", None)]
        >>> best_per_column([{"method": "a", "deletion_auc": 0.2, "stability": None, "drift": 1.0},
        ...                  {"method": "b", "deletion_auc": 0.2, "stability": 0.5, "drift": 0.0}], cols)
        {'deletion_auc': ['a', 'b'], 'stability': ['b']}
    """
    out: dict[str, list[str]] = {}
    for col in columns:
        if not col.ranked:
            continue
        values = [(str(r.get("method")), v) for r in rows if (v := _num(r.get(col.name))) is not None]
        if not values:
            continue
        target = max(v for _, v in values) if col.higher_is_better else min(v for _, v in values)
        out[col.name] = [m for m, v in values if math.isclose(v, target, rel_tol=1e-9, abs_tol=1e-12)]
    return out


@dataclass
class Scorecard:
    """One row per method: ``{"method", <column>: value | None, ..., "cost_ms_per_image"}``.

    Attributes:
        columns: the :class:`Column` s, in the registry's chart order, the cost last.
        rows: one dict per method.
        reasons: ``{method: {column: why it is None}}``.
        notes: what the whole scorecard should be read with (metrics skipped, failures).
        info: where it comes from: ``images`` (probe, stability and expensive subsets), ``device``, ``epoch``...
    """

    columns: list[Column]
    rows: list[dict[str, Any]]
    reasons: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return [str(r.get("method")) for r in self.rows]

    def best(self) -> dict[str, list[str]]:
        """:func:`best_per_column` of this card."""
        return best_per_column(self.rows, self.columns)

    def value(self, method: str, column: str) -> float | None:
        """One cell (``None`` when absent or not a finite number)."""
        return next((_num(r.get(column)) for r in self.rows if r.get("method") == method), None)

    def shown(self) -> list[tuple[Column, Column | None]]:
        """The columns a table shows: each metric with its random control (or ``None``), then the cost."""
        refs = {c.of: c for c in self.columns if c.kind == "reference"}
        return [(c, refs.get(c.name)) for c in self.columns if c.kind in ("metric", "cost")]

    # -- JSON ---------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (the report's ``scorecard`` section); non-finite values are ``None``."""
        return {
            "columns": [{"name": c.name, "higher_is_better": c.higher_is_better, "kind": c.kind, "of": c.of,
                         "doc": c.doc} for c in self.columns],
            "rows": [{k: (_num(v) if k != "method" else str(v)) for k, v in r.items()} for r in self.rows],
            "best": self.best(),
            "reasons": {m: dict(r) for m, r in self.reasons.items()},
            "notes": list(self.notes),
            **{k: v for k, v in self.info.items() if k not in ("columns", "rows", "best", "reasons", "notes")},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scorecard:
        """Rebuild a card from :meth:`to_dict` (a report's section); malformed parts are dropped, never raised on,
        and the best methods are recomputed from the values and directions.

        Example:
            >>> Scorecard.from_dict({"rows": "junk"}).rows
            []
        """
        data = data if isinstance(data, Mapping) else {}
        columns = []
        for c in data.get("columns") if isinstance(data.get("columns"), list) else []:
            if isinstance(c, Mapping) and isinstance(c.get("name"), str):
                hib = c.get("higher_is_better")
                kind = c.get("kind") if c.get("kind") in ("metric", "reference", "detail", "cost") else "metric"
                of = c.get("of") if isinstance(c.get("of"), str) else None
                columns.append(Column(c["name"], hib if hib in (True, False) else None, kind, of,
                                      str(c.get("doc") or "")))
        names = {c.name for c in columns}
        rows = [{"method": str(r["method"]), **{k: _num(v) for k, v in r.items() if k in names}}
                for r in (data.get("rows") if isinstance(data.get("rows"), list) else [])
                if isinstance(r, Mapping) and isinstance(r.get("method"), str)]
        raw = data.get("reasons") if isinstance(data.get("reasons"), Mapping) else {}
        reasons = {str(m): {str(k): str(v) for k, v in r.items()} for m, r in raw.items() if isinstance(r, Mapping)}
        notes = [str(n) for n in data.get("notes")] if isinstance(data.get("notes"), list) else []
        info = {k: v for k, v in data.items() if k not in ("columns", "rows", "best", "reasons", "notes")}
        return cls(columns, rows, reasons, notes, info)

    # -- text ---------------------------------------------------------------------------------------------------
    def to_text(self) -> str:
        """A fixed-width table for the terminal: one line per metric (methods are few, metrics many), one
        column per method; ``*`` marks the best of each line, ``(r ...)`` is the random control.

        Example:
            >>> card = Scorecard([Column("stability", True)], [{"method": "a", "stability": 0.9},
            ...                                                 {"method": "b", "stability": None}])
            >>> print(card.to_text())  # doctest: +NORMALIZE_WHITESPACE
            scorecard: which map to trust (* best of the line; n/a: not computed, see the reasons)
            metric     better  a       b
            stability  high    0.9 *   n/a
            reasons:
              b/stability: not computed
        """
        best = self.best()
        methods = self.methods

        def cell(col: Column, ref: Column | None, method: str) -> str:
            v = self.value(method, col.name)
            text = "n/a" if v is None else f"{v:.4g}"
            if ref is not None:
                r = self.value(method, ref.name)
                text += f" (r {'n/a' if r is None else f'{r:.3g}'})"
            return text + (" *" if method in best.get(col.name, []) else "")

        better = {True: "high", False: "low", None: "watch"}
        table = [["metric", "better", *methods]]
        for col, ref in self.shown():
            table.append([col.name, better[col.higher_is_better], *(cell(col, ref, m) for m in methods)])
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        head = "scorecard: which map to trust (* best of the line; n/a: not computed, see the reasons)"
        images = self.info.get("images") if isinstance(self.info.get("images"), Mapping) else {}
        if images:
            head += "\n" + ", ".join(f"{k} images: {v}" for k, v in images.items())
        lines = [head, *("  ".join(f"{v:<{widths[i]}}" for i, v in enumerate(r)).rstrip() for r in table)]
        if any(ref is not None for _, ref in self.shown()):
            lines.append("(r x): the random control of the same metric (a map worth trusting beats it)")
        if any(c.kind == "cost" for c in self.columns):
            lines.append(f"{COST}: {_COST_DOC}")
        missing = [(m, c.name) for c, _ in self.shown() for m in methods if self.value(m, c.name) is None]
        if missing:
            lines.append("reasons:")
            lines += [f"  {m}/{c}: {self.reasons.get(m, {}).get(c, 'not computed')}" for m, c in missing[:40]]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def default_metrics() -> tuple[str, ...]:
    """The scorecard's default metric set: the registry rows marked ``scorecard=True``, in chart order.

    Example:
        >>> default_metrics()[:3]
        ('stability', 'deletion_auc', 'insertion_auc')
    """
    from .metrics.registry import specs

    return tuple(s.name for s in specs() if s.scorecard)


def _columns(metrics: Sequence[str]) -> list[Column]:
    from .metrics.registry import get_metric

    out = []
    for name in metrics:
        row = get_metric(name)
        out.append(Column(name, row.higher_is_better, "metric", None, row.doc))
        for suffix in row.extra_keys:
            out.append(Column(name + suffix, row.higher_is_better, "reference" if suffix == _REFERENCE else "detail",
                              name, f"{name}: {suffix.lstrip('_')}"))
    return [*out, Column(COST, False, "cost", None, _COST_DOC)]


def _on_device(model: Any, probe: Any) -> Any:
    """The probe on the model's device, in its floating dtype."""
    from .probe import ProbeSet

    param = next(model.parameters(), None)
    if param is None:
        return probe
    out = probe.to(param.device)
    if param.is_floating_point() and out.inputs.dtype != param.dtype:
        out = ProbeSet(out.inputs.to(param.dtype), out.targets, out.groups, out.object_masks, out.spurious_masks,
                       indices=out.indices)
    return out


def _error_text(errors: Sequence[Mapping[str, Any]]) -> str:
    return "; ".join(f"{e.get('type')}: {str(e.get('message'))[:200]}" for e in errors[:3])


def score(model: Any, probe: Any, spec: Any, on_error: str = "warn", notes: Sequence[str] = ()) -> Scorecard:
    """The scorecard of ``model`` on ``probe`` with an :class:`~lightning_saliency.audit.AuditSpec` (its
    methods, metrics, layer and options): what :func:`scorecard` and the monitor's ``scorecard=True`` run."""
    import dataclasses

    import torch

    from .audit import audit_shard, summarize
    from .guard import SideEffectGuard
    from .layers import TargetLayer, resolve_layer
    from .methods.registry import needs_layer
    from .metrics.registry import missing_key_hint

    probe_here = _on_device(model, probe)
    n = len(probe_here)
    columns = _columns(spec.metrics)
    reasons: dict[str, dict[str, str]] = {m: {} for m in spec.methods}
    values: dict[str, dict[str, Any]] = {m: {"method": m} for m in spec.methods}
    with SideEffectGuard(model):
        if any(needs_layer(m) for m in spec.methods) and not isinstance(spec.layer, TargetLayer):
            layer = resolve_layer(model, spec.layer, reshape=spec.reshape, example_input=probe_here.inputs[:2],
                                  output=spec.output)
            spec = dataclasses.replace(spec, layer=layer)
        maps_only = audit_shard(model, probe_here, dataclasses.replace(spec, metrics=()), on_error=on_error)
        ok = tuple(m for m in spec.methods if m in maps_only.maps)
        for m in spec.methods:
            if m not in ok:
                why = _error_text([e for e in maps_only.errors if e.get("method") in (m, None)])
                reasons[m] = {c.name: f"the method failed ({why or 'no map'})" for c in columns}
        accuracy = summarize(maps_only, probe_here, dataclasses.replace(spec, metrics=())).get("probe/accuracy")
        for name in spec.metrics if ok else ():
            one = dataclasses.replace(spec, methods=ok, metrics=(name,))
            result = audit_shard(model, probe_here, one, on_error=on_error)
            summary = summarize(result, probe_here, one)
            for m in ok:
                for col in (c for c in columns if c.name == name or c.of == name):
                    v = summary.get(f"{m}/{col.name}")
                    values[m][col.name] = _num(v)
                    if _num(v) is not None:
                        continue
                    failed = [e for e in result.errors if e.get("method") in (m, None)]
                    if failed:
                        reasons[m][col.name] = f"failed ({_error_text(failed)})"
                    elif v is None:  # what the metric needs and this method or probe lacks, from the registry
                        mine = [k for k in summary if k.startswith(m + "/")]
                        hint = [h for h in missing_key_hint(f"{m}/{col.name}", mine).split("; ") if " needs " in h]
                        reasons[m][col.name] = f"not computed{': ' + '; '.join(hint) if hint else ''}"
                    else:
                        reasons[m][col.name] = ("undefined on every scored image (a constant or non-finite map, "
                                                "or non-finite logits)")
        cuda = probe_here.inputs.is_cuda
        targets = probe_here.targets if spec.target == "label" else None
        for m in ok:  # measured after the audits above warmed every method up
            if cuda:
                torch.cuda.synchronize(probe_here.inputs.device)
            started = time.perf_counter()
            spec.explain(model, probe_here.inputs, targets, (m,))
            if cuda:
                torch.cuda.synchronize(probe_here.inputs.device)
            values[m][COST] = 1000.0 * (time.perf_counter() - started) / max(n, 1)
    info = {"images": {"probe": n, "stability": min(n, spec.stability_images or n),
                       "expensive": min(n, spec.expensive_images or n)},
            "device": str(probe_here.inputs.device), "probe_accuracy": _num(accuracy),
            "target": spec.target, "seed": spec.seed}
    return Scorecard(columns, [values[m] for m in spec.methods], {m: r for m, r in reasons.items() if r},
                     list(notes), info)


def scorecard(model: Any, probe: Any, methods: Sequence[str] = ("gradcam", "gradient"),
              metrics: Sequence[str] | None = None, *, on_error: str = "warn", **options: Any) -> Scorecard:
    """Score every method once on ``probe``: one row per method, the best per column marked.

    Args:
        model: a classifier (``forward(x) -> logits``); left exactly as found.
        probe: a :class:`~lightning_saliency.ProbeSet` (moved to the model's device for the run).
        methods: the methods to compare (registered methods too).
        metrics: the columns; default :func:`default_metrics` (the registry rows marked ``scorecard=True``).
            An unknown name is a ``ValueError`` naming the closest one.
        on_error: a metric or method that fails is ``None`` with its reason; ``"warn"`` (default) also warns,
            ``"collect"`` does not, ``"raise"`` raises.
        **options: the :class:`~lightning_saliency.audit.AuditSpec` settings: ``layer``, ``reshape``,
            ``batch_size``, ``target``, ``method_options``, ``stability_k``, ``stability_sigma``,
            ``stability_images``, ``expensive_images`` (default 16: the expensive metrics' images), ``seed``.

    Example:
        >>> import torch
        >>> from lightning_saliency import ProbeSet
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
        >>> probe = ProbeSet(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]))
        >>> card = scorecard(model, probe, methods=("gradient",), metrics=("stability",))
        >>> card.value("gradient", "stability")  # a linear model's gradient map does not depend on the input
        1.0
    """
    from .audit import AuditSpec

    chosen = default_metrics() if metrics is None else tuple(metrics)
    spec = AuditSpec(methods=tuple(methods), metrics=chosen, **options)  # unknown names: ValueError, closest named
    return score(model, probe, spec, on_error=on_error)
