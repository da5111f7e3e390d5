"""The Hugging Face Hub as this machine sees it: where its caches are, and whether it can be reached.

Read from the environment at call time (huggingface_hub reads it once, at import), and without
importing torch, so that the dataset readers can use it as well as the backbone weights.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from pathlib import Path

__all__ = ["hf_home", "hub_cache_dir", "hf_offline", "hub_unreachable"]


def hf_home() -> Path:
    """``$HF_HOME``, else ``$XDG_CACHE_HOME/huggingface``, else ``~/.cache/huggingface``."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")).expanduser()


def hub_cache_dir() -> Path:
    """The Hub cache huggingface_hub would use, from the environment as it is now: ``$HF_HUB_CACHE``,
    else ``hf_home()/hub`` (passed explicitly to huggingface_hub, whose own default was fixed at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return hf_home() / "hub"


def hf_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set to a true value."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_unreachable(timeout_s: float = 2.0) -> str | None:
    """Why the Hub (``$HF_ENDPOINT``) cannot be reached, after one short connection attempt and no
    retries (huggingface_hub alone retries for about a minute); None when it answers."""
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        return f"{host}:{port} cannot be reached ({getattr(err, 'strerror', None) or type(err).__name__})"
    return None
