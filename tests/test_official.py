"""edm_fast.io.official: official NVlabs/edm snapshots, read without executing their code.

No network and no real official file: a subprocess writes snapshots in the official format with
a test double of ``torch_utils.persistence`` (same pickle structure: every network object reduces
to ``_reconstruct_persistent_obj(meta)`` with ``module_src``, ``class_name`` and ``state``;
tensors reduce as torch's ``Tensor.__reduce_ex__`` does, storages through
``torch.storage._load_from_bytes``) and official-like EDM/VP/VE/iDDPM wrappers around
edm-fast's SongUNet/DhariwalUNet, which are state-dict compatible with the official nets. A fresh
subprocess, where ``torch_utils`` cannot be imported, then reads them with edm_fast.io.official.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# A test double of NVlabs/edm torch_utils/persistence.py: only the pickle structure.
PERSISTENCE = '''
"""Test double of torch_utils.persistence (pickling side only)."""
import copy
import inspect
import sys

_version = 6
_decorated = {}


def persistent_class(cls):
    if cls in _decorated.values():
        return cls
    if cls not in _decorated:
        _decorated[cls] = _decorate(cls)
    return _decorated[cls]


def _decorate(cls):
    source = inspect.getsource(sys.modules[cls.__module__])

    class Persistent(cls):
        module_src = source
        class_name = cls.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        def __reduce__(self):
            meta = dict(type="class", version=_version, module_src=type(self).module_src,
                        class_name=self.class_name, state=dict(self.__dict__))
            return (_reconstruct_persistent_obj, (meta,), None)

    Persistent.__name__ = Persistent.__qualname__ = cls.__name__
    Persistent.__module__ = cls.__module__
    return Persistent


def _reconstruct_persistent_obj(meta):
    raise RuntimeError("the test double only writes snapshots")
'''

# Official-like wrappers (the math of NVlabs/edm training/networks.py, written anew) around
# edm-fast's nets; sub-layers are made persistent too, as the official ones are.
NETWORKS = '''
"""Official-like EDM preconditioners around edm-fast's networks."""
import numpy as np
import torch
from torch_utils import persistence

from edm_fast.nets import dhariwal_unet, song_unet

MODELS = {"SongUNet": persistence.persistent_class(song_unet.SongUNet),
          "DhariwalUNet": persistence.persistent_class(dhariwal_unet.DhariwalUNet)}


class _Wrapper(torch.nn.Module):
    def _setup(self, img_resolution, img_channels, label_dim, use_fp16, model_type,
               model_kwargs, out_factor=1):
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.label_dim, self.use_fp16 = label_dim, use_fp16
        self.model = MODELS[model_type](
            img_resolution=img_resolution, in_channels=img_channels,
            out_channels=img_channels * out_factor, label_dim=label_dim, **model_kwargs)
        for layer in self.model.modules():
            if type(layer).__module__.startswith("edm_fast."):
                layer.__class__ = persistence.persistent_class(type(layer))
                layer.__dict__.setdefault("_init_args", ())
                layer.__dict__.setdefault("_init_kwargs", {})

    def forward(self, x, sigma, class_labels):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model(c_in * x, c_noise.flatten(), class_labels=class_labels)
        return c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)


@persistence.persistent_class
class EDMPrecond(_Wrapper):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float("inf"), sigma_data=0.5, model_type="DhariwalUNet", **kw):
        super().__init__()
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self._setup(img_resolution, img_channels, label_dim, use_fp16, model_type, kw)

    def coefficients(self, sigma):
        sd = float(self.sigma_data)
        return (sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / (sigma ** 2 + sd ** 2).sqrt(),
                1 / (sd ** 2 + sigma ** 2).sqrt(), sigma.log() / 4)


@persistence.persistent_class
class VPPrecond(_Wrapper):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9,
                 beta_min=0.1, M=1000, epsilon_t=1e-5, model_type="SongUNet", **kw):
        super().__init__()
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        self._setup(img_resolution, img_channels, label_dim, use_fp16, model_type, kw)

    def coefficients(self, sigma):
        t = ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt()
             - self.beta_min) / self.beta_d
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * t


@persistence.persistent_class
class VEPrecond(_Wrapper):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.02,
                 sigma_max=100, model_type="SongUNet", **kw):
        super().__init__()
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self._setup(img_resolution, img_channels, label_dim, use_fp16, model_type, kw)

    def coefficients(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()


@persistence.persistent_class
class iDDPMPrecond(_Wrapper):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, C_1=0.001,
                 C_2=0.008, M=1000, model_type="DhariwalUNet", **kw):
        super().__init__()
        self.C_1, self.C_2, self.M = C_1, C_2, M
        self._setup(img_resolution, img_channels, label_dim, use_fp16, model_type, kw, 2)
        u = torch.zeros(M + 1)  # float32 recursion, as in the official buffer
        for j in range(M, 0, -1):
            ratio = (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1)
            u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
        self.register_buffer("u", u)

    def alpha_bar(self, j):
        return (0.5 * np.pi * torch.as_tensor(j) / self.M / (self.C_2 + 1)).sin() ** 2

    def coefficients(self, sigma):
        dist = torch.cdist(sigma.reshape(1, -1, 1), self.u.reshape(1, -1, 1))
        index = dist.argmin(2).reshape(sigma.shape).to(torch.float32)
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), self.M - 1 - index
'''

def _np(dtype: str, value) -> dict:
    """A numpy scalar in the wrapper kwargs (made by the build script; JSON-able here)."""
    return {"numpy": dtype, "value": value}


SMALL_SONG = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
DDPMPP = dict(SMALL_SONG, embedding_type="positional", channel_mult_noise=1,
              encoder_type="standard", decoder_type="standard", resample_filter=[1, 1])
NCSNPP = dict(SMALL_SONG, embedding_type="fourier", channel_mult_noise=2,
              encoder_type="residual", decoder_type="standard", resample_filter=[1, 3, 3, 1])
SKIP = dict(NCSNPP, encoder_type="skip", decoder_type="skip")
ADM = dict(model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])

# name -> (wrapper class, wrapper kwargs, label_dim, expected edm-fast arch)
CASES = {
    "edm-ddpmpp-cond": ("EDMPrecond", dict(DDPMPP, model_type="SongUNet", augment_dim=9,
                                           use_fp16=True, sigma_data=_np("float64", 0.5),
                                           dropout=_np("float64", 0.13)), 4, "ddpmpp"),
    "edm-ncsnpp-uncond": ("EDMPrecond", dict(NCSNPP, model_type="SongUNet"), 0, "ncsnpp"),
    "edm-adm-cond": ("EDMPrecond", dict(ADM, model_type="DhariwalUNet", use_fp16=True), 5, "adm"),
    "vp-ddpmpp-uncond": ("VPPrecond", dict(DDPMPP), 0, "ddpmpp"),
    "ve-ncsnpp-cond": ("VEPrecond", dict(NCSNPP, sigma_max=_np("float32", 80.0)), 3, "ncsnpp"),
    "iddpm-adm-cond": ("iDDPMPrecond", dict(ADM), 5, "adm"),
    "iddpm-ncsnpp-skip": ("iDDPMPrecond", dict(SKIP, model_type="SongUNet"), 0, "ncsnpp"),
}
TRAINING_STATE = "training-state-000100.pt"  # torch zip archive of {'net', 'optimizer_state'}
ALL_NETS = [*CASES, TRAINING_STATE]
PRECOND_NAMES = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve",
                 "iDDPMPrecond": "iddpm"}

# Snapshots the loader must refuse: file -> the global named in the error.
SYSTEM = f"{os.system.__module__}.system"  # how pickle names os.system: posix.system on Linux
MALICIOUS = {"evil-os-system.pkl": "os.system", "evil-eval.pkl": "builtins.eval",
             "evil-nested.pkl": SYSTEM, "evil-storage.pkl": SYSTEM}

BUILD = '''
import json, os, pickle, sys
import numpy as np
import torch
from safetensors.torch import save_file
import official_networks as nets

out, cases = sys.argv[1], json.loads(sys.argv[2])
torch.manual_seed(0)


def build(cls, kwargs, label_dim):
    kwargs = {k: getattr(np, v["numpy"])(v["value"]) if isinstance(v, dict) else v
              for k, v in kwargs.items()}
    net = getattr(nets, cls)(img_resolution=np.int64(8), img_channels=3,
                             label_dim=np.int64(label_dim) if label_dim else 0, **kwargs)
    with torch.no_grad():
        for p in net.parameters():  # official inits zero some outputs; make every path count
            p.add_(0.05 * torch.randn_like(p))
    return net.eval().requires_grad_(False)


def reference(name, net, label_dim):
    n = 4
    x = torch.randn(n, 3, 8, 8) * 2
    if type(net).__name__ == "iDDPMPrecond":  # the sigmas the iDDPM sampler uses: u_j
        sigma = net.u[torch.randint(0, net.M, (n,))]
    else:
        sigma = torch.exp(torch.empty(n).uniform_(np.log(0.002), np.log(80)))
    labels = (torch.nn.functional.one_hot(torch.arange(n) % label_dim, label_dim).float()
              if label_dim else None)
    with torch.no_grad():
        D = net(x, sigma, labels)
    tensors = {f"state.{k}": v.clone().contiguous() for k, v in net.state_dict().items()}
    tensors.update(x=x, sigma=sigma, D=D)
    with open(os.path.join(out, name + ".keys.json"), "w") as f:
        json.dump(list(net.state_dict()), f)
    if labels is not None:
        tensors["labels"] = labels
    save_file(tensors, os.path.join(out, name + ".ref.safetensors"))


def snapshot(net):
    return {"ema": net, "loss_fn": None, "augment_pipe": None,
            "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset",
                               "path": "datasets/tiny.zip", "resolution": np.int64(8)}}


class Call:  # pickles as a call of any global, as a malicious file would
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


for name, (cls, kwargs, label_dim, _) in cases.items():
    net = build(cls, kwargs, label_dim)
    reference(name, net, label_dim)
    with open(os.path.join(out, name + ".pkl"), "wb") as f:
        pickle.dump(snapshot(net), f)

# training-state-*.pt: torch.save (zip archive, pickle protocol 2) of the training net + Adam.
net = build("EDMPrecond", cases["edm-adm-cond"][1], 5).train().requires_grad_(True)
opt = torch.optim.Adam(net.parameters(), lr=1e-3)
for p in net.parameters():
    p.grad = torch.randn_like(p)
opt.step()
reference("training-state-000100.pt", net.eval(), 5)
torch.save(dict(net=net, optimizer_state=opt.state_dict()),
           os.path.join(out, "training-state-000100.pt"))

# Malicious files.
pwned = os.path.join(out, "pwned")
with open(os.path.join(out, "evil-os-system.pkl"), "wb") as f:
    f.write(b"cos\\nsystem\\n(V" + f"touch {pwned}-system".encode() + b"\\ntR.")
with open(os.path.join(out, "evil-eval.pkl"), "wb") as f:
    pickle.dump(Call(eval, f"open({pwned + '-eval'!r}, 'w').write('x')"), f)
with open(os.path.join(out, "evil-nested.pkl"), "wb") as f:
    data = snapshot(build("VEPrecond", cases["ve-ncsnpp-cond"][1], 3))
    data["dataset_kwargs"]["path"] = Call(os.system, f"touch {pwned}-nested")
    pickle.dump(data, f)
legacy = pickle.dumps(0x1950A86A20F9469CFC6C, 2) + pickle.dumps(1001, 2)
legacy += pickle.dumps({"little_endian": True}, 2)
legacy += pickle.dumps(Call(os.system, f"touch {pwned}-storage"), 2)
with open(os.path.join(out, "evil-storage.pkl"), "wb") as f:
    pickle.dump(Call(torch.storage._load_from_bytes, legacy), f)
# A valid snapshot whose module_src would write a file if it were executed.
net = build("EDMPrecond", cases["edm-ddpmpp-cond"][1], 4)
type(net).module_src = f"open({pwned + '-src'!r}, 'w').write('x')\\n" + type(net).module_src
with open(os.path.join(out, "evil-src.pkl"), "wb") as f:
    pickle.dump(snapshot(net), f)
'''

LOAD = '''
import importlib.util, json, os, sys
import torch
from safetensors.torch import load_file, save_file
from edm_fast.io.model_card import model_card
from edm_fast.io.official import load_official, read_official

out, names, evil = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
report = {"torch_utils_importable": importlib.util.find_spec("torch_utils") is not None,
          "configs": {}, "keys": {}, "errors": {}}
for name in names:
    path = os.path.join(out, name if name.endswith(".pt") else name + ".pkl")
    state, config = read_official(path)
    save_file({k: v.contiguous() for k, v in state.items()},
              os.path.join(out, name + ".loaded.safetensors"))
    report["configs"][name] = config
    report["keys"][name] = list(state)
    den = load_official(path)
    ref = load_file(os.path.join(out, name + ".ref.safetensors"))
    with torch.no_grad():
        D = den(ref["x"], ref["sigma"], ref.get("labels"))
    report["configs"][name]["net_dtype"] = str(den.net_dtype)
    report["configs"][name]["denoiser_sample_shape"] = list(model_card(den).sample_shape)
    save_file({"D": D}, os.path.join(out, name + ".D.safetensors"))
for name in evil:
    try:
        read_official(os.path.join(out, name))
        report["errors"][name] = None
    except Exception as exc:
        report["errors"][name] = f"{type(exc).__name__}: {exc}"
state, _ = read_official(os.path.join(out, "evil-src.pkl"))
report["evil_src_tensors"] = len(state)
report["modules"] = sorted(m for m in sys.modules
                           if m.split(".")[0] in ("torch_utils", "dnnlib", "official_networks")
                           or m.startswith("_imported_module_"))
print(json.dumps(report))
'''


def _run(code: str, *args: str, path: Path | None = None, cwd: Path) -> str:
    """Run ``code`` in a fresh interpreter (one thread); ``path`` is put on its sys.path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(path) if path else ""}
    script = cwd / "script.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, "-P", str(script), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """Build every snapshot (official format) in one process, read them back in another."""
    root = tmp_path_factory.mktemp("official")
    pkg, out, work = root / "pkg", root / "snapshots", root / "work"
    for d in (pkg / "torch_utils", out, work):
        d.mkdir(parents=True)
    (pkg / "torch_utils" / "__init__.py").write_text("")
    (pkg / "torch_utils" / "persistence.py").write_text(textwrap.dedent(PERSISTENCE))
    (pkg / "official_networks.py").write_text(textwrap.dedent(NETWORKS))
    _run(BUILD, str(out), json.dumps(CASES), path=pkg, cwd=work)
    report = json.loads(_run(LOAD, str(out), json.dumps(ALL_NETS),
                             json.dumps([*MALICIOUS, "evil-src.pkl"]), cwd=work))
    return out, report


def _tensors(out: Path, name: str, kind: str) -> dict:
    return load_file(str(out / f"{name}.{kind}.safetensors"))


@pytest.mark.parametrize("name", ALL_NETS)
def test_state_dict_identical(snapshots, name):
    """(a) Every official tensor comes back with its key, order, dtype and exact values."""
    out, report = snapshots
    ref = {k[len("state."):]: v for k, v in _tensors(out, name, "ref").items()
           if k.startswith("state.")}
    loaded = _tensors(out, name, "loaded")
    order = json.loads((out / f"{name}.keys.json").read_text())  # official state_dict() order
    if name.startswith("iddpm"):  # the u table is checked against ours, then dropped
        order.remove("u")
        ref.pop("u")
    assert report["keys"][name] == order
    assert all(key.startswith("model.") for key in order)
    for key, tensor in ref.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key


@pytest.mark.parametrize("name", ALL_NETS)
def test_denoiser_matches_official(snapshots, name):
    """(b) D(x; sigma, labels) of the loaded Denoiser equals the official-like wrapper's output.

    D = c_skip x + c_out F with |c_out| <= sigma, so an error e in F shows as sigma e in D; the
    test allows |dD| <= 1e-5 + sigma e with e = 1e-5 (float32 rounding; EDM, VE and iDDPM come
    out bitwise equal on this machine) and e = 1e-4 for VP: its c_noise = (M-1) sigma^-1(sigma)
    is computed in float64 here and in float32 officially, c_noise ~ 1e1..1e3 then differs by
    about one float32 ulp (~6e-5), which the positional embedding passes on to F (~3e-5 seen).
    """
    out, _ = snapshots
    ref = _tensors(out, name, "ref")
    ours = _tensors(out, name, "D")["D"]
    e = 1e-4 if name.startswith("vp") else 1e-5
    bound = 1e-5 + e * ref["sigma"].reshape(-1, 1, 1, 1)
    assert ours.shape == ref["D"].shape
    assert ((ours - ref["D"]).abs() <= bound).all(), (ours - ref["D"]).abs().max()


@pytest.mark.parametrize("name", ALL_NETS)
def test_config(snapshots, name):
    """The config names the right precond, arch and shape; numpy scalars became numbers."""
    _, report = snapshots
    config = report["configs"][name]
    cls, kwargs, label_dim, arch = CASES.get(name, CASES["edm-adm-cond"])
    assert config["precond"]["name"] == PRECOND_NAMES[cls]
    assert config["net"]["arch"] == arch
    assert config["net"]["kwargs"]["label_dim"] == label_dim
    assert config["net"]["kwargs"]["out_channels"] == 3
    assert config["sample_shape"] == config["denoiser_sample_shape"] == [3, 8, 8]
    official = config["official"]
    assert official["precond_class"] == cls
    assert official["model_kwargs"]["out_channels"] == (
        6 if cls == "iDDPMPrecond" else 3)
    assert official["use_fp16"] is bool(kwargs.get("use_fp16", False))
    assert config["net_dtype"] == "None"  # fp32 on CPU even when use_fp16
    assert official["object"] == ("net" if name == TRAINING_STATE else "ema")
    assert len(official["module_src_sha256"]) == 64


def test_numpy_scalars_and_precond_values(snapshots):
    _, report = snapshots
    cond = report["configs"]["edm-ddpmpp-cond"]
    assert cond["net"]["kwargs"]["dropout"] == 0.13 and cond["net"]["kwargs"]["augment_dim"] == 9
    assert cond["net"]["kwargs"]["img_resolution"] == 8
    assert cond["precond"] == {"name": "edm", "sigma_data": 0.5, "sigma_min": 0.0,
                               "sigma_max": float("inf")}
    assert cond["official"]["dataset_kwargs"]["resolution"] == 8
    assert report["configs"]["ve-ncsnpp-cond"]["precond"] == {"name": "ve", "sigma_min": 0.02,
                                                              "sigma_max": 80.0}
    assert report["configs"]["vp-ddpmpp-uncond"]["precond"]["name"] == "vp"
    assert report["configs"]["iddpm-ncsnpp-skip"]["net"]["kwargs"]["decoder_type"] == "skip"


@pytest.mark.parametrize("name", list(MALICIOUS))
def test_malicious_globals_refused(snapshots, name):
    """(c) A global outside the allowlist is refused by name and never runs."""
    out, report = snapshots
    error = report["errors"][name]
    assert error is not None
    assert error.startswith("UnsafePickleError: ")  # naming the file
    assert f"{name}: refusing to load global {MALICIOUS[name]}:" in error
    assert not list(out.glob("pwned*"))


def test_module_src_is_never_executed(snapshots):
    """(c) A snapshot whose module_src writes a file loads, and the file is not written."""
    out, report = snapshots
    assert report["errors"]["evil-src.pkl"] is None and report["evil_src_tensors"] > 0
    assert not (out / "pwned-src").exists()


def test_torch_utils_never_imported(snapshots):
    _, report = snapshots
    assert not report["torch_utils_importable"]
    assert report["modules"] == []


def _convert(*argv: str) -> int:
    from edm_fast.cli.convert import add_convert_command

    parser = argparse.ArgumentParser(prog="edm-fast")
    sub = parser.add_subparsers(dest="command", required=True)
    add_convert_command(sub, argparse.ArgumentDefaultsHelpFormatter)
    args = parser.parse_args(["convert", *argv])
    return args.func(args)


@pytest.mark.parametrize("name", ["edm-ddpmpp-cond", "iddpm-adm-cond"])
def test_convert_cli_round_trip(snapshots, tmp_path, name, capsys):
    """(e) convert writes ema.* + config; the .safetensors and the .pkl give the same D."""
    from edm_fast.io.checkpoints import read_checkpoint
    from edm_fast.io.model_card import model_card
    from edm_fast.io.models import load_denoiser

    out, _ = snapshots
    src, dst = out / f"{name}.pkl", tmp_path / "model.safetensors"
    half = tmp_path / "half.safetensors"
    assert _convert(str(src), "--out", str(dst)) == 0
    assert f"{CASES[name][3]} network" in capsys.readouterr().out
    ref = _tensors(out, name, "ref")
    from_pkl, from_st = load_denoiser(src), load_denoiser(dst)
    with torch.no_grad():
        args = (ref["x"], ref["sigma"], ref.get("labels"))
        assert torch.equal(from_pkl(*args), from_st(*args))
    assert model_card(from_st).sample_shape == model_card(from_pkl).sample_shape == (3, 8, 8)
    tensors, meta = read_checkpoint(dst)
    assert all(k.startswith("ema.") for k in tensors) and meta["converted_from"] == src.name
    assert _convert(str(src), "--out", str(half), "--dtype", "float16") == 0
    halves, _ = read_checkpoint(half)
    assert all(v.dtype == torch.float16 for v in halves.values() if v.is_floating_point())
    for key, value in halves.items():
        assert torch.equal(value, tensors[key].half()), key
    assert "torch_utils" not in sys.modules


def test_convert_sample_both_ways(snapshots, tmp_path):
    """`edm-fast sample --ckpt model.safetensors` and `--ckpt official.pkl` give the same
    images (reference backend, 2 Heun steps)."""
    from edm_fast.sampling.sampler import Sampler

    out, _ = snapshots
    src, dst = out / "edm-adm-cond.pkl", tmp_path / "adm.safetensors"
    _convert(str(src), "--out", str(dst))
    images = [Sampler(str(p), batch_size=2, num_steps=2, backend="reference", device="cpu")(
              seeds=[0, 1], class_labels=torch.tensor([1, 3])) for p in (src, dst)]
    assert images[0].shape == (2, 3, 8, 8) and torch.equal(images[0], images[1])


def test_convert_refuses_malicious(snapshots, tmp_path):
    from edm_fast.io.official import UnsafePickleError

    out, _ = snapshots
    with pytest.raises(UnsafePickleError, match="refusing to load global os.system"):
        _convert(str(out / "evil-os-system.pkl"), "--out", str(tmp_path / "x.safetensors"))
    assert not (tmp_path / "x.safetensors").exists() and not list(out.glob("pwned*"))


# ------------------------------------------------------------------------------------------
# Errors that say what is wrong with SRC and --out, before anything is read or written.

CORRUPT = {
    "text": b"garbage\n",  # 'g' = GET with index 'arbage': a ValueError inside pickle
    "float": b"Fabc\n.",  # a float opcode with text that is no number (its message has a \n)
    "long": b"L12x\n.",
    "memo": b"hello world",
    "empty": b"",
    "truncated": b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x03ema",
}


@pytest.mark.parametrize("suffix", [".pkl", ".pt"])
@pytest.mark.parametrize("kind", list(CORRUPT))
def test_corrupt_snapshot_is_a_checkpoint_error_naming_the_file(tmp_path, kind, suffix):
    """A file that is no pickle (text, cut short) is a CheckpointError that names it, in one
    line: `invalid literal for int() with base 10: 'arbage'` alone named nothing."""
    from edm_fast.io.checkpoints import CheckpointError
    from edm_fast.io.official import read_official

    path = tmp_path / f"snapshot{suffix}"
    path.write_bytes(CORRUPT[kind])
    with pytest.raises(CheckpointError) as info:
        read_official(path)
    message = str(info.value)
    assert message.startswith(f"{path} is not a valid NVlabs EDM snapshot (.pkl) or training "
                              "state (.pt): not a readable pickle snapshot"), message
    assert "\n" not in message


def test_a_pickle_that_is_not_a_snapshot_names_the_file(tmp_path):
    import pickle

    from edm_fast.io.checkpoints import CheckpointError
    from edm_fast.io.official import OfficialFormatError, read_official

    path = tmp_path / "list.pkl"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(OfficialFormatError, match="expected an official EDM snapshot") as info:
        read_official(path)
    assert str(info.value).startswith(f"{path}: ") and isinstance(info.value, CheckpointError)


def test_convert_cli_corrupt_snapshot_is_one_line(tmp_path, capsys):
    from edm_fast.cli.main import main

    src, dst = tmp_path / "g.pkl", tmp_path / "g.safetensors"
    src.write_text("garbage\n")
    assert main(["convert", str(src), "--out", str(dst)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"edm-fast convert: error: {src} is not a valid "
                                               "NVlabs EDM snapshot")
    assert not dst.exists()


def test_convert_says_what_it_reads(tmp_path, monkeypatch):
    """`convert default` (a name `export --ckpt` takes) said "checkpoint not found: default"."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as info:
        _convert("default", "--out", "x.safetensors")
    message = str(info.value)
    assert "'default' is a bundled model, already an edm-fast .safetensors checkpoint" in message
    assert "convert reads an official NVlabs snapshot (.pkl), a training-state-*.pt" in message
    assert "`edm-fast export --ckpt default --format safetensors --out FILE.safetensors`" in message
    with pytest.raises(FileNotFoundError, match="no file or folder at nope.pkl; convert reads an "
                       "official NVlabs snapshot"):
        _convert("nope.pkl", "--out", "x.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out, message", [
    ("cv.onnx", ("--out {tmp}/cv.onnx: convert writes a .safetensors file, not .onnx (a .onnx "
                 "file is what `edm-fast export --format onnx` writes)")),
    ("cv.st", "convert writes a .safetensors file, not .st"),
    ("cv", "name it {tmp}/cv.safetensors (no suffix is added)"),
    ("folder.safetensors", "--out {tmp}/folder.safetensors is an existing folder"),
    ("afile/cv.safetensors", ("cannot write {tmp}/afile/cv.safetensors: {tmp}/afile is not a "
                              "writable folder")),
])
def test_convert_checks_out_before_reading(tmp_path, monkeypatch, out, message):
    """`convert ... --out cv.onnx` wrote a safetensors file that `sample` then refused as an
    ONNX export; --out is checked as `export` checks it, before SRC is read."""
    from edm_fast.io import checkpoints, official

    def no_read(*_, **__):
        raise AssertionError("read SRC before the --out check")

    monkeypatch.setattr(official, "convert_official", no_read)
    monkeypatch.setattr(checkpoints, "export_inference_checkpoint", no_read)
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "afile").write_text("")
    src = tmp_path / "snapshot.pkl"
    src.write_bytes(b"")
    with pytest.raises(ValueError) as info:
        _convert(str(src), "--out", str(tmp_path / out))
    assert message.format(tmp=tmp_path) in str(info.value)
