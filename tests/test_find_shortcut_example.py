"""The discovery example, shortened: a watermark planted in half of one class's images is found by clustering
the maps (no masks given), confirmed by pasting it onto other classes' images, and matches the planted truth."""

from __future__ import annotations

import json

from examples.find_shortcut import main, planted


def test_the_planted_watermark_is_discovered_confirmed_and_matches_the_truth(tmp_path):
    out = tmp_path / "summary.json"
    summary = main(["--p", "50", "--seed", "0", "--train-size", "600", "--epochs", "2", "--probe-per-class", "24",
                    "--quiet", "--out", str(out)])
    assert summary["first_epoch_confirmed"] is not None
    assert summary["precision"] >= 0.8 and summary["recall"] >= 0.8
    assert summary["flip_rate"] >= 0.1 and summary["flip_rate"] >= 3 * summary["null_flip_rate"]
    first = summary["records"][summary["first_epoch_confirmed"]]
    (best,) = [c for c in first["candidates"] if c["confirmed"]]
    assert best["class"] == 0 and best["region"][0] < 6 and best["region"][3] > 26  # around the watermark
    assert json.loads(out.read_text())["first_epoch_confirmed"] == summary["first_epoch_confirmed"]


def test_the_probe_marks_exactly_the_planted_share_of_one_class_or_of_every_class_in_the_control():
    probe = planted(0, 0.25, False, 1, per_class=16)
    assert int(probe["marked"].sum()) == 4 and set(probe["labels"][probe["marked"]].tolist()) == {0}
    control = planted(0, 0.25, True, 1, per_class=16)
    assert int(control["marked"].sum()) == 12 and set(control["labels"][control["marked"]].tolist()) == {0, 1, 2}
    assert bool((control["inputs"][control["marked"], :, 2:6, 26:30] == 2.5).all())
