"""The discovery example, shortened: a model trains under SaliencyMonitor (no masks given to it) on data with a
watermark planted in half of one class's images; the example reads the monitor's report.json back, where the
first audit holds a confirmed candidate whose members are the watermarked probe images."""

from __future__ import annotations

import json
from pathlib import Path

from examples.find_shortcut import MARK, main, planted, read_report


def test_the_monitor_finds_and_confirms_the_planted_watermark_and_the_example_reads_it_from_the_report(tmp_path):
    out = tmp_path / "summary.json"
    summary = main(["--p", "50", "--seed", "0", "--train-size", "600", "--epochs", "1", "--probe-per-class", "24",
                    "--quiet", "--log-dir", str(tmp_path / "runs"), "--out", str(out)])
    assert summary["first_epoch_confirmed"] == 0 and summary["method"] == "gradcam"
    assert summary["precision"] >= 0.8 and summary["recall"] >= 0.8
    assert summary["flip_rate"] >= 0.1 and summary["flip_rate"] >= 3 * summary["null_flip_rate"]
    assert 0.0 <= summary["clean_val_acc"] <= 1.0  # the clean validation accuracy of that epoch
    # the figures are the monitor's: its report holds the confirmed candidate, counted in discovery/suspects
    report = json.loads(Path(summary["report"]).read_text())
    (audit,) = report["audits"]
    assert "masks" not in audit["discovery"] and audit["metrics"]["discovery/suspects"] >= 1
    (best,) = [c for c in audit["discovery"]["candidates"] if c["confirmed"]]
    assert best["class"] == 0 and best["flip_rate"] == summary["flip_rate"]
    top, left, bottom, right = best["region"]
    assert top <= MARK[0].start and bottom >= MARK[0].stop and left <= MARK[1].start and right >= MARK[1].stop
    probe = planted(0, 0.5, False, 1, per_class=24)  # the example's probe: seed + 1
    truth = set(probe["marked"].nonzero()[:, 0].tolist())
    assert read_report(report, truth, {})[0]["precision"] == summary["precision"]
    assert json.loads(out.read_text())["first_epoch_confirmed"] == 0


def test_the_probe_marks_exactly_the_planted_share_of_one_class_or_of_every_class_in_the_control():
    probe = planted(0, 0.25, False, 1, per_class=16)
    assert int(probe["marked"].sum()) == 4 and set(probe["labels"][probe["marked"]].tolist()) == {0}
    control = planted(0, 0.25, True, 1, per_class=16)
    assert int(control["marked"].sum()) == 12 and set(control["labels"][control["marked"]].tolist()) == {0, 1, 2}
    assert bool((control["inputs"][control["marked"], :, 2:6, 26:30] == 2.5).all())
