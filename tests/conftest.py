"""Shared fixtures: generated datasets with real encoded video, the shared real dataset, and the trained
run the export tests read."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from dinocache.cores import available_cores


def pytest_configure(config: pytest.Config) -> None:
    """Share this machine's cores out among the test processes (pytest-xdist's ``-n``): torch's OpenMP
    threads busy-wait for each other, so two processes of two threads each on two cores spend much of
    their time spinning (a whole-pipeline test ran five times slower so). Under ``-n 2`` on 2 cores
    each worker gets one thread, in one process torch gets every core. Set here, before any test
    module imports torch and before pytest-xdist starts its workers (which inherit it, as does every
    subprocess a test starts); a value given by the caller is kept."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT") or config.getoption("numprocesses", None) or 1
    try:
        workers = int(workers)
    except ValueError:  # -n auto / logical, as the controller may still hold it: a worker per core
        workers = available_cores()
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, available_cores() // max(workers, 1))))


SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL_DATASET = SHARED / "datasets" / "g1_pick_bottle_3ep"


def build_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder ``build`` fills once per test run, shared by every pytest-xdist worker: the first to ask
    builds it while the others wait on a lock, then all read it. Tests must only read it (copy what
    they change). It lies beside the workers' own folders and goes with them."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = root / f"shared-{name}"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the build fails
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def real_dataset() -> Path:
    """The real LeRobot v2.1 humanoid dataset beside the checkout (skipped where absent)."""
    if not (REAL_DATASET / "meta" / "info.json").is_file():
        pytest.skip(f"shared real dataset not found at {REAL_DATASET}")
    return REAL_DATASET


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """Two cameras, three episodes of uneven length, real H.264 video: LeRobot v2.1 layout."""
    from dinocache.datasets.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "small", format="lerobot-v2.1",
                                   num_episodes=3, episode_length=14, image_size=(48, 64),
                                   cameras=("top", "wrist"), seed=0)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> SimpleNamespace:
    """The run every export test reads (tests/test_export*.py), built once per test run: a dataset ->
    `extract` (ViT-S/14, random weights, 56 px, float16 cache) -> 30 training steps (see
    :func:`_export.build_trained`). Read-only: a test that changes a file of it works on a copy."""
    from _export import build_trained, open_trained

    return open_trained(build_once(tmp_path_factory, "export-run", build_trained))


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory) -> SimpleNamespace:
    """The ``trained`` run exported once per test run, as ``.pt2`` (through the command line) and ``.onnx``
    (:func:`_export.build_exported`), read by the export tests and the fault campaign. Read-only."""
    from _export import build_exported, open_exported

    return open_exported(build_once(tmp_path_factory, "exported", lambda folder: build_exported(trained.run, folder)))


@pytest.fixture(scope="session")
def eager(trained):
    """The trained run's eager fused policy (backbone + preprocessing + head), built once per process."""
    from dinocache.policy.deployment.fused import build_fused_policy

    return build_fused_policy(trained.run)


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine run several times faster, and reproducibly, on one
    intra-op thread than on two; modules of such tests use it for every test."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
