"""Shared test set-up.

Triton kernels run on the CPU through Triton's interpreter; it must be switched on before
triton is first imported, hence here, at collection time, and only when no CUDA device exists.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread: the test nets are tiny, and several tests start extra processes (torchrun,
# the CLI); on a 2-core machine multi-threaded processes spinning against each other ran the
# tiny nets ~100x slower. Subprocesses inherit OMP_NUM_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# The digests of the exports the tests write go to a store of their own, not the user's
# (edm_fast.io.trusted_exports); subprocesses inherit it.
if "EDM_FAST_TRUSTED_EXPORTS" not in os.environ:
    import tempfile

    os.environ["EDM_FAST_TRUSTED_EXPORTS"] = os.path.join(
        tempfile.mkdtemp(prefix="edm_fast_tests_"), "trusted-exports")


def devices():
    """The devices a device-parametrised test runs on: always CPU, plus CUDA when present."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


@pytest.fixture(params=devices())
def device(request):
    return torch.device(request.param)


@pytest.fixture
def no_tf32():
    """Exact float32 convolutions and matmuls on CUDA (cuDNN uses TF32 by default), restored
    afterwards."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` cleanly when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
