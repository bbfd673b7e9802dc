"""Causal tests of a region (metrics/causal.py): known answers for a model that reads only the region and one
that ignores it, the fill, confirmation of a discovery candidate against its null, and the probe-level rows."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_saliency.metrics import blurred_fill, confirm, spurious_erase_drop, spurious_flip_rate

S = 16
REGION = (slice(0, 4), slice(0, 4))


def _region_mask(n: int) -> torch.Tensor:
    m = torch.zeros(n, S, S, dtype=torch.bool)
    m[:, REGION[0], REGION[1]] = True
    return m


class ReadsRegion(nn.Module):
    """Logit k = mean of channel k over the region, plus a bias 0.5 on class 0; the probe holds classes 1 and 2,
    coded by a bright region in their channel: correct on every clean image, class 0 once the region is gone."""

    def forward(self, x):
        z = x[:, :, REGION[0], REGION[1]].mean(dim=(2, 3))
        return z + torch.tensor([0.5, 0.0, 0.0])


class IgnoresRegion(nn.Module):
    """Reads only pixels outside every mask: logit k = mean of channel k over the right half (where the probe
    codes the label a second time)."""

    def forward(self, x):
        return x[:, :, :, S // 2 :].mean(dim=(2, 3))


def _coded_probe(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([1, 2] * (n // 2))
    x = 0.05 * torch.rand(n, 3, S, S, generator=g)  # dim background (every channel), below the 0.5 bias
    for i, y in enumerate(labels.tolist()):
        x[i, y, REGION[0], REGION[1]] = 2.0
        x[i, y, :, S - 4 :] = 1.0  # the label again, far from the region
    return x, labels


def test_a_model_that_reads_only_the_region_flips_every_swap_and_loses_all_accuracy_when_it_is_erased():
    x, y = _coded_probe()
    model = ReadsRegion()
    assert bool((model(x).argmax(1) == y).all())
    r = spurious_flip_rate(model, x, y, _region_mask(len(y)))
    assert r["flip"].tolist() == [1.0] * len(y)
    assert bool((r["logit_gain"] > 1.0).all())  # each swap moves the margin by about 2 x 2 (both logits)
    assert bool((y[r["donor"]] != y).all())
    drop = spurious_erase_drop(model, x, y, _region_mask(len(y)))
    assert drop.tolist() == [1.0] * len(y)  # accuracy 1.0 -> 0.0: the full drop


def test_a_model_that_ignores_the_region_gives_exactly_zero():
    x, y = _coded_probe()
    model = IgnoresRegion()
    r = spurious_flip_rate(model, x, y, _region_mask(len(y)))
    finite = r["flip"][torch.isfinite(r["flip"])]
    assert len(finite) > 0 and finite.sum().item() == 0.0
    assert r["logit_gain"].abs().max().item() == 0.0
    assert spurious_erase_drop(model, x, y, _region_mask(len(y))).abs().max().item() == 0.0


def test_an_image_already_predicted_as_its_donors_class_cannot_flip_and_is_left_out():
    x, y = _coded_probe()
    model = ReadsRegion()
    x[0, 1] = 0.0
    x[0, 2, REGION[0], REGION[1]] = 2.0  # a class-1 image that reads as class 2: its donor's class
    r = spurious_flip_rate(model, x, y, _region_mask(len(y)))
    assert math.isnan(r["flip"][0].item())
    # the others flip, except where image 0 (whose region codes class 2) is the donor
    assert r["flip"][1:].tolist() == [0.0 if d == 0 else 1.0 for d in r["donor"][1:].tolist()]


def test_one_class_has_no_donor_and_gives_nan_with_a_warning():
    x, _ = _coded_probe()
    with pytest.warns(UserWarning, match="no donor"):
        r = spurious_flip_rate(ReadsRegion(), x, torch.ones(len(x), dtype=torch.long), _region_mask(len(x)))
    assert bool(r["flip"].isnan().all()) and r["donor"].tolist() == [-1] * len(x)


def test_the_fill_comes_from_outside_the_region_and_leaves_the_rest_untouched():
    x = torch.rand(3, 3, S, S)
    m = _region_mask(3)
    x_bright = x.clone()
    x_bright[:, :, REGION[0], REGION[1]] = 100.0
    filled = blurred_fill(x_bright, m)
    assert torch.equal(filled[:, :, ~m[0]], x_bright[:, :, ~m[0]])  # outside: untouched
    assert torch.allclose(filled, blurred_fill(x, m))  # inside: nothing of the region's own pixels
    assert float(filled[:, :, REGION[0], REGION[1]].max()) <= float(x.max())
    # a constant image is filled with the constant; a mask over the whole image still gives finite values
    assert torch.allclose(blurred_fill(torch.full((1, 1, S, S), 0.3), m[:1]), torch.full((1, 1, S, S), 0.3))
    assert bool(torch.isfinite(blurred_fill(x, torch.ones(3, S, S, dtype=torch.bool))).all())


def test_confirm_flips_other_classes_for_a_region_the_model_reads_and_not_for_its_null():
    x, y = _coded_probe(12)
    cand = {"class": 2, "members": (y == 2).nonzero()[:, 0].tolist(), "mask": _region_mask(1)[0]}
    r = confirm(ReadsRegion(), x, y, cand, seed=0)
    assert r["flip_rate"] == 1.0 and r["erase_accuracy_drop"] == 1.0 and r["recipients"] == 6
    assert r["null_flip_rate"] < 0.34 and r["confirmed"]  # a random 4x4 region rarely overlaps the code
    assert r["logit_gain"] > r["null_logit_gain"]
    ignore = confirm(IgnoresRegion(), x, y, cand, seed=0)
    assert ignore["flip_rate"] == 0.0 and ignore["erase_accuracy_drop"] == 0.0 and not ignore["confirmed"]
    # when the rest of the class holds the same content in the region, it is the class's own feature, not
    # something of the members: the rest-of-class null flips as much and the candidate is not confirmed
    half = confirm(ReadsRegion(), x, y, {**cand, "members": cand["members"][:3]}, seed=0)
    assert half["flip_rate"] == 1.0 and half["rest_flip_rate"] == 1.0 and not half["confirmed"]
    assert math.isnan(r["rest_flip_rate"])  # every class-2 image is a member: no rest, that null is left out
    # the thresholds are settable: a null_ratio no flip rate can reach
    assert not confirm(ReadsRegion(), x, y, cand, null_ratio=1e9)["confirmed"] or r["null_flip_rate"] == 0.0
    assert not confirm(ReadsRegion(), x, y, cand, min_flip=1.01)["confirmed"]


def test_confirm_and_the_swap_leave_the_model_and_the_global_rng_alone():
    x, y = _coded_probe(12)
    model = IgnoresRegion().train()
    before = torch.random.get_rng_state()
    cand = {"class": 2, "members": [1, 3, 5], "mask": _region_mask(1)[0]}
    a = confirm(model, x, y, cand, seed=3)
    b = confirm(model, x, y, cand, seed=3)
    spurious_flip_rate(model, x, y, _region_mask(12), seed=3)
    assert model.training and torch.equal(torch.random.get_rng_state(), before)
    assert {k: v for k, v in a.items() if k != "mask"} == {k: v for k, v in b.items() if k != "mask"}
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="members"):
        confirm(model, x, y, {**cand, "members": [40]})
    with pytest.raises(ValueError, match="no members"):
        confirm(model, x, y, {**cand, "members": []})


def test_the_probe_level_rows_report_probe_keys_per_group_and_only_with_spurious_masks():
    from lightning_saliency.audit import AuditSpec, audit_shard, summarize
    from lightning_saliency.metrics.registry import alarm_mode, get_metric, metric_of_key
    from lightning_saliency.probe import ProbeSet

    x, y = _coded_probe()
    groups = ["a", "b"] * 2 + ["b", "a"] * 2
    probe = ProbeSet(x, y, groups=groups, spurious_masks=_region_mask(len(y)))
    names = ("spurious_flip_rate", "spurious_logit_gain", "spurious_erase_drop")
    spec = AuditSpec(methods=("gradient",), metrics=names)
    out = summarize(audit_shard(ReadsRegion(), probe, spec, on_error="raise"), probe, spec)
    assert out["probe/spurious_flip_rate"] == 1.0 and out["probe/spurious_erase_drop"] == 1.0
    assert out["probe/spurious_flip_rate/a"] == 1.0 and out["probe/spurious_logit_gain"] > 1.0
    assert not any(k.startswith("gradient/spurious_") for k in out)
    assert all(get_metric(n).probe_level and get_metric(n).periodic for n in names)
    assert metric_of_key("probe/spurious_erase_drop")[0].name == "spurious_erase_drop"
    assert alarm_mode("probe/spurious_flip_rate") == "max"
    plain = ProbeSet(x, y)
    assert not any("spurious" in k for k in summarize(audit_shard(ReadsRegion(), plain, spec), plain, spec))
    skipped = audit_shard(ReadsRegion(), probe, spec, expensive=False)  # periodic: skipped between audits
    assert not any("spurious" in k for k in skipped.per_image)


def test_a_shard_draws_its_donors_from_the_whole_probe():
    from lightning_saliency.audit import AuditSpec, audit_shard
    from lightning_saliency.probe import ProbeSet

    x, y = _coded_probe(8)
    probe = ProbeSet(x, y, spurious_masks=_region_mask(len(y)))
    spec = AuditSpec(methods=("gradient",), metrics=("spurious_flip_rate",))
    whole = audit_shard(IgnoresRegion(), probe, spec).per_image["probe/spurious_flip_rate"]
    shard = audit_shard(IgnoresRegion(), probe.shard(1, 2), spec, full_probe=probe)
    assert torch.allclose(shard.per_image["probe/spurious_flip_rate"], whole[4:], equal_nan=True)
    alien = ProbeSet(x[:2], y[:2], spurious_masks=_region_mask(2), indices=[40, 41])
    wrong = audit_shard(IgnoresRegion(), alien, spec, on_error="collect", full_probe=probe)
    assert "probe/spurious_flip_rate" not in wrong.per_image and "not in full_probe" in str(wrong.errors)
    full = spurious_flip_rate(ReadsRegion(), x, y, _region_mask(8), seed=5)
    part = spurious_flip_rate(ReadsRegion(), x[4:], y[4:], _region_mask(4), seed=5,
                              pool=(x, y, _region_mask(8)), positions=torch.arange(4, 8))
    assert torch.equal(part["donor"], full["donor"][4:]) and torch.equal(part["logit_gain"], full["logit_gain"][4:])


def _reference_fill(x, m, sigma):
    """The fill's formula on the whole image, with no window: G*(x·keep) / G*keep, sigma doubled where the
    normaliser is below 1e-3."""
    from lightning_saliency.patches import gaussian_blur

    keep = (~m).unsqueeze(1).float()
    fill, todo, s = torch.zeros_like(x), m.unsqueeze(1).expand_as(x).clone(), sigma
    while bool(todo.any()) and s <= 2 * S:
        den = gaussian_blur(keep, s)
        ok = (den > 1e-3).expand_as(x) & todo
        fill = torch.where(ok, gaussian_blur(x * keep, s) / den.clamp_min(1e-3), fill)
        todo &= ~ok
        s *= 2
    return torch.where(m.unsqueeze(1), fill, x)


def test_the_windowed_fill_equals_the_whole_image_formula_for_shared_and_per_image_masks():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, S, S, generator=g)
    corner = _region_mask(4)  # one mask shared by every image, at the image's edge
    centre = torch.zeros(4, S, S, dtype=torch.bool)
    centre[:, 6:11, 5:12] = True
    scattered = torch.rand(4, S, S, generator=g) > 0.9  # a different mask per image
    for m in (corner, centre, scattered):
        assert torch.allclose(blurred_fill(x, m), _reference_fill(x, m, 1.5), atol=1e-5)
    assert torch.allclose(blurred_fill(x, corner[0]), blurred_fill(x, corner))  # [H, W] is the shared form


class Counting(nn.Module):
    """ReadsRegion that counts its forward passes and the images they hold."""

    def __init__(self):
        super().__init__()
        self.calls, self.images = 0, 0

    def forward(self, x):
        self.calls += 1
        self.images += len(x)
        return ReadsRegion()(x)


def test_given_the_logits_confirm_runs_one_forward_and_agrees_with_computing_them():
    x, y = _coded_probe(12)
    cand = {"class": 2, "members": (y == 2).nonzero()[:, 0].tolist()[:4], "mask": _region_mask(1)[0]}
    counted = Counting()
    with torch.no_grad():
        logits = ReadsRegion()(x)
    given = confirm(counted, x, y, cand, logits=logits, seed=0)
    # one batch: 6 pastes, 6 random-region pastes, 6 from the rest of the class, the 4 members erased
    assert counted.calls == 1 and counted.images == 6 + 6 + 6 + 4
    computed = confirm(Counting(), x, y, cand, seed=0)
    assert {k: v for k, v in given.items() if k != "mask"} == {k: v for k, v in computed.items() if k != "mask"}


def test_at_most_max_recipients_are_pasted_onto_drawn_by_the_seed():
    x, y = _coded_probe(40)  # 20 images of class 1: the recipients of a class-2 candidate
    cand = {"class": 2, "members": (y == 2).nonzero()[:, 0].tolist()[:5], "mask": _region_mask(1)[0]}
    assert confirm(ReadsRegion(), x, y, cand, max_recipients=None)["recipients"] == 20
    counted = Counting()
    capped = confirm(counted, x, y, cand, max_recipients=8, seed=2)
    assert capped["recipients"] == 8 and counted.images == 40 + 8 * 3 + 5  # the probe, 3 pastes of 8, 5 erased
    assert capped["flip_rate"] == 1.0 and capped == confirm(ReadsRegion(), x, y, cand, max_recipients=8, seed=2)
    counted = Counting()  # the members erased are capped alike: 3 of the 5
    few = confirm(counted, x, y, cand, max_recipients=3, seed=2)
    assert few["recipients"] == 3 and counted.images == 40 + 3 * 3 + 3 and few["erase_accuracy_drop"] == 1.0
    with pytest.raises(ValueError, match="max_recipients"):
        confirm(ReadsRegion(), x, y, cand, max_recipients=0)


class Flattens(nn.Module):
    """ReadsRegion behind a ``.view`` of its input, which a channels-last batch cannot take."""

    def forward(self, x):
        return ReadsRegion()(x.view(len(x), -1).view(x.shape))


def test_a_model_that_cannot_take_a_channels_last_batch_gets_the_batch_as_it_came():
    x, y = _coded_probe(12)
    with pytest.raises(RuntimeError):
        Flattens()(x.contiguous(memory_format=torch.channels_last))
    cand = {"class": 2, "members": (y == 2).nonzero()[:, 0].tolist()[:4], "mask": _region_mask(1)[0]}
    got, want = confirm(Flattens(), x, y, cand), confirm(ReadsRegion(), x, y, cand)
    assert {k: v for k, v in got.items() if k != "mask"} == {k: v for k, v in want.items() if k != "mask"}
