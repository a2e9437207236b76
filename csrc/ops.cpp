// The Python/TorchScript boundary of edm_fast's C++ code: one TORCH_LIBRARY(edm_fast, m) with
// schema strings, the input checks of the ops, and the Sampler class. Python reaches these as
// torch.ops.edm_fast.<op> and torch.classes.edm_fast.Sampler (wrapped by edm_fast/ops.py).
//
// The ops are registered as CompositeImplicitAutograd kernels (built from ATen ops), so they
// run on every device ATen supports and trace under fake tensors without a separate meta
// implementation.
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "sampler_loop.h"
#include "schedule.h"
#include "seed_noise.h"

#define CHECK_FLOATING(x) \
  TORCH_CHECK(at::isFloatingType((x).scalar_type()), #x " must be a floating-point tensor, got ", \
              (x).dtype())
#define CHECK_SAME_SHAPE(x, y)                                                              \
  TORCH_CHECK((x).sizes() == (y).sizes(), #x " and " #y " must have the same shape, got ", \
              (x).sizes(), " and ", (y).sizes())
#define CHECK_SAME_DEVICE(x, y)                                                            \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on the same device, got ", \
              (x).device(), " and ", (y).device(), "; move one with .to(...)")
#define CHECK_SAME_DTYPE(x, y)                                                           \
  TORCH_CHECK((x).scalar_type() == (y).scalar_type(), #x " and " #y                      \
              " must have the same dtype, got ", (x).dtype(), " and ", (y).dtype())
#define CHECK_LIKE(x, y) \
  CHECK_FLOATING(x);     \
  CHECK_SAME_SHAPE(x, y); \
  CHECK_SAME_DEVICE(x, y); \
  CHECK_SAME_DTYPE(x, y)

namespace edm_fast {
namespace {

at::Tensor edm_sigmas_op(int64_t num_steps, double sigma_min, double sigma_max, double rho) {
  return at::tensor(edm_sigmas(num_steps, sigma_min, sigma_max, rho),
                    at::TensorOptions().dtype(at::kDouble));
}

at::Tensor churn_gammas_op(c10::ArrayRef<double> sigmas, double S_churn, double S_min,
                           double S_max) {
  return at::tensor(churn_gammas(sigmas.vec(), S_churn, S_min, S_max),
                    at::TensorOptions().dtype(at::kDouble));
}

at::Tensor seed_noise_op(c10::IntArrayRef seeds, c10::IntArrayRef shape, int64_t draws) {
  std::vector<uint64_t> useeds;
  for (int64_t s : seeds) {
    TORCH_CHECK(s >= 0, "seed_noise: seeds must be non-negative, got ", s);
    useeds.push_back(static_cast<uint64_t>(s));
  }
  TORCH_CHECK(draws >= 0, "seed_noise: draws must be >= 0, got ", draws);
  return SeedNoise(useeds, shape.vec()).draw_many(draws);
}

// The scalar arguments of the step ops: finite, and the noise levels in their range (NaN fails
// every comparison, so each check is written to pass only for good values).
void check_finite(const char* op, const char* name, double value) {
  TORCH_CHECK(std::isfinite(value), op, ": ", name, " must be finite, got ", value);
}

at::Tensor churn_op(const at::Tensor& x, const at::Tensor& eps, double t_cur, double t_hat,
                    double S_noise) {
  CHECK_LIKE(eps, x);
  check_finite("churn", "t_cur", t_cur);
  check_finite("churn", "t_hat", t_hat);
  check_finite("churn", "S_noise", S_noise);
  TORCH_CHECK(t_hat >= t_cur && t_cur >= 0, "churn: need t_hat >= t_cur >= 0, got t_cur=", t_cur,
              ", t_hat=", t_hat);
  TORCH_CHECK(S_noise >= 0, "churn: S_noise must be >= 0, got ", S_noise);
  at::Tensor x_hat = at::empty_like(x);
  churn_out(x_hat, x, eps, std::sqrt(std::max(t_hat * t_hat - t_cur * t_cur, 0.0)) * S_noise);
  return x_hat;
}

std::tuple<at::Tensor, at::Tensor> euler_step_op(const at::Tensor& x_hat,
                                                 const at::Tensor& denoised, double t_hat,
                                                 double t_next) {
  CHECK_LIKE(denoised, x_hat);
  check_finite("euler_step", "t_hat", t_hat);
  check_finite("euler_step", "t_next", t_next);
  TORCH_CHECK(t_hat > 0 && t_next >= 0, "euler_step: need t_hat > 0 and t_next >= 0, got "
              "t_hat=", t_hat, ", t_next=", t_next);
  at::Tensor x_next = at::empty_like(x_hat), d_cur = at::empty_like(x_hat);
  euler_step_out(x_next, d_cur, x_hat, denoised, t_hat, t_next);
  return {x_next, d_cur};
}

// Arguments in the order of the Triton kernel edm_fast.kernels.heun_correct (all four tensors
// share one shape, so a different order would pass every check and compute garbage).
at::Tensor heun_correct_op(const at::Tensor& x_hat, const at::Tensor& d_cur,
                           const at::Tensor& x_next, const at::Tensor& denoised_next,
                           double t_hat, double t_next) {
  CHECK_LIKE(d_cur, x_hat);
  CHECK_LIKE(x_next, x_hat);
  CHECK_LIKE(denoised_next, x_hat);
  check_finite("heun_correct", "t_hat", t_hat);
  check_finite("heun_correct", "t_next", t_next);
  TORCH_CHECK(t_hat > 0, "heun_correct: need t_hat > 0, got ", t_hat);
  TORCH_CHECK(t_next > 0, "heun_correct: the correction needs t_next > 0 (Alg. 2 l.9), got ",
              t_next);
  at::Tensor out = x_next.clone(), scratch = d_cur.clone(), d_prime = at::empty_like(x_hat);
  heun_correct_out(out, scratch, d_prime, x_hat, denoised_next, t_hat, t_next);
  return out;
}

}  // namespace
}  // namespace edm_fast

TORCH_LIBRARY(edm_fast, m) {
  using edm_fast::Sampler;
  m.def("edm_sigmas(int num_steps, float sigma_min, float sigma_max, float rho) -> Tensor",
        TORCH_FN(edm_fast::edm_sigmas_op));
  m.def("churn_gammas(float[] sigmas, float S_churn, float S_min, float S_max) -> Tensor",
        TORCH_FN(edm_fast::churn_gammas_op));
  m.def("seed_noise(int[] seeds, int[] shape, int draws) -> Tensor",
        TORCH_FN(edm_fast::seed_noise_op));
  m.def("churn(Tensor x, Tensor eps, float t_cur, float t_hat, float S_noise) -> Tensor",
        TORCH_FN(edm_fast::churn_op));
  m.def("euler_step(Tensor x_hat, Tensor denoised, float t_hat, float t_next)"
        " -> (Tensor x_next, Tensor d_cur)",
        TORCH_FN(edm_fast::euler_step_op));
  m.def("heun_correct(Tensor x_hat, Tensor d_cur, Tensor x_next, Tensor denoised_next, "
        "float t_hat, float t_next) -> Tensor",
        TORCH_FN(edm_fast::heun_correct_op));

  m.class_<Sampler>("Sampler")
      .def(torch::init<std::string, std::string, std::string>())
      .def("sample", &Sampler::sample)
      .def("sample_seeds", &Sampler::sample_seeds)
      .def("denoise", &Sampler::denoise)
      .def("label_dim", &Sampler::label_dim)
      .def("sample_shape", &Sampler::sample_shape)
      .def("device", &Sampler::device)
      .def("kind", &Sampler::kind)
      .def("path", &Sampler::path);
}
