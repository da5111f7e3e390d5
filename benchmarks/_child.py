"""Benchmarks run each configuration in a child process of its own (so that peak memory and start-up
are that configuration's). A child that fails must not vanish into a ``CalledProcessError`` or a
table row that only says "exit 1": its stderr streams through live (progress, and the traceback when
it dies) and its last lines come back with the failure, so that the parent can name the error in its
table and exit non-zero. Imported by the scripts beside it (``python benchmarks/x.py`` puts this
folder on ``sys.path``)."""

from __future__ import annotations

import collections
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class ChildResult:
    """What a child process left: its exit status, all of its stdout, the tail of its stderr."""

    command: list[str]
    returncode: int
    stdout: str
    stderr_tail: list[str]

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def error(self) -> str:
        """The child's last error line (a traceback's last line is the exception), else its exit status."""
        for line in reversed(self.stderr_tail):
            if line.strip() and not line.startswith(" "):
                return f"exit {self.returncode}: {line.strip()[:300]}"
        return f"exit {self.returncode}"


def run_child(command: Sequence[str], tail: int = 40) -> ChildResult:
    """Run ``command``; stream its stderr to ours as it comes, keep the last ``tail`` lines; return stdout."""
    process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last: collections.deque[str] = collections.deque(maxlen=tail)

    def relay() -> None:
        for line in process.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            last.append(line.rstrip("\n"))

    relay_thread = threading.Thread(target=relay, daemon=True)
    relay_thread.start()
    stdout = process.stdout.read()
    returncode = process.wait()
    relay_thread.join()
    return ChildResult(list(command), returncode, stdout, list(last))


def exit_if_failed(failures: Sequence[str]) -> None:
    """End the benchmark with exit status 1, naming every failed configuration, when there was one."""
    if failures:
        print(f"\n{len(failures)} configuration(s) FAILED (tracebacks above):", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        sys.exit(1)
