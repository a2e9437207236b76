// EDM Algorithm 2 over an exported denoiser. See sampler_loop.h; line numbers cite Alg. 2 of
// Karras et al. (2022).
#include "sampler_loop.h"

#include <c10/core/DeviceGuard.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>

#include "seed_noise.h"

namespace edm_fast {
namespace {

std::vector<int64_t> with_batch(int64_t lead, c10::IntArrayRef shape) {
  std::vector<int64_t> out{lead};
  out.insert(out.end(), shape.begin(), shape.end());
  return out;
}

std::string churn_step_list(const Plan& plan) {
  std::ostringstream ss;
  ss << "[";
  bool first = true;
  for (size_t i = 0; i < plan.gammas.size(); ++i) {
    if (plan.gammas[i] > 0) {
      ss << (first ? "" : ", ") << i;
      first = false;
    }
  }
  ss << "]";
  return ss.str();
}

bool same_device(const c10::Device& want, const c10::Device& got) {
  return want.type() == got.type() && (!want.has_index() || want.index() == got.index());
}

void check_latents(const DenoiserRunner& denoiser, const at::Tensor& latents) {
  const ModelInfo& info = denoiser.info();
  TORCH_CHECK(latents.defined() && latents.dim() >= 2 && latents.size(0) >= 1,
              "latents must be a tensor (N, *sample_shape) with N >= 1, got ",
              latents.defined() ? c10::str(latents.sizes()) : std::string("an undefined tensor"));
  TORCH_CHECK(at::isFloatingType(latents.scalar_type()),
              "latents must be floating point (float32 or float64), got ", latents.dtype());
  TORCH_CHECK(same_device(denoiser.device(), latents.device()),
              "latents are on ", latents.device(), " but the model '", info.path,
              "' was loaded for ", denoiser.device(), "; move the latents with .to('",
              denoiser.device(), "') or load the model for ", latents.device());
  TORCH_CHECK(!info.dtype || latents.scalar_type() == *info.dtype,
              "latents are ", c10::toString(latents.scalar_type()), " but the model '", info.path,
              "' was exported for ", info.dtype ? c10::toString(*info.dtype) : "",
              "; convert the latents or re-export the model with that dtype");
  TORCH_CHECK(info.sample_shape.empty() || latents.sizes().slice(1) == info.sample_shape,
              "shape mismatch: latents ", latents.sizes(), " have sample shape ",
              latents.sizes().slice(1), " but the model '", info.path,
              "' was exported for sample shape ", c10::IntArrayRef(info.sample_shape),
              "; re-export it with that example shape or fix the latents");
}

// The churn draws eps_k, (K, N, *shape), in the loop's dtype and device (one copy, before the
// loop), or an undefined tensor when no step injects noise.
at::Tensor prepare_churn(const Plan& plan, const at::Tensor& latents,
                         const std::optional<at::Tensor>& churn_noise) {
  const int64_t K = plan.num_churn_steps();
  const auto expected = with_batch(K, latents.sizes());
  if (!churn_noise || !churn_noise->defined()) {
    TORCH_CHECK(K == 0, "the plan injects noise on K = ", K, " steps (gamma_i > 0 at steps ",
                churn_step_list(plan), ") but no churn_noise was given; pass churn_noise of "
                "shape (K, N, *sample_shape) = ", c10::IntArrayRef(expected),
                ", e.g. SeedNoise(seeds, shape).draw_many(K) after the latent draw");
    return at::Tensor();
  }
  const at::Tensor& eps = *churn_noise;
  TORCH_CHECK(eps.dim() == latents.dim() + 1,
              "churn_noise must be (K, N, *sample_shape) = ", c10::IntArrayRef(expected),
              " for latents ", latents.sizes(), ", got shape ", eps.sizes());
  TORCH_CHECK(eps.size(0) == K, "wrong K: churn_noise has ", eps.size(0), " draws but the plan "
              "has K = ", K, " steps with gamma_i > 0 (steps ", churn_step_list(plan),
              "); the k-th draw is used at the k-th such step. Check S_churn, S_min, S_max");
  TORCH_CHECK(eps.sizes().slice(1) == latents.sizes(),
              "shape mismatch between latents ", latents.sizes(), " and churn_noise ",
              eps.sizes(), ": expected churn_noise of shape ", c10::IntArrayRef(expected));
  TORCH_CHECK(at::isFloatingType(eps.scalar_type()), "churn_noise must be floating point, got ",
              eps.dtype());
  if (K == 0) {
    return at::Tensor();
  }
  return eps.to(latents.options()).contiguous();
}

// Labels as the model takes them: (N, L), or (2N, L) = [labels; zeros] under guidance.
at::Tensor prepare_labels(const DenoiserRunner& denoiser, const Plan& plan,
                          const at::Tensor& latents,
                          const std::optional<at::Tensor>& class_labels) {
  const ModelInfo& info = denoiser.info();
  const int64_t N = latents.size(0), L = info.label_dim;
  at::Tensor labels;
  if (class_labels && class_labels->defined()) {
    TORCH_CHECK(L != 0, "the model '", info.path, "' is unconditional (label_dim = 0); do not "
                "pass class_labels");
    const at::Tensor& given = *class_labels;
    TORCH_CHECK(given.dim() == 2 && given.size(0) == N && (L < 0 || given.size(1) == L),
                "class_labels must be one-hot floats of shape (N, label_dim) = (", N, ", ",
                L < 0 ? std::string("label_dim") : std::to_string(L), ") matching the latents' "
                "batch N = ", N, ", got shape ", given.sizes());
    labels = given.to(latents.options()).contiguous();
  } else if (L > 0) {
    labels = at::zeros({N, L}, latents.options());  // conditional model, no class: zeros
  }
  if (plan.guidance) {
    TORCH_CHECK(labels.defined(), "classifier-free guidance needs a class-conditional model, but "
                "the model '", info.path, "' has label_dim = ", L,
                L < 0 ? " (unknown: pass class_labels)" : "", "; drop the guidance weight");
    labels = at::cat({labels, at::zeros_like(labels)});  // conditional half, unconditional half
  }
  return labels;
}

// (len, B): row i is the (B,) vector filled with values[i], in the loop's dtype and device.
at::Tensor sigma_table(const std::vector<double>& values, int64_t batch,
                       const at::TensorOptions& options) {
  const auto len = static_cast<int64_t>(values.size());
  at::Tensor column = at::tensor(values, at::TensorOptions().dtype(at::kDouble));
  return column.to(options.dtype()).unsqueeze(1).expand({len, batch}).contiguous().to(
      options.device());
}

}  // namespace

void churn_out(at::Tensor& x_hat, const at::Tensor& x, const at::Tensor& eps, double churn_std) {
  at::add_out(x_hat, x, eps, churn_std);  // Alg. 2 l.6: x + sqrt(t_hat^2 - t^2) S_noise eps
}

void euler_step_out(at::Tensor& x_next, at::Tensor& d_cur, const at::Tensor& x_hat,
                    const at::Tensor& denoised, double t_hat, double t_next) {
  at::sub_out(d_cur, x_hat, denoised).div_(t_hat);  // l.7: d_cur = (x_hat - D) / t_hat
  at::add_out(x_next, x_hat, d_cur, t_next - t_hat);  // l.8: x_hat + (t_next - t_hat) d_cur
}

void heun_correct_out(at::Tensor& x_next, at::Tensor& d_cur, at::Tensor& d_prime,
                      const at::Tensor& x_hat, const at::Tensor& denoised_next, double t_hat,
                      double t_next) {
  at::sub_out(d_prime, x_next, denoised_next).div_(t_next);  // l.10: (x_next - D') / t_next
  d_cur.mul_(0.5).add_(d_prime, 0.5);                        // d_cur / 2 + d_prime / 2
  at::add_out(x_next, x_hat, d_cur, t_next - t_hat);         // l.11
}

at::Tensor sample_loop(DenoiserRunner& denoiser, const Plan& plan, const at::Tensor& latents,
                       const std::optional<at::Tensor>& churn_noise,
                       const std::optional<at::Tensor>& class_labels) {
  plan.validate();
  check_latents(denoiser, latents);
  c10::DeviceGuard device_guard(latents.device());
  c10::NoGradGuard no_grad;

  const int64_t N = latents.size(0), num_steps = plan.num_steps();
  const bool guided = plan.guidance.has_value();
  const int64_t B = guided ? 2 * N : N;  // batch the network sees
  const ModelInfo& info = denoiser.info();
  TORCH_CHECK(info.static_batch < 0 || info.static_batch == B,
              "the model '", info.path, "' was exported with a static batch of ",
              info.static_batch, " (dynamic_batch=False) but this run needs batch ", B,
              guided ? " (2N for guidance)" : "", "; re-export with a dynamic batch "
              "(edm-fast export without --batch; dynamic_batch=True in Python)");
  const auto opts = latents.options();
  const at::Tensor eps = prepare_churn(plan, latents, churn_noise);  // (K, N, ...)
  const at::Tensor labels = prepare_labels(denoiser, plan, latents, class_labels);

  // Everything the loop needs is allocated here, before the first step.
  std::vector<double> t_next_values(plan.sigmas.begin() + 1, plan.sigmas.end());
  const at::Tensor hat_vecs = sigma_table(plan.t_hats, B, opts);       // row i: t_hat_i
  const at::Tensor next_vecs = sigma_table(t_next_values, B, opts);    // row i: t_{i+1}
  at::Tensor x_cur = latents.contiguous() * plan.sigmas[0];  // l.1: x_0 = t_0 * n, n ~ N(0, I)
  at::Tensor x_next = at::empty_like(x_cur);
  at::Tensor x_hat_buf = eps.defined() ? at::empty_like(x_cur) : at::Tensor();
  at::Tensor d_cur = at::empty_like(x_cur);
  at::Tensor d_prime = plan.heun ? at::empty_like(x_cur) : at::Tensor();
  at::Tensor x_both = guided ? at::empty(with_batch(B, x_cur.sizes().slice(1)), opts)
                             : at::Tensor();  // [x; x] for the 2N-batch
  at::Tensor guided_out = guided ? at::empty_like(x_cur) : at::Tensor();

  // D(x; sigma) in the loop's dtype; under guidance D_u + w (D_c - D_u) from one 2N batch.
  auto denoise = [&](const at::Tensor& x, const at::Tensor& sigma_vec) -> at::Tensor {
    if (!guided) {
      return denoiser(x, sigma_vec, labels).to(x.scalar_type());
    }
    x_both.narrow(0, 0, N).copy_(x);
    x_both.narrow(0, N, N).copy_(x);
    const at::Tensor both = denoiser(x_both, sigma_vec, labels).to(x.scalar_type());
    const at::Tensor cond = both.narrow(0, 0, N), uncond = both.narrow(0, N, N);
    return at::sub_out(guided_out, cond, uncond).mul_(*plan.guidance).add_(uncond);
  };

  int64_t k = 0;                            // index of the next churn draw
  for (int64_t i = 0; i < num_steps; ++i) {  // 0, ..., N-1 (l.2)
    const double t_next = plan.sigmas[i + 1], t_hat = plan.t_hats[i];
    at::Tensor x_hat = x_cur;
    if (plan.gammas[i] > 0) {  // l.3-6: churn with the k-th draw; no draw when gamma_i = 0
      churn_out(x_hat_buf, x_cur, eps.select(0, k++), plan.churn_std(i));
      x_hat = x_hat_buf;
    }
    const at::Tensor denoised = denoise(x_hat, hat_vecs.select(0, i));  // l.7: D(x_hat; t_hat)
    euler_step_out(x_next, d_cur, x_hat, denoised, t_hat, t_next);       // l.7-8
    if (plan.heun && t_next > 0) {                                      // l.9
      const at::Tensor denoised_next = denoise(x_next, next_vecs.select(0, i));  // l.10
      heun_correct_out(x_next, d_cur, d_prime, x_hat, denoised_next, t_hat, t_next);  // l.10-11
    }
    std::swap(x_cur, x_next);  // x_{i+1}
  }
  // The one host sync: NaN/Inf from the denoiser propagates into x.
  TORCH_CHECK(at::isfinite(x_cur).all().item<bool>(),
              "the sampled images contain NaN/Inf: the denoiser '", info.path,
              "' returned non-finite values; check the model and its inputs");
  return x_cur;
}

at::Tensor sample_from_seeds(DenoiserRunner& denoiser, const Plan& plan,
                             const std::vector<uint64_t>& seeds,
                             const std::vector<int64_t>& sample_shape,
                             const at::TensorOptions& options,
                             const std::optional<at::Tensor>& class_labels) {
  SeedNoise noise(seeds, sample_shape);
  const at::Tensor latents = noise.draw().to(options);                       // (N, *shape)
  const at::Tensor eps = noise.draw_many(plan.num_churn_steps()).to(options);  // (K, N, *shape)
  return sample_loop(denoiser, plan, latents, eps, class_labels);
}

Sampler::Sampler(const std::string& model_path, const std::string& kind,
                 const std::string& device)
    : runner_(load_denoiser(model_path, kind, c10::Device(device))) {}

at::Tensor Sampler::sample(const at::Tensor& latents, std::vector<double> sigmas,
                           std::vector<double> t_hats, std::vector<double> gammas,
                           double S_noise, const std::string& solver,
                           const std::optional<at::Tensor>& churn_noise,
                           const std::optional<at::Tensor>& class_labels,
                           std::optional<double> guidance) {
  Plan plan;
  plan.sigmas = std::move(sigmas);
  plan.t_hats = std::move(t_hats);
  plan.gammas = std::move(gammas);
  plan.S_noise = S_noise;
  plan.heun = parse_solver(solver);
  plan.guidance = guidance;
  std::lock_guard<std::mutex> lock(mutex_);
  return sample_loop(*runner_, plan, latents, churn_noise, class_labels);
}

at::Tensor Sampler::sample_seeds(const std::vector<int64_t>& seeds, int64_t num_steps,
                                 double sigma_min, double sigma_max, double rho, double S_churn,
                                 double S_min, double S_max, double S_noise,
                                 const std::string& solver,
                                 const std::optional<at::Tensor>& class_labels,
                                 std::optional<double> guidance) {
  const ModelInfo& info = runner_->info();
  TORCH_CHECK(!info.sample_shape.empty(), "sample_seeds: the model '", info.path, "' has no "
              "edm_fast metadata (sample shape unknown); export it with edm_fast.export");
  TORCH_CHECK(info.precond.empty() || info.precond == "edm" || info.precond == "vp" ||
                  info.precond == "ve",
              "sample_seeds: the '", info.precond, "' preconditioning rounds sigma to discrete "
              "levels, which the C++ schedule does not do; build a SamplingPlan in Python");
  // with no labels they are all zero, and the guided mix of two unconditional outputs is the
  // unconditional output: the weight would silently do nothing (the binary needs --class too)
  TORCH_CHECK(!guidance || class_labels.has_value(), "sample_seeds: guidance needs "
              "class_labels (without them every label is zero and guidance changes nothing)");
  std::vector<uint64_t> useeds;
  for (int64_t s : seeds) {
    TORCH_CHECK(s >= 0, "seeds must be non-negative, got ", s);
    useeds.push_back(static_cast<uint64_t>(s));
  }
  const Plan plan = make_edm_plan(num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max,
                                  S_noise, solver, guidance);
  const auto options = at::TensorOptions()
                           .dtype(info.dtype.value_or(at::kFloat))
                           .device(runner_->device());
  std::lock_guard<std::mutex> lock(mutex_);
  return sample_from_seeds(*runner_, plan, useeds, info.sample_shape, options, class_labels);
}

at::Tensor Sampler::denoise(const at::Tensor& x, const at::Tensor& sigma,
                            const std::optional<at::Tensor>& class_labels) {
  std::lock_guard<std::mutex> lock(mutex_);
  c10::DeviceGuard device_guard(x.device());
  c10::NoGradGuard no_grad;
  return (*runner_)(x.contiguous(), sigma.contiguous(),
                    class_labels ? class_labels->contiguous() : at::Tensor());
}

}  // namespace edm_fast
