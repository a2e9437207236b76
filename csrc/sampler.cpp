// torch.classes.edm_fast.Sampler. See sampler.h.
#include "sampler.h"

#include <c10/core/DeviceGuard.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <utility>

namespace edm_fast {
namespace {

ProgramArrays make_program(std::vector<int64_t> kinds, std::vector<int64_t> dsts,
                           std::vector<double> sigmas, std::vector<int64_t> guided,
                           std::vector<int64_t> term_start, std::vector<int64_t> srcs,
                           std::vector<double> coefs, int64_t num_registers, int64_t output,
                           int64_t num_noise) {
  ProgramArrays program;
  program.kinds = std::move(kinds);
  program.dsts = std::move(dsts);
  program.sigmas = std::move(sigmas);
  program.guided = std::move(guided);
  program.term_start = std::move(term_start);
  program.srcs = std::move(srcs);
  program.coefs = std::move(coefs);
  program.num_registers = num_registers;
  program.output = output;
  program.num_noise = num_noise;
  return program;
}

}  // namespace

Sampler::Sampler(const std::string& model_path, const std::string& kind,
                 const std::string& device)
    : runner_(load_denoiser(model_path, kind, c10::Device(device))) {}

void Sampler::load_guide(const std::string& guide_path, const std::string& kind) {
  std::unique_ptr<DenoiserRunner> guide = load_denoiser(guide_path, kind, runner_->device());
  check_guide(*runner_, *guide);
  std::lock_guard<std::mutex> lock(mutex_);
  guide_ = std::move(guide);
}

bool Sampler::has_guide() {
  std::lock_guard<std::mutex> lock(mutex_);
  return guide_ != nullptr;
}

std::string Sampler::guide_path() {
  std::lock_guard<std::mutex> lock(mutex_);
  return guide_ ? guide_->info().path : std::string();
}

at::Tensor Sampler::run_program(const at::Tensor& latents, std::vector<int64_t> kinds,
                                std::vector<int64_t> dsts, std::vector<double> sigmas,
                                std::vector<int64_t> guided, std::vector<int64_t> term_start,
                                std::vector<int64_t> srcs, std::vector<double> coefs,
                                int64_t num_registers, int64_t output, int64_t num_noise,
                                const std::optional<at::Tensor>& noise,
                                const std::optional<at::Tensor>& class_labels,
                                std::optional<double> guidance) {
  const ProgramArrays program = make_program(
      std::move(kinds), std::move(dsts), std::move(sigmas), std::move(guided),
      std::move(term_start), std::move(srcs), std::move(coefs), num_registers, output, num_noise);
  std::lock_guard<std::mutex> lock(mutex_);
  return edm_fast::run_program(*runner_, program, latents, noise, class_labels, guidance,
                               guide_.get());
}

at::Tensor Sampler::sample_seeds(const std::vector<int64_t>& seeds, std::vector<int64_t> kinds,
                                 std::vector<int64_t> dsts, std::vector<double> sigmas,
                                 std::vector<int64_t> guided, std::vector<int64_t> term_start,
                                 std::vector<int64_t> srcs, std::vector<double> coefs,
                                 int64_t num_registers, int64_t output, int64_t num_noise,
                                 const std::optional<at::Tensor>& class_labels,
                                 std::optional<double> guidance) {
  const ModelInfo& info = runner_->info();
  TORCH_CHECK(!info.sample_shape.empty(), "sample_seeds: the model '", info.path, "' has no "
              "edm_fast metadata (sample shape unknown); export it with edm_fast.io.export");
  // with no labels they are all zero, and the guided mix of two unconditional outputs is the
  // unconditional output: the weight would silently do nothing (the binary needs --class too).
  // Autoguidance mixes two models and needs no labels.
  TORCH_CHECK(!guidance || guide_ || class_labels.has_value(), "sample_seeds: classifier-free "
              "guidance needs class_labels (without them every label is zero and guidance "
              "changes nothing)");
  std::vector<uint64_t> useeds;
  for (int64_t s : seeds) {
    TORCH_CHECK(s >= 0, "seeds must be non-negative, got ", s);
    useeds.push_back(static_cast<uint64_t>(s));
  }
  const ProgramArrays program = make_program(
      std::move(kinds), std::move(dsts), std::move(sigmas), std::move(guided),
      std::move(term_start), std::move(srcs), std::move(coefs), num_registers, output, num_noise);
  const auto options = at::TensorOptions()
                           .dtype(info.dtype.value_or(at::kFloat))
                           .device(runner_->device());
  std::lock_guard<std::mutex> lock(mutex_);
  return run_program_from_seeds(*runner_, program, useeds, info.sample_shape, options,
                                class_labels, guidance, guide_.get());
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
