"""audit_shard, summarize and merge without a Trainer: known answers, per-group keys, sharding, periodic rows and
errors recorded instead of raised."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_saliency.audit import ALL_METRICS, AuditSpec, audit_shard, merge, summarize
from lightning_saliency.metrics.registry import metric_names, register_metric, unregister_metric
from lightning_saliency.probe import ProbeSet

# A linear model on 1x4x4 images: the gradient of logit c is W[c] whatever the input, so the "gradient" map of an
# image explained as class c is |W[c]| = the ramp 0..15 (class 0) or its reverse 15..0 (class 1), and its min-max
# normalisation is ramp / 15.
RAMP = torch.arange(16.0)


def _linear_model() -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([RAMP, 15.0 - RAMP]))
    return model


def _probe(n: int = 4) -> ProbeSet:
    top = torch.zeros(n, 4, 4, dtype=torch.bool)
    top[:, :2] = True  # pixels 0..7
    left = torch.zeros(n, 4, 4, dtype=torch.bool)
    left[:, :, 0] = True  # pixels 0, 4, 8, 12
    labels = torch.tensor([0, 1] * (n // 2))
    groups = ["a", "b"] * (n // 2)  # group a: class 0 images, group b: class 1 images
    return ProbeSet(torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(0)), labels, groups=groups,
                    object_masks=top, spurious_masks=left)


SPEC = dict(methods=("gradient",), target="label")


def test_known_answers_of_the_map_metrics_and_their_group_values():
    probe = _probe()
    spec = AuditSpec(metrics=("object_mass", "spurious_mass", "pointing_game", "attention_disparity",
                              "group_divergence"), **SPEC)
    result = audit_shard(_linear_model(), probe, spec)
    assert torch.allclose(result.maps["gradient"][0], RAMP.reshape(4, 4))
    out = summarize(result, probe, spec)
    # object mass: inside pixels 0..7, sum(0..7) / sum(0..15) = 28 / 120 for class 0, 92 / 120 for class 1
    assert out["gradient/object_mass/a"] == pytest.approx(28 / 120)
    assert out["gradient/object_mass/b"] == pytest.approx(92 / 120)
    assert out["gradient/object_mass"] == pytest.approx(0.5)
    # spurious mass: pixels 0, 4, 8, 12 hold 24 / 120 (class 0) and 36 / 120 (class 1)
    assert out["gradient/spurious_mass/a"] == pytest.approx(0.2)
    assert out["gradient/spurious_mass/b"] == pytest.approx(0.3)
    # the maximum: pixel 15 (not in the top half) for class 0, pixel 0 (in it) for class 1
    assert (out["gradient/pointing_game/a"], out["gradient/pointing_game/b"]) == (0.0, 1.0)
    # disparity: the gap between the groups' spurious mass; divergence: 1 - Pearson(ramp, reversed ramp) = 2
    assert out["gradient/attention_disparity"] == pytest.approx(0.1)
    assert out["gradient/group_divergence"] == pytest.approx(2.0)
    correct = (_linear_model()(probe.inputs).argmax(1) == probe.targets).float()
    assert out["probe/accuracy"] == pytest.approx(float(correct.mean()))
    assert out["probe/accuracy/a"] == pytest.approx(float(correct[0::2].mean()))
    assert out["probe/accuracy/class_1"] == pytest.approx(float(correct[1::2].mean()))
    assert not result.errors


def test_drift_compares_with_the_previous_audit_and_keeps_ranks_for_the_next():
    probe, model = _probe(), _linear_model()
    spec = AuditSpec(metrics=("drift",), **SPEC)
    first = audit_shard(model, probe, spec)
    assert "gradient/drift" not in first.per_image  # nothing to compare with yet
    assert first.ranks["gradient"].shape == (4, 16)
    again = audit_shard(model, probe, spec, previous_ranks=first.ranks)
    assert again.per_image["gradient/drift"].tolist() == [1.0] * 4
    with torch.no_grad():  # swap the classes' weights: every map's ranking is reversed
        model[1].weight.copy_(model[1].weight.flip(0))
    flipped = audit_shard(model, probe, spec, previous_maps=first.maps)
    assert flipped.per_image["gradient/drift"].tolist() == pytest.approx([-1.0] * 4)


def test_no_groups_no_group_keys_and_no_masks_no_mask_metrics():
    probe = ProbeSet(torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 0, 1]))
    spec = AuditSpec(metrics=("object_mass", "spurious_mass", "attention_disparity", "group_divergence", "drift"),
                     **SPEC)
    out = summarize(audit_shard(_linear_model(), probe, spec), probe, spec)
    assert not [k for k in out if k.startswith("gradient/")]


def test_merging_two_shards_equals_the_unsharded_audit():
    probe, model = _probe(6), _linear_model()
    # the noisy and random draws of the subset metrics are made per shard: as under DDP, their images (the
    # first 3 of the whole probe) lie in one shard, so the draws match the unsharded audit's
    spec = AuditSpec(methods=("gradient", "input_x_gradient"), target="label", metrics=ALL_METRICS,
                     stability_images=3, expensive_images=3)
    whole = audit_shard(model, probe, spec)
    assert probe.shard(0, 2).indices.tolist() == [0, 1, 2]
    shards = [audit_shard(model, probe.shard(rank, 2), spec, full_probe=probe) for rank in (1, 0)]
    merged = merge(shards)
    assert merged.indices.tolist() == list(range(6))
    assert set(merged.per_image) == set(whole.per_image)
    for key, values in whole.per_image.items():
        assert torch.allclose(merged.per_image[key], values, equal_nan=True, atol=1e-6), key
    for key, maps in whole.maps.items():
        assert torch.equal(merged.maps[key], maps)
    a, b = summarize(whole, probe, spec), summarize(merged, probe, spec)
    assert set(a) == set(b)
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-6, nan_ok=True), key
    # the subset metrics cover their first images only (by position in the whole probe), NaN elsewhere
    assert torch.isnan(whole.per_image["gradient/stability"][3:]).all()
    assert torch.isfinite(whole.per_image["gradient/stability"][:3]).all()
    assert torch.isfinite(whole.per_image["gradient/deletion_auc_random"][:3]).all()
    assert "gradient/completeness_gap" not in whole.per_image  # signed methods only
    assert "input_x_gradient/completeness_gap" in whole.per_image


def test_periodic_metrics_are_skipped_when_not_expensive():
    probe = _probe()
    spec = AuditSpec(metrics=("stability", "deletion_auc", "object_mass", "drift"), **SPEC)
    cheap = audit_shard(_linear_model(), probe, spec, expensive=False)
    assert sorted(cheap.per_image) == ["gradient/object_mass"]
    full = audit_shard(_linear_model(), probe, spec)
    assert sorted(full.per_image) == ["gradient/deletion_auc", "gradient/deletion_auc_random", "gradient/object_mass",
                                      "gradient/stability"]
    assert set(metric_names(periodic=True)) >= {"stability", "deletion_auc"}


def test_a_failing_metric_is_recorded_not_raised():
    def broken(maps, probe):
        raise RuntimeError("no luck")

    register_metric("broken_metric", broken, higher_is_better=True)
    try:
        probe = _probe()
        spec = AuditSpec(metrics=("broken_metric", "object_mass"), **SPEC)
        with pytest.warns(RuntimeWarning, match="'broken_metric' of 'gradient' failed"):
            result = audit_shard(_linear_model(), probe, spec, on_error="warn")
        assert result.errors == [{"method": "gradient", "type": "RuntimeError", "message": "no luck"}]
        assert "gradient/object_mass" in result.per_image  # the others still ran
        with pytest.raises(RuntimeError, match="no luck"):
            audit_shard(_linear_model(), probe, spec, on_error="raise")
    finally:
        unregister_metric("broken_metric")


def test_nan_values_are_left_out_of_the_means():
    from lightning_saliency.audit import ShardResult

    probe = _probe()
    result = ShardResult(indices=torch.arange(4), predictions=probe.targets.clone(),
                         per_image={"m/object_mass": torch.tensor([0.2, math.nan, 0.4, 0.6])})
    out = summarize(result, probe, AuditSpec(metrics=("object_mass",), **SPEC))
    assert out["m/object_mass"] == pytest.approx(0.4)
    assert out["m/object_mass/a"] == pytest.approx(0.3) and out["m/object_mass/b"] == pytest.approx(0.6)
