"""The CI gate: check an audit report against thresholds and return a verdict (exit 0, 1 or 2).

``lightning-saliency gate REPORT --max KEY=VALUE --min KEY=VALUE`` reads ``report.json`` (or a folder holding it,
found by :func:`lightning_saliency.report.find_report`), picks one audit, and checks each rule against that
audit's metrics:

* ``--max KEY=VALUE`` passes when ``value <= VALUE``; ``--min KEY=VALUE`` passes when ``value >= VALUE``
  (both inclusive). A metric recorded as ``null`` (the report's spelling of NaN/inf) fails its rule.
* Health: an audit whose ``health`` (:mod:`lightning_saliency.health`) shows non-finite logits or maps, or
  constant maps for most of a method's images, fails whatever the rules say (its metrics are null, and a rule's
  key it lacks fails rather than stopping the gate); the table, the JSON and the JUnit ``health`` test case name
  the problem. ``--allow-unhealthy`` gates the rules alone. Reports without ``health`` (older ones) count as
  healthy.
* Exit codes: ``0`` every rule passed; ``1`` at least one rule failed, or the audit is unhealthy; ``2`` the gate
  could not decide: the report is missing, unreadable, truncated, of an unknown schema, holds no audits, the
  requested epoch is not there, a rule's key is absent from the chosen audit (the message lists the available
  keys and the closest match; for a metric needing masks or groups the report's probe did not have, it says
  that instead), or the rules themselves are malformed.

Which audit (``--stage`` and ``--epoch``, or ``stage`` and ``epoch`` in the config file): among the audits of
the stage (``fit``, ``validate`` or ``test``; default: the fit audits, or every audit when the report has no
fit audit, e.g. only a test),

* ``last`` (default): the last one (the latest epoch, then the most recent);
* ``N``: the last one whose ``epoch`` is ``N`` (the last trained epoch of the weights audited);
* ``best``: the one that passes the most rules; a rule whose key is absent from an audit, or whose value is
  null, counts as not passed; healthy audits come before unhealthy ones (unless ``--allow-unhealthy``); ties
  go to the latest audit. Use it to gate a checkpoint selected on the audit, not the final weights.

Config file (``--config gate.toml``), read with :mod:`tomllib` (``tomli`` on Python 3.10)::

    # gate.toml: rules for `lightning-saliency gate REPORT --config gate.toml`
    epoch = "last"            # optional: "last" (default), "best" or an epoch number
    stage = "fit"             # optional: "fit" (default, when the report has fit audits), "validate", "test"

    [max]                     # value <= threshold
    "gradcam/spurious_mass" = 0.2
    "gradcam/attention_disparity" = 0.1

    [min]                     # value >= threshold
    "gradcam/stability" = 0.8

Keys contain ``/`` so they are quoted. Rules from the command line are added to the file's rules; a
command-line ``--epoch`` and ``--stage`` override the file's. Unknown top-level entries are an error (exit 2).

Outputs: a plain aligned table (rule, value, threshold, verdict) and the audit's health on stdout; ``--json``
prints one JSON object instead; ``--junit FILE`` writes JUnit XML with one test case per rule and one named
``health`` (a failing rule or an unhealthy audit is a ``<failure>``, an undecidable gate a single ``<error>``)
so CI systems show each rule as a test.

Example:
    >>> from lightning_saliency.gate import Rule, parse_rule
    >>> parse_rule("gradcam/spurious_mass=0.2", "max")
    Rule(key='gradcam/spurious_mass', mode='max', threshold=0.2)
    >>> Rule("gradcam/stability", "min", 0.8).check(0.85)
    True
"""

from __future__ import annotations

import difflib
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .gate_output import _fmt, _safe, format_table, to_json, to_junit  # the verdict shown (re-exported)
from .health import health_line, problems

__all__ = [
    "EXIT_PASS",
    "EXIT_FAIL",
    "EXIT_ERROR",
    "GateError",
    "Rule",
    "RuleResult",
    "GateResult",
    "parse_rule",
    "load_config",
    "load_selection",
    "select_audit",
    "evaluate",
    "format_table",
    "to_json",
    "to_junit",
    "run_gate",
]

EXIT_PASS = 0
EXIT_FAIL = 1
EXIT_ERROR = 2

_CONFIG_KEYS = ("epoch", "stage", "max", "min")
STAGES = ("fit", "validate", "test")  # the report's stages (report.STAGES; not imported: gate stays light)


class GateError(Exception):
    """The gate cannot decide (exit code 2): unknown key, missing epoch, malformed rule or config.

    A report that is missing or unreadable raises :class:`lightning_saliency.report.ReportError` instead (also
    exit code 2 in :func:`run_gate`), the same error the page and ``show`` raise.
    """


@dataclass(frozen=True)
class Rule:
    """One threshold: ``mode="max"`` passes when ``value <= threshold``, ``"min"`` when ``value >= threshold``.

    Example:
        >>> Rule("gradcam/spurious_mass", "max", 0.2).check(0.3)
        False
    """

    key: str
    mode: str
    threshold: float

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise GateError(f"rule mode must be 'max' or 'min', got {self.mode!r}")
        if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool):
            raise GateError(f"threshold for {self.key!r} must be a number, got {self.threshold!r}")
        if not math.isfinite(self.threshold):
            raise GateError(f"threshold for {self.key!r} must be finite, got {self.threshold!r}")

    @property
    def op(self) -> str:
        return "<=" if self.mode == "max" else ">="

    @property
    def label(self) -> str:
        return f"{self.key} {self.op} {_fmt(self.threshold)}"

    def check(self, value: float | None) -> bool:
        """True when ``value`` satisfies the rule; ``None`` or a non-finite value never does."""
        if value is None or not math.isfinite(value):
            return False
        return value <= self.threshold if self.mode == "max" else value >= self.threshold


@dataclass
class RuleResult:
    """A rule, the value it saw in the chosen audit (``None`` when null/NaN) and whether it passed."""

    rule: Rule
    value: float | None
    passed: bool

    @property
    def message(self) -> str:
        if self.passed:
            return f"{self.rule.key} = {_fmt(self.value)} (threshold {self.rule.op} {_fmt(self.rule.threshold)})"
        if self.value is None:
            return f"{self.rule.key} is null (NaN or not computed in this audit); rule {self.rule.label} fails"
        return f"{self.rule.key} = {_fmt(self.value)} violates {self.rule.op} {_fmt(self.rule.threshold)}"


@dataclass
class GateResult:
    """The verdict for one audit: per-rule results, the audit's health, and where they came from."""

    report: str
    selection: str
    audit_index: int
    n_audits: int
    epoch: Any
    global_step: Any
    results: list[RuleResult] = field(default_factory=list)
    health: dict | None = None  # the audit's record, None when it has none (older reports)
    allow_unhealthy: bool = False
    stage: str = "fit"

    @property
    def problems(self) -> list[str]:
        """What makes the audit unhealthy (empty when healthy or not recorded)."""
        return problems(self.health)

    @property
    def health_passed(self) -> bool:
        return self.allow_unhealthy or not self.problems

    @property
    def health_message(self) -> str:
        allowed = " (allowed by --allow-unhealthy)" if self.problems and self.allow_unhealthy else ""
        return f"health: {health_line(self.health)}{allowed}"

    @property
    def passed(self) -> bool:
        return self.health_passed and all(r.passed for r in self.results)

    @property
    def exit_code(self) -> int:
        return EXIT_PASS if self.passed else EXIT_FAIL


# ----------------------------------------------------------------------------------------------- parsing


def parse_rule(text: str, mode: str) -> Rule:
    """Parse ``KEY=VALUE`` (split at the last ``=``) into a :class:`Rule`.

    Example:
        >>> parse_rule("gradient/stability=0.75", "min").threshold
        0.75
    """
    key, sep, value = text.rpartition("=")
    key = key.strip()
    if not sep or not key:
        raise GateError(f"--{mode} expects KEY=VALUE (e.g. --{mode} gradcam/spurious_mass=0.2), got {text!r}")
    try:
        threshold = float(value)
    except ValueError:
        raise GateError(f"--{mode} {text!r}: {value!r} is not a number") from None
    return Rule(key, mode, threshold)


def _load_toml(path: Path) -> dict:
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10 only
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise GateError(
                f"reading {path} needs tomllib (Python 3.11+) or the 'tomli' package on Python 3.10: "
                "`pip install tomli`, or pass the rules as --max/--min"
            ) from None
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise GateError(f"gate config {path} not found") from None
    except OSError as exc:
        raise GateError(f"cannot read gate config {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise GateError(f"gate config {path} is not valid TOML: {exc}") from None


def load_config(path: str | os.PathLike) -> tuple[list[Rule], str | None]:
    """Read a ``gate.toml`` (format in the module docstring) into rules and the optional ``epoch`` selector
    (the optional ``stage``: :func:`load_selection`).

    ``epoch`` written after a table header is an error that says to move it up: TOML reads every key after
    ``[max]`` as part of that table, so it would otherwise be taken for a metric named "epoch".

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "gate.toml"
        >>> _ = p.write_text('[max]\\n"gradcam/spurious_mass" = 0.2\\n')
        >>> load_config(p)
        ([Rule(key='gradcam/spurious_mass', mode='max', threshold=0.2)], None)
    """
    return load_selection(path)[:2]


def load_selection(path: str | os.PathLike) -> tuple[list[Rule], str | None, str | None]:
    """:func:`load_config` and the optional ``stage`` selector: ``(rules, epoch, stage)``."""
    path = Path(path)
    data = _load_toml(path)
    for name in data:
        if name not in _CONFIG_KEYS:
            hint = _closest(name, _CONFIG_KEYS)
            raise GateError(
                f"gate config {path}: unknown entry {name!r}; allowed: {', '.join(_CONFIG_KEYS)}"
                + (f" (did you mean {hint!r}?)" if hint else "")
                + ". Metric keys go inside the [max] or [min] table, quoted: \"gradcam/spurious_mass\" = 0.2"
            )
    rules: list[Rule] = []
    for mode in ("max", "min"):
        table = data.get(mode, {})
        if not isinstance(table, dict):
            raise GateError(f"gate config {path}: [{mode}] must be a table of \"key\" = number entries")
        for key, value in table.items():
            if key in _CONFIG_KEYS:  # TOML puts every key after a [table] header into that table
                raise GateError(
                    f"gate config {path}: {key!r} under [{mode}] is not a metric key; top-level settings "
                    f"({', '.join(k for k in _CONFIG_KEYS if k not in ('max', 'min'))}) must come before the "
                    "first [table]: TOML reads every key after a [table] header as part of that table"
                )
            if isinstance(value, dict):
                raise GateError(
                    f"gate config {path}: [{mode}] entry {key!r} is a table; quote metric keys that contain "
                    f"'/' or '.', e.g. \"{key}/...\" = 0.2"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise GateError(f"gate config {path}: [{mode}] {key!r} must be a number, got {value!r}")
            rules.append(Rule(str(key), mode, float(value)))
    epoch = data.get("epoch")
    if epoch is not None:
        if isinstance(epoch, bool) or not isinstance(epoch, (int, str)):
            raise GateError(f"gate config {path}: epoch must be \"last\", \"best\" or an integer, got {epoch!r}")
        epoch = str(epoch)
    stage = data.get("stage")
    if stage is not None and stage not in STAGES:
        raise GateError(f"gate config {path}: stage must be one of {', '.join(map(repr, STAGES))}, got {stage!r}")
    return rules, epoch, stage


# ----------------------------------------------------------------------------------------------- reading


def _value(x: Any) -> float | None:
    """A metric value as a finite float, or None for null/NaN/inf/non-numbers."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def _closest(key: str, candidates: Any) -> str | None:
    matches = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


def _missing_key_message(key: str, audit: dict, audits: list[dict], where: str) -> str:
    available = sorted(audit["metrics"])
    hint = _closest(key, available)
    msg = f"metric {key!r} is not in {where}"
    elsewhere = [a.get("epoch") for a in audits if key in a["metrics"]]
    if elsewhere:
        shown = ", ".join(str(e) for e in elsewhere[-5:])
        msg += f" (it is recorded at epoch(s) {shown}; choose one with --epoch)"
    from .metrics.registry import missing_key_hint  # torch-free: the registry's name-level facts

    why = "" if elsewhere else missing_key_hint(key, available)
    msg += f"; {why}" if why else ""
    if hint:
        msg += f"; closest match: {hint!r}"
    if available:
        shown = available[:60]
        more = f" ... and {len(available) - 60} more" if len(available) > 60 else ""
        msg += "; available keys: " + ", ".join(shown) + more
    else:
        msg += "; that audit recorded no metrics (see its errors with `lightning-saliency show`)"
    return msg


def _stage(audit: dict) -> str:
    return str(audit.get("stage") or "fit")


def select_audit(audits: list[dict], epoch: str | int | None, rules: list[Rule], stage: str | None = None,
                 allow_unhealthy: bool = False) -> tuple[int, str]:
    """Index of the audit to gate and a description of the choice (``last``, ``best``, ``epoch N``), among
    the audits of ``stage`` (default: the fit audits, or all of them when there is none); ``best`` puts
    healthy audits first unless ``allow_unhealthy``.

    Example:
        >>> audits = [{"epoch": 0, "metrics": {}}, {"epoch": 1, "metrics": {}},
        ...           {"stage": "test", "epoch": 1, "metrics": {}}]
        >>> select_audit(audits, "0", []), select_audit(audits, None, []), select_audit(audits, None, [], "test")
        ((0, 'epoch 0'), (1, 'last'), (2, 'last'))
    """
    if not audits:
        raise GateError("the report holds no audits yet: did training reach the first audit epoch?")
    if stage is not None and stage not in STAGES:
        raise GateError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")
    stages = {_stage(a) for a in audits}
    wanted_stage = stage or ("fit" if "fit" in stages else None)
    pool = [i for i, a in enumerate(audits) if wanted_stage in (None, _stage(a))]
    if not pool:
        raise GateError(f"the report holds no {stage} audit (its stages: {', '.join(sorted(stages))})")
    all_audits, audits = audits, [audits[i] for i in pool]
    sel = "last" if epoch is None else str(epoch).strip().lower()
    if sel == "last":
        return pool[-1], "last"
    if sel == "best":
        for rule in rules:
            if not any(rule.key in a["metrics"] for a in audits):
                raise GateError(_missing_key_message(rule.key, audits[-1], audits, "any audit"))
        best_i, best_score = 0, (False, -1)
        for i, audit in enumerate(audits):
            score = (allow_unhealthy or not problems(audit.get("health")),
                     sum(rule.check(_value(audit["metrics"].get(rule.key))) for rule in rules))
            if score >= best_score:  # ties -> latest
                best_i, best_score = i, score
        return pool[best_i], "best"
    try:
        wanted = int(sel)
    except ValueError:
        raise GateError(f"--epoch must be 'last', 'best' or an integer, got {epoch!r}") from None
    for i in range(len(audits) - 1, -1, -1):
        e = audits[i].get("epoch")
        if isinstance(e, int) and not isinstance(e, bool) and e == wanted:
            return pool[i], f"epoch {wanted}"
    epochs = [a.get("epoch") for a in audits]
    shown = ", ".join(str(e) for e in epochs[:30]) + (" ..." if len(epochs) > 30 else "")
    raise GateError(f"no audit at epoch {wanted} (stage {_stage(audits[0])}); audited epochs: {shown}"
                    + ("; other stages: choose one with --stage" if len(audits) < len(all_audits) else ""))


def evaluate(data: dict, rules: list[Rule], epoch: str | int | None = None, report: str = "",
             stage: str | None = None, allow_unhealthy: bool = False) -> GateResult:
    """Check ``rules`` and the health against the chosen audit of report ``data``; :class:`GateError` when
    undecidable. An unhealthy audit fails (unless ``allow_unhealthy``), and a rule's key it lacks fails with it.

    Example:
        >>> data = {"audits": [{"epoch": 2, "global_step": 20, "metrics": {"gradcam/spurious_mass": 0.1}}]}
        >>> evaluate(data, [Rule("gradcam/spurious_mass", "max", 0.2)]).passed
        True
    """
    if not rules:
        raise GateError("no rules: pass --max KEY=VALUE / --min KEY=VALUE or --config gate.toml")
    for rule in rules:  # a need the report's probe did not meet: said, rather than the closest other key suggested
        if not any(rule.key in a["metrics"] for a in data.get("audits") or []):
            from .checks import report_probe_problem  # torch-free, imported only for a key in no audit

            if report_probe_problem(rule.key, data):
                raise GateError(report_probe_problem(rule.key, data))
    audits = data.get("audits") or []
    index, selection = select_audit(audits, epoch, rules, stage, allow_unhealthy)
    audit = audits[index]
    health = audit.get("health") if isinstance(audit.get("health"), dict) else None
    where = (f"the {selection} {_stage(audit)} audit (epoch {audit.get('epoch')}, audit {index + 1} of "
             f"{len(audits)})")
    results = []
    for rule in rules:
        if rule.key not in audit["metrics"] and (allow_unhealthy or not problems(health)):
            raise GateError(_missing_key_message(rule.key, audit, audits, where))
        value = _value(audit["metrics"].get(rule.key))
        results.append(RuleResult(rule, value, rule.check(value)))
    return GateResult(report, selection, index, len(audits), audit.get("epoch"), audit.get("global_step"), results,
                      health, allow_unhealthy, _stage(audit))


def run_gate(
    report: str | os.PathLike,
    max_rules: list[str] | None = None,
    min_rules: list[str] | None = None,
    config: str | os.PathLike | None = None,
    epoch: str | None = None,
    junit: str | None = None,
    as_json: bool = False,
    out: Any = None,
    err: Any = None,
    allow_unhealthy: bool = False,
    stage: str | None = None,
) -> int:
    """The ``gate`` command: evaluate, print the table (or JSON), write JUnit; return the exit code.
    ``allow_unhealthy`` gates the rules alone (``--allow-unhealthy``).

    Example:
        >>> run_gate("/nonexistent/report.json", max_rules=["a=1"], err=open(os.devnull, "w"))
        2
    """
    from .files import atomic_write
    from .report import ReportError, load_report  # imported here: `gate` never needs NumPy before a report

    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    result: GateResult | None = None
    error: str | None = None
    try:
        rules: list[Rule] = []
        if config is not None:
            file_rules, file_epoch, file_stage = load_selection(config)
            rules.extend(file_rules)
            epoch = epoch if epoch is not None else file_epoch
            stage = stage if stage is not None else file_stage
        rules.extend(parse_rule(t, "max") for t in max_rules or [])
        rules.extend(parse_rule(t, "min") for t in min_rules or [])
        if not rules:
            raise GateError("no rules: pass --max KEY=VALUE / --min KEY=VALUE or --config gate.toml")
        loaded = load_report(report)
        result = evaluate(loaded.data, rules, epoch, report=str(loaded.path), stage=stage,
                          allow_unhealthy=allow_unhealthy)
    except (GateError, ReportError) as exc:
        error = str(exc)
    code = result.exit_code if result is not None else EXIT_ERROR
    if junit:
        try:
            payload = to_junit(result, error)
            atomic_write(junit, lambda f: f.write(payload))
        except OSError as exc:
            print(f"lightning-saliency gate: cannot write JUnit file {junit}: {exc}", file=err)
            code = EXIT_ERROR
    if as_json:
        print(to_json(result, error), file=out)
    elif result is not None:
        print(format_table(result), file=out)
    if error is not None:
        print(f"lightning-saliency gate: error: {_safe(error)}", file=err)
    return code
