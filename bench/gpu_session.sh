#!/usr/bin/env bash
# The GPU checks and benchmarks of the fast sampler, in stages that each fit one 10-minute call
# of a lent GPU machine (repo root as the working directory; results under $OUT if set).
#
#   bash bench/gpu_session.sh tests        # setup + the test files with CUDA cases (GPU runs them)
#   bash bench/gpu_session.sh tests-rest   # setup + the rest of the default suite
#   bash bench/gpu_session.sh small        # setup + bench_sampler: mlp, tiny, bundled; batch 1..1024
#   bash bench/gpu_session.sh cifar        # setup + bench_sampler: cifar10-ddpmpp, batch 1..256
#   bash bench/gpu_session.sh cifar-1024   # setup + bench_sampler: cifar10-ddpmpp, batch 1024
#   bash bench/gpu_session.sh kernels      # setup + bench_kernels (fused steps vs copy bandwidth)
#
# setup (every stage; idempotent): wheels carried in .whl/ (k-diffusion for the side-by-side
# rows) go to /tmp/site; the package is installed in place without building (always: from the
# repo root `import edm_fast` works uninstalled, but edm_fast.kernels exists only once
# installed, through setup.py's package_dir); the C++ extension
# is built in place with the system g++ when one is found (the image's default compiler wrapper
# produced extensions that crashed on their first error message). On a machine without CUDA the
# stages still run: the @gpu tests skip and the benchmarks time the CPU.
set -uo pipefail
stage="${1:?usage: bash bench/gpu_session.sh tests|tests-rest|small|cifar|cifar-1024|kernels}"
out="${OUT:-bench/gpu_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

setup() {
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || return 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    EDM_FAST_SKIP_CPP_BUILD=1 python3 -m pip install -q --no-build-isolation --no-deps \
        --no-index -e . || return 1
    (cd / && python3 -c "import edm_fast.kernels") || return 1
    if ! python3 -c "import torch, edm_fast.sampling.cpp_extension as o, sys; sys.exit(0 if o.cpp_available() else 1)" 2>/dev/null; then
        local gxx
        gxx=$(ls /usr/bin/x86_64-linux-gnu-g++-1[0-9] 2>/dev/null | tail -1)
        if [ -n "$gxx" ]; then
            export CC="${gxx/g++/gcc}" CXX="$gxx" LDSHARED="$gxx -shared"
        fi
        EDM_FAST_FORCE_CPP_BUILD=1 python3 setup.py -q build_ext --inplace >"$out/build.log" 2>&1 \
            || echo "[gpu_session] C++ build failed: see $out/build.log (cpp rows will be absent)"
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
        | tee "$out/gpu.txt"
    python3 -c "import torch, triton, onnxruntime as o; print('torch', torch.__version__, \
'triton', triton.__version__, 'onnxruntime', o.__version__, o.get_available_providers())"
}

bench_sampler() {  # $1 models, $2 batches
    EDM_BENCH_MODELS="$1" EDM_BENCH_BATCHES="$2" EDM_BENCH_REPEATS="${EDM_BENCH_REPEATS:-5}" \
        python3 -m pytest bench/bench_sampler.py -q -s -p no:cacheprovider 2>&1 \
        | tee "$out/bench_$stage.log"
}

cuda_tests="tests/test_backends.py tests/test_kernels.py tests/test_onnx.py tests/test_cpp.py \
tests/test_export.py tests/test_augment.py"
setup || exit 1
case "$stage" in
    tests)
        # the files with CUDA cases: on a GPU host they run (CUDA graph loop, ONNX CUDA EP,
        # C++ ops and AOTI on CUDA, Triton kernels on CUDA) instead of skipping
        python3 -m pytest $cuda_tests -q -rs -p no:cacheprovider 2>&1 | tee "$out/tests_gpu.log"
        ;;
    tests-rest)
        python3 -m pytest tests -q -rs -p no:cacheprovider $(printf -- "--ignore=%s " $cuda_tests) \
            2>&1 | tee "$out/tests_rest.log"
        ;;
    small) bench_sampler mlp,tiny,bundled 1,16,64,256,1024 ;;
    cifar) bench_sampler cifar10-ddpmpp 1,16,64,256 ;;
    cifar-1024) EDM_BENCH_REPEATS="${EDM_BENCH_REPEATS:-1}" bench_sampler cifar10-ddpmpp 1024 ;;
    kernels)
        python3 -m pytest bench/bench_kernels.py -q -s -p no:cacheprovider 2>&1 \
            | tee "$out/bench_kernels.log"
        ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
status=$?
cp bench/RESULTS.md "$out/RESULTS.md"
exit $status
