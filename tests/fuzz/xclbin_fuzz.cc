// libFuzzer target: the xclbin writer's input (fpga/host/xclbin_writer.h).
//
// Oracle: a CU count outside [1, kMaxXclbinCus] is refused with a Status; an accepted one
// gives a container XRT itself parses (xrt::xclbin), with 2 x num_cus kernel instances, 32
// memories and a length that is a whole number of 4 KiB pages.
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "experimental/xrt_xclbin.h"
#include "fpga/host/xclbin_writer.h"
#include "tests/fuzz/fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  const int num_cus = mempipe::fuzz::SmallInt(in, -2, mempipe::kMaxXclbinCus);
  absl::StatusOr<std::vector<char>> x = mempipe::WriteMempipeXclbin(num_cus);
  if (num_cus < 1 || num_cus > mempipe::kMaxXclbinCus) {
    if (x.ok()) std::abort();
    return 0;
  }
  if (!x.ok() || x->size() % 4096 != 0) std::abort();
  // Parsing with XRT is the slow part: do it for a sample of the accepted inputs.
  if (in.ConsumeIntegralInRange<int>(0, 7) != 0) return 0;
  const xrt::xclbin parsed(*x);
  size_t instances = 0;
  for (const auto& k : parsed.get_kernels()) instances += k.get_cus().size();
  if (instances != 2u * num_cus || parsed.get_mems().size() != 32u) std::abort();
  return 0;
}
