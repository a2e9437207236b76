"""edm_fast.compare and edm_fast.trajectories: NFE bookkeeping, seed-paired sampling, scores,
a small EDM-versus-DDPM comparison on the exact toy denoiser, and the written reports."""

import math

import pytest
import torch
from PIL import Image

from edm_fast.compare import (
    DigitsScorer,
    RunSpec,
    ToyScorer,
    compare,
    find_row,
    format_table,
    nfe_for_steps,
    paired_difference,
    reference_row,
    runs_for,
    sample_at_nfe,
    sigma_grid,
    steps_for_nfe,
    write_report,
)
from edm_fast.metrics import DigitsClassifier
from edm_fast.precond import DDPMPrecond
from edm_fast.toy import bimodal_mixture_1d, ring_mixture_2d
from edm_fast.trajectories import (
    animate_trajectories_1d,
    plot_frames_2d,
    plot_trajectories_1d,
    record_trajectories,
)


@pytest.fixture(scope="module")
def ring():
    return ring_mixture_2d()


@pytest.fixture(scope="module")
def digits_scorer():
    return DigitsScorer(DigitsClassifier.fit(16, steps=150))


class _DDPMLike(torch.nn.Module):
    """The exact ring denoiser behind DDPM's discrete precond (round_sigma, sigma range)."""

    def __init__(self, mixture):
        super().__init__()
        self.exact, self.precond = mixture.as_denoiser(), DDPMPrecond()
        self.sigma_min, self.sigma_max = self.precond.sigma_min, self.precond.sigma_max

    def round_sigma(self, sigma):
        return self.precond.round_sigma(sigma)

    def forward(self, x, sigma, class_labels=None):
        return self.exact(x, sigma)


def test_nfe_bookkeeping():
    """Heun: N steps = 2N - 1 NFE (the last step is Euler, Alg. 1 l.8); the rest: N = NFE."""
    assert [steps_for_nfe("edm_heun", n) for n in (7, 11, 19, 35)] == [4, 6, 10, 18]
    assert steps_for_nfe("edm_churn", 35) == 18
    assert [steps_for_nfe("ddpm", n) for n in (10, 1000)] == [10, 1000]
    for sampler in ("edm_heun", "edm_euler", "ddim"):
        assert nfe_for_steps(sampler, steps_for_nfe(sampler, 35)) == 35
    with pytest.raises(ValueError, match="odd"):
        steps_for_nfe("edm_heun", 36)
    with pytest.raises(ValueError, match="unknown sampler"):
        steps_for_nfe("heun2", 35)


def test_sigma_grids(ring):
    """EDM grids (Eq. 5) are clipped to the net's trained range; DDPM grids are its levels."""
    exact = ring.as_denoiser()
    grid = sigma_grid("edm_heun", exact, 18)
    assert len(grid) == 19 and grid[-1] == 0
    assert math.isclose(grid[0], 80.0) and math.isclose(grid[-2], 0.002)
    ddpm_like = _DDPMLike(ring)
    grid = sigma_grid("edm_heun", ddpm_like, 18)
    assert math.isclose(grid[-2], ddpm_like.sigma_min)
    levels = sigma_grid("ddpm", ddpm_like, 10)[:-1]
    assert torch.allclose(ddpm_like.round_sigma(levels), levels)
    assert math.isclose(levels[0], ddpm_like.sigma_max)


@pytest.mark.parametrize("sampler, nfe", [("edm_heun", 7), ("edm_churn", 7), ("ddpm", 10)])
def test_samples_depend_on_seed_only(ring, sampler, nfe):
    """Per-seed noise (also the injected noise): batch size never changes a sample."""
    exact = ring.as_denoiser()
    seeds = [3, 1, 4, 1_000, 5]
    a = sample_at_nfe(exact, sampler, nfe, seeds, (2,), batch=2)
    b = sample_at_nfe(exact, sampler, nfe, seeds, (2,), batch=5)
    c = sample_at_nfe(exact, sampler, nfe, seeds[:1], (2,), batch=1)
    assert torch.equal(a, b) and torch.equal(a[:1], c)


def test_toy_scorer_on_tiny_inputs(ring):
    """True samples: small sliced W2 and log p near E[log p]; a shifted cloud scores worse."""
    scorer = ToyScorer(ring, num_projections=64)
    truth = ring.sample(2000, generator=torch.Generator().manual_seed(7))
    good, bad = scorer(truth, None, 0), scorer(truth + 0.3, None, 0)
    assert good["swd"] < 0.05
    assert bad["swd"] > 0.2
    assert good["loglik"] > bad["loglik"] + 5
    ref = reference_row(scorer, samples=2000, repeats=2)
    assert abs(ref["loglik"][0] - good["loglik"]) < 0.1


def test_digits_scorer_on_tiny_inputs(digits_scorer):
    """Real digits: FD near the floor and high accuracy; noise images: huge FD, chance accuracy.
    The reference is class-balanced like the conditional samples (label = seed mod 10)."""
    ref = reference_row(digits_scorer, samples=100, repeats=2)
    assert ref["acc"][0] > 0.8
    noise = torch.rand(100, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = digits_scorer.labels(range(100))
    assert labels.tolist() == [s % 10 for s in range(100)]
    scores = digits_scorer(noise, labels, 0)
    assert scores["fd"] > 10 * ref["fd"][0]
    assert scores["acc"] < 0.5
    idx = digits_scorer._stratified(labels, torch.Generator().manual_seed(0))
    assert torch.equal(digits_scorer.real_labels[idx], labels)


def test_quick_comparison_on_exact_toy_denoiser(ring, tmp_path):
    """With the ideal denoiser only the sampler matters: EDM Heun at 35 NFE lands far closer to
    the data than Euler at 7 NFE (well beyond the spread), and the report files get written."""
    models = {"exact": ring.as_denoiser()}
    runs = runs_for("exact", "edm_euler", [7]) + runs_for("exact", "edm_heun", [35])
    scorer = ToyScorer(ring, num_projections=64)
    rows = compare(models, runs, scorer, samples=400, repeats=2, batch=400, log=None)
    euler, heun = find_row(rows, "exact", "edm_euler", 7), find_row(rows, "exact", "edm_heun", 35)
    (m_e, se_e), (m_h, se_h) = euler.stat("swd"), heun.stat("swd")
    assert m_h + 3 * se_h < m_e - 3 * se_e
    diff, se = paired_difference(heun, euler, "swd")
    assert diff < -3 * se < 0
    ref = reference_row(scorer, samples=400, repeats=2)
    table = format_table(rows, scorer, reference=ref)
    assert "| exact | EDM Heun | 35 | 18 |" in table and "real data" in table
    paths = write_report(rows, scorer, tmp_path, "toy", reference=ref, mixture=ring, title="t")
    for key in ("plot", "samples"):
        with Image.open(paths[key]) as im:
            assert im.size[0] > 100
    assert "EDM Euler" in paths["table"].read_text()
    assert '"nfe": 35' in paths["json"].read_text()
    assert find_row(rows, "exact", "ddpm", 1000) is None
    assert heun.spec == RunSpec("exact", "edm_heun", 35)


def test_trajectories_record_every_state_and_draw(tmp_path):
    """States from sigma_0 down to 0; DDPM starts at x_T = n (y = s x ~ N(0, 1)); files written."""
    mixture = bimodal_mixture_1d()
    exact = mixture.as_denoiser()
    heun = record_trajectories(exact, "edm_heun", 7, range(64), 1)
    ddpm = record_trajectories(exact, "ddpm", 20, range(64), 1)
    assert heun.xs.shape == (5, 64, 1) and ddpm.xs.shape == (21, 64, 1)
    assert heun.sigmas[0] == 80.0 and heun.sigmas[-1] == 0 and ddpm.sigmas[-1] == 0
    final = sample_at_nfe(exact, "edm_heun", 7, range(64), (1,))
    assert torch.allclose(heun.xs[-1].float(), final)
    assert 0.7 < ddpm.scaled()[0].std() < 1.3  # y = x / sqrt(1 + sigma^2) starts ~ N(0, 1)
    gif = animate_trajectories_1d(mixture, [heun, ddpm], tmp_path / "t.gif", frames=4, dpi=40)
    with Image.open(gif) as im:
        assert im.n_frames == 4
    assert plot_trajectories_1d(mixture, [heun], tmp_path / "t.png", dpi=40).exists()
    ring = ring_mixture_2d()
    traj2 = record_trajectories(ring.as_denoiser(), "edm_heun", 7, range(100), 2)
    assert plot_frames_2d(ring, [traj2], tmp_path / "f.png", levels=(80, 1, 0), dpi=40).exists()
