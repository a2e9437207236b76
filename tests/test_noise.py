"""Seed lists (edm_fast.noise.parse_seeds) and per-seed noise streams."""

import numpy as np
import pytest
import torch

from edm_fast.noise import MAX_SEEDS, SeedNoise, parse_seeds


@pytest.mark.parametrize("spec, seeds", [
    ("0-3,10", [0, 1, 2, 3, 10]), (" 7 , 2-3 ", [7, 2, 3]), (5, [5]), (range(3), [0, 1, 2]),
    (torch.tensor([4, 9]), [4, 9]), ("18446744073709551614-18446744073709551615",
                                     [2**64 - 2, 2**64 - 1]),
    (np.int64(3), [3]), (torch.tensor(4), [4]), (np.arange(2), [0, 1]),  # numpy / 0-d tensor
])
def test_parse_seeds(spec, seeds):
    assert parse_seeds(spec) == seeds


@pytest.mark.parametrize("spec, message", [
    ("3-1", "decreases"), ("x", "use e.g."), ("-1", "use e.g."), ("", "no seeds"),
    ("18446744073709551616", r"\[0, 2\^64\)"), ([-1], r"\[0, 2\^64\)"),
    ([1.5], "must be integers"), (True, "must be integers"), (2.5, "must be an integer"),
    (np.float64(3.0), "must be an integer"),
    (f"0-{MAX_SEEDS}", "split the job"),  # MAX_SEEDS + 1 seeds, refused before allocating
])
def test_parse_seeds_refuses(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_seeds(spec)


def test_noise_depends_on_the_seed_only_up_to_the_last_seed():
    """The top of the generator's seed range works, and a seed's stream is the same alone or
    in a batch (what makes images batch- and rank-invariant)."""
    top = 2**64 - 1
    both = SeedNoise([3, top], (2, 4))
    alone = SeedNoise([top], (2, 4))
    assert torch.equal(both.draw()[1], alone.draw()[0])
    assert torch.equal(both.draw()[1], alone.draw()[0])  # the second draw too (churn)
    expected = torch.randn((2, 4), generator=torch.Generator().manual_seed(top))
    assert torch.equal(SeedNoise([top], (2, 4)).draw()[0], expected)
