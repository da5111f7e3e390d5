"""The command line answers at once and shows every option: `--help` imports no torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from click.testing import CliRunner

from dinocache.cli import COMMANDS, main
from dinocache.policy.config import ACTConfig


def test_help_of_every_command_imports_no_torch():
    """`dinocache --help` and `dinocache CMD --help` for every command, in a fresh interpreter."""
    script = ("import sys\nfrom click.testing import CliRunner\nfrom dinocache.cli import COMMANDS, main\n"
              "for args in [['--help'], *[[name, '--help'] for name in COMMANDS]]:\n"
              "    result = CliRunner().invoke(main, args)\n"
              "    assert result.exit_code == 0, (args, result.output)\n"
              "print('torch' in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("False"), done.stdout


def test_every_command_is_listed_with_its_summary():
    text = CliRunner().invoke(main, ["--help"]).output
    for name in COMMANDS:
        assert f"  {name} " in text, (name, text)


def test_train_help_groups_run_options_and_every_act_field():
    text = CliRunner().invoke(main, ["train", "--help"], terminal_width=100).output
    run, act = text.split("Run options:")[1].split("ACT fields")
    assert "--batch-size" in run and "--resume" in run and "--chunk-size" not in run
    for field in dataclasses.fields(ACTConfig):
        assert f"--{field.name.replace('_', '-')}" in act, field.name
    assert max(len(line) for line in text.splitlines()) <= 100
