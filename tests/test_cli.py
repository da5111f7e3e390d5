"""The command line answers at once and shows every option: `--help` imports no torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from click.testing import CliRunner

from dinocache.cli import COMMANDS, main
from dinocache.policy.model.config import ACTConfig


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


def test_every_option_of_every_command_says_what_it_does():
    import click

    def commands(group: click.Group, ctx: click.Context, prefix: str):
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            yield f"{prefix}{name}", command
            if isinstance(command, click.Group):
                yield from commands(command, ctx, f"{prefix}{name} ")

    with click.Context(main) as ctx:
        silent = [f"{path} {option.opts[0]}" for path, command in commands(main, ctx, "")
                  for option in command.params
                  if isinstance(option, click.Option) and not (option.help or "").strip()]
    assert not silent, silent


def test_train_help_groups_run_options_and_every_act_field():
    text = CliRunner().invoke(main, ["train", "--help"], terminal_width=100).output
    run, act = text.split("Run options:")[1].split("ACT fields")
    assert "--batch-size" in run and "--resume" in run and "--chunk-size" not in run
    for field in dataclasses.fields(ACTConfig):
        assert f"--{field.name.replace('_', '-')}" in act, field.name
    assert max(len(line) for line in text.splitlines()) <= 100


def test_sim_without_its_extra_says_in_one_line_how_to_get_it_or_why_it_cannot(monkeypatch, tmp_path):
    """Where gym-aloha is missing: the install line; on Python >= 3.13, where the extra cannot be
    installed (labmaze has no wheel there), why not. Nothing is written either way."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gym_aloha" else real(name, *a))
    out = tmp_path / "demos"
    for version, expected in [((3, 12, 8), "pip install 'dinocache[sim]' (gym_aloha"),  # and whatever else is missing
                              ((3, 13, 0), "the simulator needs Python 3.11 or 3.12: dm-control needs labmaze, "
                                           "which has no wheel for Python 3.13")]:
        monkeypatch.setattr(sys, "version_info", version)
        result = CliRunner().invoke(main, ["sim", "demos", "--episodes", "1", "--out", str(out)])
        assert result.exit_code == 2 and expected in result.output, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
        assert not out.exists()
