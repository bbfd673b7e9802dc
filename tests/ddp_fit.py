"""A DDP fit of the 16-px shapes net with SaliencyMonitor + ShortcutAlarm, run as a script by
``tests/test_distributed.py``.

Lightning's DDP launcher re-executes this script once per extra process, so it cannot run inside pytest. Each
rank writes ``<out>/rank<r>.json`` (its probe shard, final global step, the audit history it holds); rank 0
also saves the final weights to ``<out>/weights.pt`` so that the test can audit the very same weights in a
single process and compare the reports.

Usage::

    python tests/ddp_fit.py OUT_DIR [--devices 2] [--max-epochs 3] [--alarm-threshold 0.0] [--probe-size 48]

Example (what the test runs)::

    OMP_NUM_THREADS=1 python tests/ddp_fit.py /tmp/ddp --devices 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the re-executed ranks start from this file, not from pytest's rootdir
    sys.path.insert(0, ROOT)

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from examples.shortcut_shapes import ShapesDataModule, ShapesNet, build_probe  # noqa: E402
from lightning_saliency import SaliencyMonitor, ShortcutAlarm  # noqa: E402
from lightning_saliency.audit import ALL_METRICS  # noqa: E402

# The data and the monitor's configuration, shared with the test's single-process reference.
DATA = dict(n_train=96, n_val=32, batch_size=24, seed=0, image_size=16, n_probe=64)
# batch_size=10: each rank's shard of 24 goes through the model in chunks of 10, 10 and 4, the single process's 48
# in four of 10 and one of 8 (other boundaries): sharding and chunking must agree. smoothgrad draws noise per image,
# keyed by the image's position in the whole probe; stability's 28 images straddle the shards (rank 1 scores 4 of
# them), its noisy copies keyed by position too
MONITOR = dict(methods=("gradcam", "gradient", "smoothgrad"), metrics=ALL_METRICS, expensive_every_n_audits=1,
               log_images=4, batch_size=10, stability_images=28, method_options={"smoothgrad_samples": 4})


def datamodule() -> ShapesDataModule:
    return ShapesDataModule(**DATA)


def monitor(probe_size: int) -> SaliencyMonitor:
    return SaliencyMonitor(build_probe(datamodule(), size=probe_size), **MONITOR)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="DDP fit with the saliency callbacks (for tests)")
    p.add_argument("out")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--max-epochs", type=int, default=3)
    p.add_argument("--alarm-threshold", type=float, default=0.0,
                   help="ShortcutAlarm(action='stop') threshold on gradcam/spurious_mass (max mode)")
    p.add_argument("--probe-size", type=int, default=48)
    p.add_argument("--no-val", action="store_true", help="no validation loop (limit_val_batches=0)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    pl.seed_everything(0, workers=True, verbose=False)
    net = ShapesNet(width=4)
    mon = monitor(args.probe_size)
    alarm = ShortcutAlarm(metric="gradcam/spurious_mass", threshold=args.alarm_threshold, patience=1,
                          action="stop")
    trainer = pl.Trainer(
        max_epochs=args.max_epochs, accelerator="cpu", devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto", callbacks=[mon, alarm],
        logger=pl.loggers.CSVLogger(os.path.join(args.out, "logs"), name="run"),
        default_root_dir=os.path.join(args.out, "root"), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True, num_sanity_val_steps=0,
        limit_val_batches=0 if args.no_val else None,
    )
    trainer.fit(net, datamodule=datamodule())
    rank = trainer.global_rank
    shard = mon._shard
    info = {
        "rank": rank, "world_size": trainer.world_size, "global_step": int(trainer.global_step),
        "current_epoch": int(trainer.current_epoch), "should_stop": bool(trainer.should_stop),
        "shard_len": len(shard) if shard is not None else None,
        "shard_indices": shard.indices.tolist() if shard is not None else None,
        "history": mon.history, "alarm_firings": alarm.firings, "log_dir": trainer.log_dir,
        "buffer_sums": [float(b.double().sum()) for b in net.buffers()],
    }
    if rank == 0:
        torch.save(net.state_dict(), os.path.join(args.out, "weights.pt"))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)
    # As PyTorch asks of every distributed script: without it, Gloo's worker threads can still hold finished work
    # (tensors) while the interpreter shuts down, and the process aborts ("terminate called without an active
    # exception", exit -6) once in a few runs; pytorch/pytorch#179291 describes the race.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
