"""A corpus of hostile and malformed model files (what a user might download), for
tests/test_hostile_files.py: ``make_corpus(folder) -> {name: path}``.

Every file is small (at most ~1 MB) but, read naively, makes a loader exhaust memory, CPU or
disk, run code, or die with a traceback. Each must be refused by ``edm-fast convert`` and
``edm-fast sample --ckpt`` with exit code 2 and one line naming the file.

    python tests/hostile_files.py FOLDER     # write the corpus to FOLDER and list it
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import struct
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "edm_fast" / "assets" / "edm-digits.safetensors"


# ------------------------------------------------------------------------------------------
# Pickles: globals written under the names official snapshots use, without their code.

class _Call:
    """Pickles as ``func(*args)`` (REDUCE), then BUILD with ``state`` when given."""

    def __init__(self, func, *args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        if self.state is None:
            return self.func, self.args
        return self.func, self.args, self.state


_STUBS: dict = {}


def _fake_global(module: str, name: str):
    """``module.name`` itself when importable (torch's functions pickle by reference), else a
    stand-in function that pickles as ``module.name`` (torch_utils.persistence)."""
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError):
        pass
    if (module, name) not in _STUBS:
        def stub(*args):
            raise RuntimeError("never called")

        stub.__module__, stub.__qualname__, stub.__name__ = module, name, name
        _STUBS[module, name] = stub
    parts = module.split(".")
    for i in range(1, len(parts) + 1):  # registered while pickling only (see _stub_modules)
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    setattr(sys.modules[module], name, _STUBS[module, name])
    return _STUBS[module, name]


_STORAGE = object()  # stands for the one storage of a legacy stream


def _storage(values: torch.Tensor):
    """What torch pickles a storage as: _load_from_bytes(legacy torch.save stream)."""
    return _Call(_fake_global("torch.storage", "_load_from_bytes"), _legacy_storage(values))


def _legacy_storage(values: torch.Tensor) -> bytes:
    """A legacy torch.save stream of one float32 storage, written by hand (protocol 2)."""
    out = io.BytesIO()
    for obj in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                                 "type_sizes": {"int": 4}}):
        pickle.dump(obj, out, protocol=2)
    float_storage = _fake_global("torch", "FloatStorage")

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is _STORAGE:
                return ("storage", float_storage, "0", "cpu", values.numel())
            return None

    P(out, protocol=2).dump(_STORAGE)
    pickle.dump(["0"], out, protocol=2)
    out.write(struct.pack("<q", values.numel()))
    out.write(values.float().numpy().tobytes())
    return out.getvalue()


def _tensor(values, size, stride, state=None):
    rebuild = _fake_global("torch._utils", "_rebuild_tensor_v2")
    return _Call(rebuild, _storage(values), 0, tuple(size), tuple(stride), False, OrderedDict(),
                 state=state)


def _record(class_name: str, state: dict):
    """An official persistent object: _reconstruct_persistent_obj(meta)."""
    meta = {"type": "class", "version": 6, "class_name": class_name, "state": state,
            "module_src": "import os\nos.system('echo pwned')\n"}
    return _Call(_fake_global("torch_utils.persistence", "_reconstruct_persistent_obj"), meta)


def _dump(root, path: Path) -> None:
    path.write_bytes(pickle.dumps(root, protocol=4))


def _zip_bomb(path: Path, member: str, size: int, other: dict[str, bytes]) -> None:
    """A torch-style archive whose ``member`` deflates ``size`` zero bytes (~size/1000)."""
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in other.items():
            zf.writestr(name, data)
        info = zipfile.ZipInfo(member)
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as f:
            for _ in range(size >> 20):
                f.write(chunk)


# ------------------------------------------------------------------------------------------
# edm-fast safetensors checkpoints: the bundled digits model with one thing wrong.

def _digits():
    from safetensors import safe_open

    with safe_open(str(DIGITS), framework="pt") as f:
        meta = json.loads(f.metadata()["edm_fast"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return tensors, meta


def _safetensors(path: Path, tensors: dict, meta: dict | None) -> None:
    from safetensors.torch import save_file

    metadata = None if meta is None else {"edm_fast": json.dumps(meta)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def make_corpus(folder) -> dict[str, Path]:
    """Write every hostile file into ``folder``; {case name: path}. The stand-in modules that
    pickling needs (torch_utils.*) are removed from sys.modules afterwards, so the process is
    left as it was (other tests check that loading never imports torch_utils)."""
    before = set(sys.modules)
    try:
        return _make_corpus(folder)
    finally:
        for name in set(sys.modules) - before:
            if name.startswith("torch_utils"):
                del sys.modules[name]


def _make_corpus(folder) -> dict[str, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    def add(name: str) -> Path:
        files[name] = folder / name
        return files[name]

    # --- official pickles --------------------------------------------------------------------
    four = torch.arange(4, dtype=torch.float32)
    # a stride-0 view: 2**28 floats (1 GiB) of a 4-element storage
    _dump({"ema": _record("EDMPrecond", {"_parameters": {
        "w": _tensor(four, (1 << 28,), (0,))}})}, add("stride0-view.pkl"))
    # BUILD on a tensor: Tensor.__setstate__ -> set_() grows the storage to 2**28 elements
    grow = (_storage(four), 0, (1 << 28,), (1,))
    _dump({"ema": _tensor(four, (4,), (1,), state=grow)}, add("set-growth.pkl"))
    # billion laughs: 2**40 list entries from 40 shared references
    laugh: list = ["lol"]
    for _ in range(40):
        laugh = [laugh, laugh]
    _dump({"ema": None, "dataset_kwargs": {"laughs": laugh}}, add("billion-laughs.pkl"))
    # the same with many memoised tensors: storage budget
    # one 256 KB tensor under 4096 names: 1 GiB once written out
    shared = _tensor(torch.zeros(1 << 16), (1 << 16,), (1,))
    _dump({"ema": _record("EDMPrecond", {"_parameters": {f"w{i}": shared for i in range(4096)}})},
          add("shared-tensor.pkl"))
    # a 14-byte pickle announcing a 2**62-byte string (BINBYTES8)
    add("length-2e62.pkl").write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 1 << 62) + b"abc")
    # os.system(...) as a global
    add("os-system.pkl").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    # an official-looking wrapper whose class is not supported
    _dump({"ema": _record("os.system", {})}, add("unknown-wrapper.pkl"))
    # garbage bytes
    add("garbage.pkl").write_bytes(os.urandom(4096))
    add("garbage.pt").write_bytes(b"PK\x03\x04" + os.urandom(4096))
    # zip bombs: 128 MiB deflated to ~130 KB, as the pickle and as a storage record
    _zip_bomb(add("zipbomb-pickle.pt"), "archive/data.pkl", 128 << 20, {})
    _zip_bomb(add("zipbomb-storage.pt"), "archive/data/0", 128 << 20,
              {"archive/data.pkl": _zip_storage_pickle(1 << 25)})

    # --- edm-fast safetensors ----------------------------------------------------------------
    tensors, meta = _digits()
    ema = {k: v for k, v in tensors.items() if k.startswith("ema.")}
    first = next(iter(ema))

    def variant(name, *, t=None, m=None):
        _safetensors(add(name), ema if t is None else t, meta if m is None else m)

    variant("wrong-shape.safetensors", t={**ema, first: ema[first].flatten()[:-1]})
    variant("nan-weights.safetensors", t={**ema, first: ema[first].clone().fill_(math.nan)})
    variant("inf-weights.safetensors", t={**ema, first: ema[first].clone().fill_(math.inf)})
    variant("int32-weights.safetensors", t={**ema, first: ema[first].to(torch.int32)})
    variant("bool-weights.safetensors", t={**ema, first: ema[first] > 0})
    variant("missing-key.safetensors", t={k: v for k, v in ema.items() if k != first})
    variant("extra-key.safetensors", t={**ema, "ema.evil": torch.zeros(3)})
    _safetensors(add("zero-tensors.safetensors"), {}, meta)
    variant("unknown-arch.safetensors", m={**meta, "net": {**meta["net"], "arch": "evil"}})
    variant("unknown-precond.safetensors", m={**meta, "precond": {"name": "evil"}})
    variant("negative-sample-shape.safetensors", m={**meta, "sample_shape": [-1, 8, 8]})
    variant("huge-sample-shape.safetensors", m={**meta, "sample_shape": [1, 32768, 32768]})
    kwargs = {**meta["net"]["kwargs"], "model_channels": 4096}
    variant("huge-model-channels.safetensors", m={**meta, "net": {**meta["net"],
                                                                  "kwargs": kwargs}})
    variant("no-net-metadata.safetensors", m={k: v for k, v in meta.items() if k != "net"})
    add("garbage.safetensors").write_bytes(os.urandom(4096))
    return files


def _zip_storage_pickle(numel: int) -> bytes:
    """data.pkl of a torch zip archive: {'net': _rebuild_tensor_v2(storage '0' of numel
    floats)} with the storage as a persistent id."""
    float_storage = _fake_global("torch", "FloatStorage")

    class Marker:
        pass

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is Marker:
                return ("storage", float_storage, "0", "cpu", numel)
            return None

    out = io.BytesIO()
    rebuild = _fake_global("torch._utils", "_rebuild_tensor_v2")
    P(out, protocol=2).dump({"net": _Call(rebuild, Marker, 0, (numel,), (1,), False,
                                          OrderedDict())})
    return out.getvalue()


if __name__ == "__main__":
    for case, path in make_corpus(sys.argv[1]).items():
        print(f"{path.stat().st_size:>10,}  {case}")
