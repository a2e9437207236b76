// A loaded denoiser (and optionally autoguidance's guide) plus the program executor, registered
// for Python as torch.classes.edm_fast.Sampler (csrc/ops.cpp).
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "denoiser_runner.h"
#include "program_executor.h"

namespace edm_fast {

// Thread-safety: every call takes a per-instance mutex, so one Sampler may be shared between
// threads (calls are serialised); use one Sampler per thread to run concurrently.
class Sampler : public torch::CustomClassHolder {
 public:
  Sampler(const std::string& model_path, const std::string& kind, const std::string& device);

  // Load autoguidance's guide (Karras et al. 2024, arXiv 2406.02507): a second exported
  // denoiser of the same task (AOTInductor .pt2 or TorchScript; kind as for the main model),
  // loaded for the main model's device, with its dtype, sample shape and label_dim. From then
  // on the guided evaluations of run_program / sample_seeds mix D_g + w (D - D_g) (Eq. 1)
  // instead of classifier-free guidance. Loading another guide replaces it.
  void load_guide(const std::string& guide_path, const std::string& kind);

  // run_program (program_executor.h) on a program given as its flat arrays.
  at::Tensor run_program(const at::Tensor& latents, std::vector<int64_t> kinds,
                         std::vector<int64_t> dsts, std::vector<double> sigmas,
                         std::vector<int64_t> guided, std::vector<int64_t> term_start,
                         std::vector<int64_t> srcs, std::vector<double> coefs,
                         int64_t num_registers, int64_t output, int64_t num_noise,
                         const std::optional<at::Tensor>& noise,
                         const std::optional<at::Tensor>& class_labels,
                         std::optional<double> guidance);

  // Seed noise and program, all in C++ (what the standalone edm_fast_sample binary runs).
  // Returns (N, *sample_shape) in the model's dtype.
  at::Tensor sample_seeds(const std::vector<int64_t>& seeds, std::vector<int64_t> kinds,
                          std::vector<int64_t> dsts, std::vector<double> sigmas,
                          std::vector<int64_t> guided, std::vector<int64_t> term_start,
                          std::vector<int64_t> srcs, std::vector<double> coefs,
                          int64_t num_registers, int64_t output, int64_t num_noise,
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
  // Whether a guide is loaded, and its file ("" without one); under the mutex, as load_guide.
  bool has_guide();
  std::string guide_path();

 private:
  std::unique_ptr<DenoiserRunner> runner_;
  std::unique_ptr<DenoiserRunner> guide_;  // autoguidance's guide, null = classifier-free
  std::mutex mutex_;
};

}  // namespace edm_fast
