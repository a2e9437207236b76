"""Official NVlabs/edm snapshots, read without running their code.

An official snapshot (``edm-cifar10-32x32-cond-vp.pkl``, ``network-snapshot-*.pkl``) is a pickle
of ``{'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}``; a ``training-state-*.pt`` is a torch
zip archive of ``{'net', 'optimizer_state'}``. Every network object in them is pickled by
``torch_utils.persistence`` as a call ``_reconstruct_persistent_obj(meta)`` with
``meta = {type, version, module_src, class_name, state}``: loading it the usual way ``exec``s
``module_src``. Tensors are ``torch._utils._rebuild_tensor_v2`` calls whose storages are
``torch.storage._load_from_bytes(b)`` of a legacy ``torch.save`` stream (.pkl), or persistent
ids pointing at the archive's ``data/<key>`` records (.pt).

Here a ``RestrictedUnpickler`` resolves only an explicit allowlist of globals (``_SAFE_GLOBALS``)
and maps ``_reconstruct_persistent_obj`` to ``ModuleRecord``, an inert record (class name,
constructor kwargs, parameters, buffers, children). ``module_src`` is only hashed; nothing from
``torch_utils``, ``dnnlib`` or the file is imported or executed, and any other global raises
``UnsafePickleError`` ("refusing to load global os.system ...").

The records then give the exact official state dict (``model.*`` keys) and a config: the
precond class + kwargs select ``edm_fast.precond`` (EDM, VP, VE, iDDPM of EDM Table 1) and the
inner network (``SongUNet`` -> 'ddpmpp' | 'ncsnpp', ``DhariwalUNet`` -> 'adm') is rebuilt from
its recorded constructor kwargs and loaded with ``strict=True``.

    read_official(path) -> (state_dict, config)     load_official(path) -> Denoiser
    convert_official(src, dst) -> edm-fast inference checkpoint (ema.* + config metadata)
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
import pickle
import zipfile
import zlib
from pathlib import Path

import torch

from .checkpoints import CheckpointError

__all__ = [
    "read_official", "load_official", "convert_official", "denoiser_state_dict",
    "RestrictedUnpickler", "ModuleRecord", "UnsafePickleError", "OfficialFormatError",
]


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The file asks for a global (function or class) outside the allowlist."""


class OfficialFormatError(CheckpointError):
    """The file is safe to read but is not an official EDM network we can rebuild."""


# What a corrupt or foreign file makes the unpickler (or the records built from it) raise:
# a text file starting with 'g' is a GET opcode with a non-numeric index (ValueError), others
# give bad memo keys, wrong argument types, out-of-bounds tensor views (RuntimeError) ...
_PARSE_ERRORS = (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, zlib.error, ValueError,
                 TypeError, KeyError, IndexError, AttributeError, OverflowError, RuntimeError,
                 NotImplementedError)


# ------------------------------------------------------------------------------------------
# Inert records for pickled torch.nn.Modules (never instances of the pickled classes).

class ModuleRecord:
    """One pickled ``torch.nn.Module``: class name, constructor kwargs, tensors, children.

    Stands in for ``torch_utils.persistence._reconstruct_persistent_obj(meta)``, whose
    ``meta['state']`` is the object's ``__dict__`` (``_parameters``, ``_buffers``,
    ``_modules``, ``_init_kwargs``, plain attributes). ``module_src`` is kept as a SHA-256 only.
    """

    def __init__(self, class_name: str, state: dict, *, version=None, source_sha256=None):
        self._fill(class_name, state)
        self.version = version
        self.source_sha256 = source_sha256

    def _fill(self, class_name, state) -> None:
        if not isinstance(class_name, str) or not isinstance(state, dict):
            raise OfficialFormatError("a pickled module has no class name or no state dict")
        self.class_name = class_name
        self.init_kwargs = dict(state.get("_init_kwargs") or {})
        self.parameters = dict(state.get("_parameters") or {})
        self.buffers = dict(state.get("_buffers") or {})
        self.non_persistent = set(state.get("_non_persistent_buffers_set") or ())
        self.children = dict(state.get("_modules") or {})
        self.attrs = {k: v for k, v in state.items() if not k.startswith("_")}

    def __setstate__(self, state):
        raise UnsafePickleError(f"unexpected BUILD on the persistent record {self.class_name}")

    def __repr__(self):
        return f"ModuleRecord({self.class_name}, children={list(self.children)})"

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Keys and tensors in ``torch.nn.Module.state_dict`` order: own parameters, own
        persistent buffers, then children in registration order (None entries skipped)."""
        out = {}
        own = [*self.parameters.items(),
               *((k, v) for k, v in self.buffers.items() if k not in self.non_persistent)]
        for name, tensor in own:
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor):
                raise OfficialFormatError(f"{prefix}{name} is a {type(tensor).__name__}, "
                                          "not a tensor")
            out[prefix + name] = tensor
        for name, child in self.children.items():
            if child is None:
                continue
            if not isinstance(child, ModuleRecord):
                raise OfficialFormatError(f"{prefix}{name} is not a module")
            out.update(child.state_dict(f"{prefix}{name}."))
        return out


class _ContainerRecord(ModuleRecord):
    """A plain torch container (``torch.nn.ModuleDict`` ...): NEWOBJ, then BUILD with __dict__."""

    container_name = "torch.nn.Module"
    version = source_sha256 = None

    def __setstate__(self, state):
        self._fill(self.container_name, state)


def _container(module: str, name: str) -> type:
    full = f"{module}.{name}"
    return type(name, (_ContainerRecord,), {"container_name": full, "__module__": __name__})


_CONTAINERS = {("torch.nn.modules.container", n): _container("torch.nn.modules.container", n)
               for n in ("ModuleDict", "ModuleList", "Sequential")}


def _persistent_record(meta) -> ModuleRecord:
    """Replacement for ``torch_utils.persistence._reconstruct_persistent_obj``: an inert record;
    ``meta['module_src']`` is hashed, never imported or executed."""
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise OfficialFormatError("unsupported persistent object (expected type 'class')")
    src = meta.get("module_src")
    digest = hashlib.sha256(src.encode()).hexdigest() if isinstance(src, str) else None
    return ModuleRecord(meta.get("class_name"), meta.get("state"), version=meta.get("version"),
                        source_sha256=digest)


# ------------------------------------------------------------------------------------------
# Tensors: storages are 1-D tensors of their dtype; tensors are strided views of them.

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}
_DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                "uint8", "bool", "float", "double", "half", "long", "int")


class _StorageType:
    """What ``torch.FloatStorage`` & co. resolve to: only their dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _flat(raw: bytes, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """The 1-D tensor holding a storage's ``numel`` elements from its raw little-endian bytes."""
    if len(raw) != numel * _element_size(dtype):
        raise OfficialFormatError(f"storage holds {len(raw)} bytes, expected {numel} x "
                                  f"{_element_size(dtype)} (truncated file?)")
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False,
                    backward_hooks=None, metadata=None) -> torch.Tensor:
    """Safe twin of ``torch._utils._rebuild_tensor_v2``: a strided view of a storage (bounds
    are checked by ``as_strided``); requires_grad and hooks are dropped."""
    if not isinstance(storage, torch.Tensor) or storage.ndim != 1:
        raise OfficialFormatError("tensor storage is not a storage")
    if metadata:
        raise OfficialFormatError(f"unsupported tensor metadata {sorted(metadata)}")
    return storage.as_strided(tuple(size), tuple(stride), int(storage_offset))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """Safe twin of ``torch._utils._rebuild_parameter[_with_state]``: the plain tensor."""
    if not isinstance(data, torch.Tensor):
        raise OfficialFormatError("parameter data is not a tensor")
    return data


# ------------------------------------------------------------------------------------------
# numpy scalars and dtypes (found in _init_kwargs), read as plain Python numbers.

def _numpy():
    try:
        import numpy
    except ImportError as exc:
        raise UnsafePickleError("this file holds numpy values; install numpy to read it") from exc
    return numpy


def _numpy_scalar(dtype, data=None):
    """``numpy.core.multiarray.scalar(dtype, bytes)`` as the equivalent Python scalar."""
    np = _numpy()
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise UnsafePickleError("refusing a numpy scalar that is not plain data")
    return np.frombuffer(data, dtype=dtype, count=1)[0].item()


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (latin-1 only)."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# ------------------------------------------------------------------------------------------
# Containers: legacy torch.save streams, torch zip archives, plain pickles.

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001


def _stream_size(f) -> int:
    here = f.tell()
    size = f.seek(0, io.SEEK_END)
    f.seek(here)
    return size


def _read_legacy_rest(f):
    """The rest of a legacy (non-zip) ``torch.save`` stream after its magic number: protocol,
    sys_info, the main pickle, its storage keys, then per key an int64 element count and the
    raw little-endian bytes (torch/serialization.py ``_legacy_save``)."""
    if _unpickle(f) != _LEGACY_PROTOCOL:
        raise OfficialFormatError("unsupported legacy torch.save protocol")
    sys_info = _unpickle(f)
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian", True)):
        raise OfficialFormatError("big-endian torch.save streams are not supported")
    storages, limit = {}, _stream_size(f)

    def load(pid):
        if isinstance(pid, tuple) and pid[:1] == ("module",) and pid[1] in _CONTAINERS.values():
            return pid[1]  # legacy files name nn.Module container classes this way
        dtype, key, numel = _storage_pid(pid)
        if numel * _element_size(dtype) > limit:
            raise OfficialFormatError(f"storage {key} is larger than the file")
        return storages.setdefault(key, torch.empty(numel, dtype=dtype))

    root = _unpickle(f, load)
    for key in _unpickle(f):
        flat = storages.get(str(key))
        if flat is None:
            raise OfficialFormatError(f"storage {key} has data but no tensor")
        count = int.from_bytes(f.read(8), "little")
        if count != flat.numel():
            raise OfficialFormatError(f"storage {key}: {count} elements, expected {flat.numel()}")
        if count:
            raw = f.read(count * flat.element_size())
            flat.view(torch.uint8).copy_(_flat(raw, torch.uint8, len(raw)))
    return root


def _storage_from_legacy_bytes(data) -> torch.Tensor:
    """Safe twin of ``torch.storage._load_from_bytes``: the bytes are a legacy ``torch.save``
    stream of one storage."""
    if not isinstance(data, bytes):
        raise OfficialFormatError("_load_from_bytes expects bytes")
    f = io.BytesIO(data)
    if _unpickle(f) != _LEGACY_MAGIC:
        raise OfficialFormatError("storage bytes are not a legacy torch.save stream")
    storage = _read_legacy_rest(f)
    if not isinstance(storage, torch.Tensor):
        raise OfficialFormatError("storage bytes do not hold a storage")
    return storage


def _read_zip(path: Path):
    """A torch zip archive (``torch.save`` since 1.6): ``<dir>/data.pkl`` plus one record
    ``<dir>/data/<key>`` of raw little-endian bytes per storage."""
    with zipfile.ZipFile(path) as zf:
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise OfficialFormatError(f"{path} is a zip archive but not a torch.save archive")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in zf.namelist() and zf.read(f"{prefix}byteorder") != b"little":
            raise OfficialFormatError("big-endian torch archives are not supported")
        storages = {}

        def load(pid):
            dtype, key, numel = _storage_pid(pid)
            if key not in storages:
                try:
                    raw = zf.read(f"{prefix}data/{key}")
                except KeyError:
                    raise OfficialFormatError(f"{path} lacks the record of storage {key}") from None
                storages[key] = _flat(raw, dtype, numel)
            return storages[key]

        return _unpickle(io.BytesIO(zf.read(pickles[0])), load)


def _read_file(path: Path):
    """The root object of a zip archive, a legacy torch.save file or a plain pickle."""
    if zipfile.is_zipfile(path):
        return _read_zip(path)
    with open(path, "rb") as f:
        root = _unpickle(f)
        if isinstance(root, int) and root == _LEGACY_MAGIC:
            return _read_legacy_rest(f)
        return root


# ------------------------------------------------------------------------------------------
# The restricted unpickler.

_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,  # protocol-2 pickles use Python 2 names
    ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): _latin1_encode,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_legacy_bytes,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("dnnlib.util", "EasyDict"): dict,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    **_CONTAINERS,
}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only ``_SAFE_GLOBALS`` (plus numpy.dtype, torch dtypes
    and torch ``*Storage`` type names) and hands persistent ids to ``storage_loader``."""

    def __init__(self, file, *, storage_loader=None):
        super().__init__(file)
        self._storage_loader = storage_loader

    def find_class(self, module, name):
        found = _SAFE_GLOBALS.get((module, name))
        if found is not None:
            return found
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _DTYPE_NAMES:
            return getattr(torch, name)
        if (module, name) == ("numpy", "dtype"):
            return _numpy().dtype
        raise UnsafePickleError(f"refusing to load global {module}.{name}: it is not on the "
                                "allowlist of edm_fast.official (tensors, plain containers, "
                                "numpy scalars and EDM's persistent objects)")

    def persistent_load(self, pid):
        if self._storage_loader is None:
            raise UnsafePickleError(f"unexpected persistent id {pid!r:.80} in a plain pickle")
        return self._storage_loader(pid)


def _unpickle(f, storage_loader=None):
    return RestrictedUnpickler(f, storage_loader=storage_loader).load()


def _storage_pid(pid):
    """(dtype, key, numel) of a persistent id ('storage', type, key, location, numel[, view])."""
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
        raise OfficialFormatError(f"unsupported persistent id {pid!r:.80}")
    if len(pid) == 6 and pid[5] is not None:
        raise OfficialFormatError("storage views (torch < 0.4 files) are not supported")
    return pid[1].dtype, str(pid[2]), int(pid[4])


# ------------------------------------------------------------------------------------------
# From records to edm-fast: precond (EDM Table 1) and network (EDM App. F) configs.

# official precond class -> (edm-fast precond name, {argument: official default})
_PRECONDS = {
    "EDMPrecond": ("edm", {"sigma_data": 0.5, "sigma_min": 0.0, "sigma_max": math.inf}),
    "VPPrecond": ("vp", {"beta_d": 19.9, "beta_min": 0.1, "M": 1000, "epsilon_t": 1e-5}),
    "VEPrecond": ("ve", {"sigma_min": 0.02, "sigma_max": 100.0}),
    "iDDPMPrecond": ("iddpm", {"C_1": 0.001, "C_2": 0.008, "M": 1000}),
}
_DEFAULT_MODEL = {"EDMPrecond": "DhariwalUNet", "VPPrecond": "SongUNet",
                  "VEPrecond": "SongUNet", "iDDPMPrecond": "DhariwalUNet"}
_WRAPPER_ARGS = {"img_resolution", "img_channels", "label_dim", "use_fp16", "model_type"}

# official network class -> its keyword arguments with their defaults (training/networks.py)
_MODEL_ARGS = {
    "SongUNet": dict(label_dim=0, augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2],
                     channel_mult_emb=4, num_blocks=4, attn_resolutions=[16], dropout=0.10,
                     label_dropout=0, embedding_type="positional", channel_mult_noise=1,
                     encoder_type="standard", decoder_type="standard", resample_filter=[1, 1]),
    "DhariwalUNet": dict(label_dim=0, augment_dim=0, model_channels=192,
                         channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3,
                         attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0),
}
_SHAPE_ARGS = ("img_resolution", "in_channels", "out_channels")


def _plain(value):
    """JSON-able copy: tuples -> lists, unknown objects -> their repr."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _arg(record: ModuleRecord, name: str, default=None):
    """A constructor argument: recorded kwarg, else the attribute of that name, else default."""
    if name in record.init_kwargs:
        return record.init_kwargs[name]
    return record.attrs.get(name, default)


def _select_network(root) -> tuple[ModuleRecord, str]:
    if isinstance(root, ModuleRecord):
        return root, "network"
    if isinstance(root, dict):
        for key in ("ema", "net"):
            if isinstance(root.get(key), ModuleRecord):
                return root[key], key
    raise OfficialFormatError("expected an official EDM snapshot: a dict with 'ema' "
                              "(network-snapshot-*.pkl) or 'net' (training-state-*.pt)")


def _precond_config(wrapper: ModuleRecord) -> dict:
    """edm-fast precond config from an official EDM/VP/VE/iDDPMPrecond (EDM Table 1)."""
    if wrapper.class_name not in _PRECONDS:
        raise OfficialFormatError(f"unsupported network class {wrapper.class_name!r}; expected "
                                  f"one of {sorted(_PRECONDS)}")
    name, defaults = _PRECONDS[wrapper.class_name]
    config = {k: float(_arg(wrapper, k, d)) for k, d in defaults.items()}
    if "M" in config:
        config["M"] = int(config["M"])
    return {"name": name, **config}


def _model_record(wrapper: ModuleRecord) -> ModuleRecord:
    model = wrapper.children.get("model")
    if not isinstance(model, ModuleRecord):
        raise OfficialFormatError(f"{wrapper.class_name} has no inner network 'model'")
    expected = _arg(wrapper, "model_type", _DEFAULT_MODEL[wrapper.class_name])
    if model.class_name != expected or model.class_name not in _MODEL_ARGS:
        raise OfficialFormatError(f"unsupported inner network {model.class_name!r} (model_type "
                                  f"{expected!r}); supported: {sorted(_MODEL_ARGS)}")
    return model


def _model_kwargs(wrapper: ModuleRecord, model: ModuleRecord) -> dict:
    """The inner network's full official constructor kwargs: its recorded ``_init_kwargs``, or
    (when not recorded) the wrapper's extra kwargs, over the official defaults."""
    given = dict(model.init_kwargs)
    if not given:  # rebuild what the wrapper passed: globals()[model_type](...)
        channels = int(_arg(wrapper, "img_channels"))
        factor = 2 if wrapper.class_name == "iDDPMPrecond" else 1
        given = {k: v for k, v in wrapper.init_kwargs.items()
                 if k not in _WRAPPER_ARGS and k not in _PRECONDS[wrapper.class_name][1]}
        given.update(img_resolution=_arg(wrapper, "img_resolution"), in_channels=channels,
                     out_channels=channels * factor, label_dim=_arg(wrapper, "label_dim", 0))
    unknown = sorted(set(given) - set(_MODEL_ARGS[model.class_name]) - set(_SHAPE_ARGS))
    if unknown:
        raise OfficialFormatError(f"{model.class_name} argument(s) {unknown} are not supported")
    missing = [k for k in _SHAPE_ARGS if given.get(k) is None]
    if missing:
        raise OfficialFormatError(f"{model.class_name} kwargs lack {missing}")
    return {**_MODEL_ARGS[model.class_name], **_plain(given)}


def _net_spec(model_class: str, official: dict, img_channels: int) -> dict:
    """edm-fast network spec (arch + full kwargs); out_channels = img_channels (iDDPM's extra
    variance channels are dropped by ``denoiser_state_dict``)."""
    kwargs = {**official, "out_channels": img_channels}
    if model_class == "DhariwalUNet":
        return {"arch": "adm", "preset": None, "kwargs": {**kwargs, "channels_per_head": 64}}
    arch = "ncsnpp" if kwargs["embedding_type"] == "fourier" else "ddpmpp"
    return {"arch": arch, "preset": None, "kwargs": kwargs}


def _check_u(state: dict, precond: dict) -> None:
    """iDDPM's official ``u`` buffer (float32 recursion) must match edm-fast's float64 table;
    rtol 1e-3 covers float32 cancellation in (u_j^2 + 1) / ratio - 1 near sigma_min."""
    from .precond import make_precond

    ours = make_precond(precond).u
    theirs = state.pop("u", None)
    if theirs is None or theirs.shape != ours.shape or not torch.allclose(
            theirs.double(), ours, rtol=1e-3, atol=1e-6):
        raise OfficialFormatError("the snapshot's iDDPM u table does not match C_1, C_2, M")


def _config(wrapper: ModuleRecord, model: ModuleRecord, root, path: Path, source: str) -> dict:
    precond = _precond_config(wrapper)
    official = _model_kwargs(wrapper, model)
    channels = int(_arg(wrapper, "img_channels", official["in_channels"]))
    resolution = int(_arg(wrapper, "img_resolution", official["img_resolution"]))
    factor = 2 if wrapper.class_name == "iDDPMPrecond" else 1  # iDDPM: mean + variance
    if (official["in_channels"], official["out_channels"]) != (channels, channels * factor):
        raise OfficialFormatError(f"{model.class_name} maps {official['in_channels']} to "
                                  f"{official['out_channels']} channels; {wrapper.class_name} "
                                  f"expects {channels} to {channels * factor}")
    dataset = root.get("dataset_kwargs") if isinstance(root, dict) else None
    return {
        "net": _net_spec(model.class_name, official, channels),
        "precond": precond,
        "sample_shape": [channels, resolution, resolution],
        "official": {
            "file": path.name, "object": source, "precond_class": wrapper.class_name,
            "model_class": model.class_name, "use_fp16": bool(_arg(wrapper, "use_fp16", False)),
            "precond_kwargs": _plain(wrapper.init_kwargs), "model_kwargs": official,
            "persistence_version": _plain(wrapper.version),
            "module_src_sha256": wrapper.source_sha256,
            "dataset_kwargs": _plain(dataset) if isinstance(dataset, dict) else None,
        },
    }


def read_official(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, config) of an official snapshot (.pkl) or training state (.pt).

    state_dict: the official wrapper's tensors under their official keys (``model.*``), minus
    iDDPM's ``u`` buffer (checked against ``precond.iDDPMPrecond``). config: edm-fast checkpoint
    metadata (``net``, ``precond``, ``sample_shape``) plus ``official`` (source classes, their
    kwargs, use_fp16, dataset_kwargs). Nothing in the file is imported or executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no official snapshot at {path}")
    stage = "read"
    try:
        root = _read_file(path)
        stage = "rebuild"
        wrapper, source = _select_network(root)
        model = _model_record(wrapper)
        config = _config(wrapper, model, root, path, source)
        state = wrapper.state_dict()
        if config["precond"]["name"] == "iddpm":
            _check_u(state, config["precond"])
    except (UnsafePickleError, OfficialFormatError) as exc:
        if str(path) in str(exc):
            raise
        raise type(exc)(f"{path}: {exc}") from exc  # name the file
    except _PARSE_ERRORS as exc:
        if stage == "read":
            raise CheckpointError(f"{path} is not a valid NVlabs EDM snapshot (.pkl) or "
                                  "training state (.pt): not a readable pickle snapshot "
                                  f"(truncated or corrupt?): {_one_line(exc)}") from exc
        # a look-alike file: e.g. a constructor argument of the wrong type
        raise OfficialFormatError(f"{path} is not a valid NVlabs EDM snapshot: "
                                  f"{_one_line(exc)}") from exc
    return state, config


def _one_line(exc: Exception) -> str:
    """'Type: message' with line breaks escaped (parsers quote the bad line, newline included)."""
    text = str(exc).replace("\r", "\\r").replace("\n", "\\n")
    return f"{type(exc).__name__}: {text}"


def denoiser_state_dict(state: dict, config: dict) -> dict[str, torch.Tensor]:
    """The state dict of edm-fast's network F: ``model.`` stripped; for iDDPM, the output rows
    of the learned-variance channels dropped (F[:, :C] is all the official D uses; each output
    channel of the last conv depends only on its own weight rows, so this is exact)."""
    net = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    extra = set(state) - {f"model.{k}" for k in net}
    if extra:
        raise OfficialFormatError(f"unexpected tensors outside the network: {sorted(extra)}")
    channels = config["net"]["kwargs"]["out_channels"]
    if config["official"]["model_kwargs"]["out_channels"] != channels:
        for key, value in net.items():
            if key.startswith("out_conv.") or ("_aux_conv." in key and key.startswith("dec.")):
                net[key] = value[:channels]
    return net


def load_official(path, *, device="cpu", use_fp16: bool | None = None):
    """The official snapshot as an edm-fast ``Denoiser`` in eval mode on ``device``.

    use_fp16=None follows the snapshot: the official wrappers run F in float16 on CUDA when
    their ``use_fp16`` is set, and in float32 otherwise (always on CPU).
    """
    from .checkpoints import build_denoiser

    state, config = read_official(path)
    denoiser = build_denoiser(config)
    try:
        denoiser.model.load_state_dict(denoiser_state_dict(state, config), strict=True)
    except RuntimeError as exc:
        raise OfficialFormatError(f"{path}: weights do not match the rebuilt network: "
                                  f"{exc}") from exc
    device = torch.device(device)
    fp16 = config["official"]["use_fp16"] if use_fp16 is None else use_fp16
    denoiser.net_dtype = torch.float16 if fp16 and device.type == "cuda" else None
    denoiser.checkpoint_meta = config
    denoiser.sample_shape = tuple(config["sample_shape"])
    return denoiser.to(device).eval().requires_grad_(False)


def convert_official(src, dst, *, dtype: torch.dtype | None = None) -> Path:
    """Write an official snapshot as an edm-fast inference checkpoint: ``ema.*`` weights (cast
    to ``dtype`` when given) and the ``read_official`` config as metadata."""
    from .checkpoints import save_checkpoint

    state, config = read_official(src)
    net = denoiser_state_dict(state, config)
    tensors = {f"ema.{k}": (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
               .contiguous().clone() for k, v in net.items()}
    config = {**config, "converted_from": Path(src).name}
    return save_checkpoint(dst, tensors, config)
