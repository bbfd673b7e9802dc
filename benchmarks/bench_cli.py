"""Start-up cost of the ``lightning-saliency`` command (issue 10, point 5: under 0.5 s, never importing torch).

Each figure is the median wall time and peak RSS of ``--repeats`` fresh interpreters running, as the console
script does, ``lightning_saliency.cli.main``: the bare import, ``gate --help``, ``gate`` on a small report it writes
to a temporary folder (one audit, two methods, per-group keys), and ``show`` on it; ``import torch`` is timed
last as the reference the command avoids. Figures depend on the machine's load: run it on a quiet machine.

Usage::

    python benchmarks/bench_cli.py               # 7 repeats
    python benchmarks/bench_cli.py --repeats 15
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAIN = "import sys; from lightning_saliency.cli import main; sys.exit(main())"


_WRITE_REPORT = """
import json, sys
from lightning_saliency.report import SCHEMA
metrics = {f"{m}/{k}": 0.5 for m in ("gradcam", "gradient") for k in ("spurious_mass", "stability")}
metrics.update({f"gradcam/spurious_mass/site_{g}": 0.4 for g in "ab"})
json.dump({"schema": SCHEMA, "created": "2026-01-01T00:00:00+00:00", "updated": "2026-01-01T00:00:00+00:00",
           "run": {"log_dir": sys.argv[1], "model": "Net", "precision": "32-true", "world_size": 1},
           "probe": {"size": 8, "fingerprint": "ab" * 32, "groups": {"site_a": 4, "site_b": 4},
                     "object_masks": False, "spurious_masks": True},
           "config": {"methods": ["gradcam", "gradient"], "layer": "features", "metrics": ["spurious_mass"],
                      "every_n_epochs": 1},
           "audits": [{"epoch": 0, "global_step": 10, "time": "2026-01-01T00:00:00+00:00", "duration_s": 1.0,
                       "precision": "float32", "metrics": metrics, "errors": [], "maps": None}],
           "alarms": []}, open(sys.argv[1] + "/report.json", "w"))
"""


def _report(folder: Path) -> Path:
    """A minimal valid report.json with one audit, written by a child process: this one stays small, since a
    child's peak RSS counts the parent's pages it was forked from."""
    subprocess.run([sys.executable, "-c", _WRITE_REPORT, str(folder)], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return folder / "report.json"


def _time(args: list[str], repeats: int) -> tuple[float, float]:
    """Median wall seconds and median peak RSS (MB) of ``python args`` over ``repeats`` fresh processes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    walls, rss = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        _, _, usage = os.wait4(child.pid, 0)  # this child's own resource use
        walls.append(time.perf_counter() - start)
        rss.append(usage.ru_maxrss / 1024)  # kilobytes on Linux
        child.returncode = 0  # reaped above
    return statistics.median(walls), statistics.median(rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = str(_report(Path(tmp)))
        cases = [("import lightning_saliency.cli", ["-c", "import lightning_saliency.cli"]),
                 ("gate --help", ["-c", MAIN, "gate", "--help"]),
                 ("gate REPORT --max ...", ["-c", MAIN, "gate", report, "--max", "gradcam/spurious_mass=0.6"]),
                 ("show REPORT", ["-c", MAIN, "show", report]),
                 ("import torch (reference)", ["-c", "import torch"])]
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
              f"median of {args.repeats}\n")
        print("| command | wall s | peak RSS MB |\n| --- | ---: | ---: |")
        for name, argv in cases:
            wall, rss = _time(argv, args.repeats)
            print(f"| {name} | {wall:.3f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
