"""One run, one report; stages; faults (issue 10, DESIGN §5 invariant 10).

A second run writing into a folder that holds a report moves it aside (never deleted, still readable); fit,
validate and test each leave their own record with the weights' last trained epoch; the gate, ``show`` and the
page pick and mark the stage; a SIGKILL inside an audit and a full disk never corrupt the report.
"""

from __future__ import annotations

import copy
import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl

import lightning_saliency.report as report_module
from lightning_saliency import SaliencyMonitor
from lightning_saliency.cli import main, show
from lightning_saliency.gate import EXIT_ERROR, EXIT_FAIL, EXIT_PASS, run_gate, select_audit
from lightning_saliency.page import render_page
from lightning_saliency.report import (
    AuditReport,
    ReportError,
    load_maps,
    load_report,
    maps_filename,
    place_record,
    validate_report,
)
from lightning_saliency.runs import move_aside, same_run
from tests import monitor_utils as U

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("spurious_mass", "drift")


def _monitor(probe_seed: int = 0, **kw) -> SaliencyMonitor:
    return SaliencyMonitor(U.probe(seed=probe_seed), methods=("gradcam", "gradient"), metrics=METRICS,
                           log_images=0, **kw)


def _stages(report: AuditReport) -> list[tuple[str, int]]:
    return [(a["stage"], a["epoch"]) for a in report.audits]


def _previous(saliency: Path) -> list[Path]:
    return sorted((saliency / "previous").glob("*/report.json"))


# ----------------------------------------------------------------------------------------- one run, one report


@pytest.mark.parametrize("where", ["no_logger", "csv_fixed_version", "fixed_dirpath"])
def test_a_second_run_moves_the_first_report_aside(tmp_path, where):
    """Acceptance 2: two runs into one folder: report.json holds only the second run's audits and fingerprint;
    the first run's report (and its maps) is still on disk, readable by `show` and the page."""
    saliency = tmp_path / "saliency" if where != "csv_fixed_version" else tmp_path / "run" / "version_0" / "saliency"

    def run(probe_seed: int, epochs: int) -> SaliencyMonitor:
        kw = {"dirpath": str(tmp_path / "saliency")} if where == "fixed_dirpath" else {}
        monitor = _monitor(probe_seed, **kw)
        logger = {"no_logger": False, "fixed_dirpath": pl.loggers.CSVLogger(str(tmp_path / "logs")),
                  "csv_fixed_version": pl.loggers.CSVLogger(str(tmp_path), name="run", version=0)}[where]
        U.fit([monitor], tmp_path, max_epochs=epochs, logger=logger)
        return monitor

    first = run(0, 2)
    second = run(1, 1)  # another probe, no checkpoint: another run
    new = load_report(saliency)
    assert new.data["probe"]["fingerprint"] == second.probe.fingerprint != first.probe.fingerprint
    assert new.data["run"]["id"] == second._run_id != first._run_id
    assert _stages(new) == [("fit", 0)]
    assert sorted(p.name for p in (saliency / "maps").iterdir()) == ["epoch_0000.npz", "probe.npz"]
    [moved] = _previous(saliency)
    old = load_report(moved)
    assert old.data["probe"]["fingerprint"] == first.probe.fingerprint and _stages(old) == [("fit", 0), ("fit", 1)]
    for audit in old.audits:  # relative maps paths still resolve beside the moved report
        assert load_maps(moved.parent / audit["maps"])["gradient"].shape[0] == len(first.probe)
    out = io.StringIO()
    assert show(str(moved), out=out) == 0 and "latest audit: epoch 1," in out.getvalue()
    assert "No maps were saved" not in render_page(old.data, moved.parent)

    third = run(1, 1)  # the same probe again, but a new monitor and no ckpt_path: not a resume
    assert load_report(saliency).data["run"]["id"] == third._run_id
    assert len(_previous(saliency)) == 2  # both earlier reports kept, none overwritten


def test_fit_validate_test_are_three_stages_of_one_run(tmp_path):
    """Acceptance 3: fit -> validate -> test with one trainer: three stages in one report, each with the last
    trained epoch (1 after max_epochs=2), nothing replaced; drift compares with the last fit audit (same
    weights: 1). Then a fresh trainer and monitor restored from the fit's checkpoint continue that run; a new
    monitor without a checkpoint is another run."""
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_epochs=1)
    monitor = _monitor()
    trainer, net = U.fit([monitor, ckpt], tmp_path, max_epochs=2, logger=False, enable_checkpointing=True)
    trainer.validate(net, datamodule=U.datamodule(), verbose=False)
    trainer.test(net, datamodule=U.datamodule(), verbose=False)
    saliency = tmp_path / "saliency"
    report = load_report(saliency)
    assert _stages(report) == [("fit", 0), ("fit", 1), ("validate", 1), ("test", 1)]
    assert [a["maps"] for a in report.audits] == ["maps/epoch_0000.npz", "maps/epoch_0001.npz",
                                                  "maps/validate_001.npz", "maps/test_001.npz"]
    assert all((saliency / a["maps"]).is_file() for a in report.audits) and not (saliency / "previous").exists()
    fit_1, validate, test = report.audits[1:]
    assert validate["global_step"] == test["global_step"] == fit_1["global_step"]
    for method in ("gradcam", "gradient"):
        assert validate["metrics"][f"{method}/drift"] == pytest.approx(1.0, abs=1e-6)
        assert test["metrics"][f"{method}/drift"] == pytest.approx(1.0, abs=1e-6)
        assert validate["metrics"][f"{method}/spurious_mass"] == pytest.approx(fit_1["metrics"][f"{method}/spurious_mass"])
    assert [(r["stage"], r["epoch"]) for r in monitor.history] == _stages(report)

    # the gate picks the stage: default the last fit audit
    out = io.StringIO()
    assert run_gate(saliency, max_rules=["gradcam/spurious_mass=1"], as_json=True, out=out) == EXIT_PASS
    verdict = json.loads(out.getvalue())
    assert (verdict["stage"], verdict["epoch"], verdict["audit_index"]) == ("fit", 1, 1)
    for stage, index in (("validate", 2), ("test", 3)):
        out = io.StringIO()
        run_gate(saliency, max_rules=["gradcam/spurious_mass=1"], as_json=True, out=out, stage=stage)
        assert (json.loads(out.getvalue())["stage"], json.loads(out.getvalue())["audit_index"]) == (stage, index)

    # a fresh trainer and monitor on the fit's checkpoint: the same run (its state restores the run id)
    restored = _monitor()
    fresh = pl.Trainer(callbacks=[restored], logger=False, default_root_dir=str(tmp_path), **U.FAST)
    fresh.validate(U.model(seed=5), datamodule=U.datamodule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
                   verbose=False)
    report = load_report(saliency)
    assert _stages(report)[-1] == ("validate", 1)  # the checkpoint's weights trained through epoch 1
    assert len(report.audits) == 5 and report.audits[-1]["maps"] == "maps/validate_002.npz"
    assert report.audits[-1]["metrics"]["gradient/spurious_mass"] == pytest.approx(
        validate["metrics"]["gradient/spurious_mass"])  # the same weights as the first validate
    assert not (saliency / "previous").exists()

    # a new monitor, no checkpoint: another run; its weights' epoch is not known (-1)
    other = _monitor()
    pl.Trainer(callbacks=[other], logger=False, default_root_dir=str(tmp_path), **U.FAST).test(
        net, datamodule=U.datamodule(), verbose=False)
    assert _stages(load_report(saliency)) == [("test", -1)]
    [moved] = _previous(saliency)
    assert len(load_report(moved).audits) == 5


def test_a_resume_with_another_probe_is_another_run(tmp_path):
    """allow_probe_change=True resumes training, but the audits are not comparable: a new report; the old one
    is moved aside, whole."""
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_epochs=1)
    U.fit([_monitor(), ckpt], tmp_path, max_epochs=1, logger=False, enable_checkpointing=True)
    changed = _monitor(probe_seed=1, allow_probe_change=True)
    U.fit([changed], tmp_path, max_epochs=2, logger=False, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    saliency = tmp_path / "saliency"
    assert _stages(load_report(saliency)) == [("fit", 1)]
    assert load_report(saliency).data["probe"]["fingerprint"] == changed.probe.fingerprint
    [moved] = _previous(saliency)
    assert _stages(load_report(moved)) == [("fit", 0)]


def test_resume_from_an_old_checkpoint_without_run_id_continues_its_report(tmp_path):
    """Reports and checkpoints written before run ids: the same probe and a history found in the report is
    a resume; the same probe and an empty history is another run."""
    data = {"run": {}, "probe": {"fingerprint": "f"}, "audits": [{"epoch": 0, "global_step": 3},
                                                                 {"epoch": 1, "global_step": 6}]}
    assert same_run(data, None, "f", [{"epoch": 0, "global_step": 3}])
    assert not same_run(data, None, "f", [])
    assert not same_run(data, None, "f", [{"epoch": 0, "global_step": 4}])
    assert not same_run(data, None, "g", [{"epoch": 0, "global_step": 3}])
    assert not same_run({**data, "run": {"id": "a"}}, "b", "f", [{"epoch": 0, "global_step": 3}])


def test_move_aside_keeps_unreadable_reports_and_never_overwrites(tmp_path):
    for i in range(3):
        (tmp_path / "maps").mkdir()
        (tmp_path / "maps" / "epoch_0000.npz").write_bytes(b"maps %d" % i)
        (tmp_path / "report.json").write_text('{"schema": "lightning-saliency/report/v1", "created": '
                                              '"2026-01-02T03:04:05+00:00"}' if i < 2 else "{trunc")
        moved = move_aside(tmp_path)
        assert moved is not None and not (tmp_path / "report.json").exists() and not (tmp_path / "maps").exists()
        assert (moved.parent / "maps" / "epoch_0000.npz").read_bytes() == b"maps %d" % i
    names = sorted(p.parent.name for p in _previous(tmp_path))
    assert names[:2] == ["2026-01-02T03-04-05", "2026-01-02T03-04-05-2"] and len(names) == 3
    assert move_aside(tmp_path) is None


# ----------------------------------------------------------------------------------------- records and stages


def _rec(stage: str, epoch: int, step: int, v: float) -> dict:
    return {"stage": stage, "epoch": epoch, "global_step": step, "metrics": {"gradcam/spurious_mass": v}}


def test_fit_replaces_by_epoch_validate_and_test_append_and_resume_keeps_them(tmp_path):
    rep = AuditReport(tmp_path / "report.json")
    for rec in (_rec("fit", 0, 3, 0.1), _rec("fit", 1, 6, 0.2), _rec("validate", 1, 6, 0.3),
                _rec("validate", 1, 6, 0.4), _rec("test", 1, 6, 0.5), _rec("fit", 1, 6, 0.25)):
        rep.append_audit(rec)
    assert [(a["stage"], a["metrics"]["gradcam/spurious_mass"]) for a in rep.audits] == [
        ("fit", 0.1), ("fit", 0.25), ("validate", 0.3), ("validate", 0.4), ("test", 0.5)]
    rep.append_audit(_rec("validate", 1, 6, 0.45), replace=True)  # the same record, written again
    assert [a["metrics"]["gradcam/spurious_mass"] for a in rep.audits if a["stage"] == "validate"] == [0.3, 0.45]
    assert rep.latest("fit")["metrics"]["gradcam/spurious_mass"] == 0.25 and rep.latest()["stage"] == "test"
    assert rep.truncate_after(0) == 1  # a fit resumed at epoch 0 drops fit epoch 1 only
    assert [(a["stage"], a["epoch"]) for a in rep.audits] == [("fit", 0), ("validate", 1), ("validate", 1),
                                                              ("test", 1)]
    rep.append_alarm({"name": "a", "metric": "m", "threshold": 0.1, "mode": "max", "stage": "validate", "epoch": 1,
                      "global_step": 6, "value": 0.3, "action": "warn"})
    rep.append_alarm({"name": "a", "metric": "m", "threshold": 0.1, "mode": "max", "stage": "test", "epoch": 1,
                      "global_step": 6, "value": 0.5, "action": "warn"})
    assert [a["stage"] for a in rep.alarms] == ["validate", "test"]
    with pytest.raises(ValueError, match="stage"):
        rep.append_audit(_rec("predict", 0, 0, 0.1))
    data = json.loads(rep.to_json())
    data["audits"][0]["stage"] = "train"
    with pytest.raises(ReportError, match="stage"):
        validate_report(data)
    assert place_record([], _rec("test", -1, 0, 0.0))[0]["epoch"] == -1
    assert maps_filename(1, "validate", 2) == "maps/validate_002.npz" and maps_filename(1) == "maps/epoch_0001.npz"


def _staged_report(tmp_path: Path) -> Path:
    rep = AuditReport(tmp_path / "saliency" / "report.json")
    for rec in (_rec("fit", 0, 3, 0.1), _rec("fit", 1, 6, 0.2), _rec("validate", 1, 6, 0.6),
                _rec("test", 1, 6, 0.7)):
        rep.append_audit(rec)
    rep.write()
    return rep.path


def test_gate_stage_flag_toml_key_and_defaults(tmp_path, capsys):
    path = _staged_report(tmp_path)
    assert main(["gate", str(path), "--max", "gradcam/spurious_mass=0.5"]) == EXIT_PASS  # the last fit audit
    assert "stage fit" in capsys.readouterr().out
    assert main(["gate", str(path), "--max", "gradcam/spurious_mass=0.5", "--stage", "test"]) == EXIT_FAIL
    assert "audit 4 of 4, stage test" in capsys.readouterr().out
    assert main(["gate", str(path), "--max", "gradcam/spurious_mass=0.5", "--stage", "validate",
                 "--epoch", "0"]) == EXIT_ERROR
    assert "no audit at epoch 0 (stage validate)" in capsys.readouterr().err
    toml = tmp_path / "gate.toml"
    toml.write_text('stage = "validate"\n[max]\n"gradcam/spurious_mass" = 0.5\n')
    assert main(["gate", str(path), "--config", str(toml)]) == EXIT_FAIL
    assert main(["gate", str(path), "--config", str(toml), "--stage", "fit"]) == EXIT_PASS  # the flag wins
    toml.write_text('stage = "train"\n[max]\n"gradcam/spurious_mass" = 0.5\n')
    assert main(["gate", str(path), "--config", str(toml)]) == EXIT_ERROR
    assert "stage must be one of" in capsys.readouterr().err
    only_test = [{"stage": "test", "epoch": -1, "metrics": {}}, {"stage": "test", "epoch": -1, "metrics": {}}]
    assert select_audit(only_test, None, []) == (1, "last")  # no fit audit: the last audit
    with pytest.raises(Exception, match="no validate audit"):
        select_audit(only_test, None, [], "validate")
    old = [{"epoch": 0, "metrics": {}}, {"epoch": 1, "metrics": {}}]  # before stages: fit
    assert select_audit(old, "best", [], "fit") == (1, "best")


def test_show_and_page_mark_the_stage(tmp_path):
    path = _staged_report(tmp_path)
    out = io.StringIO()
    assert show(str(path), out=out) == 0
    text = out.getvalue()
    assert "latest audit: epoch 1, step 6 (audit 4 of 4" in text and "stage test" in text
    assert "stages: fit 2, validate 1, test 1" in text
    data = load_report(path).data
    for audit in data["audits"]:
        audit["maps"] = "maps/x.npz"  # the slider lists every audit with maps (unreadable ones say so)
    page = render_page(data, path.parent)
    assert 'data-epochs="0,1,1 validate,1 test"' in page
    assert "test audit, epoch 1" in page


# ----------------------------------------------------------------------------------------- faults


def _killed_fit(out: Path, *args: str) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "killed_fit.py"), str(out), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode


@pytest.mark.parametrize("where", ["write", "metric"])
def test_sigkill_during_an_audit_leaves_a_valid_report_that_a_resume_continues(tmp_path, where):
    """Acceptance 5: SIGKILL during the third audit (halfway through writing the report, or inside a metric):
    report.json is valid and holds the two audits finished before; the resume (after the mid-write kill, the
    worse one) continues the same file."""
    assert _killed_fit(tmp_path, "--max-epochs", "4", "--kill-at", "3", "--where", where) == -9
    saliency = tmp_path / "saliency"
    first = load_report(saliency)
    validate_report(json.loads((saliency / "report.json").read_text()))
    assert _stages(first) == [("fit", 0), ("fit", 1)]
    if where == "metric":  # the resume is the same after either kill: run once (a subprocess costs ~10 s)
        return
    assert _killed_fit(tmp_path, "--max-epochs", "4", "--resume") == 0
    resumed = load_report(saliency)
    assert _stages(resumed) == [("fit", 0), ("fit", 1), ("fit", 2), ("fit", 3)]
    assert resumed.data["run"]["id"] == first.data["run"]["id"] and resumed.data["created"] == first.data["created"]
    assert resumed.audits[:2] == first.audits[:2]  # kept as written, not redone
    assert not (saliency / "previous").exists() and not list(saliency.glob(".*.tmp"))


def test_a_full_disk_is_warned_recorded_and_never_corrupts_the_report(tmp_path, monkeypatch):
    """Acceptance 5: the report write of the second audit fails with ENOSPC halfway: a warning, training goes
    on, the file on disk is the previous complete report meanwhile, and the next write records the failure."""
    real = report_module.atomic_write
    calls, seen_on_disk = {"n": 0}, []

    def full_disk(path, fn):
        calls["n"] += 1
        if calls["n"] != 3:  # 1: opening the report, 2: audit of epoch 0, 3: audit of epoch 1
            return real(path, fn)

        def half(f):
            whole = io.BytesIO()
            fn(whole)
            f.write(whole.getvalue()[: len(whole.getvalue()) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        try:
            real(path, half)
        finally:
            seen_on_disk.append(copy.deepcopy(load_report(path).data))

    monkeypatch.setattr(report_module, "atomic_write", full_disk)
    monitor = _monitor()
    with pytest.warns(RuntimeWarning, match="No space left on device"):
        trainer, _ = U.fit([monitor], tmp_path, max_epochs=3, logger=False)
    assert trainer.current_epoch == 3  # training finished
    [during] = seen_on_disk
    assert _stages(AuditReport.load(tmp_path / "saliency")) and [a["epoch"] for a in during["audits"]] == [0]
    final = load_report(tmp_path / "saliency")
    assert _stages(final) == [("fit", 0), ("fit", 1), ("fit", 2)]
    assert [e["type"] for e in final.audits[1]["errors"]] == ["OSError"]
    assert "No space left on device" in final.audits[1]["errors"][0]["message"]
    assert not final.audits[0]["errors"] and not final.audits[2]["errors"]
    assert not list((tmp_path / "saliency").glob(".*.tmp"))


def test_a_report_that_cannot_be_moved_aside_is_never_written_over(tmp_path, monkeypatch):
    import lightning_saliency.runs as runs

    old = AuditReport(tmp_path / "saliency" / "report.json")
    old.append_audit(_rec("fit", 0, 3, 0.1))
    old.write()
    before = old.path.read_bytes()

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(runs, "move_aside", refuse)
    with pytest.warns(RuntimeWarning, match="aside"):
        trainer, _ = U.fit([_monitor()], tmp_path, max_epochs=1, logger=False)
    assert trainer.current_epoch == 1 and old.path.read_bytes() == before
