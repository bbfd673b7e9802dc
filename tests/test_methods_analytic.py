"""Analytic checks of the attribution formulas (issue 2, point 2): models small enough that the right map is
known in closed form, so each method is compared against the maths, not against another implementation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_saliency.maps import normalize, resize
from lightning_saliency.methods import attribute
from lightning_saliency.methods.gradients import ig_alphas
from lightning_saliency.methods.registry import builtin_names


def _linear(C=3, H=5, W=4, K=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, K))


class GapNet(nn.Module):
    """conv -> ReLU -> conv (target layer ``features``) -> GAP -> linear."""

    def __init__(self, K=6, classes=5, inplace=False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=inplace))
        self.features = nn.Conv2d(8, K, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(K, classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(self.stem(x))).flatten(1))


def test_linear_model_gradient_is_abs_weight_max_over_channels():
    C, H, W = 3, 5, 4
    model = _linear(C, H, W)
    x = torch.randn(3, C, H, W)
    targets = torch.tensor([0, 2, 3])
    maps = attribute(model, x, targets, methods=("gradient", "input_x_gradient", "smoothgrad",
                                                 "integrated_gradients"), smoothgrad_samples=4)
    weight = model[1].weight.detach().reshape(-1, C, H, W)[targets]
    expected = weight.abs().amax(dim=1)
    torch.testing.assert_close(maps["gradient"], expected)
    # a linear model's gradient is the same everywhere, so SmoothGrad equals the plain gradient
    torch.testing.assert_close(maps["smoothgrad"], expected)
    # input x gradient and IG (zero baseline) are both sum_c x_c W_c for a linear model
    torch.testing.assert_close(maps["input_x_gradient"], (x * weight).sum(1))
    torch.testing.assert_close(maps["integrated_gradients"], (x * weight).sum(1), atol=1e-5, rtol=1e-5)


def test_contrast_on_linear_model_uses_weight_difference():
    C, H, W = 2, 3, 3
    model = _linear(C, H, W, K=3)
    x = torch.randn(2, C, H, W)
    p, q = torch.tensor([0, 1]), torch.tensor([2, 0])
    maps = attribute(model, x, p, methods=("gradient", "input_x_gradient"), contrast=q)
    weight = model[1].weight.detach().reshape(-1, C, H, W)
    diff = weight[p] - weight[q]
    torch.testing.assert_close(maps["gradient"], diff.abs().amax(1))
    torch.testing.assert_close(maps["input_x_gradient"], (x * diff).sum(1))


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
def test_integrated_gradients_completeness_on_smooth_model(method):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(), nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x = torch.randn(2, 3, 8, 8) * 2
    targets = torch.tensor([0, 2])
    baseline = torch.full_like(x, 0.1)
    maps = attribute(model, x, targets, methods="integrated_gradients", ig_steps=64, ig_method=method,
                     ig_baseline=0.1)
    with torch.no_grad():
        gain = (model(x) - model(baseline)).gather(1, targets[:, None]).squeeze(1)
    gap = (maps["integrated_gradients"].sum(dim=(1, 2)) - gain).abs() / gain.abs()
    assert (gain.abs() > 1e-3).all()
    assert gap.max() < 1e-3, gap


def test_ig_rules_integrate_polynomials():
    for method, steps in [("gausslegendre", 8), ("riemann_trapezoid", 201), ("riemann_middle", 200)]:
        alphas, weights = ig_alphas(steps, method)
        assert abs(float(weights.sum()) - 1.0) < 1e-12
        assert abs(float((weights * alphas**3).sum()) - 0.25) < 1e-4


class OneChannelHead(nn.Module):
    """Target layer ``conv`` has 3 channels; the score of every class reads channel 1 only."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, stride=2, padding=1)
        self.head = nn.Linear(1, 4)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[2.0], [0.5], [1.0], [3.0]]))

    def forward(self, x):
        a = self.conv(x)
        return self.head(torch.nn.functional.softplus(a[:, 1:2].mean(dim=(2, 3))))


def test_gradcam_equals_the_one_channel_that_matters():
    torch.manual_seed(2)
    model = OneChannelHead()
    x = torch.randn(3, 3, 16, 16)
    maps = attribute(model, x, torch.tensor([0, 1, 3]), methods=("gradcam", "hirescam", "layercam", "gradcam++"),
                     layer="conv")
    with torch.no_grad():
        channel = model.conv(x)[:, 1]
    expected = normalize(resize(torch.relu(channel), (16, 16)))
    for name in ("gradcam", "hirescam", "layercam", "gradcam++"):
        assert maps[name].shape == (3, 16, 16)
        torch.testing.assert_close(normalize(maps[name]), expected, atol=1e-5, rtol=1e-4, msg=name)


def test_cam_equals_gradcam_on_gap_linear_head_up_to_positive_factor():
    torch.manual_seed(3)
    model = GapNet()
    x = torch.randn(4, 3, 16, 16)
    targets = torch.tensor([0, 1, 2, 4])
    maps = attribute(model, x, targets, methods=("cam", "gradcam"), layer="features")
    hw = 8 * 8  # features is 8x8: alpha_k = W[c, k] / (h w)
    assert maps["cam"].abs().sum() > 0
    torch.testing.assert_close(maps["gradcam"] * hw, maps["cam"], atol=1e-5, rtol=1e-4)
    # and with a contrast: W[P] - W[Q]
    maps = attribute(model, x, targets, methods=("cam", "gradcam"), layer="features", contrast=3)
    torch.testing.assert_close(maps["gradcam"] * hw, maps["cam"], atol=1e-5, rtol=1e-4)
    # CAM by hand
    with torch.no_grad():
        A = model.features(model.stem(x))
    w = model.fc.weight.detach()[targets] - model.fc.weight.detach()[3]
    expected = resize(torch.relu((w[:, :, None, None] * A).sum(1)), (16, 16))
    torch.testing.assert_close(maps["cam"], expected, atol=1e-5, rtol=1e-4)


def test_cam_without_gap_linear_head_says_use_gradcam():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 8),
                          nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="gradcam"):
        attribute(model, torch.randn(2, 3, 12, 12), methods="cam", layer="1")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 8),
                          nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="gradcam"):
        attribute(model, torch.randn(2, 3, 12, 12), methods="cam", layer="1")


class HalfBlind(nn.Module):
    """Looks only at the left half of the image (columns < 8)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, 2))

    def forward(self, x):
        mask = torch.zeros_like(x)
        mask[..., :8] = 1
        return self.net(x * mask)


def test_occlusion_of_ignored_region_is_zero():
    torch.manual_seed(5)
    model = HalfBlind()
    x = torch.randn(2, 3, 16, 16) + 1
    maps = attribute(model, x, methods="occlusion", occlusion_patch=4, occlusion_stride=4)["occlusion"]
    # patch 4 / stride 4 never straddles column 8; but the model's 3x3 conv at column 7 sees column 8 only
    # through the zeroed mask, so everything right of the mask is ignored
    assert maps[..., 8:].abs().max() < 1e-5
    assert maps[..., :8].abs().max() > 1e-3
    # overlapping patches: pixels covered only by patches inside the ignored half are zero too
    maps = attribute(model, x, methods="occlusion", occlusion_patch=4, occlusion_stride=2)["occlusion"]
    assert maps[..., 11:].abs().max() < 1e-5
    # by hand for one patch: the drop in score when the top-left 4x4 patch is zeroed
    occluded = x.clone()
    occluded[:, :, :4, :4] = 0
    maps = attribute(model, x, torch.tensor([1, 0]), methods="occlusion", occlusion_patch=4,
                     occlusion_stride=4)["occlusion"]
    with torch.no_grad():
        drop = (model(x) - model(occluded)).gather(1, torch.tensor([[1], [0]])).squeeze(1)
    torch.testing.assert_close(maps[:, 0, 0], drop, atol=1e-5, rtol=1e-4)


def test_guided_backprop_matches_hand_rule():
    torch.manual_seed(6)
    lin1, lin2 = nn.Linear(12, 7), nn.Linear(7, 3)
    model = nn.Sequential(nn.Flatten(), lin1, nn.ReLU(inplace=True), lin2)
    x = torch.randn(2, 3, 2, 2)
    targets = torch.tensor([0, 2])
    maps = attribute(model, x, targets, methods=("guided_backprop",))["guided_backprop"]
    with torch.no_grad():
        pre = lin1(x.flatten(1))
    w2 = lin2.weight.detach()[targets]  # [N, 7]
    grad_hidden = torch.relu(w2) * (pre > 0)
    guided = (grad_hidden @ lin1.weight.detach()).reshape(2, 3, 2, 2)
    torch.testing.assert_close(maps, guided.abs().amax(1))


def test_guided_gradcam_is_guided_times_gradcam():
    torch.manual_seed(7)
    model = GapNet(inplace=True)
    x = torch.randn(2, 3, 16, 16)
    maps = attribute(model, x, methods=("guided_gradcam", "guided_backprop", "gradcam"), layer="features")
    torch.testing.assert_close(maps["guided_gradcam"], maps["guided_backprop"] * maps["gradcam"])


def test_guided_backprop_without_relu_modules_is_a_clear_error():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(12, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x.flatten(1))))

    with pytest.raises(ValueError, match="nn.ReLU"):
        attribute(Functional(), torch.randn(2, 3, 2, 2), methods="guided_backprop")
    unused = Functional()
    unused.spare = nn.ReLU()  # present but never called
    with pytest.raises(ValueError, match="nn.ReLU"):
        attribute(unused, torch.randn(2, 3, 2, 2), methods="guided_backprop")


def test_every_method_returns_finite_float32_maps_at_input_resolution():
    torch.manual_seed(8)
    model = GapNet(inplace=True)
    x = torch.randn(3, 3, 16, 12)
    maps = attribute(model, x, methods=builtin_names(), layer="features", smoothgrad_samples=3, ig_steps=4,
                     occlusion_patch=4, occlusion_stride=4)
    assert list(maps) == list(builtin_names())
    for name, m in maps.items():
        assert m.shape == (3, 16, 12), name
        assert m.dtype == torch.float32, name
        assert not m.requires_grad, name
        assert torch.isfinite(m).all(), name
        assert m.abs().sum() > 0, name
