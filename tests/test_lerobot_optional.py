"""LeRobot stays optional: dinocache's own import path never imports it, and ``--format lerobot`` without it
(or without the plugin) stops in one line saying what to install. Runs in every environment; where
LeRobot is installed, its absence is made real by blocking the imports in a child process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest


@pytest.fixture(scope="module")
def child(tmp_path_factory) -> SimpleNamespace:
    """One fresh Python (a start-up costs seconds): it imports dinocache's command line, export, runtime,
    training and extraction modules and prints which LeRobot modules came with them; then, with the
    plugin made impossible to import (None in ``sys.modules`` makes ``import lerobot_policy_dinocache``
    fail as it does where it is not installed), it runs ``export --format lerobot``."""
    tmp = tmp_path_factory.mktemp("optional")
    code = ("import json, sys\n"
            "import dinocache.cli, dinocache.cli.export, dinocache.policy.deployment.export\n"
            "import dinocache.policy.deployment.lerobot_export, dinocache.policy.deployment.runtime\n"
            "import dinocache.policy.training.train, dinocache.pipeline.extract\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('lerobot', 'lerobot_policy_dinocache'))),"
            " flush=True)\n"
            "sys.modules['lerobot_policy_dinocache'] = None\n"
            "from dinocache.cli import main\n"
            f"main(['export', {str(tmp / 'run')!r}, '--format', 'lerobot', '--out', {str(tmp / 'out')!r}])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return SimpleNamespace(result=result, out=tmp / "out")


def test_dinocache_core_and_export_modules_do_not_import_lerobot(child):
    assert child.result.stdout.strip(), child.result.stderr
    assert json.loads(child.result.stdout.strip().splitlines()[-1]) == []


def test_format_lerobot_without_the_plugin_says_what_to_install(child):
    result = child.result
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--format lerobot needs LeRobot and the dinocache policy plugin" in lines[0]
    assert "pip install" in lines[0] and "plugins/lerobot_policy_dinocache" in lines[0]
    assert not child.out.exists()
