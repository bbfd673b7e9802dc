"""The health of an audit (DESIGN invariant 9): non-finite logits, non-finite and constant maps are detected per
image and method, their metrics are null (never chance level or 1.0), the record says so, and the gate fails.

Unit tests on known maps first (detection counts, masking, probe-level rows, drift, DDP merge), then the record's
readers (gate, JUnit, page, show), then two fits through SaliencyMonitor: a model whose weights turn NaN in epoch
1 and a model that ignores its input (all-zero gradient maps)."""

from __future__ import annotations

import json
import math
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_saliency import SaliencyMonitor
from lightning_saliency.audit import AuditSpec, ShardResult, audit_shard, merge, summarize
from lightning_saliency.cli import main
from lightning_saliency.gate import EXIT_ERROR, EXIT_FAIL, EXIT_PASS, Rule, evaluate, select_audit, to_junit
from lightning_saliency.health import describe, flag_maps, health_errors, health_line, notes, problems
from lightning_saliency.page import render_page
from lightning_saliency.probe import ProbeSet
from lightning_saliency.recording import Recorder
from lightning_saliency.report import ReportError, validate_report
from tests import monitor_utils as mu
from tests.report_fixtures import make_report_data, write_maps, write_report
from tests.test_page import assert_safe

RAMP = torch.arange(16.0)
MAP_METRICS = ("object_mass", "spurious_mass", "pointing_game", "attention_disparity", "group_divergence",
               "stability", "drift")


def _linear(dead_class: bool = False) -> nn.Module:
    """Linear on 1x4x4 images: the gradient map of class c is |W[c]|, the ramp for class 0 and its reverse for
    class 1, or all zero for class 1 when ``dead_class`` (a class whose logit ignores the input)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([RAMP, torch.zeros(16) if dead_class else 15.0 - RAMP]))
    return model


def _probe(n: int = 8) -> ProbeSet:
    top = torch.zeros(n, 4, 4, dtype=torch.bool)
    top[:, :2] = True
    left = torch.zeros(n, 4, 4, dtype=torch.bool)
    left[:, :, 0] = True
    return ProbeSet(torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1] * (n // 2)),
                    groups=["a", "b"] * (n // 2), object_masks=top, spurious_masks=left)


SPEC = AuditSpec(methods=("gradient",), metrics=MAP_METRICS, target="label", stability_images=None)


def _audit(model, probe=None, **kw):
    probe = probe if probe is not None else _probe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = audit_shard(model, probe, SPEC, **kw)
        return result, summarize(result, probe, SPEC)


# -- detection and masking --------------------------------------------------------------------------------------
def test_flag_maps_counts_nonfinite_and_constant_maps_and_reads_signed_maps_by_magnitude():
    maps = torch.rand(6, 4, 4)
    maps[1] = 0.0  # all zero
    maps[2] = 3.5  # constant
    maps[3, 0, 0] = math.nan
    maps[4, 1, 1] = math.inf
    maps[5] = torch.tensor([1.0, -1.0]).repeat(8).reshape(4, 4)  # |M| is constant
    assert flag_maps({"m": maps})["m"].tolist() == [0, 2, 2, 1, 1, 0]
    assert flag_maps({"m": maps}, signed={"m"})["m"].tolist() == [0, 2, 2, 1, 1, 2]


def test_constant_maps_of_half_the_images_are_null_and_left_out_of_every_mean():
    # class 1 (group b) images have all-zero gradient maps: 4 of 8
    result, out = _audit(_linear(dead_class=True))
    assert result.degenerate["gradient"].tolist() == [0, 2] * 4
    assert describe(result) == {"logits": "ok", "gradient": "constant maps: 4 of 8"}
    assert problems(describe(result)) == []  # half, not most: tolerated, recorded
    for key in ("object_mass", "spurious_mass", "pointing_game", "stability"):
        values = result.per_image[f"gradient/{key}"]
        assert torch.isnan(values[1::2]).all() and torch.isfinite(values[0::2]).all(), key
    # the means are the class-0 images' own values (region masses of the ramp), not diluted by chance level
    assert out["gradient/object_mass"] == pytest.approx(28 / 120)
    assert out["gradient/spurious_mass"] == pytest.approx(24 / 120)
    assert out["gradient/pointing_game"] == 0.0
    assert math.isnan(out["gradient/object_mass/b"]) and out["gradient/object_mass/a"] == pytest.approx(28 / 120)
    # group b keeps no usable image: a disparity or divergence between groups is not defined (not 0.0)
    assert math.isnan(out["gradient/attention_disparity"]) and math.isnan(out["gradient/group_divergence"])
    assert math.isfinite(out["probe/accuracy"])  # the logits are finite


def test_all_constant_maps_give_null_for_every_metric_never_chance_or_one():
    zero = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        zero[1].weight.zero_()
    result, out = _audit(zero)
    assert describe(result)["gradient"] == "constant maps: 8 of 8"
    assert problems(describe(result)) == ["gradient: constant maps: 8 of 8"]
    gradient = {k: v for k, v in out.items() if k.startswith("gradient/")}
    assert set(gradient) >= {f"gradient/{m}" for m in MAP_METRICS if m != "drift"}
    assert all(math.isnan(v) for v in gradient.values()), gradient
    # the pure metric would have scored them: area fraction 8/16 (chance) and stability 1.0 (ties)
    assert math.isfinite(out["probe/accuracy"])  # the logits are finite: accuracy stands


def test_nan_weights_null_the_accuracy_and_every_metric():
    model = _linear()
    with torch.no_grad():
        model[1].weight.fill_(math.nan)
    result, out = _audit(model)
    assert describe(result) == {"logits": "non-finite logits: 8 of 8", "gradient": "non-finite maps: 8 of 8"}
    assert problems(describe(result)) == ["non-finite logits: 8 of 8", "gradient: non-finite maps: 8 of 8"]
    assert out and all(math.isnan(v) for v in out.values()), out
    assert {"probe/accuracy", "probe/accuracy/class_0", "probe/accuracy/a"} <= set(out)


def test_one_image_with_inf_logits_nulls_its_metrics_and_the_accuracy():
    probe = _probe()
    probe.inputs[3, 0, 0, 0] = math.inf  # image 3's logits are not finite; its gradient map (W[c]) still is
    result, out = _audit(_linear(), probe)
    assert result.finite_logits.tolist() == [True, True, True, False, True, True, True, True]
    assert describe(result) == {"logits": "non-finite logits: 1 of 8", "gradient": "ok"}
    assert torch.isnan(result.per_image["gradient/object_mass"][3])
    assert torch.isfinite(result.per_image["gradient/object_mass"][[0, 1, 2, 4]]).all()
    assert math.isnan(out["probe/accuracy"]) and math.isfinite(out["gradient/object_mass"])


def test_drift_against_a_constant_previous_map_is_null():
    probe = _probe()
    previous = torch.rand(8, 4, 4, generator=torch.Generator().manual_seed(1))
    previous[2] = 0.0
    result, _ = _audit(_linear(), probe, previous_maps={"gradient": previous})
    drift = result.per_image["gradient/drift"]
    assert torch.isnan(drift[2]) and torch.isfinite(drift[[0, 1, 3]]).all()
    # the monitor hands over the last audit's ranks: a constant map's ranks are all equal, stale next time
    dead, _ = _audit(_linear(dead_class=True), probe)
    nxt, _ = _audit(_linear(), probe, previous_ranks=dead.ranks)
    drift = nxt.per_image["gradient/drift"]
    assert torch.isnan(drift[1::2]).all() and torch.isfinite(drift[0::2]).all()


class ExplodesOnMarked(nn.Module):
    """The dead-class linear model, whose logits are NaN for images whose first pixel is marked (> 5); its maps
    (gradients) stay finite."""

    def __init__(self):
        super().__init__()
        self.net = _linear(dead_class=True)

    def forward(self, x):
        out = self.net(x)
        return out + torch.where(x[:, :1, 0, 0] > 5, math.nan, 0.0)  # the gradient (and map) stays finite


def test_sharded_audits_merge_to_the_single_process_health_and_metrics():
    probe, model = _probe(), ExplodesOnMarked()
    probe.inputs[5, 0, 0, 0] = 7.0  # image 5 has NaN logits: on one shard only
    single, single_out = _audit(model, probe)
    shards = [_audit(model, probe.shard(rank, 3))[0] for rank in range(3)]
    merged = merge(shards[::-1])
    assert describe(merged) == describe(single) == {"logits": "non-finite logits: 1 of 8",
                                                    "gradient": "constant maps: 4 of 8"}
    assert [len(s.indices) for s in shards] == [3, 3, 2]
    assert torch.equal(merged.degenerate["gradient"], single.degenerate["gradient"])
    merged_out = summarize(merged, probe, SPEC)
    assert merged_out.keys() == single_out.keys()
    for k, v in single_out.items():
        assert (math.isnan(v) and math.isnan(merged_out[k])) or merged_out[k] == pytest.approx(v, abs=1e-6), k


# -- reading the record -----------------------------------------------------------------------------------------
def test_problems_tolerate_a_minority_of_constant_maps_only():
    health = {"logits": "ok", "gradcam": "constant maps: 3 of 64", "gradient": "constant maps: 33 of 64"}
    assert problems(health) == ["gradient: constant maps: 33 of 64"]
    assert notes(health) == ["gradcam: constant maps: 3 of 64"]
    assert health_line({"gradcam": "constant maps: 3 of 64"}) == "ok (gradcam: constant maps: 3 of 64: their " \
                                                                 "metrics are null)"
    assert problems({"gradcam": "non-finite maps: 1 of 64; constant maps: 2 of 64"}) == [
        "gradcam: non-finite maps: 1 of 64"]
    assert problems({"gradcam": "something new"}) == ["gradcam: something new"]  # unknown: not healthy
    assert problems(None) == [] and health_line(None) == "not recorded"
    errors = health_errors({"logits": "non-finite logits: 2 of 2", "gradcam": "ok"})
    assert errors == [{"method": None, "type": "UnhealthyAudit", "message": errors[0]["message"]}]
    assert errors[0]["message"].startswith("non-finite logits: 2 of 2 (")


def test_validate_report_reads_old_reports_and_rejects_a_malformed_health():
    data = make_report_data(2, with_maps=False)
    assert all("health" not in a for a in data["audits"])
    validate_report(data)
    data["audits"][1]["health"] = {"gradcam": "ok"}
    validate_report(data)
    data["audits"][1]["health"] = {"gradcam": 3}
    with pytest.raises(ReportError, match=r"audits\[1\] 'health' must be an object of strings"):
        validate_report(data)


def _unhealthy_data(with_maps: bool = False) -> dict:
    """Two audits whose rules all pass; the last one's gradcam maps are constant for all 12 images."""
    data = make_report_data(2, with_maps=with_maps)
    for a in data["audits"]:
        a["health"] = {"logits": "ok", "gradcam": "ok", "gradient": "ok"}
    data["audits"][1]["health"]["gradcam"] = "constant maps: 12 of 12"
    return data


RULES = [Rule("gradcam/spurious_mass", "max", 0.9), Rule("gradcam/object_mass", "min", 0.0)]


def test_gate_fails_an_unhealthy_audit_whose_rules_pass_unless_allowed():
    data = _unhealthy_data()
    result = evaluate(data, RULES)
    assert all(r.passed for r in result.results) and not result.passed and result.exit_code == EXIT_FAIL
    assert result.problems == ["gradcam: constant maps: 12 of 12"]
    assert evaluate(data, RULES, allow_unhealthy=True).exit_code == EXIT_PASS
    assert evaluate(data, RULES, epoch="0").exit_code == EXIT_PASS  # the healthy audit
    # a key the unhealthy audit lacks fails with it (exit 1), it does not stop the gate (exit 2)
    missing = evaluate(data, [Rule("gradcam/insertion_auc", "min", 0.5)])
    assert missing.exit_code == EXIT_FAIL and missing.results[0].value is None
    # best: a healthy audit first, even when the unhealthy one passes as many rules
    assert select_audit(data["audits"], "best", RULES) == (0, "best")
    assert select_audit(data["audits"], "best", RULES, allow_unhealthy=True) == (1, "best")


def test_gate_cli_table_json_and_junit_name_the_problem(tmp_path, capsys):
    write_report(tmp_path / "saliency", _unhealthy_data())
    xml = tmp_path / "gate.xml"
    args = ["gate", str(tmp_path), "--max", "gradcam/spurious_mass=0.9", "--junit", str(xml)]
    assert main(args) == EXIT_FAIL
    out = capsys.readouterr().out
    assert "health: UNHEALTHY: gradcam: constant maps: 12 of 12" in out
    assert "FAIL: the audit is unhealthy: gradcam: constant maps: 12 of 12" in out
    suite = ET.parse(xml).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("2", "1")
    case = [c for c in suite.findall("testcase") if c.get("name") == "health"][0]
    failure = case.find("failure")
    assert failure is not None and failure.get("type") == "UnhealthyAudit"
    assert "gradcam: constant maps: 12 of 12" in failure.get("message")
    assert main([*args, "--allow-unhealthy", "--json"]) == EXIT_PASS
    obj = json.loads(capsys.readouterr().out)
    assert obj["passed"] and not obj["healthy"] and obj["health_problems"] == ["gradcam: constant maps: 12 of 12"]
    suite = ET.parse(xml).getroot().find("testsuite")
    assert suite.get("failures") == "0" and "allowed by --allow-unhealthy" in suite.find(
        "testcase[@name='health']/system-out").text
    assert main(["gate", str(tmp_path), "--max", "gradcam/insertion_auc=1", "--allow-unhealthy"]) == EXIT_ERROR
    assert ET.fromstring(to_junit(error="x")).get("tests") == "1"


def test_page_badges_and_show_line_name_the_problem(tmp_path, capsys):
    data = _unhealthy_data()
    doc = assert_safe(render_page(data, tmp_path))
    text = "".join(doc.text)
    assert "latest audit unhealthy: gradcam: constant maps: 12 of 12" in text
    assert "health: UNHEALTHY: gradcam: constant maps: 12 of 12" in text  # the latest-audit section
    assert len([a for t, a in doc.with_class("health") if "bad" in a["class"].split()]) == 2
    # with maps: also on the unhealthy method's overlays of that epoch (not on gradient's, not on epoch 0's)
    write_maps(tmp_path / "saliency", [0, 1], n=4, size=8)
    doc = assert_safe(render_page(_unhealthy_data(with_maps=True), tmp_path / "saliency"))
    views = [i for i, (t, a) in enumerate(doc.elements) if "epoch-view" in (a.get("class") or "")]
    assert len(views) == 4  # gradcam epochs 0, 1; gradient epochs 0, 1
    badged = [i for i in views if "health" in (doc.elements[i + 1][1].get("class") or "")]
    assert badged == [views[1]], badged
    data["audits"][1]["health"]["gradcam"] = "ok"
    healthy = assert_safe(render_page(data, tmp_path))
    assert not healthy.with_class("health") and "health: ok" in "".join(healthy.text)
    write_report(tmp_path / "saliency", _unhealthy_data())
    assert main(["show", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "health: UNHEALTHY: gradcam: constant maps: 12 of 12" in out


def test_recorder_writes_health_and_its_errors_and_logs_the_text_once_warned():
    class Sink:
        def __init__(self):
            self.texts = []

        def log_metrics(self, metrics, step):
            pass

        def log_text(self, tag, text, step):
            self.texts.append((tag, text, step))

        def summary(self, metrics):
            pass

    class Trainer:
        global_step = 7

    recorder = Recorder(save_maps=False, log_images=0)
    recorder.sinks = [Sink()]
    result = ShardResult(torch.arange(2), torch.zeros(2, dtype=torch.long), maps={"gradcam": torch.zeros(2, 4, 4)},
                         finite_logits=torch.tensor([True, True]),
                         degenerate={"gradcam": torch.tensor([2, 2], dtype=torch.int8)})
    with pytest.warns(RuntimeWarning, match=r"unhealthy \(gradcam: constant maps: 2 of 2\)"):
        record = recorder.record(Trainer(), result, {"gradcam/object_mass": math.nan}, _probe(2), 3, 0.0)
    assert record["health"] == {"logits": "ok", "gradcam": "constant maps: 2 of 2"}
    assert [e["method"] for e in record["errors"]] == ["gradcam"] and not result.errors
    assert recorder.sinks[0].texts == [("saliency/health", "fit epoch 3: UNHEALTHY: gradcam: constant maps: 2 of 2", 7)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per monitor
        recorder.record(Trainer(), result, {}, _probe(2), 4, 0.0)
    assert len(recorder.sinks[0].texts) == 1  # the same health again: no new text
    healthy = ShardResult(torch.arange(2), torch.zeros(2, dtype=torch.long), maps={"gradcam": torch.rand(2, 4, 4)},
                          finite_logits=torch.tensor([True, True]),
                          degenerate={"gradcam": torch.tensor([0, 0], dtype=torch.int8)})
    recorder.record(Trainer(), healthy, {}, _probe(2), 5, 0.0)
    assert recorder.sinks[0].texts[1][0] == "saliency/health" and "fit epoch 5: ok" in recorder.sinks[0].texts[1][1]


# -- through a fit ----------------------------------------------------------------------------------------------
class NaNWeightsFromEpoch1(pl.Callback):
    """The weights turn NaN at the start of epoch 1 (what a diverged optimiser leaves)."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(math.nan)


class BlindNet(mu.ShapesNet):
    """Looks at nothing: its output does not depend on the input, so every gradient map is all zero."""

    def forward(self, x):
        return super().forward(x * 0.0)


def _report(tmp_path: Path) -> tuple[Path, dict]:
    (path,) = tmp_path.glob("**/saliency/report.json")
    return path, json.loads(path.read_text())


@pytest.fixture(scope="module")
def nan_fit(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nan_fit")
    dm = mu.datamodule()
    monitor = SaliencyMonitor(mu.probe(dm, size=8), methods=("gradcam", "gradient"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mu.fit([NaNWeightsFromEpoch1(), monitor], tmp, max_epochs=2, dm=dm)
    return tmp, [str(w.message) for w in caught if "unhealthy" in str(w.message)]


def test_nan_weights_fit_records_health_errors_and_null_metrics(nan_fit):
    tmp, warned = nan_fit
    path, report = _report(tmp)
    first, last = report["audits"]
    assert first["health"] == {"logits": "ok", "gradcam": "ok", "gradient": "ok"} and not first["errors"]
    assert last["health"] == {"logits": "non-finite logits: 8 of 8", "gradcam": "non-finite maps: 8 of 8",
                              "gradient": "non-finite maps: 8 of 8"}
    assert [(e["method"], e["type"]) for e in last["errors"]] == [
        (None, "UnhealthyAudit"), ("gradcam", "UnhealthyAudit"), ("gradient", "UnhealthyAudit")]
    assert last["metrics"]["probe/accuracy"] is None  # not the 0.41 of "argmax of NaN is class 0"
    gradcam = {k: v for k, v in last["metrics"].items() if k.startswith("gradcam/")}
    assert {"gradcam/spurious_mass", "gradcam/object_mass", "gradcam/stability"} <= set(gradcam)
    assert all(v is None for v in gradcam.values()), gradcam
    assert first["metrics"]["gradcam/spurious_mass"] is not None
    assert len(warned) == 1 and "non-finite logits: 8 of 8" in warned[0]


@pytest.mark.parametrize("rules", [
    ["--max", "gradcam/spurious_mass=0.1", "--min", "gradcam/object_mass=0.05", "--min", "gradcam/stability=0.6"],
    ["--max", "gradcam/spurious_mass=1"],
    ["--min", "gradcam/insertion_auc=0"],  # a key the audit lacks: it fails with the audit, not exit 2
])
def test_nan_weights_fit_fails_the_gate_naming_the_problem_for_any_rules(nan_fit, rules, capsys):
    path, _ = _report(nan_fit[0])
    assert main(["gate", str(path), *rules]) == EXIT_FAIL
    out = capsys.readouterr().out
    assert "FAIL: the audit is unhealthy: non-finite logits: 8 of 8; gradcam: non-finite maps: 8 of 8" in out
    # gated on the rules alone: the null metrics fail their rules, an absent key cannot be decided
    expected = EXIT_ERROR if "insertion_auc" in rules[1] else EXIT_FAIL
    assert main(["gate", str(path), *rules, "--allow-unhealthy"]) == expected


def test_nan_weights_fit_gates_the_healthy_epoch_on_its_rules(nan_fit, capsys):
    path, _ = _report(nan_fit[0])
    assert main(["gate", str(path), "--max", "gradcam/spurious_mass=1", "--epoch", "0"]) == EXIT_PASS
    assert "health: ok" in capsys.readouterr().out


def test_all_zero_maps_fit_nulls_stability_and_fails_its_rule(tmp_path, capsys):
    dm = mu.datamodule()
    torch.manual_seed(0)
    monitor = SaliencyMonitor(mu.probe(dm, size=8), methods=("gradient",), metrics=("stability", "spurious_mass"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mu.fit([monitor], tmp_path, max_epochs=1, dm=dm, net=BlindNet(width=4))
    path, report = _report(tmp_path)
    last = report["audits"][-1]
    assert last["health"] == {"logits": "ok", "gradient": "constant maps: 8 of 8"}
    assert last["metrics"]["gradient/stability"] is None  # not the 1.0 of two constant maps
    assert last["metrics"]["gradient/spurious_mass"] is None  # not chance level
    assert main(["gate", str(path), "--min", "gradient/stability=0.5"]) == EXIT_FAIL
    assert "gradient: constant maps: 8 of 8" in capsys.readouterr().out
    assert main(["gate", str(path), "--min", "gradient/stability=0.5", "--allow-unhealthy"]) == EXIT_FAIL  # null
