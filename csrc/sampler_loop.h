// EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) as one C++ loop over an exported
// denoiser, plus its three step updates as standalone functions (registered as ops for tests).
//
// Notation: t_i (sigmas), gamma_i, t_hat_i, x_hat, d_cur, d_prime as in Alg. 2; N = batch.
// The loop equals edm_fast.samplers.sample_edm for the same latents and churn noise.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "denoiser_runner.h"
#include "schedule.h"

namespace edm_fast {

// The three step updates of Alg. 2, written into preallocated outputs (no allocation). The loop
// runs exactly these; the ops edm_fast::churn / euler_step / heun_correct wrap them for tests.
// All tensors have the same shape, dtype and device; outputs must not alias the inputs unless
// stated.

// x_hat = x + churn_std eps, churn_std = sqrt(t_hat^2 - t^2) S_noise (Alg. 2 l.6).
void churn_out(at::Tensor& x_hat, const at::Tensor& x, const at::Tensor& eps, double churn_std);

// d_cur = (x_hat - D) / t_hat (l.7); x_next = x_hat + (t_next - t_hat) d_cur (l.8).
void euler_step_out(at::Tensor& x_next, at::Tensor& d_cur, const at::Tensor& x_hat,
                    const at::Tensor& denoised, double t_hat, double t_next);

// d_prime = (x_next - D') / t_next (l.10); x_next = x_hat + (t_next - t_hat) (d_cur/2 +
// d_prime/2) (l.11). x_next holds the Euler result on entry and the corrected one on exit;
// d_cur and d_prime are overwritten (scratch).
void heun_correct_out(at::Tensor& x_next, at::Tensor& d_cur, at::Tensor& d_prime,
                      const at::Tensor& x_hat, const at::Tensor& denoised_next, double t_hat,
                      double t_next);

// Algorithm 2 over `denoiser`.
//   latents:      (N, *shape) unit-variance noise, float32/float64, on the model's device;
//                 the loop runs in latents' dtype and starts from x_0 = latents * t_0 (l.1).
//   churn_noise:  (K, N, *shape) with K = plan.num_churn_steps(); slice k is the eps of the
//                 k-th step with gamma_i > 0. May be omitted (or have K = 0) when K = 0.
//   class_labels: (N, label_dim) floats (one-hot); omitted for a conditional model = zeros.
// With plan.guidance = w the denoiser runs on one batch of 2N (labels, then zero labels) and
// D = D_u + w (D_c - D_u). No host-device synchronisation inside the loop; one at the end to
// check that the result is finite.
at::Tensor sample_loop(DenoiserRunner& denoiser, const Plan& plan, const at::Tensor& latents,
                       const std::optional<at::Tensor>& churn_noise,
                       const std::optional<at::Tensor>& class_labels);

// Everything in C++: per-seed latents and churn draws exactly like edm_fast.noise.SeedNoise
// (latent first, then one draw per churn step), moved to `options`' device and dtype, then
// sample_loop. sample_shape is the shape of one sample.
at::Tensor sample_from_seeds(DenoiserRunner& denoiser, const Plan& plan,
                             const std::vector<uint64_t>& seeds,
                             const std::vector<int64_t>& sample_shape,
                             const at::TensorOptions& options,
                             const std::optional<at::Tensor>& class_labels);

// A loaded model plus the loop, registered for Python as torch.classes.edm_fast.Sampler.
// Thread-safety: every call takes a per-instance mutex, so one Sampler may be shared between
// threads (calls are serialised); use one Sampler per thread to run concurrently.
class Sampler : public torch::CustomClassHolder {
 public:
  Sampler(const std::string& model_path, const std::string& kind, const std::string& device);

  // Alg. 2 with host scalars from a SamplingPlan (sigmas t_0..t_N, t_hats, gammas).
  at::Tensor sample(const at::Tensor& latents, std::vector<double> sigmas,
                    std::vector<double> t_hats, std::vector<double> gammas, double S_noise,
                    const std::string& solver, const std::optional<at::Tensor>& churn_noise,
                    const std::optional<at::Tensor>& class_labels,
                    std::optional<double> guidance);

  // Schedule (Eq. 5), churn (Alg. 2 l.4-5), seed noise and loop, all in C++ (what the
  // standalone edm_fast_sample binary runs). Returns (N, *sample_shape) in the model's dtype.
  at::Tensor sample_seeds(const std::vector<int64_t>& seeds, int64_t num_steps,
                          double sigma_min, double sigma_max, double rho, double S_churn,
                          double S_min, double S_max, double S_noise, const std::string& solver,
                          const std::optional<at::Tensor>& class_labels,
                          std::optional<double> guidance);

  // One evaluation D(x; sigma, labels) of the loaded model (no checks beyond the model's own).
  at::Tensor denoise(const at::Tensor& x, const at::Tensor& sigma,
                     const std::optional<at::Tensor>& class_labels);

  int64_t label_dim() const { return runner_->info().label_dim; }
  std::vector<int64_t> sample_shape() const { return runner_->info().sample_shape; }
  std::string device() const { return runner_->device().str(); }
  std::string kind() const { return runner_->info().kind; }
  std::string path() const { return runner_->info().path; }
  DenoiserRunner& runner() { return *runner_; }

 private:
  std::unique_ptr<DenoiserRunner> runner_;
  std::mutex mutex_;
};

}  // namespace edm_fast
