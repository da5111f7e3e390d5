"""Devices to parametrise device-path tests over: the CPU always (the twin of every CUDA path, running
the same code), CUDA where a GPU is present (skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
