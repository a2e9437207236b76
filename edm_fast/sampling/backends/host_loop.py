"""What the backends around an outside runtime share (onnx: ONNX Runtime, openvino: OpenVINO):
the Python executor (executor.py) runs the plan's program on the host and calls the runtime's
evaluator of D once per EVAL op, guided by ``guidance.Guidance``."""

from __future__ import annotations

import torch

from ...guidance import one_hot_labels
from .executor import run_program

__all__ = ["HostLoopBackend"]


class HostLoopBackend:
    """Warm-up, labels, single evaluations and ``run`` of a host-loop backend. A subclass sets
    ``plan``, ``batch_shape``, ``dtype``, ``device``, ``label_dim``, ``evaluate`` (D), ``guide``
    (D_g or None), ``guidance`` and ``sigmas`` (a ``SigmaVectorCache``) in its constructor."""

    @torch.no_grad()
    def _warmup(self) -> None:
        """One evaluation at the run's batch (the runtime allocates and picks kernels)."""
        n = self.batch_shape[0]
        for evaluate in (self.evaluate, self.guide):
            if evaluate is not None:
                evaluate(torch.zeros(self.batch_shape, device=self.device),
                         torch.ones(n, device=self.device), None)

    def _labels(self, class_labels, n: int) -> torch.Tensor | None:
        """(N, L) float32 one-hot or given labels on the device; None when unconditional."""
        if self.label_dim <= 0:
            if class_labels is not None:
                raise ValueError("this denoiser is unconditional; class_labels must be None")
            return None
        return one_hot_labels(class_labels, self.label_dim, batch=n, device=self.device,
                              dtype=torch.float32)

    def evaluation(self, x, sigma, class_labels=None):
        """A zero-argument callable that runs one denoiser evaluation D(x; sigma) exactly as
        the loop runs it (guided when the plan has guidance), with its inputs prepared
        beforehand (for benchmarks: t_F)."""
        x = x.to(self.device, self.dtype)
        n = x.shape[0]
        labels = self._labels(class_labels, n)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=self.device)
        sigma = sigma.reshape(-1).expand(n).contiguous()

        @torch.no_grad()
        def evaluate():
            return self.guidance(self.evaluate, x, sigma, labels).to(self.dtype)
        return evaluate

    def evaluate_once(self, x, sigma, class_labels=None) -> torch.Tensor:
        """One denoiser evaluation D(x; sigma) as the loop runs it."""
        return self.evaluation(x, sigma, class_labels)().clone()

    @torch.no_grad()
    def run(self, latents: torch.Tensor, noise: torch.Tensor | None = None,
            class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """``plan.program`` from ``latents`` (N, *sample_shape) with its injected draws
        ``noise`` (K, N, *sample_shape), K = plan.num_noise (None when 0), and class_labels
        (N, label_dim) float, (N,) int, or None (zeros). Returns (N, *sample_shape) in the
        backend's dtype on its device."""
        latents = latents.to(self.device, self.dtype)
        noise = None if noise is None else noise.to(self.device, self.dtype)
        labels = self._labels(class_labels, latents.shape[0])
        return run_program(self.plan.program, self.evaluate, latents, noise, labels,
                           guidance=self.guidance, sigmas=self.sigmas(latents.shape[0]))

    def __call__(self, latents, noise=None, class_labels=None) -> torch.Tensor:
        return self.run(latents, noise, class_labels)
