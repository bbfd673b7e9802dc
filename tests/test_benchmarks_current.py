"""The benchmarks instrument the library by name: every name they wrap must still exist (no timing here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_overhead_wraps_names_that_exist_and_restores_them():
    bench = _load("bench_overhead")
    import lightning_saliency.recording as recording

    before = recording.Recorder.record
    timings = bench.Timings()
    with bench.instrumented(timings):  # an AttributeError here means the bench went stale
        assert recording.Recorder.record is not before
    assert recording.Recorder.record is before
