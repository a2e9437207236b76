"""Official NVlabs/edm and NVlabs/edm2 snapshots, read without running their code.

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
its recorded constructor kwargs and loaded with ``strict=True``. EDM2's ``Precond`` (its
``unet`` and log-variance head) maps to the 'edm2' arch in edm_fast.io.official_edm2.

    read_official(path) -> (state_dict, config)     load_official(path) -> Denoiser
    convert_official(src, dst) -> edm-fast inference checkpoint (ema.* + config metadata)
"""

from __future__ import annotations

import collections
import contextvars
import hashlib
import io
import math
import pickle
import typing
import zipfile
import zlib
from pathlib import Path

import torch

from .checkpoints import CheckpointError
from ..errors import BadFileError

__all__ = [
    "read_official", "load_official", "convert_official", "denoiser_state_dict",
    "RestrictedUnpickler", "ModuleRecord", "UnsafePickleError", "OfficialFormatError",
]


class UnsafePickleError(pickle.UnpicklingError, BadFileError):
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
# Cost bounds: what one file may make us allocate.

MAX_OBJECTS = 1_000_000  # objects in the unpickled tree, shared references counted each time
MAX_DEPTH = 100          # nesting of containers


class _Budget:
    """Bytes a read may allocate: storages and tensors each at most the file's size (a tensor is
    a view of its storage, so a legitimate file never needs more)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = {"storage": 0, "tensor": 0}

    def charge(self, kind: str, nbytes: int, what: str) -> None:
        if nbytes < 0:
            raise OfficialFormatError(f"{what} has a negative size")
        self.used[kind] += nbytes
        if self.used[kind] > self.limit:
            raise OfficialFormatError(f"{what} would bring the {kind} data to "
                                      f"{self.used[kind]:,} bytes, more than the file's "
                                      f"{self.limit:,} bytes (a hostile or corrupt file)")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("edm_fast_budget",
                                                                           default=None)


def _charge(kind: str, nbytes: int, what: str) -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.charge(kind, nbytes, what)


def _check_expansion(root) -> None:
    """Refuse object graphs that expand to more than MAX_OBJECTS objects (shared references,
    a "billion laughs", counted once per reference without expanding them), nest deeper than
    MAX_DEPTH, or contain cycles: everything downstream walks the tree."""
    sizes: dict[int, int | None] = {}

    def size(obj, depth):
        if isinstance(obj, ModuleRecord):
            parts = (obj.init_kwargs, obj.parameters, obj.buffers, obj.children, obj.attrs)
        elif isinstance(obj, dict):
            parts = [*obj.keys(), *obj.values()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            parts = obj
        else:
            return 1
        if depth > MAX_DEPTH:
            raise OfficialFormatError(f"objects nested more than {MAX_DEPTH} deep")
        known = sizes.get(id(obj), 0)
        if known is None:
            raise OfficialFormatError("an object contains itself (a reference cycle)")
        if known:
            return known
        sizes[id(obj)] = None
        total = 1
        for part in parts:
            total += size(part, depth + 1)
            if total > MAX_OBJECTS:
                raise OfficialFormatError(f"shared references expand to more than "
                                          f"{MAX_OBJECTS:,} objects (a \"billion laughs\" "
                                          "pickle?)")
        sizes[id(obj)] = total
        return total

    size(root, 0)


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
        raise UnsafePickleError(f"unexpected BUILD on the persistent record "
                                f"{_short(self.class_name)}")

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
        raise OfficialFormatError(f"unsupported tensor metadata {sorted(metadata)!r:.80}")
    size, stride = tuple(int(n) for n in size), tuple(int(n) for n in stride)
    if len(size) != len(stride) or len(size) > 16 or min((*size, *stride, 0)) < 0:
        raise OfficialFormatError(f"bad tensor size {size!r:.80} or stride {stride!r:.80}")
    _charge("tensor", math.prod(size) * storage.element_size(), f"a tensor of shape {size!r:.80}")
    return storage.as_strided(size, stride, int(storage_offset))


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


class _ArrayRecord:
    """A numpy array of plain numbers (EDM2's encoder keeps its latent scale and bias as float32
    arrays): ``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`` makes an empty record,
    BUILD fills it from (version, shape, dtype, fortran order, raw bytes); object arrays and
    byte counts that do not match the shape are refused. ``.array`` is the numpy array."""

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        np = _numpy()
        if not (isinstance(state, tuple) and len(state) == 5 and self.array is None):
            raise UnsafePickleError("refusing a numpy array state that is not plain data")
        _, shape, dtype, fortran, raw = state
        if isinstance(raw, str):  # protocol 0-2 pickles write the bytes as latin-1 text
            raw = raw.encode("latin1")
        if not (isinstance(dtype, np.dtype) and not dtype.hasobject and isinstance(raw, bytes)
                and isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0
                                                     for n in shape)):
            raise UnsafePickleError("refusing a numpy array that is not plain numbers")
        count = math.prod(shape)
        if count * dtype.itemsize != len(raw):
            raise UnsafePickleError(f"a numpy array of shape {shape} has {len(raw)} bytes")
        _charge("storage", len(raw), "a numpy array")
        self.array = np.frombuffer(raw, dtype=dtype, count=count).reshape(
            shape, order="F" if fortran else "C").copy()


def _reconstruct_ndarray(cls, shape=None, typecode=None):
    if cls is not _numpy().ndarray:
        raise UnsafePickleError("refusing numpy _reconstruct of anything but numpy.ndarray")
    return _ArrayRecord()


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
    storages, limit = {}, _stream_size(f) - f.tell()

    def load(pid):
        if isinstance(pid, tuple) and pid[:1] == ("module",) and pid[1] in _CONTAINERS.values():
            return pid[1]  # legacy files name nn.Module container classes this way
        dtype, key, numel = _storage_pid(pid)
        if numel * _element_size(dtype) > limit:
            raise OfficialFormatError(f"storage {key!r:.40} is larger than the file")
        if key not in storages:
            _charge("storage", numel * _element_size(dtype), f"storage {key!r:.40}")
            storages[key] = torch.empty(numel, dtype=dtype)
        return storages[key]

    root = _unpickle(f, load)
    for key in _unpickle(f):
        flat = storages.get(str(key))
        if flat is None:
            raise OfficialFormatError(f"storage {key} has data but no tensor")
        count = int.from_bytes(_read_exactly(f, 8), "little")
        if count != flat.numel():
            raise OfficialFormatError(f"storage {key}: {count} elements, expected {flat.numel()}")
        if count:
            raw = _read_exactly(f, count * flat.element_size())
            flat.view(torch.uint8).copy_(_flat(raw, torch.uint8, len(raw)))
    return root


def _read_exactly(f, n: int) -> bytes:
    if n > _stream_size(f) - f.tell():
        raise pickle.UnpicklingError(f"the file ends before the {n:,} bytes it announces")
    return f.read(n)


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
    ``<dir>/data/<key>`` of raw little-endian bytes per storage. torch stores the records
    uncompressed; the sizes in the zip directory are checked before any record is read, and
    all records read together may not exceed the archive's size (no zip bombs)."""
    limit, used = path.stat().st_size, 0
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        if len(names) > 1_000_000:
            raise OfficialFormatError(f"zip archive lists {len(names):,} records")

        def read(name, expected=None):
            nonlocal used
            info = zf.getinfo(name)
            if expected is not None and info.file_size != expected:
                raise OfficialFormatError(f"record {name!r:.80} holds {info.file_size:,} bytes, "
                                          f"expected {expected:,} (truncated or corrupt?)")
            used += info.file_size
            if used > limit:
                raise OfficialFormatError(f"record {name!r:.80} would decompress to "
                                          f"{info.file_size:,} bytes, more than the archive's "
                                          f"{limit:,} bytes (a zip bomb?)")
            return zf.read(info)

        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise OfficialFormatError(f"{path} is a zip archive but not a torch.save archive")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and read(f"{prefix}byteorder") != b"little":
            raise OfficialFormatError("big-endian torch archives are not supported")
        storages = {}

        def load(pid):
            dtype, key, numel = _storage_pid(pid)
            if key not in storages:
                name = f"{prefix}data/{key}"
                if name not in names:
                    raise OfficialFormatError(f"{path} lacks the record of storage {key!r:.40}")
                nbytes = numel * _element_size(dtype)
                _charge("storage", nbytes, f"storage {key!r:.40}")
                storages[key] = _flat(read(name, nbytes), dtype, numel)
            return storages[key]

        return _unpickle(io.BytesIO(read(pickles[0])), load)


def _read_file(path: Path):
    """The root object of a zip archive, a legacy torch.save file or a plain pickle, read
    within the file's budget (storages and tensors at most its size, MAX_OBJECTS objects)."""
    token = _BUDGET.set(_Budget(path.stat().st_size))
    try:
        if zipfile.is_zipfile(path):
            root = _read_zip(path)
        else:
            with open(path, "rb") as f:
                root = _unpickle(f)
                if isinstance(root, int) and root == _LEGACY_MAGIC:
                    root = _read_legacy_rest(f)
    finally:
        _BUDGET.reset(token)
    _check_expansion(root)
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
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_ndarray,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_ndarray,
    **_CONTAINERS,
}


def _short(text, limit: int = 80) -> str:
    """A name from the file, fit for a one-line message: as is when printable, else its repr;
    cut to ``limit`` characters."""
    if not (isinstance(text, str) and text.isprintable()):
        text = repr(text)
    return text if len(text) <= limit else text[:limit] + "..."


class _BoundedFile:
    """A binary file whose reads may not ask for more bytes than remain: a length field that
    announces more (a 14-byte pickle claiming a 2**62-byte string) is refused before anything
    is allocated."""

    def __init__(self, f):
        self._f = f
        self._end = _stream_size(f)

    def _check(self, n: int) -> None:
        left = self._end - self._f.tell()
        if n > left:
            raise pickle.UnpicklingError(f"a length field announces {n:,} bytes, but only "
                                         f"{left:,} remain")

    def read(self, n: int = -1) -> bytes:
        if n is not None and n >= 0:
            self._check(n)
        return self._f.read(n)

    def readinto(self, buffer) -> int:
        self._check(len(buffer))
        return self._f.readinto(buffer)

    def readline(self, size: int = -1) -> bytes:
        return self._f.readline(size)


class RestrictedUnpickler(pickle._Unpickler):
    """A pickle reader that resolves only ``_SAFE_GLOBALS`` (plus numpy.dtype, torch dtypes
    and torch ``*Storage`` type names) and hands persistent ids to ``storage_loader``.

    It is Python's own pure-Python unpickler with three opcodes guarded: every length field is
    checked against the bytes left in the file before anything is allocated, BUILD (``obj.
    __setstate__(state)``) is allowed only on the inert container records and numpy dtypes (a
    BUILD on a tensor would call ``Tensor.__setstate__`` -> ``set_()``, which can grow a view
    past its storage), and protocol-5 out-of-band buffers are refused."""

    dispatch: typing.ClassVar[dict] = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, *, storage_loader=None):
        super().__init__(_BoundedFile(file))
        self._storage_loader = storage_loader

    def find_class(self, module, name):
        if not (isinstance(module, str) and isinstance(name, str)):
            raise UnsafePickleError("a global is named by a non-string")
        found = _SAFE_GLOBALS.get((module, name))
        if found is not None:
            return found
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _DTYPE_NAMES:
            return getattr(torch, name)
        if (module, name) in (("numpy", "dtype"), ("numpy", "ndarray")):
            return getattr(_numpy(), name)
        raise UnsafePickleError(f"refusing to load global {_short(module)}.{_short(name)}: it "
                                "is not on the allowlist of edm_fast.io.official (tensors, plain "
                                "containers, numpy scalars and EDM's persistent objects)")

    def persistent_load(self, pid):
        if self._storage_loader is None:
            raise UnsafePickleError(f"unexpected persistent id {pid!r:.80} in a plain pickle")
        return self._storage_loader(pid)

    def _load_build(self):
        inst = self.stack[-2] if len(self.stack) > 1 else None  # below the state
        if type(inst) is collections.OrderedDict:  # a state dict's _metadata (torch.save):
            self.stack.pop()                      # not needed here, dropped unread
            return
        numpy = __import__("sys").modules.get("numpy")
        if not (isinstance(inst, (_ContainerRecord, _ArrayRecord))
                or (numpy is not None and isinstance(inst, numpy.dtype))):
            raise UnsafePickleError(f"refusing to set the state of a {type(inst).__name__} "
                                    "(BUILD opcode): only torch containers and numpy dtypes "
                                    "take one")
        pickle._Unpickler.load_build(self)

    def _refuse_buffers(self):
        raise UnsafePickleError("refusing protocol-5 out-of-band buffers (BYTEARRAY8, "
                                "NEXT_BUFFER, READONLY_BUFFER)")

    dispatch[pickle.BUILD[0]] = _load_build
    for _op in (pickle.BYTEARRAY8, pickle.NEXT_BUFFER, pickle.READONLY_BUFFER):
        dispatch[_op[0]] = _refuse_buffers
    del _op


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
    if isinstance(value, _ArrayRecord) and value.array is not None:
        return value.array.tolist()
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
        raise OfficialFormatError(f"unsupported network class {_short(wrapper.class_name)}; "
                                  f"expected one of {', '.join(sorted(_PRECONDS))}")
    name, defaults = _PRECONDS[wrapper.class_name]
    config = {k: float(_arg(wrapper, k, d)) for k, d in defaults.items()}
    if "M" in config:
        config["M"] = int(config["M"])
    return {"name": name, **config}


def _model_record(wrapper: ModuleRecord) -> ModuleRecord:
    _precond_config(wrapper)  # a supported wrapper class, before anything else is looked up
    model = wrapper.children.get("model")
    if not isinstance(model, ModuleRecord):
        raise OfficialFormatError(f"{wrapper.class_name} has no inner network 'model'")
    expected = _arg(wrapper, "model_type", _DEFAULT_MODEL[wrapper.class_name])
    if model.class_name != expected or model.class_name not in _MODEL_ARGS:
        raise OfficialFormatError(f"unsupported inner network {_short(model.class_name)} "
                                  f"(model_type {_short(expected)}); supported: "
                                  f"{', '.join(sorted(_MODEL_ARGS))}")
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
    from ..precond import make_precond

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


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """A flat state dict (names -> tensors) from a ``torch.save`` file (zip archive or legacy)
    read by the restricted unpickler within the file's budgets, as snapshots are: no code runs,
    and storages, tensors and decompressed records may total at most the file's size. For
    weight files a user downloads (the metric networks' ``.pth``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weight file at {path}")
    try:
        root = _read_file(path)
    except (UnsafePickleError, OfficialFormatError) as exc:
        raise type(exc)(_one_line_message(exc, path)) from exc
    except (*_PARSE_ERRORS, MemoryError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not a readable torch.save file (truncated or "
                              f"corrupt?): {_cut(_one_line(exc))}") from exc
    if not isinstance(root, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in root.items()):
        raise CheckpointError(f"{path} does not hold a flat state dict (names -> tensors)")
    total = sum(t.numel() * t.element_size() for t in root.values())
    if total > path.stat().st_size:
        raise CheckpointError(f"{path}: its tensors hold {total:,} bytes, more than the file's "
                              f"{path.stat().st_size:,} (shared or overlapping views)")
    return dict(root)


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
        state = wrapper.state_dict()
        total = sum(t.numel() * t.element_size() for t in state.values())
        if total > path.stat().st_size:
            raise OfficialFormatError(f"its tensors hold {total:,} bytes, more than the file's "
                                      f"{path.stat().st_size:,} (shared or overlapping views)")
        if _is_edm2(wrapper):
            from .official_edm2 import edm2_config

            return state, edm2_config(wrapper, root, path, source)
        model = _model_record(wrapper)
        config = _config(wrapper, model, root, path, source)
        if config["precond"]["name"] == "iddpm":
            _check_u(state, config["precond"])
    except (UnsafePickleError, OfficialFormatError) as exc:
        raise type(exc)(_one_line_message(exc, path)) from exc  # name the file, one line
    except (*_PARSE_ERRORS, MemoryError, RecursionError) as exc:
        if stage == "read":
            raise CheckpointError(f"{path} is not a valid NVlabs EDM snapshot (.pkl) or "
                                  "training state (.pt): not a readable pickle snapshot "
                                  f"(truncated or corrupt?): {_cut(_one_line(exc))}") from exc
        # a look-alike file: e.g. a constructor argument of the wrong type
        raise OfficialFormatError(f"{path} is not a valid NVlabs EDM snapshot: "
                                  f"{_cut(_one_line(exc))}") from exc
    return state, config


def _is_edm2(wrapper: ModuleRecord) -> bool:
    """NVlabs/edm2's ``Precond`` (its U-Net is the child ``unet``, not ``model``)."""
    return wrapper.class_name == "Precond" and "unet" in wrapper.children


def _cut(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _one_line_message(exc: Exception, path: Path) -> str:
    text = _cut(str(exc).replace("\r", "\\r").replace("\n", "\\n"), 400)
    return text if str(path) in text else f"{path}: {text}"


def _one_line(exc: Exception) -> str:
    """'Type: message' with line breaks escaped (parsers quote the bad line, newline included)."""
    text = str(exc).replace("\r", "\\r").replace("\n", "\\n")
    return f"{type(exc).__name__}: {text}"


def denoiser_state_dict(state: dict, config: dict) -> dict[str, torch.Tensor]:
    """The state dict of edm-fast's network F: ``model.`` stripped; for iDDPM, the output rows
    of the learned-variance channels dropped (F[:, :C] is all the official D uses; each output
    channel of the last conv depends only on its own weight rows, so this is exact). EDM2's
    keys are those of edm-fast's EDM2Net already (``unet.*``, ``logvar_*``)."""
    if config["net"]["arch"] == "edm2":
        return dict(state)
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


def _checked(path, max_params: int | None) -> tuple[dict[str, torch.Tensor], dict]:
    """(edm-fast network state dict, config) of an official file, checked as
    ``checkpoints.read_inference_weights`` checks an edm-fast file before anything is built:
    the config (size of the network, sample shape), the key set, shapes, floating dtypes and
    finite values of the weights."""
    from .checkpoints import check_config, check_finite, check_weights

    state, config = read_official(path)
    net = denoiser_state_dict(state, config)
    meta_net = check_config(config, path, max_params=max_params)
    check_weights(meta_net, net, path)
    check_finite(net, path)
    return net, config


def load_official(path, *, device="cpu", use_fp16: bool | None = None,
                  max_params: int | None = None):
    """The official snapshot as an edm-fast ``Denoiser`` in eval mode on ``device``.

    use_fp16=None follows the snapshot: the official wrappers run F in float16 on CUDA when
    their ``use_fp16`` is set, and in float32 otherwise (always on CPU). ``max_params`` bounds
    the network's size (default ``checkpoints.max_params_limit()``).
    """
    from .checkpoints import build_denoiser

    net, config = _checked(path, max_params)
    denoiser = build_denoiser(config)
    try:
        denoiser.model.load_state_dict(net, strict=True)
    except RuntimeError as exc:
        raise OfficialFormatError(f"{path}: weights do not match the rebuilt network: "
                                  f"{_cut(_one_line(exc))}") from exc
    device = torch.device(device)
    fp16 = config["official"]["use_fp16"] if use_fp16 is None else use_fp16
    denoiser.net_dtype = torch.float16 if fp16 and device.type == "cuda" else None
    denoiser.checkpoint_meta = config
    denoiser.sample_shape = tuple(config["sample_shape"])
    return denoiser.to(device).eval().requires_grad_(False)


def convert_official(src, dst, *, dtype: torch.dtype | None = None,
                     max_params: int | None = None) -> Path:
    """Write an official snapshot as an edm-fast inference checkpoint: ``ema.*`` weights (cast
    to ``dtype`` when given) and the ``read_official`` config as metadata. The snapshot is
    checked as ``load_official`` checks it; nothing is written unless it passes."""
    from .checkpoints import save_checkpoint

    net, config = _checked(src, max_params)
    tensors = {f"ema.{k}": (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
               .contiguous().clone() for k, v in net.items()}
    config = {**config, "converted_from": Path(src).name}
    return save_checkpoint(dst, tensors, config)
