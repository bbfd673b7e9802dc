"""fragility / fragility_random (Ghorbani et al. 2019, issue 13 point 3): known answers, the attack's contract
(class kept, within the ball, model and RNG untouched), the surrogate, the fallbacks and the monitor."""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_saliency import SaliencyMonitor
from lightning_saliency.audit import DEFAULT_METRICS, AuditSpec, audit_shard, summarize
from lightning_saliency.methods import attribute
from lightning_saliency.metrics import UndefinedMetricWarning, fragility, fragility_random, fragility_scores
from lightning_saliency.metrics.fragility import gradient_attackable, softplus_surrogate, top_k_mask
from lightning_saliency.probe import ProbeSet
from tests import monitor_utils as U


def _cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)).eval()


def _images(seed: int, n: int = 16, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class FunctionalReLU(nn.Module):
    """ReLU applied with F.relu in forward: nothing for the surrogate to swap."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8 * 16 * 16, 3)

    def forward(self, x):
        return self.head(F.relu(self.conv(x)).flatten(1))


def test_linear_model_gradient_map_is_not_fragile():
    """The gradient map of a linear model is |W| whatever x is: no attack and no noise can move it."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    x = _images(0, n=6, size=8)
    r = fragility_scores(lin, x, method="gradient", epsilon=0.2, steps=4)
    assert r["fragility"].tolist() == [0.0] * 6
    assert r["random"].tolist() == [0.0] * 6
    assert torch.equal(fragility(lin, x, method="gradient"), torch.zeros(6))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_attack_beats_random_noise_on_a_relu_cnn(seed):
    """Measured (16 images, 16 px, defaults), attack/control for seeds 0-4: gradient 0.57/0.25, 0.53/0.24,
    0.63/0.27, 0.48/0.26, 0.43/0.22; Grad-CAM 0.48/0.06, 0.44/0.06, 0.20/0.04, 0.16/0.05 (the smallest
    margin, 0.11) and, seed 4, constant maps (NaN) for some images of the untrained net."""
    model, x = _cnn(seed), _images(seed)
    for method in ("gradient", "gradcam"):
        r = fragility_scores(model, x, method=method, layer="4", seed=seed)
        assert bool(r["gradient"].all()), "every image must have been attacked along the surrogate's gradient"
        attack, control = float(r["fragility"].nanmean()), float(r["random"].nanmean())
        assert attack > control + 0.1, (method, attack, control)
        assert 0.0 <= control and attack <= 1.0


def test_attacked_inputs_keep_the_class_and_stay_in_the_ball_and_range():
    model, x = _cnn(0), _images(0)
    eps = 0.03
    r = fragility_scores(model, x, method="gradient", epsilon=eps, value_range=(0.0, 1.0))
    xa = r["inputs"]
    assert not torch.equal(xa, x), "the attack must have moved some inputs"
    assert float((xa - x).abs().max()) <= eps + 1e-6
    assert float(xa.min()) >= 0.0 and float(xa.max()) <= 1.0
    with torch.no_grad():
        assert torch.equal(model(xa).argmax(1), model(x).argmax(1))
    # by default each image's own range bounds it, and ε is 2 % of that range
    own = fragility_scores(model, x, method="gradient")["inputs"]
    lo, hi = x.flatten(1).amin(1), x.flatten(1).amax(1)
    assert bool((own.flatten(1).amin(1) >= lo).all() and (own.flatten(1).amax(1) <= hi).all())
    assert bool(((own - x).flatten(1).abs().amax(1) <= 0.02 * (hi - lo) + 1e-6).all())
    # the value reported is the one of the inputs returned, measured on the real model
    m0 = attribute(model, x, model(x).argmax(1), methods=("gradient",))["gradient"]
    ma = attribute(model, xa, model(x).argmax(1), methods=("gradient",))["gradient"]
    k = round(0.08 * 16 * 16)
    inter = (top_k_mask(m0, k) & top_k_mask(ma, k)).sum(1).float() / k
    assert torch.allclose(r["fragility"], 1 - inter)


def test_a_step_that_changes_the_class_is_rejected():
    """Images a hair from the decision boundary: random corners of the ball flip many of them, yet the inputs
    the attack keeps (and measures) carry the original classes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 2)).eval()
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 3, 16, 16, generator=g)
    x = base + 0.002 * torch.randn(8, 3, 16, 16, generator=g)
    with torch.no_grad():
        gap = model(base)[0]
        model[-1].bias[0] -= gap[0] - gap[1]  # the base image sits on the boundary
        p0 = model(x).argmax(1)
        flipped = model(x + 0.05 * (torch.randint(0, 2, x.shape, generator=g) * 2 - 1)).argmax(1) != p0
    assert 0 < int(p0.sum()) < 8 and bool(flipped.any()), "the set-up must put classes at stake"
    for method in ("gradient", "gradcam"):
        r = fragility_scores(model, x, method=method, epsilon=0.05, layer="1")
        with torch.no_grad():
            assert torch.equal(model(r["inputs"]).argmax(1), p0), method


def test_model_and_global_rng_untouched():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).train()
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    fragility_scores(model, _images(0, n=4), method="gradcam", layer="2")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model[0].weight.requires_grad and model[1].weight.requires_grad
    assert type(model[2]) is nn.ReLU
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])


def test_same_seed_same_values_and_the_control_depends_on_the_seed():
    model, x = _cnn(0), _images(0, n=8)
    a = fragility_scores(model, x, method="gradient", seed=5)
    b = fragility_scores(model, x, method="gradient", seed=5)
    c = fragility_scores(model, x, method="gradient", seed=6)
    assert torch.equal(a["fragility"], b["fragility"]) and torch.equal(a["random"], b["random"])
    assert not torch.equal(a["random"], c["random"])


def test_surrogate_is_a_softplus_copy():
    model = _cnn(0)
    sur, swapped = softplus_surrogate(model, beta=7.0)
    assert swapped == 2 and [type(m) for m in model if isinstance(m, (nn.ReLU, nn.Softplus))] == [nn.ReLU] * 2
    assert [m.beta for m in sur if isinstance(m, nn.Softplus)] == [7.0, 7.0]
    assert not any(p.requires_grad for p in sur.parameters()) and all(p.requires_grad for p in model.parameters())


def test_which_methods_are_attacked_by_gradient_comes_from_the_registry():
    assert [m for m in ("cam", "gradcam", "gradcam++", "hirescam", "layercam", "gradient", "input_x_gradient")
            if gradient_attackable(m)] == ["cam", "gradcam", "gradcam++", "hirescam", "layercam", "gradient",
                                           "input_x_gradient"]
    assert not any(gradient_attackable(m) for m in ("smoothgrad", "integrated_gradients", "guided_backprop",
                                                     "guided_gradcam", "occlusion"))


def test_methods_without_a_gradient_use_the_random_search_within_the_same_budget():
    """Occlusion: the search is the control's own draws, so its best draw >= their mean, and no image is
    marked as attacked by gradient."""
    model, x = _cnn(0), _images(0, n=6)
    r = fragility_scores(model, x, method="occlusion", epsilon=0.1, occlusion_patch=4, occlusion_stride=4)
    assert not bool(r["gradient"].any())
    assert bool((r["fragility"] >= r["random"]).all()) and float(r["fragility"].sum()) > 0


def test_functional_relu_falls_back_to_the_random_search():
    """F.relu cannot be swapped: the surrogate's gradient map has zero gradient, so the images are searched."""
    model, x = FunctionalReLU().eval(), _images(0, n=4)
    r = fragility_scores(model, x, method="gradient")
    assert not bool(r["gradient"].any())
    assert bool((r["fragility"] >= r["random"]).all()) and bool(torch.isfinite(r["fragility"]).all())


def test_constant_maps_are_nan_with_a_warning():
    model, x = _cnn(0), _images(0, n=3)
    zeros = torch.zeros(3, 16, 16)
    with pytest.warns(UndefinedMetricWarning, match="no top-k"):
        r = fragility_scores(model, x, method="gradient", maps=zeros, explain=lambda xi, ti: zeros[: len(xi)])
    assert all(math.isnan(v) for v in r["fragility"].tolist() + r["random"].tolist())


def test_bad_arguments_are_clear_errors():
    model, x = _cnn(0), _images(0, n=2)
    with pytest.raises(ValueError, match="did you mean 'gradcam'"):
        fragility(model, x, method="gradcm")
    with pytest.raises(ValueError, match="steps"):
        fragility(model, x, steps=0)
    with pytest.raises(ValueError, match="k must"):
        fragility(model, x, k=0)
    with pytest.raises(ValueError, match="whole number of pixels"):
        fragility(model, x, k=1000)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        fragility(model, x[0])


def test_fragility_random_is_the_control_of_the_same_call():
    model, x = _cnn(2), _images(2, n=4)
    r = fragility_scores(model, x, method="gradient", k=20)
    assert torch.equal(fragility_random(model, x, method="gradient", k=20), r["random"])
    assert torch.equal(fragility(model, x, method="gradient", k=20), r["fragility"])


def test_audit_reports_both_keys_for_every_method():
    torch.manual_seed(0)
    model = _cnn(0)
    probe = ProbeSet(_images(0, n=6), torch.tensor([0, 1, 2] * 2))
    spec = AuditSpec(methods=("gradient", "gradcam", "input_x_gradient", "occlusion"), metrics=("fragility",),
                     layer="4", method_options={"occlusion_patch": 4, "occlusion_stride": 4})
    summary = summarize(audit_shard(model, probe, spec, on_error="raise"), probe, spec)
    for m in spec.methods:
        assert math.isfinite(summary[f"{m}/fragility"]) and math.isfinite(summary[f"{m}/fragility_random"])
    assert summary["gradcam/fragility"] > summary["gradcam/fragility_random"]


def test_monitor_fit_writes_finite_fragility_for_every_method(tmp_path):
    """Acceptance 3 (part): a 2-epoch fit with the default metrics plus fragility writes both keys, finite and
    in [0, 1], for a gradient-attacked method of each family and for occlusion (random-restart search)."""
    methods = ("gradcam", "gradient", "occlusion")
    monitor = SaliencyMonitor(U.probe(), methods=methods, metrics=(*DEFAULT_METRICS, "fragility"),
                              expensive_every_n_audits=1, log_images=0)
    trainer, _ = U.fit([monitor], tmp_path, max_epochs=2)
    with open(os.path.join(trainer.log_dir, "saliency", "report.json")) as f:
        audits = json.load(f)["audits"]
    assert len(audits) == 2
    for audit in audits:
        assert not audit["errors"]
        for m in methods:
            for key in (f"{m}/fragility", f"{m}/fragility_random"):
                value = audit["metrics"][key]
                assert value is not None and 0.0 <= value <= 1.0, (key, value)


def test_surrogate_maps_are_the_engine_maps_on_a_network_without_relu():
    """With nothing to swap, the surrogate's differentiable maps are the engine's maps (CAM: HiResCAM's formula,
    equal to CAM up to the pool's 1/hw on a global-average-pool + linear head)."""
    from lightning_saliency.metrics.fragility import _Surrogate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 5, 3, padding=1), nn.Tanh(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).eval()
    x = _images(0, n=3, size=8)
    t = torch.tensor([0, 1, 2])
    methods = ("cam", "gradcam", "gradcam++", "hirescam", "layercam", "gradient", "input_x_gradient")
    ref = attribute(model, x, t, methods=methods, layer="3")
    for m in methods:
        got = _Surrogate.build(model, m, 30.0, "3", None, x[:1]).map(x.clone().requires_grad_(True), t)
        want = ref[m].abs() / (64 if m == "cam" else 1)  # cam: the pool averages 8x8 activations
        assert torch.allclose(got.detach(), want, rtol=1e-4, atol=1e-6), m


def test_an_image_scores_the_same_whichever_images_it_is_scored_with():
    """Per-image range, ε and seeds: a DDP shard scores its images as the whole probe does."""
    model, x = _cnn(0), _images(0, n=8)
    whole = fragility_scores(model, x, method="gradient")
    part = fragility_scores(model, x[3:6], method="gradient", positions=torch.tensor([3, 4, 5]))
    assert torch.equal(part["random"], whole["random"][3:6])
    assert torch.equal(part["fragility"], whole["fragility"][3:6])
    shifted = fragility_scores(model, x[3:6], method="gradient")  # positions 0..2: other draws
    assert not torch.equal(shifted["random"], whole["random"][3:6])
