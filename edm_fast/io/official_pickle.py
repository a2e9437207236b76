"""The safe reader of NVlabs snapshots and ``torch.save`` files: a restricted unpickler.

An official snapshot (``edm-cifar10-32x32-cond-vp.pkl``, ``network-snapshot-*.pkl``) is a pickle;
a ``training-state-*.pt`` or a ``.pth`` weight file is a torch zip archive (``<dir>/data.pkl``
plus one ``<dir>/data/<key>`` record per storage) or a legacy ``torch.save`` stream. Tensors are
``torch._utils._rebuild_tensor_v2`` calls whose storages are ``torch.storage._load_from_bytes(b)``
of a legacy ``torch.save`` stream (.pkl), or persistent ids pointing at the archive's records
(.pt). Loading any of these the usual way runs whatever globals the file names.

``RestrictedUnpickler`` resolves only ``SAFE_GLOBALS`` (edm_fast.io.official_records'
``RECORD_GLOBALS``, all inert stand-ins, plus ``_load_from_bytes``, parsed here by the same
unpickler); any other global raises ``UnsafePickleError`` ("refusing to load global os.system
..."). Every length field is checked against the bytes left before anything is allocated, BUILD
is allowed only on inert records, and a read stays within the file's budget (storages, tensors
and zip records at most the file's size; ``MAX_OBJECTS`` objects).

    read_pickle_file(path) -> the root object (records, tensors, plain containers)
    read_state_dict(path)  -> a flat state dict (names -> tensors) from a torch.save file
"""

from __future__ import annotations

import collections
import io
import pickle
import typing
import zipfile
from pathlib import Path

import torch

from .checkpoints import CheckpointError
from .official_records import (
    CONTAINER_CLASSES, PARSE_ERRORS, RECORD_GLOBALS, ArrayRecord, ContainerRecord,
    OfficialFormatError, StorageType, UnsafePickleError, check_expansion, charge_bytes,
    element_size, flat_tensor, read_budget, resolve_type, short_text,
)

__all__ = [
    "RestrictedUnpickler", "SAFE_GLOBALS", "read_pickle_file", "read_state_dict", "cut_text",
    "one_line_error", "file_error_message",
]


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
        if (isinstance(pid, tuple) and pid[:1] == ("module",)
                and pid[1] in CONTAINER_CLASSES.values()):
            return pid[1]  # legacy files name nn.Module container classes this way
        dtype, key, numel = _storage_pid(pid)
        if numel * element_size(dtype) > limit:
            raise OfficialFormatError(f"storage {key!r:.40} is larger than the file")
        if key not in storages:
            charge_bytes("storage", numel * element_size(dtype), f"storage {key!r:.40}")
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
            flat.view(torch.uint8).copy_(flat_tensor(raw, torch.uint8, len(raw)))
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
                nbytes = numel * element_size(dtype)
                charge_bytes("storage", nbytes, f"storage {key!r:.40}")
                storages[key] = flat_tensor(read(name, nbytes), dtype, numel)
            return storages[key]

        return _unpickle(io.BytesIO(read(pickles[0])), load)


def read_pickle_file(path: Path):
    """The root object of a zip archive, a legacy torch.save file or a plain pickle, read
    within the file's budget (storages and tensors at most its size, MAX_OBJECTS objects)."""
    with read_budget(path.stat().st_size):
        if zipfile.is_zipfile(path):
            root = _read_zip(path)
        else:
            with open(path, "rb") as f:
                root = _unpickle(f)
                if isinstance(root, int) and root == _LEGACY_MAGIC:
                    root = _read_legacy_rest(f)
    check_expansion(root)
    return root


# ------------------------------------------------------------------------------------------
# The restricted unpickler.

SAFE_GLOBALS = {
    **RECORD_GLOBALS,
    ("torch.storage", "_load_from_bytes"): _storage_from_legacy_bytes,
}


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
    """A pickle reader that resolves only ``SAFE_GLOBALS`` (plus ``resolve_type``'s numpy.dtype,
    torch dtypes and torch ``*Storage`` type names) and hands persistent ids to ``storage_loader``.

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
        found = SAFE_GLOBALS.get((module, name))
        if found is None:
            found = resolve_type(module, name)
        if found is not None:
            return found
        raise UnsafePickleError(f"refusing to load global {short_text(module)}."
                                f"{short_text(name)}: it is not on the allowlist of "
                                "edm_fast.io.official_pickle (tensors, plain containers, numpy "
                                "scalars and EDM's persistent objects)")

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
        if not (isinstance(inst, (ContainerRecord, ArrayRecord))
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
            and isinstance(pid[1], StorageType)):
        raise OfficialFormatError(f"unsupported persistent id {pid!r:.80}")
    if len(pid) == 6 and pid[5] is not None:
        raise OfficialFormatError("storage views (torch < 0.4 files) are not supported")
    return pid[1].dtype, str(pid[2]), int(pid[4])


# ------------------------------------------------------------------------------------------
# Whole files, and one-line messages that name them.

def read_state_dict(path) -> dict[str, torch.Tensor]:
    """A flat state dict (names -> tensors) from a ``torch.save`` file (zip archive or legacy)
    read by the restricted unpickler within the file's budgets, as snapshots are: no code runs,
    and storages, tensors and decompressed records may total at most the file's size. For
    weight files a user downloads (the metric networks' ``.pth``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weight file at {path}")
    try:
        root = read_pickle_file(path)
    except (UnsafePickleError, OfficialFormatError) as exc:
        raise type(exc)(file_error_message(exc, path)) from exc
    except (*PARSE_ERRORS, MemoryError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not a readable torch.save file (truncated or "
                              f"corrupt?): {cut_text(one_line_error(exc))}") from exc
    if not isinstance(root, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in root.items()):
        raise CheckpointError(f"{path} does not hold a flat state dict (names -> tensors)")
    total = sum(t.numel() * t.element_size() for t in root.values())
    if total > path.stat().st_size:
        raise CheckpointError(f"{path}: its tensors hold {total:,} bytes, more than the file's "
                              f"{path.stat().st_size:,} (shared or overlapping views)")
    return dict(root)


def cut_text(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters, "..." marking a cut."""
    return text if len(text) <= limit else text[:limit] + "..."


def file_error_message(exc: Exception, path: Path) -> str:
    """The error's message on one line, naming ``path`` (prefixed when it does not)."""
    text = cut_text(str(exc).replace("\r", "\\r").replace("\n", "\\n"), 400)
    return text if str(path) in text else f"{path}: {text}"


def one_line_error(exc: Exception) -> str:
    """'Type: message' with line breaks escaped (parsers quote the bad line, newline included)."""
    text = str(exc).replace("\r", "\\r").replace("\n", "\\n")
    return f"{type(exc).__name__}: {text}"
