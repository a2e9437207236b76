// Per-seed noise streams, see seed_noise.h.
#include "seed_noise.h"

#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>

namespace edm_fast {

SeedNoise::SeedNoise(const std::vector<uint64_t>& seeds, std::vector<int64_t> shape)
    : shape_(std::move(shape)) {
  TORCH_CHECK(!seeds.empty(), "SeedNoise needs at least one seed");
  for (auto d : shape_) {
    TORCH_CHECK(d >= 0, "SeedNoise: the sample shape has a negative size: ", c10::IntArrayRef(
                                                                                 shape_));
  }
  generators_.reserve(seeds.size());
  for (uint64_t seed : seeds) {
    // Same state as torch.Generator().manual_seed(seed): mt19937 seeded with `seed`, no cached
    // normal sample.
    generators_.push_back(at::detail::createCPUGenerator(seed));
  }
}

at::Tensor SeedNoise::draw() {
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
  std::vector<at::Tensor> rows;
  rows.reserve(generators_.size());
  for (auto& gen : generators_) {
    // ATen's normal kernel takes the generator's mutex itself (do not lock it here).
    rows.push_back(at::randn(shape_, gen, opts));
  }
  return at::stack(rows);  // (N, *shape)
}

at::Tensor SeedNoise::draw_many(int64_t count) {
  TORCH_CHECK(count >= 0, "SeedNoise.draw_many: count must be >= 0, got ", count);
  if (count == 0) {
    std::vector<int64_t> empty_shape{0, size()};
    empty_shape.insert(empty_shape.end(), shape_.begin(), shape_.end());
    return at::empty(empty_shape, at::TensorOptions().dtype(at::kFloat));
  }
  std::vector<at::Tensor> draws;
  draws.reserve(count);
  for (int64_t k = 0; k < count; ++k) {
    draws.push_back(draw());
  }
  return at::stack(draws);  // (count, N, *shape)
}

}  // namespace edm_fast
