// The denoiser D(x; sigma, labels) the C++ loop calls: an AOTInductor package (.pt2) or a
// TorchScript file, both written by edm_fast/io/export.py.
//
// The exported function is the preconditioned denoiser (EDM Eq. 7), not the raw network F:
//   D(x: (B, *shape), sigma: (B,)[, class_labels: (B, label_dim)]) -> (B, *shape)
// in the dtype it was exported for; the labels input exists only when label_dim > 0.
// export.py stores edm_fast.* metadata next to the model (AOTI package metadata, or the
// TorchScript extra file kMetadataFile) so the loop can check inputs before running.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace edm_fast {

// Name of the TorchScript extra file holding "key=value" lines of edm_fast.* metadata.
constexpr const char* kMetadataFile = "edm_fast_metadata.txt";

struct ModelInfo {
  std::string path;
  std::string kind;                   // "aoti" or "torchscript"
  std::string device_type;            // what the model was exported for ("" = unknown)
  int64_t label_dim = -1;             // -1 = unknown (a file without edm_fast metadata)
  std::vector<int64_t> sample_shape;  // shape of one sample, empty = unknown
  std::optional<at::ScalarType> dtype;  // dtype of x / sigma / labels, none = unknown
  std::string precond;                // e.g. "edm" ("" = unknown)
  int64_t static_batch = -1;          // batch size baked in (dynamic_batch=False), -1 = dynamic
  double sigma_min = 0.0;             // the sigma range the preconditioning supports (VP, VE:
  double sigma_max = std::numeric_limits<double>::infinity();  // finite; EDM: unbounded)
};

class DenoiserRunner {
 public:
  virtual ~DenoiserRunner() = default;

  // D(x; sigma, labels). x: (B, *shape), sigma: (B,), labels: (B, label_dim) or an undefined
  // tensor for an unconditional model. Inputs must be contiguous and on the model's device.
  at::Tensor operator()(const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& labels);

  const ModelInfo& info() const { return info_; }
  const c10::Device& device() const { return device_; }

 protected:
  explicit DenoiserRunner(c10::Device device) : device_(device) {}
  virtual std::vector<at::Tensor> call(std::vector<at::Tensor> inputs) = 0;
  void set_metadata(const std::unordered_map<std::string, std::string>& metadata);

  ModelInfo info_;
  c10::Device device_;
};

// Load a model for `device`. kind: "aoti", "torchscript" or "auto" (".pt2" -> aoti, anything
// else -> torchscript). Throws c10::Error with an actionable message when the file is missing,
// cannot be loaded, or was compiled for another device type.
std::unique_ptr<DenoiserRunner> load_denoiser(const std::string& path, const std::string& kind,
                                              c10::Device device);

}  // namespace edm_fast
