// Loading and calling the exported denoiser: AOTInductor (.pt2) or TorchScript. See the header.
#include "denoiser_runner.h"

#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/serialization/import.h>

#include <fstream>
#include <sstream>

namespace edm_fast {
namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(),
                                                suffix) == 0;
}

std::vector<int64_t> parse_shape(const std::string& text) {
  std::vector<int64_t> shape;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) {
      shape.push_back(std::stoll(item));
    }
  }
  return shape;
}

std::optional<at::ScalarType> parse_dtype(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "float64") return at::kDouble;
  if (name == "float16") return at::kHalf;
  if (name == "bfloat16") return at::kBFloat16;
  return std::nullopt;
}

// AOTInductor package (torch._inductor.aoti_compile_and_package). Uses only the loader API
// common to torch 2.6 .. 2.13: the (path, model_name) constructor, run(inputs), get_metadata().
// run() without a stream handle runs on the current CUDA stream of the current device.
class AotiRunner final : public DenoiserRunner {
 public:
  AotiRunner(const std::string& path, c10::Device device) : DenoiserRunner(device) {
    std::optional<c10::DeviceGuard> guard;
    if (device.is_cuda() && device.has_index()) {
      guard.emplace(device);  // the package binds to the current CUDA device
    }
    try {
      loader_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path, "model");
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "could not load the AOTInductor package '", path, "' for device ",
                  device, ": ", e.what(),
                  "\nA package only runs on the device type (and a torch of the version) it "
                  "was compiled with; re-export it with edm_fast.io.export.export_aoti(..., "
                  "device='", device.type() == c10::DeviceType::CUDA ? "cuda" : "cpu", "').");
    }
    const auto metadata = loader_->get_metadata();
    set_metadata(metadata);
    info_.path = path;
    info_.kind = "aoti";
    const auto it = metadata.find("AOTI_DEVICE_KEY");
    if (it != metadata.end()) {
      info_.device_type = it->second;
    }
    const std::string want = c10::DeviceTypeName(device.type(), /*lower_case=*/true);
    TORCH_CHECK(info_.device_type.empty() || info_.device_type == want,
                "model/device mismatch: the AOTInductor package '", path, "' was compiled for '",
                info_.device_type, "' but the sampler runs on '", want,
                "'; re-export it with export_aoti(..., device='", want,
                "') or create the sampler with device='", info_.device_type, "'.");
  }

 protected:
  std::vector<at::Tensor> call(std::vector<at::Tensor> inputs) override {
    return loader_->run(inputs);
  }

 private:
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
};

// TorchScript module (torch.jit.trace + torch.jit.save); weights are mapped onto `device`.
class ScriptRunner final : public DenoiserRunner {
 public:
  ScriptRunner(const std::string& path, c10::Device device) : DenoiserRunner(device) {
    torch::jit::ExtraFilesMap extra{{kMetadataFile, ""}};
    try {
      module_ = torch::jit::load(path, device, extra);
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "could not load the TorchScript file '", path, "' onto ", device, ": ",
                  e.what(), "\nWrite it with edm_fast.io.export.export_torchscript(...); an "
                  "AOTInductor package must end in '.pt2' (or pass kind='aoti').");
    }
    module_.eval();
    std::unordered_map<std::string, std::string> metadata;
    std::stringstream lines(extra[kMetadataFile]);
    std::string line;
    while (std::getline(lines, line)) {
      const auto eq = line.find('=');
      if (eq != std::string::npos) {
        metadata[line.substr(0, eq)] = line.substr(eq + 1);
      }
    }
    set_metadata(metadata);
    info_.path = path;
    info_.kind = "torchscript";
    auto it = metadata.find("edm_fast.device");
    if (it != metadata.end()) {
      info_.device_type = it->second;
    }
    // A trace bakes device constants (e.g. torch.arange(..., device=x.device)) into the graph,
    // so moving the weights with map_location is not enough.
    const std::string want = c10::DeviceTypeName(device.type(), /*lower_case=*/true);
    TORCH_CHECK(info_.device_type.empty() || info_.device_type == want,
                "model/device mismatch: the TorchScript file '", path, "' was traced on '",
                info_.device_type, "' but the sampler runs on '", want,
                "'; re-export it with export_torchscript(..., device='", want,
                "') or create the sampler with device='", info_.device_type, "'.");
  }

 protected:
  std::vector<at::Tensor> call(std::vector<at::Tensor> inputs) override {
    std::vector<c10::IValue> args(inputs.begin(), inputs.end());
    return {module_.forward(args).toTensor()};
  }

 private:
  torch::jit::Module module_;
};

}  // namespace

void DenoiserRunner::set_metadata(const std::unordered_map<std::string, std::string>& metadata) {
  auto get = [&](const char* key) -> std::string {
    const auto it = metadata.find(key);
    return it == metadata.end() ? std::string() : it->second;
  };
  if (!get("edm_fast.label_dim").empty()) {
    info_.label_dim = std::stoll(get("edm_fast.label_dim"));
  }
  info_.sample_shape = parse_shape(get("edm_fast.sample_shape"));
  info_.dtype = parse_dtype(get("edm_fast.dtype"));
  info_.precond = get("edm_fast.precond");
  if (!get("edm_fast.sigma_min").empty()) {
    info_.sigma_min = std::stod(get("edm_fast.sigma_min"));
  }
  if (!get("edm_fast.sigma_max").empty()) {
    info_.sigma_max = std::stod(get("edm_fast.sigma_max"));
  }
  if (get("edm_fast.dynamic_batch") == "0" && !get("edm_fast.batch").empty()) {
    info_.static_batch = std::stoll(get("edm_fast.batch"));
  }
}

at::Tensor DenoiserRunner::operator()(const at::Tensor& x, const at::Tensor& sigma,
                                      const at::Tensor& labels) {
  std::vector<at::Tensor> inputs{x, sigma};
  if (labels.defined()) {
    inputs.push_back(labels);
  }
  std::vector<at::Tensor> outputs;
  try {
    outputs = call(std::move(inputs));
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "the denoiser '", info_.path, "' (", info_.kind, ") failed on x of shape ",
                x.sizes(), " ", x.dtype(), " on ", x.device(), ", sigma of shape ", sigma.sizes(),
                labels.defined() ? ", labels of shape " : ", no labels",
                labels.defined() ? c10::str(labels.sizes()) : std::string(),
                ": ", e.what());
  }
  TORCH_CHECK(outputs.size() == 1 && outputs[0].sizes() == x.sizes(),
              "the denoiser '", info_.path, "' must return one tensor shaped like x ", x.sizes(),
              ", got ", outputs.size(), " output(s)",
              outputs.empty() ? std::string() : c10::str(" of shape ", outputs[0].sizes()));
  return outputs[0];
}

std::unique_ptr<DenoiserRunner> load_denoiser(const std::string& path, const std::string& kind,
                                              c10::Device device) {
  TORCH_CHECK(kind == "aoti" || kind == "torchscript" || kind == "auto",
              "model kind must be 'aoti', 'torchscript' or 'auto', got '", kind, "'");
  TORCH_CHECK(std::ifstream(path).good(), "model file '", path, "' does not exist or cannot be "
              "read; write it with edm_fast.io.export.export_aoti(...) (.pt2) or "
              "export_torchscript(...)");
  TORCH_CHECK(device.is_cpu() || device.is_cuda(),
              "the edm_fast C++ sampler runs on 'cpu' or 'cuda', got '", device, "'");
  TORCH_CHECK(!device.is_cuda() || at::hasCUDA(),
              "device '", device, "' was requested but this torch has no CUDA support or no GPU "
              "is visible; use device='cpu'");
  const bool aoti = kind == "aoti" || (kind == "auto" && ends_with(path, ".pt2"));
  std::unique_ptr<DenoiserRunner> runner;
  if (aoti) {
    runner = std::make_unique<AotiRunner>(path, device);
  } else {
    runner = std::make_unique<ScriptRunner>(path, device);
  }
  return runner;
}

}  // namespace edm_fast
