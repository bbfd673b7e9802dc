"""Discovery in the monitor's audit: on the find_shortcut data (a watermark on half of one class's images, no masks
given), a fit writes a ``discovery`` section with a confirmed candidate and ``discovery/suspects >= 1``, which the
gate and the alarm read like any other key; ``discover=False`` writes none; the page and ``show`` show it."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import pytorch_lightning as pl
import torch

from examples.find_shortcut import MARK, planted
from examples.shortcut_shapes import ShapesNet
from lightning_saliency import ProbeSet, SaliencyMonitor, ShortcutAlarm
from lightning_saliency.audit import ShardResult
from lightning_saliency.discovery_audit import DiscoveryAudit, default_method, run_discovery


def _fit(tmp_path, *callbacks, epochs=2, seed=0, name="run"):
    pl.seed_everything(seed, verbose=False)
    train = planted(600, 0.5, False, seed)
    items = [{"image": x, "label": int(t)} for x, t in zip(train["inputs"], train["labels"])]
    loader = torch.utils.data.DataLoader(items, batch_size=32, shuffle=True)
    model = ShapesNet(lr=2e-3, width=8)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, callbacks=list(callbacks),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         deterministic=True, limit_val_batches=0, default_root_dir=str(tmp_path / name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train_dataloaders=loader)
    return trainer, model


def _probe(seed=0):
    data = planted(0, 0.5, False, seed + 1, per_class=24)
    return ProbeSet(data["inputs"], data["labels"]), set(data["marked"].nonzero()[:, 0].tolist())


@pytest.fixture(scope="module")
def discovered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("discovery")
    probe, truth = _probe()
    monitor = SaliencyMonitor(probe, methods=("gradient", "gradcam"), log_images=0, dirpath=str(tmp / "sal"),
                              metrics=("drift",), class_names=["square", "disk", "cross"])
    alarm = ShortcutAlarm(metric="discovery/suspects", threshold=0, action="stop")
    trainer, _ = _fit(tmp, monitor, alarm, epochs=2)
    return {"dir": tmp / "sal", "monitor": monitor, "alarm": alarm, "trainer": trainer, "truth": truth}


def test_a_fit_writes_a_confirmed_candidate_that_matches_the_planted_watermark(discovered):
    report = json.loads((discovered["dir"] / "report.json").read_text())
    audits = report["audits"]
    assert all(a["discovery"]["method"] == "gradcam" for a in audits)  # the first CAM-family method, not the first
    last = audits[-1]
    assert last["metrics"]["discovery/suspects"] >= 1
    confirmed = [c for c in last["discovery"]["candidates"] if c["confirmed"]]
    best = max(confirmed, key=lambda c: c["flip_rate"])
    assert best["class"] == 0 and best["flip_rate"] >= 0.1 and best["flip_rate"] >= 3 * best["null_flip_rate"]
    members, truth = set(best["members"]), discovered["truth"]
    assert len(members & truth) / len(members) >= 0.8 and len(members & truth) / len(truth) >= 0.8
    top, left, bottom, right = best["region"]  # the box holds the watermark's rows 2-6, cols 26-30
    assert top <= MARK[0].start and bottom >= MARK[0].stop and left <= MARK[1].start and right >= MARK[1].stop
    assert last["metrics"]["discovery/max_flip_rate"] == pytest.approx(max(c["flip_rate"]
                                                                          for c in last["discovery"]["candidates"]))
    assert "mask" not in best  # JSON-safe: the mask is dropped, its bounding box stays


def test_the_alarm_on_suspects_fires_and_stops_training(discovered):
    alarm, trainer = discovered["alarm"], discovered["trainer"]
    assert alarm.mode == "max" and alarm.firings and alarm.firings[0]["metric"] == "discovery/suspects"
    assert trainer.should_stop
    report = json.loads((discovered["dir"] / "report.json").read_text())
    assert report["alarms"][0]["value"] >= 1


def test_the_gate_fails_on_a_suspect_and_passes_a_looser_rule(discovered):
    from lightning_saliency.cli import main

    path = str(discovered["dir"] / "report.json")
    assert main(["gate", path, "--max", "discovery/suspects=0"]) == 1
    assert main(["gate", path, "--max", "discovery/suspects=100"]) == 0


def test_show_prints_the_suspects_of_the_latest_audit(discovered, capsys):
    from lightning_saliency.cli import main

    assert main(["show", str(discovered["dir"] / "report.json")]) == 0
    out = capsys.readouterr().out
    assert "discovery on gradcam maps" in out and "class 0:" in out and "CONFIRMED" in out


def test_the_page_has_a_suspected_shortcuts_section_with_outlined_members(discovered, tmp_path):
    from lightning_saliency.cli import main

    page = tmp_path / "audit.html"
    assert main(["report", str(discovered["dir"]), "-o", str(page)]) == 0
    html = page.read_text()
    from tests.test_page import assert_safe

    assert_safe(html)  # the page's structural safety holds with the section
    assert "Suspected shortcuts" in html and "CONFIRMED" in html
    section = html[html.index("Suspected shortcuts"):]
    assert "data:image/png;base64," in section[:200000]  # member thumbnails with the region outlined
    assert "discovery_masks" not in html  # the masks are not taken for a method's maps
    # the first thumbnail is the first confirmed candidate's first member, its region's own mask outlined
    import base64
    import io

    import numpy as np
    from PIL import Image

    from lightning_saliency.render import outline_mask
    from lightning_saliency.report import load_maps, load_probe_thumbnails

    last = json.loads((discovered["dir"] / "report.json").read_text())["audits"][-1]
    k = next(i for i, c in enumerate(last["discovery"]["candidates"]) if c["confirmed"])
    mask = load_maps(discovered["dir"] / last["maps"])["discovery_masks"][k]
    thumb = load_probe_thumbnails(discovered["dir"])["images"][last["discovery"]["candidates"][k]["members"][0]]
    uri = section[section.index('<div class="members"><img src="') + 31:]
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri[len("data:image/png;base64,"):uri.index('"')]))))
    assert np.array_equal(shown, outline_mask(thumb, mask))


def test_discover_false_writes_no_discovery_and_an_alarm_on_it_fails_at_setup(tmp_path):
    probe, _ = _probe()
    monitor = SaliencyMonitor(probe, methods=("gradcam",), log_images=0, dirpath=str(tmp_path / "off"),
                              metrics=("drift",), discover=False)
    _fit(tmp_path, monitor, epochs=1)
    report = json.loads((tmp_path / "off" / "report.json").read_text())
    assert report["audits"] and all("discovery" not in a and "discovery/suspects" not in a["metrics"]
                                    for a in report["audits"])
    from lightning_saliency.cli import main

    assert main(["gate", str(tmp_path / "off" / "report.json"), "--max", "discovery/suspects=0"]) == 2
    monitor = SaliencyMonitor(probe, methods=("gradcam",), log_images=0, discover=False)
    with pytest.raises(ValueError, match="discover=False"):
        _fit(tmp_path, monitor, ShortcutAlarm(metric="discovery/suspects", threshold=0), epochs=1, name="refused")


def test_configuration_errors_fail_at_construction():
    probe, _ = _probe()
    with pytest.raises(ValueError, match="did you mean 'min_flip'"):
        SaliencyMonitor(probe, discover_options={"min_flp": 0.2})
    with pytest.raises(ValueError, match="not among the monitor's methods"):
        SaliencyMonitor(probe, methods=("gradient",), discover_method="gradcam")
    with pytest.raises(ValueError, match="not a discovery key"):
        from lightning_saliency.checks import check_alarm

        check_alarm("discovery/suspect", ("gradcam",), ("drift",), discover=True)
    assert default_method(("gradient", "layercam", "gradcam")) == "layercam"
    assert default_method(("gradient", "input_x_gradient")) == "gradient"


def test_an_unhealthy_method_is_skipped_with_its_reason_and_null_metrics():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    probe = ProbeSet(torch.rand(12, 1, 4, 4), torch.tensor([0, 1] * 6))
    result = ShardResult(torch.arange(12), torch.tensor([0, 1] * 6), {"gradient": torch.zeros(12, 4, 4)},
                         degenerate={"gradient": torch.full((12,), 2, dtype=torch.int8)})
    section, metrics = run_discovery(model, probe, result, "gradient")
    assert "constant maps: 12 of 12" in section["skipped"] and section["candidates"] == []
    assert all(math.isnan(v) for v in metrics.values())


def test_a_failing_discovery_is_recorded_and_warned_not_raised_unless_asked():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    probe = ProbeSet(torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 0, 1]))
    result = ShardResult(torch.arange(4), torch.tensor([0, 1, 0, 1]), {"gradient": torch.rand(4, 4, 4)})
    audit = DiscoveryAudit(True, None, {"size": 0}, ("gradient",))  # discover() refuses size 0 at the first audit
    spec = type("Spec", (), {"target": "prediction", "batch_size": None})()
    metrics: dict = {}
    with pytest.warns(RuntimeWarning, match="discovery failed"):
        section = audit(model, probe, result, spec, metrics)
    assert "discovery failed" in section["skipped"] and result.errors[-1]["type"] == "ValueError"
    assert math.isnan(metrics["discovery/suspects"])
    with pytest.raises(ValueError):
        audit(model, probe, result, spec, {}, on_error="raise")


def test_tensorboard_gets_the_discovery_text_and_a_grid_of_each_confirmed_suspect(tmp_path):
    import io

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing import event_accumulator as ea

    probe, _ = _probe()
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    monitor = SaliencyMonitor(probe, methods=("gradcam",), log_images=4, metrics=("drift",))
    pl.seed_everything(0, verbose=False)
    train = planted(600, 0.5, False, 0)
    items = [{"image": x, "label": int(t)} for x, t in zip(train["inputs"], train["labels"])]
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=logger, callbacks=[monitor],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         deterministic=True, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(ShapesNet(lr=2e-3, width=8), torch.utils.data.DataLoader(items, batch_size=32, shuffle=True))
    record = monitor.history[-1]
    confirmed = [c for c in record["discovery"]["candidates"] if c["confirmed"]]
    assert confirmed
    acc = ea.EventAccumulator(logger.log_dir, size_guidance={ea.IMAGES: 0, ea.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    assert [t for t in tags["images"] if t.startswith("saliency/discovery/")] == \
        [f"saliency/discovery/suspect_{i}/overlays" for i in range(len(confirmed))]
    picture = np.asarray(Image.open(io.BytesIO(acc.Images("saliency/discovery/suspect_0/overlays")[-1]
                                                .encoded_image_string)).convert("RGB"))
    assert (np.abs(picture.astype(int) - [255, 0, 255]).sum(-1) < 40).any()  # the outline's magenta is drawn
    text = acc.Tensors("saliency/discovery/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "CONFIRMED" in text and f"{len(confirmed[0]['members'])} members" in text


def test_discovery_leaves_training_bit_identical(tmp_path):
    """Discovery and its confirmation (forward passes on the probe, a candidate confirmed) change no weight."""
    probe, _ = _probe()
    monitor = SaliencyMonitor(probe, methods=("gradcam",), log_images=0, metrics=("drift", "stability"),
                              dirpath=str(tmp_path / "sal"), expensive_every_n_audits=10)
    _, audited = _fit(tmp_path, monitor, epochs=3, name="with")
    _, plain = _fit(tmp_path, epochs=3, name="without")
    assert any(a["metrics"]["discovery/suspects"] >= 1 for a in monitor.history)  # confirm() did run
    # confirmation runs at every audit, also at the middle one, which skipped the periodic stability
    assert "gradcam/stability" not in monitor.history[1]["metrics"]
    assert all({"discovery/suspects", "discovery/max_flip_rate"} <= set(a["metrics"]) for a in monitor.history)
    assert all(c["confirmed"] in (True, False) for a in monitor.history for c in a["discovery"]["candidates"])
    a, b = audited.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_several_candidates_share_one_forward_and_match_confirming_each_alone():
    from lightning_saliency.metrics import confirm, discover

    g = torch.Generator().manual_seed(0)
    maps = torch.zeros(24, 16, 16)
    maps[:, 6:10, 6:10] = 1.0
    maps[[0, 1, 2, 3], :4, :4], maps[[0, 1, 2, 3], 6:10, 6:10] = 1.0, 0.0  # class 0's minority: a corner
    maps[[12, 13, 14, 15], 12:, 12:], maps[[12, 13, 14, 15], 6:10, 6:10] = 1.0, 0.0  # class 1's: the other one
    labels = torch.tensor([0] * 12 + [1] * 12)
    probe = ProbeSet(torch.rand(24, 1, 16, 16, generator=g), labels)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(2, 256, generator=g))
        model[1].bias.zero_()
    result = ShardResult(torch.arange(24), labels, {"gradient": maps})
    section, metrics = run_discovery(model, probe, result, "gradient", target="label")
    found = discover(maps, labels)
    assert len(found["candidates"]) == 2 == len(section["candidates"])
    alone = [confirm(model, probe.inputs, labels, c) for c in found["candidates"]]
    for got, want in zip(section["candidates"], alone):
        assert got["members"] == want["members"] and got["region"] == want["region"]
        for k in ("flip_rate", "null_flip_rate", "logit_gain", "erase_accuracy_drop"):
            assert got[k] == pytest.approx(want[k], abs=1e-6, nan_ok=True) or (got[k] is None and math.isnan(want[k]))
    assert metrics["discovery/suspects"] == sum(c["confirmed"] for c in alone)



def test_at_most_max_tested_candidates_are_tested_and_the_rest_are_recorded_untested():
    """Two candidates, ``max_tested=1``: the better scored is tested (the same numbers as with both tested), the
    other is recorded with null rates and the reason, its mask still in the section; never counted."""
    g = torch.Generator().manual_seed(0)
    maps = torch.zeros(24, 16, 16)
    maps[:, 6:10, 6:10] = 1.0
    maps[[0, 1, 2, 3], :4, :4], maps[[0, 1, 2, 3], 6:10, 6:10] = 1.0, 0.0
    maps[[12, 13, 14, 15], 12:, 12:], maps[[12, 13, 14, 15], 6:10, 6:10] = 0.8, 0.0  # scored a little lower
    labels = torch.tensor([0] * 12 + [1] * 12)
    probe = ProbeSet(torch.rand(24, 1, 16, 16, generator=g), labels)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 2))
    result = ShardResult(torch.arange(24), labels, {"gradient": maps})
    both, _ = run_discovery(model, probe, result, "gradient", target="label")
    one, metrics = run_discovery(model, probe, result, "gradient", {"max_tested": 1}, target="label")
    assert both["untested"] == 0 and one["untested"] == 1 and len(one["candidates"]) == 2
    assert one["candidates"][0] == both["candidates"][0]
    left = one["candidates"][1]
    assert left["members"] == both["candidates"][1]["members"] and left["confirmed"] is False
    assert left["flip_rate"] is None and left["erase_accuracy_drop"] is None and "max_tested" in left["reason"]
    assert one["masks"].shape == (2, 16, 16) and bool(one["masks"][1, 12:, 12:].all())
    assert metrics["discovery/suspects"] == float(one["candidates"][0]["confirmed"])
    with pytest.raises(ValueError, match="max_tested must be an int >= 1"):
        DiscoveryAudit(True, None, {"max_tested": 0}, ("gradient",))

def test_confirmation_reuses_the_audits_logits_and_runs_one_batch():
    """Given the audit's logits (ShardResult.logits), a candidate's confirmation is one forward, and its numbers
    are those computed without them."""
    maps = torch.zeros(24, 16, 16)
    maps[:, 6:10, 6:10] = 1.0
    maps[[0, 1, 2, 3], :4, :4], maps[[0, 1, 2, 3], 6:10, 6:10] = 1.0, 0.0  # class 0's minority, lit in a corner
    labels = torch.tensor([0] * 12 + [1] * 12)
    probe = ProbeSet(torch.rand(24, 1, 16, 16, generator=torch.Generator().manual_seed(0)), labels)

    class Counting(torch.nn.Module):  # reads the top-left corner: logit 0 = its mean, logit 1 = 0.5
        calls = 0

        def forward(self, x):
            Counting.calls += 1
            return torch.stack([x[:, 0, :4, :4].mean(dim=(1, 2)), torch.full((len(x),), 0.5)], 1)

    model = Counting()
    with torch.no_grad():
        logits = model(probe.inputs)
    Counting.calls = 0
    given = ShardResult(torch.arange(24), logits.argmax(1), {"gradient": maps}, logits=logits)
    section, metrics = run_discovery(model, probe, given, "gradient", target="label")
    assert [c["members"] for c in section["candidates"]] == [[0, 1, 2, 3]] and Counting.calls == 1
    assert section["masks"].shape == (1, 16, 16) and bool(section["masks"][0, :4, :4].all())
    Counting.calls = 0
    alone, again = run_discovery(model, probe, ShardResult(torch.arange(24), logits.argmax(1), {"gradient": maps}),
                                 "gradient", target="label")
    assert Counting.calls == 2 and alone["candidates"] == section["candidates"] and again == metrics


def test_the_candidates_masks_are_in_the_maps_file_not_in_the_record(discovered):
    import numpy as np

    from lightning_saliency.report import load_maps

    report = json.loads((discovered["dir"] / "report.json").read_text())
    for audit in report["audits"]:
        cands = audit["discovery"]["candidates"]
        assert "masks" not in audit["discovery"]
        saved = load_maps(discovered["dir"] / audit["maps"])
        masks = saved["discovery_masks"]
        assert masks.dtype == bool and masks.shape == (len(cands), 32, 32)  # 32x32 inputs: kept at their size
        for m, c in zip(masks, cands):  # row k is candidate k's region: its bounding box is the record's
            ys, xs = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
            assert [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1] == c["region"]
        assert sorted(k for k in saved if k not in ("predictions", "discovery_masks")) == ["gradcam", "gradient"]


def test_the_audit_keeps_its_logits_and_merging_shards_keeps_them_in_probe_order():
    from lightning_saliency.audit import AuditSpec, audit_shard, merge

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3))
    probe = ProbeSet(torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2] * 2))
    spec = AuditSpec(methods=("gradcam",), metrics=("drift",))
    with torch.no_grad():
        want = model(probe.inputs)
    assert torch.allclose(audit_shard(model, probe, spec).logits, want, atol=1e-6)
    shards = [audit_shard(model, probe.shard(rank, 2), spec) for rank in (1, 0)]
    assert torch.allclose(merge(shards).logits, want, atol=1e-6)
    assert merge([shards[0], ShardResult(torch.tensor([1]), torch.tensor([0]))]).logits is None  # unknown


def test_confirmation_sees_the_model_through_the_audits_output_and_task():
    """A model returning a dict: the confirmation's forwards read its class scores as the audit's did."""
    maps = torch.zeros(24, 16, 16)
    maps[:, 6:10, 6:10] = 1.0
    maps[[0, 1, 2, 3], :4, :4], maps[[0, 1, 2, 3], 6:10, 6:10] = 1.0, 0.0
    labels = torch.tensor([0] * 12 + [1] * 12)
    probe = ProbeSet(torch.rand(24, 1, 16, 16, generator=torch.Generator().manual_seed(0)), labels)

    class Dict(torch.nn.Module):
        def forward(self, x):
            return {"logits": torch.stack([x[:, 0, :4, :4].mean(dim=(1, 2)), torch.full((len(x),), 0.5)], 1)}

    result = ShardResult(torch.arange(24), labels, {"gradient": maps})
    spec = type("Spec", (), {"target": "label", "batch_size": None, "output": None, "task": None})()
    metrics: dict = {}
    section = DiscoveryAudit(True, None, None, ("gradient",))(Dict(), probe, result, spec, metrics, on_error="raise")
    assert section["skipped"] is None and len(section["candidates"]) == 1
    assert math.isfinite(section["candidates"][0]["flip_rate"]) and math.isfinite(metrics["discovery/max_flip_rate"])
