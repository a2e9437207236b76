// EDM time-step discretisation (Eq. 5) and the churn amounts of Algorithm 2 (l.4-5), on the host.
//
// Karras et al. (2022), "Elucidating the Design Space of Diffusion-Based Generative Models".
// These mirror edm_fast.schedules.edm_sigmas, edm_fast.samplers.churn_gammas and
// edm_fast.backends.plan.SamplingPlan in float64; tests check them against the Python side.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace edm_fast {

// sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, i = 0..N-1, then
// sigma_N = 0 (Eq. 5). Returns num_steps + 1 values.
std::vector<double> edm_sigmas(int64_t num_steps, double sigma_min, double sigma_max, double rho);

// gamma_i = min(S_churn / N, sqrt(2) - 1) if S_min <= t_i <= S_max else 0, i = 0..N-1
// (Alg. 2 l.4); N = sigmas.size() - 1.
std::vector<double> churn_gammas(const std::vector<double>& sigmas, double S_churn, double S_min,
                                 double S_max);

// Every per-step host scalar of one Alg. 2 run (the C++ twin of SamplingPlan).
struct Plan {
  std::vector<double> sigmas;  // t_0 .. t_N (t_N = 0 unless the grid stops early)
  std::vector<double> t_hats;  // t_hat_i = t_i + gamma_i t_i, i = 0..N-1 (Alg. 2 l.5)
  std::vector<double> gammas;  // gamma_i, i = 0..N-1
  double S_noise = 1.0;
  bool heun = true;               // false: Euler (skip Alg. 2 l.9-11)
  std::optional<double> guidance; // classifier-free guidance weight w, or none

  int64_t num_steps() const { return static_cast<int64_t>(sigmas.size()) - 1; }
  // Number of steps that inject noise (gamma_i > 0): the K of the churn noise (K, N, ...).
  int64_t num_churn_steps() const;
  // Number of denoiser evaluations (NFE).
  int64_t num_evals() const;
  // sqrt(t_hat_i^2 - t_i^2) S_noise (Alg. 2 l.6).
  double churn_std(int64_t i) const;
  // Throws c10::Error with a message naming the offending entry when the plan is inconsistent.
  void validate() const;
};

// The plan of EDM's sampler for a continuous-sigma denoiser (no round_sigma): Eq. 5 grid,
// Alg. 2 gammas and t_hats. solver is "heun" or "euler".
Plan make_edm_plan(int64_t num_steps, double sigma_min, double sigma_max, double rho,
                   double S_churn, double S_min, double S_max, double S_noise,
                   const std::string& solver, std::optional<double> guidance);

// "heun" -> true, "euler" -> false; anything else throws.
bool parse_solver(const std::string& solver);

}  // namespace edm_fast
