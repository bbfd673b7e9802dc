"""CPU time of one ``audit_shard`` call (gradcam + gradient, the default metrics) on the shortcut example's net and
a 64-image probe, on one thread: the audit's own computing, without training or logging, in CPU seconds, which
the machine's load moves far less than wall time.

Run it in two checkouts one after the other, alternating, to compare commits on the same machine::

    PYTHONPATH=. python benchmarks/bench_audit_shard.py LABEL
"""

import sys
import time

import torch

from examples.shortcut_shapes import ShapesDataModule, ShapesNet, build_probe
from lightning_saliency.audit import AuditSpec, audit_shard


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dm = ShapesDataModule(n_train=96, n_val=64, batch_size=32, seed=0, image_size=32, n_probe=64)
    dm.setup("fit")
    probe = build_probe(dm, size=64, seed=0)
    net = ShapesNet().eval()
    spec = AuditSpec(methods=("gradcam", "gradient"))
    prev = None
    for expensive, reps in ((False, 3), (True, 1)):  # warm-up
        for _ in range(reps):
            r = audit_shard(net, probe, spec, previous_ranks=prev, expensive=expensive)
            prev = r.ranks
    out = {}
    for expensive, reps in ((False, 30), (True, 10)):
        t = time.process_time()
        for _ in range(reps):
            r = audit_shard(net, probe, spec, previous_ranks=prev, expensive=expensive)
            prev = r.ranks
        out[expensive] = (time.process_time() - t) / reps * 1000
    print(f"{sys.argv[1] if len(sys.argv) > 1 else 'this checkout'}: audit_shard cheap {out[False]:.1f} ms CPU, with periodic {out[True]:.1f} ms CPU")


if __name__ == "__main__":
    main()
