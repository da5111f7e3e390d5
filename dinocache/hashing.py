"""File digests, computed one way everywhere: dataset fingerprints, weights files, trained backbones.

At the bottom of the package (no torch, no dinocache imports), so the torch-free dataset readers and
the weights loaders share it.
"""

from __future__ import annotations

import hashlib
import os

__all__ = ["file_sha256"]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in blocks (weights files run to gigabytes)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
