"""deletion/insertion AUC, infidelity and completeness_gap: known answers, no side effects, no NaN."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_saliency.methods.engine import attribute
from lightning_saliency.metrics import (
    UndefinedMetricWarning,
    completeness_gap,
    deletion_auc,
    gaussian_blur,
    infidelity,
    insertion_auc,
)


class WeightedSum(nn.Module):
    """Logit 1 = (Σ w·x − bias)·scale (a known weighted sum of pixels), logit 0 = 0: p(1) = sigmoid(logit 1)."""

    def __init__(self, size: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.rand(3, size, size, generator=g) ** 4)
        self.register_buffer("bias", torch.tensor(0.0))
        self.register_buffer("scale", torch.tensor(1.0))

    def raw(self, x):
        return (x * self.w).sum(dim=(1, 2, 3))

    def forward(self, x):
        s = (self.raw(x) - self.bias) * self.scale
        return torch.stack([torch.zeros_like(s), s], dim=1)

    def calibrate(self, x, base):
        """Put p(x) near 0.98 and p(baseline) near 0.02, so the curve spans the probability range."""
        with torch.no_grad():
            s1, s0 = self.raw(x).mean(), self.raw(base).mean()
            self.bias.fill_((s1 + s0) / 2)
            self.scale.fill_(8.0 / (s1 - s0))
        return self


def _positive_inputs(n=6, size=16, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) + 0.5


def _structured_inputs(model, n=6, seed=1):
    """Bright where the weights are large: blurring moves that brightness to pixels the model ignores."""
    g = torch.Generator().manual_seed(seed)
    w = model.w.detach()
    return 0.2 + 4.0 * (w / w.max()) * torch.rand(n, *w.shape, generator=g)


def test_true_relevance_ranking_beats_random_for_deletion_and_insertion():
    model = WeightedSum()
    x = _structured_inputs(model)
    t = torch.ones(6, dtype=torch.long)
    for baseline in ("zeros", "blur"):
        base = torch.zeros_like(x) if baseline == "zeros" else gaussian_blur(x, 1.5)
        model.calibrate(x, base)
        relevance = (x * model.w.detach()).sum(dim=1)  # the exact contribution of each pixel
        d = deletion_auc(model, x, t, relevance, steps=16, baseline=baseline)
        i = insertion_auc(model, x, t, relevance, steps=16, baseline=baseline)
        assert (d["auc"] < d["random_auc"] - 0.1).all(), (baseline, d)
        assert (i["auc"] > i["random_auc"] + 0.1).all(), (baseline, i)
        assert d["curve"].shape == (6, 17) and d["random_curve"].shape == (6, 17)
        # the reverse ranking is worse than random
        worst = deletion_auc(
            model, x, t, relevance.amax(dim=(1, 2), keepdim=True) - relevance, baseline=baseline
        )
        assert (worst["auc"] > worst["random_auc"]).all()


def test_curve_end_points_and_trapezoid():
    model, x = WeightedSum(), _positive_inputs(n=2)
    t = torch.ones(2, dtype=torch.long)
    m = torch.rand(2, 16, 16)
    d = deletion_auc(model, x, t, m, steps=4, baseline="zeros")
    i = insertion_auc(model, x, t, m, steps=4, baseline="zeros")
    p_x = model(x).softmax(1)[:, 1]
    p_0 = model(torch.zeros_like(x)).softmax(1)[:, 1]
    torch.testing.assert_close(d["curve"][:, 0], p_x)
    torch.testing.assert_close(d["curve"][:, -1], p_0)
    torch.testing.assert_close(i["curve"][:, 0], p_0)
    torch.testing.assert_close(i["curve"][:, -1], p_x)
    c = d["curve"]
    manual = (c[:, 0] / 2 + c[:, 1:-1].sum(1) + c[:, -1] / 2) / 4
    torch.testing.assert_close(d["auc"], manual)


def test_constant_logits_and_single_class_model_give_defined_auc():
    class Constant(nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k = k
            self.dummy = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.zeros(x.shape[0], self.k) + self.dummy

    x, m = _positive_inputs(n=3), torch.rand(3, 16, 16)
    r = deletion_auc(Constant(4), x, None, m, steps=5)
    assert torch.allclose(r["auc"], torch.full((3,), 0.25)) and torch.allclose(r["random_auc"], r["auc"])
    r = insertion_auc(Constant(1), x, None, m, steps=5)  # a single-class model: p = 1
    assert torch.allclose(r["auc"], torch.ones(3))


def test_all_zero_map_uses_the_random_ranking():
    model, x = WeightedSum(), _positive_inputs(n=3)
    with pytest.warns(UndefinedMetricWarning, match="random ranking"):
        d = deletion_auc(model, x, None, torch.zeros(3, 16, 16))
    assert torch.isfinite(d["auc"]).all()
    torch.testing.assert_close(d["auc"], d["random_auc"])
    assert "random_auc" not in deletion_auc(model, x, None, torch.rand(3, 16, 16), random_reference=False)


def test_batching_does_not_change_results_and_model_is_untouched():
    model, x = WeightedSum(), _positive_inputs(n=5)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = torch.rand(5, 16, 16)
    a = deletion_auc(model, x, None, m, steps=8, batch_size=None)
    b = deletion_auc(model, x, None, m, steps=8, batch_size=7)
    torch.testing.assert_close(a["auc"], b["auc"])
    torch.testing.assert_close(a["random_auc"], b["random_auc"])
    assert model.training and model.w.grad is None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    state = torch.get_rng_state()
    insertion_auc(model, x, None, m, steps=4)
    assert torch.equal(torch.get_rng_state(), state)


def test_training_flags_restored_on_error():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            raise RuntimeError("boom")

    model = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        deletion_auc(model, _positive_inputs(n=2), torch.zeros(2, dtype=torch.long), torch.rand(2, 16, 16))
    assert model.training and model.bn.training


def test_gaussian_blur():
    const = torch.full((1, 2, 9, 9), 3.0)
    torch.testing.assert_close(gaussian_blur(const, 2.0), const)
    x = torch.rand(2, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    b = gaussian_blur(x, 2.0)
    assert b.var() < 0.2 * x.var()
    # interior pixel equals the explicit 2-D Gaussian weighted sum
    r = 6
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k1 = torch.exp(-0.5 * (t / 2.0) ** 2)
    k2 = torch.outer(k1, k1) / k1.sum() ** 2
    expected = (x[0, 1, 10 - r : 10 + r + 1, 10 - r : 10 + r + 1] * k2).sum()
    torch.testing.assert_close(b[0, 1, 10, 10], expected)
    torch.testing.assert_close(gaussian_blur(x, 0.0), x)



def test_a_blur_first_made_under_inference_mode_still_backpropagates_the_gaussian():
    """The blur matrices are cached; one first built under ``inference_mode`` must still enter autograd later,
    and the gradient of an interior output pixel is the Gaussian itself."""
    from lightning_saliency.patches import _blur_matrix

    _blur_matrix.cache_clear()
    with torch.inference_mode():
        gaussian_blur(torch.rand(1, 1, 20, 20), 2.0)
    x = torch.rand(1, 1, 20, 20, requires_grad=True)
    (g,) = torch.autograd.grad(gaussian_blur(x, 2.0)[0, 0, 10, 10], [x])
    t = torch.arange(-6, 7, dtype=torch.float32)
    k1 = torch.exp(-0.5 * (t / 2.0) ** 2) / torch.exp(-0.5 * (t / 2.0) ** 2).sum()
    torch.testing.assert_close(g[0, 0, 4:17, 4:17], torch.outer(k1, k1))
    assert float(g.sum()) == pytest.approx(1.0, abs=1e-5) and _blur_matrix.cache_info().hits >= 2

class LinearModel(nn.Module):
    def __init__(self, size=8):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * size * size, 4)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_infidelity_of_exact_linear_attribution_is_zero():
    model, x = LinearModel(), torch.randn(3, 3, 8, 8)
    t = torch.tensor([0, 2, 3])
    w = model.fc.weight.detach()[t].reshape(3, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact_full = infidelity(model, x, t, w, n_perturb=8)
        # [N, H, W]: per-pixel noise shared by the channels; the channel-summed gradient is exact too
        exact_map = infidelity(model, x, t, w.sum(1), n_perturb=8)
    assert exact_full.max() < 1e-8 and exact_map.max() < 1e-8
    wrong = infidelity(model, x, t, torch.rand(3, 8, 8), n_perturb=8)
    assert (wrong > 1e-3).all()
    # normalize=True: a scaled exact attribution is still exact
    assert infidelity(model, x, t, 7.0 * w, normalize=True).max() < 1e-8
    assert infidelity(model, x, t, 7.0 * w).min() > 1e-3
    assert torch.isfinite(infidelity(model, x, t, torch.zeros(3, 8, 8))).all()


def test_infidelity_is_seeded_and_batched_consistently():
    model, x = LinearModel(), torch.randn(3, 3, 8, 8)
    m = torch.rand(3, 8, 8)
    a = infidelity(model, x, None, m, n_perturb=6, seed=4)
    assert torch.equal(a, infidelity(model, x, None, m, n_perturb=6, seed=4))
    assert not torch.equal(a, infidelity(model, x, None, m, n_perturb=6, seed=5))
    calls = []
    real = model.forward

    def spy(z):
        calls.append(z.shape[0])
        return real(z)

    model.forward = spy
    infidelity(model, x, None, m, n_perturb=5, batch_size=6)
    assert max(calls) <= 6


class SmoothCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.Softplus(), nn.Conv2d(8, 8, 3, padding=1)
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.features(x)).mean(dim=(2, 3)))


def test_integrated_gradients_completeness_gap_near_zero():
    model = SmoothCNN().eval()
    x = torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    t = model(x).argmax(1)
    maps = attribute(model, x, t, methods=("integrated_gradients", "input_x_gradient"), ig_steps=32)
    gap = completeness_gap(model, x, t, maps["integrated_gradients"], baseline=0.0)
    assert gap.max() < 0.01, gap
    # input x gradient is complete only for a linear model: its gap is clearly larger here
    assert completeness_gap(model, x, t, maps["input_x_gradient"]).mean() > 10 * gap.mean()
    rand = completeness_gap(model, x, t, torch.rand(4, 10, 10))
    assert (rand > 0.5).all()


def test_completeness_gap_exact_linear_and_undefined_case():
    model, x = LinearModel(), torch.randn(2, 3, 8, 8)
    t = torch.tensor([1, 1])
    ixg = (x * model.fc.weight.detach()[1].reshape(3, 8, 8)).sum(1)
    baseline_logits = model(torch.zeros_like(x))
    assert completeness_gap(model, x, t, ixg).max() < 1e-4
    # x == baseline: y(x) - y(x') = 0, the ratio is undefined -> absolute gap, with a warning
    with pytest.warns(UndefinedMetricWarning, match="absolute"):
        g = completeness_gap(model, x, t, torch.full((2, 8, 8), 0.01), baseline=x)
    torch.testing.assert_close(g, torch.full((2,), 0.64))
    assert torch.isfinite(baseline_logits).all()


def test_bad_shapes_are_clear_errors():
    model, x = LinearModel(), torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="resize"):
        deletion_auc(model, x, None, torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="fit neither"):
        infidelity(model, x, None, torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="baseline"):
        deletion_auc(model, x, None, torch.rand(2, 8, 8), baseline="gray")
