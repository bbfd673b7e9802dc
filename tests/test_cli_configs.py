"""The ready LightningCLI configs under ``callbacks/`` build the callbacks from YAML and audit a real fit.

``callbacks/audit.yaml`` with ``pytorch_lightning.cli.LightningCLI`` (the shortcut example's model and
datamodule) and with ``lightning.pytorch.cli.LightningCLI`` (a ``lightning.pytorch`` module);
``callbacks/audit-wandb.yaml`` with ``WANDB_MODE=offline``: the offline run directory holds the overlays. Both
configs run on plain ``(image, label)`` batches too: their alarm watches a key every probe gives.
"""

from __future__ import annotations

import glob
import json
import os
import warnings

import pytest
import torch
import yaml
from torch import nn

from examples.shortcut_shapes import ShapesDataModule, ShapesNet
from lightning_saliency import ProbeSet, SaliencyMonitor, ShortcutAlarm
from lightning_saliency.checks import check_alarm
from tests.monitor_utils import TupleData

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUDIT = os.path.join(ROOT, "callbacks", "audit.yaml")
AUDIT_WANDB = os.path.join(ROOT, "callbacks", "audit-wandb.yaml")
# small data: 16-px images, a validation set as large as the configs' 64-image probe
SMALL = ["--trainer.max_epochs=1", "--trainer.accelerator=cpu", "--trainer.devices=1",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.enable_checkpointing=false"]
SHAPES = ["--data.n_train=64", "--data.n_val=64", "--data.batch_size=32", "--data.image_size=16",
          "--data.n_probe=16", "--model.width=4"]


def _run_cli(distribution: str, config: str, root: str, *extra: str):
    args = ["fit", "--config", config, *SMALL, f"--trainer.default_root_dir={root}", *extra]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ShortcutAlarm")
        if distribution == "pytorch_lightning":
            from pytorch_lightning.cli import LightningCLI

            return LightningCLI(ShapesNet, ShapesDataModule, args=[*args, *SHAPES], save_config_callback=None)
        from lightning.pytorch.cli import LightningCLI

        from tests.test_distributions import TinyNet

        return LightningCLI(TinyNet, args=[*args, "--model.n_train=32", "--model.n_val=64"],
                            save_config_callback=None)


def _report(directory: str) -> dict:
    with open(os.path.join(directory, "saliency", "report.json")) as f:
        return json.load(f)


def test_configs_are_valid_yaml_with_the_documented_defaults():
    for path in (AUDIT, AUDIT_WANDB):
        with open(path) as f:
            callbacks = yaml.safe_load(f)["trainer"]["callbacks"]
        monitor = next(c for c in callbacks if c["class_path"] == "lightning_saliency.SaliencyMonitor")["init_args"]
        assert monitor["probe"] is None and monitor["probe_size"] == 64
        assert monitor["methods"] == ["gradcam", "gradient"] and monitor["every_n_epochs"] == 1
        built = SaliencyMonitor(**monitor)  # every key is a real argument
        assert (built.spec.batch_size, built._recorder.keep_maps) == (64, 20)  # the defaults, as documented
    with open(AUDIT) as f:
        alarm = yaml.safe_load(f)["trainer"]["callbacks"][1]
    assert alarm["class_path"] == "lightning_saliency.ShortcutAlarm" and alarm["init_args"]["action"] == "warn"
    ShortcutAlarm(**alarm["init_args"])


@pytest.mark.parametrize("distribution", ["pytorch_lightning", "lightning"])
def test_audit_yaml_fit(distribution, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever the config leaves relative lands here
    cli = _run_cli(distribution, AUDIT, str(tmp_path))
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, SaliencyMonitor)]
    alarms = [c for c in cli.trainer.callbacks if isinstance(c, ShortcutAlarm)]
    assert len(monitors) == 1 and len(alarms) == 1
    assert alarms[0].action == "warn" and alarms[0].metric == "gradcam/stability"
    assert len(monitors[0].probe) == 64  # drawn from the validation data
    report = _report(cli.trainer.log_dir)
    assert report["probe"]["size"] == 64 and report["probe"]["spurious_masks"]
    assert report["config"]["methods"] == ["gradcam", "gradient"]
    assert [a["epoch"] for a in report["audits"]] == [0]
    metrics = report["audits"][0]["metrics"]
    assert metrics["gradcam/spurious_mass"] is not None and metrics["gradient/object_mass"] is not None
    assert glob.glob(os.path.join(cli.trainer.log_dir, "events.out.tfevents.*"))  # the default TensorBoard


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
                       "WANDB_DISABLE_CODE": "true", "WANDB_CONSOLE": "off", "WANDB__DISABLE_STATS": "true",
                       "WANDB_DIR": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
                       "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
                       "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    import wandb

    if wandb.run is not None:
        wandb.run.finish()
    wandb.teardown()  # stops wandb-core, which otherwise lives until the interpreter exits


@pytest.mark.parametrize("distribution", ["pytorch_lightning", "lightning"])
def test_audit_wandb_yaml_fit_offline(distribution, offline_wandb):
    import wandb

    tmp_path = offline_wandb
    save_dir = str(tmp_path / "logs")
    cli = _run_cli(distribution, AUDIT_WANDB, str(tmp_path), f"--trainer.logger.init_args.save_dir={save_dir}")
    # "class_path: WandbLogger" resolves to the logger of the CLI's own distribution
    assert type(cli.trainer.logger).__name__ == "WandbLogger"
    assert type(cli.trainer.logger).__module__.startswith(distribution)
    run_dir = os.path.dirname(cli.trainer.logger.experiment.dir)
    wandb.run.finish()
    wandb.teardown()  # wandb-core writes the run's files asynchronously; this waits for them
    assert os.path.basename(run_dir).startswith("offline-run-") and run_dir.startswith(save_dir)
    # W&B has no log_dir: the report goes to <save_dir>/<name>/<version>, as checkpoints do, never shared by runs
    logger = cli.trainer.logger
    report = _report(os.path.join(save_dir, str(logger.name), str(logger.version)))
    assert [a["epoch"] for a in report["audits"]] == [0]
    overlays = {m: glob.glob(os.path.join(run_dir, "files", "media", "images", "saliency", m, "overlays_*.png"))
                for m in ("gradcam", "gradient")}
    assert all(len(files) == 16 for files in overlays.values()), overlays  # log_images: 16 per method
    assert glob.glob(os.path.join(run_dir, "files", "media", "table", "saliency", "probe_*.table.json"))
    (log,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))  # the offline transaction log: scalars and summary
    with open(log, "rb") as f:
        assert b"saliency/gradcam/spurious_mass" in f.read()


class TupleNet(TupleData):
    """A small CNN whose loaders yield plain ``(image, label)`` tuples: a probe drawn from them has no masks."""

    def __init__(self, n: int = 64) -> None:
        super().__init__(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                       nn.Flatten(), nn.Linear(4, 2)), n, (3, 16, 16), batch_size=32)


@pytest.mark.parametrize("config", [AUDIT, AUDIT_WANDB])
def test_configs_alarm_watches_a_key_a_probe_without_masks_gives(config):
    with open(config) as f:
        callbacks = yaml.safe_load(f)["trainer"]["callbacks"]
    args = {c["class_path"].rsplit(".", 1)[1]: c["init_args"] for c in callbacks}
    monitor = SaliencyMonitor(**args["SaliencyMonitor"])
    alarm = ShortcutAlarm(**args["ShortcutAlarm"])
    plain = ProbeSet(torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 0, 1]))  # no masks, no groups
    check_alarm(alarm.metric, monitor.spec.methods, monitor.spec.metrics, plain)  # raises if it can never fire
    with pytest.raises(ValueError, match="spurious masks"):  # the shortcut alarm the comments describe
        check_alarm("gradcam/spurious_mass", monitor.spec.methods, monitor.spec.metrics, plain)


def test_audit_yaml_fit_on_tuple_data(tmp_path, monkeypatch):
    from pytorch_lightning.cli import LightningCLI

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", AUDIT, *SMALL, f"--trainer.default_root_dir={tmp_path}"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ShortcutAlarm")
        cli = LightningCLI(TupleNet, args=args, save_config_callback=None)
    report = _report(cli.trainer.log_dir)
    assert report["probe"]["size"] == 64 and not report["probe"]["spurious_masks"]
    (audit,) = report["audits"]
    assert not audit["errors"] and "gradcam/spurious_mass" not in audit["metrics"]
    assert isinstance(audit["metrics"]["gradcam/stability"], float)  # the key the alarm watches


def test_batch_keys_and_denormalize_from_yaml_reach_the_report(tmp_path, monkeypatch):
    """``group_key`` (and the mask keys, and ``denormalize``) set in the YAML: the probe drawn from the dict
    batches has the groups, and the report has per-group metrics."""
    from pytorch_lightning.cli import LightningCLI

    from tests.test_batch_keys import Renamed

    monkeypatch.chdir(tmp_path)
    with open(AUDIT) as f:
        config = yaml.safe_load(f)
    monitor = config["trainer"]["callbacks"][0]["init_args"]
    monitor.update(probe_size=8, group_key="site", object_mask_key="fg", spurious_mask_key="border",
                   denormalize=[[0.5, 0.5, 0.5], [0.25, 0.25, 0.25]])
    path = tmp_path / "audit-keys.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["fit", "--config", str(path), *SMALL, f"--trainer.default_root_dir={tmp_path}"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ShortcutAlarm")
        cli = LightningCLI(Renamed, args=args, save_config_callback=None)
    report = _report(cli.trainer.log_dir)
    assert report["probe"]["groups"] == {"site_0": 3, "site_1": 3, "site_2": 2}
    assert report["probe"]["object_masks"] and report["probe"]["spurious_masks"]
    assert report["config"]["denormalize"] == {"mean": [0.5] * 3, "std": [0.25] * 3, "source": "argument"}
    (audit,) = report["audits"]
    assert not audit["errors"], audit["errors"]
    per_group = {k: v for k, v in audit["metrics"].items() if k.startswith("gradcam/spurious_mass/site_")}
    assert sorted(per_group) == [f"gradcam/spurious_mass/site_{k}" for k in range(3)]
    assert all(isinstance(v, float) for v in per_group.values())
    assert isinstance(audit["metrics"]["gradcam/attention_disparity"], float)
