"""What the default audit costs the shortcut example (issue 3, point 8; DESIGN §6: at most 10%).

Runs ``examples/shortcut_shapes.py``'s ``main()`` in this process with the same arguments, once with
``--no-audit`` and once with the default SaliencyMonitor + ShortcutAlarm, ``--repeats`` times, alternating which
goes first so that a drift of the machine's load hits both alike. What is timed is the example's
``Trainer.fit`` call: training, validation and, in the audited runs, the audits with all their logging. The
dataset generation before it is the same in both runs and is left out; so are the gate and the HTML page that
the example runs after training (``--no-gate``). The probe draw happens before ``fit`` too and is shown in the
breakdown. It prints a table of the runs, the ratio of the fastest fit of each kind (the verdict: load from elsewhere
on the machine only adds time), the ratio of the medians and the median of the paired ratios, then where the
audit time went:

- per audit, the record's own ``duration_s`` from ``report.json`` (attribution + metrics, before logging),
- an inclusive breakdown from timing wrappers put around the library's functions for the audited runs only
  (the probe draw, ``_prepare``, the attribution pass, stability's noisy passes, the other metrics, the summary,
  the maps file, the report write, overlay rendering and each sink's methods),
- an in-process accounting: those wrappers' audit time plus the extra time TensorBoard's writer thread spends
  checksumming the audit's events, as a ratio that does not move with the machine's load.

Usage::

    python benchmarks/bench_overhead.py                 # the example's defaults (8 epochs, 2400 images), 5 x 2 runs
    python benchmarks/bench_overhead.py --epochs 2 --train-size 600 --repeats 1   # a quick look

Timings on a shared machine are noisy (here the same fit varies by +-10% between runs): compare the ratios, and
rerun when the load changed during the runs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TARGET = 1.10


class Timings:
    """Inclusive wall time and call counts per label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.depth: dict[str, int] = defaultdict(int)

    def wrap(self, owner: Any, name: str, label: str | Callable[[], str]) -> Callable[[], None]:
        """Replace ``owner.name`` by a timed version; returns the function that restores it."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            key = label() if callable(label) else label
            self.depth[key] += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.depth[key] -= 1
                if self.depth[key] == 0:  # recursion / nesting of the same label counts once
                    self.seconds[key] += time.perf_counter() - start
                    self.calls[key] += 1

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, original)


@contextlib.contextmanager
def instrumented(timings: Timings) -> Iterator[None]:
    """Timing wrappers around the library's audit path (the library itself is not modified)."""
    import lightning_saliency.audit as audit
    import lightning_saliency.callbacks as callbacks
    import lightning_saliency.metrics as metrics
    import lightning_saliency.probe as probe_mod
    import lightning_saliency.recording as recording
    import lightning_saliency.render as render
    import lightning_saliency.report as report
    import lightning_saliency.sinks as sinks

    def attribute_label() -> str:
        return "attribute: stability's noisy passes" if timings.depth["stability (incl. its passes)"] else \
            "attribute: the main pass"

    restore = [
        timings.wrap(probe_mod.ProbeSet, "from_dataset", "probe draw (ProbeSet.from_dataset, before fit)"),
        timings.wrap(callbacks.SaliencyMonitor, "_prepare", "_prepare (all calls; the first does the work)"),
        timings.wrap(callbacks.SaliencyMonitor, "audit", "audit (total)"),
        timings.wrap(callbacks, "audit_shard", "audit_shard (maps + metrics)"),
        timings.wrap(audit, "attribute", attribute_label),
        timings.wrap(metrics, "stability", "stability (incl. its passes)"),
        timings.wrap(recording.Recorder, "record", "Recorder.record (files, sinks)"),
        timings.wrap(callbacks, "summarize", "summarize"),
        timings.wrap(recording, "save_maps", "save_maps (npz)"),
        timings.wrap(report.AuditReport, "write", "report.json write"),
        timings.wrap(render, "overlays", "render: overlays"),
        timings.wrap(render, "to_image", "render: to_image"),
    ]
    for cls in (sinks.TensorBoardSink, sinks.PngSink):
        for method in ("log_metrics", "log_overlays", "log_table", "summary", "log_text"):
            if method in vars(cls):
                restore.append(timings.wrap(cls, method, f"sink {cls.__name__}.{method}"))
    try:
        yield
    finally:
        for undo in reversed(restore):
            undo()


@contextlib.contextmanager
def writer_checksums(timings: Timings) -> Iterator[None]:
    """Time TensorBoard's record checksums (pure Python, on its writer thread, off the training thread)."""
    import tensorboard.summary.writer.record_writer as record_writer

    undo = timings.wrap(record_writer, "masked_crc32c", "crc")
    try:
        yield
    finally:
        undo()


def run_once(audit: bool, args: argparse.Namespace, out: str, timings: Timings | None,
             crc: Timings | None = None) -> tuple[float, float, dict]:
    """Run the example once; returns the wall and CPU time (all threads) of its ``Trainer.fit`` call and the
    example's result."""
    import pytorch_lightning as pl

    from examples.shortcut_shapes import main

    argv = ["--out", out, "--quiet", "--no-gate", "--epochs", str(args.epochs), "--train-size",
            str(args.train_size), "--seed", str(args.seed)]
    if not audit:
        argv.append("--no-audit")
    fit_times: list[tuple[float, float]] = []
    fit = pl.Trainer.fit

    @functools.wraps(fit)
    def timed_fit(self: Any, *a: Any, **k: Any) -> Any:
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return fit(self, *a, **k)
        finally:
            fit_times.append((time.perf_counter() - start, time.process_time() - cpu))

    pl.Trainer.fit = timed_fit  # type: ignore[method-assign]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with instrumented(timings) if timings is not None else contextlib.nullcontext(), \
                    writer_checksums(crc) if crc is not None else contextlib.nullcontext():
                result = main(argv)
    finally:
        pl.Trainer.fit = fit  # type: ignore[method-assign]
    return (*fit_times[-1], result)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=8, help="the example's default")
    p.add_argument("--train-size", type=int, default=2400, help="the example's default")
    p.add_argument("--repeats", type=int, default=5, help="pairs of runs (the order alternates)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the untimed 1-epoch run of each kind that absorbs imports and lazy initialisation")
    p.add_argument("--out", default=None, help="where the runs' logs go (default: a temporary directory)")
    args = p.parse_args(argv)

    import pytorch_lightning as pl
    import torch

    out = args.out or tempfile.mkdtemp(prefix="bench_overhead_")
    print(f"# bench_overhead: the shortcut example, {args.epochs} epochs, {args.train_size} training images, "
          f"{args.repeats} x 2 runs\n")
    print(f"python {platform.python_version()}, torch {torch.__version__}, pytorch-lightning {pl.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{min(2, os.cpu_count() or 1)}, load average before {os.getloadavg()[0]:.2f}\n")
    if args.warmup:  # imports and lazy initialisation, paid once per process, out of the timed runs
        warm = argparse.Namespace(**{**vars(args), "epochs": 1, "train_size": 128})
        for audit in (False, True):
            run_once(audit, warm, os.path.join(out, f"warmup_{'audit' if audit else 'plain'}"), None)
    plain: list[float] = []
    audited: list[float] = []
    cpu: dict[bool, list[float]] = {False: [], True: []}
    timings = Timings()
    crc = {False: Timings(), True: Timings()}
    reports: list[str] = []
    rows = []
    for i in range(args.repeats):
        order = (False, True) if i % 2 == 0 else (True, False)
        times: dict[bool, tuple[float, float]] = {}
        for audit in order:
            wall, cpu_s, result = run_once(audit, args, os.path.join(out, f"run{i}_{'audit' if audit else 'plain'}"),
                                           timings if audit else None, crc[audit])
            times[audit] = (wall, cpu_s)
            (audited if audit else plain).append(wall)
            cpu[audit].append(cpu_s)
            if audit:
                reports.append(result["report"])
        rows.append((i, "plain, audit" if order[0] is False else "audit, plain", times[False], times[True],
                     os.getloadavg()[0]))

    print("| repeat | order | fit, no audit (s) | fit, default audit (s) | ratio | CPU s, no audit | CPU s, audit "
          "| CPU ratio | load avg after |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, order, (t0, c0), (t1, c1), load in rows:
        print(f"| {i} | {order} | {t0:.2f} | {t1:.2f} | {t1 / t0:.3f} | {c0:.2f} | {c1:.2f} | {c1 / c0:.3f} "
              f"| {load:.2f} |")
    m0, m1 = statistics.median(plain), statistics.median(audited)
    ratio = min(audited) / min(plain)
    median_ratio = m1 / m0
    paired = statistics.median(r[3][0] / r[2][0] for r in rows)
    cpu_ratio = min(cpu[True]) / min(cpu[False])
    verdict = "meets" if ratio <= TARGET else "misses"
    print(f"\nfastest fit: no audit {min(plain):.2f} s, default audit {min(audited):.2f} s, ratio {ratio:.3f} "
          f"({verdict} the target <= {TARGET:.2f})")
    print(f"median fit: no audit {m0:.2f} s, default audit {m1:.2f} s, ratio {median_ratio:.3f}; median of the "
          f"paired ratios {paired:.3f}; CPU time (all threads), fastest runs: ratio {cpu_ratio:.3f}")
    print("(the verdict uses the fastest run of each kind, as timeit does: load from elsewhere on the machine only "
          "ever adds time, so the minimum is the least disturbed estimate; the medians are shown alongside)\n")

    # where the audit time goes
    durations = []
    for path in reports:
        with open(path) as f:
            durations.append([a["duration_s"] for a in json.load(f)["audits"]])
    per_run = [sum(d) for d in durations]
    n_audits = len(durations[0]) if durations else 0
    print(f"report.json duration_s (attribution + metrics per audit, {n_audits} audits per fit): per fit "
          f"{statistics.median(per_run):.2f} s (median), per audit {statistics.median(sum(durations, [])):.3f} s "
          f"(median), first audit {statistics.median(d[0] for d in durations):.3f} s\n")
    runs = max(len(reports), 1)
    audit_total = timings.seconds.get("audit (total)", 0.0) / runs
    extra_crc = (crc[True].seconds["crc"] - crc[False].seconds["crc"]) / runs
    inproc = audit_total + extra_crc
    print(f"In-process accounting: the audits themselves (hooks to return, all logging included) took "
          f"{audit_total:.2f} s of an audited fit, and TensorBoard's writer thread spent {extra_crc:.2f} s more "
          f"than in a plain fit checksumming the audit's events (pure Python, beside the training thread). "
          f"Counted in full against the rest of the fit, that is a ratio of {m1 / max(m1 - inproc, 1e-9):.3f}: "
          f"a figure that does not move with the machine's load between runs as the fit times do.\n")
    print(f"| where (inclusive, per audited fit: the mean of {runs}) | seconds | calls | share of the audited fit |")
    print("| --- | ---: | ---: | ---: |")
    for key in sorted(timings.seconds, key=lambda k: -timings.seconds[k]):
        sec = timings.seconds[key] / runs
        print(f"| {key} | {sec:.3f} | {timings.calls[key] // runs} | {100 * sec / m1:.1f}% |")
    print("\nNested labels are inclusive: audit (total) contains audit_shard and Recorder.record; audit_shard "
          "contains the attribute passes and stability; stability contains its noisy passes.")
    return {"plain": plain, "audited": audited, "ratio": ratio, "median_ratio": median_ratio, "paired_ratio": paired,
            "cpu_ratio": cpu_ratio, "in_process_ratio": m1 / max(m1 - inproc, 1e-9),
            "durations": durations,
            "timings": {k: v / runs for k, v in timings.seconds.items()}}


if __name__ == "__main__":
    main(sys.argv[1:])
