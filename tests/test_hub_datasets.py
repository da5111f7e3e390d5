"""Datasets by Hugging Face Hub id, as LeRobot users name them: found under $HF_LEROBOT_HOME or in the
Hub cache, and, offline, one line saying where it looked and how to get it."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
from _datasets import make

from dinocache.errors import DatasetError
from dinocache.datasets import open_dataset
from dinocache.datasets.hub import looks_like_repo_id, resolve_dataset


@pytest.fixture
def hub_env(monkeypatch, tmp_path) -> Path:
    """Empty LeRobot home and Hub cache; the Hub endpoint a local port nobody listens on."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_LEROBOT_HOME", str(tmp_path / "lerobot-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    return tmp_path / "lerobot-home"


def test_a_hub_id_opens_the_dataset_lerobot_downloaded(hub_env, tmp_path):
    made = make(tmp_path, name="made", num_episodes=2, episode_length=6)
    shutil.copytree(made, hub_env / "lerobot" / "tiny_demo")
    source = open_dataset("lerobot/tiny_demo")
    assert source.path == hub_env / "lerobot" / "tiny_demo"
    assert len(source.episodes) == 2 and source.format == "lerobot-v2.1"


def test_a_hub_id_in_the_hub_cache_is_found_offline(hub_env, tmp_path, monkeypatch):
    """Where `huggingface-cli download --repo-type dataset` put it: the cache's snapshot folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "hf" / "hub" / "datasets--someone--tiny_demo"
    make(tmp_path, name="made", num_episodes=1, episode_length=6)
    shutil.copytree(tmp_path / "made", repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert resolve_dataset("someone/tiny_demo") == repo / "snapshots" / "abc123"
    assert len(open_dataset("someone/tiny_demo").episodes) == 1


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "unreachable"])
def test_a_hub_id_nowhere_to_be_had_says_where_it_looked_and_how_to_get_it(hub_env, monkeypatch, offline):
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetError) as info:
        open_dataset("lerobot/aloha_sim_transfer_cube_human")
    message = str(info.value)
    assert "\n" not in message and str(hub_env / "lerobot" / "aloha_sim_transfer_cube_human") in message
    assert ("HF_HUB_OFFLINE is set" if offline else "cannot be reached") in message
    assert "huggingface-cli download --repo-type dataset lerobot/aloha_sim_transfer_cube_human" in message


def test_local_paths_are_never_taken_for_hub_ids(tmp_path):
    assert looks_like_repo_id("lerobot/pusht") and not looks_like_repo_id("/data/pusht")
    assert not looks_like_repo_id("a/b/c") and not looks_like_repo_id("../x")
    with pytest.raises(DatasetError, match="no such file or directory"):
        open_dataset(tmp_path / "nope")


def test_a_pinned_revision_is_not_taken_from_lerobots_unpinned_copy(hub_env, tmp_path, monkeypatch):
    """`extract --revision`: LeRobot's folder holds whatever revision it fetched, so a pinned one is
    looked for in the Hub cache only, and offline the line says which revision is missing."""
    from click.testing import CliRunner

    from dinocache.cli import main

    made = make(tmp_path, name="made", num_episodes=1, episode_length=6)
    shutil.copytree(made, hub_env / "lerobot" / "tiny_demo")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(main, ["extract", "lerobot/tiny_demo", "--revision", "v2.1", "--weights", "random",
                                       "--out", str(tmp_path / "f.zarr")])
    assert result.exit_code == 2, result.output
    assert "lerobot/tiny_demo at revision v2.1: not a local folder, not in the Hugging Face cache" in result.output
    assert "--revision v2.1" in result.output and not (tmp_path / "f.zarr").exists()
