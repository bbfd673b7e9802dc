"""How a gate verdict is shown: the aligned terminal table, the JSON object and the JUnit XML.

Pure formatting of a :class:`~lightning_saliency.gate.GateResult` (or of the error that kept the gate from
deciding); :mod:`lightning_saliency.gate` decides. Never imports torch or NumPy.

Example:
    >>> from lightning_saliency.gate import GateResult
    >>> import json
    >>> json.loads(to_json(None, "no report"))["error"]
    'no report'
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .gate import GateResult

__all__ = ["format_table", "to_json", "to_junit"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _safe(text: Any) -> str:
    """Text for a terminal: control characters (ANSI escapes included) shown as escapes, not interpreted."""
    return _CONTROL.sub(lambda m: ascii(m.group())[1:-1], str(text))


def _fmt(v: float | None) -> str:
    if v is None:
        return "null"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v)) if abs(v) >= 1 or v == 0 else f"{v:g}"
    return f"{v:.6g}"


def format_table(result: GateResult) -> str:
    """The human verdict: a header line, an aligned rule/value/threshold/verdict table and a summary line."""
    head = (
        f"lightning-saliency gate: {_safe(result.report)}\n"
        f"audit: {result.selection} -> epoch {_safe(result.epoch)}, step {_safe(result.global_step)} "
        f"(audit {result.audit_index + 1} of {result.n_audits}, stage {_safe(result.stage)})"
    )
    rows = [("rule", "value", "threshold", "verdict")]
    for r in result.results:
        rows.append(
            (_safe(r.rule.key), _fmt(r.value), f"{r.rule.op} {_fmt(r.rule.threshold)}", "PASS" if r.passed else "FAIL")
        )
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    lines = []
    for j, row in enumerate(rows):
        lines.append(
            f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}".rstrip()
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    failed = [r for r in result.results if not r.passed]
    if not result.health_passed:
        summary = f"FAIL: the audit is unhealthy: {_safe('; '.join(result.problems))}" + (
            f"; and {len(failed)} of {len(result.results)} rule(s) failed" if failed else "")
    elif failed:
        summary = f"FAIL: {len(failed)} of {len(result.results)} rule(s) failed: " + "; ".join(
            _safe(r.message) for r in failed
        )
    else:
        summary = f"PASS: all {len(result.results)} rule(s) passed"
    return "\n".join([head, "", *lines, "", _safe(result.health_message), "", summary])


def to_json(result: GateResult | None = None, error: str | None = None) -> str:
    """Machine-readable verdict (strict JSON: null for NaN). ``error`` set: the undecidable case (exit 2).

    Example:
        >>> import json
        >>> json.loads(to_json(error="no audits"))["exit_code"]
        2
    """
    from .gate import EXIT_ERROR

    if result is None:
        obj: dict[str, Any] = {"passed": False, "exit_code": EXIT_ERROR, "error": error, "rules": []}
    else:
        obj = {
            "passed": result.passed,
            "exit_code": result.exit_code,
            "report": result.report,
            "selection": result.selection,
            "stage": result.stage,
            "audit_index": result.audit_index,
            "n_audits": result.n_audits,
            "epoch": result.epoch,
            "global_step": result.global_step,
            "healthy": not result.problems,
            "health": result.health,
            "health_problems": result.problems,
            "allow_unhealthy": result.allow_unhealthy,
            "rules": [
                {
                    "key": r.rule.key,
                    "mode": r.rule.mode,
                    "op": r.rule.op,
                    "threshold": r.rule.threshold,
                    "value": r.value,
                    "passed": r.passed,
                    "message": r.message,
                }
                for r in result.results
            ],
        }
    return json.dumps(obj, indent=2, allow_nan=False, default=str)


_XML_INVALID = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml(text: Any) -> str:
    """Text safe for XML 1.0 (characters XML cannot hold are replaced by U+FFFD)."""
    return _XML_INVALID.sub("\ufffd", str(text))


def to_junit(result: GateResult | None = None, error: str | None = None) -> bytes:
    """JUnit XML: one ``<testcase>`` per rule (``<failure>`` when it failed) and one named ``health``
    (``<failure>`` when the audit is unhealthy and that is not allowed), or one ``<error>`` case.

    Example:
        >>> import xml.etree.ElementTree as ET
        >>> ET.fromstring(to_junit(error="missing report")).get("errors")
        '1'
    """
    suites = ET.Element("testsuites", name="lightning-saliency gate")
    suite = ET.SubElement(suites, "testsuite", name="lightning-saliency gate")
    cases = failures = errors = 0
    if result is None:
        cases, errors = 1, 1
        case = ET.SubElement(suite, "testcase", classname="lightning_saliency.gate", name="gate")
        ET.SubElement(case, "error", message=_xml(error), type="GateError").text = _xml(error)
    else:
        props = ET.SubElement(suite, "properties")
        for name, value in (
            ("report", result.report),
            ("selection", result.selection),
            ("stage", result.stage),
            ("epoch", result.epoch),
            ("global_step", result.global_step),
        ):
            ET.SubElement(props, "property", name=name, value=_xml(value))
        for r in result.results:
            cases += 1
            case = ET.SubElement(suite, "testcase", classname="lightning_saliency.gate", name=_xml(r.rule.label))
            if not r.passed:
                failures += 1
                ET.SubElement(case, "failure", message=_xml(r.message), type="ThresholdFailed").text = _xml(
                    r.message
                )
            ET.SubElement(case, "system-out").text = _xml(r.message)
        cases += 1
        case = ET.SubElement(suite, "testcase", classname="lightning_saliency.gate", name="health")
        if not result.health_passed:
            failures += 1
            ET.SubElement(case, "failure", message=_xml(result.health_message),
                          type="UnhealthyAudit").text = _xml(result.health_message)
        ET.SubElement(case, "system-out").text = _xml(result.health_message)
    for el in (suites, suite):
        el.set("tests", str(cases))
        el.set("failures", str(failures))
        el.set("errors", str(errors))
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True)
