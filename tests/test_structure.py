"""Size limits of the code (issue 9): the monitor only orchestrates, and no module grows past 600 lines."""

from __future__ import annotations

import inspect
import pathlib

import lightning_saliency
from lightning_saliency.callbacks import SaliencyMonitor

PACKAGE = pathlib.Path(lightning_saliency.__file__).parent


def test_saliency_monitor_class_is_at_most_300_lines():
    lines = len(inspect.getsource(SaliencyMonitor).splitlines())
    assert lines <= 300, (f"SaliencyMonitor is {lines} lines (docstring included): move recording to "
                          f"lightning_saliency/recording.py, collectives to distributed.py")


def test_no_module_of_the_package_is_above_600_lines():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 10 and PACKAGE / "callbacks.py" in modules  # the walk does see the package
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text(encoding="utf-8").splitlines()) for p in modules}
    too_long = {name: n for name, n in sizes.items() if n > 600}
    assert not too_long, f"modules above 600 lines (split them): {too_long}"
