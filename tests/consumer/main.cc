// Downstream use of the installed mempipe package: parse a placement, get the CPU selector from
// the registry, and check a paged cache view, through mempipe::backend and what it brings in.
// Exits 0 and prints "mempipe consumer: OK" when everything behaves; 1 naming what did not.
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "backend/placement.h"
#include "backend/policy.h"
#include "backend/selector_registry.h"
#include "core/paged_kv.h"

namespace {

int Fail(const std::string& what) {
  std::fprintf(stderr, "mempipe consumer: %s\n", what.c_str());
  return 1;
}

}  // namespace

int main() {
  using namespace mempipe;  // NOLINT: a tiny program
  absl::StatusOr<Placement> placement = ParsePlacement("cpu");
  if (!placement.ok()) return Fail(std::string(placement.status().message()));
  if (ParsePlacement("tpu").ok()) return Fail("ParsePlacement accepted 'tpu'");

  absl::StatusOr<std::unique_ptr<PageSelector>> selector = MakePageSelector(Device::kCpu);
  if (!selector.ok()) return Fail(std::string(selector.status().message()));
  const CacheShape shape{DType::kBFloat16, 64, 16, 2, 128};
  if (absl::Status s = (*selector)->AddLayer(0, shape); !s.ok()) {
    return Fail(std::string(s.message()));
  }

  std::vector<uint16_t> kv(2 * 64 * 16 * 2 * 128);
  KvCacheView cache{kv.data(), DType::kBFloat16, 64, 16, 2, 128};
  if (!ValidateKvCache(cache).ok()) return Fail("a valid cache was rejected");
  cache.block_size = 24;
  if (ValidateKvCache(cache).ok()) return Fail("block_size 24 was accepted");

  SparsityPolicy policy;
  policy.dense_layers = 2;
  if (!IsDenseLayer(policy, 1) || IsDenseLayer(policy, 2)) return Fail("dense-layers rule");

  std::printf("mempipe consumer: OK (selector '%s')\n", std::string((*selector)->Name()).c_str());
  return 0;
}
