"""Pictures in true colours (issue 11, point 4): ``denormalize=(mean, std)`` on the render functions and on
``SaliencyMonitor``, found in a dataset's torchvision ``Normalize``, recorded in the report, used by the
dashboards' overlays and the page's thumbnails."""

from __future__ import annotations

import io

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms
from torchvision.transforms import v2

from lightning_saliency import ProbeSet, SaliencyMonitor
from lightning_saliency.mapfiles import load_probe_thumbnails
from lightning_saliency.render import check_denormalize, get_cmap, grid, overlay, to_image
from lightning_saliency.report import AuditReport
from lightning_saliency.sampling import find_normalize
from tests.monitor_utils import FAST, TupleData

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's
COLOUR = (200, 30, 60)
IMAGENET = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def _pure(colour=COLOUR, size=8) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def test_a_known_colour_survives_normalise_then_overlay():
    x = IMAGENET(_pure())
    want = np.array(COLOUR)
    for picture in (to_image(x, (MEAN, STD)), overlay(x, np.zeros((8, 8)), alpha=0.0, denormalize=(MEAN, STD)),
                    grid([x], denormalize=(MEAN, STD), pad=0)):
        assert picture.shape == (8, 8, 3)
        assert np.abs(picture.astype(int) - want).max() <= 3
    # without it, the min-max over all channels casts the colour: red saturates, green goes to 0
    cast = to_image(x).astype(int)
    assert cast[0, 0].tolist()[:2] == [255, 0] and np.abs(cast - want).max() > 50
    # the dict form of a report's config, and one value for all channels of a grey image
    assert np.abs(to_image(x, {"mean": MEAN, "std": STD, "source": "argument"}).astype(int) - want).max() <= 3
    grey = transforms.Normalize([0.5], [0.25])(torch.full((1, 2, 2), 0.2))
    assert to_image(grey, ([0.5], [0.25]))[0, 0].tolist() == [51, 51, 51]


def test_denormalize_values_are_checked_with_errors_that_say_the_fix():
    with pytest.raises(ValueError, match="std must be > 0"):
        check_denormalize((MEAN, (0.2, 0.0, 0.2)))
    with pytest.raises(ValueError, match="has 2 values but the images have 3 channel"):
        check_denormalize(((0.5, 0.5), 0.5), channels=3)
    with pytest.raises(ValueError, match=r"a pair \(mean, std\)"):
        check_denormalize([0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="finite"):
        check_denormalize((float("nan"), 1.0))
    with pytest.raises(ValueError, match="has 2 values but the images have 3"):
        to_image(torch.zeros(3, 2, 2), ((0.5, 0.5), (1.0, 1.0)))
    probe = ProbeSet(torch.rand(2, 3, 8, 8), [0, 1])
    with pytest.raises(ValueError, match="has 2 values but the images have 3"):  # at construction
        SaliencyMonitor(probe, denormalize=((0.5, 0.5), (0.5, 0.5)))
    with pytest.raises(ValueError, match="std must be > 0"):  # without a probe too
        SaliencyMonitor(None, denormalize=((0.5,), (-1.0,)))
    assert SaliencyMonitor(probe, denormalize=(MEAN, STD)).denormalize == (MEAN, STD)


class Colours(Dataset):
    """Pure-colour PIL images through a transform, ``(image, label)`` items (the label: which colour)."""

    colours = [COLOUR, (20, 180, 90)]

    def __init__(self, n: int = 8, transform=IMAGENET, size: int = 8) -> None:
        self.n, self.transform, self.size = n, transform, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.transform(_pure(self.colours[i % 2], self.size)), i % 2


def test_find_normalize_in_composes_v2_subsets_loaders_and_nowhere():
    assert find_normalize(Colours()) == (MEAN, STD)
    assert find_normalize(DataLoader(Subset(Colours(), [0, 1]), batch_size=2)) == (MEAN, STD)
    modern = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    assert find_normalize(Colours(transform=modern)) == (MEAN, STD)
    twice = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3),
                                transforms.Normalize([1.0] * 3, [2.0] * 3)])
    mean, std = find_normalize(Colours(transform=twice))  # composed: one Normalize doing both
    raw = transforms.ToTensor()(_pure())
    both = Colours(transform=twice)[0][0]
    assert torch.allclose(both * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None], raw, atol=1e-6)
    assert find_normalize(Colours(transform=transforms.ToTensor())) is None
    assert find_normalize([(torch.zeros(3, 2, 2), 0)]) is None


def test_a_probe_from_a_normalised_dataset_records_it_outside_its_fingerprint():
    probe = ProbeSet.from_dataset(Colours(), size=4)
    assert probe.denormalize == (MEAN, STD) and probe.denormalize_source == "dataset transform"
    same = ProbeSet(probe.inputs.clone(), probe.targets.clone())
    assert same.denormalize is None and same.fingerprint == probe.fingerprint  # display only
    loaded = ProbeSet.from_state_dict(probe.state_dict())
    assert loaded.denormalize == (MEAN, STD) and loaded.denormalize_source == "dataset transform"
    assert probe.shard(1, 2).denormalize == (MEAN, STD) and probe.subset([0]).to("cpu").denormalize == (MEAN, STD)
    assert ProbeSet.from_dataloader(DataLoader(Colours(), batch_size=4), size=4).denormalize == (MEAN, STD)
    assert ProbeSet.from_dataset(Colours(transform=transforms.ToTensor()), size=4).denormalize is None


class ColourNet(TupleData):
    """A tiny CNN on 16-px pure-colour images, validated on the ImageNet-normalised ``Colours`` set."""

    def __init__(self) -> None:
        super().__init__(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                       nn.Flatten(), nn.Linear(4, 2)), 8, (3, 16, 16), batch_size=8,
                         data=Colours(n=8, size=16), lr=0.01)


def _fit(monitor: SaliencyMonitor, tmp_path) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(max_epochs=1, callbacks=[monitor], logger=logger, **FAST)
    trainer.fit(ColourNet())
    return trainer


def test_the_monitor_finds_the_normalize_says_so_and_draws_true_colours(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator as ea

    monitor = SaliencyMonitor(None, methods=("gradcam",), probe_size=4, log_images=2, image_colors=None,
                              metrics=("drift",))
    trainer = _fit(monitor, tmp_path)
    directory = f"{trainer.log_dir}/saliency"
    config = AuditReport.load(f"{directory}/report.json").data["config"]
    assert config["denormalize"] == {"mean": list(MEAN), "std": list(STD), "source": "dataset transform"}
    colours = [np.array(Colours.colours[int(t)]) for t in monitor.probe.targets]
    thumbnails = load_probe_thumbnails(directory)["images"].astype(int)  # the page's pictures
    assert all(np.abs(thumbnails[i] - colours[i]).max() <= 3 for i in range(len(thumbnails)))
    display = monitor._recorder.display.astype(int)  # under the dashboards' overlays
    assert all(np.abs(display[i] - colours[i]).max() <= 3 for i in range(2))
    # read back from TensorBoard: each pixel of the first tile is half the true colour plus half a jet colour
    acc = ea.EventAccumulator(trainer.logger.log_dir, size_guidance={ea.IMAGES: 0})
    acc.Reload()
    png = acc.Images("saliency/gradcam/overlays")[-1].encoded_image_string
    tile = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=float)[2:98, 2:98].reshape(-1, 1, 3)
    jet = get_cmap("jet")(np.linspace(0, 1, 1024), bytes=True)[None, :, :3].astype(float)

    def worst(colour: np.ndarray) -> float:  # the largest distance of a pixel to the blends of colour with jet
        return float(np.abs(tile - (0.5 * colour + 0.5 * jet)).max(axis=2).min(axis=1).max())

    assert worst(colours[0]) <= 2.0
    assert worst(to_image(monitor.probe.inputs[0])[0, 0].astype(float)) > 10  # the min-max colours do not fit


def test_the_monitor_argument_wins_over_the_dataset_transform(tmp_path):
    monitor = SaliencyMonitor(None, methods=("gradcam",), probe_size=4, log_images=0, metrics=("drift",),
                              denormalize=((0.5,), (0.5,)))
    trainer = _fit(monitor, tmp_path)
    config = AuditReport.load(f"{trainer.log_dir}/saliency/report.json").data["config"]
    assert config["denormalize"] == {"mean": [0.5], "std": [0.5], "source": "argument"}
    assert monitor.probe.denormalize == (MEAN, STD)  # the probe keeps what it found; the monitor shows its own
