"""Memory and disk that stay bounded (issue 11, point 7): the audit's peak memory on a 512-image probe against a
64-image one, and the maps files left on disk after 60 audited epochs with ``keep_maps`` at its default and with
every audit's maps kept.

**Memory.** Each case runs in a subprocess of its own (a fresh allocator, nothing shared): a torchvision
ResNet-18 (random weights, 3 classes) on the shortcut example's 64×64 images, a probe of N images with groups and
both masks, and ``SaliencyMonitor(methods=("gradcam", "gradient"))`` with its default metrics, discovery and
chunk size. The child first runs a warm-up fit with a 4-image probe (lazy imports, Lightning's first-fit set-up,
the allocator's first pools), then takes its baseline: the resident set size after the model, the data and the
N-image probe exist. It then resets the kernel's peak counter (``/proc/self/clear_refs``; without it the peak is
sampled by a thread) and runs a fit of two epochs of one 8-image training step each, audited at both epochs (the
second with drift; both with the periodic metrics and discovery's confirmation: the first audit and the last
are periodic). The figure is the peak resident set size during that fit minus the baseline: the audit's working
memory (plus one tiny training step, the same in both cases), including the maps and ranks the monitor keeps for
drift, which necessarily grow with the probe (they are printed too). The probe's own tensors are in the
baseline and are printed apart: they are the user's data and scale with N whatever the audit does.

Each case runs twice (:data:`ALLOCATORS`): under glibc's defaults, whose dynamic mmap threshold keeps freed
blocks in the heap, so the peak resident size also counts memory that is free again (fragmentation: it varies
by some 30 MiB from one run to the next), and with ``MALLOC_MMAP_THRESHOLD_=131072``, which returns every large
block when it is freed, so that the peak follows the tensors alive at once: the working memory proper, the
figure the target is about. Both are printed.

**Disk.** A tiny fit (a 4-channel CNN at 64×64, 60 epochs of one step, a 64-image probe, methods gradcam,
gradient and input_x_gradient, the default metrics without discovery) writes one maps file per audit, as
real-sized as any run's (64 images, 64×64, float16); the figure is the size of ``saliency/maps/`` at the end,
with the default ``keep_maps`` and with ``keep_maps=None``.

Usage::

    python benchmarks/bench_memory.py              # both figures (a few minutes on 2 cores)
    python benchmarks/bench_memory.py --only memory --sizes 64 512 --compare-unchunked   # + batch_size=None
    python benchmarks/bench_memory.py --case memory --images 512       # one case, prints JSON (what a subprocess runs)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TARGET = 1.3  # the 512-image probe's working memory at most 1.3x the 64-image one's
MIB = 1024 * 1024


# -- resident memory --------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


@contextlib.contextmanager
def peak_rss() -> Iterator[dict[str, Any]]:
    """The peak resident set size inside the block, in bytes (``out["peak"]``) and how it was measured.

    Linux: the kernel's own high-water mark (``VmHWM``), reset at the start with ``/proc/self/clear_refs``;
    elsewhere a thread samples the RSS every 2 ms (a short spike between two samples can be missed)."""
    out: dict[str, Any] = {}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        exact = _status_kib("VmHWM") is not None
    except OSError:
        exact = False
    stop, samples = threading.Event(), [_rss_bytes()]
    if not exact:
        def run() -> None:
            while not stop.is_set():
                samples.append(_rss_bytes())
                stop.wait(0.002)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
    try:
        yield out
    finally:
        if exact:
            out["peak"], out["how"] = _status_kib("VmHWM") * 1024, "VmHWM after clear_refs"
        else:
            stop.set()
            thread.join()
            out["peak"], out["how"] = max(samples + [_rss_bytes()]), "RSS sampled every 2 ms"


# -- the model --------------------------------------------------------------------------------------------------
def _resnet_module() -> Any:
    import pytorch_lightning as pl
    import torch
    import torch.nn.functional as F
    import torchvision

    class ResNet(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torchvision.models.resnet18(num_classes=3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self(batch["image"]), batch["label"])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return ResNet()


def _trainer(epochs: int) -> Any:
    import pytorch_lightning as pl

    return dict(max_epochs=epochs, limit_train_batches=1, limit_val_batches=0, num_sanity_val_steps=0,
                logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                accelerator="cpu", devices=1), pl


def _probe_bytes(probe: Any) -> int:
    import torch

    return sum(t.numel() * t.element_size() for t in (probe.inputs, probe.targets, probe.object_masks,
                                                       probe.spurious_masks) if isinstance(t, torch.Tensor))


def memory_case(images: int, batch_size: int | None = 0, size: int = 64) -> dict[str, Any]:
    """One memory case, in this process: see the module docstring."""
    import torch

    from examples.shortcut_shapes import ShapesDataModule, build_probe
    from lightning_saliency import SaliencyMonitor

    torch.set_num_threads(1)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    kwargs = {} if batch_size == 0 else {"batch_size": batch_size}  # 0: the monitor's default; None: all at once
    dm = ShapesDataModule(n_train=8, n_val=8, batch_size=8, image_size=size, n_probe=max(images, 4))
    dm.setup("fit")
    probe = build_probe(dm, size=images)
    cfg, pl = _trainer(2)
    with tempfile.TemporaryDirectory() as tmp:
        warm = SaliencyMonitor(build_probe(dm, size=4), methods=("gradcam", "gradient"),
                               dirpath=os.path.join(tmp, "warm"), **kwargs)
        pl.Trainer(callbacks=[warm], **cfg).fit(_resnet_module(), datamodule=dm)
        del warm
        model = _resnet_module()
        monitor = SaliencyMonitor(probe, methods=("gradcam", "gradient"), dirpath=os.path.join(tmp, "run"), **kwargs)
        gc.collect()
        base = _rss_bytes()
        start = time.perf_counter()
        with peak_rss() as peak:
            pl.Trainer(callbacks=[monitor], **cfg).fit(model, datamodule=dm)
        seconds = time.perf_counter() - start
        records = monitor.history
    held = 0
    ref = monitor._reference
    for group in (ref.maps, ref.ranks, *ref.used):
        held += sum(t.numel() * t.element_size() for t in (group or {}).values())
    return {"images": images, "batch_size": monitor.spec.batch_size, "size": size,
            "probe_mib": _probe_bytes(probe) / MIB, "extra_mib": (peak["peak"] - base) / MIB,
            "held_mib": held / MIB, "baseline_mib": base / MIB, "seconds": seconds, "how": peak["how"],
            "audits": len(records), "errors": [e["message"][:200] for r in records for e in r["errors"]],
            "candidates": [len((r.get("discovery") or {}).get("candidates") or []) for r in records]}


def disk_case(keep_maps: Any, epochs: int = 60, size: int = 64) -> dict[str, Any]:
    """One disk case, in this process: see the module docstring. ``keep_maps="default"``: the monitor's."""
    import torch

    from examples.shortcut_shapes import ShapesDataModule, ShapesNet, build_probe
    from lightning_saliency import SaliencyMonitor

    torch.set_num_threads(1)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    kwargs = {} if keep_maps == "default" else {"keep_maps": keep_maps}
    dm = ShapesDataModule(n_train=8, n_val=8, batch_size=8, image_size=size, n_probe=64)
    cfg, pl = _trainer(epochs)
    with tempfile.TemporaryDirectory() as tmp:
        monitor = SaliencyMonitor(build_probe(dm, size=64), methods=("gradcam", "gradient", "input_x_gradient"),
                                  dirpath=tmp, discover=False, log_images=0, **kwargs)
        start = time.perf_counter()
        pl.Trainer(callbacks=[monitor], **cfg).fit(ShapesNet(width=4), datamodule=dm)
        seconds = time.perf_counter() - start
        maps_dir = os.path.join(tmp, "maps")
        names = sorted(os.listdir(maps_dir))
        total = sum(os.path.getsize(os.path.join(maps_dir, f)) for f in names)  # the thumbnails too
        files = [f for f in names if f != "probe.npz"]
        with open(os.path.join(tmp, "report.json")) as f:
            audits = json.load(f)["audits"]
    return {"keep_maps": getattr(monitor._recorder, "keep_maps", None), "epochs": epochs,
            "maps_mib": total / MIB, "files": len(files),
            "audits_with_maps": [a["epoch"] for a in audits if a.get("maps")], "seconds": seconds}


# -- the driver -------------------------------------------------------------------------------------------------
#: the two allocator settings each memory case runs under: glibc's defaults (what a process sees; its dynamic
#: mmap threshold keeps freed blocks inside the heap, so the peak also holds memory that is free again, more or
#: less of it from one run to the next) and a fixed 128 KiB threshold (every large block is returned when freed:
#: the peak follows the tensors alive at once, the audit's working memory proper)
ALLOCATORS = {"glibc defaults": {}, "freed memory returned": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def _child(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           **(env or {})}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"case {args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _memory(args: argparse.Namespace) -> bool:
    rows: dict[str, list[dict[str, Any]]] = {}
    for name, env in ALLOCATORS.items():
        rows[name] = [_child(["--case", "memory", "--images", str(n), "--batch-size", str(args.batch_size),
                              "--image-size", str(args.image_size)], env) for n in args.sizes]
    first = rows["glibc defaults"][0]
    print(f"Memory: ResNet-18 (random weights) at {args.image_size}x{args.image_size}, gradcam + gradient, the default "
          f"metrics and discovery, chunk size {first['batch_size']}, a fit of two audited epochs; peak resident "
          f"memory during the fit minus the baseline after model, data and probe exist ({first['how']})")
    print("| probe images | probe tensors MiB | working memory MiB, glibc defaults | working memory MiB, freed memory "
          "returned | of which ranks kept for drift MiB | fit s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for a, b in zip(*rows.values()):
        print(f"| {a['images']} | {a['probe_mib']:.1f} | {a['extra_mib']:.0f} | {b['extra_mib']:.0f} | "
              f"{a['held_mib']:.0f} | {a['seconds']:.1f} |")
        for r in (a, b):
            if r["errors"]:
                print(f"  audit errors with {r['images']} images: {r['errors']}")
    ratios = {name: r[1]["extra_mib"] / r[0]["extra_mib"] for name, r in rows.items()}
    print(f"working-memory ratio, {args.sizes[1]} vs {args.sizes[0]} images: "
          + ", ".join(f"{v:.2f} ({k})" for k, v in ratios.items()) + f"; target <= {TARGET} (freed memory returned)")
    if args.compare_unchunked:
        whole = _child(["--case", "memory", "--images", str(args.sizes[1]), "--batch-size", "-1",
                        "--image-size", str(args.image_size)])
        print(f"the same {args.sizes[1]}-image probe with batch_size=None (the whole probe at once, the old default), "
              f"glibc defaults: {whole['extra_mib']:.0f} MiB, {whole['extra_mib'] / first['extra_mib']:.2f}x the "
              f"{args.sizes[0]}-image figure")
    return ratios["freed memory returned"] <= TARGET


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("memory", "disk"), help="one of the two figures")
    p.add_argument("--sizes", type=int, nargs=2, default=(64, 512), help="the two probe sizes (small, large)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="SaliencyMonitor(batch_size=...); 0: its default, -1: None (the whole probe at once)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--compare-unchunked", action="store_true",
                   help="also the large probe with batch_size=None (about a minute more)")
    p.add_argument("--case", choices=("memory", "disk"), help=argparse.SUPPRESS)
    p.add_argument("--images", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--keep", default="default", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case == "memory":
        print(json.dumps(memory_case(args.images, None if args.batch_size < 0 else args.batch_size, args.image_size)))
        return 0
    if args.case == "disk":
        keep = args.keep if args.keep == "default" else None if args.keep == "none" else int(args.keep)
        print(json.dumps(disk_case(keep)))
        return 0
    ok = True
    if args.only in (None, "memory"):
        ok = _memory(args)
    if args.only in (None, "disk"):
        rows = [_child(["--case", "disk", "--keep", keep]) for keep in ("default", "none")]
        print(f"\nDisk: saliency/maps/ after {rows[0]['epochs']} audited epochs, 3 methods (gradcam, gradient, "
              "input_x_gradient), a 64-image probe at 64x64 (maps files of 64 images, 64x64, float16, and the probe "
              "thumbnails)")
        print("| keep_maps | files | MiB | fit s |")
        print("| --- | ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['keep_maps']} | {r['files']} | {r['maps_mib']:.1f} | {r['seconds']:.1f} |")
        print(f"audits with maps at keep_maps={rows[0]['keep_maps']}: epochs {rows[0]['audits_with_maps']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
