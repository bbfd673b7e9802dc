"""report.py: schema round trip, atomic writes, NaN -> null, clear load errors, resume de-dup, maps files."""

from __future__ import annotations

import doctest
import json
import math
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import lightning_saliency.report as report_mod
from lightning_saliency.report import (
    MAX_IMAGES,
    MAX_SIDE,
    SCHEMA,
    AuditReport,
    ReportError,
    error_record,
    load_maps,
    load_probe_thumbnails,
    probe_info,
    save_maps,
    save_probe_thumbnails,
)


def _strict_json(text: str):
    def bad(token):
        raise AssertionError(f"non-strict JSON token {token}")

    return json.loads(text, parse_constant=bad)


def _header(rep: AuditReport) -> None:
    rep.set_header(
        run={"log_dir": "/tmp/x", "model": "Net", "torch": torch.__version__, "lightning": "2.6.6",
             "precision": "32-true", "world_size": 1},
        probe={"size": 8, "fingerprint": "abc123", "groups": {"a": 5, "b": 3}, "object_masks": True,
               "spurious_masks": False},
        config={"methods": ["gradcam", "gradient"], "layer": "auto", "metrics": ["object_mass"],
                "every_n_epochs": 1},
    )


def _audit(epoch: int, value: float = 0.5, **extra):
    rec = {"epoch": epoch, "global_step": 10 * (epoch + 1), "duration_s": 0.25, "precision": "float32",
           "metrics": {"gradcam/object_mass": value, "gradient/object_mass": value / 2,
                       "gradcam/object_mass/a": value}}
    rec.update(extra)
    return rec


def _alarm(epoch: int, value: float = 0.4):
    return {"name": "ShortcutAlarm", "metric": "gradcam/spurious_mass", "threshold": 0.35, "mode": "max",
            "epoch": epoch, "global_step": 10 * (epoch + 1), "value": value, "action": "warn"}


def test_round_trip_matches_schema(tmp_path):
    path = tmp_path / "saliency" / "report.json"
    rep = AuditReport(path)
    _header(rep)
    rep.append_audit(_audit(0, 0.6, maps="maps/epoch_0000.npz"))
    rep.append_audit(_audit(1, 0.4, errors=[ValueError("layer vanished"),
                                            error_record(RuntimeError("boom"), method="gradient")]))
    rep.append_alarm(_alarm(1))
    rep.write()

    raw = _strict_json(path.read_text())
    assert raw["schema"] == SCHEMA == "lightning-saliency/report/v1"
    assert set(raw) == {"schema", "created", "updated", "run", "probe", "config", "audits", "alarms"}
    assert set(raw["run"]) == {"log_dir", "model", "torch", "lightning", "precision", "world_size"}
    assert set(raw["probe"]) == {"size", "fingerprint", "groups", "object_masks", "spurious_masks"}
    assert set(raw["config"]) == {"methods", "layer", "metrics", "every_n_epochs"}
    a0, a1 = raw["audits"]
    assert set(a0) == {"stage", "epoch", "global_step", "time", "duration_s", "precision", "metrics", "errors",
                       "maps"}
    assert a0["stage"] == "fit"  # the default stage (issue 10)
    assert a0["maps"] == "maps/epoch_0000.npz" and a1["maps"] is None
    assert a1["errors"] == [{"method": None, "type": "ValueError", "message": "layer vanished"},
                            {"method": "gradient", "type": "RuntimeError", "message": "boom"}]
    assert set(raw["alarms"][0]) == {"name", "metric", "threshold", "mode", "stage", "epoch", "global_step",
                                     "value", "action"}
    for stamp in (raw["created"], raw["updated"], a0["time"]):
        assert stamp.endswith("+00:00") and "T" in stamp

    back = AuditReport.load(path)
    assert back.data == raw
    assert back.epochs() == [0, 1]
    assert back.latest()["metrics"]["gradcam/object_mass"] == 0.4
    assert back.history("gradient/object_mass") == [(0, 10, 0.3), (1, 20, 0.2)]
    assert back.metric_names() == ["gradcam/object_mass", "gradcam/object_mass/a", "gradient/object_mass"]
    # a folder works too: <log_dir> or <log_dir>/saliency
    assert AuditReport.load(tmp_path).data == raw
    assert AuditReport.load(tmp_path / "saliency").data == raw
    # and it can be written again after loading, keeping 'created'
    back.append_audit(_audit(2))
    back.write()
    again = AuditReport.load(path)
    assert again.epochs() == [0, 1, 2] and again.data["created"] == raw["created"]


def test_non_finite_values_become_null(tmp_path):
    rep = AuditReport(tmp_path / "report.json")
    rep.append_audit({"epoch": 0, "global_step": 1, "duration_s": float("inf"), "metrics": {
        "a/nan": float("nan"), "a/inf": float("inf"), "a/ninf": -math.inf, "a/np": np.float32("nan"),
        "a/torch": torch.tensor(float("nan")), "a/ok": np.float64(0.25), "a/tensor_ok": torch.tensor(0.5),
        "a/int": 3}})
    rep.append_alarm(_alarm(0, value=float("nan")))
    rep.write()
    text = (tmp_path / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    raw = _strict_json(text)
    m = raw["audits"][0]["metrics"]
    assert m == {"a/nan": None, "a/inf": None, "a/ninf": None, "a/np": None, "a/torch": None, "a/ok": 0.25,
                 "a/tensor_ok": 0.5, "a/int": 3.0}
    assert raw["audits"][0]["duration_s"] is None
    assert raw["alarms"][0]["value"] is None
    assert AuditReport.load(tmp_path / "report.json").history("a/nan") == [(0, 1, None)]


def test_bad_records_are_clear_errors(tmp_path):
    rep = AuditReport(tmp_path / "report.json")
    with pytest.raises(ValueError, match="lacks"):
        rep.append_audit({"epoch": 0, "metrics": {}})
    with pytest.raises(ValueError, match="epoch must be an int"):
        rep.append_audit({"epoch": 1.5, "global_step": 0, "metrics": {}})
    with pytest.raises(ValueError, match="must be a number"):
        rep.append_audit({"epoch": 0, "global_step": 0, "metrics": {"a/b": "high"}})
    with pytest.raises(ValueError, match="lacks"):
        rep.append_alarm({"name": "x"})


def test_atomic_write_keeps_old_report_when_replace_fails(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    rep = AuditReport(path)
    _header(rep)
    rep.append_audit(_audit(0))
    rep.write()
    before = path.read_bytes()

    rep.append_audit(_audit(1))

    def crash(*args, **kwargs):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        rep.write()
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert AuditReport.load(path).epochs() == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # temp file cleaned up

    # a crash while the bytes are being written (fsync fails) leaves it intact too
    def bad_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", bad_fsync)
    with pytest.raises(OSError, match="disk full"):
        rep.write()
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]

    rep.write()  # and a later write succeeds
    assert AuditReport.load(path).epochs() == [0, 1]


def test_killed_writer_never_leaves_a_partial_report(tmp_path):
    """SIGKILL a process in the middle of writing a report (half the bytes written, not yet renamed)."""
    path = tmp_path / "report.json"
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {os.path.dirname(os.path.dirname(report_mod.__file__))!r})
        import lightning_saliency.report as mod  # the package imports Lightning lazily: this stays quick
        rep = mod.AuditReport({str(path)!r})
        metrics = {{f"m{{i}}/x": i / 7 for i in range(3000)}}
        rep.append_audit({{"epoch": 0, "global_step": 0, "metrics": metrics}})
        rep.write()

        def stall(fd):  # the next write: keep half its bytes, then hang until killed
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            print("writing", flush=True)
            time.sleep(60)

        os.fsync = stall
        rep.append_audit({{"epoch": 1, "global_step": 1, "metrics": metrics}})
        rep.write()
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"writing"
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    leftovers = [p for p in tmp_path.iterdir() if p.name != "report.json"]
    assert len(leftovers) == 1 and leftovers[0].name.endswith(".tmp")  # the half-written file, not renamed
    with pytest.raises(json.JSONDecodeError):
        json.loads(leftovers[0].read_text())
    rep = AuditReport.load(path)  # the previous complete report
    assert rep.epochs() == [0] and len(rep.latest()["metrics"]) == 3000
    # the next run writes over it normally; a stale temp file does not get in the way
    rep.append_audit({"epoch": 1, "global_step": 1, "metrics": {"a/b": 1.0}})
    rep.write()
    assert AuditReport.load(path).epochs() == [0, 1]


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ReportError, match="no audit report at"):
        AuditReport.load(tmp_path / "missing.json")
    with pytest.raises(ReportError, match="no report.json in folder"):
        AuditReport.load(tmp_path)
    assert issubclass(ReportError, ValueError)

    good = AuditReport(tmp_path / "good.json")
    _header(good)
    good.append_audit(_audit(0))
    good.write()
    text = (tmp_path / "good.json").read_text()

    cases = {
        "empty.json": ("", "is empty"),
        "trunc.json": (text[: len(text) // 2], "truncated or not valid JSON"),
        "list.json": ("[1, 2]", "not a lightning-saliency report"),
        "noschema.json": (json.dumps({"audits": []}), "no 'schema' field"),
        "v9.json": (json.dumps({"schema": "lightning-saliency/report/v9", "audits": []}),
                    "this version of lightning-saliency reads"),
        "other.json": (json.dumps({"schema": "something/else"}), "unknown schema 'something/else'"),
        "badaudit.json": (json.dumps({"schema": SCHEMA, "audits": [{"metrics": {}}]}), r"audits\[0\] is malformed"),
        "badalarms.json": (json.dumps({"schema": SCHEMA, "audits": [], "alarms": {}}), "'alarms' must be a list"),
    }
    for name, (content, pattern) in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(ReportError, match=pattern):
            AuditReport.load(tmp_path / name)
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ReportError, match="cannot read"):
        AuditReport.load(tmp_path / "binary.json")


def test_resume_never_duplicates_an_epoch(tmp_path):
    path = tmp_path / "report.json"
    rep = AuditReport(path)
    for e in range(5):
        rep.append_audit(_audit(e, value=e / 10))
    rep.append_alarm(_alarm(1))
    rep.append_alarm(_alarm(3))
    rep.write()

    # resume from a checkpoint taken at the end of epoch 2
    resumed = AuditReport.load(path)
    assert resumed.truncate_after(2) == 2
    assert resumed.epochs() == [0, 1, 2]
    assert [a["epoch"] for a in resumed.alarms] == [1]
    for e in (2, 3, 4):  # the resumed run re-audits epoch 2 (end of fit or re-run) and goes on
        resumed.append_audit(_audit(e, value=1.0 + e))
    resumed.append_alarm(_alarm(3, value=0.9))
    resumed.append_alarm(_alarm(3, value=0.95))  # same alarm, same epoch: replaced
    resumed.write()

    final = AuditReport.load(path)
    assert final.epochs() == [0, 1, 2, 3, 4]
    assert [v for _, _, v in final.history("gradcam/object_mass")] == [0.0, 0.1, 3.0, 4.0, 5.0]
    assert [(a["epoch"], a["value"]) for a in final.alarms] == [(1, 0.4), (3, 0.95)]
    # out-of-order appends end up sorted
    final.append_audit(_audit(7))
    final.append_audit(_audit(6))
    assert final.epochs() == [0, 1, 2, 3, 4, 6, 7]


def test_maps_file_size_bound_and_content(tmp_path):
    gen = torch.Generator().manual_seed(0)
    n, h, w = 100, 224, 160
    maps = {"gradcam": torch.rand(n, h, w, generator=gen), "gradcam++": torch.rand(n, h, w, generator=gen),
            "gradient": torch.zeros(n, h, w)}
    maps["gradient"][0, 0, 0] = float("nan")
    preds = torch.arange(n) % 3
    rel = save_maps(tmp_path, 3, maps, predictions=preds)
    assert rel == "maps/epoch_0003.npz"
    path = tmp_path / rel
    bound = len(maps) * MAX_IMAGES * MAX_SIDE * MAX_SIDE * 2 + MAX_IMAGES * 8 + 4096  # + headers
    assert path.stat().st_size <= bound
    # noise does not compress much: the bound is the honest one, not luck
    assert path.stat().st_size > 0.5 * 2 * MAX_IMAGES * 64 * 46 * 2

    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == ["gradcam", "gradcam++", "gradient", "predictions"]
        assert z["gradcam"].dtype == np.float16 and z["predictions"].dtype == np.int64
    back = load_maps(tmp_path, 3)
    assert back["gradcam"].shape == (MAX_IMAGES, 64, 46) and back["gradcam"].dtype == np.float32
    assert np.array_equal(back["predictions"], preds[:MAX_IMAGES].numpy())
    g = back["gradcam"]
    assert g.min() >= 0 and g.max() <= 1
    assert np.allclose(g.reshape(MAX_IMAGES, -1).min(1), 0) and np.allclose(g.reshape(MAX_IMAGES, -1).max(1), 1)
    assert np.all(back["gradient"] == 0)  # constant map (NaN included) -> zeros, not NaN
    # the downsampled map is the true map shrunk: a blob in one corner stays in that corner
    blob = torch.zeros(2, 128, 128)
    blob[:, :32, 96:] = 1.0
    small = load_maps(tmp_path / save_maps(tmp_path, 4, {"gradcam": blob}))["gradcam"]
    assert small.shape == (2, 64, 64)
    assert small[:, :16, 48:].mean() > 0.95 and small[:, 20:, :40].max() < 0.05
    # small maps are kept at their size
    assert load_maps(tmp_path / save_maps(tmp_path, 5, {"x": np.ones((3, 8, 8))}))["x"].shape == (3, 8, 8)


def test_maps_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        save_maps(tmp_path, 0, {"gradcam": torch.rand(4, 4)})
    with pytest.raises(ValueError, match="same images"):
        save_maps(tmp_path, 0, {"a": torch.rand(4, 4, 4), "b": torch.rand(3, 4, 4)})
    with pytest.raises(ValueError, match="predictions has"):
        save_maps(tmp_path, 0, {"a": torch.rand(4, 4, 4)}, predictions=torch.zeros(3))
    with pytest.raises(ValueError, match="epoch must be"):
        save_maps(tmp_path, -1, {"a": torch.rand(4, 4, 4)})
    with pytest.raises(ReportError, match="no maps file"):
        load_maps(tmp_path, 9)
    (tmp_path / "maps").mkdir(exist_ok=True)
    (tmp_path / "maps" / "epoch_0008.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ReportError, match="cannot read maps file"):
        load_maps(tmp_path, 8)


def test_probe_thumbnails_and_probe_info(tmp_path):
    gen = torch.Generator().manual_seed(1)
    n = 70
    spurious = torch.zeros(n, 96, 128, dtype=torch.bool)
    spurious[:, :24, :32] = True
    probe = SimpleNamespace(inputs=torch.randn(n, 3, 96, 128, generator=gen), targets=torch.arange(n) % 4,
                            groups=[f"site{i % 2}" for i in range(n)], object_masks=None,
                            spurious_masks=spurious, fingerprint="f" * 64)
    assert save_probe_thumbnails(tmp_path, probe) == "maps/probe.npz"
    th = load_probe_thumbnails(tmp_path)
    assert th["images"].shape == (MAX_IMAGES, 48, 64, 3) and th["images"].dtype == np.uint8
    assert th["targets"].dtype == np.int64 and np.array_equal(th["targets"], (np.arange(MAX_IMAGES) % 4))
    assert th["groups"].tolist() == [f"site{i % 2}" for i in range(MAX_IMAGES)]
    assert th["spurious_masks"].dtype == bool and th["spurious_masks"].shape == (MAX_IMAGES, 48, 64)
    assert th["spurious_masks"][:, :12, :16].all() and not th["spurious_masks"][:, 12:, 16:].any()
    assert "object_masks" not in th
    assert (tmp_path / "maps" / "probe.npz").stat().st_size <= MAX_IMAGES * 64 * 64 * 3 + 64 * 64 * MAX_IMAGES + 8192
    info = probe_info(probe)
    assert info == {"size": 70, "fingerprint": "f" * 64, "groups": {"site0": 35, "site1": 35},
                    "object_masks": False, "spurious_masks": True}
    rep = AuditReport(tmp_path / "report.json")
    rep.set_header(probe=probe)
    assert rep.data["probe"] == info


def test_module_doctests():
    result = doctest.testmod(report_mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 5


def test_written_files_are_readable_by_others_as_open_would_make_them(tmp_path):
    """mkstemp makes owner-only files; the report, maps and PNGs get 0o666 less the umask instead."""
    from lightning_saliency.render import save_png
    from lightning_saliency.report import save_maps

    old = os.umask(0o022)
    try:
        import lightning_saliency.files as files

        files._MODE = None  # read the umask set here
        rep = AuditReport(tmp_path / "report.json")
        rep.append_audit({"epoch": 0, "global_step": 0, "metrics": {}})
        rep.write()
        save_maps(tmp_path, 0, {"gradcam": torch.rand(2, 8, 8)})
        save_png(np.zeros((2, 2, 3), np.uint8), tmp_path / "a.png")
    finally:
        os.umask(old)
        files._MODE = None
    for p in (tmp_path / "report.json", tmp_path / "maps" / "epoch_0000.npz", tmp_path / "a.png"):
        assert (p.stat().st_mode & 0o777) == 0o644, p
