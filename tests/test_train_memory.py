"""The training-step memory estimate and the automatic micro-batch (edm_fast/train/memory.py)."""

import pytest
import torch

from edm_fast.train.memory import (
    BACKWARD_FACTOR, RUNTIME_BYTES, STATE_COPIES, MemoryEstimate, estimate_step_memory,
    fitting_micro_batch,
)


def test_saved_activations_are_counted_exactly():
    """Linear(100, 200) -> ReLU -> Linear(200, 10): autograd saves the first layer's input
    (100 floats per image) and the ReLU output, which the second layer saves again (one
    storage, counted once): 300 floats = 1200 bytes per image; the state is STATE_COPIES copies
    of the parameters plus the fixed working set."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(100, 200), torch.nn.ReLU(),
                                torch.nn.Linear(200, 10))
    est = estimate_step_memory(model, lambda n: model(torch.randn(n, 100)).sum())
    params = sum(p.numel() for p in model.parameters())
    assert est.per_image_bytes == 1200
    assert est.state_bytes == RUNTIME_BYTES + STATE_COPIES * 4 * params
    assert est.step_bytes(10) == int(est.state_bytes + BACKWARD_FACTOR * 12000)


def test_micro_batch_is_the_largest_that_fits():
    est = MemoryEstimate(state_bytes=1000, per_image_bytes=100)
    # budget 0.8 * 10_000 = 8000: 1000 + 1.3 * 100 * k <= 8000 -> k <= 53.8
    assert fitting_micro_batch(est, 32, 10_000) is None  # the whole batch fits
    assert fitting_micro_batch(est, 128, 10_000) == 53
    assert fitting_micro_batch(est, 128, None) is None  # unknown memory: no change
    with pytest.raises(MemoryError, match="even one image"):
        fitting_micro_batch(est, 128, 1200)


def test_training_takes_a_micro_batch_when_the_batch_does_not_fit(tmp_path, monkeypatch):
    """With little memory available the run says so in one line and accumulates gradients;
    with none at all it stops with a one-line error before the first step."""
    import edm_fast.train.memory as train_memory
    from edm_fast.train.loop import TrainConfig, train

    cfg = TrainConfig(data="digits", preset="tiny", batch=32, kimg=0.032, out=str(tmp_path / "a"),
                      sample_every_kimg=0, progress=False)
    probe = {}

    def small(device):  # room for the state and about 10 images of activations
        est = probe.setdefault("est", None)
        return None if est is None else int((est.state_bytes + 13 * est.per_image_bytes) / 0.8)

    real = train_memory.estimate_step_memory

    def remember(model, fn):
        probe["est"] = real(model, fn)
        return probe["est"]

    monkeypatch.setattr(train_memory, "estimate_step_memory", remember)
    monkeypatch.setattr(train_memory, "available_bytes", small)
    with pytest.warns(UserWarning, match=r"training 10 images per pass"):
        summary = train(cfg)
    assert summary["steps"] == 1
    monkeypatch.setattr(train_memory, "available_bytes", lambda device: 1000)
    with pytest.raises(ValueError, match="even one image"):
        train(TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "b")}))
