"""Setup catches it (issue 10, point 4): a configuration that can never work fails before the first training
step, with the fix in the message; a gradient-only monitor needs no spatial layer (an MLP fit writes a report)."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_saliency import ProbeSet, SaliencyMonitor, ShortcutAlarm, attribute
from lightning_saliency.checks import key_problem
from tests import monitor_utils as U


class _Steps(pl.Callback):
    """Counts training steps: a setup error must come before the first."""

    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args, **kwargs) -> None:
        self.steps += 1


class MLP(U.TupleData):
    """No spatial layer at all: the image is flattened first."""

    def __init__(self) -> None:
        super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 2)), 32,
                         (3, 8, 8), batch_size=16)


def _fit_mlp(callbacks: list, tmp_path, max_epochs: int = 1) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=False, default_root_dir=str(tmp_path),
                         **U.FAST)
    trainer.fit(MLP())
    return trainer


# -------------------------------------------------------------------------------- the layer only when needed


def test_gradient_only_monitor_on_an_mlp_writes_a_report(tmp_path):
    model = MLP()
    probe = ProbeSet(model.data.tensors[0][:8], model.data.tensors[1][:8])
    expected = attribute(model, probe.inputs, methods=("gradient",))["gradient"]  # attribute() handles it
    monitor = SaliencyMonitor(probe, methods=("gradient",), metrics=("stability", "drift"),
                              dirpath=str(tmp_path / "saliency"))
    _fit_mlp([monitor], tmp_path, max_epochs=2)
    with open(tmp_path / "saliency" / "report.json") as f:
        report = json.load(f)
    assert report["config"]["layer"] is None and report["config"]["methods"] == ["gradient"]
    assert [a["epoch"] for a in report["audits"]] == [0, 1] and not any(a["errors"] for a in report["audits"])
    last = report["audits"][-1]["metrics"]
    assert -1 <= last["gradient/stability"] <= 1 and -1 <= last["gradient/drift"] <= 1
    assert tuple(expected.shape) == (8, 8, 8)


def test_a_layer_method_on_an_mlp_still_fails_at_setup_naming_layer(tmp_path):
    steps = _Steps()
    with pytest.raises(ValueError, match="layer="):
        _fit_mlp([SaliencyMonitor(None, probe_size=8, methods=("gradient", "gradcam")), steps], tmp_path)
    assert steps.steps == 0


# -------------------------------------------------------------------------------- method_options


def test_a_misspelt_method_option_fails_at_construction_with_the_closest_name_and_its_method():
    with pytest.raises(ValueError, match=r"unknown option 'ig_step' \(did you mean 'ig_steps', an option of "
                                         r"integrated_gradients\?\)"):
        SaliencyMonitor(U.probe(), methods=("integrated_gradients",), method_options={"ig_step": 8})


def test_options_the_audit_sets_itself_are_refused():
    with pytest.raises(ValueError, match=r"SaliencyMonitor\(on_error=\.\.\.\)"):
        SaliencyMonitor(U.probe(), methods=("gradient",), method_options={"on_error": "raise"})
    with pytest.raises(ValueError, match="return_info"):
        SaliencyMonitor(U.probe(), methods=("gradient",), method_options={"return_info": True})


def test_an_option_of_a_method_not_computed_is_accepted_quietly():
    # a metric may run that method itself with the audit's options, so it is no configuration error
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor = SaliencyMonitor(U.probe(), methods=("gradcam",), method_options={"ig_steps": 8, "autocast": False})
    assert monitor.spec.method_options == {"ig_steps": 8, "autocast": False}


def test_a_bad_option_value_fails_before_the_first_step(tmp_path):
    steps = _Steps()
    monitor = SaliencyMonitor(U.probe(), methods=("integrated_gradients",), method_options={"ig_steps": 0})
    with pytest.raises(ValueError, match=r"method_options.*ig_steps must be a positive int"):
        U.fit([monitor, steps], tmp_path, max_epochs=1)
    assert steps.steps == 0


# -------------------------------------------------------------------------------- alarms that could never fire


def _plain_probe(n: int = 8, groups=None) -> ProbeSet:
    probe = U.probe(size=n)
    return ProbeSet(probe.inputs, probe.targets, groups=groups)  # the shapes' images without their masks


@pytest.mark.parametrize("metric, monitor_kw, match", [
    ("gradcam/spurious_mass", {}, r"spurious_mass needs spurious masks on the probe \(ProbeSet\(spurious_masks="
                                  r".*from_dataset\(spurious_mask_fn=.*and the probe has none"),
    ("gradcam/object_mass", {}, "object_mass needs object masks.*the probe has none"),
    ("gradcam/attention_disparity", {"groups": ["a", "b"] * 4}, "attention_disparity needs object or spurious masks"),
    ("gradcam/group_divergence", {}, "group_divergence needs groups on the probe"),
    ("gradcam/stability/site_a", {"groups": ["a", "b"] * 4}, "stability is not reported per group"),
    ("gradcam/drift/site_a", {}, "not reported per group"),
    ("gradcam/deletion_auc", {}, r"deletion_auc is not among the monitor's metrics .*SaliencyMonitor\(metrics="),
    ("smoothgrad/stability", {}, r"does not compute 'smoothgrad'.*SaliencyMonitor\(methods="),
    ("probe/accuracy/site_z", {"groups": ["a", "b"] * 4}, "no class or group 'site_z'.*class_0"),
])
def test_an_alarm_on_a_key_the_configuration_never_reports_fails_before_the_first_step(tmp_path, metric,
                                                                                        monitor_kw, match):
    steps = _Steps()
    monitor = SaliencyMonitor(_plain_probe(groups=monitor_kw.get("groups")), methods=("gradcam", "gradient"),
                              metrics=("spurious_mass", "object_mass", "attention_disparity", "group_divergence",
                                       "stability", "drift"))
    with pytest.raises(ValueError, match=match):
        U.fit([monitor, ShortcutAlarm(metric=metric, threshold=0.3), steps], tmp_path, max_epochs=1)
    assert steps.steps == 0


def test_a_mask_alarm_on_a_probe_drawn_from_tuple_data_fails_at_fit_start_saying_how_to_add_masks(tmp_path):
    steps = _Steps()
    monitor = SaliencyMonitor(None, probe_size=8, methods=("gradient",))
    with pytest.raises(ValueError, match=r"spurious masks.*the probe has none.*'spurious_mask'.*Keys it reports: "
                                         r"gradient/stability, gradient/drift, probe/accuracy"):
        _fit_mlp([monitor, ShortcutAlarm(metric="gradient/spurious_mass"), steps], tmp_path)
    assert monitor.probe is not None and monitor.probe.spurious_masks is None  # drawn, then judged
    assert steps.steps == 0


def test_a_signed_only_metric_on_an_unsigned_method_fails():
    assert "signed methods only" in key_problem("gradcam/completeness_gap", ("gradcam",), ("completeness_gap",))
    assert key_problem("integrated_gradients/completeness_gap", ("integrated_gradients",),
                       ("completeness_gap",)) is None


def test_alarms_the_configuration_can_produce_are_accepted(tmp_path):
    probe = U.probe()  # the shapes' probe has both kinds of masks and groups
    keys = ["gradient/spurious_mass", f"gradient/object_mass/{probe.group_names[0]}", "gradient/attention_disparity",
            "probe/accuracy/class_1", f"probe/accuracy/{probe.group_names[-1]}"]
    alarms = [ShortcutAlarm(metric=k, threshold=5.0, mode="max") for k in keys]  # never violated
    monitor = SaliencyMonitor(probe, methods=("gradient",), metrics=("spurious_mass", "object_mass",
                                                                     "attention_disparity"))
    trainer, _ = U.fit([monitor, *alarms], tmp_path, max_epochs=1)
    assert trainer.current_epoch == 1
    assert all(k in monitor.latest["metrics"] for k in keys)  # each one reported, as the check promised
    assert sorted(map(id, monitor._alarms)) == sorted(map(id, alarms))
    assert os.path.exists(os.path.join(trainer.log_dir, "saliency", "report.json"))


# -------------------------------------------------------------------------------- the check agrees with the audit


@pytest.mark.parametrize("masks", ["none", "object", "spurious", "both"])
@pytest.mark.parametrize("grouped", [False, True])
def test_key_problem_agrees_with_what_an_audit_reports(masks, grouped):
    """Over probes with and without each kind of mask and groups, and metric sets whose probe-level rows lack
    what they read: a key is in the audit's summary exactly when :func:`key_problem` finds nothing against it."""
    from lightning_saliency.audit import DEFAULT_METRICS, AuditSpec, audit_shard, summarize
    from lightning_saliency.checks import reported_keys

    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    region = torch.zeros(4, 8, 8)
    region[:, :4] = 1
    probe = ProbeSet(torch.rand(4, 3, 8, 8, generator=g), torch.tensor([0, 1, 0, 1]),
                     groups=["a", "b", "a", "b"] if grouped else None,
                     object_masks=region if masks in ("object", "both") else None,
                     spurious_masks=1 - region if masks in ("spurious", "both") else None)
    methods = ("gradient", "input_x_gradient")
    metric_sets = [tuple(m for m in DEFAULT_METRICS if m != "drift") + ("completeness_gap",),
                   ("attention_disparity",), ("attention_disparity", "object_mass")]
    for metrics in metric_sets:
        spec = AuditSpec(methods=methods, metrics=metrics, stability_k=1, expensive_images=2)
        reported = summarize(audit_shard(model, probe, spec, on_error="raise"), probe, spec)
        candidates = reported_keys(methods, metrics) + ["probe/accuracy/class_1", "probe/accuracy/a",
                                                        "probe/accuracy/z"]
        candidates += [f"{k}/{grp}" for k in reported_keys(methods, metrics) if not k.startswith("probe/")
                       for grp in ("a", "z")]
        for key in candidates:
            problem = key_problem(key, methods, metrics, probe)
            assert (key in reported) == (problem is None), (key, metrics, problem)
