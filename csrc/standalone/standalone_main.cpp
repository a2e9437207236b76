// edm_fast_sample: EDM sampling (Karras et al. 2022, Algorithm 2) without Python.
//
// Loads a denoiser exported by edm_fast/export.py (AOTInductor .pt2 or TorchScript), computes
// the schedule (Eq. 5), the churn (Alg. 2 l.4-5), per-seed noise (bit-identical to
// edm_fast.noise.SeedNoise) and the sampling loop in C++, and writes the samples as a float32
// .npy of shape (N, *sample_shape). Built by CMakeLists.txt at the repository root.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/util/Exception.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "denoiser_runner.h"
#include "sampler_loop.h"
#include "schedule.h"

namespace {

constexpr const char* kUsage = R"(usage: edm_fast_sample --model PATH [options]

Sample images with EDM's sampler (Karras et al. 2022, Alg. 2) from an exported denoiser.

  --model PATH         .pt2 from edm_fast.export.export_aoti, or a TorchScript file
  --kind K             auto | aoti | torchscript                       [auto: by suffix]
  --seeds LIST         e.g. 0-7 or 1,5,9 or 0-3,10 (one image per seed)  [0-7]
  --batch B            images per denoiser batch (results do not depend on it)
                       [64; a model exported with a static batch: that batch]
  --steps N            number of steps                                 [18]
  --sigma-min S        smallest noise level, within the model's range  [0.002]
  --sigma-max S        largest noise level, within the model's range   [80]
  --rho R              schedule exponent (Eq. 5)                       [7]
  --S-churn S          stochasticity (Alg. 2)                          [0]
  --S-min S            churn only where t >= S_min                     [0]
  --S-max S            churn only where t <= S_max                     [inf]
  --S-noise S          noise inflation                                 [1]
  --solver S           heun | euler                                    [heun]
  --class K            class index for every image (conditional models; default: zero
                       labels, i.e. unconditional)
  --guidance W         classifier-free guidance weight (needs --class)
  --shape C,H,W        sample shape (default: from the model's metadata; must match it)
  --device D           cpu | cuda | cuda:I                             [cpu]
  --tf32 0|1           allow TF32 convolutions/matmuls on CUDA (faster, ~1e-3 error)  [0]
  --out PATH           output .npy, float32 (N, *shape); its folder must exist  [out.npy]
)";

using Options = std::map<std::string, std::string>;

Options parse_args(int argc, char** argv) {
  Options opts{{"kind", "auto"},     {"seeds", "0-7"},    {"steps", "18"},
               {"rho", "7"},         {"S-churn", "0"},
               {"S-min", "0"},       {"S-max", "inf"},    {"S-noise", "1"}, {"solver", "heun"},
               {"device", "cpu"},    {"out", "out.npy"},  {"tf32", "0"}};
  const std::vector<std::string> known{"model", "kind", "seeds", "batch", "steps", "sigma-min",
                                       "sigma-max", "rho", "S-churn", "S-min", "S-max",
                                       "S-noise", "solver", "class", "guidance", "shape",
                                       "device", "out", "tf32"};
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      std::exit(0);
    }
    TORCH_CHECK(arg.rfind("--", 0) == 0, "unexpected argument '", arg, "' (see --help)");
    std::string key = arg.substr(2), value;
    const auto eq = key.find('=');
    if (eq != std::string::npos) {
      value = key.substr(eq + 1);
      key = key.substr(0, eq);
    } else {
      TORCH_CHECK(i + 1 < argc, "option --", key, " needs a value (see --help)");
      value = argv[++i];
    }
    TORCH_CHECK(std::find(known.begin(), known.end(), key) != known.end(), "unknown option --",
                key, " (see --help)");
    opts[key] = value;
  }
  TORCH_CHECK(opts.count("model"), "--model PATH is required (see --help)");
  return opts;
}

double to_double(const Options& opts, const std::string& key) {
  try {
    size_t used = 0;
    const double value = std::stod(opts.at(key), &used);
    TORCH_CHECK(used == opts.at(key).size(), "");
    return value;
  } catch (const std::exception&) {
    TORCH_CHECK(false, "--", key, " expects a number, got '", opts.at(key), "'");
  }
}

int64_t to_int(const std::string& text, const std::string& what) {
  try {
    size_t used = 0;
    const long long value = std::stoll(text, &used);
    TORCH_CHECK(used == text.size(), "");
    return value;
  } catch (const std::exception&) {
    TORCH_CHECK(false, what, " expects an integer, got '", text, "'");
  }
}

// A seed in [0, 2^64), as torch.Generator().manual_seed takes (digits only: no sign).
uint64_t to_seed(const std::string& text, const std::string& spec) {
  const bool digits = !text.empty() && text.find_first_not_of("0123456789") == std::string::npos;
  try {
    TORCH_CHECK(digits, "");
    return std::stoull(text);  // throws std::out_of_range from 2^64 on
  } catch (const std::exception&) {
    TORCH_CHECK(false, "bad seed list '", spec, "': seeds are integers in [0, 2^64), e.g. 0-63 "
                "or 1,5,9");
  }
}

constexpr uint64_t kMaxSeeds = 100000000;  // as edm_fast.noise.MAX_SEEDS

// "0-3,10" -> {0, 1, 2, 3, 10} (inclusive ranges, as edm_fast.noise.parse_seeds).
std::vector<uint64_t> parse_seeds(const std::string& spec) {
  std::vector<uint64_t> seeds;
  std::stringstream parts(spec);
  std::string part;
  while (std::getline(parts, part, ',')) {
    if (part.empty()) continue;
    const auto dash = part.find('-', 1);
    const uint64_t lo = to_seed(part.substr(0, dash), spec);
    const uint64_t hi = dash == std::string::npos ? lo : to_seed(part.substr(dash + 1), spec);
    TORCH_CHECK(hi >= lo, "bad seed list '", spec, "': a range must not decrease");
    TORCH_CHECK(hi - lo < kMaxSeeds - seeds.size(), "bad seed list '", spec, "': more than ",
                kMaxSeeds, " seeds; split the job");
    for (uint64_t s = lo;; ++s) {  // up to hi inclusive, without overflowing at 2^64 - 1
      seeds.push_back(s);
      if (s == hi) break;
    }
  }
  TORCH_CHECK(!seeds.empty(), "bad seed list '", spec, "': no seeds");
  return seeds;
}

std::vector<int64_t> parse_shape(const std::string& spec) {
  std::vector<int64_t> shape;
  std::stringstream parts(spec);
  std::string part;
  while (std::getline(parts, part, ',')) {
    shape.push_back(to_int(part, "--shape"));
    TORCH_CHECK(shape.back() >= 1, "--shape sizes must be >= 1, got '", spec, "'");
  }
  return shape;
}

// Refuse an output the run could not write, before any sampling: a long job must not end in
// "cannot write". The folder must exist (nothing is created) and the path must not be one.
void check_out_path(const std::string& path) {
  namespace fs = std::filesystem;
  TORCH_CHECK(!path.empty(), "--out is empty: name the .npy file to write");
  const fs::path out(path);
  TORCH_CHECK(!fs::is_directory(out), "--out '", path, "' is a folder; name the .npy file");
  const fs::path folder = out.has_parent_path() ? out.parent_path() : fs::path(".");
  TORCH_CHECK(fs::is_directory(folder), "--out '", path, "': the folder '", folder.string(),
              "' does not exist");
  TORCH_CHECK(::access(folder.c_str(), W_OK | X_OK) == 0, "--out '", path,
              "': cannot write into the folder '", folder.string(), "'");
}

// NumPy .npy format 1.0: magic, version, little-endian header length, a Python-literal dict
// padded with spaces to a multiple of 64 bytes, then the raw little-endian float32 data. Written
// to a temporary file in the same folder and renamed, so an interrupted run leaves no torn file.
void write_npy(const std::string& path, const at::Tensor& images) {
  const uint16_t probe = 1;
  TORCH_CHECK(*reinterpret_cast<const uint8_t*>(&probe) == 1, "write_npy needs a little-endian "
              "host");
  const at::Tensor data = images.to(at::kCPU, at::kFloat).contiguous();
  std::string shape = "(";
  for (int64_t d = 0; d < data.dim(); ++d) {
    shape += std::to_string(data.size(d)) + (data.dim() == 1 || d + 1 < data.dim() ? ", " : "");
  }
  shape += ")";
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }";
  const size_t unpadded = 6 + 2 + 2 + header.size() + 1;  // magic, version, length, '\n'
  header += std::string((64 - unpadded % 64) % 64, ' ') + "\n";
  const std::string tmp = path + ".tmp" + std::to_string(::getpid());
  std::ofstream out(tmp, std::ios::binary);
  TORCH_CHECK(out.good(), "cannot write '", path, "'");
  const uint16_t header_len = static_cast<uint16_t>(header.size());
  out.write("\x93NUMPY\x01\x00", 8);
  out.write(reinterpret_cast<const char*>(&header_len), 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(static_cast<const char*>(data.data_ptr()),
            static_cast<std::streamsize>(data.numel() * sizeof(float)));
  out.close();
  std::error_code error;
  if (out.good()) std::filesystem::rename(tmp, path, error);
  if (!out.good() || error) {
    std::filesystem::remove(tmp, error);
    TORCH_CHECK(false, "writing '", path, "' failed");
  }
}

// Alg. 2's sigma_min or sigma_max: EDM's default, or the asked value, within the range the
// model's preconditioning supports (as generate.py and edm_fast.Sampler do); an asked value
// outside it is clipped with a warning.
double sigma_bound(const Options& opts, const edm_fast::ModelInfo& info, bool upper) {
  const std::string key = upper ? "sigma-max" : "sigma-min";
  const double model = upper ? info.sigma_max : info.sigma_min;
  const bool asked = opts.count(key) > 0;
  const double value = asked ? to_double(opts, key) : (upper ? 80.0 : 0.002);
  TORCH_CHECK(value > 0 && std::isfinite(value), "--", key,
              " must be a positive finite number, got ", value);
  const double clipped = upper ? std::min(value, model) : std::max(value, model);
  if (asked && clipped != value) {
    std::cerr << "edm_fast_sample: warning: --" << key << " " << value
              << " is outside the model's range [" << info.sigma_min << ", " << info.sigma_max
              << "]; using " << clipped << "\n";
  }
  return clipped;
}

int run(const Options& opts) {
  check_out_path(opts.at("out"));
  const c10::Device device(opts.at("device"));
  TORCH_CHECK(opts.at("tf32") == "0" || opts.at("tf32") == "1", "--tf32 expects 0 or 1");
  at::globalContext().setAllowTF32CuDNN(opts.at("tf32") == "1");
  at::globalContext().setAllowTF32CuBLAS(opts.at("tf32") == "1");
  auto denoiser = edm_fast::load_denoiser(opts.at("model"), opts.at("kind"), device);
  const edm_fast::ModelInfo& info = denoiser->info();

  std::vector<int64_t> shape = info.sample_shape;
  if (opts.count("shape")) {
    const auto given = parse_shape(opts.at("shape"));
    TORCH_CHECK(shape.empty() || given == shape, "--shape ", opts.at("shape"),
                " does not match the model's sample shape ", c10::IntArrayRef(shape));
    shape = given;
  }
  TORCH_CHECK(!shape.empty(), "the model has no edm_fast metadata; pass --shape C,H,W");
  TORCH_CHECK(info.precond.empty() || info.precond == "edm" || info.precond == "vp" ||
                  info.precond == "ve",
              "the '", info.precond, "' preconditioning rounds sigma to discrete levels, which "
              "this binary does not do; sample it from Python");

  std::optional<double> guidance;
  if (opts.count("guidance")) guidance = to_double(opts, "guidance");
  const auto plan = edm_fast::make_edm_plan(
      to_int(opts.at("steps"), "--steps"), sigma_bound(opts, info, false),
      sigma_bound(opts, info, true), to_double(opts, "rho"), to_double(opts, "S-churn"),
      to_double(opts, "S-min"), to_double(opts, "S-max"), to_double(opts, "S-noise"),
      opts.at("solver"), guidance);

  const auto seeds = parse_seeds(opts.at("seeds"));
  // A static-batch model (exported with --batch S) runs S images per call, guidance included:
  // with guidance the network sees 2 x the images, so S must be even.
  const int64_t per_call = guidance ? 2 : 1;
  int64_t batch = 64;
  if (info.static_batch > 0) {
    TORCH_CHECK(info.static_batch % per_call == 0, "the model was exported with a static batch "
                "of ", info.static_batch, ", but guidance needs an even batch (2N); re-export "
                "it without --batch (a dynamic batch)");
    batch = info.static_batch / per_call;
  }
  if (opts.count("batch")) {
    const int64_t asked = to_int(opts.at("batch"), "--batch");
    TORCH_CHECK(asked >= 1, "--batch must be >= 1");
    TORCH_CHECK(info.static_batch < 0 || asked == batch, "--batch ", asked, ": the model was "
                "exported with a static batch of ", info.static_batch, ", so --batch must be ",
                batch, " (or left out); re-export it without --batch for any batch");
    batch = asked;
  }
  const auto options = at::TensorOptions().dtype(info.dtype.value_or(at::kFloat)).device(device);
  int64_t class_idx = -1;
  if (opts.count("class")) {
    class_idx = to_int(opts.at("class"), "--class");
    TORCH_CHECK(info.label_dim > 0, "--class given but the model is unconditional");
    TORCH_CHECK(class_idx >= 0 && class_idx < info.label_dim, "--class must lie in [0, ",
                info.label_dim, "), got ", class_idx);
  }
  TORCH_CHECK(!guidance || class_idx >= 0, "--guidance needs --class K");

  std::vector<at::Tensor> chunks;
  const auto start = std::chrono::steady_clock::now();
  for (size_t first = 0; first < seeds.size(); first += batch) {
    std::vector<uint64_t> chunk(
        seeds.begin() + first, seeds.begin() + std::min(seeds.size(), first + batch));
    const int64_t wanted = static_cast<int64_t>(chunk.size());
    if (info.static_batch > 0) {  // pad the last chunk; noise is per seed, so rows are unchanged
      chunk.resize(static_cast<size_t>(batch), chunk.front());
    }
    std::optional<at::Tensor> labels;
    if (class_idx >= 0) {
      labels = at::zeros({static_cast<int64_t>(chunk.size()), info.label_dim}, options);
      labels->select(1, class_idx).fill_(1.0);  // one-hot
    }
    chunks.push_back(edm_fast::sample_from_seeds(*denoiser, plan, chunk, shape, options, labels)
                         .narrow(0, 0, wanted)
                         .cpu());
  }
  const at::Tensor images = at::cat(chunks);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  write_npy(opts.at("out"), images);
  std::cerr << "edm_fast_sample: " << seeds.size() << " samples " << c10::IntArrayRef(shape)
            << ", " << plan.num_evals() << " NFE per batch, " << seconds << " s -> "
            << opts.at("out") << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const c10::Error& e) {
    std::cerr << "edm_fast_sample: error: " << e.what_without_backtrace() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "edm_fast_sample: error: " << e.what() << "\n";
  }
  return 1;
}
