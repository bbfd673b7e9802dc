"""Print chosen audit metrics of one or more runs side by side, epoch by epoch, as a Markdown table.

The README's shortcut figures come from this command::

    python examples/compare_runs.py runs/demo/shortcut/version_0 runs/demo/no_shortcut/version_0 \\
        --keys gradcam/spurious_mass,gradient/spurious_mass,gradcam/attention_disparity
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from lightning_saliency.report import AuditReport


def table(runs: list[str], keys: list[str]) -> str:
    """A Markdown table: one row per epoch, one column per (run, key)."""
    reports = {run: AuditReport.load(run) for run in runs}
    names = {run: os.path.basename(os.path.dirname(os.path.normpath(run))) or run for run in runs}
    epochs = sorted({e for r in reports.values() for e in r.epochs()})
    header = ["epoch"] + [f"{names[run]}: {key}" for run in runs for key in keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for epoch in epochs:
        row = [str(epoch)]
        for run in runs:
            audit = next((a for a in reports[run].audits if a["epoch"] == epoch), None)
            for key in keys:
                value = None if audit is None else audit["metrics"].get(key)
                row.append("-" if value is None or not math.isfinite(value) else f"{value:.3f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="log dirs (or their report.json)")
    parser.add_argument("--keys", default="gradcam/spurious_mass,gradient/spurious_mass")
    args = parser.parse_args(argv)
    print(table(args.runs, [k for k in args.keys.split(",") if k]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
