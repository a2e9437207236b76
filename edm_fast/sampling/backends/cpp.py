"""The 'cpp' backend: a plan's program (edm_fast/program.py) run by the C++ executor (csrc/).

At construction the denoiser D(x; sigma, labels) is exported once (AOTInductor .pt2 by default,
or TorchScript) and loaded into ``torch.classes.edm_fast.Sampler``; the export time is reported
as ``warmup_seconds``. ``run`` then executes ``plan.program`` entirely in C++: registers and
sigma vectors are preallocated, and at the evaluations the program flags guided either
classifier-free guidance runs conditional + unconditional as one batch of 2N, or, with an
autoguidance ``guide`` (Karras et al. 2024, arXiv 2406.02507), the guide is exported the same way
into a second file that the Sampler loads next to the main model, and each guided evaluation runs
both networks on the N samples with the same labels: D_g + w (D - D_g) (Eq. 1).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref

import torch

from .. import cpp_extension as ops
from ...io.export import export_aoti, export_torchscript, read_metadata
from ...guidance import one_hot_labels
from ...plan import SamplingPlan
from ..reference import NONFINITE_SAMPLES, NonFiniteError
from .executor import unwrap_guided

__all__ = ["CppBackend"]

_SUFFIX = {"aoti": ".pt2", "torchscript": ".ts"}
_NONFINITE_MESSAGE = "the sampled images contain NaN/Inf"  # csrc/program_executor.cpp's check


def _net_dtype_name(denoiser) -> str:
    """'float32', 'bfloat16', ... : the dtype the denoiser's network runs in (as the export's
    ``edm_fast.net_dtype`` metadata names it); 'float32' for a module that does not say."""
    dtype = getattr(denoiser, "net_dtype", None)
    if dtype is None:
        param = next(getattr(denoiser, "model", denoiser).parameters(), None) \
            if hasattr(denoiser, "parameters") else None
        dtype = param.dtype if param is not None else torch.float32
    return str(dtype).removeprefix("torch.")


class CppBackend:
    """Run a SamplingPlan's program with the C++ executor.

    Args:
        denoiser: a ``precond.Denoiser`` or a module in NVlabs' form (``io/export.py``); a
            ``GuidedDenoiser`` is unwrapped, its weight used when ``plan.guidance`` is None.
        plan: the run (``edm_fast.plan.SamplingPlan.build``): its program and guidance weight.
        batch_shape: (N, *sample_shape) of the latents ``run`` will get; other batch sizes work
            too (the export has a dynamic batch).
        dtype, device: the executor's dtype (float32 or float64) and device ('cpu' or 'cuda').
        label_dim: defaults to the denoiser's.
        model_path: where to write the exported model (default: a private temporary directory,
            removed with the backend). With ``reuse_model=True`` an existing file there is
            loaded instead of re-exported (its metadata must match).
        kind: 'aoti' (torch.export + AOTInductor) or 'torchscript' (torch.jit.trace).
        net_dtype: the network's precision inside the export (None: the network's own); an
            exported file passed as the model must already be in it.
        guide: autoguidance's guide denoiser (needs a guidance weight): a module, exported
            like the main one (same kind, dtype, net_dtype and batch shape, its own label_dim,
            which must equal the main one's) to ``<model_path without suffix>.guide.pt2``
            (``.guide.ts`` for kind 'torchscript'), reused under ``reuse_model`` as the main
            file is; or an ``ExportedDenoiser``, whose file is loaded as it is (exported for
            the main model's device type and dtype).
    """

    name = "cpp"

    def __init__(self, denoiser, plan: SamplingPlan, batch_shape, *,
                 dtype: torch.dtype = torch.float32, device="cpu", label_dim: int | None = None,
                 model_path: str | os.PathLike | None = None, kind: str = "aoti",
                 reuse_model: bool = False, net_dtype=None, guide=None):
        if kind not in _SUFFIX:
            raise ValueError(f"kind must be 'aoti' or 'torchscript', got {kind!r}")
        denoiser, plan = unwrap_guided(denoiser, plan)
        if guide is not None and plan.guidance is None:
            raise ValueError("a guide model (autoguidance) needs a guidance weight")
        ops.require_cpp()
        self.plan = plan
        self.batch_shape = tuple(int(n) for n in batch_shape)
        self.dtype, self.device = dtype, torch.device(device)
        self.label_dim = int(denoiser.label_dim if label_dim is None else label_dim)
        self.kind = kind
        if guide is not None and int(getattr(guide, "label_dim", 0)) != self.label_dim:
            raise ValueError(f"the guide model takes label_dim="
                             f"{int(getattr(guide, 'label_dim', 0))} but the main model takes "
                             f"{self.label_dim}: autoguidance needs a guide of the same task")
        if plan.guidance is not None and self.label_dim <= 0 and guide is None:
            raise ValueError("guidance needs a class-conditional denoiser (label_dim > 0), or "
                             "a guide model (autoguidance)")
        if model_path is None:
            workdir = tempfile.mkdtemp(prefix="edm_fast_cpp_")
            self._cleanup = weakref.finalize(self, shutil.rmtree, workdir, ignore_errors=True)
            model_path = os.path.join(workdir, "denoiser" + _SUFFIX[kind])
        self.model_path = os.fspath(model_path)

        # the guide's file goes next to the main one's (not next to an ExportedDenoiser's file)
        guide_stem = os.path.splitext(self.model_path)[0] + ".guide"

        start = time.perf_counter()
        self.model_path, self.kind, self.net_dtype = self._exported(denoiser, self.model_path,
                                                                    net_dtype, reuse_model)
        self.sampler = ops.load_sampler(self.model_path, kind=self.kind, device=self.device)
        self.guide_path = None
        if guide is not None:
            self.guide_path, guide_kind, _ = self._exported(
                guide, guide_stem + _SUFFIX[self.kind], net_dtype, reuse_model)
            self.sampler.load_guide(self.guide_path, guide_kind)
        self._program = ops.program_args(plan.program)
        self.warmup_seconds = time.perf_counter() - start

    def _exported(self, denoiser, path: str, net_dtype, reuse_model: bool):
        """(path, kind, net dtype name) of the file the C++ runner loads for ``denoiser``: an
        ``ExportedDenoiser``'s own file, else ``denoiser`` (its network in ``net_dtype``)
        exported to ``path`` in the backend's kind, or the file already there under
        ``reuse_model`` when its metadata match."""
        from ...io.exported import ExportedDenoiser
        from ..network_precision import network_in_dtype

        denoiser = network_in_dtype(denoiser, net_dtype)
        if isinstance(denoiser, ExportedDenoiser):  # already a file the C++ runner loads
            if denoiser.export_device.type != self.device.type:
                raise ValueError(f"{denoiser.path} was exported for {denoiser.export_device}, "
                                 f"not {self.device}")
            return denoiser.path, denoiser.kind, _net_dtype_name(denoiser)
        net_name = _net_dtype_name(denoiser)
        if reuse_model and os.path.exists(path):
            from ...io.trusted_exports import check_trusted

            check_trusted(path)  # a program: reuse only what edm-fast wrote
        if not (reuse_model and os.path.exists(path)
                and self._metadata_matches(read_metadata(path), net_name)):
            export = export_aoti if self.kind == "aoti" else export_torchscript
            export(denoiser, self.batch_shape, label_dim=self.label_dim, device=self.device,
                   dtype=self.dtype, path=path)
        return path, self.kind, net_name

    def _metadata_matches(self, meta: dict, net_dtype: str | None = None) -> bool:
        """Whether an existing export's metadata fits this backend (the main model's net dtype
        unless ``net_dtype`` names the guide's)."""
        net_dtype = self.net_dtype if net_dtype is None else net_dtype
        return (meta.get("edm_fast.label_dim") == str(self.label_dim)
                and meta.get("edm_fast.sample_shape") == ",".join(map(str, self.batch_shape[1:]))
                and meta.get("edm_fast.dtype") == str(self.dtype).removeprefix("torch.")
                and meta.get("edm_fast.net_dtype", "float32") == net_dtype
                and meta.get("edm_fast.device") == self.device.type)

    def run(self, latents: torch.Tensor, noise: torch.Tensor | None = None,
            class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``plan.program`` from ``latents``.

        latents: (N, *sample_shape) unit-variance noise; noise: (K, N, *sample_shape) with
        K = plan.num_noise (the k-th slice is the program's k-th injected draw), or None when
        K = 0; class_labels: (N, label_dim) float, (N,) int, or None (zeros).
        Returns (N, *sample_shape) in the backend's dtype on its device.
        """
        latents = latents.to(self.device, self.dtype).contiguous()
        n = latents.shape[0]
        labels = None
        if class_labels is not None:
            labels = one_hot_labels(class_labels, self.label_dim, batch=n, device=self.device,
                                    dtype=self.dtype)
        if noise is not None:
            noise = noise.to(self.device, self.dtype).contiguous()
        try:
            return self.sampler.run_program(latents, *self._program, noise, labels,
                                            self.plan.guidance)
        except RuntimeError as exc:  # the executor's end check, as a type
            if _NONFINITE_MESSAGE not in str(exc):
                raise
            raise NonFiniteError(NONFINITE_SAMPLES) from None

    __call__ = run

    def evaluation(self, x, sigma, class_labels=None):
        """A zero-argument callable that runs one evaluation of the exported denoiser through
        the C++ runner, with its inputs prepared beforehand (for benchmarks: t_F)."""
        labels = None
        if self.label_dim > 0:
            labels = one_hot_labels(class_labels, self.label_dim, batch=x.shape[0],
                                    device=self.device, dtype=self.dtype)
        x = x.to(self.device, self.dtype)
        sigma = torch.as_tensor(sigma, dtype=self.dtype, device=self.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]).contiguous()

        @torch.no_grad()
        def evaluate():
            return self.sampler.denoise(x, sigma, labels)
        return evaluate

    def evaluate_once(self, x, sigma, class_labels=None) -> torch.Tensor:
        """One evaluation of the exported denoiser through the C++ runner."""
        return self.evaluation(x, sigma, class_labels)()
