"""Every artefact of a run or an export carries digests of its content, checked where it is read.

Bytes that are valid on their own can be wrong as a whole: one flipped bit in a weight still loads,
and a policy built from it hands a robot wrong actions. So what dinocache writes records digests
(:mod:`dinocache.hashing`) when it is written, and every reader recomputes them before using a byte:

* JSON documents (``run.json``, a checkpoint's ``config.json`` and ``training_state.json``) carry
  the digest of the rest of their content under :data:`SEAL_KEY` (:func:`write_json`, :func:`read_json`);
* a checkpoint's ``config.json`` records the size and sha256 of every other file of the checkpoint
  (:func:`file_record`), which :func:`read_checked` compares before a tensor is loaded;
* a LeRobot folder (``export --format lerobot``) records the size and sha256 of every other file
  of it in its sealed ``dinocache.json`` (:func:`folder_files`), which :func:`check_folder`
  compares when the plugin loads the policy;
* an exported ``.pt2`` records in its metadata the digest of every archive entry but the metadata
  itself (:func:`archive_sha256`), an ``.onnx`` that of its bytes without its metadata entry
  (:func:`onnx_sha256`); :func:`check_policy_file` recomputes them when a policy is loaded.

A mismatch is an :class:`IntegrityError` naming the file and, for a checkpoint, the run's other
checkpoints to fall back on (for an exported policy, to export the run again).
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dinocache.atomic import temporary_name
from dinocache.errors import DinocacheError
from dinocache.hashing import bytes_sha256, file_sha256, json_sha256, parts_sha256

__all__ = ["IntegrityError", "SEAL_KEY", "CONTENT_KEY", "METADATA_NAME", "ONNX_METADATA_KEY", "sealed", "unsealed",
           "parse_json", "write_json", "read_json", "file_record", "read_checked", "FILES_KEY", "folder_files", "check_folder",
           "archive_sha256", "onnx_sha256", "check_policy_file"]

#: Key of a JSON document's own digest (of everything else in it).
SEAL_KEY = "document_sha256"
#: Key, in an exported policy's metadata, of the digest of the file's content (all but the metadata).
CONTENT_KEY = "content_sha256"
#: Key, in a LeRobot folder's ``dinocache.json``, of the :func:`file_record` of each other file of the folder.
FILES_KEY = "files"
#: Name of the metadata document inside a ``.pt2`` (extra file) and an ``.onnx`` (metadata key, no suffix).
METADATA_NAME = "dinocache.json"
ONNX_METADATA_KEY = "dinocache"
#: Archive entries a ``.pt2``'s content digest leaves out: the metadata that holds it (torch >= 2.8
#: writes extra files as ``extra/NAME``, torch 2.7 as ``extra_files/NAME``), and the id torch derives
#: from every entry written (so from the metadata too).
_UNHASHED_ENTRIES = (f"extra/{METADATA_NAME}", f"extra_files/{METADATA_NAME}", ".data/serialization_id")


class IntegrityError(DinocacheError):
    """An artefact whose content is not what was written: damaged, truncated, or replaced."""


# -- JSON documents ---------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def sealed(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as JSON values, with the digest of the rest of it under :data:`SEAL_KEY`."""
    document = json.loads(json.dumps({k: v for k, v in data.items() if k != SEAL_KEY}, default=_plain))
    document[SEAL_KEY] = json_sha256(document)
    return document


def unsealed(document: Any, path: Path, where: str = "") -> dict[str, Any]:
    """A :func:`sealed` document read back from ``path`` (``where`` in it), its digest checked and removed."""
    if not isinstance(document, dict) or SEAL_KEY not in document:
        raise IntegrityError(f"{path}{where}: no {SEAL_KEY!r} of its content: damaged, or written before dinocache "
                             f"recorded digests{_others(path)}")
    document = dict(document)
    recorded = document.pop(SEAL_KEY)
    found = json_sha256(document)
    if found != recorded:
        raise IntegrityError(f"{path}{where}: its content has sha256 {found[:16]}..., {str(recorded)[:16]}... was "
                             f"written: it was changed or damaged since{_others(path)}")
    return document


def parse_json(text: str | bytes, path: Path, where: str = "") -> Any:
    """JSON text read from ``path`` (``where`` in it), or one error saying it is not JSON."""
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IntegrityError(f"{path}{where}: not valid JSON ({err}): truncated or damaged{_others(path)}") from None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` :func:`sealed`, atomically (a reader never sees half a file)."""
    tmp = temporary_name(path)
    try:
        tmp.write_text(json.dumps(sealed(data), indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path, files: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A document :func:`write_json` wrote, its digest checked (and, given the table of
    :func:`file_record` of the files it was written with, its bytes); anything else is one clear error."""
    if files is not None:
        text = read_checked(path, files.get(Path(path).name))
    else:
        try:
            text = Path(path).read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"{path}: missing{_others(path)}") from None
    return unsealed(parse_json(text, path), path)


# -- files recorded by a checkpoint -----------------------------------------------------------------


def file_record(path: Path) -> dict[str, Any]:
    """What :func:`read_checked` will check the file against: its size and sha256."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def read_checked(path: Path, record: dict[str, Any] | None) -> bytes:
    """The bytes of ``path`` if they are the ones ``record`` (:func:`file_record`) describes."""
    if record is None:
        raise IntegrityError(f"{path}: its checkpoint records no digest of it{_others(path)}")
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"{path}: missing{_others(path)}") from None
    _compare(path, record, len(data), lambda: bytes_sha256(data))
    return data


def _compare(path: Path, record: dict[str, Any], size: int, digest: Any) -> None:
    """Refuse a file of ``size`` bytes (``digest()``: its sha256) that is not the one ``record`` describes."""
    if size != record["bytes"]:
        raise IntegrityError(f"{path}: {size} bytes, {record['bytes']} were written: the file is truncated or "
                             f"damaged{_others(path)}")
    found = digest()
    if found != record["sha256"]:
        raise IntegrityError(f"{path}: sha256 {found[:16]}..., {record['sha256'][:16]}... was written: the file is "
                             f"damaged or replaced{_others(path)}")


# -- folders read by other tools (a LeRobot pretrained-model folder) --------------------------------


def folder_files(folder: Path, record_name: str = METADATA_NAME) -> dict[str, dict[str, Any]]:
    """:func:`file_record` of every file under ``folder`` but ``record_name`` (the document that will hold
    them), by path relative to the folder."""
    return {path.relative_to(folder).as_posix(): file_record(path) for path in sorted(Path(folder).rglob("*"))
            if path.is_file() and path.relative_to(folder).as_posix() != record_name}


def check_folder(folder: Path, record_name: str = METADATA_NAME) -> dict[str, Any] | None:
    """The sealed ``record_name`` of ``folder`` (:func:`read_json`), once every file it records
    (:data:`FILES_KEY`) is the one written: files are hashed as they are read from disk, a block at a time
    (a ViT-L's weights run to a gigabyte). None when the folder has no ``record_name``: dinocache did
    not write it (a checkpoint ``lerobot-train`` saved), and it is loaded as LeRobot loads it."""
    document_path = Path(folder) / record_name
    if not document_path.is_file():
        return None
    document = read_json(document_path)
    files = document.get(FILES_KEY)
    if not isinstance(files, dict) or not files:
        raise IntegrityError(f"{document_path}: records no digest of the folder's files (exported before dinocache "
                             "recorded them); export the run again")
    for name, record in files.items():
        path = Path(folder) / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise IntegrityError(f"{path}: missing; export the run again") from None
        try:
            _compare(path, record, size, lambda: file_sha256(path))
        except IntegrityError as err:
            raise IntegrityError(f"{err}; export the run again") from None
    return document


def _others(path: Path) -> str:
    """For a file of a run's checkpoint: the run's other checkpoints, to fall back on."""
    folder = Path(path).parent
    checkpoints = folder.parent
    if checkpoints.name != "checkpoints" or not checkpoints.is_dir():
        return ""
    here = folder.resolve()
    others = sorted({p.resolve().name for p in checkpoints.iterdir()
                     if not p.name.startswith(".") and p.is_dir() and p.resolve() != here})
    if not others:
        return " (the run has no other checkpoint)"
    return (f" (the run's other checkpoints: {', '.join(others)}; export one with --checkpoint STEP, or point "
            f"{checkpoints / 'last'} at one to resume from it)")


# -- exported policies ------------------------------------------------------------------------------


def archive_sha256(path: Path) -> str:
    """Digest of a ``.pt2`` archive's entries (names without the archive's folder, and bytes), all but
    the metadata; reading them through :mod:`zipfile` also checks every entry's CRC."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = sorted(archive.namelist(), key=_entry_name)
            return parts_sha256((_entry_name(name), archive.read(name)) for name in names
                                if not _entry_name(name).endswith(_UNHASHED_ENTRIES))
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise IntegrityError(f"{path}: the archive is damaged or truncated ({err})") from None


def _entry_name(name: str) -> str:
    """An entry's name below the archive's own folder (named after the file when it was written)."""
    return name.split("/", 1)[1] if "/" in name else name


def onnx_sha256(path: Path, model: Any) -> str:
    """Digest of an ``.onnx`` file's bytes without dinocache's metadata entry (which holds the digest).

    ``model`` is the file's ``ModelProto`` (parsed for its metadata): the entry is found in the bytes as
    protobuf writes it (field 14 of the model, holding key and value), so the file is hashed as it lies
    on disk, not re-serialised (a third of the time for a ViT-B policy).
    """
    text = next((p.value for p in model.metadata_props if p.key == ONNX_METADATA_KEY), None)
    data = Path(path).read_bytes()
    record = _field(14, _field(1, ONNX_METADATA_KEY.encode()) + _field(2, (text or "").encode()))
    at = data.rfind(record) if text is not None else -1
    if at < 0:
        raise IntegrityError(f"{path}: its dinocache metadata is not where an ONNX model keeps it; the file is "
                             "damaged or was rewritten; export the run again")
    view = memoryview(data)
    return parts_sha256([("onnx", view[:at]), ("after metadata", view[at + len(record):])])


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field: its tag, the payload's length as a varint, the payload."""
    length, varint = len(payload), bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        varint.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([number << 3 | 2]) + bytes(varint) + payload


def check_policy_file(path: Path, metadata: dict[str, Any], model: Any = None) -> None:
    """Refuse an exported policy whose content is not what export wrote (``model``: an ``.onnx``'s
    loaded ``ModelProto``)."""
    recorded = metadata.get(CONTENT_KEY)
    if recorded is None:
        raise IntegrityError(f"{path}: its metadata records no {CONTENT_KEY}: damaged, or exported before dinocache "
                             "recorded one; export the run again")
    found = onnx_sha256(path, model) if model is not None else archive_sha256(path)
    if found != recorded:
        raise IntegrityError(f"{path}: its content has sha256 {found[:16]}..., export recorded {recorded[:16]}...: the "
                             "file was damaged or changed since it was written; export the run again")

