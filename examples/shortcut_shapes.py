"""The shortcut example: a classifier that can cheat, audited while it trains.

Each image shows one shape (square, disk or cross) somewhere on a noisy background. In the training set a small
bright patch in the top-left corner encodes the label too: a planted shortcut, much easier to read than the
shape. Validation images carry a patch of random brightness, so validation accuracy measures the shape skill
alone. The probe set has two groups: ``shortcut_present`` (the patch encodes the label) and ``shortcut_absent``
(no patch), with the patch's pixels as the spurious mask and the shape's pixels as the object mask.

Run it (the README's main job; about a minute on 2 CPU cores)::

    python examples/shortcut_shapes.py --out runs/demo
    python examples/shortcut_shapes.py --out runs/clean --no-shortcut   # the patch carries no signal

It writes TensorBoard logs and ``<log_dir>/saliency/report.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

CLASSES = ("square", "disk", "cross")
PATCH = (slice(1, 7), slice(1, 7))  # rows, cols of the shortcut patch
PATCH_CODES = (0.8, 1.6, 2.4)  # patch brightness per class when the shortcut is present
GATE_MAX_SPURIOUS = 0.1  # alarm and gate threshold on gradcam/spurious_mass: about 3x the patch's area fraction


@dataclass
class ShapesConfig:
    size: int = 32
    noise: float = 0.6


def _shape_mask(kind: int, size: int, cy: float, cx: float, r: float) -> Tensor:
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    dy, dx = (yy - cy).abs(), (xx - cx).abs()
    if kind == 0:
        return (dy <= r) & (dx <= r)
    if kind == 1:
        return (dy**2 + dx**2) <= r**2
    arm = max(1.0, r / 3)
    return ((dy <= r) & (dx <= arm)) | ((dx <= r) & (dy <= arm))


class ShortcutShapes(Dataset):
    """``n`` synthetic images; ``patch`` is ``"label"`` (the shortcut), ``"random"`` or ``"none"``.

    With ``patch="mixed"`` the first half of the images carry the label-coding patch (group
    ``shortcut_present``) and the second half none (``shortcut_absent``). Items are dicts with ``image``
    ``[3, H, W]``, ``label``, ``object_mask``, ``spurious_mask`` and ``group``.

    Example:
        >>> ds = ShortcutShapes(4, patch="label", seed=0)
        >>> ds[0]["image"].shape, ds[0]["spurious_mask"].sum().item()
        (torch.Size([3, 32, 32]), 36)
    """

    def __init__(self, n: int, patch: str = "label", seed: int = 0, config: ShapesConfig | None = None) -> None:
        if patch not in ("label", "random", "none", "mixed"):
            raise ValueError(f"patch must be 'label', 'random', 'none' or 'mixed', got {patch!r}")
        cfg = config or ShapesConfig()
        g = torch.Generator().manual_seed(seed)
        s = cfg.size
        self.images = torch.empty(n, 3, s, s)
        self.labels = torch.randint(0, len(CLASSES), (n,), generator=g)
        self.object_masks = torch.zeros(n, s, s, dtype=torch.bool)
        self.spurious_masks = torch.zeros(n, s, s, dtype=torch.bool)
        self.spurious_masks[:, PATCH[0], PATCH[1]] = True
        self.groups: list[str] = []
        for i in range(n):
            r = 3.0 + 3.0 * torch.rand((), generator=g).item()
            lo, hi = 8 + r, s - 1 - r
            cy = lo + (hi - lo) * torch.rand((), generator=g).item()
            cx = lo + (hi - lo) * torch.rand((), generator=g).item()
            mask = _shape_mask(int(self.labels[i]), s, cy, cx, r)
            color = 0.6 + 0.8 * torch.rand(3, generator=g)
            img = cfg.noise * torch.randn(3, s, s, generator=g)
            img = torch.where(mask, img + color[:, None, None], img)
            mode = patch if patch != "mixed" else ("label" if i < n // 2 else "none")
            if mode == "label":
                img[:, PATCH[0], PATCH[1]] = PATCH_CODES[int(self.labels[i])]
            elif mode == "random":
                img[:, PATCH[0], PATCH[1]] = PATCH_CODES[int(torch.randint(0, 3, (), generator=g))]
            self.images[i] = img
            self.object_masks[i] = mask
            self.groups.append("shortcut_present" if mode == "label" else "shortcut_absent")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i]), "object_mask": self.object_masks[i],
                "spurious_mask": self.spurious_masks[i], "group": self.groups[i]}


class ShapesDataModule(pl.LightningDataModule):
    """Training set with the shortcut (or without, ``shortcut=False``), validation with a random patch."""

    def __init__(self, n_train: int = 2400, n_val: int = 480, batch_size: int = 64, shortcut: bool = True,
                 seed: int = 0, image_size: int = 32, n_probe: int = 256) -> None:
        super().__init__()
        self.n_train, self.n_val, self.batch_size, self.shortcut, self.seed = n_train, n_val, batch_size, shortcut, seed
        self.config = ShapesConfig(size=image_size)
        self.n_probe = n_probe

    def setup(self, stage: str | None = None) -> None:
        if not hasattr(self, "train_set"):
            cfg = self.config
            self.train_set = ShortcutShapes(self.n_train, "label" if self.shortcut else "random", self.seed, cfg)
            self.val_set = ShortcutShapes(self.n_val, "random", self.seed + 1, cfg)
            self.probe_set = ShortcutShapes(self.n_probe, "mixed", self.seed + 2, cfg)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(ShortcutShapes(self.n_val, "random", self.seed + 3, self.config), batch_size=256)


class ShapesNet(pl.LightningModule):
    """A small CNN (three conv blocks with BatchNorm, global average pooling, dropout, a linear head)."""

    def __init__(self, lr: float = 1e-3, width: int = 16, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.save_hyperparameters()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.pool(self.features(x)).flatten(1)))

    def _step(self, batch: dict, stage: str) -> Tensor:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"])
        acc = (logits.argmax(1) == batch["label"]).float().mean()
        n = len(batch["label"])
        self.log(f"{stage}_loss", loss, prog_bar=stage == "val", batch_size=n)
        self.log(f"{stage}_acc", acc, prog_bar=True, batch_size=n)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def build_probe(datamodule: ShapesDataModule, size: int = 64, seed: int = 0):
    """The fixed probe: ``size`` images of the mixed set, balanced over classes, with groups and both masks."""
    from lightning_saliency import ProbeSet

    datamodule.setup("fit")
    return ProbeSet.from_dataset(datamodule.probe_set, size=size, seed=seed, stratify=True,
                                 group_fn=lambda sample: sample["group"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="root directory for logs and the audit report")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train-size", type=int, default=2400, help="training images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-shortcut", action="store_true", help="train with a random patch: nothing to cheat with")
    p.add_argument("--no-audit", action="store_true", help="train without the callbacks (for benchmarks)")
    p.add_argument("--methods", default="gradcam,gradient", help="comma-separated attribution methods")
    p.add_argument("--alarm", type=float, default=GATE_MAX_SPURIOUS,
                   help="ShortcutAlarm threshold on gradcam/spurious_mass (the patch is 3.5%% of the image)")
    p.add_argument("--alarm-action", default="warn", choices=("warn", "stop", "raise"))
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (offline unless configured)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-gate", action="store_true", help="skip the CI gate and the HTML page at the end")
    p.add_argument("--scorecard", action="store_true", help="score every method once at the end of fit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    pl.seed_everything(args.seed, workers=True, verbose=False)
    dm = ShapesDataModule(n_train=args.train_size, shortcut=not args.no_shortcut, seed=args.seed)
    dm.setup("fit")  # the data, generated here with or without the audit (the probe is drawn from it)
    model = ShapesNet()
    from pytorch_lightning.loggers import TensorBoardLogger

    name = "no_shortcut" if args.no_shortcut else "shortcut"
    loggers: list = [TensorBoardLogger(args.out, name=name)]
    if args.wandb:
        from pytorch_lightning.loggers import WandbLogger

        loggers.append(WandbLogger(project="lightning-saliency-demo", save_dir=args.out,
                                   offline=os.environ.get("WANDB_MODE", "offline") == "offline"))
    callbacks: list = []
    if not args.no_audit:
        from lightning_saliency import SaliencyMonitor, ShortcutAlarm

        callbacks = [SaliencyMonitor(build_probe(dm), methods=tuple(args.methods.split(",")), every_n_epochs=1,
                                     class_names=CLASSES, scorecard=args.scorecard),
                     ShortcutAlarm(metric="gradcam/spurious_mass", threshold=args.alarm, patience=2,
                                   action=args.alarm_action)]
    trainer = pl.Trainer(max_epochs=args.epochs, logger=loggers, callbacks=callbacks, accelerator="cpu",
                         devices=1, deterministic=True, enable_checkpointing=False,
                         enable_progress_bar=not args.quiet, enable_model_summary=False, log_every_n_steps=10)
    trainer.fit(model, datamodule=dm)
    log_dir = loggers[0].log_dir
    result = {"log_dir": log_dir, "val_acc": float(trainer.callback_metrics.get("val_acc", math.nan))}
    if not args.no_audit:
        report = os.path.join(log_dir, "saliency", "report.json")
        result["report"] = report
        print(f"\nAudit report:  {report}")
        print(f"Dashboard:     tensorboard --logdir {args.out}   (then open http://localhost:6006)")
        if not args.no_gate:
            from lightning_saliency import cli

            page = os.path.join(log_dir, "audit.html")
            cli.main(["report", log_dir, "-o", page])
            print(f"HTML page:     {page}   (opens offline in any browser)")
            rule = f"gradcam/spurious_mass={GATE_MAX_SPURIOUS}"
            print(f"\nCI gate:       lightning-saliency gate {report} --max {rule}\n")
            result["gate"] = cli.main(["gate", report, "--max", rule])
            verdict = {0: "PASS", 1: "FAIL: the model learned the shortcut"}.get(result["gate"], "ERROR")
            print(f"\nGate verdict:  {verdict} (exit code {result['gate']})")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
