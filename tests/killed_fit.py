"""A fit of the 16-px shapes net that kills itself with SIGKILL inside an audit, run as a script by
``tests/test_lifecycle.py`` (issue 10, faults): no ``finally``, no atexit, no flush runs after the kill.

``--kill-at N`` kills the process during the N-th audit: ``write`` halfway through writing ``report.json``'s
temporary file (the worst moment for the report), ``metric`` inside a registered metric (mid-audit, before
anything of that audit is written). Without ``--kill-at`` the fit runs to the end (the resume). Checkpoints
(``last.ckpt``, every epoch) go to ``<out>/ckpt``, logs to ``<out>`` (``logger=False``: a fixed folder).

Usage::

    python tests/killed_fit.py OUT_DIR --max-epochs 4 --kill-at 3 --where write
    python tests/killed_fit.py OUT_DIR --max-epochs 4 --resume
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

import lightning_saliency.report as report_module  # noqa: E402
from lightning_saliency import SaliencyMonitor, register_metric  # noqa: E402
from tests import monitor_utils as U  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--max-epochs", type=int, default=4)
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--where", choices=("write", "metric"), default="write")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    audits = {"n": 0}

    def counting_metric(maps: torch.Tensor, probe) -> torch.Tensor:  # called once per method and audit
        audits["n"] += 1
        if args.where == "metric" and args.kill_at and audits["n"] == 2 * args.kill_at - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return maps.flatten(1).mean(1)

    register_metric("mean_mass", counting_metric, higher_is_better=False, per_group=False)
    real_write = report_module.atomic_write
    writes = {"n": 0}

    def write(path, fn):
        if os.path.basename(str(path)) != "report.json" or args.where != "write" or not args.kill_at:
            return real_write(path, fn)
        writes["n"] += 1  # write 1 opens the report, write k + 1 records audit k

        def half_then_die(f):
            whole = io.BytesIO()
            fn(whole)  # the real payload, of which half reaches the temporary file
            f.write(whole.getvalue()[: len(whole.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        return real_write(path, half_then_die if writes["n"] == args.kill_at + 1 else fn)

    report_module.atomic_write = write
    monitor = SaliencyMonitor(U.probe(), methods=("gradcam", "gradient"),
                              metrics=("spurious_mass", "drift", "mean_mass"), log_images=0)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), save_last=True, every_n_epochs=1)
    last = os.path.join(args.out, "ckpt", "last.ckpt")
    U.fit([monitor, ckpt], args.out, max_epochs=args.max_epochs, logger=False, enable_checkpointing=True,
          ckpt_path=last if args.resume else None)


if __name__ == "__main__":
    main()
