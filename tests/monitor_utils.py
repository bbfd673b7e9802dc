"""Small, fast training set-ups shared by the callback tests (the shortcut example at 16 px)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from examples.shortcut_shapes import ShapesDataModule, ShapesNet, build_probe

FAST = dict(accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, deterministic=True)


def datamodule(shortcut: bool = True, n_train: int = 96, seed: int = 0) -> ShapesDataModule:
    return ShapesDataModule(n_train=n_train, n_val=32, batch_size=32, shortcut=shortcut, seed=seed,
                            image_size=16, n_probe=32)


def probe(dm: ShapesDataModule | None = None, size: int = 8, seed: int = 0):
    return build_probe(dm or datamodule(), size=size, seed=seed)


def model(seed: int = 0) -> ShapesNet:
    torch.manual_seed(seed)
    return ShapesNet(width=4)


def fit(callbacks: list[Any], tmp_path: Any, max_epochs: int = 2, seed: int = 0, logger: Any = None,
        ckpt_path: str | None = None, net: ShapesNet | None = None, dm: ShapesDataModule | None = None,
        **trainer_kwargs: Any) -> tuple[pl.Trainer, ShapesNet]:
    """Seeded fit of the 16-px shapes net; returns the trainer and the model."""
    pl.seed_everything(seed, workers=True, verbose=False)
    net = net if net is not None else ShapesNet(width=4)
    dm = dm if dm is not None else datamodule()
    if logger is None:
        logger = pl.loggers.CSVLogger(str(tmp_path), name="run")
    kwargs = {**FAST, **trainer_kwargs}
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=logger, default_root_dir=str(tmp_path),
                         **kwargs)
    trainer.fit(net, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, net


class TupleData(pl.LightningModule):
    """``net`` trained on ``n`` random images of ``shape`` with labels 0/1, served as plain ``(image, label)``
    tuples by its own loaders: a probe drawn from them has no masks and no groups. ``data`` replaces the random
    set (a subclass whose items are dicts overrides ``training_step``); SGD at ``lr``."""

    def __init__(self, net: nn.Module, n: int, shape: tuple[int, ...], batch_size: int, data: Any = None,
                 lr: float = 0.1) -> None:
        super().__init__()
        self.net, self.batch_size, self.lr = net, batch_size, lr
        if data is None:
            g = torch.Generator().manual_seed(0)
            data = TensorDataset(torch.rand(n, *shape, generator=g), torch.randint(0, 2, (n,), generator=g))
        self.data = data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)
