"""How each built-in row of the metric registry computes: small adapters from an
:class:`~lightning_saliency.metrics.registry.AuditContext` (the audit's maps, probe, model and spec) to the
formula functions of the ``metrics/`` modules, which stay pure functions over tensors.

A row's ``compute(ctx, methods)`` returns ``{method + extra_key: per-image values}``; a probe-level summary
``summary(result, probe, method)`` returns one number. The formulas are imported when a metric runs, never when
the registry is read (reading it stays torch-free).

Example:
    >>> _DISPARITY_READS
    ('spurious_mass', 'object_mass')
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

    from .registry import AuditContext


def _f() -> Any:
    """The formulas (imported when a metric runs, never when the registry is read)."""
    from lightning_saliency import metrics

    return metrics


# -- the built-in rows' compute and summary functions -----------------------------------------------------------
def _mask_metric(formula: str, masks: str) -> Callable[[AuditContext, tuple[str, ...]], dict[str, Tensor]]:
    def compute(ctx: AuditContext, methods: tuple[str, ...]) -> dict[str, Tensor]:
        return {m: getattr(_f(), formula)(ctx.magnitude(m), getattr(ctx.probe, masks)) for m in methods}

    return compute


def _drift(ctx: AuditContext, methods: tuple[str, ...]) -> dict[str, Tensor]:
    out = {}
    for method in methods:
        m = ctx.magnitude(method)
        ranks = ctx.ranks[method] = _f().map_ranks(m)  # compared now, and kept for the next audit
        prev = None
        if ctx.previous_ranks is not None and method in ctx.previous_ranks:
            prev = ctx.previous_ranks[method].to(m.device)
        elif ctx.previous_maps is not None and method in ctx.previous_maps \
                and ctx.previous_maps[method].shape == m.shape:
            prev = _f().map_ranks(ctx.previous_maps[method].to(m.device))
        if prev is not None and prev.shape == ranks.shape:
            out[method] = _f().drift_from_ranks(prev, ranks)
    return out


def _noisy(formula: str, images: str) -> Callable[[AuditContext, tuple[str, ...]], dict[str, Tensor]]:
    def compute(ctx: AuditContext, methods: tuple[str, ...]) -> dict[str, Tensor]:
        import torch

        rows, s, positions = ctx.rows(images), ctx.spec, ctx.positions(images)
        kw = dict(k=s.stability_k, sigma=s.stability_sigma) if formula == "stability" else {}

        def explain(x: Tensor, t: Tensor) -> dict[str, Tensor]:
            # one call over every noisy copy (batch_size=None below), the m copies of each image together, which
            # explain runs `batch_size` at a time. A method with draws of its own (smoothgrad) keys copy d of
            # the image at probe position p as row p * m + d: its row in the whole probe's call, as the subsets
            # are the probe's first images. The noise of a copy is then the same in a shard, and chunked or not.
            m = x.shape[0] // len(positions)
            return ctx.explain(x, t, methods, positions=positions.repeat_interleave(m) * m
                               + torch.arange(m).repeat(len(positions)))

        return getattr(_f(), formula)(  # one pass serves every method's noisy maps
            explain, ctx.probe.inputs[rows], ctx.targets[rows], seed=s.seed, positions=positions,
            maps={m: ctx.maps[m][rows] for m in methods}, batch_size=None, **kw)

    return compute


def _rise(formula: str) -> Callable[[AuditContext, tuple[str, ...]], dict[str, Tensor]]:
    def compute(ctx: AuditContext, methods: tuple[str, ...]) -> dict[str, Tensor]:
        rows, out = ctx.rows("expensive"), {}
        for m in methods:
            r = getattr(_f(), formula)(ctx.model, ctx.probe.inputs[rows], ctx.targets[rows], ctx.maps[m][rows].abs(),
                                       seed=ctx.spec.seed, batch_size=ctx.spec.batch_size or 64,
                                       positions=ctx.positions("expensive"))
            out[m] = r["auc"]
            if "random_auc" in r:
                out[m + "_random"] = r["random_auc"]
        return out

    return compute


def _infidelity(ctx: AuditContext, methods: tuple[str, ...]) -> dict[str, Tensor]:
    rows = ctx.rows("expensive")
    return {m: _f().infidelity(ctx.model, ctx.probe.inputs[rows], ctx.targets[rows], ctx.maps[m][rows],
                               seed=ctx.spec.seed, batch_size=ctx.spec.batch_size,
                               positions=ctx.positions("expensive")) for m in methods}


def _completeness_gap(ctx: AuditContext, methods: tuple[str, ...]) -> dict[str, Tensor]:
    rows, inputs, out = ctx.rows("expensive"), ctx.probe.inputs, {}
    ig_baseline = ctx.spec.method_options.get("ig_baseline")
    for m in methods:
        # IG is complete with respect to its own baseline; input x gradient to zero
        base = ig_baseline if m == "integrated_gradients" and ig_baseline is not None else 0.0
        if hasattr(base, "shape") and base.shape[:1] == inputs.shape[:1]:
            base = base[rows]
        out[m] = _f().completeness_gap(ctx.model, inputs[rows], ctx.targets[rows], ctx.maps[m][rows],
                                       baseline=base, batch_size=ctx.spec.batch_size)
    return out


def _randomization(ctx: AuditContext, methods: tuple[str, ...]) -> dict[str, Tensor]:
    rows, out, positions = ctx.rows("expensive"), {}, ctx.positions("expensive")
    for m in methods:
        out[m] = _f().randomization_similarity(
            ctx.model, lambda mdl, x, t, m=m: ctx.explain(x, t, (m,), model=mdl, positions=positions)[m],
            ctx.probe.inputs[rows], ctx.targets[rows], maps=ctx.maps[m][rows], seed=ctx.spec.seed)["all"]
    return out


def _fragility(ctx: AuditContext, methods: tuple[str, ...]) -> dict[str, Tensor]:
    rows, inputs, s, out = ctx.rows("expensive"), ctx.probe.inputs, ctx.spec, {}
    positions = ctx.positions("expensive")  # they key the random signs and the methods' own draws
    for m in methods:  # the top-k attack and its random-sign control, maps measured on the real model
        r = _f().fragility_scores(
            ctx.model, inputs[rows], ctx.targets[rows], method=m, maps=ctx.maps[m][rows],
            explain=lambda x, t, m=m: ctx.explain(x, t, (m,), positions=positions)[m], layer=s.layer,
            reshape=s.reshape, seed=s.seed, batch_size=s.batch_size, positions=positions)
        out[m], out[m + "_random"] = r["fragility"], r["random"]
    return out


def _recalibrated(parts: Mapping[str, Tensor]) -> Tensor:
    """An agreement row's values on the merged shards: calibrated over the whole probe's scored images."""
    return _f().calibrated_value(parts)


def _agreement(reference: str) -> Callable[[AuditContext, tuple[str, ...]], dict[str, Tensor]]:
    """Every method's maps against two runs of ``reference`` (``shapley`` or ``lime``) with the audit's options
    and seeds ``s`` and ``s + 1``, once per audit (``one_pass``); the first run is the audit's own map when
    ``reference`` is audited. The reference itself is scored by its second run: its raw values are the ceiling."""

    def compute(ctx: AuditContext, methods: tuple[str, ...]) -> dict[str, Tensor]:
        import dataclasses

        from ..methods.registry import get_method
        from ..patches import check_grid, pool
        from .agreement import DEFAULT_K

        rows, options = ctx.rows("expensive"), ctx.spec.method_options
        x, t = ctx.probe.inputs[rows], ctx.targets[rows]
        opts = {**get_method(reference).options, **options}
        seed = opts[f"{reference}_seed"]

        def run(s: int) -> Tensor:
            spec = dataclasses.replace(ctx.spec, method_options={**options, f"{reference}_seed": s})
            return spec.explain(ctx.model, x, t, (reference,))[reference]

        first = ctx.maps[reference][rows] if reference in ctx.maps else run(seed)
        second = run(seed + 1)
        grid = check_grid(opts[f"{reference}_grid"], *x.shape[-2:], f"{reference}_grid")
        k = max(1, min(DEFAULT_K, grid[0] * grid[1] // 2))
        ref, again = pool(first.abs(), grid), pool(second.abs(), grid)
        out: dict[str, Tensor] = {}
        for m in methods:
            cells = again if m == reference else pool(ctx.magnitude(m)[rows], grid)
            r = _f().agreement(cells, ref, again, k=k, seed=ctx.spec.seed, positions=ctx.positions("expensive"))
            out.update({m + (f"_{key}" if key != "value" else ""): v for key, v in r.items()})
        return out

    return compute


def _spurious(which: str) -> Callable[[AuditContext, tuple[str, ...]], dict[str, Tensor]]:
    def compute(ctx: AuditContext, methods: tuple[str, ...]) -> dict[str, Tensor]:
        import torch

        p, s = ctx.probe, ctx.spec
        if which == "erase":
            return {"": _f().spurious_erase_drop(ctx.model, p.inputs, p.targets, p.spurious_masks,
                                                 batch_size=s.batch_size)}
        whole, pool, positions = ctx.full_probe, None, None
        if whole is not None:  # a shard: donors from the whole probe, found by the shard's probe indices
            where = {int(v): i for i, v in enumerate(whole.indices.tolist())}
            missing = [int(v) for v in p.indices.tolist() if int(v) not in where]
            if missing:
                raise ValueError(f"probe indices {missing[:5]} of the shard are not in full_probe; pass the probe "
                                 "the shard was cut from")
            pool = (whole.inputs, whole.targets, whole.spurious_masks)
            positions = torch.tensor([where[int(v)] for v in p.indices.tolist()], dtype=torch.long)
        r = _f().spurious_flip_rate(ctx.model, p.inputs, p.targets, p.spurious_masks, seed=s.seed, pool=pool,
                                    positions=positions, batch_size=s.batch_size)
        return {"": r[which]}

    return compute


def _quiet(fn: Callable[[], dict]) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


_DISPARITY_READS = ("spurious_mass", "object_mass")  # the per-image statistic: spurious mass, else object mass


def _disparity(result: Any, probe: Any, method: str) -> float | None:
    stat = next((result.per_image[k] for k in (f"{method}/{r}" for r in _DISPARITY_READS) if k in result.per_image),
                None)
    if stat is None:
        return None
    return _quiet(lambda: _f().attention_disparity(stat, probe.groups))["disparity"]


def _divergence(result: Any, probe: Any, method: str) -> float | None:
    return _quiet(lambda: _f().group_divergence(result.maps[method], probe.groups))["divergence"]
