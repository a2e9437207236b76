"""Shared test set-up.

Triton kernels run on the CPU through Triton's interpreter; it must be switched on before
triton is first imported, hence here, at collection time, and only when no CUDA device exists.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def devices():
    """The devices a device-parametrised test runs on: always CPU, plus CUDA when present."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


@pytest.fixture(params=devices())
def device(request):
    return torch.device(request.param)


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` cleanly when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
