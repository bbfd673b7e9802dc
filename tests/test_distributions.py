"""Both Lightning distributions (DESIGN §3): the callbacks work with a ``pytorch_lightning.Trainer`` and with a
``lightning.pytorch.Trainer``, each with its own LightningModule and TensorBoardLogger, with no mixed-import
error, and write a report (with alarms and dashboard entries) in both cases."""

from __future__ import annotations

import json
import os
import warnings

import lightning.pytorch as L
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger as LTensorBoardLogger
from pytorch_lightning.loggers import TensorBoardLogger as PLTensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader

from examples.shortcut_shapes import ShapesConfig, ShortcutShapes
from lightning_saliency import SaliencyMonitor, ShortcutAlarm
from tests import monitor_utils as U

METRICS = ("object_mass", "spurious_mass", "pointing_game", "drift")


class TinyNet(L.LightningModule):
    """A ``lightning.pytorch`` module (not ``pytorch_lightning``) with its own dataloaders: the monitor draws
    its probe from ``val_dataloader()``."""

    def __init__(self, n_train: int = 48, n_val: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        cfg = ShapesConfig(size=16)
        self.train_set = ShortcutShapes(n_train, "label", 0, cfg)
        self.val_set = ShortcutShapes(n_val, "random", 1, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch["image"]), batch["label"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(batch["image"]), batch["label"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=16, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=16)


def _callbacks(probe=None) -> tuple[SaliencyMonitor, ShortcutAlarm]:
    monitor = SaliencyMonitor(probe, probe_size=8, methods=("gradcam", "gradient"), metrics=METRICS, log_images=4)
    alarm = ShortcutAlarm(metric="gradcam/spurious_mass", threshold=0.0, action="warn")  # fires: mass > 0
    return monitor, alarm


def _check_run(log_dir: str, epochs: int) -> dict:
    with open(os.path.join(log_dir, "saliency", "report.json")) as f:
        report = json.load(f)
    assert [a["epoch"] for a in report["audits"]] == list(range(epochs))
    assert all(not a["errors"] for a in report["audits"])
    assert report["audits"][-1]["metrics"]["gradcam/spurious_mass"] > 0
    assert len(report["alarms"]) == 1  # fires once per streak of violating audits
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert "saliency/gradcam/spurious_mass" in tags["scalars"], tags["scalars"]
    assert {"saliency/gradcam/overlays", "saliency/gradient/overlays"} <= set(tags["images"])
    assert len(events.Images("saliency/gradcam/overlays")) == epochs
    return report


def test_classes_are_callbacks_of_both_distributions():
    monitor, alarm = _callbacks()
    for cb in (monitor, alarm):
        assert isinstance(cb, pl.Callback) and isinstance(cb, L.Callback)


def test_pytorch_lightning_trainer(tmp_path):
    monitor, alarm = _callbacks(U.probe())
    logger = PLTensorBoardLogger(str(tmp_path), name="pl")
    trainer = pl.Trainer(max_epochs=2, callbacks=[monitor, alarm], logger=logger, **U.FAST)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ShortcutAlarm")
        trainer.fit(U.model(), datamodule=U.datamodule())
    report = _check_run(logger.log_dir, 2)
    assert report["run"]["lightning"] == pl.__version__


def test_lightning_pytorch_trainer(tmp_path):
    monitor, alarm = _callbacks(None)  # the probe comes from TinyNet.val_dataloader()
    logger = LTensorBoardLogger(str(tmp_path), name="lightning")
    trainer = L.Trainer(max_epochs=2, callbacks=[monitor, alarm], logger=logger, **U.FAST)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ShortcutAlarm")
        trainer.fit(TinyNet())
    report = _check_run(logger.log_dir, 2)
    assert report["probe"]["size"] == 8 and len(monitor.probe) == 8
    assert report["run"]["model"] == "TinyNet"


def test_lightning_pytorch_trainer_validate_under_inference_mode(tmp_path):
    monitor, _ = _callbacks(None)
    logger = LTensorBoardLogger(str(tmp_path), name="lightning")
    trainer = L.Trainer(callbacks=[monitor], logger=logger, **U.FAST)
    trainer.validate(TinyNet(), verbose=False)
    assert monitor.latest is not None and not monitor.latest["errors"]
    assert monitor.latest["metrics"]["gradient/object_mass"] is not None


@pytest.mark.parametrize("trainer_cls", [pl.Trainer, L.Trainer], ids=["pytorch_lightning", "lightning"])
def test_alarm_without_monitor_is_a_setup_error_in_both(trainer_cls, tmp_path):
    _, alarm = _callbacks()
    trainer = trainer_cls(max_epochs=1, callbacks=[alarm], logger=False, **U.FAST)
    module = U.model() if trainer_cls is pl.Trainer else TinyNet()
    kwargs = {"datamodule": U.datamodule()} if trainer_cls is pl.Trainer else {}
    with pytest.raises(ValueError, match="needs a SaliencyMonitor"):
        trainer.fit(module, **kwargs)


class _TrainOnly(L.LightningModule):
    """No val_dataloader (lightning.pytorch's default hook): nothing to draw a probe from."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.net.training_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return self.net.train_dataloader()


@pytest.mark.parametrize("distribution", ["pytorch_lightning", "lightning"])
def test_no_probe_source_is_a_setup_error_in_both(distribution, tmp_path):
    monitor, _ = _callbacks(None)
    if distribution == "pytorch_lightning":
        trainer = pl.Trainer(max_epochs=1, callbacks=[monitor], logger=False, **U.FAST)
        dm = U.datamodule()
        dm.setup()
        fit = lambda: trainer.fit(U.model(), train_dataloaders=DataLoader(dm.train_set, batch_size=32))  # noqa: E731
    else:
        trainer = L.Trainer(max_epochs=1, callbacks=[monitor], logger=False, **U.FAST)
        fit = lambda: trainer.fit(_TrainOnly())  # noqa: E731
    with pytest.raises(ValueError, match="no probe"):
        fit()
    assert trainer.global_step == 0
