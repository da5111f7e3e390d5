"""Decode one episode of one camera from an mp4 (H.264, HEVC, AV1) with PyAV, checked frame by frame.

Speed comes from reading each video once, front to back: one sequential pass through the
decoder with FFmpeg's own frame threading (``thread_type = "AUTO"``) keeps every core busy,
whereas seeking per frame would re-decode a GOP for every frame asked for. An episode inside a
shared LeRobot v3.0 file costs one seek to the keyframe at or before its start. Conversion to
RGB reuses one swscale context per clip (3x faster than PyAV's per-frame default on H.264).

Every frame is checked: that the decoder found no damage in it or in its packet (FFmpeg flags
what its error detection sees: a frame decoded with concealed errors, a packet the demuxer marks
corrupt), its size against the dataset's metadata, its presentation time against the parquet
``timestamp`` of the row it stands for (within LeRobot's ``tolerance_s``, 1e-4 s: LeRobot's own
decoder refuses a frame further off than that), and the count against the parquet rows. The last
batch is held back until the count is known to be right, so a consumer never receives the
complete-looking tail of an episode whose video is wrong.

Damage the codec cannot see (a flipped bit that still decodes, H.264 carries no checksum) is beyond
any reader; what the decoder can see, and every timing, is checked.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import av.logging
import numpy as np
from av.video.reformatter import VideoReformatter

from dinocache.errors import DatasetError
from dinocache.datasets.base import problem

_log = logging.getLogger(__name__)

#: Largest distance (seconds) of a decoded frame's time from the time its parquet row asks for:
#: LeRobot's ``tolerance_s`` default, which its decoders apply to every frame they return.
TIMESTAMP_TOLERANCE_S = 1e-4


class VideoReadError(Exception):
    """A video that cannot be opened; the caller turns it into a DatasetError per episode."""


@dataclass(frozen=True)
class VideoProbe:
    """What a video's header says, read without decoding a frame.

    ``frames`` is the container's frame count (0 when the container does not record one) and
    ``duration`` the stream's length in seconds (``None`` when unknown).
    """

    frames: int
    duration: float | None
    height: int
    width: int
    codec: str


def keep_pyav_logging_off() -> None:
    """Turn PyAV's Python log callback back off when something in the process turned it on.

    FFmpeg logs from its codec threads. PyAV's callback, installed by ``av.logging.set_level(level)``
    (which torchvision < 0.24 calls on import, so LeRobot's environments have it on), takes the GIL
    for every message. A decoder freed while one of its frame threads logs then deadlocks: the main
    thread holds the GIL inside ``avcodec_free_context``, waiting for the thread that waits for the
    GIL (PyAV-Org/PyAV#751, #909; seen here as hangs at the end of ordinary clips). Parallel
    decoders also contend for the GIL over every message (#2276). No callback (``set_level(None)``)
    is PyAV's own default; it is restored before every video is opened, read or written.
    """
    if av.logging.get_level() is not None:
        _log.info("PyAV logging was on (level %s); turned off: its callback deadlocks FFmpeg's codec threads",
                  av.logging.get_level())
        av.logging.set_level(None)


def open_video(path: Path) -> av.container.InputContainer:
    """Open ``path`` for reading, tolerating container metadata that is not valid UTF-8.

    Metadata is never read here, so a bad tag (an encoder's name in Latin-1, binary artwork) must
    not stop decoding. PyAV up to 18 decodes tags strictly unless told ``metadata_errors="ignore"``;
    PyAV 19 removed that argument and always decodes them with ``surrogateescape``. Rather than
    compare version strings, ask for the tolerant mode and fall back when the argument is refused
    (PyAV refuses it before touching the file).
    """
    keep_pyav_logging_off()
    try:
        return av.open(str(path), metadata_errors="ignore")
    except TypeError:
        return av.open(str(path))


def probe_video(path: Path) -> VideoProbe:
    """Read a video's header. Raises :class:`VideoReadError` when it is missing or unreadable."""
    if not path.is_file():
        raise VideoReadError("video file is missing")
    try:
        with open_video(path) as container:
            if not container.streams.video:
                raise VideoReadError("file has no video stream")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            duration = None
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            return VideoProbe(frames=int(stream.frames or 0), duration=duration,
                              height=int(ctx.height), width=int(ctx.width), codec=ctx.name)
    except av.FFmpegError as err:
        raise VideoReadError(f"cannot open video ({_ffmpeg_reason(err)})") from None


@dataclass(frozen=True)
class EpisodeClip:
    """Where one episode lies in a video and what its frames must look like.

    ``timestamps`` are the presentation times (seconds, in the video's clock) that the parquet
    rows require, i.e. ``from_timestamp + timestamp`` for LeRobot v3.0 and ``timestamp`` for
    v2.1. ``whole_file`` says the episode owns the file (v2.1): decoding runs to the end and any
    frame past the last row is an error. Otherwise (v3.0) the decoder seeks to the first
    timestamp and stops at the first frame past the last one.
    """

    path: Path
    episode: int
    camera: str
    timestamps: np.ndarray
    fps: float
    height: int
    width: int
    whole_file: bool


def iter_clip(clip: EpisodeClip, batch_size: int = 32, threads: int = 0) -> Iterator[np.ndarray]:
    """Yield uint8 ``(b, H, W, 3)`` RGB batches of ``clip``; see the module docstring.

    ``threads``: FFmpeg's frame threads for this decoder; 0 lets FFmpeg choose (one per core, up to
    16), which suits one decoder alone but oversubscribes the cores when several decode at once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    expected = len(clip.timestamps)
    tolerance = 0.5 / clip.fps
    try:
        container = open_video(clip.path)
    except (av.FFmpegError, OSError) as err:
        raise _error(clip, f"cannot open video ({_ffmpeg_reason(err)})") from None
    with container:
        if not container.streams.video:
            raise _error(clip, "file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if threads:
            stream.codec_context.thread_count = threads
        frames = _frames_from_start(container, stream, clip, tolerance)
        # One converter for the whole clip: ``frame.to_ndarray(format=...)`` would build a new
        # swscale context for every frame, which costs more than decoding an H.264 frame.
        to_rgb = VideoReformatter()

        ready: np.ndarray | None = None  # a full batch held back by one batch
        batch = np.empty((min(batch_size, max(expected, 1)), clip.height, clip.width, 3),
                         dtype=np.uint8)
        filled = 0
        count = 0
        last_time = clip.timestamps[-1] if expected else -math.inf
        for frame in frames:
            time = frame.time
            if not clip.whole_file and time is not None and time > last_time + tolerance:
                break  # the next episode's first frame in a shared file
            if count >= expected:
                raise _error(clip, f"video has more frames than the {expected} parquet rows "
                                   f"(frame {count} at {_fmt_time(time)})")
            _check_frame(clip, frame, count)
            batch[filled] = to_rgb.reformat(frame, format="rgb24").to_ndarray()
            filled += 1
            count += 1
            if filled == len(batch):
                if ready is not None:
                    yield ready
                ready, filled = batch, 0
                batch = np.empty((min(batch_size, max(expected - count, 1)), clip.height,
                                  clip.width, 3), dtype=np.uint8)
        if count < expected:
            raise _error(clip, f"video has only {count} frames for the {expected} parquet rows")
        if ready is not None:
            yield ready
        if filled:
            yield batch[:filled]


def _frames_from_start(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                       clip: EpisodeClip, tolerance: float) -> Iterator[av.VideoFrame]:
    """Decoded frames from the episode's first frame on; earlier frames (pre-roll) are dropped.

    A shared file is entered with one backward seek to a keyframe. Demuxers seek on decode
    timestamps, so with B-frames the keyframe found can lie just *after* the wanted frame in
    presentation order; if the first frame decoded is already late, the seek is retried further
    back (a few frames, then two seconds, then the file's start) instead of failing.
    """
    first = float(clip.timestamps[0]) if len(clip.timestamps) else 0.0
    if clip.whole_file or first <= tolerance:
        yield from _decode(container, stream, clip)
        return
    margins = (4.0 / clip.fps, 2.0, math.inf)
    for attempt, margin in enumerate(margins):
        target = max(first - margin, 0.0)
        container.seek(int(target / stream.time_base), stream=stream, backward=True,
                       any_frame=False)
        decoded = _decode(container, stream, clip)
        for frame in decoded:
            time = frame.time
            if time is not None and time < first - tolerance:
                continue  # pre-roll between the keyframe and the episode's first frame
            if time is not None and time > first + tolerance and attempt + 1 < len(margins):
                break  # the seek overshot; retry from further back
            yield frame
            yield from decoded
            return
        else:
            return  # the stream ended; the caller reports the missing frames
        decoded.close()


def _decode(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
            clip: EpisodeClip) -> Iterator[av.VideoFrame]:
    """Every frame of ``stream`` from where the container stands, its packets checked as they come."""
    count = 0
    try:
        for packet in container.demux(stream):
            if packet.is_corrupt:
                raise _error(clip, f"the video packet at {_fmt_time(_packet_time(packet))} (near "
                                   f"{_near_frame(clip, _packet_time(packet))}) is marked corrupt; the file is corrupt or truncated")
            for frame in packet.decode():
                yield frame
                count += 1
    except av.FFmpegError as err:
        raise _error(clip, f"cannot decode the video after frame {count} "
                           f"({_ffmpeg_reason(err)}); the file is corrupt or truncated") from None


def _packet_time(packet: av.Packet) -> float | None:
    stamp = packet.pts if packet.pts is not None else packet.dts
    return None if stamp is None or packet.time_base is None else float(stamp * packet.time_base)


def _near_frame(clip: EpisodeClip, time: float | None) -> str:
    """The episode's frame whose row asks for the time nearest ``time``, for a message."""
    if time is None or not len(clip.timestamps):
        return "an unknown frame"
    return f"frame {int(np.abs(clip.timestamps - time).argmin())}"


def _check_frame(clip: EpisodeClip, frame: av.VideoFrame, index: int) -> None:
    if frame.is_corrupt:
        raise _error(clip, f"frame {index} ({_fmt_time(frame.time)}) decodes with errors (the decoder concealed "
                           "damage in it); the file is corrupt or truncated")
    if frame.height != clip.height or frame.width != clip.width:
        raise _error(clip, f"frame {index} is {frame.width}x{frame.height}, "
                           f"the dataset says {clip.width}x{clip.height}")
    time = frame.time
    if time is None:
        return  # no presentation time to compare (raw streams); the count check still holds
    want = float(clip.timestamps[index])
    if abs(time - want) > TIMESTAMP_TOLERANCE_S:
        raise _error(clip, f"frame {index} is at {time:.4f} s in the video but its parquet row "
                           f"says {want:.4f} s (tolerance {TIMESTAMP_TOLERANCE_S:g} s, LeRobot's tolerance_s); "
                           "the video and the parquet are out of step")


def _error(clip: EpisodeClip, what: str) -> DatasetError:
    return DatasetError(problem(clip.path, clip.episode, f"camera '{clip.camera}': {what}"))


def _fmt_time(time: float | None) -> str:
    return "unknown time" if time is None else f"{time:.4f} s"


def _ffmpeg_reason(err: BaseException) -> str:
    """FFmpeg's own words without the file name PyAV appends (the message names it already)."""
    strerror = getattr(err, "strerror", None)
    return str(strerror or err).strip()
