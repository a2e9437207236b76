// edm_fast_sample: diffusion sampling without Python.
//
// Loads a denoiser exported by edm_fast/io/export.py (AOTInductor .pt2 or TorchScript) and a
// sampling program written by edm_fast/io/program_file.py (--plan; the format is documented
// there), draws per-seed noise (bit-identical to edm_fast.noise.SeedNoise), runs the program with
// the generic executor (program_executor.h) and writes the samples as a float32 .npy of shape
// (N, *sample_shape). Built by CMakeLists.txt at the repository root.
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
#include <iterator>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "denoiser_runner.h"
#include "program_executor.h"

namespace {

constexpr const char* kUsage = R"(usage: edm_fast_sample --model PATH --plan FILE [options]

Sample images from an exported denoiser with a sampling plan written by
  edm-fast plan --ckpt CHECKPOINT --solver dpmpp_2m --steps 10 --out plan.txt
(or from Python: edm_fast.io.program_file.write_program_file). The plan file holds the sampling program (noise levels, solver, injected noise) and the
guidance weight; this binary draws the noise per seed and runs the program.

  --model PATH         .pt2 from edm_fast.io.export.export_aoti, or a TorchScript file
  --plan FILE          program file from `edm-fast plan` (edm_fast.io.program_file)
  --kind K             auto | aoti | torchscript                       [auto: by suffix]
  --seeds LIST         e.g. 0-7 or 1,5,9 or 0-3,10 (one image per seed)  [0-7]
  --batch B            images per denoiser batch (results do not depend on it)
                       [64; a model exported with a static batch: that batch]
  --class K            class index for every image (conditional models; default: zero
                       labels, i.e. unconditional); needed by a plan with guidance
  --shape C,H,W        sample shape (default: from the model's metadata; must match it)
  --device D           cpu | cuda | cuda:I                             [cpu]
  --tf32 0|1           allow TF32 convolutions/matmuls on CUDA (faster, ~1e-3 error)  [0]
  --out PATH           output .npy, float32 (N, *shape); its folder must exist  [out.npy]
)";

using Options = std::map<std::string, std::string>;

Options parse_args(int argc, char** argv) {
  Options opts{{"kind", "auto"}, {"seeds", "0-7"}, {"device", "cpu"}, {"out", "out.npy"},
               {"tf32", "0"}};
  const std::vector<std::string> known{"model", "plan", "kind", "seeds", "batch", "class",
                                       "shape", "device", "out", "tf32"};
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
                key, " (see --help; steps, noise levels, solver options and guidance are set "
                "in the --plan file)");
    opts[key] = value;
  }
  TORCH_CHECK(opts.count("model"), "--model PATH is required (see --help)");
  TORCH_CHECK(opts.count("plan"), "--plan FILE is required: write it with "
              "`edm-fast plan --ckpt CHECKPOINT --out FILE` (see --help)");
  return opts;
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

// A number of the plan file, all of `text` (std::stod alone accepts "1x").
template <typename T>
T parse_number(const std::string& text, const std::string& where, const char* what) {
  try {
    size_t used = 0;
    const T value = std::is_integral_v<T> ? static_cast<T>(std::stoll(text, &used))
                                          : static_cast<T>(std::stod(text, &used));
    TORCH_CHECK(used == text.size(), "");
    return value;
  } catch (const std::exception&) {
    TORCH_CHECK(false, where, ": ", what, " must be ",
                std::is_integral_v<T> ? "an integer" : "a number", ", got '", text, "'");
  }
}

// The program file of edm_fast/io/program_file.py (its docstring documents the format). The
// arrays are validated by run_program; this checks the syntax and names the line of an error.
edm_fast::ProgramArrays read_program_file(const std::string& path,
                                          std::optional<double>& guidance) {
  std::ifstream in(path);
  TORCH_CHECK(in.good(), "--plan '", path, "' does not exist or cannot be read; write it with "
              "`edm-fast plan --ckpt CHECKPOINT --out FILE`");
  edm_fast::ProgramArrays program;
  program.term_start.push_back(0);
  std::map<std::string, std::string> header;
  int64_t ops = -1, number = 0;
  bool magic = false;
  std::string line;
  while (std::getline(in, line)) {
    ++number;
    std::istringstream fields(line);
    std::vector<std::string> f{std::istream_iterator<std::string>(fields), {}};
    if (f.empty() || f[0][0] == '#') continue;
    const std::string where = path + ":" + std::to_string(number);
    if (!magic) {
      TORCH_CHECK(f.size() == 2 && f[0] == "edm-fast-program" && f[1] == "1", "--plan '", path,
                  "' is not an edm-fast program file (version 1): its first line must be "
                  "'edm-fast-program 1'; write it with edm_fast.io.program_file.write_program_file");
      magic = true;
    } else if (ops < 0) {  // the header
      if (f[0] == "info") continue;
      TORCH_CHECK(f[0] == "num_registers" || f[0] == "output" || f[0] == "num_noise" ||
                      f[0] == "guidance" || f[0] == "ops",
                  where, ": unknown key '", f[0], "'");
      TORCH_CHECK(f.size() == 2 && !header.count(f[0]), where, ": ", f[0],
                  " must appear once, with one value");
      header[f[0]] = f[1];
      if (f[0] == "guidance") {
        guidance = parse_number<double>(f[1], where, "guidance");
      } else {
        const int64_t value = parse_number<int64_t>(f[1], where, f[0].c_str());
        if (f[0] == "num_registers") program.num_registers = value;
        if (f[0] == "output") program.output = value;
        if (f[0] == "num_noise") program.num_noise = value;
        if (f[0] == "ops") {
          TORCH_CHECK(value >= 1, where, ": ops must be >= 1, got ", value);
          ops = value;
        }
      }
    } else {  // an op line
      TORCH_CHECK(program.num_ops() < ops, where, ": more op lines than 'ops ", ops, "'");
      const bool lin = f[0] == "lin" && f.size() >= 3;
      const bool eval = f[0] == "eval" && f.size() == 5 && (f[4] == "guided" ||
                                                            f[4] == "unguided");
      TORCH_CHECK(lin || eval, where, ": an op line must be 'lin DST SRC:COEF ...' or "
                  "'eval DST SRC SIGMA guided|unguided'");
      program.kinds.push_back(lin ? edm_fast::kLin : edm_fast::kEval);
      program.dsts.push_back(parse_number<int64_t>(f[1], where, "the destination"));
      if (lin) {
        for (size_t j = 2; j < f.size(); ++j) {
          const auto colon = f[j].find(':');
          TORCH_CHECK(colon != std::string::npos, where, ": a lin term must be SRC:COEF, got '",
                      f[j], "'");
          program.srcs.push_back(parse_number<int64_t>(f[j].substr(0, colon), where, "SRC"));
          program.coefs.push_back(parse_number<double>(f[j].substr(colon + 1), where, "COEF"));
        }
      } else {
        program.srcs.push_back(parse_number<int64_t>(f[2], where, "SRC"));
        program.coefs.push_back(1.0);
      }
      program.sigmas.push_back(lin ? 0.0 : parse_number<double>(f[3], where, "SIGMA"));
      program.guided.push_back(lin || f[4] == "guided" ? 1 : 0);
      program.term_start.push_back(static_cast<int64_t>(program.srcs.size()));
    }
  }
  TORCH_CHECK(magic, "--plan '", path, "' is empty");
  for (const char* key : {"num_registers", "output", "num_noise", "ops"}) {
    TORCH_CHECK(header.count(key), "--plan '", path, "': missing '", key, "'");
  }
  TORCH_CHECK(program.num_ops() == ops, "--plan '", path, "': 'ops ", ops, "' but ",
              program.num_ops(), " op lines");
  try {
    program.validate();
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "--plan '", path, "': ", e.what_without_backtrace());
  }
  return program;
}

// The model's preconditioning supports sigma in [sigma_min, sigma_max] (VP, VE: finite); a plan
// evaluating D outside it gets a warning, as edm_fast.Sampler clips its grid to that range.
void warn_about_sigma_range(const edm_fast::ProgramArrays& program,
                            const edm_fast::ModelInfo& info) {
  double lo = std::numeric_limits<double>::infinity(), hi = 0;
  for (int64_t i = 0; i < program.num_ops(); ++i) {
    if (program.kinds[i] == edm_fast::kEval) {
      lo = std::min(lo, program.sigmas[i]);
      hi = std::max(hi, program.sigmas[i]);
    }
  }
  const double slack = 1e-9;  // the grid is float64 arithmetic on the bounds
  if (lo < info.sigma_min * (1 - slack) || hi > info.sigma_max * (1 + slack)) {
    std::cerr << "edm_fast_sample: warning: the plan evaluates the denoiser at sigma in [" << lo
              << ", " << hi << "], outside the model's range [" << info.sigma_min << ", "
              << info.sigma_max << "]; build the plan with sigma_min/sigma_max within it\n";
  }
  if (info.precond == "iddpm" || info.precond == "ddpm") {
    std::cerr << "edm_fast_sample: note: the model's '" << info.precond << "' preconditioning "
              << "takes only its trained noise levels; build the plan with its round_sigma\n";
  }
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

  std::optional<double> guidance;
  const edm_fast::ProgramArrays program = read_program_file(opts.at("plan"), guidance);
  warn_about_sigma_range(program, info);
  bool guided = false;  // does any evaluation run the 2N batch of guidance?
  for (int64_t i = 0; i < program.num_ops(); ++i) {
    guided |= guidance && program.kinds[i] == edm_fast::kEval && program.guided[i] != 0;
  }

  const auto seeds = parse_seeds(opts.at("seeds"));
  // A static-batch model (exported with --batch S) runs S images per call, guidance included:
  // with guidance the network sees 2 x the images, so S must be even.
  const int64_t per_call = guided ? 2 : 1;
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
  // without labels they are all zero, and guidance would silently do nothing
  TORCH_CHECK(!guidance || class_idx >= 0, "the plan has a guidance weight, which needs "
              "--class K");

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
    chunks.push_back(edm_fast::run_program_from_seeds(*denoiser, program, chunk, shape, options,
                                                      labels, guidance)
                         .narrow(0, 0, wanted)
                         .cpu());
  }
  const at::Tensor images = at::cat(chunks);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  write_npy(opts.at("out"), images);
  std::cerr << "edm_fast_sample: " << seeds.size() << " samples " << c10::IntArrayRef(shape)
            << ", " << program.num_evals() << " NFE per batch, " << seconds << " s -> "
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
