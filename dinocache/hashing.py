"""Digests, computed one way everywhere: dataset fingerprints, weights files, every artefact dinocache writes.

At the bottom of the package (no torch, no dinocache imports), so the torch-free dataset readers and
the weights loaders share it. Three shapes of content, one algorithm (sha256):

* a file's bytes (:func:`file_sha256`): weights, checkpoint tensors;
* named byte strings (:func:`parts_sha256`): the entries of an archive, the tensors of a model;
* a JSON document (:func:`json_sha256`): its canonical text, so that a document can carry its own
  digest (the digest of everything else in it) and a reader can tell a changed number from a valid one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

__all__ = ["file_sha256", "bytes_sha256", "parts_sha256", "json_sha256"]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in blocks (weights files run to gigabytes)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def bytes_sha256(data: bytes | bytearray | memoryview) -> str:
    """Hex sha256 of bytes already in memory: the same digest :func:`file_sha256` gives their file."""
    return hashlib.sha256(data).hexdigest()


def parts_sha256(parts: Iterable[tuple[str, bytes | bytearray | memoryview]]) -> str:
    """Hex sha256 of named byte strings, in the order given.

    Each part is framed by its name and length, so no two different sequences share a digest (moving
    bytes from one part's end to the next part's start changes it).
    """
    digest = hashlib.sha256()
    for name, data in parts:
        view = memoryview(data).cast("B")
        digest.update(f"{len(name)}:{name}:{view.nbytes}:".encode())
        digest.update(view)
    return digest.hexdigest()


def json_sha256(document: Any) -> str:
    """Hex sha256 of a JSON value's canonical text (sorted keys, no spaces): the same for a document
    before it is written and after it is read back, whatever indentation the file has."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()
