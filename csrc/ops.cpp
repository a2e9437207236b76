// The Python/TorchScript boundary of edm_fast's C++ code: one TORCH_LIBRARY(edm_fast, m) with
// the seed-noise op and the Sampler class. Python reaches these as torch.ops.edm_fast.<op> and
// torch.classes.edm_fast.Sampler (wrapped by edm_fast/sampling/cpp_extension.py).
//
// The op is registered as a CompositeImplicitAutograd kernel (built from ATen ops), so it runs
// on every device ATen supports without a separate meta implementation.
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "sampler.h"
#include "seed_noise.h"

namespace edm_fast {
namespace {

at::Tensor seed_noise_op(c10::IntArrayRef seeds, c10::IntArrayRef shape, int64_t draws) {
  std::vector<uint64_t> useeds;
  for (int64_t s : seeds) {
    TORCH_CHECK(s >= 0, "seed_noise: seeds must be non-negative, got ", s);
    useeds.push_back(static_cast<uint64_t>(s));
  }
  TORCH_CHECK(draws >= 0, "seed_noise: draws must be >= 0, got ", draws);
  return SeedNoise(useeds, shape.vec()).draw_many(draws);
}

}  // namespace
}  // namespace edm_fast

TORCH_LIBRARY(edm_fast, m) {
  using edm_fast::Sampler;
  m.def("seed_noise(int[] seeds, int[] shape, int draws) -> Tensor",
        TORCH_FN(edm_fast::seed_noise_op));

  m.class_<Sampler>("Sampler")
      .def(torch::init<std::string, std::string, std::string>())
      .def("load_guide", &Sampler::load_guide)
      .def("has_guide", &Sampler::has_guide)
      .def("guide_path", &Sampler::guide_path)
      .def("run_program", &Sampler::run_program)
      .def("sample_seeds", &Sampler::sample_seeds)
      .def("denoise", &Sampler::denoise)
      .def("label_dim", &Sampler::label_dim)
      .def("sample_shape", &Sampler::sample_shape)
      .def("device", &Sampler::device)
      .def("kind", &Sampler::kind)
      .def("path", &Sampler::path);
}
