"""One home for reading a report: find_report, validate_report / load_report, ReportError, split_key; every
reader (gate, show, the page) goes through them; the writers of the gate's JUnit file and the page are atomic;
reading a report the way ``gate`` and ``show`` do never imports torch."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lightning_saliency import files
from lightning_saliency.cli import main
from lightning_saliency.gate import EXIT_ERROR, EXIT_FAIL, EXIT_PASS, GateError, run_gate
from lightning_saliency.page import write_page
from lightning_saliency.report import (
    SCHEMA,
    ReportError,
    find_report,
    load_report,
    split_key,
    validate_report,
)
from tests.report_fixtures import make_report_data, make_run, write_report


def _report(value: float, epoch: int = 0) -> dict:
    return {"schema": SCHEMA, "audits": [{"epoch": epoch, "global_step": 1, "metrics": {"g/m": value}}]}


# ----------------------------------------------------------------------------------------------- find_report


def test_find_report_order_own_report_first_then_saliency(tmp_path):
    both = tmp_path / "both"
    write_report(both, _report(0.1))  # both/report.json
    write_report(both / "saliency", _report(0.9))  # both/saliency/report.json
    assert find_report(both) == both / "report.json"
    assert find_report(both / "saliency") == both / "saliency" / "report.json"
    only_nested = tmp_path / "log_dir"
    write_report(only_nested / "saliency", _report(0.5))
    assert find_report(only_nested) == only_nested / "saliency" / "report.json"
    assert find_report(only_nested / "saliency" / "report.json") == only_nested / "saliency" / "report.json"
    # every reader takes the same file: the gate passes on both/report.json (0.1) and would fail on 0.9
    assert run_gate(both, max_rules=["g/m=0.5"], out=io.StringIO()) == EXIT_PASS
    assert run_gate(both / "saliency", max_rules=["g/m=0.5"], out=io.StringIO(),
                    err=io.StringIO()) == EXIT_FAIL
    assert load_report(both).latest()["metrics"]["g/m"] == 0.1


def test_find_report_looks_no_deeper_but_names_what_it_saw(tmp_path):
    make_run(tmp_path / "runs", n_epochs=2, with_maps=False)
    with pytest.raises(ReportError, match="no report.json in folder") as info:
        find_report(tmp_path)  # runs/lightning_logs/version_0/saliency/report.json is 4 levels down
    assert "version_0/saliency/report.json" in str(info.value)
    with pytest.raises(ReportError, match="not found"):
        find_report(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------- ReportError


def test_page_raises_report_error_on_a_bad_report(tmp_path, capsys):
    write_report(tmp_path / "saliency", '{"schema": "lightning-saliency/report/v1", "audits": [')
    with pytest.raises(ReportError, match="truncated"):
        write_page(tmp_path, tmp_path / "a.html")
    write_report(tmp_path / "saliency", {"schema": "other/v1"})
    with pytest.raises(ReportError, match="unknown schema"):
        write_page(tmp_path, tmp_path / "a.html")
    assert not isinstance(ReportError("x"), GateError) and issubclass(ReportError, ValueError)
    # and the three commands turn it into the same exit code 2
    for argv in (["report", str(tmp_path), "-o", str(tmp_path / "a.html")], ["show", str(tmp_path)],
                 ["gate", str(tmp_path), "--max", "g/m=1"]):
        assert main(argv) == EXIT_ERROR
        assert "unknown schema 'other/v1'" in capsys.readouterr().err
    assert not (tmp_path / "a.html").exists()


def test_validate_report_is_the_one_check(tmp_path):
    ok = _report(0.2)
    assert validate_report(ok) is ok
    for bad, pattern in [
        ([], "holds a JSON list"),
        ({"schema": SCHEMA, "audits": [{"epoch": "0", "metrics": {}}]}, r"audits\[0\] is malformed"),
        ({"schema": SCHEMA, "audits": [], "config": [1]}, "'config' must be an object"),
    ]:
        with pytest.raises(ReportError, match=pattern):
            validate_report(bad, "x.json")
        write_report(tmp_path / "saliency", json.dumps(bad))
        code = run_gate(tmp_path, max_rules=["g/m=1"], out=io.StringIO(), err=io.StringIO())
        assert code == EXIT_ERROR


# ----------------------------------------------------------------------------------------------- split_key


@pytest.mark.parametrize(
    "key, parts",
    [
        ("gradcam/spurious_mass", ("gradcam", "spurious_mass", None)),
        ("gradcam/spurious_mass/siteA", ("gradcam", "spurious_mass", "siteA")),
        ("gradcam/spurious_mass/site/A", ("gradcam", "spurious_mass", "site/A")),  # group names may hold '/'
        ("gradcam/spurious_mass/", ("gradcam", "spurious_mass", "")),
        ("accuracy", ("", "accuracy", None)),
    ],
)
def test_split_key(key, parts):
    assert split_key(key) == parts
    method, metric, group = parts
    rebuilt = metric if not method else f"{method}/{metric}" + ("" if group is None else f"/{group}")
    assert rebuilt == key


def test_group_with_slash_is_one_group_on_page_and_show(tmp_path, capsys):
    data = make_report_data(2, with_maps=False)
    data["audits"][-1]["metrics"]["gradcam/spurious_mass/site/A"] = 0.125
    write_report(tmp_path / "saliency", data)
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "a.html")]) == 0
    groups = (tmp_path / "a.html").read_text().split('<section id="groups">')[1].split("</section>")[0]
    assert "<th>site/A</th>" in groups and "<th>gradcam/spurious_mass</th>" in groups
    capsys.readouterr()
    n_group = sum(split_key(k)[2] is not None for k in data["audits"][-1]["metrics"])
    assert main(["show", str(tmp_path)]) == 0
    assert f"(+ {n_group} per-group values" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- atomic writers


def _failing_fsync(fd: int) -> None:
    raise OSError("disk full (test)")


def test_page_write_failure_leaves_old_page_and_no_temp_file(tmp_path, monkeypatch, capsys):
    log_dir = make_run(tmp_path, n_epochs=2, with_maps=False)
    out = tmp_path / "site" / "audit.html"
    out.parent.mkdir()
    out.write_text("old page")
    monkeypatch.setattr(files.os, "fsync", _failing_fsync)
    assert main(["report", str(log_dir), "-o", str(out)]) == EXIT_ERROR
    assert "disk full (test)" in capsys.readouterr().err
    assert out.read_text() == "old page" and os.listdir(out.parent) == ["audit.html"]
    monkeypatch.undo()
    assert main(["report", str(log_dir), "-o", str(out)]) == 0
    assert out.read_text().startswith("<!doctype html>") and os.listdir(out.parent) == ["audit.html"]


def test_junit_write_failure_leaves_old_file_and_no_temp_file(tmp_path, monkeypatch):
    log_dir = make_run(tmp_path, n_epochs=2, with_maps=False)
    junit = tmp_path / "ci" / "gate.xml"
    junit.parent.mkdir()
    junit.write_text("old")
    monkeypatch.setattr(files.os, "fsync", _failing_fsync)
    null = io.StringIO()
    assert run_gate(log_dir, max_rules=["gradcam/spurious_mass=1"], junit=str(junit), out=null, err=null) == 2
    assert junit.read_text() == "old" and os.listdir(junit.parent) == ["gate.xml"]
    monkeypatch.undo()
    assert run_gate(log_dir, max_rules=["gradcam/spurious_mass=1"], junit=str(junit), out=null, err=null) == 0
    assert junit.read_text().startswith("<?xml") and os.listdir(junit.parent) == ["gate.xml"]


# ----------------------------------------------------------------------------------------------- no torch


def test_gate_show_and_report_never_import_torch(tmp_path):
    log_dir = make_run(tmp_path, n_epochs=3, with_maps=True)  # maps on disk: the page embeds them
    script = textwrap.dedent(f"""
        import contextlib, io, sys
        import lightning_saliency.cli as cli
        from lightning_saliency.report import load_report
        log_dir, page = {str(log_dir)!r}, {str(tmp_path / "a.html")!r}
        with contextlib.redirect_stdout(io.StringIO()) as out:
            codes = [cli.main(["gate", log_dir, "--max", "gradcam/spurious_mass=1"]), cli.main(["show", log_dir]),
                     cli.main(["report", log_dir, "-o", page])]
        assert len(load_report(log_dir).audits) == 3 and "spurious_mass" in out.getvalue()
        print(codes, "torch" in sys.modules, "lightning" in sys.modules)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[0,", "0,", "0]", "False", "False"]
    assert (tmp_path / "a.html").read_text().count('class="epoch-view"') == 2 * 3  # two methods
