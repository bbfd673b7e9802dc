"""Numeric agreement with Captum (issue 4, acceptance 2): infidelity and max_sensitivity against
``captum.metrics.infidelity`` and ``captum.metrics.sensitivity_max`` on the same inputs, the same
perturbations (one seeded perturbation function fed to both) and the same batching: rel. diff <= 1e-4."""

from __future__ import annotations

import pytest
import torch
from captum.metrics import infidelity as captum_infidelity
from captum.metrics import sensitivity_max
from torch import nn

from lightning_saliency.methods.engine import attribute
from lightning_saliency.metrics import infidelity, max_sensitivity

RTOL = 1e-4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def setup():
    model = Net().eval()
    x = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    t = model(x).argmax(1)
    return model, x, t


def _noise_factory(sigma: float, seed: int, per_pixel: bool = False):
    """A fresh seeded perturbation draw for each caller: ``I`` shaped like the expanded inputs."""
    g = torch.Generator().manual_seed(seed)

    def noise(x: torch.Tensor) -> torch.Tensor:
        if per_pixel:  # one value per pixel, shared by the channels
            return sigma * torch.randn(x.shape[0], 1, *x.shape[2:], generator=g).expand_as(x)
        return sigma * torch.randn(x.shape, generator=g)

    return noise


def _captum_perturb(noise):
    def perturb(x):
        i = noise(x)
        return i, x - i

    return perturb


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs() / b.abs().clamp_min(1e-12)).max().item()


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("batch_size", [None, 10])
def test_infidelity_matches_captum_input_shaped_attributions(setup, normalize, batch_size):
    model, x, t = setup
    attr = attribute(model, x, t, methods=("gradient",))["gradient"]  # any attribution will do
    attr = attr.unsqueeze(1) * x  # input-shaped, signed
    ours = infidelity(
        model,
        x,
        t,
        attr,
        n_perturb=7,
        perturb=_noise_factory(0.2, 11),
        normalize=normalize,
        batch_size=batch_size,
    )
    ref = captum_infidelity(
        model, _captum_perturb(_noise_factory(0.2, 11)), x, attr, target=t, n_perturb_samples=7,
        normalize=normalize, max_examples_per_batch=batch_size,
    )  # fmt: skip
    assert ours.shape == (5,) and (ref > 0).all()
    assert _rel(ours, ref) <= RTOL, (ours, ref)


def test_infidelity_matches_captum_for_hw_maps(setup):
    """[N, H, W] maps: our per-pixel noise shared by the channels equals Captum's input-shaped noise and the
    map placed in one channel (Iᵀ M is the same sum)."""
    model, x, t = setup
    maps = attribute(model, x, t, methods=("input_x_gradient",))["input_x_gradient"]
    g = torch.Generator().manual_seed(5)

    def ours_noise(z):
        return 0.1 * torch.randn(z.shape[0], 1, *z.shape[2:], generator=g)

    ours = infidelity(model, x, t, maps, n_perturb=6, perturb=ours_noise)
    placed = torch.zeros_like(x)
    placed[:, 0] = maps
    ref = captum_infidelity(
        model,
        _captum_perturb(_noise_factory(0.1, 5, per_pixel=True)),
        x,
        placed,
        target=t,
        n_perturb_samples=6,
    )
    assert _rel(ours, ref) <= RTOL, (ours, ref)
    # and the default draw (per pixel; draw j of image i from a generator seeded by (seed, i, j)) is Captum's with
    # those draws, whatever batch_size chunks them into
    from lightning_saliency.metrics._common import _row_noise

    def rows(z):  # Captum's one chunk: the 6 draws of each image contiguous
        return 0.1 * _row_noise("normal", (1, *z.shape[2:]), 5, torch.arange(5).repeat_interleave(6),
                                torch.arange(6).repeat(5)).expand_as(z)

    ref = captum_infidelity(model, _captum_perturb(rows), x, placed, target=t, n_perturb_samples=6)
    for batch_size in (None, 2, 7):
        default = infidelity(model, x, t, maps, n_perturb=6, sigma=0.1, seed=5, batch_size=batch_size)
        assert _rel(default, ref) <= RTOL, batch_size


@pytest.mark.parametrize("method", ["gradient", "gradcam"])
@pytest.mark.parametrize("batch_size", [None, 10])
def test_max_sensitivity_matches_captum(setup, method, batch_size):
    model, x, t = setup

    def explain(inputs, target):
        return attribute(model, inputs, target, methods=(method,), layer="features.2")[method]

    def uniform_factory(radius, seed):
        g = torch.Generator().manual_seed(seed)
        return lambda z: z + radius * (2 * torch.rand(z.shape, generator=g) - 1)

    ours = max_sensitivity(
        explain, x, t, n_perturb=6, perturb=uniform_factory(0.05, 3), batch_size=batch_size
    )

    def captum_explain(inputs, target):  # Captum hands the clean inputs over as a 1-tuple, wants one back
        if isinstance(inputs, tuple):
            return (explain(inputs[0], target),)
        return explain(inputs, target)

    ref = sensitivity_max(
        captum_explain, x, perturb_func=uniform_factory(0.05, 3), n_perturb_samples=6, target=t,
        max_examples_per_batch=batch_size,
    )  # fmt: skip
    assert ours.shape == (5,) and (ref > 0).all()
    assert _rel(ours, ref) <= RTOL, (ours, ref)
