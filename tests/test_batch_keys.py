"""Data from batches (issue 11, point 5): with ``probe=None``, ``group_key=``, ``object_mask_key=`` and
``spurious_mask_key=`` read groups and masks from the validation batches; a misspelt key fails before training,
listing the batch's keys closest first."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_saliency import ProbeSet, SaliencyMonitor
from lightning_saliency.probe_source import closest_first, reader
from tests import monitor_utils as U


class Renamed(U.TupleData):
    """A tiny CNN whose validation items are dicts with groups and masks under keys of their own: ``"site"``,
    ``"fg"`` and ``"border"`` (which the default keys ``"object_mask"`` / ``"spurious_mask"`` miss)."""

    def __init__(self, n: int = 8) -> None:
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(4, 2))
        g = torch.Generator().manual_seed(0)
        images = torch.rand(n, 3, 16, 16, generator=g)
        fg = torch.zeros(n, 16, 16, dtype=torch.bool)
        fg[:, 4:12, 4:12] = True
        border = torch.zeros(n, 16, 16, dtype=torch.bool)
        border[torch.arange(n) % 2 == 1, :2] = True  # odd items: a band at the top
        items = [{"image": images[i], "label": i % 2, "site": f"site_{i % 3}", "fg": fg[i], "border": border[i]}
                 for i in range(n)]
        super().__init__(net, n, (3, 16, 16), batch_size=4, data=items, lr=0.01)
        self.items = items

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["image"]), batch["label"])


def _fit(monitor: SaliencyMonitor, tmp_path, net: pl.LightningModule | None = None) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=1, callbacks=[monitor], logger=pl.loggers.CSVLogger(str(tmp_path)), **U.FAST)
    trainer.fit(net or Renamed())
    return trainer


def test_keys_read_groups_and_masks_from_dict_batches(tmp_path):
    net = Renamed()
    monitor = SaliencyMonitor(None, methods=("gradcam",), probe_size=8, log_images=0, group_key="site",
                              object_mask_key="fg", spurious_mask_key="border",
                              metrics=("object_mass", "spurious_mass", "attention_disparity"))
    _fit(monitor, tmp_path, net)
    probe = monitor.probe
    assert probe.groups == [item["site"] for item in net.items]
    assert torch.equal(probe.object_masks, torch.stack([item["fg"] for item in net.items]))
    assert torch.equal(probe.spurious_masks, torch.stack([item["border"] for item in net.items]))
    metrics = monitor.latest["metrics"]
    assert {f"gradcam/spurious_mass/site_{k}" for k in range(3)} <= set(metrics)
    assert metrics["gradcam/object_mass"] is not None and metrics["gradcam/attention_disparity"] is not None


def test_without_keys_the_custom_keys_are_not_read(tmp_path):
    monitor = SaliencyMonitor(None, methods=("gradcam",), probe_size=8, log_images=0, metrics=("drift",))
    _fit(monitor, tmp_path)
    assert monitor.probe.groups is None and monitor.probe.object_masks is None


def test_a_misspelt_key_fails_before_training_listing_the_batch_keys_closest_first(tmp_path):
    monitor = SaliencyMonitor(None, methods=("gradcam",), probe_size=8, log_images=0, group_key="sight")
    trainer = pl.Trainer(max_epochs=1, callbacks=[monitor], logger=False, **U.FAST)
    with pytest.raises(ValueError, match=r"group_key='sight'.*no key 'sight'.*closest first: \['site', "):
        trainer.fit(Renamed())
    assert trainer.global_step == 0  # not one training step


def test_keys_are_positions_for_tuple_batches_and_errors_say_so():
    read = reader(2, "group_key")
    assert read((torch.zeros(1), 0, "a")) == "a"
    with pytest.raises(ValueError, match=r"tuples of 2 elements, so group_key must be a position 0..1"):
        read((torch.zeros(1), 0))
    with pytest.raises(ValueError, match="tuples of 3 elements"):
        reader("site", "group_key")((torch.zeros(1), 0, "a"))
    loader = DataLoader([(torch.rand(1, 4, 4), i % 2, f"g{i % 2}") for i in range(6)], batch_size=3)
    probe = ProbeSet.from_dataloader(loader, size=6, group_fn=reader(2, "group_key"))
    assert probe.groups == ["g0", "g1"] * 3
    assert closest_first("lable", ["image", "label", "mask"])[0] == "label"


def test_keys_with_a_given_probe_or_of_a_wrong_type_are_errors_at_construction():
    probe = ProbeSet(torch.rand(2, 3, 8, 8), [0, 1])
    with pytest.raises(ValueError, match=r"only with probe=None.*group_fn=lambda item: item\['site'\]"):
        SaliencyMonitor(probe, group_key="site")
    with pytest.raises(ValueError, match="must be a key of the validation batches"):
        SaliencyMonitor(None, object_mask_key=1.5)
    assert SaliencyMonitor(None, group_key="site").data_keys == {"group_key": "site"}
