"""The CLI end to end: bundled-model sampling, outputs, and torchrun seed sharding."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import edm_fast


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "edm_fast", *args], capture_output=True,
                          text=True, **kw)


def test_default_sample_command_writes_a_grid(tmp_path):
    """`edm-fast sample --steps 18` with the bundled model: a PNG grid, in seconds."""
    out = tmp_path / "samples.png"
    res = _run(["sample", "--steps", "18", "--seeds", "0-15", "--out", str(out)])
    assert res.returncode == 0, res.stderr
    from PIL import Image

    img = Image.open(out)
    assert img.size[0] > 64 and "16 samples" in res.stdout


def test_sample_outputs_npz_and_folder(tmp_path):
    res = _run(["sample", "--steps", "4", "--seeds", "3,5", "--class", "7", "--out",
                str(tmp_path / "x.npz")])
    assert res.returncode == 0, res.stderr
    data = np.load(tmp_path / "x.npz")
    assert data["samples"].shape == (2, 1, 16, 16) and list(data["labels"]) == [7, 7]
    res = _run(["sample", "--steps", "4", "--seeds", "3,5", "--out", str(tmp_path / "dir")])
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["seed000003.png",
                                                                     "seed000005.png"]
    res = _run(["sample", "--steps", "4", "--class", "12", "--out", str(tmp_path / "y.png")])
    assert res.returncode != 0 and "--class must be in 0..9" in res.stderr


def test_torchrun_shards_seeds_and_matches_single_process(tmp_path):
    """torchrun --nproc_per_node=2 -m edm_fast sample: each rank samples seeds[rank::2] and
    writes its own file; together they equal a single-process run seed for seed (to float
    rounding of the net at a different batch size: 1e-5)."""
    single = tmp_path / "one.npz"
    res = _run(["sample", "--steps", "6", "--seeds", "0-7", "--out", str(single)])
    assert res.returncode == 0, res.stderr
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", "-m", "edm_fast", "sample", "--steps", "6",
                          "--seeds", "0-7", "--device", "cpu", "--out", str(tmp_path / "d.npz")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    ref = np.load(single)
    by_seed = dict(zip(ref["seeds"].tolist(), ref["samples"]))
    seen = []
    for rank in (0, 1):
        part = np.load(tmp_path / f"d.rank{rank}.npz")
        assert part["seeds"].tolist() == list(range(rank, 8, 2))
        for seed, sample in zip(part["seeds"].tolist(), part["samples"]):
            assert np.allclose(sample, by_seed[seed], atol=1e-5), seed
            seen.append(seed)
    assert sorted(seen) == list(range(8))
    assert "8 samples" in res.stdout


def test_compare_command_writes_report(tmp_path):
    """`edm-fast compare` on the bundled EDM and DDPM models, tiny sample counts."""
    res = _run(["compare", "--samples", "10", "--repeats", "2", "--out", str(tmp_path)])
    assert res.returncode == 0, res.stderr[-2000:]
    table = (tmp_path / "digits_table.md").read_text()
    assert "DDPM ancestral" in table and "EDM Heun" in table and "real data" in table
    assert (tmp_path / "digits_quality_vs_nfe.png").stat().st_size > 1000


def test_bench_command_prints_consistent_rows():
    """`edm-fast bench` at a tiny size: one row per backend asked for plus the NVlabs-style
    loop (and k-diffusion where installed), with columns that agree with each other."""
    res = _run(["bench", "--models", "mlp", "--batches", "2", "--steps", "3", "--backends",
                "reference,onnx", "--repeats", "1", "--device", "cpu"])
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith("| mlp")]
    head = [c.strip() for c in res.stdout.splitlines()[0].strip("|").split("|")]
    rows = [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines]
    names = [r["sampler"] for r in rows]
    assert names[:3] == ["ours/reference", "ours/onnx", "nvlabs-eager"], names
    nfe = 5  # 3 Heun steps to sigma = 0: 2 * 3 - 1 evaluations
    for r in rows:  # total is printed to 0.1 ms, ms/NFE and t_F to 1 us: compare within that
        total, per_nfe, t_f = float(r["total ms"]), float(r["ms/NFE"]), float(r["t_F ms"])
        exact = per_nfe * nfe
        assert exact > 0 and abs(exact - total) <= 0.05 + nfe * 0.0005
        assert abs(float(r["img/s"]) - 2e3 / exact) <= 0.02 * float(r["img/s"])
        slack = 100 * nfe * 0.001 / exact + 0.1
        assert abs(float(r["overhead %"]) - 100 * (exact - nfe * t_f) / exact) <= slack
        # the same call with a network that costs nothing takes a fraction of the real one
        assert 0 < float(r["host %"]) < 100, r
    res = _run(["bench", "--models", "nope", "--batches", "1", "--device", "cpu"])
    assert res.returncode == 2 and "Unknown network preset 'nope'" in res.stderr


BAD_INVOCATIONS = {
    "class out of range": (["sample", "--class", "10"], "--class must be in 0..9"),
    "class, unconditional": (["sample", "--model", "toy-gmm", "--class", "1", "--out",
                              "{tmp}/t.png"], "the model is unconditional"),
    "out is a file": (["sample", "--out", "{tmp}/afile"], "is an existing file, not a folder"),
    "out suffix": (["sample", "--out", "{tmp}/x.jpg"], "unsupported output"),
    "toy into a folder": (["sample", "--model", "toy-gmm", "--out", "{tmp}/d"], "toy samples"),
    "repeated seed": (["sample", "--seeds", "0-3,2"], "seed(s) 2 more than once"),
    "sigma_min 0": (["sample", "--sigma-min", "0"], "sigma_min (--sigma-min) must be a positive"),
    "toy on onnx": (["sample", "--model", "toy-gmm", "--backend", "onnx", "--out",
                     "{tmp}/t.png"], "needs a denoiser with its preconditioning"),
    "corrupt pkl": (["sample", "--ckpt", "{tmp}/g.pkl"], "not a readable pickle snapshot"),
    "opset": (["export", "--opset", "5", "--out", "{tmp}/m.onnx"], "opset must be in 13..21"),
    "convert onto itself": (["convert", "{tmp}/m.safetensors", "--out", "{tmp}/m.safetensors"],
                            "is SRC itself"),
    "convert onto a ckpt": (["convert", "{tmp}/m.safetensors", "--out",
                             "{tmp}/ckpt-00000004.safetensors"], "names a training checkpoint"),
    "export onto a ckpt": (["export", "--format", "safetensors", "--out",
                            "{tmp}/ckpt-00000004.safetensors"], "names a training checkpoint"),
    "export device, onnx": (["export", "--device", "foo", "--out", "{tmp}/m.onnx"],
                            "--device applies to aoti and torchscript"),
    "export opset, aoti": (["export", "--format", "aoti", "--opset", "18", "--out",
                            "{tmp}/m.pt2"], "--opset applies to --format onnx only"),
    "export device, aoti": (["export", "--format", "aoti", "--device", "foo", "--out",
                             "{tmp}/m.pt2"], "bad device 'foo'"),
    "compare out empty": (["compare", "--out", ""], "--out is empty"),
    "export a toy": (["export", "--ckpt", "toy-gmm", "--format", "safetensors", "--out",
                      "{tmp}/t.safetensors"], "analytic toy model"),
    "convert an onnx": (["convert", "{tmp}/m.onnx", "--out", "{tmp}/x.safetensors"],
                        "cannot be converted back"),
    "convert a folder without checkpoints": (["convert", "{tmp}", "--out", "{tmp}/x.safetensors"],
                                             "no ckpt-*.safetensors in"),
    "train out empty": (["train", "--out", ""], "--out is empty"),
    "rho overflow": (["sample", "--rho", "0.001"], "rho=0.001 is too small"),
    "kimg 0": (["train", "--kimg", "0", "--out", "{tmp}/run"], "kimg must be a finite number > 0"),
    "lr inf": (["train", "--lr", "inf", "--out", "{tmp}/run"], "lr must be a finite number > 0"),
    "ramp-up nan": (["train", "--lr-rampup-kimg", "nan", "--out", "{tmp}/run"],
                    "lr_rampup_kimg (--lr-rampup-kimg) must be a finite number >= 0"),
    "steps 0": (["sample", "--steps", "0"], "num_steps (--steps) must be an integer >= 1"),
    "serve steps 0": (["serve", "--steps", "0"], "default_steps (--steps) must be in"),
    "train option named": (["train", "--seed", "-1", "--ema-kimg", "0", "--out", "{tmp}/run"],
                        "ema_halflife_kimg (--ema-kimg) must be"),
    "seed -1": (["train", "--seed", "-1", "--out", "{tmp}/run"], "seed must be a finite number"),
    "device meta": (["train", "--device", "meta", "--out", "{tmp}/run"], "is not supported"),
    "data is a file": (["train", "--data", "{tmp}/afile", "--out", "{tmp}/run"], "afile"),
    "toy data, image net": (["train", "--data", "toy:moons", "--out", "{tmp}/run"],
                            "use --preset toy-mlp"),
    "compare a toy": (["compare", "--edm", "toy-gmm"], "compare scores class-conditional digits"),
    "bench backend": (["bench", "--backends", "bogus"], "unknown bogus"),
    "serve port": (["serve", "--port", "-1"], "port must be in 0..65535"),
}


@pytest.mark.parametrize("case", list(BAD_INVOCATIONS))
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, case, capsys, monkeypatch):
    """Each mistake gets `edm-fast CMD: error: ...` and exit code 2, before any sampling."""
    import shutil

    from edm_fast.cli.main import main
    from edm_fast.io.models import bundled_path
    from edm_fast.sampling.sampler import Sampler

    args, message = BAD_INVOCATIONS[case]
    (tmp_path / "afile").write_text("")
    (tmp_path / "g.pkl").write_bytes(bytes(range(256)) * 8)
    model = tmp_path / "m.safetensors"
    shutil.copyfile(bundled_path("default"), model)
    before = model.read_bytes()

    def no_sampling(*_, **__):
        raise AssertionError("sampled before the error")

    monkeypatch.setattr(Sampler, "__call__", no_sampling)
    code = main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"edm-fast {args[0]}: error: ")
    assert message in err[-1]
    assert model.read_bytes() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_export_to_a_missing_device_is_a_user_error(tmp_path, capsys):
    from edm_fast.cli.main import main

    code = main(["export", "--format", "torchscript", "--device", "cuda", "--out",
                 str(tmp_path / "a.ts")])
    assert code == 2 and "CUDA is not available here" in capsys.readouterr().err


def test_help_states_defaults_once():
    """--help appends "(default: X)" only where X means something and the text has none."""
    import contextlib
    import io

    from edm_fast.cli.main import build_parser

    for command in ("sample", "train", "export", "bench", "serve", "convert", "compare"):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = " ".join(buffer.getvalue().split())
        assert "(default: None)" not in text and "default: the model's, else 0.002) (" not in text
        assert "(default:" in text  # the defaults that mean something are still shown
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    assert buffer.getvalue().strip() == f"edm-fast {edm_fast.__version__}"


def test_outputs_keep_float64_and_grids_stay_viewable(tmp_path, monkeypatch):
    from PIL import Image

    from edm_fast.io import samples as images
    from edm_fast.io.samples import save_grid, save_samples
    from edm_fast.io.models import load_denoiser

    x = torch.linspace(-1, 1, 2 * 16 * 16, dtype=torch.float64).reshape(2, 1, 16, 16)
    path = save_samples(x, tmp_path / "golden.NPZ", seeds=[0, 1])
    assert np.load(path)["samples"].dtype == np.float64  # the float64 reference, unrounded
    many = torch.zeros(400, 1, 16, 16)
    with Image.open(save_grid(many, tmp_path / "many.png")) as img:  # 20 x 20 tiles of 17 px
        assert max(img.size) <= 4096 and img.size[0] == (20 * 17 + 1) * 12
    with pytest.warns(UserWarning, match="more than image viewers open"):
        monkeypatch.setattr(images, "MAX_GRID_PIXELS", 2000**2)  # stands in for Pillow's limit
        save_grid(torch.zeros(90_000, 1, 8, 8), tmp_path / "huge.png")  # 2701 px at scale 1
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    with pytest.raises(ValueError, match="is an exported model"):
        load_denoiser(tmp_path / "m.onnx")


def test_interrupted_folder_run_keeps_finished_batches(tmp_path, monkeypatch, capsys):
    """`--out FOLDER` writes each batch as it finishes; Ctrl-C in the 2nd batch keeps the 1st."""
    from edm_fast.cli.main import main
    from edm_fast.sampling.sampler import Sampler

    calls, sample = [], Sampler.__call__

    def interrupted_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(Sampler, "__call__", interrupted_second_batch)
    code = main(["sample", "--steps", "2", "--seeds", "10-17", "--batch", "4", "--backend",
                 "reference", "--out", str(tmp_path / "imgs")])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == [
        f"seed{s:06d}.png" for s in range(10, 14)]


def test_class_by_folder_name_and_guidance_warning(tmp_path, capsys):
    """A model trained on `cat/`, `dog/` folders samples `--class dog` (index 1); guidance on a
    model trained without label dropout warns that its unconditional branch is untrained."""
    from data_fixtures import make_image_folder

    from edm_fast.cli.main import main
    from edm_fast.train.loop import TrainConfig, train

    make_image_folder(tmp_path / "pets")
    train(TrainConfig(data=str(tmp_path / "pets"), out=str(tmp_path / "run"), preset="tiny",
                      cond=True, resolution=8, batch=4, kimg=0.004, sample_every_kimg=0,
                      progress=False, net_overrides={"channel_mult": [1, 2],
                                                     "attn_resolutions": [4]}))
    common = ["sample", "--ckpt", str(tmp_path / "run"), "--steps", "2", "--seeds", "0-1"]
    assert main([*common, "--class", "dog", "--out", str(tmp_path / "dog.npz")]) == 0
    assert list(np.load(tmp_path / "dog.npz")["labels"]) == [1, 1]
    capsys.readouterr()
    assert main([*common, "--class", "cow", "--out", str(tmp_path / "cow.npz")]) == 2
    assert "its classes: cat, dog" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="trained with label_dropout=0"):
        assert main([*common, "--guidance", "2", "--out", str(tmp_path / "g.npz")]) == 0


def test_nan_options_and_a_nan_checkpoint_are_one_line_errors(tmp_path):
    """--S-churn nan is refused with the options (exit 2); a checkpoint with a NaN weight is
    refused when it loads, with one 'error:' line naming NaN/Inf (exit 2), not a traceback."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from edm_fast.io.models import bundled_path

    res = _run(["sample", "--steps", "4", "--seeds", "0-1", "--S-churn", "nan",
                "--out", str(tmp_path / "a.png")])
    assert res.returncode == 2 and "S_churn (--S-churn) must be a finite" in res.stderr, res.stderr
    src = bundled_path("default")
    with safe_open(src, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    name = next(k for k, t in tensors.items() if t.is_floating_point() and t.numel() > 1)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, tmp_path / "nan.safetensors", metadata=meta)
    res = _run(["sample", "--ckpt", str(tmp_path / "nan.safetensors"), "--steps", "4",
                "--seeds", "0-1", "--out", str(tmp_path / "b.png")])
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "error: " in res.stderr and "NaN/Inf" in res.stderr
    assert not (tmp_path / "b.png").exists()


def test_rank_device_gives_each_torchrun_rank_its_own_gpu(monkeypatch):
    """Under torchrun a CUDA job runs rank r on cuda:LOCAL_RANK (a bare 'cuda' put every rank
    on GPU 0); more ranks than GPUs is an error; CPU and single-process runs are unchanged.
    (Logic only: torch.device('cuda', i) is built without touching CUDA.)"""
    from edm_fast.train.distributed import rank_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert rank_device(cuda) == cuda and rank_device(cpu) == cpu
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert rank_device(cuda) == torch.device("cuda", 2)
    assert rank_device(torch.device("cuda", 0)) == torch.device("cuda", 2)
    assert rank_device(cpu) == cpu
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(ValueError, match="--nproc_per_node 4 or fewer"):
        rank_device(cuda)


def test_cli_leaves_the_process_group_it_joined(monkeypatch, tmp_path):
    """init_distributed joins a gloo group (a real one, of one process) and registers leaving it
    at exit; the CLI leaves it when its command ends, even on an error, and leaving twice is a
    no-op. A torchrun job that left its gloo group to the interpreter's teardown could abort
    after finishing its work ('terminate called without an active exception', SIGABRT: seen
    once in CI on the two-process training test)."""
    import socket

    import torch.distributed as dist

    from edm_fast.train import distributed
    from edm_fast.cli.main import main

    with socket.socket() as s:  # a free port for the one-process rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed, "world_info", lambda: (0, 0, 2))  # as under torchrun
    registered = []
    monkeypatch.setattr(distributed.atexit, "register", registered.append)
    try:
        distributed.init_distributed(torch.device("cpu"))
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        assert registered == [distributed.close_distributed]
        code = main(["sample", "--ckpt", str(tmp_path / "missing.safetensors"),
                     "--out", str(tmp_path / "x.png")])
        assert code == 2  # the command failed, and still left the group
        assert not dist.is_initialized()
        distributed.close_distributed()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_torchrun_with_more_ranks_than_seeds_succeeds(tmp_path):
    """torchrun --nproc_per_node=2 with one seed: rank 1 has no seeds and exits 0 (it failed
    the whole job with 'batch_size must be >= 1'); rank 0 writes the image."""
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29537", "-m", "edm_fast", "sample", "--steps", "3",
                          "--seeds", "5", "--device", "cpu", "--out", str(tmp_path / "imgs")],
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert [p.name for p in (tmp_path / "imgs").iterdir()] == ["seed000005.png"]


def test_npz_keeps_seeds_above_two_to_the_63_exact(tmp_path):
    """Seeds span [0, 2^64): a large one beside small ones is stored as uint64, not rounded
    through float64."""
    big = 2**63 + 1
    res = _run(["sample", "--steps", "2", "--seeds", f"1,{big}", "--out", str(tmp_path / "s.npz")])
    assert res.returncode == 0, res.stderr
    seeds = np.load(tmp_path / "s.npz")["seeds"]
    assert seeds.dtype == np.uint64 and seeds.tolist() == [1, big]


def test_output_kinds_of_odd_paths(tmp_path, monkeypatch):
    """An empty --out and a bare '.png' are refused (they wrote into the current folder or a
    hidden folder named '.png'); a trailing '/' makes a dotted name a folder; an existing
    dotted folder is a folder; other suffixes are refused."""
    from edm_fast.io.samples import check_output, output_kind

    monkeypatch.chdir(tmp_path)
    for bad, match in (("", "empty"), ("  ", "empty"), (".png", "no file name"),
                       ("sub/.NPZ", "no file name"), ("x.jpg", "unsupported output")):
        with pytest.raises(ValueError, match=match):
            check_output(bad)
    assert output_kind("a.PNG") == ".png" and output_kind("a.npz") == ".npz"
    assert output_kind("run.v2/") == "" and output_kind("imgs") == ""
    (tmp_path / "old.v1").mkdir()
    assert output_kind("old.v1") == ""
    res = _run(["sample", "--steps", "2", "--seeds", "0,1", "--out", "run.v2/"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "run.v2").iterdir()) == ["seed000000.png",
                                                                        "seed000001.png"]
    res = _run(["sample", "--steps", "2", "--seeds", "0", "--out", ""], cwd=tmp_path)
    assert res.returncode == 2 and "output path is empty" in res.stderr


def test_plan_command_writes_the_plan_sample_runs(tmp_path, capsys):
    """`edm-fast plan` writes the program Sampler builds for the same model and options (the
    model's sigma range and rounding included), readable by program_file; a solver option the
    solver does not read is one error line naming it."""
    from edm_fast.cli.main import main
    from edm_fast.io.program_file import read_program_file
    from edm_fast.sampling.sampler import Sampler

    out = tmp_path / "plan.txt"
    assert main(["plan", "--ckpt", "default-ddpm", "--solver", "dpmpp_2m", "--steps", "7",
                 "--guidance", "1.5", "--guidance-interval", "0.5,10", "--out", str(out)]) == 0
    plan = read_program_file(out)
    want = Sampler("default-ddpm", solver="dpmpp_2m", num_steps=7, guidance=1.5,
                   guidance_interval=(0.5, 10), backend="reference", device="cpu").plan
    assert plan.program == want.program and plan.guidance == 1.5
    assert plan.sigmas == want.sigmas and plan.sigmas[0] != 80  # rounded to a DDPM level
    assert main(["plan", "--solver", "heun", "--eta", "0.5", "--out", str(out)]) == 2
    assert "eta does not apply to solver 'heun'" in capsys.readouterr().err
