// Per-seed Gaussian noise streams: the C++ twin of edm_fast.noise.SeedNoise, bit for bit.
//
// Each seed owns one CPU Mersenne-Twister generator seeded with the seed (what
// torch.Generator().manual_seed(seed) does); every draw is at::randn(shape) in float32 on the
// CPU. A stream is consumed as: the initial latent first, then the program's injected noise
// draws in order (program_executor.h), so a sample depends on its seed only, whatever the batch.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace edm_fast {

class SeedNoise {
 public:
  // seeds: one per sample; shape: the shape of one sample, e.g. {C, H, W}.
  SeedNoise(const std::vector<uint64_t>& seeds, std::vector<int64_t> shape);

  int64_t size() const { return static_cast<int64_t>(generators_.size()); }

  // The next draw of every stream: (N, *shape) float32 on the CPU.
  at::Tensor draw();

  // count successive draws: (count, N, *shape) float32 on the CPU, in draw order.
  at::Tensor draw_many(int64_t count);

 private:
  std::vector<at::Generator> generators_;
  std::vector<int64_t> shape_;
};

}  // namespace edm_fast
