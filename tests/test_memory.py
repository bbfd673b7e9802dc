"""No growth (DESIGN §5.4, issue 3 acceptance 7): 30 audits of a small model grow peak RSS by less than 50 MB,
leave no hook on the model between audits, and keep no tensor alive from one audit to the next beyond the
previous maps (detached, on the CPU) that drift needs.

The monitor is set up by a real one-epoch fit (TensorBoard logger, report and maps on disk, PNG grids), then
audited 30 more times by hand, after a warm-up, while a thread samples the process's resident set size."""

from __future__ import annotations

import gc
import threading

import psutil
import pytorch_lightning as pl
import torch

from examples.shortcut_shapes import ShapesDataModule, ShapesNet, build_probe
from lightning_saliency import SaliencyMonitor
from tests import monitor_utils as U

AUDITS = 30
LIMIT_MB = 50.0


def _hooks(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                   len(m._backward_pre_hooks), len(m._state_dict_hooks), len(m._load_state_dict_pre_hooks))
            for name, m in model.named_modules()}


def _global_hooks() -> tuple[int, ...]:
    mod = torch.nn.modules.module
    return (len(mod._global_forward_hooks), len(mod._global_forward_pre_hooks), len(mod._global_backward_hooks),
            len(mod._global_backward_pre_hooks))


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


class _PeakRss:
    """Samples the resident set size every few milliseconds in a thread; ``peak`` is the largest seen."""

    def __init__(self, interval: float = 0.002) -> None:
        self.process, self.interval = psutil.Process(), interval
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def test_thirty_audits_do_not_grow_memory_or_leave_hooks(tmp_path):
    dm = ShapesDataModule(n_train=64, n_val=32, batch_size=32, image_size=32, n_probe=64)
    monitor = SaliencyMonitor(build_probe(dm, size=32), methods=("gradcam", "gradient"), log_images=8)
    torch.manual_seed(0)
    net = ShapesNet(width=8)
    trainer = pl.Trainer(max_epochs=1, callbacks=[monitor], logger=pl.loggers.TensorBoardLogger(str(tmp_path)),
                         **U.FAST)
    trainer.fit(net, datamodule=dm)
    hooks, global_hooks = _hooks(net), _global_hooks()

    for epoch in range(1, 4):  # warm-up: allocator pools, lazy imports, first TensorBoard images
        monitor.audit(trainer, net, epoch=epoch)
    gc.collect()
    tensors_before = _live_tensors()
    rss_before = psutil.Process().memory_info().rss
    with _PeakRss() as sampler:
        for epoch in range(4, 4 + AUDITS):
            record = monitor.audit(trainer, net, epoch=epoch)
            assert not record["errors"], record["errors"]
            assert _hooks(net) == hooks, f"hooks left on the model after audit {epoch}"
            assert _global_hooks() == global_hooks
    gc.collect()
    rss_after = psutil.Process().memory_info().rss
    tensors_after = _live_tensors()
    growth_mb = (sampler.peak - rss_before) / 2**20
    print(f"\n{AUDITS} audits: peak RSS grew {growth_mb:.1f} MB (limit {LIMIT_MB:.0f} MB); RSS after - before "
          f"{(rss_after - rss_before) / 2**20:+.1f} MB; live tensors {tensors_before} -> {tensors_after}")
    assert growth_mb < LIMIT_MB
    assert tensors_after <= tensors_before, "tensors survive from one audit to the next"
    assert len(monitor.history) == 1 + 3 + AUDITS
    for maps in (monitor._reference.maps or {}).values():  # what is kept between audits: detached, CPU
        assert maps.device.type == "cpu" and not maps.requires_grad and maps.grad_fn is None
    assert all(p.grad is None or not p.grad.requires_grad for p in net.parameters())
