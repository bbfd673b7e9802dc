"""Issue 4, acceptance 4: no metric returns NaN for an all-zero map or a single-class probe; every undefined
case returns its documented value with an UndefinedMetricWarning."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_saliency.metrics import (
    UndefinedMetricWarning,
    attention_disparity,
    completeness_gap,
    deletion_auc,
    drift,
    group_divergence,
    infidelity,
    insertion_auc,
    max_sensitivity,
    pointing_game,
    randomization_similarity,
    region_mass,
    stability,
)

N, S = 4, 8


class Net(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))


def _zero_explain(x, t):
    return torch.zeros(x.shape[0], S, S)


def _all_metrics(model, x, t, maps, groups):
    masks = torch.zeros(N, S, S, dtype=torch.bool)
    masks[:, :3, :3] = True
    values = {
        "region_mass": region_mass(maps, masks),
        "pointing_game": pointing_game(maps, masks),
        "stability": stability(lambda xi, ti: maps.repeat_interleave(len(xi) // N, 0), x, t, k=2),
        "max_sensitivity": max_sensitivity(
            lambda xi, ti: maps.repeat_interleave(len(xi) // N, 0), x, t, n_perturb=2
        ),
        "drift": drift(maps, maps),
        "attention_disparity": attention_disparity(region_mass(maps, masks), groups)["disparity"],
        "group_divergence": group_divergence(maps, groups)["divergence"],
        "deletion_auc": deletion_auc(model, x, t, maps, steps=4)["auc"],
        "insertion_auc": insertion_auc(model, x, t, maps, steps=4)["auc"],
        "infidelity": infidelity(model, x, t, maps, n_perturb=3),
        "completeness_gap": completeness_gap(model, x, t, maps),
        "randomization_similarity": randomization_similarity(model, lambda m, xi, ti: maps, x, t)["all"],
    }
    for name, v in values.items():
        v = torch.as_tensor(v)
        assert torch.isfinite(v).all(), (name, v)
    return values


@pytest.mark.filterwarnings("ignore::lightning_saliency.metrics.UndefinedMetricWarning")
@pytest.mark.parametrize("classes", [3, 1])
def test_all_zero_maps_single_class_single_group(classes):
    model = Net(classes)
    x = torch.randn(N, 3, S, S, generator=torch.Generator().manual_seed(0))
    t = torch.zeros(N, dtype=torch.long)  # a single-class probe
    v = _all_metrics(model, x, t, torch.zeros(N, S, S), ["g"] * N)
    area = 9 / 64
    assert v["region_mass"].tolist() == pytest.approx([area] * N)
    assert v["pointing_game"].tolist() == pytest.approx([area] * N)
    assert v["stability"].tolist() == [1.0] * N and v["drift"].tolist() == [1.0] * N
    assert v["max_sensitivity"].tolist() == [0.0] * N
    assert v["attention_disparity"] == 0.0 and v["group_divergence"] == 0.0
    assert v["randomization_similarity"].tolist() == [1.0] * N
    if classes == 1:
        assert v["deletion_auc"].tolist() == pytest.approx([1.0] * N)


def test_each_undefined_case_warns():
    model, x = Net(), torch.randn(N, 3, S, S)
    t = torch.zeros(N, dtype=torch.long)
    zero, masks = torch.zeros(N, S, S), torch.ones(N, S, S, dtype=torch.bool)
    calls = [
        lambda: region_mass(zero, masks),
        lambda: pointing_game(zero, masks),
        lambda: stability(_zero_explain, x, t, k=1),
        lambda: max_sensitivity(_zero_explain, x, t, n_perturb=1),
        lambda: drift(zero, zero),
        lambda: attention_disparity(torch.ones(N), ["g"] * N),
        lambda: group_divergence(zero, ["a", "a", "b", "b"]),
        lambda: deletion_auc(model, x, t, zero, steps=2),
        lambda: insertion_auc(model, x, t, zero, steps=2),
        lambda: completeness_gap(model, x, t, zero, baseline=x),
    ]
    for call in calls:
        with pytest.warns(UndefinedMetricWarning):
            out = call()
        flat = out.values() if isinstance(out, dict) else [out]
        assert all(not isinstance(o, float) or math.isfinite(o) for o in flat)
