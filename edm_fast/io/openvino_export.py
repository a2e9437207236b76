"""OpenVINO IR (.xml + .bin) of the preconditioned denoiser D(x; sigma, labels).

The IR is OpenVINO's conversion of the ONNX export (``onnx_export.export_onnx``: the same
inputs ``x``, ``sigma`` and ``class_labels``, output ``denoised``, float32 at the boundary, a
dynamic or static batch), with the network in float32: the precision it runs in is chosen when
the model is compiled for a device (``INFERENCE_PRECISION_HINT``, backends/openvino.py), not
baked into the file. The weights are saved uncompressed (``compress_to_fp16=False``; OpenVINO's
default would round them to float16). The ``edm_fast.*`` metadata of the ONNX export is kept
in the IR's runtime info under ``edm_fast``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

__all__ = ["export_openvino", "read_openvino_metadata"]

RT_INFO_KEY = "edm_fast"


def export_openvino(denoiser, path: str | os.PathLike, *, sample_shape: Sequence[int],
                    label_dim: int | None = None, dynamic_batch: bool = True, batch: int = 2,
                    opset: int = 17, exporter: str = "auto", check: bool = True):
    """Write D to ``path`` (an .xml; its weights go to the .bin beside it) and return the
    ``OnnxExportReport`` of the ONNX export it was converted from (its check compares ONNX
    Runtime with PyTorch; the openvino backend's own tests compare OpenVINO with the
    reference)."""
    import openvino as ov

    from .export import output_file
    from .onnx_export import export_onnx, read_onnx_metadata

    path = output_file(path)
    if not path.endswith(".xml"):
        raise ValueError(f"an OpenVINO IR path must end in '.xml', got {path!r}")
    with tempfile.TemporaryDirectory(prefix="edm_fast_ov_") as work:
        onnx_path = os.path.join(work, "denoiser.onnx")
        report = export_onnx(denoiser, onnx_path, sample_shape=sample_shape, label_dim=label_dim,
                             opset=opset, dynamic_batch=dynamic_batch, batch=batch, check=check,
                             exporter=exporter)
        model = ov.Core().read_model(onnx_path)
        for key, value in read_onnx_metadata(onnx_path).items():
            model.set_rt_info(value, [RT_INFO_KEY, key.removeprefix("edm_fast.")])
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        ov.save_model(model, path, compress_to_fp16=False)  # and the .bin beside it
    report.path = path
    return report


def read_openvino_metadata(path_or_model) -> dict[str, str]:
    """The ``edm_fast.*`` metadata of an IR written by ``export_openvino`` (a path or a read
    ``openvino.Model``); {} when it has none."""
    import openvino as ov

    model = path_or_model
    if not isinstance(model, ov.Model):
        model = ov.Core().read_model(os.fspath(path_or_model))
    info = model.get_rt_info()
    if RT_INFO_KEY not in info:
        return {}
    return {f"edm_fast.{key}": model.get_rt_info([RT_INFO_KEY, key]).astype(str)
            for key in info[RT_INFO_KEY]}
