// EDM time steps (Eq. 5) and churn (Alg. 2 l.4-5). See schedule.h.
#include "schedule.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace edm_fast {

std::vector<double> edm_sigmas(int64_t num_steps, double sigma_min, double sigma_max,
                               double rho) {
  TORCH_CHECK(num_steps >= 1, "edm_sigmas: num_steps must be >= 1, got ", num_steps);
  TORCH_CHECK(sigma_min > 0 && sigma_min < sigma_max && std::isfinite(sigma_max),
              "edm_sigmas: need 0 < sigma_min < sigma_max < inf, got sigma_min=", sigma_min,
              ", sigma_max=", sigma_max);
  TORCH_CHECK(rho > 0 && std::isfinite(rho),
              "edm_sigmas: rho must be a positive finite number (EDM: 7), got ", rho);
  // Evaluated with the same ATen float64 ops, in the same order, as schedules.edm_sigmas, so the
  // two agree bit for bit (a scalar std::pow loop could differ from ATen's pow in the last ulp).
  const double a = std::pow(sigma_max, 1.0 / rho);
  const double b = std::pow(sigma_min, 1.0 / rho);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor frac = at::arange(num_steps, opts) / static_cast<double>(std::max<int64_t>(
                                                      num_steps - 1, 1));  // i / (N - 1)
  at::Tensor t = at::pow(frac * (b - a) + a, rho).contiguous();           // Eq. 5
  std::vector<double> out(t.data_ptr<double>(), t.data_ptr<double>() + num_steps);
  for (int64_t i = 0; i < num_steps; ++i) {  // an extreme rho overflows or collapses the grid
    TORCH_CHECK(std::isfinite(out[i]) && (i == 0 || out[i] < out[i - 1]), "edm_sigmas: rho=",
                rho, " gives ", num_steps, " sigmas that are not finite and strictly decreasing "
                "in float64 (EDM: rho = 7)");
  }
  out.push_back(0.0);  // t_N = 0
  return out;
}

std::vector<double> churn_gammas(const std::vector<double>& sigmas, double S_churn, double S_min,
                                 double S_max) {
  TORCH_CHECK(sigmas.size() >= 2, "churn_gammas: need at least 2 sigmas, got ", sigmas.size());
  TORCH_CHECK(S_churn >= 0 && std::isfinite(S_churn),
              "churn_gammas: S_churn must be a finite number >= 0, got ", S_churn);
  // NaN would fail both comparisons below and silently turn churn off (as in Python's
  // check_churn_options); S_max may be +inf (churn up to the top of the grid)
  TORCH_CHECK(!std::isnan(S_min) && !std::isnan(S_max),
              "churn_gammas: S_min and S_max must be numbers, got ", S_min, " and ", S_max);
  for (size_t i = 0; i < sigmas.size(); ++i) {
    TORCH_CHECK(std::isfinite(sigmas[i]), "churn_gammas: sigma_", i, " is not finite");
  }
  const auto num_steps = static_cast<double>(sigmas.size() - 1);
  const double gamma = std::min(S_churn / num_steps, std::sqrt(2.0) - 1.0);  // Alg. 2 l.4
  std::vector<double> gammas;
  gammas.reserve(sigmas.size() - 1);
  for (size_t i = 0; i + 1 < sigmas.size(); ++i) {
    const double t = sigmas[i];
    gammas.push_back(S_min <= t && t <= S_max ? gamma : 0.0);
  }
  return gammas;
}

int64_t Plan::num_churn_steps() const {
  return std::count_if(gammas.begin(), gammas.end(), [](double g) { return g > 0; });
}

int64_t Plan::num_evals() const {
  int64_t second = 0;
  if (heun) {
    second = std::count_if(sigmas.begin() + 1, sigmas.end(), [](double t) { return t > 0; });
  }
  return num_steps() + second;
}

double Plan::churn_std(int64_t i) const {
  const double t = sigmas[i], t_hat = t_hats[i];
  return std::sqrt(std::max(t_hat * t_hat - t * t, 0.0)) * S_noise;  // Alg. 2 l.6
}

void Plan::validate() const {
  const int64_t n = num_steps();
  TORCH_CHECK(n >= 1, "edm_fast sampler: need at least 2 sigmas (t_0 .. t_N), got ",
              sigmas.size());
  TORCH_CHECK(static_cast<int64_t>(t_hats.size()) == n && static_cast<int64_t>(gammas.size()) == n,
              "edm_fast sampler: t_hats and gammas need one entry per step (", n, "), got ",
              t_hats.size(), " and ", gammas.size());
  for (int64_t i = 0; i <= n; ++i) {
    TORCH_CHECK(std::isfinite(sigmas[i]), "edm_fast sampler: sigma_", i, " is not finite");
    TORCH_CHECK(sigmas[i] > 0 || (i == n && sigmas[i] == 0),
                "edm_fast sampler: sigmas must be positive (only the last may be 0), got sigma_",
                i, " = ", sigmas[i]);
    if (i > 0) {
      // A level may repeat (a zero-length step): a discrete-time net's round_sigma can map
      // neighbouring sigmas of the grid to one trained level, as in NVlabs' sampler.
      TORCH_CHECK(sigmas[i] <= sigmas[i - 1],
                  "edm_fast sampler: sigmas must not increase, but sigma_", i, " = ",
                  sigmas[i], " > sigma_", i - 1, " = ", sigmas[i - 1],
                  "; build them with edm_sigmas / SamplingPlan.build");
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(gammas[i] >= 0 && std::isfinite(gammas[i]),
                "edm_fast sampler: gamma_", i, " must be finite and >= 0, got ", gammas[i]);
    TORCH_CHECK(std::isfinite(t_hats[i]) && t_hats[i] >= sigmas[i],  // Alg. 2 l.5: t + gamma t
                "edm_fast sampler: t_hat_", i, " = ", t_hats[i], " must be finite and >= sigma_",
                i, " = ", sigmas[i]);
  }
  TORCH_CHECK(std::isfinite(S_noise) && S_noise >= 0,
              "edm_fast sampler: S_noise must be finite and >= 0, got ", S_noise);
  TORCH_CHECK(!guidance || std::isfinite(*guidance),
              "edm_fast sampler: the guidance weight must be finite");
}

bool parse_solver(const std::string& solver) {
  TORCH_CHECK(solver == "heun" || solver == "euler",
              "edm_fast sampler: solver must be 'heun' or 'euler', got '", solver, "'");
  return solver == "heun";
}

Plan make_edm_plan(int64_t num_steps, double sigma_min, double sigma_max, double rho,
                   double S_churn, double S_min, double S_max, double S_noise,
                   const std::string& solver, std::optional<double> guidance) {
  Plan plan;
  plan.heun = parse_solver(solver);
  plan.sigmas = edm_sigmas(num_steps, sigma_min, sigma_max, rho);
  plan.gammas = churn_gammas(plan.sigmas, S_churn, S_min, S_max);
  for (int64_t i = 0; i < num_steps; ++i) {
    plan.t_hats.push_back(plan.sigmas[i] + plan.gammas[i] * plan.sigmas[i]);  // Alg. 2 l.5
  }
  plan.S_noise = S_noise;
  plan.guidance = guidance;
  plan.validate();
  return plan;
}

}  // namespace edm_fast
