"""The README's main job, shortened: the audit sees the planted shortcut, the alarm stops it, the clean run passes.

The shortcut patch covers 36 of 1024 pixels: a map that ignores it puts about 3.5 % of its mass there.
"""

from __future__ import annotations

import json

import pytest

from examples.shortcut_shapes import GATE_MAX_SPURIOUS, main

AREA = 36 / 1024
ARGS = ["--quiet", "--train-size", "960", "--epochs", "6", "--alarm-action", "stop", "--no-gate"]


def _audits(result: dict) -> tuple[list[dict], list[dict]]:
    with open(result["report"]) as f:
        report = json.load(f)
    return report["audits"], report["alarms"]


@pytest.fixture(scope="module")
def shortcut_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("shortcut")
    with pytest.warns(UserWarning, match="ShortcutAlarm"):
        result = main([*ARGS, "--out", str(out)])
    return result


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    return main([*ARGS, "--out", str(tmp_path_factory.mktemp("clean")), "--no-shortcut"])


def test_shortcut_run_attends_to_the_patch_and_the_alarm_stops_it(shortcut_run):
    audits, alarms = _audits(shortcut_run)
    first = next(i for i, a in enumerate(audits) if a["metrics"]["gradcam/spurious_mass"] > GATE_MAX_SPURIOUS)
    (firing,) = alarms
    # patience 2: fires at the second violating audit in a row, and training ends with that epoch
    assert firing["epoch"] == audits[first + 1]["epoch"] and audits[-1]["epoch"] == firing["epoch"] < 5
    # it rose from chance as the shortcut was learned
    assert audits[0]["metrics"]["gradcam/spurious_mass"] < 1.5 * AREA
    last = audits[-1]["metrics"]
    assert last["gradcam/spurious_mass"] > 3 * AREA
    assert last["gradient/spurious_mass"] > 1.25 * AREA
    # the patch carries the label only in the "present" group: attention differs between the groups
    assert last["gradcam/spurious_mass/shortcut_present"] > last["gradcam/spurious_mass/shortcut_absent"]
    assert last["gradcam/attention_disparity"] > 0.02
    # the model cheats: right where the patch tells the label, near chance where it is absent
    assert last["probe/accuracy/shortcut_present"] > 0.75 > 0.5 > last["probe/accuracy/shortcut_absent"]


def test_clean_run_stays_near_chance_on_the_patch_and_never_alarms(clean_run, shortcut_run):
    audits, alarms = _audits(clean_run)
    assert alarms == [] and len(audits) == 6
    for a in audits:
        assert a["metrics"]["gradcam/spurious_mass"] < 1.5 * AREA
        assert a["metrics"]["gradient/spurious_mass"] < 1.5 * AREA
    shortcut_last = _audits(shortcut_run)[0][-1]["metrics"]
    assert audits[-1]["metrics"]["gradcam/attention_disparity"] < shortcut_last["gradcam/attention_disparity"]
