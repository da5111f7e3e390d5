"""The ALOHA writer: episodes to ``episode_<n>.hdf5`` files laid out as ALOHA's recorders write them.

Raw ``(T, H, W, 3)`` frames as the simulator recorder stores them, or zero-padded JPEG bytes plus
``compress_len`` as the real-robot recorder does (``spec.aloha_compressed``); the rate and the task,
which the format does not record, go to the ``dinocache.json`` sidecar the reader looks for.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import h5py
import numpy as np

from dinocache.datasets.aloha import IMAGES_GROUP, LOWDIM_DATASETS, SIDECAR
from dinocache.datasets.encode import jpeg_bgr
from dinocache.datasets.episode import Episode, WriteSpec

__all__ = ["write_aloha"]


def write_aloha(out: Path, episodes: Iterable[Episode], spec: WriteSpec) -> None:
    """One HDF5 file per episode, written as the episode arrives."""
    for ep in episodes:
        with h5py.File(out / f"episode_{ep.index}.hdf5", "w") as root:
            root.attrs["sim"] = True
            images = root.create_group(IMAGES_GROUP)
            if spec.aloha_compressed:
                _write_jpeg_images(root, images, ep, spec)
            else:
                for cam in spec.cameras:
                    images.create_dataset(cam, data=ep.frames[cam], chunks=(1, *ep.frames[cam].shape[1:]))
            lowdim = ep.lowdim()
            for name, key in LOWDIM_DATASETS.items():  # the reader's paths: qpos, qvel, action
                if key in lowdim:
                    root.create_dataset(name, data=lowdim[key])
    sidecar = {"fps": spec.fps} if spec.aloha_task is None else {"fps": spec.fps, "task": spec.aloha_task}
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_jpeg_images(root: h5py.File, images: h5py.Group, ep: Episode, spec: WriteSpec) -> None:
    """Every camera's frames as JPEG bytes zero-padded to the longest, lengths in ``compress_len``."""
    root.attrs["compress"] = True
    encoded = {cam: [jpeg_bgr(f, spec.jpeg_quality) for f in ep.frames[cam]] for cam in spec.cameras}
    padded = max(len(b) for blobs in encoded.values() for b in blobs)
    for cam, blobs in encoded.items():
        data = np.zeros((ep.length, padded), np.uint8)
        for i, blob in enumerate(blobs):
            data[i, :len(blob)] = np.frombuffer(blob, np.uint8)
        images.create_dataset(cam, data=data, chunks=(1, padded))
    root.create_dataset("compress_len", data=np.array(
        [[len(b) for b in encoded[cam]] for cam in spec.cameras], np.float32))
