"""LeRobot stays optional: dinocache's own import path never imports it, and ``--format lerobot`` without it
(or without the plugin) stops in one line saying what to install. Runs in every environment; where
LeRobot is installed, its absence is made real by blocking the imports in a child process.
"""

from __future__ import annotations

import json
import subprocess
import sys


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_dinocache_core_and_export_modules_do_not_import_lerobot():
    result = _run(
        "import json, sys\n"
        "import dinocache.cli, dinocache.cli.export, dinocache.policy.deployment.export, dinocache.policy.deployment.lerobot_export\n"
        "import dinocache.policy.deployment.runtime, dinocache.policy.training.train, dinocache.pipeline.extract\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('lerobot', 'lerobot_policy_dinocache'))))\n")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_format_lerobot_without_the_plugin_says_what_to_install(tmp_path):
    # None in sys.modules makes `import lerobot_policy_dinocache` fail as it does where it is not installed
    result = _run(
        "import sys\n"
        "sys.modules['lerobot_policy_dinocache'] = None\n"
        "from dinocache.cli import main\n"
        f"main(['export', {str(tmp_path / 'run')!r}, '--format', 'lerobot', '--out', {str(tmp_path / 'out')!r}])\n")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--format lerobot needs LeRobot and the dinocache policy plugin" in lines[0]
    assert "pip install" in lines[0] and "plugins/lerobot_policy_dinocache" in lines[0]
    assert not (tmp_path / "out").exists()
