"""A light, polite CLI (issue 10, point 5): the command's import path loads neither torch nor NumPy, a reader that
closes the pipe early gets no traceback and the usual exit code, a TOML key in the wrong table gets a hint, and a
rule on a mask metric for a probe without masks says so."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lightning_saliency.gate import run_gate
from tests.report_fixtures import make_report_data, make_run, write_report

ROOT = str(Path(__file__).resolve().parents[1])
ENV = {**os.environ, "PYTHONPATH": ROOT}
# exactly what the `lightning-saliency` console script runs
COMMAND = [sys.executable, "-c", "import sys; from lightning_saliency.cli import main; sys.exit(main())"]


def test_the_command_import_path_loads_neither_torch_nor_numpy(tmp_path):
    report = _report_without(tmp_path, spurious_masks=False, groups=True)  # the gate's probe-needs message path
    script = textwrap.dedent(f"""
        import contextlib, io, sys
        import lightning_saliency.cli as cli
        heavy = ("torch", "numpy", "lightning", "pytorch_lightning", "matplotlib")
        after_import = [m for m in heavy if m in sys.modules]
        with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
            codes = [cli.main(["--help"]), cli.main(["gate", "--help"]), cli.main(["show", "--help"]),
                     cli.main(["report", "--help"])]
            after_help = [m for m in heavy if m in sys.modules]
            codes.append(cli.main(["gate", {str(report)!r}, "--max", "gradcam/spurious_mass=0.2"]))
        print(codes, after_import, after_help, "torch" in sys.modules, "--max KEY=VALUE" in out.getvalue(),
              "probe had none" in err.getvalue())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[0,", "0,", "0,", "0,", "2]", "[]", "[]", "False", "True", "True"]


def _closed_pipe_run(args: list[str], both: bool = False) -> tuple[int, str]:
    """Run the command with its stdout (``both``: and stderr, ``2>&1 | head``) on a pipe whose reader is
    already gone (a ``head`` that exited)."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([*COMMAND, *args], stdout=write, stderr=write if both else subprocess.PIPE,
                              text=True, env=ENV, timeout=120)
    finally:
        os.close(write)
    return done.returncode, done.stderr or ""


@pytest.mark.parametrize("args, code", [
    (["gate", "{run}", "--json", "--max", "gradcam/spurious_mass=1"], 0),  # passes
    (["gate", "{run}", "--max", "gradcam/spurious_mass=0"], 1),  # fails: the verdict, not the pipe, decides
    (["gate", "{run}", "--json", "--max", "nope/nope=1"], 2),
    (["show", "{run}"], 0),
    (["--help"], 0),
])
def test_a_closed_pipe_ends_quietly_with_the_commands_own_exit_code(tmp_path, args, code):
    run = make_run(tmp_path, n_epochs=2, with_maps=False)
    rc, stderr = _closed_pipe_run([a.replace("{run}", str(run)) for a in args])
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr
    assert rc == code
    if code != 2:
        assert stderr == ""


@pytest.mark.parametrize("rule, code", [("gradcam/spurious_mass=1", 0), ("nope/nope=1", 2)])
def test_stdout_and_stderr_on_one_closed_pipe_keep_the_exit_code(tmp_path, rule, code):
    run = make_run(tmp_path, n_epochs=2, with_maps=False)
    assert _closed_pipe_run(["gate", str(run), "--max", rule], both=True)[0] == code  # a traceback would give 1


def test_an_open_pipe_still_gets_the_whole_output(tmp_path):
    run = make_run(tmp_path, n_epochs=2, with_maps=False)
    done = subprocess.run([*COMMAND, "gate", str(run), "--json", "--max", "gradcam/spurious_mass=1"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("}") and '"passed": true' in done.stdout


def _gate(report, **kw) -> tuple[int, str]:
    err = io.StringIO()
    code = run_gate(report, out=io.StringIO(), err=err, **kw)
    return code, err.getvalue()


def test_a_top_level_key_after_a_table_gets_a_hint(tmp_path):
    run = make_run(tmp_path, n_epochs=2, with_maps=False)
    late = tmp_path / "late.toml"
    late.write_text('[min]\n"gradcam/stability" = 0.0\nepoch = 1\n')  # TOML reads epoch as [min] epoch
    code, err = _gate(run, config=str(late))
    assert code == 2
    assert re.search(r"'epoch' under \[min\] is not a metric key; top-level settings \(epoch[^)]*\) must come before "
                     r"the first \[table\]", err), err
    early = tmp_path / "early.toml"
    early.write_text('epoch = 1\n[min]\n"gradcam/stability" = 0.0\n')
    assert _gate(run, config=str(early)) == (0, "")


def _report_without(tmp_path, *, spurious_masks: bool, groups: bool) -> Path:
    data = make_report_data(n_epochs=2, with_maps=False)
    for audit in data["audits"]:
        audit["metrics"] = {k: v for k, v in audit["metrics"].items()
                            if (spurious_masks or "spurious_mass" not in k) and (groups or k.count("/") < 2)}
    data["probe"]["spurious_masks"] = spurious_masks
    data["probe"]["groups"] = data["probe"]["groups"] if groups else None
    return write_report(tmp_path / "saliency", data)


def test_a_rule_on_a_mask_metric_for_a_probe_without_masks_says_so(tmp_path):
    report = _report_without(tmp_path, spurious_masks=False, groups=True)
    code, err = _gate(report, max_rules=["gradcam/spurious_mass=0.2"])
    assert code == 2
    assert ("metric 'gradcam/spurious_mass' is in no audit of this report: spurious_mass needs spurious masks on the "
            "probe") in err and "and this report's probe had none" in err
    assert "closest match" not in err  # no 'gradcam/stability' suggested for a metric the probe could not give


def test_a_per_group_rule_for_a_probe_without_groups_says_so(tmp_path):
    report = _report_without(tmp_path, spurious_masks=True, groups=False)
    code, err = _gate(report, min_rules=["gradcam/object_mass/site_a=0.2"])
    assert code == 2 and "per-group keys need groups on the probe" in err and "had none" in err


def test_a_key_the_probe_could_give_keeps_the_closest_match(tmp_path):
    report = _report_without(tmp_path, spurious_masks=True, groups=True)
    code, err = _gate(report, max_rules=["gradcam/spurius_mass=0.2"])
    assert code == 2 and "closest match: 'gradcam/spurious_mass'" in err and "had none" not in err
