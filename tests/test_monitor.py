"""SaliencyMonitor: when it audits, what it writes, and that it never changes training (DESIGN §5)."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import pytorch_lightning as pl
import torch

from lightning_saliency import ProbeSet, SaliencyMonitor
from lightning_saliency.report import AuditReport, load_maps
from tests import monitor_utils as U


def _report(trainer: pl.Trainer) -> dict:
    with open(os.path.join(trainer.log_dir, "saliency", "report.json")) as f:
        return json.load(f)


def _cheap(**kw):
    kw.setdefault("methods", ("gradcam", "gradient"))
    kw.setdefault("metrics", ("object_mass", "spurious_mass", "pointing_game", "drift", "attention_disparity"))
    return SaliencyMonitor(U.probe(), **kw)


def _state(trainer: pl.Trainer, net: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {f"p/{k}": v.detach().clone() for k, v in net.state_dict().items()}
    for i, opt in enumerate(trainer.optimizers):
        for pid, st in opt.state_dict()["state"].items():
            for k, v in st.items():
                out[f"opt{i}/{pid}/{k}"] = torch.as_tensor(v).clone()
    return out


@pytest.mark.parametrize("accumulate", [1, 2])
def test_audit_leaves_training_bit_identical(tmp_path, accumulate):
    """Invariant 1: BatchNorm + Dropout, same seed, with and without the monitor: identical weights, buffers
    and optimizer state."""
    t0, n0 = U.fit([], tmp_path / "a", max_epochs=3, accumulate_grad_batches=accumulate)
    monitor = SaliencyMonitor(U.probe(), methods=("gradcam", "gradcam++", "gradient", "smoothgrad"),
                              expensive_every_n_audits=1, method_options={"smoothgrad_samples": 2})
    t1, n1 = U.fit([monitor], tmp_path / "b", max_epochs=3, accumulate_grad_batches=accumulate)
    assert len(monitor.history) == 3, "the monitor must actually have audited every epoch"
    a, b = _state(t0, n0), _state(t1, n1)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"the audit changed training: {different[:5]}"


def test_audits_every_n_epochs_and_at_fit_end_never_in_sanity_check(tmp_path):
    monitor = _cheap(every_n_epochs=2)
    trainer, _ = U.fit([monitor], tmp_path, max_epochs=3, num_sanity_val_steps=2)
    report = _report(trainer)
    # epoch 1 by the schedule, epoch 2 (the last) at the end of fit, none at the sanity check
    assert [a["epoch"] for a in report["audits"]] == [1, 2]
    assert report["schema"] == "lightning-saliency/report/v1"
    assert report["probe"]["size"] == 8 and report["probe"]["fingerprint"] == monitor.probe.fingerprint
    latest = report["audits"][-1]
    assert latest["global_step"] == trainer.global_step
    for key in ("gradcam/spurious_mass", "gradient/object_mass", "gradcam/pointing_game",
                "gradcam/spurious_mass/shortcut_present", "probe/accuracy", "gradcam/drift"):
        assert key in latest["metrics"], key
    maps = load_maps(os.path.join(trainer.log_dir, "saliency"), 2)
    assert maps["gradcam"].shape == (8, 16, 16) and maps["predictions"].shape == (8,)


def _hooks(net: torch.nn.Module) -> dict[str, tuple[int, int, int]]:
    return {n: (len(m._forward_hooks), len(m._backward_hooks), len(m._forward_pre_hooks))
            for n, m in net.named_modules()}


def _flags(net: torch.nn.Module) -> dict[str, object]:
    """Every module's train/eval flag, every parameter's requires_grad and .grad (None or a copy)."""
    out: dict[str, object] = {f"training/{n}": m.training for n, m in net.named_modules()}
    for n, p in net.named_parameters():
        out[f"requires_grad/{n}"] = p.requires_grad
        out[f"grad/{n}"] = None if p.grad is None else p.grad.detach().clone()
    return out


def _assert_same_flags(before: dict[str, object], after: dict[str, object]) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert isinstance(after[key], torch.Tensor) and torch.equal(value, after[key]), key
        else:
            assert after[key] == value, (key, value, after[key])


def _unusual(net: torch.nn.Module) -> torch.nn.Module:
    """A frozen first convolution and a BatchNorm kept in eval mode: flags the audit must not reset."""
    for p in net.features[0].parameters():
        p.requires_grad_(False)
    net.features[1].eval()
    return net


def test_no_hooks_remain_and_flags_restored(tmp_path):
    """After a fit with the monitor, every module's training flag, every parameter's requires_grad and .grad
    are those of the same fit without it; an audit by hand leaves an arbitrary state exactly as it was."""
    reference = _unusual(U.model())
    U.fit([], tmp_path / "reference", max_epochs=2, net=reference)
    monitor = _cheap()
    net = _unusual(U.model())
    hooks_before = _hooks(net)
    trainer, _ = U.fit([monitor], tmp_path / "monitored", max_epochs=2, net=net)
    assert len(monitor.history) == 2, "the monitor must actually have audited"
    assert _hooks(net) == hooks_before
    flags = _flags(net)
    assert flags["requires_grad/features.0.weight"] is False and flags["grad/features.0.weight"] is None
    _assert_same_flags(_flags(reference), flags)

    # by hand, from a state no training loop leaves: mixed modes, some gradients None, others arbitrary
    net.train()
    net.features[1].eval()
    net.dropout.eval()
    net.fc.weight.requires_grad_(False)
    net.fc.weight.grad = None
    net.features[4].weight.grad = torch.randn_like(net.features[4].weight)
    before = _flags(net)
    record = monitor.audit(trainer, net, epoch=7)
    assert not record["errors"] and record["metrics"]["gradcam/spurious_mass"] is not None
    _assert_same_flags(before, _flags(net))
    assert _hooks(net) == hooks_before


def test_trainer_validate_and_test_audit_under_inference_mode(tmp_path):
    monitor = _cheap()
    dm = U.datamodule()
    trainer = pl.Trainer(logger=pl.loggers.CSVLogger(str(tmp_path)), callbacks=[monitor], **U.FAST)
    trainer.validate(U.model(), datamodule=dm)
    trainer.test(U.model(), datamodule=dm)
    report = _report(trainer)
    # two records, never a replacement; the weights were neither trained nor restored here: epoch -1
    assert [(a["stage"], a["epoch"]) for a in report["audits"]] == [("validate", -1), ("test", -1)]
    assert [a["maps"] for a in report["audits"]] == ["maps/validate_001.npz", "maps/test_001.npz"]
    for audit in report["audits"]:
        maps = load_maps(os.path.join(trainer.log_dir, "saliency", audit["maps"]))
        assert all(torch.isfinite(torch.as_tensor(maps[m])).all() for m in ("gradcam", "gradient"))
        assert maps["gradient"].max() > 0


def test_bf16_mixed_precision_gives_finite_maps_and_records_precision(tmp_path):
    monitor = _cheap()
    trainer, _ = U.fit([monitor], tmp_path, max_epochs=1, precision="bf16-mixed")
    report = _report(trainer)
    assert report["run"]["precision"] == "bf16-mixed"
    # Lightning's autocast covers the step methods only: the audit (an epoch-end hook) runs in full precision
    assert report["audits"][-1]["precision"] == "float32"
    last = report["audits"][-1]
    # discovery/max_flip_rate is null when discovery has no candidate (no flip rate to report), never a number
    values = [v for k, v in last["metrics"].items() if k != "discovery/max_flip_rate" or last["discovery"]["candidates"]]
    assert values and all(v is not None for v in values)


def test_audit_under_an_active_bf16_autocast_records_bfloat16(tmp_path):
    """A model whose own code enters autocast: the audit keeps it (attribute's autocast=True) and says so."""

    class AutocastNet(U.ShapesNet):
        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return super().forward(x)

    monitor = _cheap(methods=("gradient",))
    trainer, _ = U.fit([monitor], tmp_path, max_epochs=1, net=AutocastNet(width=4))
    audit = _report(trainer)["audits"][-1]
    assert audit["precision"] == "bfloat16"
    assert not audit["errors"] and audit["metrics"]["gradient/spurious_mass"] is not None


def test_compiled_model_is_audited_like_the_eager_one(tmp_path):
    """Same seed, compiled and eager: the same maps and the same numbers in the report."""
    runs = {}
    for kind in ("eager", "compiled"):
        monitor = _cheap(methods=("gradcam", "gradient"))
        net = U.model()
        net = torch.compile(net, backend="eager") if kind == "compiled" else net
        trainer, _ = U.fit([monitor], tmp_path / kind, max_epochs=1, net=net)
        audit = _report(trainer)["audits"][-1]
        assert not audit["errors"]
        runs[kind] = (audit["metrics"], load_maps(os.path.join(trainer.log_dir, "saliency"), 0))
    (m_eager, maps_eager), (m_comp, maps_comp) = runs["eager"], runs["compiled"]
    assert m_comp.keys() == m_eager.keys() and m_comp["gradcam/spurious_mass"] is not None
    for key, value in m_eager.items():
        assert m_comp[key] == pytest.approx(value, abs=1e-5), key
    for method in ("gradcam", "gradient"):
        assert maps_comp[method].shape == maps_eager[method].shape
        assert float(abs(maps_comp[method] - maps_eager[method]).max()) < 2e-3, method


def test_failure_inside_audit_warns_records_and_training_completes(tmp_path):
    class Vanishing(U.ShapesNet):
        def on_train_epoch_end(self) -> None:  # the audited layer disappears after setup
            self.features = torch.nn.Sequential(*list(self.features)[:-1])

    monitor = _cheap(methods=("gradcam", "gradient"), layer="features.10")
    with pytest.warns(RuntimeWarning, match="recorded in the report"):
        trainer, _ = U.fit([monitor], tmp_path, max_epochs=2, net=Vanishing(width=4))
    assert trainer.current_epoch == 2  # training completed
    audits = _report(trainer)["audits"]
    # audit failures, not health findings (a tiny net's Grad-CAM maps may be mostly all zero)
    failures = [[e for e in a["errors"] if e["type"] != "UnhealthyAudit"] for a in audits]
    assert not failures[0] and failures[-1]  # the layer vanished after the first audit
    assert any(e["method"] == "gradcam" for e in audits[-1]["errors"])
    assert "gradient/spurious_mass" in audits[-1]["metrics"]  # the other method still ran


def test_failure_with_on_error_raise_raises(tmp_path):
    class Vanishing(U.ShapesNet):
        def on_train_epoch_end(self) -> None:
            self.features = torch.nn.Sequential(*list(self.features)[:-1])

    monitor = _cheap(methods=("gradcam",), layer="features.10", on_error="raise")
    with pytest.raises(Exception, match="features.10"):
        U.fit([monitor], tmp_path, max_epochs=2, net=Vanishing(width=4))


class _StepCounter(pl.Callback):
    steps = 0

    def on_train_batch_start(self, *args, **kwargs):
        type(self).steps += 1


@pytest.mark.parametrize("bad, match", [
    ("layer", "featurs|closest|Did you mean|features"),
    ("shape", "do not fit the model"),
    ("targets", "classes"),
    ("no_probe", "no probe"),
])
def test_bad_configuration_fails_before_the_first_training_step(tmp_path, bad, match):
    _StepCounter.steps = 0
    if bad == "layer":
        monitor = SaliencyMonitor(U.probe(), layer="featurs.10")
    elif bad == "shape":
        monitor = SaliencyMonitor(ProbeSet(torch.rand(4, 1, 16, 16), torch.zeros(4, dtype=torch.long)))
    elif bad == "targets":
        monitor = SaliencyMonitor(ProbeSet(torch.rand(4, 3, 16, 16), torch.full((4,), 7)))
    else:
        monitor = SaliencyMonitor(None)
    net = U.model()
    with pytest.raises(ValueError, match=match):
        if bad == "no_probe":  # no datamodule, no val_dataloader: nothing to draw a probe from
            trainer = pl.Trainer(max_epochs=1, callbacks=[monitor, _StepCounter()], logger=False, **U.FAST)
            dm = U.datamodule()
            dm.setup()
            trainer.fit(net, train_dataloaders=torch.utils.data.DataLoader(dm.train_set, batch_size=32))
        else:
            U.fit([monitor, _StepCounter()], tmp_path, max_epochs=1, net=net)
    assert _StepCounter.steps == 0


def test_unknown_method_or_metric_fails_at_construction():
    with pytest.raises(ValueError, match="known methods"):
        SaliencyMonitor(U.probe(), methods=("gradcamm",))
    with pytest.raises(ValueError, match="Did you mean 'spurious_mass'"):
        SaliencyMonitor(U.probe(), metrics=("spurius_mass",))


def test_probe_drawn_from_validation_data_when_none_given(tmp_path):
    monitor = SaliencyMonitor(None, probe_size=6, methods=("gradient",), metrics=("drift",))
    trainer, _ = U.fit([monitor], tmp_path, max_epochs=1)
    assert len(monitor.probe) == 6
    assert _report(trainer)["probe"]["size"] == 6


def test_probe_drawn_from_loaders_passed_to_fit_validate_and_test(tmp_path):
    """No datamodule, a model without val_dataloader(): the loaders handed to fit() are where the probe comes
    from (no 'no probe' error), and validate()/test() with their own loaders work the same way."""
    from torch.utils.data import DataLoader

    dm = U.datamodule()
    dm.setup("fit")
    val = DataLoader(dm.val_set, batch_size=16)
    monitor = SaliencyMonitor(None, probe_size=6, methods=("gradient",), metrics=("spurious_mass",))
    pl.seed_everything(0, workers=True, verbose=False)
    trainer = pl.Trainer(max_epochs=1, callbacks=[monitor], logger=pl.loggers.CSVLogger(str(tmp_path), name="run"),
                         **U.FAST)
    net = U.model()
    trainer.fit(net, train_dataloaders=DataLoader(dm.train_set, batch_size=32), val_dataloaders=val)
    assert len(monitor.probe) == 6
    val_images = [dm.val_set[i]["image"] for i in range(len(dm.val_set))]
    assert all(any(torch.equal(x, v) for v in val_images) for x in monitor.probe.inputs)  # drawn from `val`
    for run in (lambda t, m: t.validate(net, dataloaders=val), lambda t, m: t.test(net, dataloaders=val)):
        fresh = SaliencyMonitor(None, probe_size=4, methods=("gradient",), metrics=("spurious_mass",))
        t = pl.Trainer(callbacks=[fresh], logger=False, default_root_dir=str(tmp_path / "eval"), **U.FAST)
        run(t, fresh)
        assert len(fresh.probe) == 4 and len(fresh.history) == 1


def test_resume_continues_report_without_duplicates(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    logger = pl.loggers.CSVLogger(str(tmp_path), name="run", version=0)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, every_n_epochs=1)
    U.fit([_cheap(), ckpt], tmp_path, max_epochs=2, logger=logger, enable_checkpointing=True)
    # the same log dir: the report already holds epochs 0 and 1; the first run was "killed" mid-write
    saliency = tmp_path / "run" / "version_0" / "saliency"
    leftovers = [saliency / ".report.json.x1y2.tmp", saliency / "maps" / ".epoch_0002.npz.a9b8.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    logger = pl.loggers.CSVLogger(str(tmp_path), name="run", version=0)
    monitor = _cheap()
    trainer, _ = U.fit([monitor], tmp_path, max_epochs=4, logger=logger, ckpt_path=str(ckpt_dir / "last.ckpt"))
    epochs = [a["epoch"] for a in _report(trainer)["audits"]]
    assert epochs == [0, 1, 2, 3]
    assert not any(path.exists() for path in leftovers)  # cleared when the resumed run opened the report
    assert [r["epoch"] for r in monitor.history] == [0, 1, 2, 3]

    # a different probe on resume is an error, unless allowed
    other = SaliencyMonitor(U.probe(seed=1), metrics=("drift",))
    with pytest.raises(ValueError, match="allow_probe_change"):
        U.fit([other], tmp_path / "x", max_epochs=3, ckpt_path=str(ckpt_dir / "last.ckpt"))
    allowed = SaliencyMonitor(U.probe(seed=1), metrics=("drift",), allow_probe_change=True)
    U.fit([allowed], tmp_path / "y", max_epochs=3, ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert [r["epoch"] for r in allowed.history] == [2]


def test_report_is_valid_for_the_reader(tmp_path):
    trainer, _ = U.fit([_cheap()], tmp_path, max_epochs=1)
    report = AuditReport.load(os.path.join(trainer.log_dir, "saliency", "report.json"))
    assert report.latest()["epoch"] == 0
    assert report.data["config"]["layer"] == "features"


def test_warns_no_more_than_needed_when_all_is_well(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        U.fit([_cheap()], tmp_path, max_epochs=1)
    ours = [w for w in caught if "lightning-saliency" in str(w.message) or "lightning_saliency" in w.filename]
    assert not ours, [str(w.message) for w in ours]


def test_logging_failure_on_the_image_thread_is_recorded_and_training_goes_on(tmp_path, monkeypatch):
    from lightning_saliency import sinks

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sinks.PngSink, "log_overlays", broken)
    with pytest.warns(RuntimeWarning, match="disk full"):
        trainer, _ = U.fit([_cheap()], tmp_path, max_epochs=2)
    assert trainer.current_epoch == 2
    audits = _report(trainer)["audits"]
    assert all(any(e["message"] == "disk full" for e in a["errors"]) for a in audits)
    # the TensorBoard-free run still has its metrics
    assert all(a["metrics"]["gradcam/spurious_mass"] is not None for a in audits)


def test_overlay_grids_are_palette_pngs_close_to_the_full_colour_ones(tmp_path):
    import io

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing import event_accumulator as ea

    decoded = {}
    for colors in (None, 256, 8):
        monitor = _cheap(log_images=4, image_colors=colors)
        logger = pl.loggers.TensorBoardLogger(str(tmp_path), name=f"tb_{colors}")
        U.fit([monitor], tmp_path, max_epochs=1, logger=logger)  # same seed: the same model and maps each time
        acc = ea.EventAccumulator(logger.log_dir, size_guidance={ea.IMAGES: 0})
        acc.Reload()
        image = Image.open(io.BytesIO(acc.Images("saliency/gradcam/overlays")[-1].encoded_image_string))
        assert image.mode == ("RGB" if colors is None else "P")
        if colors is not None:
            assert len(image.getcolors(256)) <= colors
        decoded[colors] = np.asarray(image.convert("RGB"), dtype=np.int16)
    full = decoded[None]
    assert full.shape[1] == 2 * 96 + 3 * 2  # 4 tiles in 2 columns: 16 px probe images enlarged to 96 px
    error = {c: float(np.abs(decoded[c] - full).mean()) for c in (256, 8)}
    assert error[256] < 8.0 < error[8], error  # 256 colours: about 2% of the range on average; 8: visibly off


def test_model_cast_between_audits_gets_a_probe_of_its_dtype(tmp_path):
    monitor = _cheap(log_images=0)
    trainer, net = U.fit([monitor], tmp_path, max_epochs=1)
    net.double()
    record = monitor.audit(trainer, net, epoch=5)
    assert not record["errors"], record["errors"]
    assert record["precision"] == "torch.float64" or "64" in str(record["precision"])
    assert 0.0 <= record["metrics"]["gradcam/spurious_mass"] <= 1.0


def _metric_names(record: dict) -> set[str]:
    return {k.split("/")[1] for k in record["metrics"] if "/" in k}


def test_metrics_that_rerun_the_model_are_periodic_and_always_in_the_last_audit(tmp_path):
    monitor = _cheap(metrics=("spurious_mass", "stability", "drift"), expensive_every_n_audits=3)
    trainer, _ = U.fit([monitor], tmp_path, max_epochs=5)
    audits = _report(trainer)["audits"]
    with_stability = [a["epoch"] for a in audits if "stability" in _metric_names(a)]
    assert with_stability == [0, 3, 4]  # every 3rd audit, and the last one (max_epochs is known in advance)
    assert all({"spurious_mass", "drift"} <= _metric_names(a) for a in audits[1:])  # the others: every audit


def test_an_unforeseen_last_audit_is_completed_at_fit_end(tmp_path):
    """An alarm stops training at an audit that skipped stability: at the end of fit that audit gets it, from
    the same weights and the same previous maps (the other values do not move), and no second picture."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    from lightning_saliency import ShortcutAlarm

    monitor = _cheap(metrics=("spurious_mass", "stability", "drift"), expensive_every_n_audits=5, log_images=2)
    alarm = ShortcutAlarm(metric="gradcam/spurious_mass", threshold=-1.0, patience=2, action="stop")
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    seen: list[dict] = []
    original = monitor._recorder.record

    def spy(*args, **kwargs):
        record = original(*args, **kwargs)
        seen.append(record)
        return record

    monitor._recorder.record = spy
    with pytest.warns(UserWarning, match="stopping training"):
        trainer, _ = U.fit([monitor, alarm], tmp_path, max_epochs=6, logger=logger)
    audits = _report(trainer)["audits"]
    assert [a["epoch"] for a in audits] == [0, 1]
    assert "stability" in _metric_names(audits[0]) and "stability" in _metric_names(audits[1])
    before, after = seen[1], seen[2]  # epoch 1 as audited, then completed at fit end
    assert before["epoch"] == after["epoch"] == 1 and "stability" not in _metric_names(before)
    for key, value in before["metrics"].items():
        assert after["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert len(alarm.firings) == 1  # the completion adds no new reading of the alarm's metric
    acc = ea.EventAccumulator(logger.log_dir, size_guidance={ea.IMAGES: 0, ea.SCALARS: 0})
    acc.Reload()
    assert [e.step for e in acc.Images("saliency/gradcam/overlays")] == [a["global_step"] for a in audits]
    assert [e.step for e in acc.Scalars("saliency/gradcam/stability")][-1] == audits[1]["global_step"]


def test_validate_and_test_audits_are_complete(tmp_path):
    monitor = _cheap(metrics=("spurious_mass", "stability"), expensive_every_n_audits=50)
    trainer, net = U.fit([monitor], tmp_path, max_epochs=1)
    trainer.validate(net, datamodule=U.datamodule())
    trainer.test(net, datamodule=U.datamodule())
    assert all("stability" in _metric_names(r) for r in monitor.history)


def test_drift_from_kept_ranks_equals_drift_of_kept_maps(tmp_path, monkeypatch):
    """The monitor keeps each audit's ranks for the next drift (the ranks only: not the maps too); the value is
    drift() of the two audits' maps."""
    import lightning_saliency.callbacks as callbacks
    from lightning_saliency.metrics import drift

    made = []

    def audit_shard(*args, **kwargs):
        made.append(callbacks_audit_shard(*args, **kwargs))
        return made[-1]

    callbacks_audit_shard = callbacks.audit_shard
    monkeypatch.setattr(callbacks, "audit_shard", audit_shard)
    monitor = _cheap(metrics=("drift",))
    trainer, net = U.fit([monitor], tmp_path, max_epochs=2)
    assert monitor._reference.maps == {} and set(monitor._reference.ranks) == {"gradcam", "gradient"}
    maps_before = {k: v.clone() for k, v in made[-1].maps.items()}
    for p in net.parameters():  # move the weights, so that the maps move
        p.data.add_(0.05 * torch.randn_like(p))
    record = monitor.audit(trainer, net, epoch=9, periodic=False)
    for method in ("gradcam", "gradient"):
        m = made[-1].maps[method]
        expected = float(drift(maps_before[method].abs(), m.abs()).mean())
        assert record["metrics"][f"{method}/drift"] == pytest.approx(expected, abs=1e-6)
        assert expected < 0.999  # the maps did change
