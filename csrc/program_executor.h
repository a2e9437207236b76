// The generic executor of a sampling program (edm_fast/program.py) over an exported denoiser.
//
// A program is a list of ops over registers, written once on the host by the Python planner:
//   LIN   r_dst = sum_j c_j * src_j
//   EVAL  r_dst = D(src; sigma, labels)          (guided: whether guidance applies here)
// A source is a register (index >= 0), the latents (-1), or the k-th injected noise draw
// (-2 - k). The executor knows no solver: every solver is such a program. It equals
// edm_fast.sampling.backends.executor.run_program for the same latents, noise and labels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "denoiser_runner.h"

namespace edm_fast {

constexpr int64_t kLin = 0;
constexpr int64_t kEval = 1;
constexpr int64_t kLatents = -1;

// A program as the flat arrays of edm_fast.program.Program.arrays(): per op its kind, dst,
// sigma (EVAL) and guided flag, and its terms (srcs[j], coefs[j]) for j in
// [term_start[i], term_start[i + 1]).
struct ProgramArrays {
  std::vector<int64_t> kinds;
  std::vector<int64_t> dsts;
  std::vector<double> sigmas;
  std::vector<int64_t> guided;
  std::vector<int64_t> term_start;
  std::vector<int64_t> srcs;
  std::vector<double> coefs;
  int64_t num_registers = 0;
  int64_t output = 0;
  int64_t num_noise = 0;

  int64_t num_ops() const { return static_cast<int64_t>(kinds.size()); }
  // Number of denoiser evaluations (NFE).
  int64_t num_evals() const;
  // Throws c10::Error naming the offending op unless the arrays are consistent, every source is
  // in range and written before it is read, every coefficient is finite and every EVAL has one
  // source (not its destination) and a finite sigma > 0.
  void validate() const;
};

// Run `program` over `denoiser`.
//   latents:      (N, *shape) unit-variance noise, float32/float64, on the model's device; the
//                 program runs in latents' dtype.
//   noise:        (K, N, *shape) with K = program.num_noise, the k-th slice being source -2 - k.
//                 May be omitted when K = 0.
//   class_labels: (N, label_dim) floats (one-hot); omitted for a conditional model = zeros.
//   guidance:     the guidance weight w, applied at the EVALs flagged guided. Without a guide:
//                 classifier-free guidance from one batch of 2N (labels, then zero labels),
//                 D = D_u + w (D_c - D_u).
//   guide:        autoguidance's guide D_g (Karras et al. 2024, arXiv 2406.02507), or null.
//                 With one, a guided EVAL runs the main model and the guide each on the N
//                 samples with the same labels (none for an unconditional model) and mixes
//                 D = D_g + w (D - D_g) (Eq. 1); it must take the latents' shape, dtype and
//                 device and the main model's label_dim. Without a weight it is not evaluated.
// Registers and sigma vectors are allocated before the first op; no host-device
// synchronisation until the end, where one check raises if any D held NaN/Inf.
at::Tensor run_program(DenoiserRunner& denoiser, const ProgramArrays& program,
                       const at::Tensor& latents, const std::optional<at::Tensor>& noise,
                       const std::optional<at::Tensor>& class_labels,
                       std::optional<double> guidance, DenoiserRunner* guide = nullptr);

// Everything in C++: per-seed latents and noise draws exactly like edm_fast.noise.SeedNoise
// (latent first, then program.num_noise draws), moved to `options`' device and dtype, then
// run_program. sample_shape is the shape of one sample.
at::Tensor run_program_from_seeds(DenoiserRunner& denoiser, const ProgramArrays& program,
                                  const std::vector<uint64_t>& seeds,
                                  const std::vector<int64_t>& sample_shape,
                                  const at::TensorOptions& options,
                                  const std::optional<at::Tensor>& class_labels,
                                  std::optional<double> guidance,
                                  DenoiserRunner* guide = nullptr);

// Throws c10::Error unless `guide` can guide `denoiser` (autoguidance): both exported for the
// same device type, dtype, sample shape and label_dim, where their metadata say.
void check_guide(const DenoiserRunner& denoiser, const DenoiserRunner& guide);

}  // namespace edm_fast
