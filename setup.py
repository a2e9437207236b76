"""Build script: the Python package plus the optional C++ extension ``edm_fast._C``.

Set ``EDM_FAST_SKIP_CPP_BUILD=1`` to skip the extension (the package then falls back to the
pure-PyTorch reference with a warning). A failed extension build is reported but does not fail
the install. ``EDM_FAST_FORCE_CPP_BUILD=1`` turns such a failure into an error.
"""

import glob
import os
import re
import sys

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["edm_fast", "edm_fast.*"])


def _torch_cxx_standard() -> str:
    """The C++ standard libtorch declares in TorchConfig.cmake (17 for torch 2.11, 20 for 2.13)."""
    import torch.utils

    config = os.path.join(torch.utils.cmake_prefix_path, "Torch", "TorchConfig.cmake")
    try:
        with open(config) as f:
            found = re.search(r"CXX_STANDARD (\d+)", f.read())
    except OSError:
        found = None
    return found.group(1) if found else "17"


def _extension_setup():
    if os.environ.get("EDM_FAST_SKIP_CPP_BUILD", "0") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("edm-fast: torch is not importable at build time; skipping edm_fast._C",
              file=sys.stderr)
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """Build the extension, but let the install succeed without it unless forced."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler missing, headers mismatch, ...
                if os.environ.get("EDM_FAST_FORCE_CPP_BUILD", "0") == "1":
                    raise
                print(f"edm-fast: WARNING: building {ext.name} failed ({exc}); "
                      "the 'cpp' backend will be unavailable.", file=sys.stderr)

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    ext = CppExtension(
        name="edm_fast._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        # -g0 overrides the -g of Python's CFLAGS: debug info doubles the compile time.
        extra_compile_args={"cxx": ["-O3", "-g0", f"-std=c++{_torch_cxx_standard()}"]},
    )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_setup()
setup(packages=PACKAGES, ext_modules=ext_modules, cmdclass=cmdclass)
