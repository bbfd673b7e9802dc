"""The CI gate: verdicts, exit codes (0 pass, 1 fail, 2 undecidable), JUnit and JSON output, gate.toml."""

from __future__ import annotations

import io
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from lightning_saliency.gate import (
    EXIT_ERROR,
    EXIT_FAIL,
    EXIT_PASS,
    GateError,
    Rule,
    evaluate,
    load_config,
    parse_rule,
    run_gate,
    select_audit,
)
from tests.report_fixtures import make_report_data, make_run, write_report


def gate(report, *args: str, **kw) -> tuple[int, str, str]:
    """Run the gate like the CLI does; return (exit code, stdout, stderr)."""
    max_rules = [a.split(" ", 1)[1] for a in args if a.startswith("--max ")]
    min_rules = [a.split(" ", 1)[1] for a in args if a.startswith("--min ")]
    out, err = io.StringIO(), io.StringIO()
    code = run_gate(str(report), max_rules=max_rules, min_rules=min_rules, out=out, err=err, **kw)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    # 6 audits: gradcam/spurious_mass 0.10, 0.18, 0.26, 0.34, 0.42, 0.50; gradient null at epoch 2
    return make_run(tmp_path_factory.mktemp("gate"), n_epochs=6, with_maps=False)


def test_pass_exit_0_with_table(run_dir):
    code, out, err = gate(run_dir, "--max gradcam/spurious_mass=0.5", "--min gradcam/stability=0.8")
    assert code == EXIT_PASS, err
    lines = out.splitlines()
    assert "epoch 5" in lines[1] and "step 300" in lines[1]
    header = next(i for i, line in enumerate(lines) if line.startswith("rule"))
    assert lines[header].split() == ["rule", "value", "threshold", "verdict"]
    rows = [line.split() for line in lines[header + 2 : header + 4]]
    assert rows[0] == ["gradcam/spurious_mass", "0.5", "<=", "0.5", "PASS"]  # inclusive bound
    assert rows[1] == ["gradcam/stability", "0.85", ">=", "0.8", "PASS"]
    # columns aligned: the verdicts start at the same offset on every row
    assert len({lines[i].index(w) for i, w in ((header, "verdict"), (header + 2, "PASS"), (header + 3, "PASS"))}) == 1
    assert lines[-1] == "PASS: all 2 rule(s) passed"
    assert err == ""


def test_fail_exit_1_names_the_rule(run_dir):
    code, out, _ = gate(run_dir, "--max gradcam/spurious_mass=0.2", "--min gradcam/stability=0.8")
    assert code == EXIT_FAIL
    fail_row = next(line for line in out.splitlines() if line.startswith("gradcam/spurious_mass"))
    assert fail_row.split()[-1] == "FAIL"
    assert "FAIL: 1 of 2" in out and "0.5 violates <= 0.2" in out


def test_min_rule_fails_below_threshold(run_dir):
    assert gate(run_dir, "--min gradcam/stability=0.86")[0] == EXIT_FAIL
    assert gate(run_dir, "--min gradcam/stability=0.85")[0] == EXIT_PASS


def test_null_value_fails_its_rule(run_dir):
    # epoch 2: the gradient method errored, its metrics are null; a null can never pass, even a loose bound
    code, out, _ = gate(run_dir, "--max gradient/spurious_mass=1000", epoch="2")
    assert code == EXIT_FAIL
    assert "null" in out


def test_nan_in_raw_json_fails(tmp_path):
    # a hand-edited report with a NaN token (json.loads accepts it): the rule fails, it does not pass silently
    data = make_report_data(2)
    text = json.dumps(data).replace('"gradcam/spurious_mass": 0.5', '"gradcam/spurious_mass": NaN')
    assert "NaN" in text
    write_report(tmp_path / "saliency", text)
    code, out, _ = gate(tmp_path, "--max gradcam/spurious_mass=1")
    assert code == EXIT_FAIL and "null" in out


# ----------------------------------------------------------------------------------------------- exit 2


def test_missing_file_exit_2(tmp_path):
    code, out, err = gate(tmp_path / "nope" / "report.json", "--max gradcam/spurious_mass=0.2")
    assert code == EXIT_ERROR
    assert "not found" in err and out == ""


def test_log_dir_without_report_lists_candidates(tmp_path):
    make_run(tmp_path / "runs", with_maps=False)
    code, _, err = gate(tmp_path, "--max gradcam/spurious_mass=0.2")
    assert code == EXIT_ERROR
    assert "version_0/saliency/report.json" in err  # it points at the report it found deeper down


def test_truncated_json_exit_2(tmp_path):
    text = json.dumps(make_report_data(3))
    write_report(tmp_path / "saliency", text[: len(text) // 2])
    code, _, err = gate(tmp_path, "--max gradcam/spurious_mass=0.2")
    assert code == EXIT_ERROR
    assert "truncated" in err or "not valid JSON" in err


def test_empty_file_exit_2(tmp_path):
    write_report(tmp_path / "saliency", b"")
    assert gate(tmp_path, "--max gradcam/spurious_mass=0.2")[0] == EXIT_ERROR


def test_wrong_schema_exit_2(tmp_path):
    data = make_report_data(2)
    data["schema"] = "someone-else/report/v9"
    write_report(tmp_path / "saliency", data)
    code, _, err = gate(tmp_path, "--max gradcam/spurious_mass=0.2")
    assert code == EXIT_ERROR
    assert "schema" in err and "someone-else/report/v9" in err


def test_no_schema_exit_2(tmp_path):
    write_report(tmp_path / "saliency", {"audits": []})
    assert gate(tmp_path, "--max gradcam/spurious_mass=0.2")[0] == EXIT_ERROR


def test_unknown_key_exit_2_lists_keys_and_closest(run_dir):
    code, out, err = gate(run_dir, "--max gradcam/spurious_mas=0.2")
    assert code == EXIT_ERROR
    assert "closest match: 'gradcam/spurious_mass'" in err
    assert "available keys:" in err and "gradient/stability" in err and "gradcam/object_mass" in err
    assert out == ""


def test_no_audits_exit_2(tmp_path):
    data = make_report_data(1)
    data["audits"] = []
    write_report(tmp_path / "saliency", data)
    code, _, err = gate(tmp_path, "--max gradcam/spurious_mass=0.2")
    assert code == EXIT_ERROR and "no audits" in err


def test_absent_epoch_exit_2(run_dir):
    code, _, err = gate(run_dir, "--max gradcam/spurious_mass=0.2", epoch="17")
    assert code == EXIT_ERROR and "no audit at epoch 17" in err and "0, 1, 2, 3, 4, 5" in err


def test_no_rules_and_bad_rules_exit_2(run_dir):
    assert gate(run_dir)[0] == EXIT_ERROR
    assert gate(run_dir, "--max gradcam/spurious_mass")[0] == EXIT_ERROR
    assert gate(run_dir, "--max gradcam/spurious_mass=abc")[0] == EXIT_ERROR
    assert gate(run_dir, "--max gradcam/spurious_mass=nan")[0] == EXIT_ERROR
    assert gate(run_dir, "--max gradcam/spurious_mass=0.2", epoch="newest")[0] == EXIT_ERROR


# ----------------------------------------------------------------------------------------------- --epoch


def test_epoch_selection(run_dir):
    assert gate(run_dir, "--max gradcam/spurious_mass=0.2", epoch="1")[0] == EXIT_PASS
    assert gate(run_dir, "--max gradcam/spurious_mass=0.2", epoch="last")[0] == EXIT_FAIL
    code, out, _ = gate(run_dir, "--max gradcam/spurious_mass=0.2", epoch="best")
    # epochs 0 and 1 pass; ties go to the latest one
    assert code == EXIT_PASS and "best -> epoch 1" in out


def test_best_counts_rules_and_prefers_latest():
    audits = [
        {"epoch": 0, "global_step": 1, "metrics": {"a": 0.1, "b": 0.1}},   # passes a, fails b
        {"epoch": 1, "global_step": 2, "metrics": {"a": 0.1, "b": 0.9}},   # passes both
        {"epoch": 2, "global_step": 3, "metrics": {"a": 0.1, "b": 0.95}},  # passes both: latest wins the tie
        {"epoch": 3, "global_step": 4, "metrics": {"a": None, "b": 0.99}},  # null fails a
    ]
    rules = [Rule("a", "max", 0.5), Rule("b", "min", 0.5)]
    assert select_audit(audits, "best", rules) == (2, "best")
    assert select_audit(audits, None, rules) == (3, "last")
    with pytest.raises(GateError, match="closest match: 'b'"):
        select_audit(audits, "best", [Rule("bb", "min", 0.5)])


def test_evaluate_reports_values():
    data = {"audits": [{"epoch": 4, "global_step": 9, "metrics": {"g/m": 0.3, "g/n": float("nan")}}]}
    result = evaluate(data, [Rule("g/m", "max", 0.25), Rule("g/n", "min", 0.0)])
    assert [r.passed for r in result.results] == [False, False]
    assert result.results[0].value == 0.3 and result.results[1].value is None
    assert result.exit_code == EXIT_FAIL and result.epoch == 4


def test_parse_rule_splits_at_last_equals():
    assert parse_rule("gradcam/spurious_mass/site=a=0.25", "max") == Rule("gradcam/spurious_mass/site=a", "max", 0.25)
    assert parse_rule(" gradcam/stability = 0.8 ", "min") == Rule("gradcam/stability", "min", 0.8)


# ----------------------------------------------------------------------------------------------- outputs


def test_json_output_parsed_back(run_dir):
    code, out, _ = gate(run_dir, "--max gradcam/spurious_mass=0.2", "--min gradcam/stability=0.8", as_json=True)
    assert code == EXIT_FAIL
    obj = json.loads(out)
    assert obj["passed"] is False and obj["exit_code"] == 1 and obj["epoch"] == 5 and obj["global_step"] == 300
    assert obj["selection"] == "last" and obj["n_audits"] == 6
    by_key = {r["key"]: r for r in obj["rules"]}
    assert by_key["gradcam/spurious_mass"] == {**by_key["gradcam/spurious_mass"], "mode": "max", "threshold": 0.2,
                                                "value": 0.5, "passed": False}
    assert by_key["gradcam/stability"]["passed"] is True and by_key["gradcam/stability"]["value"] == 0.85


def test_json_output_null_and_error(run_dir, tmp_path):
    code, out, _ = gate(run_dir, "--max gradient/stability=1", epoch="2", as_json=True)
    assert code == EXIT_FAIL and json.loads(out)["rules"][0]["value"] is None  # strict JSON, no NaN token
    code, out, err = gate(tmp_path / "missing.json", "--max a=1", as_json=True)
    obj = json.loads(out)
    assert code == EXIT_ERROR and obj["exit_code"] == 2 and "not found" in obj["error"] and "not found" in err


def test_junit_parsed_back(run_dir, tmp_path):
    xml_path = tmp_path / "reports" / "gate.xml"
    code, _, _ = gate(run_dir, "--max gradcam/spurious_mass=0.2", "--min gradcam/stability=0.8",
                      "--max gradient/spurious_mass=0.9", junit=str(xml_path))
    assert code == EXIT_FAIL
    root = ET.parse(xml_path).getroot()
    assert root.tag == "testsuites"
    suite = root.find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("4", "1", "0")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [
        "gradcam/spurious_mass <= 0.2", "gradient/spurious_mass <= 0.9", "gradcam/stability >= 0.8", "health"]
    failure = cases[0].find("failure")
    assert failure is not None and "0.5 violates <= 0.2" in failure.get("message")
    assert all(c.find("failure") is None for c in cases[1:])  # health: no health recorded, nothing to fail
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["epoch"] == "5" and props["selection"] == "last"


def test_junit_error_case_and_hostile_key(tmp_path):
    xml_path = tmp_path / "gate.xml"
    code, _, _ = gate(tmp_path / "missing.json", "--max a=1", junit=str(xml_path))
    assert code == EXIT_ERROR
    suite = ET.parse(xml_path).getroot().find("testsuite")
    assert suite.get("errors") == "1" and suite.find("testcase/error") is not None
    # keys with markup and control characters still give well-formed XML
    data = make_report_data(1)
    bad = '<b>"x"</b>&\x00\x1b[31m'
    data["audits"][0]["metrics"][bad] = 0.1
    write_report(tmp_path / "saliency", data)
    code, out, _ = gate(tmp_path, f"--max {bad}=0.05", junit=str(xml_path))
    assert code == EXIT_FAIL
    case = ET.parse(xml_path).getroot().find("testsuite/testcase")
    assert case.get("name").startswith('<b>"x"</b>&')
    assert "\x1b" not in out  # terminal escapes are shown, not interpreted


# ----------------------------------------------------------------------------------------------- gate.toml


def test_config_file(run_dir, tmp_path):
    cfg = tmp_path / "gate.toml"
    cfg.write_text(
        '# gate for model promotion\nepoch = "best"\n\n[max]\n"gradcam/spurious_mass" = 0.2\n'
        '"gradcam/attention_disparity" = 0.1\n\n[min]\n"gradcam/stability" = 0.9\n'
    )
    rules, epoch = load_config(cfg)
    assert epoch == "best"
    assert rules == [Rule("gradcam/spurious_mass", "max", 0.2), Rule("gradcam/attention_disparity", "max", 0.1),
                     Rule("gradcam/stability", "min", 0.9)]
    code, out, _ = gate(run_dir, config=str(cfg))
    assert code == EXIT_PASS and "best -> epoch 1" in out  # epochs 0 and 1 pass all three; latest wins
    # a command-line rule adds to the file's rules; a command-line --epoch overrides the file's epoch
    code, out, _ = gate(run_dir, "--min gradcam/pointing_game=0.85", config=str(cfg))
    assert code == EXIT_PASS and "best -> epoch 0" in out
    assert gate(run_dir, config=str(cfg), epoch="last")[0] == EXIT_FAIL


def test_config_file_integer_epoch(run_dir, tmp_path):
    cfg = tmp_path / "gate.toml"
    cfg.write_text('epoch = 3\n[max]\n"gradcam/spurious_mass" = 0.35\n')
    code, out, _ = gate(run_dir, config=str(cfg))
    assert code == EXIT_PASS and "epoch 3" in out


@pytest.mark.parametrize(
    "text, match",
    [
        ('[max]\n"gradcam/spurious_mass" = "low"\n', "must be a number"),
        ("[max]\ngradcam.spurious_mass = 0.2\n", "quote metric keys"),
        ('[maximum]\n"a" = 1\n', "did you mean 'max'"),
        ('[max\n"a" = 1\n', "not valid TOML"),
        ('epoch = 1.5\n[max]\n"a" = 1\n', "epoch must be"),
    ],
)
def test_bad_config_exit_2(run_dir, tmp_path, text, match):
    cfg = tmp_path / "gate.toml"
    cfg.write_text(text)
    code, _, err = gate(run_dir, config=str(cfg))
    assert code == EXIT_ERROR
    assert match in err


def test_missing_config_exit_2(run_dir, tmp_path):
    code, _, err = gate(run_dir, config=str(tmp_path / "nope.toml"))
    assert code == EXIT_ERROR and "not found" in err


def test_rule_rejects_non_finite_threshold():
    with pytest.raises(GateError):
        Rule("a", "max", math.inf)
    with pytest.raises(GateError):
        Rule("a", "between", 1.0)
