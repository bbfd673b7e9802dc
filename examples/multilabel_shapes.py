"""Multi-label: which shapes are in the image, and does each label's map point at its own shape?

Each image holds each of the shortcut example's shapes (``square``, ``disk``, ``cross``: see
``examples/shortcut_shapes.py``) with probability 1/2, independently (so none, one, two or all three), apart from
each other on a noisy background; its labels are the shapes it holds (multi-hot, ``[3]``). No label can be
read from the others: each label's evidence is its own shape. A small CNN learns them with a sigmoid per label, audited by a
:class:`~lightning_saliency.SaliencyMonitor` whose task is inferred from the probe's multi-hot labels
(``task="multilabel"``, recorded in the report).

The probe explains each (image, label) pair as its own row. Each row's object mask is that label's shape, and its
spurious mask is the image's *other* shapes; the row's group is the label's name. So for each label the report has
``gradcam/object_mass/<label>`` (the share of the label's map on its own shape), ``gradcam/spurious_mass/<label>``
(the share on the other shapes of the same image: a map that points at the wrong object) and
``gradcam/pointing_game/<label>``, beside ``probe/accuracy/class_<k>`` (per-label accuracy) and ``probe/f1``.

Run it (about half a minute on 2 CPU cores)::

    python examples/multilabel_shapes.py --out runs/multilabel

It writes TensorBoard logs and ``<log_dir>/saliency/report.json`` under ``--out`` and prints, per audit and then
per label, what the audit found.
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
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples.shortcut_shapes import CLASSES, ShapesNet, _shape_mask  # noqa: E402

LABELS = CLASSES  # square, disk, cross


def multilabel_shapes(n: int, seed: int, size: int = 32, noise: float = 0.25) -> dict[str, Tensor]:
    """``n`` images, each holding each shape with probability 1/2, independently, each in a quadrant of its own.

    Returns ``{"inputs" [n, 3, size, size], "labels" [n, 3] bool (multi-hot), "masks" [n, 3, size, size] bool}``
    (``masks[i, k]``: the pixels of shape ``k`` in image ``i``, empty when it is absent).

    Example:
        >>> d = multilabel_shapes(8, seed=0)
        >>> d["inputs"].shape, d["labels"].sum(1).tolist()
        (torch.Size([8, 3, 32, 32]), [2, 1, 1, 0, 1, 2, 1, 1])
        >>> bool((d["masks"].flatten(2).any(2) == d["labels"]).all()), int(d["masks"].sum(1).max())  # apart
        (True, 1)
    """
    g = torch.Generator().manual_seed(seed)
    x = noise * torch.randn(n, 3, size, size, generator=g)
    labels = torch.zeros(n, len(LABELS), dtype=torch.bool)
    masks = torch.zeros(n, len(LABELS), size, size, dtype=torch.bool)
    half = size // 2
    for i in range(n):
        present = (torch.rand(len(LABELS), generator=g) < 0.5).nonzero()[:, 0].tolist()
        quadrants = torch.randperm(4, generator=g).tolist()  # each shape in a quadrant of its own
        for k, q in zip(present, quadrants):
            r = 4.0 + 2.0 * torch.rand((), generator=g).item()
            lo = torch.tensor([half * (q // 2), half * (q % 2)]) + 1 + r  # its box 1 px inside the quadrant
            cy, cx = (lo + (half - 2 - 2 * r) * torch.rand(2, generator=g)).tolist()
            mask = _shape_mask(k, size, cy, cx, r)
            color = 0.6 + 0.8 * torch.rand(3, generator=g)
            x[i] = torch.where(mask, x[i] + color[:, None, None], x[i])
            labels[i, k], masks[i, k] = True, mask
    return {"inputs": x, "labels": labels, "masks": masks}


def build_probe(data: dict[str, Tensor]):
    """The probe: one row per (image, label it holds), with that label's shape as the object mask, the image's
    other shapes as the spurious mask, the label's name as the group, and the image's multi-hot labels."""
    from lightning_saliency import ProbeSet

    image, label = data["labels"].nonzero(as_tuple=True)  # the rows ProbeSet makes of multi-hot targets
    others = data["masks"][image].any(1) & ~data["masks"][image, label]
    return ProbeSet(data["inputs"][image], label, groups=[LABELS[k] for k in label.tolist()],
                    object_masks=data["masks"][image, label], spurious_masks=others, labels=data["labels"][image])


class MultiLabelNet(ShapesNet):
    """The shortcut example's CNN with one sigmoid per label (binary cross-entropy); ``acc``: per-label accuracy."""

    def _step(self, batch: dict, stage: str) -> Tensor:
        logits, y = self(batch["image"]), batch["labels"].float()
        loss = F.binary_cross_entropy_with_logits(logits, y)
        n = len(y)
        self.log(f"{stage}_loss", loss, batch_size=n)
        self.log(f"{stage}_acc", ((logits > 0) == y.bool()).float().mean(), prog_bar=True, batch_size=n)
        return loss

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs))
        return {"optimizer": optimizer, "lr_scheduler": schedule}  # a cosine decay: the last epochs settle


def _loader(data: dict[str, Tensor], batch_size: int, shuffle: bool = False) -> DataLoader:
    items = [{"image": x, "labels": y} for x, y in zip(data["inputs"], data["labels"])]
    return DataLoader(items, batch_size=batch_size, shuffle=shuffle)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/multilabel", help="root directory for logs and the audit report")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train-size", type=int, default=1600, help="training images")
    p.add_argument("--probe-size", type=int, default=48, help="probe images (each gives a row per shape it holds)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam's learning rate (cosine decay over the epochs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="gradcam,gradient", help="comma-separated attribution methods")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _fmt(v: Any) -> str:
    return "  n/a" if v is None or not math.isfinite(v) else f"{v:5.2f}"


def summarize(report: dict[str, Any], probe: Any, n_images: int) -> list[str]:
    """The lines printed at the end: the task, one line per audit, then per label and method (the last audit)."""
    config, audits = report["config"], report["audits"]
    methods, first = config["methods"], config["methods"][0]
    lines = [f"task: {config['task']} ({'inferred' if config.get('task_inferred') else 'given'}); probe: "
             f"{n_images} images -> {len(probe)} (image, label) rows",
             f"epoch  per-label acc    F1  {first}: object_mass  other shapes"]
    for a in audits:
        m = a["metrics"]
        lines.append(f"{a['epoch']:>5}  {_fmt(m.get('probe/accuracy')):>13} {_fmt(m.get('probe/f1'))}  "
                     f"{_fmt(m.get(f'{first}/object_mass')):>20}  {_fmt(m.get(f'{first}/spurious_mass')):>12}")
    m = audits[-1]["metrics"]
    lines += [f"\nepoch {audits[-1]['epoch']}, per label (chance: the share of the image the shape covers):",
              "label   accuracy  method    object_mass  other shapes  pointing_game  chance"]
    for k, name in enumerate(LABELS):
        rows = probe.targets == k
        chance = float(probe.object_masks[rows].float().mean()) if bool(rows.any()) else math.nan
        for i, method in enumerate(methods):
            head = f"{name:<7} {_fmt(m.get(f'probe/accuracy/class_{k}')):>8}" if i == 0 else " " * 16
            lines.append(f"{head}  {method:<9} {_fmt(m.get(f'{method}/object_mass/{name}')):>11}  "
                         f"{_fmt(m.get(f'{method}/spurious_mass/{name}')):>12}  "
                         f"{_fmt(m.get(f'{method}/pointing_game/{name}')):>13}  {_fmt(chance):>6}")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    pl.seed_everything(args.seed, workers=True, verbose=False)
    train = multilabel_shapes(args.train_size, args.seed)
    val = multilabel_shapes(400, args.seed + 1)
    probe_data = multilabel_shapes(args.probe_size, args.seed + 2)
    probe = build_probe(probe_data)
    from pytorch_lightning.loggers import TensorBoardLogger

    from lightning_saliency import SaliencyMonitor

    logger = TensorBoardLogger(args.out, name="multilabel")
    monitor = SaliencyMonitor(probe, methods=tuple(args.methods.split(",")), class_names=LABELS)  # task inferred
    trainer = pl.Trainer(max_epochs=args.epochs, logger=logger, callbacks=[monitor], accelerator="cpu", devices=1,
                         deterministic=True, enable_checkpointing=False, enable_progress_bar=not args.quiet,
                         enable_model_summary=False, log_every_n_steps=10)
    model = MultiLabelNet(lr=args.lr, width=8, num_classes=len(LABELS))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(model, _loader(train, 32, shuffle=True), _loader(val, 200))
    path = os.path.join(logger.log_dir, "saliency", "report.json")
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    val_acc = float(trainer.callback_metrics.get("val_acc", math.nan))
    lines = [f"validation per-label accuracy: {val_acc:.3f}", *summarize(report, probe, args.probe_size),
             f"\nAudit report:  {path}", f"Dashboard:     tensorboard --logdir {args.out}"]
    print("\n" + "\n".join(lines))
    return {"report": path, "val_acc": val_acc, "log_dir": logger.log_dir, "model": model, "probe": probe}


if __name__ == "__main__":
    main(sys.argv[1:])
