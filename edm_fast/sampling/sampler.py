"""``Sampler``: build once (plan, allocation, compilation, export, graph capture), call many times.

    sampler = Sampler("default", num_steps=18, batch_size=64, device="cuda")
    images = sampler(seeds=range(64), class_labels=3)   # (64, C, H, W), about [-1, 1]
    sampler.class_names                                  # ['0', ..., '9'] (folder names, ...)
    cats = sampler(seeds=range(8), class_labels="cat")   # a class by the name the model stores

Thread safety: one lock per instance serialises calls, so a Sampler may be shared by the threads
of an inference server (requests queue on it); for parallel throughput create one Sampler per
worker (each owns its buffers, compiled graphs and model sessions).
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections.abc import Iterable, Sequence

import torch

from .backends import auto_candidates, is_auto, resolve_backend, warn_fallback
from ..device import resolve_device
from ..guidance import GuidedDenoiser, one_hot_labels
from ..io.model_card import ModelCard, model_card
from ..noise import SeedNoise, parse_seeds
from ..plan import SamplingPlan

__all__ = ["Sampler", "model_shape", "plan_for_model"]


class Sampler:
    """Sampling of one denoiser with one solver (EDM Alg. 2 by default) at a fixed batch size,
    shape and dtype.

    Args:
        model: a denoiser module D(x, sigma, class_labels), or a checkpoint path / model name
            understood by ``edm_fast.io.models.load_denoiser`` ('default', 'toy-gmm', ...).
        shape: one sample's shape, e.g. (1, 16, 16); taken from the model when omitted.
        batch_size: samples per backend call; larger requests run in chunks of this size (the
            last chunk is padded, which cannot change results: noise is per seed).
        solver: one of ``edm_fast.solvers.SOLVERS`` (euler, heun, dpmpp_2m, dpmpp_2m_sde,
            dpmpp_3m_sde, unipc, ipndm, lms, ddim, ddpm, euler_ancestral).
        num_steps, schedule, sigma_min, sigma_max, rho, sigmas: the sigma grid (schedule 'edm':
            Eq. 5 with rho; 'logsnr', 'vp', 've', 'iddpm', 'ddpm'; or an explicit list); the
            range defaults to the model's, else EDM's 0.002 .. 80.
        S_churn, S_min, S_max, S_noise, ode, alpha: Alg. 2's churn and Alg. 1's sigma(t)/s(t)
            family and second-order parameter (euler/heun); eta, order, variance: the other
            solvers' options (see ``SamplingPlan.build``). An option the solver does not read
            is refused.
        guidance: the guidance weight w (None: off, one evaluation per step). Without a guide,
            classifier-free guidance D_u + w (D_c - D_u) (1: conditional only; 0: the
            unconditional model); with ``guide``, autoguidance D_g + w (D - D_g) (1: the main
            model alone; 0: the guide alone).
        guide: autoguidance's guide (Karras et al. 2024, arXiv 2406.02507): a smaller or
            less-trained denoiser of the same task, as a module or a checkpoint path / model
            name (loaded like ``model``). It must make samples of the same shape and take the
            same labels (label_dim) as ``model``, and cover the plan's noise levels; it runs in
            ``net_dtype`` too. A conditional guide gets the same labels as the main model and
            replaces the unconditional branch (no classifier-free guidance on top); an
            unconditional main model can be autoguided. Needs ``guidance``; every backend
            runs it.
        guidance_interval: (sigma_lo, sigma_hi): guidance only at those noise levels
            (Kynkaanniemi et al. 2024), the plain main D elsewhere (the guide is not evaluated
            there).
        dtype: dtype of the sampler state (float32, or float64 for the golden reference).
        device: 'auto', 'cpu', 'cuda', 'cuda:1', 'mps', ...
        net_dtype: the network's precision: 'fp32', 'bf16', 'fp16' or 'auto' (also 'float32',
            'bfloat16', 'float16' and torch dtypes); None (default): the network as loaded,
            float32 for every edm-fast checkpoint. The sampler state and step math stay in
            ``dtype``. 'auto' picks bf16 only where it was measured faster at float32 quality
            and says what it chose (a warning); a precision the device cannot run raises
            EdmFastError. See edm_fast.precision and docs/PRECISION.md.
        backend: 'auto', 'reference', 'compiled', 'cpp', 'onnx' or 'openvino' (see
            edm_fast.sampling.backends).
        expected_images: optional workload hint; with 'auto' on the CPU a small job keeps the
            reference loop rather than paying a compile/export it cannot amortise.
    """

    def __init__(self, model, shape: Sequence[int] | None = None, *, batch_size: int = 64,
                 solver: str = "heun", num_steps: int = 18, schedule: str = "edm",
                 sigma_min: float | None = None, sigma_max: float | None = None,
                 rho: float = 7.0, sigmas=None, S_churn: float = 0.0, S_min: float = 0.0,
                 S_max: float = float("inf"), S_noise: float = 1.0, eta: float | None = None,
                 order: int | None = None, ode: str = "edm", alpha: float = 1.0,
                 variance: str = "beta", guidance: float | None = None,
                 guidance_interval=None, guide=None, dtype: torch.dtype = torch.float32,
                 device="auto", backend: str = "auto", backend_options: dict | None = None,
                 expected_images: int | None = None, net_dtype=None):
        start = time.perf_counter()
        self.device = resolve_device(device)
        self.denoiser = _load(model, self.device)
        self.guide = None if guide is None else _load(guide, self.device)
        self.shape = (model_shape(self.denoiser) if shape is None
                      else _check_shape(self.denoiser, tuple(int(n) for n in shape)))
        if isinstance(batch_size, bool) or not hasattr(batch_size, "__index__") \
                or batch_size < 1:  # 2.5 was silently 2
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.batch_size = int(batch_size)
        self.dtype = _as_dtype(dtype)
        self.label_dim = int(getattr(self.denoiser, "label_dim", 0))
        if self.guide is not None:
            _check_guide(self.denoiser, self.guide, guidance)
        elif guidance is not None and self.label_dim == 0:
            raise ValueError("classifier-free guidance needs a class-conditional model; an "
                             "unconditional one is guided by a guide model (guide=, "
                             "--guide-ckpt: autoguidance)")
        if self.guide is None and guidance not in (None, 1) and self.model_card.label_dropout == 0:
            warnings.warn("guidance mixes in the model's unconditional output, which this model "
                          "never learned (it was trained with label_dropout=0); expect worse "
                          "samples", stacklevel=2)
        self.plan = plan_for_model(
            self.denoiser, solver=solver, num_steps=num_steps, schedule=schedule,
            sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, sigmas=sigmas,
            S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise, eta=eta, order=order,
            ode=ode, alpha=alpha, variance=variance, guidance=guidance,
            guidance_interval=guidance_interval, guide=self.guide)
        options = dict(backend_options or {})
        if "net_dtype" in options:  # the onnx backend's own option before Sampler had one
            if net_dtype is not None:
                raise ValueError("net_dtype is given twice (net_dtype= and backend_options); "
                                 "pass Sampler(net_dtype=) only")
            net_dtype = options.pop("net_dtype")
        self.net_dtype = self._resolve_net_dtype(net_dtype)
        self.backend = self._build_backend(backend, expected_images, options)
        self.backend_name = self.backend.name
        self.warmup_seconds = time.perf_counter() - start
        self._lock = threading.Lock()

    def _resolve_net_dtype(self, net_dtype) -> torch.dtype | None:
        """The network's dtype (None: as loaded) for ``net_dtype``; warns what 'auto' chose, or
        that the precision asked for runs emulated on this device."""
        from ..precision import gflop_per_image, resolve_net_dtype

        inner = self.denoiser.denoiser if isinstance(self.denoiser, GuidedDenoiser) else None
        network = inner if inner is not None else self.denoiser
        if net_dtype == "auto" and not _is_network(self.denoiser):
            return None  # an exact (toy) or exported denoiser runs in its own precision
        chosen = resolve_net_dtype(net_dtype, self.device,
                                   lambda: gflop_per_image(network, self.shape, self.device))
        if chosen.note:
            warnings.warn(chosen.note, stacklevel=3)
        return chosen.dtype

    def _build_backend(self, requested: str, expected_images, options: dict):
        """The backend object: the one asked for (its errors propagate), or for 'auto' the first
        of ``auto_candidates`` that builds for this model, with one warning naming the reasons
        for every better one that did not load or failed to build (export, compile)."""
        guided = {} if self.guide is None else {"guide": self.guide}

        def build(cls):
            return cls(self.denoiser, self.plan, (self.batch_size, *self.shape), dtype=self.dtype,
                       device=self.device, label_dim=self.label_dim, net_dtype=self.net_dtype,
                       **guided, **options)

        if not is_auto(requested):
            return build(resolve_backend(requested, self.device, expected_images, self.dtype,
                                         self.net_dtype))
        if not _is_network(self.denoiser):  # an exact (toy) denoiser: nothing to export/compile
            return build(resolve_backend("reference", self.device))
        classes, skipped = auto_candidates(self.device, expected_images, self.dtype,
                                           self.net_dtype, guide=self.guide is not None)
        for cls in classes:
            try:
                backend = build(cls)
            except Exception as exc:
                if cls.name == "reference":
                    raise
                why = f"{cls.name}: failed to build for this model ({type(exc).__name__}: {exc})"
                skipped.append((cls.name, why))
                continue
            warn_fallback(cls.name, skipped, self.device, stacklevel=3, net_dtype=self.net_dtype)
            return backend
        raise RuntimeError("no sampler backend could be built")  # the reference always builds

    @property
    def model_card(self) -> ModelCard:
        """What the model's file says about it (``edm_fast.io.model_card``)."""
        return model_card(self.denoiser)

    @property
    def class_names(self) -> list[str]:
        """The class names the checkpoint stores, index i naming label i: an image folder's
        subfolder names, '0'..'9' for the digits; [] when it stores none (or is
        unconditional). ``class_labels`` takes these names as well as indices."""
        return list(self.model_card.class_names)

    def class_index(self, name: str) -> int:
        """The label index of the class called ``name``; ValueError naming the valid names."""
        names = self.class_names
        if name in names:
            return names.index(name)
        if self.label_dim == 0:
            raise ValueError(f"class {name!r} asked for, but the model is unconditional: it has "
                             "no classes")
        if not names:
            raise ValueError(f"class {name!r} asked for by name, but this model stores no class "
                             f"names: pass indices 0..{self.label_dim - 1} instead")
        raise ValueError(f"unknown class {name!r}; this model's classes are: "
                         f"{', '.join(map(repr, names))}")

    def _named_labels(self, class_labels):
        """A name, or a list of names (indices may be mixed in), as label indices; anything
        else unchanged."""
        if isinstance(class_labels, str):
            return self.class_index(class_labels)
        if isinstance(class_labels, (list, tuple)) and any(isinstance(c, str)
                                                             for c in class_labels):
            return torch.tensor([self.class_index(c) if isinstance(c, str) else int(c)
                                 for c in class_labels], dtype=torch.long)
        if getattr(getattr(class_labels, "dtype", None), "kind", None) in ("U", "S", "O"):
            values = class_labels.tolist()  # numpy names: str (or bytes) items
            values = values if isinstance(values, list) else [values]
            values = [v.decode() if isinstance(v, bytes) else v for v in values]
            named = self._named_labels(values)
            return named[0].item() if class_labels.ndim == 0 else named
        return class_labels

    @property
    def num_evals(self) -> int:
        """Denoiser evaluations per image (NFE); guidance runs them at twice the batch (the
        guide's evaluations, with autoguidance)."""
        return self.plan.num_evals

    def __call__(self, seeds: Iterable[int] | str | None = None, class_labels=None, *,
                 noise: torch.Tensor | None = None, step_noise: torch.Tensor | None = None):
        """Sample images for ``seeds`` (per-seed noise) or for explicit ``noise`` (N, *shape).

        step_noise: with ``noise=``, the draws the solver injects (K, N, *shape),
        K = ``plan.num_noise`` (churn, ancestral or SDE noise; drawn at random when omitted).

        class_labels: None (unconditional / zero labels), an int (or 0-d integer array) or a
        class name (one of ``class_names``) for all, (N,) ints or names, or (N, label_dim)
        floats. Returns (N, *shape) in the sampler's dtype, on its
        device. Samples are not clipped: values slightly outside [-1, 1] are the model's own.
        """
        latents, draws = self._noise(seeds, noise, step_noise)
        n = latents.shape[0]
        if class_labels is None and self.plan.guidance is not None and self.guide is None \
                and self.label_dim > 0:
            raise ValueError("guidance needs class_labels: without them every label is zero, "
                             "and the guided mix of two unconditional outputs is the "
                             "unconditional output")
        class_labels = self._named_labels(class_labels)
        if getattr(class_labels, "ndim", None) == 0:  # a numpy / torch scalar
            class_labels = class_labels.item()
        if isinstance(class_labels, bool):
            raise ValueError("class_labels must be class indices or one-hot rows, not a bool")
        if isinstance(class_labels, int):
            class_labels = torch.full((n,), class_labels, dtype=torch.long)  # one for all
        labels = one_hot_labels(class_labels, self.label_dim, batch=n, device=self.device,
                                dtype=self.dtype)
        if self.label_dim == 0:
            labels = None
        with self._lock:
            return torch.cat([self._chunk(latents, draws, labels, lo, min(lo + self.batch_size, n))
                              for lo in range(0, n, self.batch_size)])

    def _noise(self, seeds, noise, step_noise):
        k = self.plan.num_noise
        if (seeds is None) == (noise is None):
            raise ValueError("pass exactly one of seeds= or noise=")
        if seeds is not None:
            if step_noise is not None:  # it would be ignored: the seeds draw the step noise
                raise ValueError("step_noise= goes with noise=; with seeds= the step noise "
                                 "comes from the seeds")
            seeds = parse_seeds(seeds)
            stream = SeedNoise(seeds, self.shape, device=self.device)
            return stream.draw(), stream.draw_many(k)
        noise = torch.as_tensor(noise)  # also a numpy array
        if tuple(noise.shape[1:]) != self.shape or noise.shape[0] == 0:
            raise ValueError(f"noise must be (N, {', '.join(map(str, self.shape))}) with N >= 1, "
                             f"got {tuple(noise.shape)}")
        if not noise.is_floating_point():
            raise ValueError(f"noise must be floating-point unit-variance latents, got "
                             f"{noise.dtype}")
        if step_noise is None:
            step_noise = torch.randn((k, *noise.shape), device=noise.device, dtype=noise.dtype)
        elif (step_noise := torch.as_tensor(step_noise)).shape != (k, *noise.shape):
            raise ValueError(f"step_noise must be {(k, *noise.shape)} for this plan, "
                             f"got {tuple(step_noise.shape)}")
        return noise.to(self.device), step_noise.to(self.device)

    def _chunk(self, latents, draws, labels, lo, hi):
        """Run one backend call on rows lo:hi, padded to the batch size."""
        pad = self.batch_size - (hi - lo)

        def take(t, dim=0):
            if t is None:
                return None
            part = t.narrow(dim, lo, hi - lo)
            if pad:
                part = torch.cat([part, part.narrow(dim, 0, 1).expand_as(part.narrow(dim, 0, 1))
                                  .repeat_interleave(pad, dim=dim)], dim=dim)
            return part.contiguous()

        out = self.backend.run(take(latents), take(draws, 1) if draws.shape[0] else None,
                               take(labels))
        return out[: hi - lo]


def plan_for_model(denoiser, *, sigma_min: float | None = None, sigma_max: float | None = None,
                   guide=None, **options) -> SamplingPlan:
    """The plan ``Sampler`` runs for this denoiser: the sigma range within the model's (EDM's
    0.002 .. 80 by default; with an autoguidance ``guide``, within both models' ranges), its
    grid rounded by the model's ``round_sigma``; ``options`` as ``SamplingPlan.build`` takes
    them. A guide that does not cover an evaluated noise level (an explicit grid) is refused."""
    models = [denoiser] if guide is None else [denoiser, guide]
    plan = SamplingPlan.build(**_sigma_range(models, sigma_min, sigma_max), **options,
                              round_sigma=getattr(denoiser, "round_sigma", None))
    if guide is not None:
        low, high = (float(getattr(guide, "sigma_min", 0.0)),
                     float(getattr(guide, "sigma_max", math.inf)))
        outside = [s for s in plan.program.eval_sigmas if not low <= s <= high]
        if outside:
            raise ValueError(f"the guide model covers noise levels {low:g} .. {high:g}, but the "
                             f"plan evaluates sigma = {outside[0]:g}; choose a grid inside its "
                             "range (sigma_min/sigma_max)")
    return plan


def _load(model, device):
    """A module on ``device`` in eval mode from a module, checkpoint path or model name."""
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        from ..io.models import load_denoiser

        model = load_denoiser(model, device=device)
    return model.to(device).eval() if hasattr(model, "to") else model


def _check_guide(denoiser, guide, guidance) -> None:
    """An autoguidance guide must make the main model's samples (shape) from the same labels
    (label_dim), and comes with a guidance weight; one ValueError naming what differs."""
    if guidance is None:
        raise ValueError("a guide model (autoguidance) needs a guidance weight (guidance=W, "
                         "--guidance W)")
    if isinstance(denoiser, GuidedDenoiser):
        raise ValueError("the model is a GuidedDenoiser (classifier-free guidance) and a guide "
                         "model is given (autoguidance): pass one kind of guidance")
    main_labels = int(getattr(denoiser, "label_dim", 0))
    guide_labels = int(getattr(guide, "label_dim", 0))
    if main_labels != guide_labels:
        raise ValueError(f"the guide model takes label_dim={guide_labels} but the main model "
                         f"takes {main_labels}: autoguidance needs a guide of the same task "
                         "(same classes, or both unconditional)")
    try:
        main_shape, guide_shape = model_shape(denoiser), model_shape(guide)
    except ValueError:
        return  # a model that does not say its shape: the backends' first call will
    if main_shape != guide_shape:
        raise ValueError(f"the guide model makes samples of shape {guide_shape} but the main "
                         f"model {main_shape}: autoguidance needs a guide of the same task")


def model_shape(denoiser) -> tuple[int, ...]:
    """(C, H, W) or (D,): what the model's card says (``edm_fast.io.model_card``)."""
    shape = model_card(denoiser).sample_shape
    if shape is None:
        raise ValueError("cannot tell the sample shape from this model: pass shape=")
    return shape


def _check_shape(denoiser, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` if this model can sample it: a ValueError for a wrong rank or channel count, or
    for a size the UNet's down-sampling cannot halve; a warning for another resolution than the
    one the network was built for (a convolutional net runs there, but was not trained there)."""
    if any(n < 1 for n in shape):
        raise ValueError(f"shape sizes must be >= 1, got {shape}")
    try:
        native = model_shape(denoiser)
    except ValueError:
        return shape  # a model that does not say: the caller knows
    if len(shape) != len(native) or shape[0] != native[0]:
        raise ValueError(f"shape {shape} does not fit this model, which makes samples of shape "
                         f"{native}")
    if shape != native:
        net = getattr(getattr(denoiser, "denoiser", denoiser), "model", None)
        levels = len(getattr(net, "channel_mult", ()) or ())
        factor = 2 ** max(levels - 1, 0)
        if any(n % factor for n in shape[1:]):
            raise ValueError(f"shape {shape}: this UNet halves the image {levels - 1} times, so "
                             f"height and width must be multiples of {factor}")
        warnings.warn(f"sampling at shape {shape}, but the model was built for {native}; "
                      "expect poor samples", stacklevel=3)
    return shape


SAMPLER_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _as_dtype(dtype) -> torch.dtype:
    """The sampler state's dtype from a torch.dtype or its name ('float32', 'torch.float64'):
    float32 or float64; float16 / bfloat16 are accepted with a warning, since every step sum is
    rounded to them. Measured on the bundled model against float64 (images in [-1, 1]), the
    largest pixel error is 0.002 (float16) and 0.02 (bfloat16) at 18 steps, but 0.2 and 1.9 at
    4 steps, where the few large steps leave the state's rounding at sigma = 80 uncorrected."""
    value = dtype if isinstance(dtype, torch.dtype) else \
        getattr(torch, str(dtype).removeprefix("torch."), None)
    if value not in SAMPLER_DTYPES:
        raise ValueError(f"dtype must be float32 or float64 (float16 and bfloat16 work with a "
                         f"warning), as a torch.dtype or its name; got {dtype!r}")
    if value in (torch.float16, torch.bfloat16):
        warnings.warn(f"a {value} sampler state rounds every step sum: pixels can be off by "
                      "0.002-0.02 at 18 steps and by up to 2 at 4 steps; for a half-precision "
                      "network keep dtype=float32 and build the Denoiser with net_dtype instead",
                      stacklevel=3)
    return value


def _sigma_range(models, sigma_min: float | None, sigma_max: float | None) -> dict:
    """Alg. 2's sigma_min/sigma_max: EDM's 0.002 .. 80 by default, within the range the
    preconditioning of the model (or of every model of a list: main and guide) supports (VP,
    iDDPM); an explicit value outside it is clipped, with a warning."""
    models = models if isinstance(models, list) else [models]
    model_min = max(float(getattr(m, "sigma_min", 0.0)) for m in models)
    model_max = min(float(getattr(m, "sigma_max", math.inf)) for m in models)
    out = {}
    for name, asked, default, clip, bound in (("sigma_min", sigma_min, 0.002, max, model_min),
                                              ("sigma_max", sigma_max, 80.0, min, model_max)):
        if asked is not None and not 0 < asked < math.inf:
            raise ValueError(f"{name} must be a positive finite number, got {asked}")
        value = clip(default if asked is None else asked, bound)
        if asked is not None and value != asked:
            warnings.warn(f"{name}={asked:g} is outside the model's range [{model_min:g}, "
                          f"{model_max:g}]; using {value:g}", stacklevel=3)
        out[name] = value
    if not out["sigma_min"] < out["sigma_max"]:
        raise ValueError(f"need sigma_min < sigma_max, got {out['sigma_min']:g} and "
                         f"{out['sigma_max']:g}")
    return out


def _is_network(denoiser) -> bool:
    """True for a Denoiser (network + preconditioning), also inside a GuidedDenoiser."""
    from ..precond import Denoiser

    inner = denoiser.denoiser if isinstance(denoiser, GuidedDenoiser) else None
    return isinstance(inner if inner is not None else denoiser, Denoiser)
