"""The metric registry: a registered metric is computed like a built-in, and the name-level facts of the rows
(direction, needs, periodic, extra keys) reach the alarm, the gate, the dashboards and the monitor."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import lightning_saliency
from lightning_saliency.audit import (
    ALL_METRICS,
    DEFAULT_METRICS,
    PERIODIC_METRICS,
    AuditSpec,
    audit_shard,
    summarize,
)
from lightning_saliency.gate import GateError, Rule, evaluate
from lightning_saliency.maps import normalize
from lightning_saliency.metrics.registry import (
    get_metric,
    metric_names,
    metric_table,
    register_metric,
    specs,
    unregister_metric,
)
from lightning_saliency.probe import ProbeSet
from lightning_saliency.sinks import custom_scalars_layout
from tests.report_fixtures import make_report_data

RAMP = torch.arange(16.0)


def _model() -> nn.Module:
    """Linear on 1x4x4: the gradient map of class 0 is the ramp 0..15, of class 1 the reversed ramp."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([RAMP, 15.0 - RAMP]))
    return model


def _probe() -> ProbeSet:
    x = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(1)) - 0.5
    return ProbeSet(x, torch.tensor([0, 1, 0, 1]), groups=["a", "b", "a", "b"])


def _corner(maps: torch.Tensor, probe: ProbeSet) -> torch.Tensor:
    """The normalised map's value at the top-left pixel."""
    assert len(probe) == maps.shape[0] and float(maps.min()) >= 0 and float(maps.max()) <= 1
    return maps[:, 0, 0]


@pytest.fixture
def corner():
    register_metric("corner", _corner, higher_is_better=True)
    yield
    unregister_metric("corner")


def test_registered_metric_reported_per_method_and_per_group(corner):
    probe = _probe()
    spec = AuditSpec(methods=("gradient", "input_x_gradient"), metrics=("corner", "object_mass"), target="label")
    result = audit_shard(_model(), probe, spec)
    out = summarize(result, probe, spec)
    # gradient: normalised ramp / 15 has 0 at the corner (class 0, group a), reversed ramp has 1 (class 1, group b)
    assert result.per_image["gradient/corner"].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert (out["gradient/corner"], out["gradient/corner/a"], out["gradient/corner/b"]) == (0.5, 0.0, 1.0)
    # input x gradient is signed: the metric sees |M| min-max normalised, like the built-ins
    expected = normalize(result.maps["input_x_gradient"].abs())[:, 0, 0]
    assert torch.allclose(result.per_image["input_x_gradient/corner"], expected)
    assert out["input_x_gradient/corner"] == pytest.approx(float(expected.mean()))
    assert out["input_x_gradient/corner/a"] == pytest.approx(float(expected[0::2].mean()))
    assert "gradient/object_mass" not in out  # the probe has no object masks: the built-in row is skipped


def test_per_group_false_and_periodic_registered_metric():
    register_metric("corner_once", _corner, higher_is_better=False, per_group=False, periodic=True)
    try:
        probe = _probe()
        spec = AuditSpec(methods=("gradient",), metrics=("corner_once",), target="label")
        assert "gradient/corner_once" not in audit_shard(_model(), probe, spec, expensive=False).per_image
        out = summarize(audit_shard(_model(), probe, spec), probe, spec)
        assert out["gradient/corner_once"] == 0.5 and "gradient/corner_once/a" not in out
        assert "corner_once" in metric_names(periodic=True) and "corner_once" not in PERIODIC_METRICS
    finally:
        unregister_metric("corner_once")


def test_wrong_shape_from_a_registered_metric_is_an_error_that_says_the_fix():
    register_metric("whole_map", lambda maps, probe: maps, higher_is_better=True)
    try:
        spec = AuditSpec(methods=("gradient",), metrics=("whole_map",), target="label")
        with pytest.raises(ValueError, match=r"must return a tensor \[N\]"):
            audit_shard(_model(), _probe(), spec, on_error="raise")
    finally:
        unregister_metric("whole_map")


def test_clash_with_a_builtin_and_bad_arguments():
    for name in ALL_METRICS:
        with pytest.raises(ValueError, match="built in"):
            register_metric(name, _corner, higher_is_better=True)
    with pytest.raises(ValueError, match="built in"):
        unregister_metric("object_mass")
    with pytest.raises(ValueError, match="'/'"):
        register_metric("a/b", _corner, higher_is_better=True)
    with pytest.raises(ValueError, match="higher_is_better"):
        register_metric("x", _corner, higher_is_better="yes")
    with pytest.raises(ValueError, match="register_metric"):
        AuditSpec(metrics=("not_registered_yet",))
    assert lightning_saliency.register_metric is register_metric
    assert lightning_saliency.MetricSpec is type(get_metric("drift"))


def test_the_rows_and_the_derived_lists():
    # the lists are derived from the rows (a new row needs no edit here)
    builtin = [s for s in specs() if s.builtin]
    assert ALL_METRICS == tuple(s.name for s in builtin)
    assert DEFAULT_METRICS == tuple(s.name for s in builtin if s.default)
    assert PERIODIC_METRICS == tuple(s.name for s in builtin if s.periodic)
    # DESIGN.md's facts: the default (cheap) set, what reruns the model, and each metric's direction
    assert set(DEFAULT_METRICS) == {"object_mass", "spurious_mass", "pointing_game", "stability", "drift",
                                    "attention_disparity", "group_divergence"}
    assert not {"spurious_mass", "object_mass", "pointing_game", "drift"} & set(PERIODIC_METRICS)
    design = {"object_mass": True, "spurious_mass": False, "pointing_game": True, "stability": True, "drift": None,
              "attention_disparity": False, "group_divergence": False, "deletion_auc": False, "insertion_auc": True,
              "infidelity": False, "max_sensitivity": False, "completeness_gap": False,
              "randomization_similarity": False, "shap_agreement": True, "lime_agreement": True, "fragility": False,
              "spurious_flip_rate": False, "spurious_erase_drop": False}
    assert {name: get_metric(name).higher_is_better for name in design} == design
    assert {"object_mass", "spurious_mass", "pointing_game"} <= {s.name for s in specs() if s.per_group}
    assert {s.name for s in specs() if s.probe_level} >= {"spurious_flip_rate", "spurious_erase_drop"}
    assert all(not s.probe_level or s.periodic for s in specs())  # probe-level rows rerun the model
    assert get_metric("deletion_auc").extra_keys == ("_random",) == get_metric("fragility").extra_keys
    # the table in the registry's docstring is generated from the rows
    import lightning_saliency.metrics.registry as registry

    assert metric_table() in registry.__doc__
    for s in specs():
        assert s.name in metric_table()


def test_direction_sets_the_alarm_mode(corner):
    from lightning_saliency import ShortcutAlarm

    assert ShortcutAlarm(metric="gradcam/spurious_mass", threshold=0.3).mode == "max"
    assert ShortcutAlarm(metric="gradcam/object_mass/site_a", threshold=0.3).mode == "min"
    assert ShortcutAlarm(metric="gradcam/insertion_auc", threshold=0.3).mode == "min"
    assert ShortcutAlarm(metric="gradcam/deletion_auc_random", threshold=0.3).mode == "max"
    assert ShortcutAlarm(metric="gradcam/corner", threshold=0.3).mode == "min"  # registered, higher is better
    alarm = ShortcutAlarm(metric="gradcam/corner", threshold=0.3, mode="max")  # an explicit mode wins
    assert alarm.mode == "max" and alarm.violated(0.5) and not alarm.violated(0.1)
    assert ShortcutAlarm(metric="probe/accuracy", threshold=0.3).mode == "max"  # not a registry metric


def test_monitor_expected_keys_carry_the_extra_keys(corner):
    from lightning_saliency import SaliencyMonitor

    monitor = SaliencyMonitor(_probe(), methods=("gradient",), metrics=("deletion_auc", "corner", "stability"))
    assert sorted(monitor.expected_keys()) == ["gradient/corner", "gradient/deletion_auc",
                                               "gradient/deletion_auc_random", "gradient/stability",
                                               "probe/accuracy"]


def test_gate_suggestions_know_the_registry():
    full, data = make_report_data(2, with_maps=False), make_report_data(2, with_maps=False)
    for audit in data["audits"]:  # a run whose probe had no spurious masks
        audit["metrics"] = {k: v for k, v in audit["metrics"].items() if "spurious_mass" not in k}

    def message(key: str, data: dict = data) -> str:
        with pytest.raises(GateError) as info:
            evaluate(data, [Rule(key=key, mode="max", threshold=0.2)])
        return str(info.value)

    assert "spurious_mass needs spurious masks on the probe" in message("gradcam/spurious_mass")
    assert "not in the default set: add it to SaliencyMonitor(metrics=...)" in message("gradcam/deletion_auc")
    assert "runs the model again" in message("gradcam/infidelity")
    assert "stability is not reported per group" in message("gradcam/stability/site_a")
    assert "did you mean 'pointing_game'" in message("gradcam/pointing_gme")
    assert "needs" not in message("gradcam/made_up_thing")
    # needs that the audit shows met are not mentioned: groups (per-group keys) and masks (the metric recorded)
    assert "group_divergence needs groups on the probe" in message("gradcam/group_divergence")
    assert message("gradcam/group_divergence", full).count("needs") == 0  # it has per-group keys
    assert "was not computed: is it in SaliencyMonitor(metrics=...)?" in message("gradcam/group_divergence", full)
    assert "needs object masks" not in message("gradcam/object_mass/site_z")
    assert "runs the model again" not in message("gradcam/stability/site_a")


def test_custom_scalars_layout_follows_the_registry_order(corner):
    keys = ["a/stability", "a/corner", "a/zzz", "a/object_mass", "a/spurious_mass", "a/deletion_auc"]
    layout = custom_scalars_layout(keys)
    assert list(layout["saliency"]) == ["spurious_mass", "object_mass", "stability", "deletion_auc", "corner",
                                        "zzz"]


def test_gate_and_registry_do_not_import_torch():
    code = ("import sys, lightning_saliency.gate, lightning_saliency.cli, lightning_saliency.metrics.registry as r; "
            "r.missing_key_hint('gradcam/spurious_mass'); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
