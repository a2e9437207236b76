"""An ONNX file checked before ONNX Runtime opens it.

ONNX is data, not code, but a model may keep its weights in "external data" files named by
relative paths inside the model. A hostile model could point those at any file the user can
read (``/etc/shadow``, ``../../.ssh/id_rsa``), or at a huge file to exhaust memory. Before a
session is created, every external tensor must live in a regular file inside the model's own
folder (no absolute path, no ``..``, no symbolic link leading out), and its byte range must lie
within that file and match the tensor's declared shape and type.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..errors import BadFileError

__all__ = ["check_onnx_file"]


def _tensors(graph):
    """Every TensorProto of a graph: initializers and tensor attributes, subgraphs included."""
    import onnx

    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _tensors(sub)


def _external_range(path: Path, folder: Path, tensor) -> None:
    import onnx

    info = {entry.key: entry.value for entry in tensor.external_data}
    name = tensor.name or "(unnamed)"
    location = info.get("location", "")
    if not location or os.path.isabs(location) or ".." in Path(location).parts:
        raise BadFileError(f"{path}: tensor {name} keeps its data at {location!r}, outside the "
                           "model's folder")
    target = (folder / location).resolve()
    if folder not in target.parents or not target.is_file():
        raise BadFileError(f"{path}: tensor {name} keeps its data in {location!r}, which is "
                           "not a file inside the model's folder")
    size = target.stat().st_size
    try:
        offset, length = int(info.get("offset", 0)), int(info.get("length", size))
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (ValueError, KeyError, TypeError) as exc:
        raise BadFileError(f"{path}: tensor {name} has a malformed external-data entry "
                           f"({exc})") from exc
    if any(d < 0 for d in tensor.dims):
        raise BadFileError(f"{path}: tensor {name} has a negative dimension {list(tensor.dims)}")
    expected = math.prod(tensor.dims) * itemsize
    if offset < 0 or length != expected or offset + length > size:
        raise BadFileError(f"{path}: tensor {name} declares {expected} bytes at offset {offset} "
                           f"of {location!r} (length {length}, file size {size})")


def check_onnx_file(path) -> None:
    """BadFileError naming ``path`` when it is not a readable ONNX model or its external data
    reach outside its folder or past their files; nothing is read beyond the model file."""
    import onnx

    path = Path(path)
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise BadFileError(f"{path} is not a readable ONNX model ({type(exc).__name__})") \
            from exc
    folder = path.resolve().parent
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            _external_range(path, folder, tensor)
