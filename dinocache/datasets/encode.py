"""Frames to file bytes: mp4 video, PNG, and JPEG the way ALOHA's recorder writes it.

The counterpart of the readers' decoders (:mod:`~dinocache.datasets.video`,
:mod:`~dinocache.datasets.images`), used by the dataset writer and by the simulator's rollout
videos. The defaults are high quality so that decoded frames stay within a few grey levels of the
rendered ones, which is what lets the tests compare formats frame by frame.
"""

from __future__ import annotations

import io
import queue
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import av
import numpy as np
from PIL import Image

from dinocache.cores import available_cores
from dinocache.datasets.video import keep_pyav_logging_off

__all__ = ["DEFAULT_GOP", "VIDEO_CODECS", "BackgroundEncoder", "VideoStream", "encode_video", "jpeg_bgr", "png"]

#: codec -> (encoders to try in order, pixel format, crf) used unless overridden.
VIDEO_CODECS: dict[str, tuple[tuple[str, ...], str, int]] = {
    "h264": (("libx264", "h264"), "yuv444p", 10),
    "hevc": (("libx265", "hevc"), "yuv444p", 10),
    "av1": (("libsvtav1", "libaom-av1", "av1"), "yuv420p", 20),
}
#: Keyframe interval: short, so that the tests' seeks land near a keyframe as in real datasets.
DEFAULT_GOP = 12


def encode_video(path: Path, frames: Iterable[np.ndarray], fps: float, codec: str = "h264", *,
                 crf: int | None = None, pix_fmt: str | None = None,
                 gop: int | None = None) -> None:
    """Encode RGB uint8 frames to an mp4 whose frame ``i`` is presented at ``i / fps`` seconds."""
    if codec not in VIDEO_CODECS:
        raise ValueError(f"codec must be one of {sorted(VIDEO_CODECS)}, got {codec!r}")
    encoders, default_pix_fmt, default_crf = VIDEO_CODECS[codec]
    encoder = _available_encoder(encoders)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(100_000)
    options = {"crf": str(default_crf if crf is None else crf),
               "g": str(DEFAULT_GOP if gop is None else gop)}
    if encoder == "libx265":
        options["x265-params"] = "log-level=error"
    elif encoder == "libsvtav1":
        options["preset"] = "10"
    keep_pyav_logging_off()  # the encoder's threads log too
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(encoder, rate=rate, options=options)
        stream.pix_fmt = pix_fmt or default_pix_fmt
        stream.codec_context.time_base = 1 / rate
        started = False
        for i, array in enumerate(frames):
            if not started:
                stream.height, stream.width = array.shape[:2]
                started = True
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


class BackgroundEncoder:
    """Encode videos in a few threads while the caller goes on to the next episode; a context manager.

    FFmpeg encodes with the GIL released, so a writer that receives episodes from worker processes
    (``sim demos``) no longer encodes every one of them itself, one after the other: on a 16-core
    host that made the writing process, not the simulator, the limit. Each video is encoded exactly
    as :func:`encode_video` would, into its own file, so the dataset does not depend on the thread
    count. At most ``2 * threads`` videos wait (holding their frames); the first error is raised at
    the next :meth:`submit` or when the block ends, which waits for every video.
    """

    def __init__(self, threads: int | None = None) -> None:
        if threads is None:  # a quarter of the cores, 1 to 4: the encoders share them with the frames' producers
            threads = min(4, max(1, available_cores() // 4))
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="dinocache-encode")
        self._pending: deque[Future] = deque()
        self._limit = 2 * threads

    def submit(self, path: Path, frames: Iterable[np.ndarray], fps: float, codec: str = "h264", **options: Any) -> None:
        """Encode ``frames`` to ``path`` in the background (arguments as :func:`encode_video`)."""
        self._pending.append(self._pool.submit(encode_video, path, frames, fps, codec, **options))
        while self._pending and (len(self._pending) > self._limit or self._pending[0].done()):
            self._pending.popleft().result()

    def __enter__(self) -> BackgroundEncoder:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        try:
            while kind is None and self._pending:
                self._pending.popleft().result()
        finally:  # on an error, nothing queued starts; what runs finishes before the error goes on
            self._pool.shutdown(wait=True, cancel_futures=True)


class VideoStream:
    """One mp4 fed batch by batch (a LeRobot v3.0 file holds many episodes), encoded in a thread; a
    context manager.

    The file is exactly what :func:`encode_video` writes for the concatenated frames: the writer
    holds one episode at a time instead of a whole file's, and encodes while the next episode is
    made. At most two batches wait; an encoder error is raised at the next :meth:`write` or when
    the block ends. When the block ends on an error, the encoder is stopped and the error goes on.
    """

    def __init__(self, path: Path, fps: float, codec: str = "h264", **options: Any) -> None:
        self._batches: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._encode, args=(path, fps, codec, options),
                                        name="dinocache-video-stream", daemon=True)
        self._thread.start()

    def write(self, frames: np.ndarray) -> None:
        """Append ``frames`` (``(n, H, W, 3)`` uint8) to the video."""
        self._raise()
        self._batches.put(frames)

    def __enter__(self) -> VideoStream:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._batches.put(None)
        self._thread.join()
        if kind is None:
            self._raise()

    def _encode(self, path: Path, fps: float, codec: str, options: dict[str, Any]) -> None:
        try:
            encode_video(path, self._frames(), fps, codec, **options)
        except BaseException as err:  # handed to the writing thread; the rest of the stream is drained
            self._error = err
            while self._batches.get() is not None:
                pass

    def _frames(self) -> Iterable[np.ndarray]:
        while (batch := self._batches.get()) is not None:
            yield from batch

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


def _available_encoder(names: Sequence[str]) -> str:
    """The first encoder this PyAV build has (FFmpeg builds differ in which they include)."""
    for name in names:
        try:
            av.codec.Codec(name, "w")
            return name
        except (av.codec.codec.UnknownCodecError, ValueError):
            continue
    raise RuntimeError(f"PyAV has none of the encoders {', '.join(names)}")


def png(frame: np.ndarray) -> bytes:
    """PNG bytes of an RGB frame (LeRobot's ``image`` storage)."""
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bgr(frame: np.ndarray, quality: int) -> bytes:
    """JPEG bytes as ALOHA's ``cv2.imencode`` writes them: the RGB array is taken to be BGR."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame[..., ::-1])).save(
        buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()
