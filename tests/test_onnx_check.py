"""ONNX files with external data are checked before ONNX Runtime opens them (edm_fast/io/onnx_check.py)."""

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edm_fast.errors import BadFileError  # noqa: E402
from edm_fast.io.onnx_check import check_onnx_file  # noqa: E402
from edm_fast.io.onnx_export import make_session  # noqa: E402


def _model_with_external(folder, location="w.bin", *, offset=0, length=None, data_bytes=None,
                         dims=(4,)):
    """y = x + w with w (float32, ``dims``) stored externally at ``location``."""
    weight = numpy_helper.from_array(np.arange(int(np.prod(dims)), dtype=np.float32).reshape(
        dims), name="w")
    raw = weight.raw_data
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset)}
    entries["length"] = str(len(raw) if length is None else length)
    for key, value in entries.items():
        weight.external_data.add(key=key, value=value)
    target = folder / location
    if not os.path.isabs(location) and ".." not in location:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(raw if data_bytes is None else data_bytes)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_a_well_formed_external_model_loads(tmp_path):
    path = _model_with_external(tmp_path, "weights/w.bin")
    check_onnx_file(path)
    out = make_session(path).run(None, {"x": np.ones(4, np.float32)})[0]
    assert np.array_equal(out, np.arange(4, dtype=np.float32) + 1)


@pytest.mark.parametrize("case", ["absolute", "parent", "symlink out", "past the end",
                                  "length mismatch", "missing file", "garbage"])
def test_hostile_external_data_is_refused_before_loading(tmp_path, case):
    inner = tmp_path / "model"
    inner.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 16)
    if case == "absolute":
        path = _model_with_external(inner, str(secret))
    elif case == "parent":
        path = _model_with_external(inner, "../secret.bin")
    elif case == "symlink out":
        (inner / "link.bin").symlink_to(secret)
        path = _model_with_external(inner, "link.bin", data_bytes=b"")
        (inner / "link.bin").unlink()
        (inner / "link.bin").symlink_to(secret)
    elif case == "past the end":
        path = _model_with_external(inner, offset=8)
    elif case == "length mismatch":
        path = _model_with_external(inner, length=8, data_bytes=b"\0" * 16)
    elif case == "missing file":
        path = _model_with_external(inner)
        (inner / "w.bin").unlink()
    else:
        path = inner / "m.onnx"
        path.write_bytes(b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01garbage")
    with pytest.raises(BadFileError, match=str(path).replace(".", r"\.")) as info:
        make_session(path)
    assert "\n" not in str(info.value)
