"""Find a shortcut nobody annotated: discovery (SpRAy) on the maps, then confirmation by pasting.

The data are the shortcut example's shapes (``examples/shortcut_shapes.py``: square, disk, cross) near the
centre of noisy backgrounds, without its corner patch. A small bright watermark is planted in ``--p`` percent of ONE class's images (``square``), in
the training set and in the probe alike, and nobody tells the audit where it is: no masks. In ``--control``
mode the same watermark lands on ``--p`` percent of the images of every class, so it predicts nothing.

At the end of every epoch a small callback computes one method's maps of the probe
(:func:`lightning_saliency.attribute`), clusters them per class
(:func:`lightning_saliency.metrics.discover`) and tests each candidate by pasting its region onto the other
classes' images (:func:`lightning_saliency.metrics.confirm`). It prints, per epoch, the candidates, whether
they are confirmed, the members' precision and recall against the planted truth, the flip rate and its
random-region null, and the accuracy on clean validation images (no watermark anywhere).

Run it (a few seconds per epoch on 2 CPU cores)::

    python examples/find_shortcut.py --p 50 --seed 0 --out runs/find_p50.json
    python examples/find_shortcut.py --p 50 --control --out runs/find_control.json

The README's table is ``--p`` 10, 25 and 50 with ``--seed`` 0, 1, 2, and ``--control --p 50`` with ``--seed``
0 to 4, each with the defaults otherwise (4 epochs, 1200 training images, a probe of 32 images per class,
Grad-CAM maps): the JSON summaries hold the first epoch with a confirmed candidate, its members' precision
and recall against the watermarked probe images, its flip rate, both nulls and the clean accuracy then.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples.shortcut_shapes import CLASSES, ShapesNet, _shape_mask  # noqa: E402

MARK = (slice(2, 6), slice(26, 30))  # rows, cols of the watermark (a 4x4 square near the top-right corner)
MARK_VALUE = 2.5  # its brightness, every channel
SHORTCUT_CLASS = 0  # "square"


def shapes(n: int, seed: int, size: int = 32, noise: float = 0.4, jitter: float = 4.0) -> tuple[Tensor, Tensor]:
    """``n`` images of one shape each (the shortcut example's shapes and colours) near the centre (up to
    ``jitter`` pixels off), on Gaussian noise; returns ``(inputs [n, 3, size, size], labels [n])``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    x = noise * torch.randn(n, 3, size, size, generator=g)
    for i in range(n):
        r = 3.0 + 3.0 * torch.rand((), generator=g).item()
        cy, cx = (size / 2 + jitter * (2 * torch.rand(2, generator=g) - 1)).tolist()
        mask = _shape_mask(int(labels[i]), size, cy, cx, r)
        color = 0.6 + 0.8 * torch.rand(3, generator=g)
        x[i] = torch.where(mask, x[i] + color[:, None, None], x[i])
    return x, labels


def planted(n: int, p: float, control: bool, seed: int, per_class: int | None = None,
            noise: float = 0.4) -> dict[str, Tensor]:
    """Shapes with the watermark on a share ``p`` of the ``square`` images (``control``: of every class).

    ``per_class`` draws exactly that many images of each class (the probe) and marks exactly
    ``round(p · per_class)`` of each marked class; otherwise each image is marked with probability ``p``.
    Returns ``{"inputs", "labels", "marked"}``.

    Example:
        >>> d = planted(30, 0.5, False, 0, per_class=10)
        >>> int(d["marked"].sum()), bool((d["labels"][d["marked"]] == 0).all())
        (5, True)
    """
    total = n if per_class is None else 3 * per_class * 4  # enough draws to fill each class
    x, y = shapes(total, seed, noise=noise)
    g = torch.Generator().manual_seed(seed + 7919)
    if per_class is not None:
        keep = torch.cat([(y == k).nonzero()[:per_class, 0] for k in range(len(CLASSES))])
        x, y = x[keep], y[keep]
        marked = torch.zeros(len(y), dtype=torch.bool)
        for k in range(len(CLASSES)):
            if control or k == SHORTCUT_CLASS:
                idx = (y == k).nonzero()[:, 0]
                chosen = idx[torch.randperm(len(idx), generator=g)[: round(p * len(idx))]]
                marked[chosen] = True
    else:
        marked = torch.rand(len(y), generator=g) < p
        if not control:
            marked &= y == SHORTCUT_CLASS
    x[marked, :, MARK[0], MARK[1]] = MARK_VALUE
    return {"inputs": x, "labels": y, "marked": marked}


def _precision_recall(members: list[int], truth: set[int]) -> tuple[float, float]:
    hit = len(set(members) & truth)
    return (hit / len(members) if members else math.nan, hit / len(truth) if truth else math.nan)


class Discovery(pl.Callback):
    """At each epoch end: maps of the probe, discovery, confirmation; one record per epoch in ``records``."""

    def __init__(self, probe: dict[str, Tensor], clean: dict[str, Tensor], method: str = "gradcam",
                 seed: int = 0, quiet: bool = False) -> None:
        self.probe, self.clean, self.method, self.seed, self.quiet = probe, clean, method, seed, quiet
        self.records: list[dict[str, Any]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_saliency import attribute
        from lightning_saliency.guard import SideEffectGuard
        from lightning_saliency.metrics import confirm, discover

        x, y = self.probe["inputs"], self.probe["labels"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            maps = attribute(pl_module, x, y, methods=(self.method,), layer="auto")[self.method]
            found = discover(maps, y, seed=self.seed)
            tested = [confirm(pl_module, x, y, c, seed=self.seed) for c in found["candidates"]]
        with SideEffectGuard(pl_module, enable_grad=False), torch.no_grad():
            clean_acc = float((pl_module(self.clean["inputs"]).argmax(1) == self.clean["labels"]).float().mean())
        truth = set(self.probe["marked"].nonzero()[:, 0].tolist())
        confirmed = [c for c in tested if c["confirmed"]]
        best = max(confirmed, key=lambda c: c["flip_rate"]) if confirmed else None
        precision, recall = _precision_recall(best["members"], truth) if best else (math.nan, math.nan)
        record = {
            "epoch": trainer.current_epoch, "clean_val_acc": clean_acc, "too_small": found["too_small"],
            "confirmed": len(confirmed), "precision": precision, "recall": recall,
            **{k: best[k] if best else None for k in ("flip_rate", "null_flip_rate", "rest_flip_rate")},
            "candidates": [{k: v for k, v in c.items() if k != "mask"} for c in tested],
        }
        self.records.append(record)
        if not self.quiet:
            print(f"epoch {record['epoch']}: clean val acc {clean_acc:.3f}, {len(tested)} candidate(s), "
                  f"{len(confirmed)} confirmed")
            for c in tested:
                p, r = _precision_recall(c["members"], truth)
                print(f"   class {CLASSES[c['class']]:<6} {len(c['members']):>2} members  region {c['region']}  "
                      f"score {c['score']:.2f}  flip {c['flip_rate']:.2f} (nulls: random region "
                      f"{c['null_flip_rate']:.2f}, rest of class {c['rest_flip_rate']:.2f})  "
                      f"erase drop {c['erase_accuracy_drop']:.2f}  precision {p:.2f} recall {r:.2f}  "
                      f"{'CONFIRMED' if c['confirmed'] else 'not confirmed'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--p", type=float, default=50.0, help="percent of the square images that carry the watermark")
    ap.add_argument("--control", action="store_true", help="the watermark lands on images of every class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--train-size", type=int, default=1200)
    ap.add_argument("--probe-per-class", type=int, default=32)
    ap.add_argument("--method", default="gradcam", help="the attribution method discovery clusters")
    ap.add_argument("--width", type=int, default=8, help="channels of the CNN's first block")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--noise", type=float, default=0.4, help="std of the background noise")
    ap.add_argument("--out", default=None, help="write the JSON summary here")
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    pl.seed_everything(args.seed, workers=True, verbose=False)
    p = args.p / 100.0
    train = planted(args.train_size, p, args.control, args.seed, noise=args.noise)
    probe = planted(0, p, args.control, args.seed + 1, per_class=args.probe_per_class, noise=args.noise)
    clean = planted(300, 0.0, False, args.seed + 2, noise=args.noise)
    items = [{"image": x, "label": int(t)} for x, t in zip(train["inputs"], train["labels"])]
    loader = torch.utils.data.DataLoader(items, batch_size=args.batch_size, shuffle=True)
    model = ShapesNet(lr=args.lr, width=args.width)
    callback = Discovery(probe, clean, method=args.method, seed=args.seed, quiet=args.quiet)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, callbacks=[callback],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         deterministic=True, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train_dataloaders=loader)
    first = next((r for r in callback.records if r["confirmed"]), None)
    at_first = ("precision", "recall", "flip_rate", "null_flip_rate", "rest_flip_rate", "clean_val_acc")
    summary = {
        "p": args.p, "control": args.control, "seed": args.seed, "epochs": args.epochs, "method": args.method,
        "first_epoch_confirmed": None if first is None else first["epoch"],
        **{k: None if first is None else first[k] for k in at_first},  # of the best confirmed candidate then
        "final_clean_val_acc": callback.records[-1]["clean_val_acc"] if callback.records else None,
        "confirmed_per_epoch": [r["confirmed"] for r in callback.records],
        "records": callback.records,
    }
    print(f"\nfirst epoch with a confirmed candidate: {summary['first_epoch_confirmed']}; precision "
          f"{summary['precision']}, recall {summary['recall']}, flip {summary['flip_rate']} "
          f"(nulls {summary['null_flip_rate']}, {summary['rest_flip_rate']}), clean val acc {summary['clean_val_acc']}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1, default=float)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
