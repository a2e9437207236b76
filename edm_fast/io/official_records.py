"""What the restricted unpickler of NVlabs snapshots builds, and what one read may cost.

Every global an official ``.pkl``/``.pt`` file may name (``RECORD_GLOBALS`` and
``resolve_type``, used by edm_fast.io.official_pickle) maps to an inert stand-in here, never to
the pickled class or function:

- ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` -> ``ModuleRecord`` (class
  name, constructor kwargs, parameters, buffers, children); ``meta['module_src']`` is only
  hashed (SHA-256), never imported or executed;
- ``torch.nn.modules.container.{ModuleDict,ModuleList,Sequential}`` -> ``ContainerRecord``s;
- ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` -> strided views of flat
  storages, bounds checked; ``torch.*Storage`` names -> ``StorageType`` (a dtype only);
- numpy scalars -> Python numbers; numpy arrays of numbers -> ``ArrayRecord``.

Cost bounds: inside ``read_budget(file_size)`` storages and tensors may each total at most the
file's size (``charge_bytes``); ``check_expansion`` refuses object graphs over ``MAX_OBJECTS``
objects, deeper than ``MAX_DEPTH`` or cyclic. ``record_arg`` and ``plain_value`` read the
records into edm-fast configs (edm_fast.io.official, edm_fast.io.official_edm2).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import hashlib
import math
import pickle
import zipfile
import zlib

import torch

from .checkpoints import CheckpointError
from ..errors import BadFileError

__all__ = [
    "UnsafePickleError", "OfficialFormatError", "PARSE_ERRORS", "MAX_OBJECTS", "MAX_DEPTH",
    "read_budget", "charge_bytes", "check_expansion", "ModuleRecord", "ContainerRecord",
    "CONTAINER_CLASSES", "StorageType", "element_size", "flat_tensor", "ArrayRecord",
    "RECORD_GLOBALS", "resolve_type", "short_text", "plain_value", "record_arg",
]


class UnsafePickleError(pickle.UnpicklingError, BadFileError):
    """The file asks for a global (function or class) outside the allowlist."""


class OfficialFormatError(CheckpointError):
    """The file is safe to read but is not an official EDM network we can rebuild."""


# What a corrupt or foreign file makes the unpickler (or the records built from it) raise:
# a text file starting with 'g' is a GET opcode with a non-numeric index (ValueError), others
# give bad memo keys, wrong argument types, out-of-bounds tensor views (RuntimeError) ...
PARSE_ERRORS = (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, zlib.error, ValueError,
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


@contextlib.contextmanager
def read_budget(limit: int):
    """Within this block, storages and tensors may each total at most ``limit`` bytes."""
    token = _BUDGET.set(_Budget(limit))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def charge_bytes(kind: str, nbytes: int, what: str) -> None:
    """Count ``nbytes`` of ``kind`` ('storage' or 'tensor') against the current read's budget;
    OfficialFormatError naming ``what`` past it."""
    budget = _BUDGET.get()
    if budget is not None:
        budget.charge(kind, nbytes, what)


def check_expansion(root) -> None:
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
                                f"{short_text(self.class_name)}")

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


class ContainerRecord(ModuleRecord):
    """A plain torch container (``torch.nn.ModuleDict`` ...): NEWOBJ, then BUILD with __dict__."""

    container_name = "torch.nn.Module"
    version = source_sha256 = None

    def __setstate__(self, state):
        self._fill(self.container_name, state)


def _container(module: str, name: str) -> type:
    full = f"{module}.{name}"
    return type(name, (ContainerRecord,), {"container_name": full, "__module__": __name__})


CONTAINER_CLASSES = {("torch.nn.modules.container", n): _container("torch.nn.modules.container", n)
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


class StorageType:
    """What ``torch.FloatStorage`` & co. resolve to: only their dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def flat_tensor(raw: bytes, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """The 1-D tensor holding a storage's ``numel`` elements from its raw little-endian bytes."""
    if len(raw) != numel * element_size(dtype):
        raise OfficialFormatError(f"storage holds {len(raw)} bytes, expected {numel} x "
                                  f"{element_size(dtype)} (truncated file?)")
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
    charge_bytes("tensor", math.prod(size) * storage.element_size(),
                 f"a tensor of shape {size!r:.80}")
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


class ArrayRecord:
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
        charge_bytes("storage", len(raw), "a numpy array")
        self.array = np.frombuffer(raw, dtype=dtype, count=count).reshape(
            shape, order="F" if fortran else "C").copy()


def _reconstruct_ndarray(cls, shape=None, typecode=None):
    if cls is not _numpy().ndarray:
        raise UnsafePickleError("refusing numpy _reconstruct of anything but numpy.ndarray")
    return ArrayRecord()


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (latin-1 only)."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# ------------------------------------------------------------------------------------------
# The allowlist: every global a snapshot may name, and what it resolves to.

RECORD_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,  # protocol-2 pickles use Python 2 names
    ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): _latin1_encode,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("dnnlib.util", "EasyDict"): dict,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_ndarray,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_ndarray,
    **CONTAINER_CLASSES,
}


def resolve_type(module: str, name: str):
    """The type objects a snapshot may name besides ``RECORD_GLOBALS``: ``torch.*Storage``
    (a ``StorageType``), torch dtypes, ``numpy.dtype`` and ``numpy.ndarray``; None otherwise."""
    if module == "torch" and name in _STORAGE_DTYPES:
        return StorageType(_STORAGE_DTYPES[name])
    if module == "torch" and name in _DTYPE_NAMES:
        return getattr(torch, name)
    if (module, name) in (("numpy", "dtype"), ("numpy", "ndarray")):
        return getattr(_numpy(), name)
    return None


# ------------------------------------------------------------------------------------------
# Reading the records: names for messages, JSON-able values, constructor arguments.

def short_text(text, limit: int = 80) -> str:
    """A name from the file, fit for a one-line message: as is when printable, else its repr;
    cut to ``limit`` characters."""
    if not (isinstance(text, str) and text.isprintable()):
        text = repr(text)
    return text if len(text) <= limit else text[:limit] + "..."


def plain_value(value):
    """JSON-able copy: tuples -> lists, unknown objects -> their repr."""
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain_value(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, ArrayRecord) and value.array is not None:
        return value.array.tolist()
    return repr(value)


def record_arg(record: ModuleRecord, name: str, default=None):
    """A constructor argument: recorded kwarg, else the attribute of that name, else default."""
    if name in record.init_kwargs:
        return record.init_kwargs[name]
    return record.attrs.get(name, default)
