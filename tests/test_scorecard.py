"""The method scorecard (issue 13, point 4): known answers, best-per-column logic, nulls with reasons, no side
effects, and the monitor -> report.json -> page / ``show --scorecard`` path."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_saliency import ProbeSet, SaliencyMonitor, scorecard
from lightning_saliency.cli import main
from lightning_saliency.methods.registry import registered
from lightning_saliency.metrics.registry import get_metric
from lightning_saliency.page import render_page
from lightning_saliency.report import AuditReport, ReportError, load_report
from lightning_saliency.scorecards import COST, Column, Scorecard, _columns, best_per_column, default_metrics
from tests import monitor_utils as mu
from tests.test_page import assert_safe

SIDE = 16


class Spots(nn.Module):
    """Linear: logit_0 = 3 * (sum of the 8 spot pixels) - 12, logit_1 = 0. Its gradient map is exactly the weights."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(SIDE * SIDE, 2)
        with torch.no_grad():
            self.lin.weight.zero_()
            self.lin.weight[0] = 3.0 * mask.flatten().float()
            self.lin.bias.copy_(torch.tensor([-12.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))


def _spots() -> tuple[Spots, ProbeSet]:
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    mask.view(-1)[torch.randperm(SIDE * SIDE, generator=g)[:8]] = True
    inputs = 0.05 * torch.rand(8, 1, SIDE, SIDE, generator=g)
    inputs[:, 0][:, mask] = 1.0  # bright spots on a dark background: every image predicts class 0
    return Spots(mask), ProbeSet(inputs, torch.zeros(8, dtype=torch.long))


def _noise(model, inputs, targets):
    """A map of pure noise, seeded by the input (deterministic, but unrelated to the model)."""
    seed = int((inputs.double() * 1e4).sum().item()) % (2**31)
    return torch.rand(inputs.shape[0], *inputs.shape[2:], generator=torch.Generator().manual_seed(seed))


def test_default_metrics_come_from_the_registry_flag():
    assert default_metrics() == tuple(n for n in default_metrics() if get_metric(n).scorecard)
    for name in ("deletion_auc", "insertion_auc", "infidelity", "stability", "randomization_similarity",
                 "fragility"):
        assert name in default_metrics()
    assert "spurious_mass" not in default_metrics()


def test_noise_maps_lose_to_the_exact_gradient_of_a_linear_model_and_are_never_best():
    model, probe = _spots()
    with registered("noise_map", _noise):
        card = scorecard(model, probe, methods=("gradient", "noise_map"), expensive_images=8, stability_images=8)
    g, n = (lambda c: card.value("gradient", c)), (lambda c: card.value("noise_map", c))
    # the gradient map is the weights: deleting (inserting) the 8 spots first kills (restores) the class at once
    assert g("deletion_auc") < 0.1 < 0.4 < n("deletion_auc")
    assert g("insertion_auc") > 0.9 > 0.6 > n("insertion_auc")
    assert g("deletion_auc") < g("deletion_auc_random") and g("insertion_auc") > g("insertion_auc_random")
    assert g("infidelity") < 1e-8 < n("infidelity")  # I.|w| = w.I = y(x) - y(x - I) exactly
    assert g("stability") == pytest.approx(1.0) and n("stability") < 0.5  # the weights do not move with x
    assert g("fragility") == 0.0 < n("fragility")  # a linear model's gradient map cannot be attacked
    best = card.best()
    for column in ("deletion_auc", "insertion_auc", "infidelity", "stability", "fragility"):
        assert best[column] == ["gradient"], column
    assert all(math.isfinite(card.value(m, COST)) and card.value(m, COST) > 0 for m in card.methods)
    assert "deletion_auc_random" not in best and "fragility_random" not in best  # controls are not ranked
    text = card.to_text()
    assert "gradient" in text and "noise_map" in text and "*" in text


def test_best_per_column_follows_the_registry_direction_with_ties_and_nulls():
    columns = _columns(("deletion_auc", "stability", "drift"))
    assert [c.higher_is_better for c in columns if c.kind == "metric"] == [False, True, None]
    rows = [{"method": "a", "deletion_auc": 0.2, "deletion_auc_random": 0.0, "stability": None, "drift": 3.0,
             COST: 2.0},
            {"method": "b", "deletion_auc": 0.2, "deletion_auc_random": 0.9, "stability": float("nan"),
             "drift": 1.0, COST: 1.0},
            {"method": "c", "deletion_auc": 0.5, "stability": 0.1, "drift": None, COST: None}]
    best = best_per_column(rows, columns)
    assert best["deletion_auc"] == ["a", "b"]  # a tie: both
    assert best["stability"] == ["c"]  # None and NaN are never best, even where higher is better
    assert best[COST] == ["b"]  # lower is better; None is not 0
    assert "drift" not in best and "deletion_auc_random" not in best  # watch metrics and controls: unranked
    assert best_per_column([{"method": "a", "stability": None}], [Column("stability", True)]) == {}


def test_unknown_metric_names_the_closest_and_the_default_set_never_errors():
    model, probe = _spots()
    with pytest.raises(ValueError, match="Did you mean 'stability'"):
        scorecard(model, probe, methods=("gradient",), metrics=("stabilty",))
    with pytest.raises(ValueError, match="unknown method"):
        scorecard(model, probe, methods=("gradiant",))


def test_nulls_carry_a_reason_and_json_round_trips():
    model, probe = _spots()

    def broken(model, inputs, targets):
        raise RuntimeError("no map today")

    with registered("broken_map", broken), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        card = scorecard(model, probe, methods=("gradient", "input_x_gradient", "broken_map"),
                         metrics=("completeness_gap", "deletion_auc"), on_error="collect", expensive_images=4)
    assert not [w for w in caught if "recorded in the report" in str(w.message)]  # collect: recorded, not warned
    assert card.value("broken_map", "deletion_auc") is None and card.value("broken_map", COST) is None
    assert "no map today" in card.reasons["broken_map"]["deletion_auc"]
    # completeness is a property of signed maps: null for gradient, with the registry's reason
    assert card.value("gradient", "completeness_gap") is None
    assert "signed" in card.reasons["gradient"]["completeness_gap"]
    assert card.value("input_x_gradient", "completeness_gap") == pytest.approx(0.0, abs=1e-4)  # linear: exact
    data = json.loads(json.dumps(card.to_dict(), allow_nan=False))
    again = Scorecard.from_dict(data)
    assert again.best() == card.best() == data["best"]
    assert again.value("gradient", "deletion_auc") == card.value("gradient", "deletion_auc")
    assert "no map today" in again.to_text()


def test_the_model_is_left_as_found():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2)).train()
    model[0].requires_grad_(False)
    probe = ProbeSet(torch.rand(4, 1, SIDE, SIDE), torch.tensor([0, 1, 0, 1]))
    weights = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    scorecard(model, probe, methods=("gradcam", "gradient"), metrics=("stability", "randomization_similarity"),
              expensive_images=2, stability_images=2)
    assert all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert torch.equal(torch.get_rng_state(), rng)


def test_report_section_is_optional_checked_and_dropped_when_resuming_earlier(tmp_path):
    rep = AuditReport(tmp_path / "saliency" / "report.json")
    rep.write()
    assert "scorecard" not in load_report(rep.path).data  # old reports stay valid
    rep.set_scorecard({"epoch": 3, "rows": [{"method": "g", "stability": float("nan")}]})
    rep.write()
    assert load_report(rep.path).data["scorecard"]["rows"][0]["stability"] is None  # NaN written as null
    rep.truncate_after(1)
    assert "scorecard" not in rep.data
    bad = json.loads(rep.path.read_text())
    bad["scorecard"] = [1, 2]
    rep.path.write_text(json.dumps(bad))
    with pytest.raises(ReportError, match="'scorecard' must be an object"):
        load_report(rep.path)


def test_page_escapes_a_hostile_scorecard():
    page = render_page({"audits": [], "scorecard": {
        "columns": [{"name": "x<i>", "higher_is_better": True}, "junk"],
        "rows": [{"method": "<script>alert(1)</script>", "x<i>": 1.0}, {"method": 3}], "notes": ["<b>n</b>"]}}, ".")
    assert "<script>alert" not in page and "&lt;script&gt;" in page and "<b>n</b>" not in page
    assert 'class="num best"' in page  # the one method with a value is the best of its column


def test_monitor_writes_the_scorecard_and_the_page_and_show_print_it(tmp_path, capsys):
    monitor = SaliencyMonitor(mu.probe(size=8), methods=("gradcam", "gradient"), metrics=("stability",),
                              scorecard=True, log_images=0, save_maps=False, expensive_images=4,
                              stability_images=4)
    trainer, _ = mu.fit([monitor], tmp_path, max_epochs=2)
    run = trainer.log_dir
    data = load_report(run).data
    section = data["scorecard"]
    assert [r["method"] for r in section["rows"]] == ["gradcam", "gradient"]
    assert section["epoch"] == 1 and section["images"]["expensive"] == 4
    columns = {c["name"] for c in section["columns"]}
    assert set(default_metrics()) | {COST} <= columns
    for row in section["rows"]:  # every default metric computed for both methods of this small CNN
        assert all(isinstance(row[m], float) for m in default_metrics()), (row, section["reasons"])
    assert section["best"] == Scorecard.from_dict(section).best() and section["best"]
    out = tmp_path / "audit.html"
    assert main(["report", str(run), "-o", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert 'id="scorecard"' in page and 'class="num best"' in page and "★" in page
    doc = assert_safe(page)  # the page's structural safety holds with the scorecard too
    assert len([a for t, a in doc.with_class("best") if t == "td"]) == sum(map(len, section["best"].values()))
    assert "lower is better" in page and "higher is better" in page
    capsys.readouterr()
    assert main(["show", "--scorecard", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "gradcam" in printed and "gradient" in printed and "randomization_similarity" in printed
    value = section["rows"][0]["stability"]
    assert f"{value:.4g}" in printed
    # a run without a scorecard: exit 2 and the fix
    bare = SaliencyMonitor(mu.probe(size=8), methods=("gradient",), log_images=0, save_maps=False)
    trainer2, _ = mu.fit([bare], tmp_path / "bare", max_epochs=1)
    assert main(["show", "--scorecard", str(trainer2.log_dir)]) == 2
    assert "scorecard=True" in capsys.readouterr().err


def test_show_scorecard_and_the_page_never_import_torch(tmp_path):
    rep = AuditReport(tmp_path / "saliency" / "report.json")
    rep.set_scorecard({"columns": [{"name": "stability", "higher_is_better": True, "kind": "metric"}],
                       "rows": [{"method": "gradcam", "stability": 0.75}, {"method": "gradient", "stability": 0.5}]})
    rep.write()
    script = textwrap.dedent(f"""
        import contextlib, io, sys
        import lightning_saliency.cli as cli
        with contextlib.redirect_stdout(io.StringIO()) as out:
            codes = [cli.main(["show", "--scorecard", {str(tmp_path)!r}]),
                     cli.main(["report", {str(tmp_path)!r}, "-o", {str(tmp_path / "a.html")!r}])]
        assert "0.75 *" in out.getvalue(), out.getvalue()
        print(codes, "torch" in sys.modules)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[0,", "0]", "False"]
    assert "★" in (tmp_path / "a.html").read_text(encoding="utf-8")


def test_a_failing_scorecard_is_recorded_not_fatal_and_skipped_off_rank_0(tmp_path):
    from lightning_saliency.audit import AuditSpec
    from lightning_saliency.recording import Recorder

    class Trainer:
        current_epoch, global_step, global_rank, world_size = 2, 10, 0, 1

    model, probe = _spots()  # no convolution: Grad-CAM finds no target layer, so the whole scorecard fails
    recorder = Recorder(save_maps=False, log_images=0, on_error="collect", scorecard=True)
    recorder.report = AuditReport(tmp_path / "report.json")
    recorder.record_scorecard(Trainer(), model, probe, AuditSpec(methods=("gradcam",), metrics=()))
    section = load_report(tmp_path).data["scorecard"]
    assert section["rows"] == [] and "the scorecard failed" in section["notes"][0] and section["epoch"] == 1
    other = Recorder(save_maps=False, log_images=0, scorecard=True)
    other.report = AuditReport(tmp_path / "other" / "report.json")
    Trainer.global_rank = 1  # another rank: nothing computed, nothing written
    other.record_scorecard(Trainer(), model, probe, AuditSpec(methods=("gradient",), metrics=()))
    assert "scorecard" not in other.report.data
    Trainer.global_rank = 0
    off = Recorder(save_maps=False, log_images=0)  # scorecard=False (the default): nothing either
    off.report = AuditReport(tmp_path / "off" / "report.json")
    off.record_scorecard(Trainer(), model, probe, AuditSpec(methods=("gradient",), metrics=()))
    assert "scorecard" not in off.report.data
