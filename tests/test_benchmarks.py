"""The benchmarks fail loudly (issue 12): a configuration that fails ends the script with exit status 1
and its error shown, never a table of "failed" rows and exit 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import closed_loop  # noqa: E402


def test_compare_backbones_exits_non_zero_naming_each_failed_configuration(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "compare_backbones.py"), "--backbones", "nope_backbone", "--resnet-sizes",
         "native", "--episodes", "1", "--episode-length", "4", "--steps", "1", "--warmup", "0", "--latency-runs", "1",
         "--online-budget-s", "5", "--threads", "1", "--markdown", str(tmp_path / "table.md")],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "2 configuration(s) FAILED" in result.stderr
    assert result.stderr.count("BackboneError: unknown backbone 'nope_backbone'") >= 3  # tracebacks, then the list
    table = (tmp_path / "table.md").read_text()  # still written, each row saying why
    assert "| `nope_backbone` | online, frozen | 224x224 | failed: exit 1: dinocache.errors.BackboneError" in table


@pytest.mark.parametrize("code, status", [("raise SystemExit('no such store: boom')", "failed"),
                                          ("import time; time.sleep(30)", "timed out")])
def test_a_closed_loop_phase_that_fails_shows_its_log_tail(tmp_path: Path, capsys, code: str, status: str):
    phase = closed_loop.Phase("extract")
    closed_loop.run_phase(phase, [sys.executable, "-c", code], minutes=0.05, log=tmp_path / "logs" / "extract.log")
    shown = capsys.readouterr().out
    assert phase.status == status and f"[extract] {status} after" in shown and str(tmp_path / "logs") in shown
    if status == "failed":
        assert "  | no such store: boom" in shown


def test_closed_loop_exits_non_zero_when_a_phase_failed(capsys):
    rows = [{"config": "dino-cached", "phases": [{"name": "extract", "status": "ok", "log": "a"},
                                                 {"name": "train", "status": "cut by its budget", "log": "b"}]},
            {"config": "resnet18-online", "phases": [{"name": "train", "status": "failed", "log": "c.log"}]}]
    with pytest.raises(SystemExit) as ended:
        closed_loop.exit_if_failed(closed_loop.failed_phases(rows))
    assert ended.value.code == 1 and "resnet18-online: train failed (log: c.log)" in capsys.readouterr().err
    assert closed_loop.failed_phases(rows[:1]) == []  # a training phase cut by its budget is not a failure
