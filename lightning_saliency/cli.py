"""The ``lightning-saliency`` command: ``gate``, ``report`` and ``show`` over a run's audit report.

Usage::

    lightning-saliency gate REPORT [--max KEY=VALUE]... [--min KEY=VALUE]... [--config gate.toml]
                               [--epoch last|best|N] [--stage fit|validate|test] [--junit FILE] [--json]
                               [--allow-unhealthy]
    lightning-saliency report LOG_DIR [-o audit.html] [--max-images N] [--max-epochs N] [--cmap NAME]
    lightning-saliency show LOG_DIR [--scorecard]
    lightning-saliency --version

``REPORT`` / ``LOG_DIR`` may be the ``report.json`` file, its ``saliency`` folder, or the run's log dir
(``lightning_logs/version_0``); a folder is searched by :func:`lightning_saliency.report.find_report`
(``<folder>/report.json`` first, then ``<folder>/saliency/report.json``), the same for every command. Exit codes: 0 success (gate: every rule passed), 1 a gate rule failed or the audit is unhealthy,
2 the report is missing / unreadable / of an unknown schema, a key or epoch is absent, or the arguments are bad.
A reader that stops early (``lightning-saliency gate --json ... | head``) ends the output quietly: no traceback,
and the exit code stays the command's own (the gate's verdict), as with any output that was read in full.

The command never imports torch (nor NumPy before a report is read): ``import lightning_saliency.cli`` loads
the standard library only, and each subcommand imports what it needs when it runs.

Example:
    >>> main(["--version"])  # doctest: +SKIP
    lightning-saliency 0.1.0
    0
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lightning_saliency import __version__

__all__ = ["main", "build_parser", "show", "show_scorecard"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lightning-saliency`` command (subcommands gate, report, show)."""
    parser = argparse.ArgumentParser(
        prog="lightning-saliency",
        description="Audit reports of lightning-saliency: gate them in CI, render them to HTML, summarise them.",
    )
    parser.add_argument("--version", action="version", version=f"lightning-saliency {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{gate,report,show}")

    gate = sub.add_parser(
        "gate",
        help="check a report against thresholds; exit 0 pass, 1 fail, 2 cannot decide",
        description="Check one audit of a report against thresholds. Exit 0: every rule passed; 1: a rule failed "
        "(a null/NaN value fails) or the audit is unhealthy (non-finite logits or maps, mostly constant maps); "
        "2: missing/unreadable/unknown-schema report, no audits, absent key or epoch.",
    )
    gate.add_argument("report", metavar="REPORT", help="report.json, or a log dir holding saliency/report.json")
    gate.add_argument("--max", dest="max_rules", action="append", default=[], metavar="KEY=VALUE",
                      help="pass when KEY <= VALUE (repeatable), e.g. --max gradcam/spurious_mass=0.2")
    gate.add_argument("--min", dest="min_rules", action="append", default=[], metavar="KEY=VALUE",
                      help="pass when KEY >= VALUE (repeatable), e.g. --min gradcam/stability=0.8")
    gate.add_argument("--config", metavar="gate.toml",
                      help="TOML file with [max] / [min] tables of \"key\" = value and an optional epoch")
    gate.add_argument("--epoch", metavar="last|best|N",
                      help="which audit: last (default), best (passes the most rules; ties -> latest), or epoch N")
    from lightning_saliency.gate import STAGES  # torch- and NumPy-free

    gate.add_argument("--stage", choices=STAGES,
                      help="which stage's audits: fit (default, when the report has any), validate or test")
    gate.add_argument("--junit", metavar="FILE", help="also write JUnit XML, one test case per rule")
    gate.add_argument("--json", dest="as_json", action="store_true", help="print a JSON verdict instead of a table")
    gate.add_argument("--allow-unhealthy", action="store_true",
                      help="gate the rules alone: do not fail an audit whose health shows a problem")

    report = sub.add_parser(
        "report",
        help="render a self-contained offline HTML page",
        description="Render the audit report to one self-contained HTML file (no network: images inline, "
        "charts as inline SVG).",
    )
    report.add_argument("log_dir", metavar="LOG_DIR", help="the run's log dir (or its saliency/ or report.json)")
    report.add_argument("-o", "--output", default=None,
                        help="output HTML file (default: <log_dir>/saliency/audit.html)")
    report.add_argument("--max-images", type=int, default=16, metavar="N",
                        help="probe images shown per method and epoch (default 16)")
    report.add_argument("--max-epochs", type=int, default=50, metavar="N",
                        help="audited epochs whose overlays are embedded, evenly subsampled (default 50)")
    report.add_argument("--cmap", default="jet", help="matplotlib colormap for the maps (default jet)")

    show_p = sub.add_parser("show", help="print a short summary of the latest audit",
                            description="Print a short terminal summary of the latest audit.")
    show_p.add_argument("log_dir", metavar="LOG_DIR", help="the run's log dir (or its saliency/ or report.json)")
    show_p.add_argument("--scorecard", action="store_true",
                        help="print the method scorecard instead (SaliencyMonitor(scorecard=True)); exit 2 if none")
    return parser


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
        return "n/a"
    return f"{v:.4g}"


def show(report: str, out: Any = None) -> int:
    """Print a short summary of the latest audit of ``report``; return the exit code (2 when unreadable).

    Example:
        >>> show("/nonexistent")  # doctest: +SKIP
        2
    """
    from lightning_saliency.gate import _safe
    from lightning_saliency.health import health_line
    from lightning_saliency.report import ReportError, load_report, split_key

    out = out if out is not None else sys.stdout
    try:
        loaded = load_report(report)
    except ReportError as exc:
        print(f"lightning-saliency show: error: {_safe(exc)}", file=sys.stderr)
        return 2
    path, data = loaded.path, loaded.data
    run, probe, config = (data.get(k) if isinstance(data.get(k), dict) else {} for k in ("run", "probe", "config"))
    audits, alarms = data["audits"], data.get("alarms") or []
    lines = [f"report: {_safe(path)}"]
    model = run.get("model", "n/a")
    layer = config.get("layer", "n/a")
    lines.append(
        f"run: model {_safe(model)}, precision {_safe(run.get('precision', 'n/a'))}, "
        f"world size {_safe(run.get('world_size', 'n/a'))}; methods "
        f"{_safe(', '.join(map(str, config.get('methods') or [])) or 'n/a')}, "
        f"layer {'none (no method needs one)' if layer is None else _safe(layer)}"
    )
    groups = probe.get("groups")
    gtext = ""
    if isinstance(groups, dict) and groups:
        gtext = "; groups " + ", ".join(f"{_safe(g)} ({_safe(n)})" for g, n in list(groups.items())[:10])
    lines.append(f"probe: {_safe(probe.get('size', 'n/a'))} images{gtext}")
    if not audits:
        lines.append("no audits yet")
        print("\n".join(lines), file=out)
        return 0
    latest = audits[-1]
    lines.append(
        f"latest audit: epoch {_safe(latest.get('epoch'))}, step {_safe(latest.get('global_step'))} "
        f"(audit {len(audits)} of {len(audits)}, {_fmt(latest.get('duration_s'))} s), stage "
        f"{_safe(latest.get('stage') or 'fit')}"
    )
    lines.append(f"health: {_safe(health_line(latest.get('health')))}")
    stages = [str(a.get("stage") or "fit") for a in audits]
    if set(stages) != {"fit"}:
        lines.append("stages: " + ", ".join(f"{s} {stages.count(s)}" for s in ("fit", "validate", "test")
                                            if s in stages))
    # metric x method table of the latest audit; per-group keys are counted, not listed
    table: dict[str, dict[str, Any]] = {}
    methods: list[str] = []
    n_group = 0
    for key in sorted(latest["metrics"]):
        method, metric, group = split_key(key)
        if group is not None:
            n_group += 1
            continue
        table.setdefault(metric, {})[method] = latest["metrics"][key]
        if method not in methods:
            methods.append(method)
    if table:
        header = ["metric", *(m or "-" for m in methods)]
        rows = [[_safe(metric), *(_fmt(vals.get(m)) if m in vals else "-" for m in methods)]
                for metric, vals in table.items()]
        widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
        lines.append("")
        lines.append("  ".join(f"{_safe(h):<{widths[c]}}" if c == 0 else f"{_safe(h):>{widths[c]}}"
                               for c, h in enumerate(header)).rstrip())
        for r in rows:
            lines.append("  ".join(f"{v:<{widths[c]}}" if c == 0 else f"{v:>{widths[c]}}"
                                   for c, v in enumerate(r)).rstrip())
    else:
        lines.append("the latest audit recorded no metrics")
    if n_group:
        lines.append(f"(+ {n_group} per-group values: `lightning-saliency report` renders them as a table)")
    if isinstance(latest.get("discovery"), dict):  # suspected shortcuts (SaliencyMonitor(discover=True))
        from lightning_saliency.suspects import section_lines

        lines += ["", *(_safe(line) for line in section_lines(latest["discovery"]))]
    errors = latest.get("errors") or []
    lines.append("")
    if errors:
        lines.append(f"errors in the latest audit ({len(errors)}):")
        for err in errors[:10]:
            if isinstance(err, dict):
                lines.append(f"  [{_safe(err.get('method') or '-')}] {_safe(err.get('type'))}: "
                             f"{_safe(str(err.get('message'))[:300])}")
        if len(errors) > 10:
            lines.append(f"  ... and {len(errors) - 10} more")
    else:
        lines.append("errors: none in the latest audit")
    total_errors = sum(len(a.get("errors") or []) for a in audits)
    if total_errors > len(errors):
        lines.append(f"({total_errors} error(s) over all {len(audits)} audits)")
    if alarms:
        lines.append(f"alarm firings ({len(alarms)}):")
        for al in alarms[-10:]:
            if isinstance(al, dict):
                op = "<=" if al.get("mode") == "max" else ">="
                lines.append(
                    f"  epoch {_safe(al.get('epoch'))}: {_safe(al.get('name'))} {_safe(al.get('metric'))} = "
                    f"{_fmt(al.get('value'))} (allowed {op} {_fmt(al.get('threshold'))}) -> {_safe(al.get('action'))}"
                )
        if len(alarms) > 10:
            lines.append(f"  ... {len(alarms) - 10} earlier firings not shown")
    else:
        lines.append("alarms: none fired")
    print("\n".join(lines), file=out)
    return 0


def show_scorecard(report: str, out: Any = None) -> int:
    """Print the report's method scorecard as a table; return the exit code (2: unreadable, or no scorecard).

    Example:
        >>> show_scorecard("/nonexistent")  # doctest: +SKIP
        2
    """
    from lightning_saliency.gate import _safe
    from lightning_saliency.report import ReportError, load_report
    from lightning_saliency.scorecards import Scorecard

    try:
        loaded = load_report(report)
    except ReportError as exc:
        print(f"lightning-saliency show: error: {_safe(exc)}", file=sys.stderr)
        return 2
    if not loaded.data.get("scorecard"):
        print(f"lightning-saliency show: {_safe(loaded.path)} has no scorecard: train with "
              "SaliencyMonitor(scorecard=True), or call lightning_saliency.scorecard(model, probe)", file=sys.stderr)
        return 2
    text = Scorecard.from_dict(loaded.data["scorecard"]).to_text()
    lines = [f"report: {loaded.path}", *text.splitlines()]  # each line made safe (a newline is a control too)
    print("\n".join(_safe(line) for line in lines), file=out if out is not None else sys.stdout)
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lightning_saliency.gate import _safe
    from lightning_saliency.page import write_page
    from lightning_saliency.report import find_report

    try:
        out = args.output
        if out is None:
            out = find_report(args.log_dir).parent / "audit.html"
        path = write_page(args.log_dir, out, max_images=args.max_images, max_epochs=args.max_epochs,
                          cmap=args.cmap)
    except ValueError as exc:  # ReportError (a ValueError), bad --max-images, an unknown --cmap
        print(f"lightning-saliency report: error: {_safe(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"lightning-saliency report: cannot write {out}: {exc}", file=sys.stderr)
        return 2
    size = Path(path).stat().st_size
    print(f"wrote {path} ({size / 1e6:.2f} MB)")
    return 0


class _Reader:
    """``sys.stdout`` (or stderr) for a reader that may leave early (``lightning-saliency gate --json ... | head``).

    Once the pipe is closed, what is left to print is dropped: no ``BrokenPipeError`` traceback, and the command
    ends with its own exit code (a gate's verdict does not change because its reader stopped reading). The
    stream's file descriptor is pointed at ``os.devnull`` then, so the interpreter's final flush is quiet too.
    """

    def __init__(self, stream: Any) -> None:
        self.stream, self.closed_pipe = stream, False

    def _closed(self) -> None:
        import os

        self.closed_pipe = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # not a real file (tests' StringIO): nothing to redirect
            pass

    def write(self, text: str) -> int:
        if not self.closed_pipe:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self._closed()
        return len(text)

    def flush(self) -> None:
        if not self.closed_pipe:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._closed()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def main(argv: list[str] | None = None) -> int:
    """Run the command with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    A reader that closes the pipe early (``| head``) ends the output quietly; the exit code stays the command's
    own (for ``gate``, its verdict).

    Example:
        >>> main(["gate", "/nonexistent", "--max", "a=1"])  # doctest: +SKIP
        2
    """
    import contextlib

    out, err = _Reader(sys.stdout), _Reader(sys.stderr)  # stderr too: `... 2>&1 | head` shares the pipe
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):  # type: ignore[type-var]
        code = _main(argv)
        out.flush()  # a block-buffered pipe is written here: a reader gone by now is met here
        err.flush()
    return code


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if args.command == "gate":
        from lightning_saliency.gate import run_gate

        return run_gate(args.report, max_rules=args.max_rules, min_rules=args.min_rules, config=args.config,
                        epoch=args.epoch, junit=args.junit, as_json=args.as_json, stage=args.stage,
                        allow_unhealthy=args.allow_unhealthy)
    if args.command == "report":
        return _report(args)
    if args.command == "show":
        return show_scorecard(args.log_dir) if args.scorecard else show(args.log_dir)
    parser.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
