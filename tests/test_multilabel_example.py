"""The multi-label example, shortened: the task is inferred, each (image, label) pair is a probe row whose masks
are its own shape and the image's other shapes, and the report's per-label numbers are the model's."""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path

import torch

from examples.multilabel_shapes import LABELS, build_probe, main, multilabel_shapes


def test_each_label_of_an_image_is_a_row_with_its_own_shape_as_object_and_the_others_as_spurious_mask():
    data = multilabel_shapes(12, seed=3)
    probe = build_probe(data)
    image, label = data["labels"].nonzero(as_tuple=True)
    assert len(probe) == int(data["labels"].sum()) and probe.targets.tolist() == label.tolist()
    assert probe.groups == [LABELS[k] for k in label.tolist()]
    assert torch.equal(probe.object_masks, data["masks"][image, label])
    assert not bool((probe.object_masks & probe.spurious_masks).any())
    assert torch.equal(probe.object_masks | probe.spurious_masks, data["masks"][image].any(1))
    assert torch.equal(probe.labels, data["labels"][image])


def test_the_shortened_example_writes_per_label_metrics_that_match_the_trained_model(tmp_path, capsys):
    result = main(["--quiet", "--train-size", "320", "--epochs", "2", "--probe-size", "12", "--out", str(tmp_path)])
    report = json.loads(Path(result["report"]).read_text())
    assert report["config"]["task"] == "multilabel" and report["config"]["task_inferred"] is True
    audits = report["audits"]
    assert [a["epoch"] for a in audits] == [0, 1] and all(a["errors"] == [] for a in audits)
    last = audits[-1]["metrics"]
    for name in LABELS:
        for method in ("gradcam", "gradient"):
            for metric in ("object_mass", "spurious_mass", "pointing_game"):
                assert 0.0 <= last[f"{method}/{metric}/{name}"] <= 1.0, (method, metric, name)
    # per-label accuracy: over the probe's images, the share of the three decisions (logit > 0) that are right
    data = multilabel_shapes(12, seed=2)
    images = data["labels"].any(1)
    model = result["model"].eval()
    with torch.no_grad():
        hit = ((model(data["inputs"][images]) > 0) == data["labels"][images]).float()
    assert math.isclose(last["probe/accuracy"], float(hit.mean()), abs_tol=1e-6)
    for k in range(len(LABELS)):
        assert math.isclose(last[f"probe/accuracy/class_{k}"], float(hit[:, k].mean()), abs_tol=1e-6)
    assert glob.glob(os.path.join(result["log_dir"], "events.out.tfevents.*"))  # TensorBoard logs
    out = capsys.readouterr().out
    assert "task: multilabel (inferred)" in out and f"{last['gradcam/object_mass/square']:5.2f}" in out
