"""Known answers for region_mass and pointing_game (DESIGN §4, issue 4 acceptance 1 and 4)."""

from __future__ import annotations

import doctest
import importlib
import warnings

import pytest
import torch
from torch import nn

import lightning_saliency.metrics as metrics_pkg
from lightning_saliency.methods.engine import attribute
from lightning_saliency.metrics import UndefinedMetricWarning, pointing_game, region_mass


def _masks(n: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        r, c = torch.randint(0, size - 5, (2,), generator=g).tolist()
        h, w = torch.randint(2, 6, (2,), generator=g).tolist()
        masks[i, r : r + h, c : c + w] = True
    return masks


def test_map_equal_to_mask_has_mass_one_and_hits():
    masks = _masks()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(region_mass(masks.float(), masks), torch.ones(len(masks)))
        assert torch.equal(pointing_game(masks.float(), masks), torch.ones(len(masks)))
        assert torch.equal(region_mass(masks.float(), masks, normalize=False), torch.ones(len(masks)))


def test_uniform_map_has_area_fraction():
    masks = _masks()
    area = masks.float().mean(dim=(1, 2))
    uniform = torch.full(masks.shape, 0.7)
    # unnormalised: the formula itself gives the area fraction
    assert torch.allclose(region_mass(uniform, masks, normalize=False), area, atol=1e-6)
    # normalised (default): a constant map becomes all zero, the documented chance level, with a warning
    with pytest.warns(UndefinedMetricWarning, match="area fraction"):
        assert torch.allclose(region_mass(uniform, masks), area, atol=1e-6)
    with pytest.warns(UndefinedMetricWarning):
        assert torch.allclose(pointing_game(uniform, masks), area, atol=1e-6)


def test_all_zero_map_is_defined_never_nan():
    masks = _masks()
    zero = torch.zeros(masks.shape)
    with pytest.warns(UndefinedMetricWarning):
        rm = region_mass(zero, masks, normalize=False)
    with pytest.warns(UndefinedMetricWarning):
        pg = pointing_game(zero, masks)
    area = masks.float().mean(dim=(1, 2))
    assert torch.isfinite(rm).all() and torch.isfinite(pg).all()
    assert torch.allclose(rm, area) and torch.allclose(pg, area)
    # NaN / inf inside a map are read as 0
    bad = masks.float().clone()
    bad[:, 0, 0] = float("nan")
    assert torch.isfinite(region_mass(bad, masks)).all()


def test_known_fraction_and_signed_maps():
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, :2] = True  # top half
    m = torch.ones(1, 4, 4)
    m[0, :2] = 3.0  # top half holds 3/4 of the mass
    assert region_mass(m, masks, normalize=False).item() == pytest.approx(0.75)
    # min-max normalisation: bottom half becomes 0 -> all mass in the top half
    assert region_mass(m, masks).item() == pytest.approx(1.0)
    # signed maps are read by magnitude
    assert region_mass(-m, masks, normalize=False).item() == pytest.approx(0.75)
    empty = torch.zeros(1, 4, 4, dtype=torch.bool)
    assert region_mass(m, empty).item() == 0.0


def test_pointing_game_ties_tolerance_and_misses():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[:, 4:, 4:] = True
    m = torch.zeros(2, 8, 8)
    m[0, 1, 1] = 1.0  # maximum outside
    m[1, 5, 5] = 1.0
    assert pointing_game(m, masks).tolist() == [0.0, 1.0]
    # tie: the first maximum in row-major order counts
    tie = torch.zeros(1, 8, 8)
    tie[0, 0, 0] = tie[0, 6, 6] = 1.0
    assert pointing_game(tie, masks[:1]).item() == 0.0
    tie2 = torch.zeros(1, 8, 8)
    tie2[0, 5, 5] = tie2[0, 7, 0] = 1.0
    assert pointing_game(tie2, masks[:1]).item() == 1.0
    # tolerance grows the mask: (3, 3) is one pixel away from the mask corner (4, 4)
    near = torch.zeros(1, 8, 8)
    near[0, 3, 3] = 1.0
    assert pointing_game(near, masks[:1]).item() == 0.0
    assert pointing_game(near, masks[:1], tolerance=1).item() == 1.0
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(near, masks[:1], tolerance=-1)


def test_shape_errors_say_what_to_do():
    with pytest.raises(ValueError, match="resize"):
        region_mass(torch.rand(2, 8, 8), torch.ones(2, 16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        region_mass(torch.rand(2, 1, 8, 8), torch.ones(2, 8, 8, dtype=torch.bool))


class _PatchReader(nn.Module):
    """Reads only a fixed 6x6 patch of the input (a shortcut): a small CNN applied to ``x * patch``."""

    def __init__(self, size: int = 24):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)
        mask = torch.zeros(1, 1, size, size)
        mask[..., 2:8, 2:8] = 1.0
        self.register_buffer("patch", mask)

    def forward(self, x):
        a = torch.tanh(self.conv(x * self.patch))
        return self.head(a.mean(dim=(2, 3)))


def test_model_reading_a_fixed_patch_has_spurious_mass_near_one():
    model = _PatchReader().eval()
    x = torch.randn(8, 3, 24, 24)
    spurious = torch.zeros(8, 24, 24, dtype=torch.bool)
    spurious[:, 2:8, 2:8] = True
    maps = attribute(model, x, None, methods=("gradient",))["gradient"]
    mass = region_mass(maps, spurious)
    area = spurious.float().mean().item()
    assert mass.min().item() > 0.99, mass
    assert mass.mean().item() > 10 * area
    assert pointing_game(maps, spurious).mean().item() == 1.0


def test_doctests_of_the_metrics_package_pass():
    names = ("localization", "stability", "disparity", "faithfulness", "sanity")
    for module in (metrics_pkg, *(importlib.import_module(f"lightning_saliency.metrics.{n}") for n in names)):
        failed, _ = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
        assert failed == 0, module.__name__


def test_metrics_never_import_lightning():
    import ast
    import pathlib

    folder = pathlib.Path(metrics_pkg.__file__).parent
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            assert not any(n.split(".")[0] in ("lightning", "pytorch_lightning") for n in names), path
