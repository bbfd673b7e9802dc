"""MLflow: a monitor fit with an ``MLFlowLogger`` on a local SQLite store, read back with ``MlflowClient``."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from PIL import Image

from lightning_saliency.sink_mlflow import MlflowSink, metric_name
from lightning_saliency.sinks import PngSink, ScalarSink, sinks_for_loggers

ROOT = Path(__file__).resolve().parents[1]


def _logger(module, tmp_path, name="audit"):
    return module.MLFlowLogger(experiment_name=name, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                               artifact_location=str(tmp_path / "artifacts"))


def test_an_mlflow_fit_gets_each_audit_as_metrics_once_and_the_grids_texts_and_report_as_artifacts(tmp_path):
    from mlflow.tracking import MlflowClient

    from lightning_saliency import SaliencyMonitor, ShortcutAlarm
    from lightning_saliency.recording import Recorder
    from lightning_saliency.render import grid
    from tests import monitor_utils as mu

    logger = _logger(pl.loggers, tmp_path)
    probe = mu.probe()
    alarm = ShortcutAlarm(metric="gradcam/spurious_mass", threshold=0.0, action="warn")  # fires
    mu.fit([SaliencyMonitor(probe, methods=("gradcam", "gradcam++", "gradient"), log_images=4), alarm], tmp_path,
           max_epochs=2, logger=logger)
    run_id = logger.run_id
    run = tmp_path / logger.experiment_id / run_id  # beside the checkpoints: <default_root_dir>/<name>/<version>
    report = json.loads((run / "saliency" / "report.json").read_text())
    audits = report["audits"]
    assert [a["epoch"] for a in audits] == [0, 1]
    assert not (run / "saliency" / "images").exists()  # MLflow takes the images: no PNG files on disk

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    keys = sorted({k for a in audits for k, v in a["metrics"].items() if v is not None and math.isfinite(v)})
    assert {"gradcam/stability", "gradcam++/stability", "gradient/spurious_mass", "probe/accuracy"} <= set(keys)
    for key in keys:  # one point per audit, at its global step, with the report's value: logged once, not twice
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric_name(key)))
        expected = [(a["global_step"], pytest.approx(a["metrics"][key], abs=1e-6)) for a in audits
                    if a["metrics"].get(key) is not None and math.isfinite(a["metrics"][key])]
        assert history == expected, key
    logged = {k for k in client.get_run(run_id).data.metrics if k.startswith("saliency/")}
    assert logged == {metric_name(k) for k in keys}  # gradcam++ kept apart from gradcam (not stripped to it)
    assert "saliency/gradcampp/stability" in logged

    def files(path):
        return sorted(Path(f.path).name for f in client.list_artifacts(run_id, path))

    for method in ("gradcam", "gradcam++", "gradient"):
        assert files(f"saliency/images/{method}") == ["epoch_0000.png", "epoch_0001.png"], method
    png = client.download_artifacts(run_id, "saliency/images/gradcam/epoch_0001.png", str(tmp_path / "down"))
    with Image.open(png) as im:
        im.load()
        shown = [Recorder().caption(probe, i, int(probe.targets[i])) for i in range(4)]
        assert im.format == "PNG" and im.size[::-1] == grid([np.zeros((96, 96, 3), np.uint8)] * 4, shown).shape[:2]
    steps = [f"step_{a['global_step']:08d}" for a in audits]
    assert files("saliency/probe") == [f"{s}.csv" for s in steps]
    table = Path(client.download_artifacts(run_id, f"saliency/probe/{steps[-1]}.csv", str(tmp_path / "down")))
    lines = table.read_text().splitlines()
    assert lines[0].startswith("index,label,prediction,group,") and len(lines) == 1 + len(probe)
    assert files("saliency/health") == [f"{steps[0]}.txt"]  # texts go when they change: "ok" once
    health = client.download_artifacts(run_id, f"saliency/health/{steps[0]}.txt", str(tmp_path / "down"))
    assert Path(health).read_text() == "fit epoch 0: ok"
    assert report["alarms"] and files("saliency/alarms") == [f"step_{f['global_step']:08d}.txt" for f in report["alarms"]]
    assert "gradcam/spurious_mass" in client.get_run(run_id).data.tags["saliency/alarm"]
    uploaded = client.download_artifacts(run_id, "saliency/report.json", str(tmp_path / "down"))
    assert json.loads(Path(uploaded).read_text()) == report  # the final report, uploaded at the end of fit


def test_both_distributions_mlflow_loggers_get_the_mlflow_sink_and_no_png_files(tmp_path):
    import lightning.pytorch as L

    save = tmp_path / "saliency"
    pl_logger, l_logger = _logger(pl.loggers, tmp_path), _logger(L.loggers, tmp_path)
    assert [type(s) for s in sinks_for_loggers([pl_logger, l_logger], save)] == [MlflowSink, MlflowSink]
    csv = pl.loggers.CSVLogger(str(tmp_path))
    assert [type(s) for s in sinks_for_loggers([csv, pl_logger], save)] == [ScalarSink, MlflowSink]
    assert [type(s) for s in sinks_for_loggers([pl_logger], save, always_png=True)] == [MlflowSink, PngSink]


def test_no_module_of_the_package_imports_mlflow():
    """The sink calls the client the logger made: ``mlflow`` stays an optional extra, imported by its logger only."""
    found = []
    for path in sorted((ROOT / "lightning_saliency").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "mlflow"]
    assert found == []
