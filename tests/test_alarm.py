"""ShortcutAlarm: fires on `patience` consecutive violations, warns / stops / raises, is recorded, resumes."""

from __future__ import annotations

import json
import os

import pytest
import pytorch_lightning as pl

from lightning_saliency import SaliencyMonitor, ShortcutAlarm, ShortcutDetected
from tests import monitor_utils as U


def _monitor(**kw) -> SaliencyMonitor:
    kw.setdefault("methods", ("gradient",))
    kw.setdefault("metrics", ("spurious_mass", "object_mass"))
    return SaliencyMonitor(U.probe(), **kw)


def _report(trainer: pl.Trainer) -> dict:
    with open(os.path.join(trainer.log_dir, "saliency", "report.json")) as f:
        return json.load(f)


def test_rule_direction():
    high = ShortcutAlarm(metric="gradient/spurious_mass", threshold=0.3, mode="max")
    low = ShortcutAlarm(metric="gradient/object_mass", threshold=0.3, mode="min")
    assert high.violated(0.31) and not high.violated(0.3) and not high.violated(float("nan"))
    assert low.violated(0.29) and not low.violated(0.3) and not low.violated(None)


def test_stop_fires_after_patience_audits_and_stops_training(tmp_path):
    # spurious mass is always >= 0: a negative threshold is violated at every audit
    alarm = ShortcutAlarm(metric="gradient/spurious_mass", threshold=-1.0, patience=2, action="stop")
    monitor = _monitor()
    with pytest.warns(UserWarning, match="stopping training"):
        trainer, _ = U.fit([alarm, monitor], tmp_path, max_epochs=6)  # alarm listed first: order must not matter
    assert trainer.current_epoch == 2, "stops after the 2nd violating audit (epochs 0 and 1)"
    report = _report(trainer)
    assert [a["epoch"] for a in report["audits"]] == [0, 1]
    (firing,) = report["alarms"]
    assert firing["metric"] == "gradient/spurious_mass" and firing["epoch"] == 1 and firing["action"] == "stop"
    assert firing["value"] == pytest.approx(report["audits"][1]["metrics"]["gradient/spurious_mass"])


def test_warn_does_not_stop_and_min_audits_delays(tmp_path):
    alarm = ShortcutAlarm(metric="gradient/spurious_mass", threshold=-1.0, patience=1, action="warn", min_audits=3)
    with pytest.warns(UserWarning, match="ShortcutAlarm"):
        trainer, _ = U.fit([_monitor(), alarm], tmp_path, max_epochs=4)
    assert trainer.current_epoch == 4
    # patience 1 fires on the first violation it may act on: the 3rd audit (epoch 2); then the streak continues
    assert [f["epoch"] for f in _report(trainer)["alarms"]] == [2]


def test_no_violation_no_firing(tmp_path):
    alarm = ShortcutAlarm(metric="gradient/spurious_mass", threshold=2.0, patience=1, action="raise")
    trainer, _ = U.fit([_monitor(), alarm], tmp_path, max_epochs=2)
    assert trainer.current_epoch == 2 and _report(trainer)["alarms"] == []


def test_raise_action_raises_and_report_keeps_the_firing(tmp_path):
    alarm = ShortcutAlarm(metric="gradient/spurious_mass", threshold=-1.0, action="raise")
    logger = pl.loggers.CSVLogger(str(tmp_path), name="run", version=0)
    with pytest.raises(ShortcutDetected, match="gradient/spurious_mass"):
        U.fit([_monitor(), alarm], tmp_path, max_epochs=3, logger=logger)
    with open(tmp_path / "run" / "version_0" / "saliency" / "report.json") as f:
        assert len(json.load(f)["alarms"]) == 1


def test_several_alarms_and_per_group_keys(tmp_path):
    a = ShortcutAlarm(metric="gradient/spurious_mass/shortcut_present", threshold=-1.0, action="warn")
    b = ShortcutAlarm(metric="gradient/object_mass", threshold=2.0, mode="min", action="warn")
    with pytest.warns(UserWarning):
        trainer, _ = U.fit([_monitor(), a, b], tmp_path, max_epochs=1)
    assert {f["metric"] for f in _report(trainer)["alarms"]} == {"gradient/spurious_mass/shortcut_present",
                                                                  "gradient/object_mass"}


@pytest.mark.parametrize("metric, match", [("gradcam/spurious_mass", "Did you mean 'gradient/spurious_mass'"),
                                           ("gradient/spurius_mass", "Did you mean 'gradient/spurious_mass'")])
def test_unknown_metric_fails_at_setup_with_suggestion(tmp_path, metric, match):
    with pytest.raises(ValueError, match=match):
        U.fit([_monitor(), ShortcutAlarm(metric=metric, threshold=0.3)], tmp_path, max_epochs=1)


def test_alarm_without_monitor_fails_at_setup(tmp_path):
    with pytest.raises(ValueError, match="needs a SaliencyMonitor"):
        U.fit([ShortcutAlarm(threshold=0.3)], tmp_path, max_epochs=1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        ShortcutAlarm(mode="above")
    with pytest.raises(ValueError, match="action"):
        ShortcutAlarm(action="explode")
    with pytest.raises(ValueError, match="finite"):
        ShortcutAlarm(threshold=float("nan"))


def test_alarm_state_survives_resume(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    alarm = ShortcutAlarm(metric="gradient/spurious_mass", threshold=-1.0, patience=3, action="stop")
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, every_n_epochs=1)
    U.fit([_monitor(), alarm, ckpt], tmp_path, max_epochs=2, enable_checkpointing=True)
    assert alarm.count == 2 and not alarm.firings
    resumed = ShortcutAlarm(metric="gradient/spurious_mass", threshold=-1.0, patience=3, action="stop")
    with pytest.warns(UserWarning, match="stopping"):
        trainer, _ = U.fit([_monitor(), resumed], tmp_path / "r", max_epochs=6, ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert resumed.firings and resumed.firings[0]["epoch"] == 2  # the 3rd violation overall
    assert trainer.current_epoch == 3


def test_audits_that_skip_a_periodic_metric_neither_count_nor_break_the_streak(tmp_path):
    # stability is computed at audits 0, 2, 4 (every 2nd) and at the last; a threshold above 1 is always violated
    monitor = _monitor(metrics=("spurious_mass", "stability"), expensive_every_n_audits=2)
    alarm = ShortcutAlarm(metric="gradient/stability", threshold=1.5, mode="min", patience=2, action="warn")
    with pytest.warns(UserWarning, match="ShortcutAlarm"):
        U.fit([monitor, alarm], tmp_path, max_epochs=4)
    assert [f["epoch"] for f in alarm.firings] == [2]  # its 2nd reading, although audit 1 had no stability
    assert alarm.seen == 3  # audits 0, 2 and 3 (the last)
