"""A method and a metric defined here, registered, and taken through every consumer like a built-in:
``attribute()``, a two-epoch ``SaliencyMonitor`` fit with groups (report.json and TensorBoard read back), the
HTML page and the ``lightning-saliency gate`` command in a fresh process (which has never heard of them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_saliency import SaliencyMonitor, attribute, register_method, register_metric
from lightning_saliency.methods.registry import unregister_method
from lightning_saliency.metrics.registry import unregister_metric
from lightning_saliency.probe import ProbeSet
from tests import monitor_utils as mu

REPO = Path(__file__).resolve().parents[1]


def abs_x_grad(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
               axg_power: float = 1.0) -> torch.Tensor:
    """``|sum_c x * dy_t/dx| ** axg_power``: a method with a pass and an option of its own."""
    x = inputs.detach().requires_grad_(True)
    score = model(x).gather(1, targets[:, None]).sum()
    (grad,) = torch.autograd.grad(score, [x])
    return (x.detach() * grad).sum(dim=1).abs() ** axg_power


def centre_mass(maps: torch.Tensor, probe: ProbeSet) -> torch.Tensor:
    """Share of each (min-max normalised) map's mass in the central quarter of the image."""
    h, w = maps.shape[-2:]
    centre = maps[:, h // 4: h - h // 4, w // 4: w - w // 4].sum(dim=(1, 2))
    return centre / maps.sum(dim=(1, 2)).clamp_min(1e-12)


@pytest.fixture
def registered():
    register_method("abs_x_grad", abs_x_grad, options={"axg_power": 1.0})
    register_metric("centre_mass", centre_mass, higher_is_better=True)
    yield
    unregister_metric("centre_mass")
    unregister_method("abs_x_grad")


def test_attribute_runs_the_registered_method_with_its_option(registered):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 3 * 3, 4))
    x = torch.rand(5, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 1, 2, 3, 0])
    maps = attribute(model, x, targets, methods=("abs_x_grad", "gradient"), axg_power=2.0)
    weight = model[1].weight.detach().reshape(4, 2, 3, 3)
    torch.testing.assert_close(maps["abs_x_grad"], ((weight[targets] * x).sum(dim=1).abs()) ** 2)


def _tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(log_dir), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_registered_method_and_metric_reach_the_report_the_dashboard_the_page_and_the_gate(registered, tmp_path):
    dm = mu.datamodule()
    probe = mu.probe(dm, size=8)
    assert probe.groups is not None and len(set(probe.groups)) == 2
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    monitor = SaliencyMonitor(probe, methods=("gradcam", "abs_x_grad"), metrics=("centre_mass", "drift"),
                              log_images=4, method_options={"axg_power": 1.0})
    mu.fit([monitor], tmp_path, max_epochs=2, logger=logger, dm=dm)

    run = Path(logger.log_dir)
    report = json.loads((run / "saliency" / "report.json").read_text())
    audits = report["audits"]
    assert [a["epoch"] for a in audits] == [0, 1]
    groups = sorted(set(probe.groups))
    for audit in audits:
        assert audit["errors"] == []
        for method in ("gradcam", "abs_x_grad"):
            value = audit["metrics"][f"{method}/centre_mass"]
            assert 0.0 <= value <= 1.0
            per_group = [audit["metrics"][f"{method}/centre_mass/{g}"] for g in groups]
            sizes = [probe.groups.count(g) for g in groups]
            # the mean over images is the size-weighted mean of the group means
            assert value == pytest.approx(sum(v * s for v, s in zip(per_group, sizes)) / sum(sizes), abs=1e-6)
    # the maps of the user's method were saved like a built-in's
    from lightning_saliency.report import load_maps

    saved = load_maps(run / "saliency" / audits[-1]["maps"])
    assert saved["abs_x_grad"].shape[0] == len(probe)

    scalars = _tensorboard_scalars(run)
    steps = [a["global_step"] for a in audits]
    for key in ("abs_x_grad/centre_mass", "abs_x_grad/centre_mass/" + groups[0], "gradcam/centre_mass"):
        got = scalars[f"saliency/{key}"]
        assert [s for s, _ in got] == steps
        assert [v for _, v in got] == pytest.approx([a["metrics"][key] for a in audits], abs=1e-6)

    page = tmp_path / "audit.html"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "lightning_saliency.cli"]
    out = subprocess.run([*cmd, "report", str(run), "-o", str(page)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    html = page.read_text()
    assert 'aria-label="centre_mass"' in html  # the metric's chart
    assert '<div class="method"><h3>abs_x_grad</h3>' in html  # the method's overlays
    assert "<th>abs_x_grad/centre_mass</th>" in html  # its per-group row

    final = audits[-1]["metrics"]["abs_x_grad/centre_mass"]
    passing = subprocess.run([*cmd, "gate", str(run), "--min", f"abs_x_grad/centre_mass={final - 0.01}"],
                             capture_output=True, text=True, env=env)
    assert passing.returncode == 0, passing.stdout + passing.stderr
    failing = subprocess.run([*cmd, "gate", str(run), "--min", f"abs_x_grad/centre_mass={final + 0.01}"],
                             capture_output=True, text=True, env=env)
    assert failing.returncode == 1, failing.stdout + failing.stderr
