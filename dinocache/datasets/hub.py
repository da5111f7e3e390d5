"""Datasets named as LeRobot users name them: by Hugging Face Hub id (``lerobot/aloha_sim_insertion_human``).

LeRobot keeps a downloaded dataset under ``$HF_LEROBOT_HOME/<repo_id>`` (default
``$HF_HOME/lerobot``, i.e. ``~/.cache/huggingface/lerobot``); ``huggingface-cli download --repo-type
dataset`` keeps it in the Hub cache. :func:`resolve_dataset` looks in both, in that order, and
otherwise downloads it to where LeRobot would (``huggingface_hub.snapshot_download``) when the Hub
can be reached. Offline, it says in one line where it looked and how to get the dataset there.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dinocache.errors import DatasetError
from dinocache.hub import hf_home, hf_offline, hub_cache_dir, hub_unreachable

__all__ = ["resolve_dataset", "lerobot_home", "looks_like_repo_id"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(name: str) -> bool:
    """``owner/name`` with no further path parts (``lerobot/pusht``), as the Hub spells repositories."""
    return bool(_REPO_ID.match(name)) and ".." not in name


def lerobot_home() -> Path:
    """LeRobot's dataset root: ``$HF_LEROBOT_HOME``, else ``$HF_HOME/lerobot``, else ``~/.cache/huggingface/lerobot``."""
    if os.environ.get("HF_LEROBOT_HOME"):
        return Path(os.environ["HF_LEROBOT_HOME"]).expanduser()
    return hf_home() / "lerobot"


def resolve_dataset(name: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder of dataset ``name``: a path as given, or a Hub id found or fetched (see the module).

    Raises:
        DatasetError: a Hub id not found locally and not downloadable (offline, unreachable, unknown),
            in one line saying where it looked and how to get it.
    """
    path = Path(name).expanduser()
    if path.exists() or not looks_like_repo_id(str(name)):
        return path  # a local path (the readers say what is wrong with it, if anything)
    repo_id = str(name)
    local = lerobot_home() / repo_id
    if (local / "meta" / "info.json").is_file() and revision is None:
        return local  # LeRobot's own copy (of whatever revision it fetched: a pinned one goes to the Hub cache)
    cached = _from_hub(repo_id, revision, local_files_only=True)
    if cached is not None:
        return cached
    offline = "HF_HUB_OFFLINE is set" if hf_offline() else hub_unreachable()
    at = f" at revision {revision}" if revision else ""
    looked = f"{local} and the Hugging Face cache" if revision is None else "the Hugging Face cache"
    if offline:
        raise DatasetError(f"{repo_id}{at}: not a local folder, not in {looked}, and {offline}; get it with "
                           f"`huggingface-cli download --repo-type dataset {repo_id}"
                           f"{' --revision ' + revision if revision else ''} --local-dir {local}` "
                           "where the Hub can be reached, or pass the dataset's folder")
    downloaded = _from_hub(repo_id, revision, local_dir=None if revision else local)
    if downloaded is None:
        raise DatasetError(f"{repo_id}{at}: not a local folder, not in {looked}, and the Hub has no such dataset "
                           "(or it needs a login: `huggingface-cli login`)")
    return downloaded


def _from_hub(repo_id: str, revision: str | None, local_files_only: bool = False,
              local_dir: Path | None = None) -> Path | None:
    """``snapshot_download`` of a dataset repository: its folder, or None when it is not to be had."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = snapshot_download(repo_id, repo_type="dataset", revision=revision, local_files_only=local_files_only,
                                   local_dir=local_dir, cache_dir=hub_cache_dir())
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, FileNotFoundError):
        return None
    return Path(folder)
