"""DDP on CPU (2 processes, gloo): sharded probe, gathered maps, one writer, same numbers, same stop (DESIGN §5.5).

One real DDP fit (``tests/ddp_fit.py`` in a subprocess: Lightning's launcher re-executes the script per rank)
of the 16-px shapes net with a SaliencyMonitor and a ShortcutAlarm(action="stop") whose threshold fires at the
first audit. The run is shared by the tests below (module-scoped fixture) to keep the file fast.

How the reports are compared like with like: the alarm stops training right after the epoch-0 audit, so
the weights rank 0 saves at the end of fit are exactly the weights that audit explained (no training step
happens after it). The single-process reference loads those weights into a fresh model and audits them with
``trainer.validate`` and a SaliencyMonitor of the same configuration (same probe, methods, every metric; first
audit of each, so both run the expensive metrics and neither has drift). Both go through the model in chunks of
10 images (``batch_size=10``), whose boundaries differ between a shard and the whole probe: sharding and chunking
together must still give the same numbers.

BatchNorm: the fit has no validation loop, so at the audit each rank's running statistics are the ones it
updated in its own last training step (a validation forward through DDP would have broadcast rank 0's). The
monitor audits every shard with rank 0's buffers, the model the checkpoint holds, and gives each rank its own
back afterwards: without that, rank 1's shard was explained by a different model (metrics off by up to 0.04).
"""

from __future__ import annotations

import glob
import json
import math
import os
import signal
import socket
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "ddp_fit.py")
TIMEOUT_S = 240
PROBE_SIZE = 48  # shards of 24: the 16 expensive images on rank 0, the 28 of stability on both ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ddp(out: str, *args: str) -> subprocess.CompletedProcess:
    """Run the DDP script in its own process group; on timeout kill the whole group (launcher and ranks)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "PYTHONPATH": ROOT}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK"):  # a clean launch
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, SCRIPT, out, "--probe-size", str(PROBE_SIZE), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        pytest.fail(f"the DDP fit hung (> {TIMEOUT_S} s); output:\n{stdout[-4000:]}")
    finally:
        try:  # no rank left behind, whatever happened
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    done = _run_ddp(out, "--devices", "2", "--max-epochs", "3", "--alarm-threshold", "0.0", "--no-val")
    assert done.returncode == 0, done.stdout[-4000:]
    ranks = []
    for r in (0, 1):
        path = os.path.join(out, f"rank{r}.json")
        assert os.path.exists(path), f"rank {r} did not finish; output:\n{done.stdout[-4000:]}"
        with open(path) as f:
            ranks.append(json.load(f))
    return out, ranks


def _report(out: str) -> dict:
    paths = glob.glob(os.path.join(out, "**", "report.json"), recursive=True)
    assert len(paths) == 1, f"exactly one report expected (rank 0's), found {paths}"
    with open(paths[0]) as f:
        return json.load(f)


def test_probe_is_sharded_and_gathered(ddp_run):
    out, ranks = ddp_run
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["shard_len"] for r in ranks] == [PROBE_SIZE // 2, PROBE_SIZE // 2]
    assert ranks[0]["shard_indices"] + ranks[1]["shard_indices"] == list(range(PROBE_SIZE))
    report = _report(out)
    assert report["run"]["world_size"] == 2
    assert report["probe"]["size"] == PROBE_SIZE
    # the maps of both shards were gathered: rank 0 wrote one map per probe image, in probe order
    from lightning_saliency.report import load_maps

    maps = load_maps(os.path.dirname(glob.glob(os.path.join(out, "**", "report.json"), recursive=True)[0]), 0)
    assert maps["gradcam"].shape == (PROBE_SIZE, 16, 16)
    assert maps["predictions"].shape == (PROBE_SIZE,)
    # every rank holds the same history (the record is broadcast from rank 0)
    assert ranks[0]["history"] == ranks[1]["history"]
    assert [a["epoch"] for a in report["audits"]] == [0]


def test_each_rank_keeps_its_own_buffers_after_the_audit(ddp_run):
    """The audit lends rank 0's BatchNorm statistics to rank 1 and gives rank 1 its own back: with no step
    after the audit, the ranks end with the different statistics of their own last batches."""
    _, ranks = ddp_run
    assert len(ranks[0]["buffer_sums"]) == len(ranks[1]["buffer_sums"]) > 0
    assert ranks[0]["buffer_sums"] != ranks[1]["buffer_sums"]


def test_rank_zero_alone_writes(ddp_run):
    out, ranks = ddp_run
    saliency_dirs = [p for p in glob.glob(os.path.join(out, "**", "saliency"), recursive=True)]
    assert saliency_dirs == [os.path.join(ranks[0]["log_dir"], "saliency")]
    assert ranks[1]["log_dir"] == ranks[0]["log_dir"]  # rank 1 was told rank 0's path, and wrote nothing there
    versions = glob.glob(os.path.join(out, "logs", "run", "*"))
    assert versions == [ranks[0]["log_dir"]], versions
    assert not os.path.exists(os.path.join(out, "root")), "nothing may be written under default_root_dir"
    report = _report(out)
    assert len(report["audits"]) == 1 and len(report["alarms"]) == 1  # written once, not once per rank


def test_every_rank_stops_at_the_same_step(ddp_run):
    out, ranks = ddp_run
    steps_per_epoch = math.ceil(96 / 2 / 24)  # 96 training images, 2 ranks, batches of 24
    steps = [r["global_step"] for r in ranks]
    assert steps[0] == steps[1] == steps_per_epoch, steps  # stopped after epoch 0 of 3
    assert steps[0] < 3 * steps_per_epoch
    assert all(r["should_stop"] for r in ranks)
    assert ranks[0]["alarm_firings"] == ranks[1]["alarm_firings"] and len(ranks[0]["alarm_firings"]) == 1
    report = _report(out)
    assert report["alarms"][0]["action"] == "stop" and report["alarms"][0]["epoch"] == 0


def test_report_equals_single_process_report(ddp_run, tmp_path):
    """The DDP report's metrics equal a single-process audit of the same weights within 1e-5."""
    out, _ = ddp_run
    sys.path.insert(0, ROOT)
    from tests import ddp_fit

    net = ddp_fit.ShapesNet(width=4)
    net.load_state_dict(torch.load(os.path.join(out, "weights.pt"), weights_only=True))
    monitor = ddp_fit.monitor(PROBE_SIZE)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=pl.loggers.CSVLogger(str(tmp_path), name="single"),
                         callbacks=[monitor], enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, deterministic=True)
    trainer.validate(net, datamodule=ddp_fit.datamodule(), verbose=False)
    single = monitor.history[-1]["metrics"]
    distributed = _report(out)["audits"][0]["metrics"]
    assert not _report(out)["audits"][0]["errors"]
    assert _report(out)["audits"][0]["health"] == monitor.history[-1]["health"]  # pooled from both shards
    assert sorted(distributed) == sorted(single)
    assert any(k.endswith("/stability") for k in single) and any(k.endswith("/deletion_auc") for k in single)
    assert {"smoothgrad/stability", "smoothgrad/fragility", "smoothgrad/spurious_mass"} <= set(single)
    diffs = {k: (distributed[k], single[k]) for k in single
             if (distributed[k] is None) != (single[k] is None)
             or (single[k] is not None and not abs(distributed[k] - single[k]) <= 1e-5)}
    assert not diffs, f"DDP and single-process metrics differ: {diffs}"
    # discovery clusters the gathered maps on rank 0: the same candidates as in one process
    found, alone = _report(out)["audits"][0]["discovery"], json.loads(json.dumps(monitor.history[-1]["discovery"]))
    assert (found["method"], found["too_small"], found["skipped"], found["n_clusters"]) == \
        (alone["method"], alone["too_small"], alone["skipped"], alone["n_clusters"]) and found["n_clusters"]
    assert [(c["class"], c["members"], c["region"], c["confirmed"]) for c in found["candidates"]] == \
        [(c["class"], c["members"], c["region"], c["confirmed"]) for c in alone["candidates"]]
    for a, b in zip(found["candidates"], alone["candidates"]):
        assert all(a[k] == pytest.approx(b[k], abs=1e-5, nan_ok=True) for k in ("flip_rate", "null_flip_rate", "score"))
    print(f"discovery: clusters per class {found['n_clusters']}, {len(found['candidates'])} candidate(s)")
    worst = max(abs(distributed[k] - single[k]) for k in single if single[k] is not None)
    print(f"max |DDP - single process| over {len(single)} metrics: {worst:.3g}")


def test_merge_keeps_a_subset_metric_that_one_shard_does_not_cover():
    """Stability runs on the probe's first images: under DDP the later ranks hold none of them. The merged
    result must keep the metric (NaN where not covered), as the single-process audit has it."""
    from lightning_saliency.audit import ShardResult, merge

    a = ShardResult(torch.tensor([0, 1]), torch.tensor([2, 0]), per_image={"gradcam/stability": torch.tensor([.5, .75]),
                                                                        "gradcam/object_mass": torch.ones(2)})
    b = ShardResult(torch.tensor([2, 3]), torch.tensor([1, 1]), per_image={"gradcam/object_mass": torch.zeros(2)})
    merged = merge([b, a])
    assert merged.indices.tolist() == [0, 1, 2, 3] and merged.predictions.tolist() == [2, 0, 1, 1]
    assert merged.per_image["gradcam/object_mass"].tolist() == [1, 1, 0, 0]
    stability = merged.per_image["gradcam/stability"]
    assert stability[:2].tolist() == [.5, .75] and torch.isnan(stability[2:]).all()
