"""edm_fast.eval.compare and edm_fast.eval.trajectories: NFE bookkeeping, seed-paired sampling, scores,
a small EDM-versus-DDPM comparison on the exact toy denoiser, and the written reports."""

import dataclasses
import importlib.util
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from edm_fast.eval.compare import (
    DigitsScorer,
    RunSpec,
    ToyScorer,
    check_reference_size,
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
from edm_fast.eval.metrics import DigitsClassifier
from edm_fast.precond import DDPMPrecond
from edm_fast.nets.toy import bimodal_mixture_1d, ring_mixture_2d
from edm_fast.eval.trajectories import (
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


#----------------------------------------------------------------------------
# Input checks before any sampling, the small-sample warning, the bench's toy-net reuse.


def _no_heavy_work(monkeypatch):
    """Make model loading, classifier fitting and sampling fail loudly if they are reached."""
    import edm_fast.eval.compare
    import edm_fast.io.models

    def reached(*_, **__):
        raise AssertionError("loaded, fitted or sampled before the error")

    monkeypatch.setattr(edm_fast.eval.compare, "sample_at_nfe", reached)
    monkeypatch.setattr(edm_fast.io.models, "load_denoiser", reached)
    monkeypatch.setattr(DigitsClassifier, "fit", reached)


COMPARE_MISTAKES = {
    "too few real digits": (["--samples", "900", "--repeats", "2"],
                            "need 180 real digits of class 0"),
    "pooled size": (["--samples", "1749", "--repeats", "1"], "keep samples x repeats <= 1748"),
    "out is a file": (["--out", "{tmp}/afile"], "is an existing file, not a folder"),
    "out under a file": (["--out", "{tmp}/afile/sub"], "afile is a file, not a folder"),
    "report file is a folder": (["--out", "{tmp}"], "digits_table.md there is a folder"),
    "one sample": (["--samples", "1"], "--samples must be >= 2"),
}


@pytest.mark.parametrize("case", list(COMPARE_MISTAKES))
def test_compare_command_checks_inputs_before_sampling(tmp_path, case, capsys, monkeypatch):
    """`edm-fast compare` rejects what would fail after minutes of sampling at once, with the
    CLI's one-line error and exit code 2, before loading models or fitting the classifier."""
    from edm_fast.cli.main import main

    args, message = COMPARE_MISTAKES[case]
    (tmp_path / "afile").write_text("")
    (tmp_path / "digits_table.md").mkdir()
    _no_heavy_work(monkeypatch)
    code = main(["compare", *(a.format(tmp=tmp_path) for a in args)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("edm-fast compare: error: ")
    assert message in err[-1]  # reached before any sampling or fitting: _no_heavy_work


def test_compare_command_rejects_an_unwritable_out(tmp_path, capsys, monkeypatch):
    """A folder without write permission (faked for os.access: root may write anywhere)."""
    from edm_fast.cli.main import main

    locked, real_access = tmp_path / "locked", os.access
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked
                        and real_access(path, mode))
    _no_heavy_work(monkeypatch)
    assert main(["compare", "--out", str(locked / "report")]) == 2
    assert "locked is not a writable folder" in capsys.readouterr().err


def test_reference_size_check_counts_each_class():
    """Seeds 0..n-1 with label seed mod K need ceil((n - c) / K) real samples of class c."""
    labels = torch.tensor([0, 0, 0, 1, 1])  # 3 of class 0, 2 of class 1: n <= min(6, 5)
    check_reference_size(5, 1, labels, num_classes=2)
    with pytest.raises(ValueError, match="need 3 real digits of class 1.*only 2.*<= 5"):
        check_reference_size(3, 2, labels, num_classes=2)
    check_reference_size(874, 2)  # the real digits: class 8 has 174, so 1748 in all
    with pytest.raises(ValueError, match="class 0"):
        check_reference_size(900, 2)


def test_only_the_real_data_reference_is_limited_by_the_real_digits(digits_scorer):
    """Model rows may use more samples than there are real digits of a class; the real-data
    reference row cannot, and says so before drawing any."""
    digits_scorer.check_sizes(1000, 2)  # compare() accepts it
    with pytest.raises(ValueError, match="keep samples x repeats <= 1748"):
        reference_row(digits_scorer, samples=1000, repeats=2)


def test_small_sample_fd_warns_and_notes_the_report(digits_scorer, tmp_path, capsys,
                                                    monkeypatch):
    """Below 64 samples per seed set (the feature dimension) the FD is mostly bias: compare()
    warns before sampling, and `edm-fast compare` says so on stderr and in the written table."""
    import edm_fast.eval.compare
    from edm_fast.cli.main import main

    assert digits_scorer.feature_dim == 64
    with pytest.warns(UserWarning, match="20 samples per seed set .* small-sample bias"):
        compare({}, [], digits_scorer, samples=20, repeats=2, log=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compare({}, [], digits_scorer, samples=64, repeats=2, log=None)
    assert digits_scorer.bias_note(64, 1) == ""
    assert "fd_pooled over all 80 samples is less affected" in digits_scorer.bias_note(20, 4)

    monkeypatch.setattr(DigitsClassifier, "fit", lambda *_, **__: digits_scorer.classifier)
    monkeypatch.setattr(edm_fast.eval.compare, "sample_at_nfe",  # real sampling takes minutes
                        lambda den, sampler, nfe, seeds, shape, **_: torch.zeros(len(seeds),
                                                                                 *shape))
    with pytest.warns(UserWarning, match="small-sample bias"):  # stderr, one line, outside pytest
        code = main(["compare", "--samples", "20", "--repeats", "1", "--out", str(tmp_path)])
    assert code == 0
    assert "Warning: 20 samples per seed set" in (tmp_path / "digits_table.md").read_text()
    assert "small-sample bias" in capsys.readouterr().out


@pytest.fixture(scope="module")
def bench():
    """bench/compare_edm_ddpm.py as a module."""
    path = Path(__file__).resolve().parents[1] / "bench" / "compare_edm_ddpm.py"
    spec = importlib.util.spec_from_file_location("compare_edm_ddpm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_toy_checkpoint(bench, run, args, loss="edm", steps=None):
    """A checkpoint whose metadata is what train() records for the script's toy net at ``args``
    (no real net)."""
    from edm_fast.io.checkpoints import save_checkpoint
    from edm_fast.train.loop import TrainConfig

    cfg = TrainConfig(data="toy:gmm2d", preset="toy-mlp", loss=loss, kimg=args.toy_kimg,
                      batch=args.toy_batch, lr=1e-3, seed=0, out=str(run), progress=False,
                      ckpt_every_kimg=1e9, sample_every_kimg=0)
    steps = math.ceil(cfg.kimg * 1000 / cfg.batch) if steps is None else steps
    meta = {"train": dataclasses.asdict(cfg), "step": steps, "kimg": steps * cfg.batch / 1000}
    save_checkpoint(run / f"ckpt-{steps:08d}.safetensors", {"ema.w": torch.zeros(1)}, meta)
    return meta


def test_bench_reuses_toy_nets_only_with_the_same_budget(bench, tmp_path):
    """A --quick net (51.2 kimg, 100 steps) is not the full run's (2048 kimg); the report
    states the budget the checkpoints record."""
    quick = bench.parse_args(["--quick", "--work", str(tmp_path)])
    full = bench.parse_args(["--work", str(tmp_path)])
    meta = _fake_toy_checkpoint(bench, tmp_path / "edm", quick)
    quick_cfg, full_cfg = (bench.toy_config(a, "edm", tmp_path) for a in (quick, full))
    assert bench.reuse_mismatch(meta, quick_cfg) == ""
    assert "kimg=51.2 (this run: 2048.0)" in bench.reuse_mismatch(meta, full_cfg)
    assert "stopped at step 7 of 100" in bench.reuse_mismatch(meta | {"step": 7}, quick_cfg)
    assert "no training config" in bench.reuse_mismatch({}, quick_cfg)
    assert bench.check_toy_work(quick, tmp_path) == []
    assert "does not match this run: kimg=51.2" in bench.check_toy_work(full, tmp_path)[0]
    _fake_toy_checkpoint(bench, tmp_path / "ddpm", quick, loss="ddpm")
    budget = bench.trained_budget(tmp_path)
    assert budget == "toy nets trained for 51.2 kimg (100 steps at batch 512)"
    assert bench.parse_args(["--quick"]).work != bench.parse_args([]).work


BENCH_MISTAKES = {
    "toy nets of another budget": (["--only", "toy"], "kimg=51.2 (this run: 2048.0)"),
    "too few real digits": (["--only", "digits", "--samples", "900", "--repeats", "2"],
                            "need 180 real digits of class 0"),
}


@pytest.mark.parametrize("case", list(BENCH_MISTAKES))
def test_bench_checks_before_training_or_sampling(bench, tmp_path, case, capsys, monkeypatch):
    """The script refuses at once (exit 2, one line) instead of training, sampling or reusing
    toy nets of another budget, and writes nothing."""
    import edm_fast.train.loop

    args, message = BENCH_MISTAKES[case]
    work, out = tmp_path / "work", tmp_path / "out"
    _fake_toy_checkpoint(bench, work / "edm", bench.parse_args(["--quick"]))
    _no_heavy_work(monkeypatch)
    monkeypatch.setattr(edm_fast.train.loop, "train", lambda *_, **__: pytest.fail("trained"))
    assert bench.main([*args, "--work", str(work), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("compare_edm_ddpm.py: error: ") and message in err[-1]
    assert not out.exists()


def _labelled_images(n_per_class=40, seed=0):
    """Three classes of 8x8 RGB pictures told apart by where they are bright."""
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for c in range(3):
        x = 0.3 * torch.randn(n_per_class, 3, 8, 8, generator=g) - 0.5
        x[:, c % 3, :, :] += 1.0  # one bright colour channel per class
        images.append(x.clamp(-1, 1))
        labels += [c] * n_per_class
    return torch.cat(images), torch.tensor(labels)


@pytest.fixture(scope="module")
def labelled_scorer():
    from edm_fast.eval.compare import LabelledDataScorer

    images, labels = _labelled_images()
    return LabelledDataScorer(images, labels, 3, steps=150)


def test_labelled_data_scorer_holds_out_a_stratified_part(labelled_scorer):
    """20% of each class is held out (8 of 40): the classifier never trains on it, and it is
    what the real-data floor is scored on; the classifier separates these classes."""
    s = labelled_scorer
    assert torch.bincount(s.real_labels).tolist() == [8, 8, 8]
    assert s.holdout_accuracy >= 0.95 and s.shape == (3, 8, 8) and s.feature_dim == 64


def test_labelled_data_scorer_tells_real_from_wrong_images(labelled_scorer):
    """Fresh images of the right classes score near the held-out floor (accuracy ~1, small FD);
    the same images with shuffled labels keep their FD but lose their accuracy, and noise
    scores far worse on both."""
    s = labelled_scorer
    fresh, labels = _labelled_images(n_per_class=20, seed=1)
    good = s(fresh, labels, 0)
    floor = s.reference(24, 0)
    wrong = s(fresh, labels.roll(20), 0)
    noise = s(torch.rand(60, 3, 8, 8) * 2 - 1, labels, 0)
    assert good["acc"] >= 0.95 and floor["acc"] >= 0.95 and wrong["acc"] <= 0.1
    assert wrong["fd"] == pytest.approx(good["fd"])
    assert noise["fd"] > 10 * max(good["fd"], floor["fd"]) and noise["acc"] < 0.7


def test_labelled_data_scorer_needs_images_of_every_class():
    from edm_fast.eval.compare import LabelledDataScorer

    images, labels = _labelled_images(n_per_class=2)
    labels[0:2] = 1  # class 0 keeps no image
    with pytest.raises(ValueError, match="images of every class"):
        LabelledDataScorer(images, labels, 3, steps=1)
    labels[0] = 0  # one image of class 0: it trains the classifier; the floor leaves it out
    scorer = LabelledDataScorer(images, labels, 3, steps=1)
    assert 0 not in scorer.real_labels.tolist() and len(scorer.reference(6, 0)) == 2
    assert "a single image" in scorer.bias_note(3, 1)


def test_compare_command_on_a_labelled_folder(tmp_path):
    """`compare --data FOLDER` scores two models of a user's folder with a classifier trained on
    the folder; the report says which data and has the real-data row."""
    import numpy as np
    from PIL import Image

    from edm_fast.cli.main import main
    from edm_fast.train.loop import TrainConfig, train

    images, labels = _labelled_images(n_per_class=6)
    for i, (x, y) in enumerate(zip(images, labels)):
        folder = tmp_path / "data" / f"class{int(y)}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    runs = {}
    for loss in ("edm", "ddpm"):
        out = tmp_path / loss
        train(TrainConfig(data=str(tmp_path / "data"), resolution=8, preset="tiny", loss=loss,
                          cond=True, batch=8, kimg=0.016, sample_every_kimg=0, progress=False,
                          out=str(out)))
        runs[loss] = str(out)
    code = main(["compare", "--edm", runs["edm"], "--ddpm", runs["ddpm"], "--data",
                 str(tmp_path / "data"), "--samples", "3", "--repeats", "1",
                 "--classifier-steps", "20", "--out", str(tmp_path / "report")])
    assert code == 0
    table = (tmp_path / "report" / "labelled_table.md").read_text()
    assert "real" in table.lower() and str(tmp_path / "data") in table
    assert main(["compare", "--edm", runs["edm"], "--ddpm", runs["ddpm"], "--out",
                 str(tmp_path / "r2")]) == 2  # the digits scorer refuses 3x8x8 models
