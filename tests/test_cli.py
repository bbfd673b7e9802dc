"""The ``lightning-saliency`` command line: argument parsing, exit codes, ``show``, and the installed entry point."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from lightning_saliency import __version__
from lightning_saliency.cli import main
from tests.report_fixtures import make_run, write_report


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("cli"), n_epochs=6, with_maps=False)


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lightning-saliency {__version__}"
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "gate" in out and "report" in out and "show" in out
    assert main(["gate", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--max", "--min", "--config", "--epoch", "--junit", "--json"):
        assert flag in out
    assert main([]) == 2  # no subcommand: usage, exit 2
    assert main(["frobnicate"]) == 2
    assert main(["gate"]) == 2  # REPORT is required
    assert main(["report", "x", "--max-images", "many"]) == 2


def test_gate_repeated_flags(run_dir, capsys, tmp_path):
    xml = tmp_path / "gate.xml"
    code = main(["gate", str(run_dir / "saliency" / "report.json"),
                 "--max", "gradcam/spurious_mass=0.6", "--max", "gradient/spurious_mass=0.6",
                 "--min", "gradcam/stability=0.8", "--junit", str(xml), "--json"])
    assert code == 0
    obj = json.loads(capsys.readouterr().out)
    assert [r["key"] for r in obj["rules"]] == ["gradcam/spurious_mass", "gradient/spurious_mass", "gradcam/stability"]
    assert obj["passed"] is True
    assert ET.parse(xml).getroot().find("testsuite").get("tests") == "4"  # three rules and the health case


def test_gate_config_and_epoch(run_dir, capsys, tmp_path):
    cfg = tmp_path / "gate.toml"
    cfg.write_text('[max]\n"gradcam/spurious_mass" = 0.2\n')
    assert main(["gate", str(run_dir), "--config", str(cfg)]) == 1
    assert main(["gate", str(run_dir), "--config", str(cfg), "--epoch", "0"]) == 0
    assert main(["gate", str(run_dir), "--config", str(cfg), "--epoch", "best"]) == 0
    out = capsys.readouterr().out
    assert "best -> epoch 1" in out


def test_gate_examples_config_is_valid(run_dir, capsys):
    """examples/ci/gate.toml parses and names keys the monitor writes."""
    cfg = Path(__file__).resolve().parents[1] / "examples" / "ci" / "gate.toml"
    code = main(["gate", str(run_dir), "--config", str(cfg), "--json"])
    obj = json.loads(capsys.readouterr().out)
    assert code in (0, 1) and obj["rules"], obj  # decided (0/1), not an error (2)


def test_show_summary(run_dir, capsys):
    assert main(["show", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "latest audit: epoch 5, step 300 (audit 6 of 6" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("metric "))
    assert header.split() == ["metric", "gradcam", "gradient"]
    row = next(line for line in lines if line.startswith("spurious_mass "))
    assert row.split() == ["spurious_mass", "0.5", "0.52"]
    assert "(+ 4 per-group values" in out
    assert "errors: none in the latest audit" in out and "(1 error(s) over all 6 audits)" in out
    assert "epoch 5: ShortcutAlarm gradcam/spurious_mass = 0.5 (allowed <= 0.35) -> stop" in out


def test_show_errors_and_no_audits(tmp_path, capsys):
    assert main(["show", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    data = json.loads((make_run(tmp_path / "a", n_epochs=3, with_maps=False) / "saliency" / "report.json").read_text())
    data["audits"] = []
    write_report(tmp_path / "b" / "saliency", data)
    assert main(["show", str(tmp_path / "b")]) == 0
    assert "no audits yet" in capsys.readouterr().out
    data = json.loads((tmp_path / "a" / "lightning_logs" / "version_0" / "saliency" / "report.json").read_text())
    data["audits"][-1]["errors"] = [{"method": "gradcam", "type": "RuntimeError", "message": "boom"}]
    write_report(tmp_path / "c" / "saliency", data)
    assert main(["show", str(tmp_path / "c" / "saliency" / "report.json")]) == 0
    assert "[gradcam] RuntimeError: boom" in capsys.readouterr().out


def test_installed_entry_point_exit_codes(run_dir):
    """The console script `lightning-saliency` (pyproject [project.scripts]) runs and passes the exit code on."""
    exe = Path(sys.executable).with_name("lightning-saliency")
    assert exe.exists(), "install the package (make .venv/.installed) to get the lightning-saliency command"
    proc = subprocess.run([str(exe), "gate", str(run_dir), "--max", "gradcam/spurious_mass=0.2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "FAIL: 1 of 1 rule(s) failed" in proc.stdout


def test_example_workflow_uses_valid_commands():
    """examples/ci/github-actions.yml parses, and its lightning-saliency commands parse with our CLI."""
    import shlex

    import yaml

    from lightning_saliency.cli import build_parser

    root = Path(__file__).resolve().parents[1]
    wf = yaml.safe_load((root / "examples" / "ci" / "github-actions.yml").read_text())
    runs = [str(s["run"]) for s in wf["jobs"]["audit"]["steps"] if "run" in s]
    # folded (>) blocks are one command; literal (|) blocks one command per line
    commands = [line.strip() for r in runs for line in ([" ".join(r.split())] if r.startswith("lightning-saliency gate")
                                                         else r.splitlines()) if line.strip()]
    parsed = [build_parser().parse_args(shlex.split(c)[1:]) for c in commands if c.startswith("lightning-saliency")]
    assert sorted(a.command for a in parsed) == ["gate", "report", "show"]
    gate = next(a for a in parsed if a.command == "gate")
    assert gate.config == "examples/ci/gate.toml" and gate.junit == "gate.xml"
    assert (root / gate.config).is_file()
    # the gated run dir is where the example's TensorBoardLogger writes (<out>/no_shortcut/version_0)
    train = next(c for c in commands if "shortcut_shapes.py" in c)
    assert "--no-shortcut" in train and "--out runs/ci" in train and gate.report == "runs/ci/no_shortcut/version_0"
