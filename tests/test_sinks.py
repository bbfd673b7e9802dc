"""sinks.py with real TensorBoard and W&B (offline): what is logged is read back from the files they write."""

from __future__ import annotations

import glob
import io
import json
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import pytorch_lightning as pl
from PIL import Image

from lightning_saliency.render import grid
from lightning_saliency.sinks import (
    PngSink,
    ScalarSink,
    Sink,
    TensorBoardSink,
    WandbSink,
    custom_scalars_layout,
    sinks_for_loggers,
)

STEPS = ((0, 5), (1, 12))  # (epoch, global_step)


def _overlays(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (16, 20, 3), dtype=np.uint8) for _ in range(n)]


def _metrics(step: int) -> dict[str, float]:
    return {"gradcam/object_mass": step / 100, "gradient/object_mass": step / 200,
            "gradcam/pointing_game": 0.5, "gradcam/object_mass/siteA": step / 300, "gradient/nan_metric": None}


def _captions(n: int) -> list[str]:
    return [f"cls{i} / cls{(i + 1) % 3} / site{i % 2}" for i in range(n)]


def _log_two_audits(sinks: list[Sink]) -> dict[tuple[str, int], np.ndarray]:
    """Log two audits to every sink; returns the expected grid per (method, step)."""
    expected = {}
    for epoch, step in STEPS:
        for sink in sinks:
            sink.log_metrics(_metrics(step), step)
        for k, method in enumerate(("gradcam", "gradient")):
            imgs, caps = _overlays(5, seed=10 * step + k), _captions(5)
            expected[(method, step)] = grid(imgs, caps)
            for sink in sinks:
                sink.log_overlays(method, imgs, caps, step, epoch=epoch)
        for sink in sinks:
            sink.log_table("probe_table", ["index", "label", "prediction", "group"],
                           [[i, i % 3, (i + 1) % 3, f"site{i % 2}"] for i in range(5)], step)
            sink.log_text("notes", f"audit at step {step}", step)
            sink.flush()
    for sink in sinks:
        sink.summary({"gradcam/object_mass": 0.12, "gradient/object_mass": float("nan")})
        sink.alert("ShortcutAlarm", "gradcam/spurious_mass 0.41 > 0.35")
    return expected


def _check_pngs(save_dir, expected) -> None:
    for (method, step), picture in expected.items():
        epoch = dict((s, e) for e, s in STEPS)[step]
        path = save_dir / "images" / method / f"epoch_{epoch:04d}.png"
        assert path.is_file(), path
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), picture)


def _read_tensorboard(log_dir):
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(log_dir), size_guidance={ea.IMAGES: 0, ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc


def _check_tensorboard(log_dir, expected) -> None:
    from tensorboard.plugins.custom_scalar import layout_pb2

    acc = _read_tensorboard(log_dir)
    tags = acc.Tags()
    for method in ("gradcam", "gradient"):
        tag = f"saliency/{method}/overlays"
        assert tag in tags["images"], tags["images"]
        events = acc.Images(tag)
        assert [e.step for e in events] == [s for _, s in STEPS]
        for e in events:
            got = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
            assert (e.height, e.width) == got.shape[:2]
            assert np.array_equal(got, expected[(method, e.step)])  # PNG is lossless: the exact grid
    for key in ("gradcam/object_mass", "gradient/object_mass", "gradcam/pointing_game",
                "gradcam/object_mass/siteA"):
        scalars = acc.Scalars(f"saliency/{key}")
        want = [(s, _metrics(s)[key]) for _, s in STEPS]
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in scalars] == want
    assert "saliency/gradient/nan_metric" not in tags["scalars"]  # None = not computed, not logged
    for tag in ("saliency/notes/text_summary", "saliency/probe_table/text_summary",
                "saliency/summary/text_summary", "saliency/alerts/text_summary"):
        assert tag in tags["tensors"], tags["tensors"]
    table = acc.Tensors("saliency/probe_table/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| index | label | prediction | group |" in table and "site1" in table
    # the custom-scalars layout: one chart per metric, a line per method
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    charts = {(c.title, ch.title): list(ch.multiline.tag) for c in layout.category for ch in c.chart}
    assert charts[("saliency", "object_mass")] == ["saliency/gradcam/object_mass", "saliency/gradient/object_mass"]
    assert charts[("saliency", "pointing_game")] == ["saliency/gradcam/pointing_game"]
    assert charts[("saliency per group", "gradcam/object_mass")] == ["saliency/gradcam/object_mass/siteA"]


def test_tensorboard_pytorch_lightning_logger(tmp_path):
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    tb = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version=0)
    csv = CSVLogger(save_dir=str(tmp_path), name="csv")
    save_dir = tmp_path / "tb" / "version_0" / "saliency"
    # CSV gets the scalars; PNG files only without a dashboard (or when asked)
    assert [type(s) for s in sinks_for_loggers([csv, tb], save_dir)] == [ScalarSink, TensorBoardSink]
    sinks = sinks_for_loggers([csv, tb], save_dir, always_png=True)
    assert [type(s) for s in sinks] == [ScalarSink, TensorBoardSink, PngSink]
    expected = _log_two_audits(sinks)
    _check_tensorboard(tb.log_dir, expected)
    _check_pngs(save_dir, expected)


def test_tensorboard_lightning_pytorch_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    tb = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version=0)
    sinks = sinks_for_loggers([tb, CSVLogger(save_dir=str(tmp_path))], tmp_path / "saliency", always_png=True)
    assert [type(s) for s in sinks] == [TensorBoardSink, ScalarSink, PngSink]
    expected = _log_two_audits(sinks)
    _check_tensorboard(tb.log_dir, expected)
    _check_pngs(tmp_path / "saliency", expected)


def test_dispatch_for_every_kind_of_logger(tmp_path):
    import lightning.pytorch.loggers as L
    import pytorch_lightning.loggers as PL

    save = tmp_path / "s"
    assert [type(s) for s in sinks_for_loggers(None, save)] == [PngSink]
    assert [type(s) for s in sinks_for_loggers([], save)] == [PngSink]
    assert [type(s) for s in sinks_for_loggers(False, save)] == [PngSink]
    assert [type(s) for s in sinks_for_loggers(PL.CSVLogger(str(tmp_path)), save)] == [ScalarSink, PngSink]
    assert [type(s) for s in sinks_for_loggers([L.CSVLogger(str(tmp_path))], save)] == [ScalarSink, PngSink]
    # every logger is served, each once; W&B sinks are lazy: no run starts until something is logged
    tb1, tb2 = PL.TensorBoardLogger(str(tmp_path), name="a"), L.TensorBoardLogger(str(tmp_path), name="b")
    wb1 = PL.WandbLogger(offline=True, save_dir=str(tmp_path))
    wb2 = L.WandbLogger(offline=True, save_dir=str(tmp_path))
    sinks = sinks_for_loggers([tb1, wb1, tb2, wb2, tb1], save)
    assert [type(s) for s in sinks] == [TensorBoardSink, WandbSink, TensorBoardSink, WandbSink]
    assert wb1._experiment is None and wb2._experiment is None
    with_png = sinks_for_loggers([tb1], save, always_png=True)
    assert [type(s) for s in with_png] == [TensorBoardSink, PngSink] and with_png[-1].save_dir == save


def test_dispatch_never_imports_a_distribution_that_is_not_loaded(monkeypatch):
    """A logger of a distribution nobody imported cannot exist: only loaded distributions are consulted."""
    import lightning.pytorch.loggers as L
    import pytorch_lightning.loggers as PL

    from lightning_saliency.sinks import _logger_classes

    assert _logger_classes("TensorBoardLogger") == (PL.TensorBoardLogger, L.TensorBoardLogger)
    assert _logger_classes("WandbLogger") == (PL.WandbLogger, L.WandbLogger)
    imported = []
    real_import = __import__("importlib").import_module

    def spy(name, *args):
        imported.append(name)
        return real_import(name, *args)

    monkeypatch.setattr("lightning_saliency.sinks.importlib.import_module", spy)
    monkeypatch.delitem(sys.modules, "lightning")
    assert _logger_classes("TensorBoardLogger") == (PL.TensorBoardLogger,)
    assert imported == ["pytorch_lightning.loggers"]


def test_png_sink_names_and_no_ops(tmp_path):
    sink = PngSink(tmp_path)
    imgs = _overlays(3, 0)
    p = sink.log_overlays("gradcam++", imgs, ["a", "b", "c"], step=7, epoch=12)
    assert p == tmp_path / "images" / "gradcam++" / "epoch_0012.png"
    q = sink.log_overlays("my method/v2", imgs, ["a", "b", "c"], step=7)
    assert q == tmp_path / "images" / "my_method_v2" / "step_00000007.png"
    assert np.array_equal(np.asarray(Image.open(q).convert("RGB")), grid(imgs, ["a", "b", "c"]))
    assert sink.log_overlays("gradcam", [], [], step=1) is None
    assert sink.written == [p, q]
    # the other calls are no-ops that accept anything
    sink.log_metrics({"a/b": 1.0}, 1)
    sink.log_table("t", ["a"], [[1]], 1)
    sink.log_text("t", "x", 1)
    sink.alert("t", "x")
    sink.summary({"a/b": 1.0})
    sink.flush()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")) == [
        "images/gradcam++/epoch_0012.png", "images/my_method_v2/step_00000007.png"]


def test_custom_scalars_layout_groups_by_metric():
    layout = custom_scalars_layout(["b/stability", "a/stability", "a/spurious_mass", "a/spurious_mass/g1",
                                    "a/spurious_mass/g0", "loose"])
    assert layout["saliency"]["stability"] == ["Multiline", ["saliency/a/stability", "saliency/b/stability"]]
    assert layout["saliency"]["loose"] == ["Multiline", ["saliency/loose"]]
    assert layout["saliency per group"]["a/spurious_mass"] == [
        "Multiline", ["saliency/a/spurious_mass/g0", "saliency/a/spurious_mass/g1"]]


# -- W&B, offline ---------------------------------------------------------------------------------------------
def _wandb_records(path):
    """Records of a W&B transaction log (``run-<id>.wandb``): W&B's LevelDB-style log of protobuf records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), "not a W&B transaction log"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if pos + length > len(data):  # still being written
            break
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 1:  # full
            raw = chunk
        elif kind == 2:  # first
            pending = chunk
            continue
        elif kind == 3:  # middle
            pending += chunk
            continue
        elif kind == 4:  # last
            raw, pending = pending + chunk, b""
        else:
            continue
        rec = pb.Record()
        rec.ParseFromString(raw)
        yield rec


def _finished_records(run_dir: str, timeout: float = 20.0) -> list:
    """The run's records once its transaction log is complete (it ends with an ``exit`` record)."""
    deadline = time.time() + timeout
    while True:
        paths = glob.glob(os.path.join(run_dir, "run-*.wandb"))
        records = list(_wandb_records(paths[0])) if paths else []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
            return records
        time.sleep(0.2)


def _items(update) -> dict[str, object]:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in update}


def _wandb_processes() -> set[int]:
    found = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if "wandb" in " ".join(p.cmdline()).lower() or "wandb" in p.name().lower():
                found.add(p.pid)
        except psutil.Error:
            pass
    return found


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
                       "WANDB_DISABLE_CODE": "true", "WANDB_CONSOLE": "off", "WANDB__DISABLE_STATS": "true",
                       "WANDB_DIR": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
                       "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
                       "WANDB_ARTIFACT_DIR": str(tmp_path / "wandb-artifacts")}.items():
        monkeypatch.setenv(key, value)
    before = _wandb_processes()
    yield tmp_path
    import wandb

    if wandb.run is not None:
        wandb.run.finish()
    wandb.teardown()  # stops wandb-core, which otherwise lives until the interpreter exits
    deadline = time.time() + 10
    while _wandb_processes() - before and time.time() < deadline:
        time.sleep(0.1)
    assert not (_wandb_processes() - before), "a wandb process was left running"


def test_wandb_offline_run_directory(offline_wandb):
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    tmp_path = offline_wandb
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="saliency-test")
    save_dir = tmp_path / "saliency"
    sinks = sinks_for_loggers([logger], save_dir, always_png=True)
    assert [type(s) for s in sinks] == [WandbSink, PngSink]
    expected = _log_two_audits(sinks)
    logger.log_metrics({"train/loss": 0.7}, step=12)  # Lightning's own logging on the same run: no conflict
    run_dir = os.path.dirname(logger.experiment.dir)  # .../wandb/offline-run-<time>-<id>
    logger.experiment.finish()
    wandb.teardown()  # wandb-core writes the transaction log asynchronously; this waits for it to close
    assert os.path.basename(run_dir).startswith("offline-run-")

    # images: one PNG per overlay per audit under the offline run's media folder
    for method in ("gradcam", "gradient"):
        files = glob.glob(os.path.join(run_dir, "files", "media", "images", "saliency", method, "overlays_*.png"))
        assert len(files) == 2 * 5, files
        pixels = {np.asarray(Image.open(f).convert("RGB")).tobytes() for f in files}
        want = {im.tobytes() for s in (5, 12) for im in _overlays(5, seed=10 * s + (method == "gradient"))}
        assert pixels == want  # the uint8 arrays themselves, losslessly
    assert glob.glob(os.path.join(run_dir, "files", "media", "table", "saliency", "probe_table_*.table.json"))

    # the run's records: history rows carry trainer/global_step; saliency/* is stepped by it; the summary
    records = _finished_records(run_dir)
    metric_defs = {r.metric.glob_name or r.metric.name: r.metric.step_metric for r in records
                   if r.WhichOneof("record_type") == "metric"}
    assert metric_defs.get("saliency/*") == "trainer/global_step"
    rows = [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    scalar_rows = [r for r in rows if "saliency/gradcam/object_mass" in r]
    assert [(r["trainer/global_step"], r["saliency/gradcam/object_mass"]) for r in scalar_rows] == [
        (5, 0.05), (12, 0.12)]
    image_rows = [r for r in rows if "saliency/gradcam/overlays/captions" in r]
    assert [r["trainer/global_step"] for r in image_rows] == [5, 12]
    assert image_rows[0]["saliency/gradcam/overlays/captions"] == _captions(5)
    assert all("saliency/gradient/nan_metric" not in r for r in rows)
    assert any(r.get("train/loss") == 0.7 and r["trainer/global_step"] == 12 for r in rows)
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(_items(r.summary.update))
    assert summary["saliency/gradcam/object_mass"] == 0.12
    assert "saliency/gradient/object_mass" not in summary or summary["saliency/gradient/object_mass"] != 0.12
    summary_json = os.path.join(run_dir, "files", "wandb-summary.json")
    if os.path.exists(summary_json):  # written offline by wandb versions that have wandb/wandb#11279
        assert json.load(open(summary_json))["saliency/gradcam/object_mass"] == 0.12
    assert any(r.WhichOneof("record_type") == "alert" and r.alert.title == "ShortcutAlarm" for r in records)
    _check_pngs(save_dir, expected)


def test_module_doctests():
    import doctest

    import lightning_saliency.sinks as sinks_mod

    result = doctest.testmod(sinks_mod)
    assert result.failed == 0 and result.attempted > 5


def test_writers_other_than_torchs_go_through_their_public_api(tmp_path):
    """A writer that is not torch.utils.tensorboard's (tensorboardX, a wrapper) gets add_scalar / add_image
    calls, never torch's private file writer and tensorboard's protos."""

    class Recorder:
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, step):
            self.calls.append(("scalar", tag, value, step))

        def add_image(self, tag, array, step, dataformats="CHW"):
            self.calls.append(("image", tag, array.shape, step, dataformats))

        def add_custom_scalars(self, layout):
            self.calls.append(("layout",))

        def _get_file_writer(self):  # present, as on tensorboardX, but not to be used
            raise AssertionError("private file writer used")

    writer = Recorder()
    sink = TensorBoardSink(writer)
    sink.log_metrics({"gradcam/object_mass": 0.5, "gradient/object_mass": None}, step=3)
    sink.log_overlays("gradcam", [np.zeros((8, 8, 3), np.uint8)] * 2, ["a", "b"], step=3)
    assert ("scalar", "saliency/gradcam/object_mass", 0.5, 3) in writer.calls
    assert not any(c[0] == "scalar" and c[1] == "saliency/gradient/object_mass" for c in writer.calls)
    assert any(c[0] == "image" and c[1] == "saliency/gradcam/overlays" and c[4] == "HWC" for c in writer.calls)


def test_a_csv_logger_gets_the_scalars_in_metrics_csv_and_the_overlays_as_png_files(tmp_path):
    import csv

    from lightning_saliency import SaliencyMonitor
    from tests import monitor_utils as mu

    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv", version=0)
    trainer, _ = mu.fit([SaliencyMonitor(mu.probe(), log_images=4)], tmp_path, max_epochs=2, logger=logger)
    run = Path(logger.log_dir)
    audits = json.loads((run / "saliency" / "report.json").read_text())["audits"]
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for key in ("gradcam/spurious_mass", "gradient/spurious_mass", "probe/accuracy"):
        logged = [(int(r["step"]), float(r[f"saliency/{key}"])) for r in rows if r.get(f"saliency/{key}")]
        assert logged == [(a["global_step"], pytest.approx(a["metrics"][key], abs=1e-6)) for a in audits], key
    assert sorted(p.name for p in (run / "saliency" / "images" / "gradcam").iterdir()) == [
        "epoch_0000.png", "epoch_0001.png"]  # no dashboard among the loggers: the grids as files
