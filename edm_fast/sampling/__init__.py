"""The runtime: running a sampling plan (``edm_fast.plan``) with a denoiser, fast.

    reference.py      the textbook samplers in pure PyTorch (EDM Alg. 1 and 2, k-diffusion's
                      and the solver papers' loops): the ground truth of every fast path
    sampler.py        ``Sampler``: options -> plan -> backend; per-seed noise; guidance
    backends/         the executors and evaluators behind ``Sampler`` (reference, compiled,
                      cpp, onnx, openvino) and the rule that picks one
    network_precision.py  a denoiser with its network in the precision asked for
    cpp_extension.py  lazy loading of the C++ extension ``edm_fast._C``

May import: the core (top-level modules of ``edm_fast``), ``nets``, ``kernels`` and ``io``.
Never imports ``train``, ``eval``, ``serve`` or ``cli``.
"""
