"""Decode still images (PNG frames in LeRobot parquet, JPEG frames in compressed ALOHA HDF5).

Pillow is always there (matplotlib and torchvision depend on it); OpenCV is used for JPEG when
installed because ALOHA's recorder encodes with OpenCV and its ``imdecode`` gives back exactly
the array that was encoded (see :func:`decode_jpeg_opencv_order`). Both libraries release the
GIL while decoding, so a small shared thread pool decodes a batch of frames in parallel.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from threading import Lock

import numpy as np
from PIL import Image

try:  # optional: only used when the user has it
    import cv2
except ImportError:  # pragma: no cover - depends on the environment
    cv2 = None


class ImageDecodeError(Exception):
    """A frame whose bytes do not decode; callers add file, episode, camera and frame."""


def _reason(err: Exception) -> str:
    """Pillow's message without the in-memory file it names (``<_io.BytesIO object at 0x...>``): an
    address that differs from run to run (and would make two records of one damage differ) and
    tells the user nothing."""
    return re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err))


def decode_rgb(data: bytes | np.ndarray) -> np.ndarray:
    """Decode a PNG/JPEG (any mode: grey, palette, RGBA) to uint8 ``(H, W, 3)`` RGB."""
    try:
        with Image.open(io.BytesIO(_as_bytes(data))) as img:
            return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageDecodeError(_reason(err)) from None


def decode_jpeg_opencv_order(data: bytes | np.ndarray) -> np.ndarray:
    """Decode a JPEG written by ``cv2.imencode`` back to the array that was encoded.

    ``cv2.imencode`` takes its input to be BGR, so an RGB array (what ALOHA's cameras deliver)
    ends up in the file with red and blue swapped, and ``cv2.imdecode`` swaps them back. A
    standard decoder (Pillow) returns the file's true RGB, i.e. the swapped channels; reversing
    them reproduces what ALOHA/ACT training code sees. Trailing zero padding (ALOHA pads every
    frame to the longest one) is ignored by both decoders.
    """
    if cv2 is not None:
        buf = np.frombuffer(_as_bytes(data), dtype=np.uint8)
        image = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        if image is None:
            raise ImageDecodeError("OpenCV cannot decode the JPEG")
        return image
    try:
        with Image.open(io.BytesIO(_as_bytes(data))) as img:
            if img.mode != "RGB":
                img = img.convert("RGB")
            # Pillow packs the channels reversed in C; a numpy [..., ::-1] copy costs more
            # than the JPEG decode itself.
            packed = img.tobytes("raw", "BGR")
            return np.frombuffer(packed, np.uint8).reshape(img.height, img.width, 3)
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageDecodeError(_reason(err)) from None


def decode_many(buffers: Sequence[bytes | np.ndarray],
                decode: Callable[[bytes | np.ndarray], np.ndarray]) -> list[np.ndarray]:
    """Decode buffers in parallel on a shared pool, keeping their order.

    Errors come back as the first failing buffer's :class:`ImageDecodeError`, with its
    position in ``buffers`` as the ``index`` attribute.
    """
    def one(item: tuple[int, bytes | np.ndarray]) -> np.ndarray:
        i, data = item
        try:
            return decode(data)
        except ImageDecodeError as err:
            err.index = i
            raise

    if len(buffers) <= 1:
        return [one(item) for item in enumerate(buffers)]
    return list(_pool().map(one, enumerate(buffers)))


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=max(os.cpu_count() or 1, 2),
                                       thread_name_prefix="dinocache-imgdec")
        return _POOL


def _as_bytes(data: bytes | np.ndarray) -> bytes:
    if isinstance(data, np.ndarray):
        return data.tobytes()
    return bytes(data)
