"""randomization_similarity (Adebayo et al. 2018): Grad-CAM of a trained model depends on its weights, an
edge detector does not; the trained model is never touched."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_saliency.methods.engine import attribute
from lightning_saliency.metrics import randomization_similarity


class BlobNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 4x4 blob anywhere on noise: class 1 bright, class 0 dark."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, 1, 16, 16, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    rows, cols = torch.randint(0, 12, (2, n), generator=g)
    for i in range(n):
        x[i, 0, rows[i] : rows[i] + 4, cols[i] : cols[i] + 4] += 4.0 * y[i] - 2.0
    return x, y


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = BlobNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = _blobs(128, seed=0)
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    xt, yt = _blobs(16, seed=1)
    assert (model(xt).argmax(1) == yt).float().mean() >= 0.9  # it learned the task
    return model.eval(), xt, yt


def _gradcam(model, x, t):
    return attribute(model, x, t, methods=("gradcam",), layer="features.2")["gradcam"]


def _edges(model, x, t):
    """Sobel edge magnitude of the input: a 'method' that ignores the model."""
    k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    weight = torch.stack([k, k.T]).unsqueeze(1)
    g = F.conv2d(x.mean(1, keepdim=True), weight, padding=1)
    return g.pow(2).sum(1).sqrt()


def test_gradcam_of_trained_model_is_clearly_below_an_edge_detector(trained):
    model, x, y = trained
    edges = randomization_similarity(model, _edges, x, y, mode="all")["all"]
    cam = randomization_similarity(model, _gradcam, x, y, mode="all")["all"]
    assert torch.equal(edges, torch.ones(len(x)))
    assert cam.mean() < 0.5, cam
    assert cam.mean() < edges.mean() - 0.5


# a randomised model's Grad-CAM is often all zero: the defined value 0.0 comes with a warning
@pytest.mark.filterwarnings("ignore::lightning_saliency.metrics.UndefinedMetricWarning")
def test_cascading_and_independent_modes(trained):
    model, x, y = trained
    maps = _gradcam(model, x, y)
    casc = randomization_similarity(model, _gradcam, x, y, mode="cascading", maps=maps)
    assert list(casc) == ["cascading/head", "cascading/features", "all"]
    assert torch.equal(casc["all"], casc["cascading/features"])
    # the last cascade step and the all-at-once copy have the same weights
    assert torch.equal(
        casc["all"], randomization_similarity(model, _gradcam, x, y, mode="all", maps=maps)["all"]
    )
    ind = randomization_similarity(model, _gradcam, x, y, mode="independent", maps=maps)
    assert list(ind) == ["independent/head", "independent/features", "all"]
    assert torch.equal(ind["all"], casc["all"])
    for v in (*casc.values(), *ind.values()):
        assert v.shape == (len(x),) and torch.isfinite(v).all()
    # explicit units, dotted names
    sub = randomization_similarity(model, _gradcam, x, y, mode="cascading", layers=["head", "features.2"])
    assert list(sub) == ["cascading/head", "cascading/features.2", "all"]
    with pytest.raises(ValueError, match="no module named"):
        randomization_similarity(model, _gradcam, x, y, layers=["haed"])
    with pytest.raises(ValueError, match="mode"):
        randomization_similarity(model, _gradcam, x, y, mode="bottom-up")


@pytest.mark.filterwarnings("ignore::lightning_saliency.metrics.UndefinedMetricWarning")
def test_the_trained_model_and_rng_are_never_touched(trained):
    model, x, y = trained
    model.train()
    params = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    flags = [m.training for m in model.modules()]
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    for mode in ("all", "cascading", "independent"):
        randomization_similarity(model, _gradcam, x, None, mode=mode)
    after = model.state_dict(keep_vars=True)
    assert all(torch.equal(params[k].detach(), after[k].detach()) for k in params)  # bitwise equal
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    model.eval()


def test_seeded_and_custom_parameters_are_randomised():
    class WithRawParam(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.gain = nn.Parameter(torch.ones(4))  # the model's own parameter, no reset_parameters

        def forward(self, x):
            return (self.conv(x) * self.gain.view(1, -1, 1, 1)).mean(dim=(2, 3))

    torch.manual_seed(0)
    model = WithRawParam()
    x = torch.randn(3, 1, 8, 8)
    seen = []

    def explain(m, inp, t):
        seen.append(m.gain.detach().clone())
        return m.conv(inp).abs().sum(1)

    a = randomization_similarity(model, explain, x, torch.zeros(3, dtype=torch.long), mode="all", seed=3)
    b = randomization_similarity(model, explain, x, torch.zeros(3, dtype=torch.long), mode="all", seed=3)
    assert torch.equal(a["all"], b["all"])
    assert torch.equal(seen[0], torch.ones(4)) and not torch.equal(seen[1], torch.ones(4))
    assert torch.equal(model.gain.detach(), torch.ones(4))


@pytest.mark.filterwarnings("ignore::lightning_saliency.metrics.UndefinedMetricWarning")
def test_default_units_look_through_a_lightning_wrapper(trained):
    import pytorch_lightning as pl

    model, x, y = trained

    class Wrapped(pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.model = net

        def forward(self, inp):
            return self.model(inp)

    wrapped = Wrapped(model).eval()
    out = randomization_similarity(wrapped, lambda m, xi, ti: _gradcam(m.model, xi, ti), x, y, mode="cascading")
    assert list(out) == ["cascading/model.head", "cascading/model.features", "all"]
    direct = randomization_similarity(model, _gradcam, x, y, mode="cascading")
    assert torch.equal(out["all"], direct["all"])  # same units, same seeds, same weights
