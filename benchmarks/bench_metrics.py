"""Cost of each audit metric per probe image (issue 4, point 3).

On a small CNN (the size of the shortcut example's model: 3x32x32 inputs, 3 classes) and a probe of ``--images``
images, it times the maps themselves (``attribute(methods=("gradcam", "gradient"))``, one shared pass) and
every metric of ``lightning_saliency.metrics`` for both methods, then prints a markdown table: milliseconds
in all, milliseconds per probe image, and the ratio to the cost of the maps. The last rows add up the
default metric set of the monitor (region masses, pointing game, stability with k=4, attention disparity,
group divergence, drift), with stability scoring both methods from the same noisy passes, and the same set
without stability, which the monitor runs every ``expensive_every_n_audits`` audits and at the last one only.
``shap_agreement`` and ``lime_agreement`` run as the audit runs them: on the first ``--expensive-images``
images, two runs of the reference (``shapley`` or ``lime`` at their default settings, seeds 0 and 1) serving
both methods.

The last table is discovery and its confirmation on the find_shortcut example, timed along the monitor's own
code path: the example's model (``ShapesNet``, width 8) after one epoch on 1,200 images with the watermark on
half of the ``square`` images, its probe of 32 images per class, the audit's maps as ``audit_shard`` computes
them (Grad-CAM and gradient, the maps explaining the labels as the example does) and then
``DiscoveryAudit.__call__`` on that result, as ``SaliencyMonitor.audit`` calls it (the audit's logits reused,
one batched forward per candidate); clustering alone is timed too. Its steps alternate round after round on
the process's CPU clock, which the machine's load moves far less than wall time. ``--only discovery`` runs
that table alone.

Each figure is the median of ``--repeats`` rounds after one warm-up round. CPU by default, on the threads
torch is given (set ``OMP_NUM_THREADS`` or ``--threads``).

Usage::

    python benchmarks/bench_metrics.py                              # 64 images, 32x32
    python benchmarks/bench_metrics.py --images 16 --repeats 3      # a quick look
    python benchmarks/bench_metrics.py --size 64 --device cuda
    python benchmarks/bench_metrics.py --only shap_agreement,lime_agreement   # some rows only
    python benchmarks/bench_metrics.py --only discovery             # discovery on the find_shortcut example
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from lightning_saliency.layers import resolve_layer
from lightning_saliency.methods import attribute
from lightning_saliency.metrics import (
    UndefinedMetricWarning,
    agreement,
    attention_disparity,
    completeness_gap,
    deletion_auc,
    discover,
    drift,
    fragility_scores,
    group_divergence,
    infidelity,
    insertion_auc,
    max_sensitivity,
    pointing_game,
    randomization_similarity,
    region_mass,
    stability,
)
from lightning_saliency.patches import pool

METHODS = ("gradcam", "gradient")
DEFAULT_SET = ("object_mass", "spurious_mass", "pointing_game", "stability", "attention_disparity",
               "group_divergence", "drift")  # fmt: skip


class SmallCNN(nn.Module):
    """Three conv blocks, global average pool, linear head."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


def build(images: int, size: int, device: str, seed: int = 0):
    torch.manual_seed(seed)
    model = SmallCNN().to(device).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(images, 3, size, size, generator=g).to(device)
    masks = torch.zeros(2, images, size, size, dtype=torch.bool)
    corners = torch.randint(0, size // 2, (2, images, 2), generator=g)
    for k in range(2):
        for i in range(images):
            r, c = corners[k, i].tolist()
            masks[k, i, r : r + size // 3, c : c + size // 3] = True
    groups = ["shortcut_present" if i < images // 2 else "shortcut_absent" for i in range(images)]
    return model, x, masks[0].to(device), masks[1].to(device), groups


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stability-images", type=int, default=8,
                        help="probe images stability scores (the monitor's default: the first 8)")
    parser.add_argument("--expensive-images", type=int, default=16,
                        help="probe images the agreement metrics score (the monitor's default: the first 16)")
    parser.add_argument("--wall", action="store_true", help="time discovery on the wall clock (default: CPU time)")
    parser.add_argument("--only", default=None,
                        help="comma-separated rows to time (the maps always run), e.g. shap_agreement,lime_agreement")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UndefinedMetricWarning)

    model, x, obj, spur, groups = build(args.images, args.size, args.device)
    layer = resolve_layer(model, "auto", example_input=x[:1])
    with torch.no_grad():
        logits = model(x)  # the audit has them from its own pass
    targets = logits.argmax(1)

    def explain(inputs: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        return attribute(model, inputs, t, methods=METHODS, layer=layer)

    def explain_model(m: nn.Module, name: str) -> Callable:
        def fn(mm: nn.Module, inputs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            tl = resolve_layer(mm, layer.name)
            return attribute(mm, inputs, t, methods=(name,), layer=tl)[name]

        return fn

    maps = explain(x, targets)
    ks = min(args.stability_images, args.images)
    prev = {k: v.roll(1, dims=-1) for k, v in maps.items()}
    ixg = attribute(model, x, targets, methods=("input_x_gradient",))["input_x_gradient"]

    ke = min(args.expensive_images, args.images)

    def agreement_of(reference: str) -> Callable[[], None]:
        def run() -> None:  # as the audit does it: two reference runs, then every method against them
            xs, ts = x[:ke], targets[:ke]
            first = attribute(model, xs, ts, methods=(reference,))[reference]
            second = attribute(model, xs, ts, methods=(reference,), **{f"{reference}_seed": 1})[reference]
            ref, again = pool(first.abs(), 8), pool(second.abs(), 8)
            for m in METHODS:
                agreement(pool(maps[m][:ke].abs(), 8), ref, again)

        return run

    def each(fn: Callable[[torch.Tensor, str], object]) -> Callable[[], None]:
        return lambda: [fn(maps[m], m) for m in METHODS]

    work: dict[str, tuple[str, Callable[[], object]]] = {
        "maps (gradcam + gradient)": ("one shared pass", lambda: explain(x, targets)),
        "object_mass": ("", each(lambda m, _: region_mass(m, obj))),
        "spurious_mass": ("", each(lambda m, _: region_mass(m, spur))),
        "pointing_game": ("", each(lambda m, _: pointing_game(m, obj))),
        "stability": (f"k=4, both methods per pass, first {ks} images",
                      lambda: stability(explain, x[:ks], targets[:ks], k=4,
                                        maps={m: v[:ks] for m, v in maps.items()})),
        "attention_disparity": ("", each(lambda m, _: attention_disparity(region_mass(m, spur), groups))),
        "group_divergence": ("", each(lambda m, _: group_divergence(m, groups))),
        "drift": ("", each(lambda m, name: drift(prev[name], m))),
        "max_sensitivity": ("n=10, both methods per pass",
                            lambda: max_sensitivity(explain, x, targets, n_perturb=10, maps=maps)),
        "deletion_auc": ("T=16, + random ranking", each(lambda m, _: deletion_auc(model, x, targets, m))),
        "insertion_auc": ("T=16, + random ranking", each(lambda m, _: insertion_auc(model, x, targets, m))),
        "infidelity": ("n=10", each(lambda m, _: infidelity(model, x, targets, m, n_perturb=10))),
        "completeness_gap": ("input_x_gradient", lambda: completeness_gap(model, x, targets, ixg)),
        "randomization_similarity": ("mode=all", each(
            lambda m, name: randomization_similarity(model, explain_model(model, name), x, targets, maps=m))),
        "fragility (+ fragility_random)": ("steps=5, k=8%, eps=2% of each image's range", each(
            lambda m, name: fragility_scores(model, x, targets, name, maps=m, layer=layer))),
        "fragility_random alone": ("5 random-sign draws", each(
            lambda m, name: fragility_scores(model, x, targets, name, maps=m, layer=layer, attack=False))),
        "randomization (cascading)": ("per top-level unit", each(
            lambda m, name: randomization_similarity(
                model, explain_model(model, name), x, targets, mode="cascading", maps=m))),
        "shap_agreement": (f"8x8 cells, 16 permutations x 2 seeds, first {ke} images", agreement_of("shapley")),
        "lime_agreement": (f"8x8 cells, 500 samples x 2 seeds, first {ke} images", agreement_of("lime")),
    }  # fmt: skip

    with_discovery = not args.only or "discovery" in {name.strip() for name in args.only.split(",")}
    if args.only:
        wanted = {"maps (gradcam + gradient)", *(name.strip() for name in args.only.split(","))} - {"discovery"}
        unknown = sorted(wanted - set(work))
        if unknown:
            parser.error(f"--only: unknown rows {unknown}; choose from {', '.join(work)}")
        work = {name: row for name, row in work.items() if name in wanted}
    seconds = {name: timed(fn, args.repeats, args.device) for name, (_, fn) in work.items()}
    base = seconds["maps (gradcam + gradient)"]
    n = args.images
    print(f"# metric cost: {n} images {args.size}x{args.size}, SmallCNN, {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")  # fmt: skip
    print()
    print("| metric | settings | ms | ms / image | x maps |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, (settings, _) in work.items():
        s = seconds[name]
        print(f"| {name} | {settings} | {1e3 * s:.2f} | {1e3 * s / n:.3f} | {s / base:.2f} |")
    if not set(DEFAULT_SET) <= set(seconds):
        if with_discovery:
            discovery_cost(args.repeats, args.device, wall=args.wall)
        return
    default = sum(seconds[k] for k in DEFAULT_SET)
    print(f"| **default set** | {', '.join(DEFAULT_SET)} | {1e3 * default:.2f} | {1e3 * default / n:.3f} | "
          f"{default / base:.2f} |")  # fmt: skip
    every = sum(seconds[k] for k in DEFAULT_SET if k != "stability")
    print(f"| **default set, between periodic audits** | without stability (it reruns the model: every "
          f"5th audit and the last, by default) | {1e3 * every:.2f} | {1e3 * every / n:.3f} | {every / base:.2f} |")
    print()
    print(f"default metric set / maps = {default / base:.2f} at a periodic audit, {every / base:.2f} at the others "
          f"(issue 4 asks <= 1.5 on the shortcut example)")
    if with_discovery:
        discovery_cost(args.repeats, args.device, wall=args.wall)


def discovery_cost(repeats: int, device: str, seed: int = 0, wall: bool = False) -> float:
    """Discovery + confirmation / maps on the find_shortcut example, along the monitor's code path (module
    docstring); prints a small table and returns the ratio."""
    import pytorch_lightning as pl

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from examples.find_shortcut import planted
    from examples.shortcut_shapes import ShapesNet
    from lightning_saliency import ProbeSet
    from lightning_saliency.audit import AuditSpec, audit_shard
    from lightning_saliency.discovery_audit import DiscoveryAudit
    from lightning_saliency.guard import SideEffectGuard

    pl.seed_everything(seed, verbose=False)
    train = planted(1200, 0.5, False, seed)
    items = [{"image": x, "label": int(t)} for x, t in zip(train["inputs"], train["labels"])]
    model = ShapesNet(lr=2e-3, width=8)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, torch.utils.data.DataLoader(items, batch_size=32, shuffle=True))
    model = model.to(device)
    data = planted(0, 0.5, False, seed + 1, per_class=32)
    probe = ProbeSet(data["inputs"], data["labels"])
    moved = probe.to(device)
    spec = AuditSpec(methods=("gradcam", "gradient"), metrics=(), target="label", seed=seed)
    spec.layer = resolve_layer(model, "auto", example_input=moved.inputs[:1])
    audit = DiscoveryAudit(True, None, None, spec.methods, seed)

    def maps():
        with SideEffectGuard(model):
            return audit_shard(model, moved, spec, expensive=False)

    result = maps()
    section = audit(model, probe, result, spec, {})
    cands = section["candidates"]
    labels = probe.targets
    steps = {"maps": maps, "all": lambda: audit(model, probe, result, spec, {}),
             "cluster": lambda: discover(result.maps[audit.method], labels, seed=seed)}
    # the steps alternate round after round, on this process's CPU clock (wall time on a GPU), so that the
    # machine's load moves them alike; each figure is the median over the rounds, the ratio too
    clock = time.perf_counter if device.startswith("cuda") or wall else time.process_time
    rounds: dict[str, list[float]] = {k: [] for k in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(max(3, 2 * repeats)):
        for k, step in steps.items():
            _sync(device)
            start = clock()
            step()
            _sync(device)
            rounds[k].append(clock() - start)
    t_maps, t_all, t_cluster = (statistics.median(rounds[k]) for k in steps)
    ratio = statistics.median(a / m for a, m in zip(rounds["all"], rounds["maps"]))
    n = len(probe)
    print()
    print(f"# discovery on the find_shortcut example: ShapesNet (width 8) after 1 epoch, probe {n} images 32x32, "
          f"{len(cands)} candidate(s), {sum(bool(c['confirmed']) for c in cands)} confirmed, "
          f"{cands[0]['recipients'] if cands else 0} recipients each")
    print()
    print("| step | ms | x maps |")
    print("| --- | ---: | ---: |")
    print(f"| maps (gradcam + gradient, audit_shard) | {1e3 * t_maps:.2f} | 1.00 |")
    print(f"| discovery + confirmation (DiscoveryAudit, as the monitor calls it) | {1e3 * t_all:.2f} | "
          f"{t_all / t_maps:.2f} |")
    print(f"| of which clustering (discover on {audit.method} maps) | {1e3 * t_cluster:.2f} | "
          f"{t_cluster / t_maps:.2f} |")
    print()
    print(f"discovery + confirmation / maps = {ratio:.2f} on the example, the median of "
          f"{len(rounds['maps'])} alternating rounds ({'wall' if clock is time.perf_counter else 'CPU'} time; "
          f"issue 12 asks <= 0.5)")
    return ratio


if __name__ == "__main__":
    main()
