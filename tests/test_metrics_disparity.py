"""attention_disparity and group_divergence: known answers, small and single groups reported, no NaN."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lightning_saliency.metrics import UndefinedMetricWarning, attention_disparity, group_divergence


def test_same_maps_in_two_groups_have_zero_disparity_and_divergence():
    maps = torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1)
    groups = ["a"] * 3 + ["b"] * 3
    values = torch.tensor([0.1, 0.5, 0.9, 0.1, 0.5, 0.9])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = attention_disparity(values, groups)
        g = group_divergence(maps, groups)
    assert d["disparity"] == pytest.approx(0.0, abs=1e-12)
    assert d["counts"] == {"a": 3, "b": 3} and d["small_groups"] == []
    assert g["divergence"] == pytest.approx(0.0, abs=1e-6)
    assert list(g["per_pair"]) == [("a", "b")]


def test_disparity_known_answer_three_groups():
    values = [0.1, 0.3, 0.5, 0.7, 0.2, 0.2]
    groups = ["site1", "site1", "site2", "site2", "site0", "site0"]
    r = attention_disparity(values, groups)
    assert r["per_group"] == pytest.approx({"site0": 0.2, "site1": 0.2, "site2": 0.6})
    assert r["disparity"] == pytest.approx(0.4)
    assert list(r["per_group"]) == ["site0", "site1", "site2"]  # ordered by name


def test_small_groups_are_reported_not_dropped():
    with pytest.warns(UndefinedMetricWarning, match="fewer than 2"):
        r = attention_disparity([0.1, 0.2, 0.9], ["a", "a", "b"])
    assert r["small_groups"] == ["b"] and r["counts"] == {"a": 2, "b": 1}
    assert r["disparity"] == pytest.approx(0.75)  # b takes part
    maps = torch.rand(3, 6, 6)
    with pytest.warns(UndefinedMetricWarning, match="fewer than 2"):
        g = group_divergence(maps, ["a", "a", "b"])
    assert g["small_groups"] == ["b"] and math.isfinite(g["divergence"])


def test_single_group_and_empty_probe_give_zero_with_warning():
    with pytest.warns(UndefinedMetricWarning, match="two groups"):
        r = attention_disparity(torch.tensor([0.3, 0.4]), ["only", "only"])
    assert r["disparity"] == 0.0 and r["per_group"] == pytest.approx({"only": 0.35})
    with pytest.warns(UndefinedMetricWarning, match="two groups"):
        g = group_divergence(torch.rand(2, 4, 4), ["only", "only"])
    assert g["divergence"] == 0.0 and g["per_pair"] == {}
    with pytest.warns(UndefinedMetricWarning):
        assert attention_disparity(torch.tensor([]), [])["disparity"] == 0.0


def test_non_finite_values_are_left_out_with_a_warning():
    with (
        pytest.warns(UndefinedMetricWarning, match="non-finite"),
        pytest.warns(UndefinedMetricWarning, match="fewer"),
    ):
        r = attention_disparity([0.2, float("nan"), 0.6, 0.8], ["a", "a", "b", "b"])
    assert r["counts"]["a"] == 1 and r["per_group"]["a"] == pytest.approx(0.2)
    assert r["disparity"] == pytest.approx(0.5)


def test_group_divergence_known_answers():
    ramp = torch.linspace(0, 1, 64).reshape(1, 8, 8)
    maps = torch.cat([ramp, ramp, 1 - ramp, 1 - ramp])
    g = group_divergence(maps, ["x", "x", "y", "y"])
    assert g["divergence"] == pytest.approx(2.0, abs=1e-6)  # r = -1
    left = torch.zeros(1, 8, 8)
    left[..., :4] = 1.0
    top = torch.zeros(1, 8, 8)
    top[..., :4, :] = 1.0
    with pytest.warns(UndefinedMetricWarning, match="fewer than 2"):
        g = group_divergence(torch.cat([left, top, left]), ["p", "q", "r"])
    assert g["per_pair"][("p", "r")] == pytest.approx(0.0, abs=1e-6)
    assert g["per_pair"][("p", "q")] == pytest.approx(1.0, abs=1e-6)  # orthogonal halves: r = 0
    assert g["divergence"] == pytest.approx(1.0, abs=1e-6)
    assert g["counts"] == {"p": 1, "q": 1, "r": 1}


def test_constant_group_means_are_defined():
    zero = torch.zeros(2, 6, 6)
    ramp = torch.linspace(0, 1, 36).reshape(1, 6, 6).repeat(2, 1, 1)
    with pytest.warns(UndefinedMetricWarning):
        g = group_divergence(torch.cat([zero, zero]), ["a", "a", "b", "b"])
    assert g["divergence"] == 0.0
    with pytest.warns(UndefinedMetricWarning):
        g = group_divergence(torch.cat([zero, ramp]), ["a", "a", "b", "b"])
    assert g["divergence"] == pytest.approx(1.0)


def test_label_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="one label per image"):
        attention_disparity([0.1, 0.2], ["a"])
    with pytest.raises(ValueError, match="one label per image"):
        group_divergence(torch.rand(2, 4, 4), ["a", "b", "c"])
