// The generic program executor. See program_executor.h.
#include "program_executor.h"

#include <c10/core/DeviceGuard.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "seed_noise.h"

namespace edm_fast {
namespace {

std::vector<int64_t> with_batch(int64_t lead, c10::IntArrayRef shape) {
  std::vector<int64_t> out{lead};
  out.insert(out.end(), shape.begin(), shape.end());
  return out;
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

// The noise draws, (K, N, *shape), in the run's dtype and device (one copy, before the first
// op), or an undefined tensor when the program reads none.
at::Tensor prepare_noise(const ProgramArrays& program, const at::Tensor& latents,
                         const std::optional<at::Tensor>& noise) {
  const int64_t K = program.num_noise;
  const auto expected = with_batch(K, latents.sizes());
  if (!noise || !noise->defined()) {
    TORCH_CHECK(K == 0, "the program reads K = ", K, " noise draws but no noise was given; "
                "pass noise of shape (K, N, *sample_shape) = ", c10::IntArrayRef(expected),
                ", e.g. SeedNoise(seeds, shape).draw_many(K) after the latent draw");
    return at::Tensor();
  }
  const at::Tensor& eps = *noise;
  TORCH_CHECK(eps.dim() == latents.dim() + 1, "noise must be (K, N, *sample_shape) = ",
              c10::IntArrayRef(expected), " for latents ", latents.sizes(), ", got shape ",
              eps.sizes());
  TORCH_CHECK(eps.size(0) == K, "wrong K: noise has ", eps.size(0), " draws but the program "
              "reads K = ", K, " noise draws; build the noise for this plan (plan.num_noise)");
  TORCH_CHECK(eps.sizes().slice(1) == latents.sizes(), "shape mismatch between latents ",
              latents.sizes(), " and noise ", eps.sizes(), ": expected noise of shape ",
              c10::IntArrayRef(expected));
  TORCH_CHECK(at::isFloatingType(eps.scalar_type()), "noise must be floating point, got ",
              eps.dtype());
  return K == 0 ? at::Tensor() : eps.to(latents.options()).contiguous();
}

// Labels as the model takes them: (N, L), or an undefined tensor for an unconditional model.
at::Tensor prepare_labels(const DenoiserRunner& denoiser, const at::Tensor& latents,
                          const std::optional<at::Tensor>& class_labels) {
  const ModelInfo& info = denoiser.info();
  const int64_t N = latents.size(0), L = info.label_dim;
  if (!class_labels || !class_labels->defined()) {
    // conditional model, no class: zeros
    return L > 0 ? at::zeros({N, L}, latents.options()) : at::Tensor();
  }
  TORCH_CHECK(L != 0, "the model '", info.path, "' is unconditional (label_dim = 0); do not "
              "pass class_labels");
  const at::Tensor& given = *class_labels;
  TORCH_CHECK(given.dim() == 2 && given.size(0) == N && (L < 0 || given.size(1) == L),
              "class_labels must be one-hot floats of shape (N, label_dim) = (", N, ", ",
              L < 0 ? std::string("label_dim") : std::to_string(L), ") matching the latents' "
              "batch N = ", N, ", got shape ", given.sizes());
  return given.to(latents.options()).contiguous();
}

// (len, B): row i is the (B,) vector filled with values[i], in the run's dtype and device.
at::Tensor sigma_table(const std::vector<double>& values, int64_t batch,
                       const at::TensorOptions& options) {
  const auto len = static_cast<int64_t>(values.size());
  at::Tensor column = at::tensor(values, at::TensorOptions().dtype(at::kDouble));
  return column.to(options.dtype()).unsqueeze(1).expand({len, batch}).contiguous().to(
      options.device());
}

}  // namespace

void check_guide(const DenoiserRunner& denoiser, const DenoiserRunner& guide) {
  const ModelInfo &main = denoiser.info(), &info = guide.info();  // main model, guide
  TORCH_CHECK(same_device(denoiser.device(), guide.device()), "the guide '", info.path,
              "' was loaded for ", guide.device(), " but the main model '", main.path, "' for ",
              denoiser.device(), "; load both for one device");
  TORCH_CHECK(!main.dtype || !info.dtype || *main.dtype == *info.dtype, "the guide '", info.path,
              "' was exported for ", info.dtype ? c10::toString(*info.dtype) : "", " but the main "
              "model '", main.path, "' for ", main.dtype ? c10::toString(*main.dtype) : "",
              "; export the guide with the main model's dtype");
  TORCH_CHECK(main.sample_shape.empty() || info.sample_shape.empty() ||
                  main.sample_shape == info.sample_shape,
              "the guide '", info.path, "' makes samples of shape ",
              c10::IntArrayRef(info.sample_shape), " but the main model '", main.path, "' ",
              c10::IntArrayRef(main.sample_shape), ": autoguidance needs a guide of the same "
              "task");
  // a conditional guide is given the main model's labels (autoguidance, arXiv 2406.02507)
  TORCH_CHECK(main.label_dim < 0 || info.label_dim < 0 || main.label_dim == info.label_dim,
              "the guide '", info.path, "' takes label_dim = ", info.label_dim, " but the main "
              "model '", main.path, "' takes ", main.label_dim, ": autoguidance needs a guide of "
              "the same task (same classes, or both unconditional)");
}

int64_t ProgramArrays::num_evals() const {
  return std::count(kinds.begin(), kinds.end(), kEval);
}

void ProgramArrays::validate() const {
  const int64_t n = num_ops();
  TORCH_CHECK(static_cast<int64_t>(dsts.size()) == n &&
                  static_cast<int64_t>(sigmas.size()) == n &&
                  static_cast<int64_t>(guided.size()) == n &&
                  static_cast<int64_t>(term_start.size()) == n + 1,
              "program: kinds, dsts, sigmas and guided need one entry per op and term_start one "
              "more, got ", n, ", ", dsts.size(), ", ", sigmas.size(), ", ", guided.size(), " and ",
              term_start.size());
  TORCH_CHECK(term_start[0] == 0 && term_start[n] == static_cast<int64_t>(srcs.size()) &&
                  srcs.size() == coefs.size(),
              "program: term_start must run from 0 to len(srcs) = len(coefs), got ",
              term_start[0], " .. ", term_start[n], " for ", srcs.size(), " srcs and ",
              coefs.size(), " coefs");
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(term_start[i] <= term_start[i + 1], "program: term_start must not decrease (op ",
                i, ")");
  }
  TORCH_CHECK(num_registers >= 1, "program: num_registers must be >= 1, got ", num_registers);
  TORCH_CHECK(num_noise >= 0, "program: num_noise must be >= 0, got ", num_noise);
  std::vector<bool> written(static_cast<size_t>(num_registers), false);
  // op i (or the output, i = -1) reads source s
  auto check_source = [&](int64_t i, int64_t s) {
    const std::string who = i < 0 ? std::string("the output") : "op " + std::to_string(i);
    if (s >= 0) {
      TORCH_CHECK(s < num_registers, "program: ", who, " reads register ", s, " of ",
                  num_registers);
      TORCH_CHECK(written[s], "program: ", who, " reads register ", s, " before it is written");
    } else if (s < kLatents) {
      TORCH_CHECK(-2 - s < num_noise, "program: ", who, " reads noise draw ", -2 - s,
                  " of num_noise = ", num_noise);
    }
  };
  for (int64_t i = 0; i < n; ++i) {
    const int64_t kind = kinds[i], dst = dsts[i], begin = term_start[i], end = term_start[i + 1];
    TORCH_CHECK(kind == kLin || kind == kEval, "program: op ", i, " has kind ", kind,
                " (0 = LIN, 1 = EVAL)");
    TORCH_CHECK(0 <= dst && dst < num_registers, "program: op ", i, " writes register ", dst,
                " of ", num_registers);
    TORCH_CHECK(guided[i] == 0 || guided[i] == 1, "program: op ", i, " has guided = ",
                guided[i], " (0 or 1)");
    for (int64_t j = begin; j < end; ++j) {
      check_source(i, srcs[j]);
      TORCH_CHECK(std::isfinite(coefs[j]), "program: op ", i, " has a non-finite coefficient ",
                  coefs[j]);
    }
    if (kind == kLin) {
      TORCH_CHECK(end > begin, "program: op ", i, " (LIN) has no terms");
    } else {
      TORCH_CHECK(end - begin == 1 && srcs[begin] != dst, "program: op ", i,
                  " (EVAL) must read exactly one source other than its destination");
      TORCH_CHECK(std::isfinite(sigmas[i]) && sigmas[i] > 0, "program: op ", i,
                  " (EVAL) needs a finite sigma > 0, got ", sigmas[i]);
    }
    written[dst] = true;
  }
  check_source(-1, output);
}

at::Tensor run_program(DenoiserRunner& denoiser, const ProgramArrays& program,
                       const at::Tensor& latents, const std::optional<at::Tensor>& noise,
                       const std::optional<at::Tensor>& class_labels,
                       std::optional<double> guidance, DenoiserRunner* guide) {
  program.validate();
  check_latents(denoiser, latents);
  if (guide != nullptr) {
    check_guide(denoiser, *guide);
    check_latents(*guide, latents);
  }
  TORCH_CHECK(!guidance || std::isfinite(*guidance), "the guidance weight must be finite, got ",
              *guidance);
  c10::DeviceGuard device_guard(latents.device());
  c10::NoGradGuard no_grad;

  const ModelInfo& info = denoiser.info();
  const int64_t N = latents.size(0), num_ops = program.num_ops();
  const auto opts = latents.options();
  const at::Tensor x0 = latents.contiguous();
  const at::Tensor eps = prepare_noise(program, x0, noise);  // (K, N, ...)
  const at::Tensor labels = prepare_labels(denoiser, x0, class_labels);
  // autoguidance needs no labels (an unconditional model can be autoguided)
  const bool autoguided = guidance.has_value() && guide != nullptr;
  TORCH_CHECK(!guidance || autoguided || labels.defined(), "classifier-free guidance needs a "
              "class-conditional model, but the model '", info.path, "' has label_dim = ",
              info.label_dim, info.label_dim < 0 ? " (unknown: pass class_labels)" : "",
              "; drop the guidance weight");

  // Which evaluations run guided (classifier-free: a batch of 2N; autoguidance: the main model
  // and the guide at N each), and their sigma vectors, row by row.
  std::vector<bool> guided_eval(num_ops, false);
  std::vector<int64_t> row(num_ops, -1);
  std::vector<double> plain_sigmas, guided_sigmas;
  for (int64_t i = 0; i < num_ops; ++i) {
    if (program.kinds[i] != kEval) continue;
    guided_eval[i] = guidance.has_value() && program.guided[i] != 0;
    auto& table = guided_eval[i] ? guided_sigmas : plain_sigmas;
    row[i] = static_cast<int64_t>(table.size());
    table.push_back(program.sigmas[i]);
  }
  const int64_t guided_batch = autoguided ? N : 2 * N;
  for (const auto& [count, B] : {std::pair{plain_sigmas.size(), N},
                                 std::pair{guided_sigmas.size(), guided_batch}}) {
    TORCH_CHECK(count == 0 || info.static_batch < 0 || info.static_batch == B,
                "the model '", info.path, "' was exported with a static batch of ",
                info.static_batch, " (dynamic_batch=False) but this run needs batch ", B,
                B == 2 * N ? " (2N for guidance)" : "", "; re-export with a dynamic batch "
                "(edm-fast export without --batch; dynamic_batch=True in Python)");
  }
  if (autoguided) {
    const ModelInfo& guide_info = guide->info();
    TORCH_CHECK(guided_sigmas.empty() || guide_info.static_batch < 0 ||
                    guide_info.static_batch == N,
                "the guide '", guide_info.path, "' was exported with a static batch of ",
                guide_info.static_batch, " (dynamic_batch=False) but this run needs batch ", N,
                "; re-export it with a dynamic batch or batch ", N);
  }

  // Everything the program needs is allocated here, before the first op.
  const at::Tensor plain_vecs = sigma_table(plain_sigmas, N, opts);       // (evals, N)
  const at::Tensor guided_vecs = sigma_table(guided_sigmas, guided_batch, opts);  // (evals, B)
  std::vector<at::Tensor> regs;
  for (int64_t r = 0; r < program.num_registers; ++r) {
    regs.push_back(at::empty_like(x0));
  }
  at::Tensor scratch = at::empty_like(x0);  // a LIN writing over one of its sources
  at::Tensor x_both, labels_both;           // [x; x] and [labels; zeros] for the 2N batch
  if (!guided_sigmas.empty() && !autoguided) {
    x_both = at::empty(with_batch(2 * N, x0.sizes().slice(1)), opts);
    labels_both = at::cat({labels, at::zeros_like(labels)});
  }
  at::Tensor all_finite = at::ones({}, opts.dtype(at::kBool));

  std::vector<at::Tensor> noise_draws;  // eps[k] as views, made once
  for (int64_t k = 0; k < program.num_noise; ++k) {
    noise_draws.push_back(eps.select(0, k));
  }
  auto input = [&](int64_t s) -> const at::Tensor& {
    return s >= 0 ? regs[s] : s == kLatents ? x0 : noise_draws[-2 - s];
  };

  for (int64_t i = 0; i < num_ops; ++i) {
    const int64_t begin = program.term_start[i], end = program.term_start[i + 1];
    at::Tensor& dst = regs[program.dsts[i]];
    if (program.kinds[i] == kLin) {  // r_dst = sum_j c_j src_j, all sources read first
      const bool overwrites = std::find(program.srcs.begin() + begin, program.srcs.begin() + end,
                                        program.dsts[i]) != program.srcs.begin() + end;
      at::Tensor& out = overwrites ? scratch : dst;
      at::mul_out(out, input(program.srcs[begin]), program.coefs[begin]);
      for (int64_t j = begin + 1; j < end; ++j) {
        out.add_(input(program.srcs[j]), program.coefs[j]);
      }
      if (overwrites) std::swap(dst, scratch);
      continue;
    }
    const at::Tensor& x = input(program.srcs[begin]);
    if (!guided_eval[i]) {
      dst.copy_(denoiser(x, plain_vecs.select(0, row[i]), labels));
    } else if (autoguided) {  // D_g + w (D - D_g), arXiv 2406.02507 Eq. 1, same labels
      const at::Tensor& sigma = guided_vecs.select(0, row[i]);
      const at::Tensor d_main = denoiser(x, sigma, labels).to(x0.scalar_type());
      const at::Tensor d_guide = (*guide)(x, sigma, labels).to(x0.scalar_type());
      at::sub_out(dst, d_main, d_guide).mul_(*guidance).add_(d_guide);
    } else {  // D_u + w (D_c - D_u) from one batch of 2N
      x_both.narrow(0, 0, N).copy_(x);
      x_both.narrow(0, N, N).copy_(x);
      const at::Tensor both =
          denoiser(x_both, guided_vecs.select(0, row[i]), labels_both).to(x0.scalar_type());
      const at::Tensor cond = both.narrow(0, 0, N), uncond = both.narrow(0, N, N);
      at::sub_out(dst, cond, uncond).mul_(*guidance).add_(uncond);
    }
    all_finite.logical_and_(at::isfinite(dst).all());
  }
  // The one host sync.
  TORCH_CHECK(all_finite.item<bool>(), "the sampled images contain NaN/Inf: the denoiser '",
              info.path, "' returned non-finite values; check the model and its inputs");
  const at::Tensor& result = input(program.output);
  return program.output >= 0 ? result : result.clone();
}

at::Tensor run_program_from_seeds(DenoiserRunner& denoiser, const ProgramArrays& program,
                                  const std::vector<uint64_t>& seeds,
                                  const std::vector<int64_t>& sample_shape,
                                  const at::TensorOptions& options,
                                  const std::optional<at::Tensor>& class_labels,
                                  std::optional<double> guidance, DenoiserRunner* guide) {
  program.validate();
  SeedNoise noise(seeds, sample_shape);
  const at::Tensor latents = noise.draw().to(options);                       // (N, *shape)
  const at::Tensor eps = noise.draw_many(program.num_noise).to(options);     // (K, N, *shape)
  return run_program(denoiser, program, latents, eps, class_labels, guidance, guide);
}

}  // namespace edm_fast
