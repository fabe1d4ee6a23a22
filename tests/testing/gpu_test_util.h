// mempipe tests: what every GPU test shares -- the skip-is-failure switch and device buffers
// filled from and read back into host vectors (the test fails on any copy error).
//
//   TEST(MyGpu, Thing) {
//     MEMPIPE_SKIP_WITHOUT_GPU("GPU kernel test");
//     DeviceBuffer d = testing::Upload(host_vector);
//     std::vector<float> back = testing::Download<float>(d, n);
//   }
#ifndef MEMPIPE_TESTS_TESTING_GPU_TEST_UTIL_H_
#define MEMPIPE_TESTS_TESTING_GPU_TEST_UTIL_H_

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/gpu/gpu_runtime.h"
#include "gtest/gtest.h"

namespace mempipe::testing {

// MEMPIPE_REQUIRE_GPU=1 (every run on a GPU machine) turns a missing device into a failure,
// so that a broken driver or a hidden device cannot pass as "skipped".
inline bool GpuRequired() {
  const char* v = std::getenv("MEMPIPE_REQUIRE_GPU");
  return v != nullptr && std::string(v) == "1";
}

// Uploads host bytes (at least 16 bytes are allocated).
inline DeviceBuffer Upload(const void* src, size_t bytes) {
  absl::StatusOr<DeviceBuffer> b = DeviceBuffer::Allocate(std::max<size_t>(bytes, 16));
  EXPECT_TRUE(b.ok()) << b.status();
  EXPECT_TRUE(b->CopyFromHost(src, bytes).ok());
  return std::move(*b);
}

template <typename T>
DeviceBuffer Upload(const std::vector<T>& v) {
  return Upload(v.data(), v.size() * sizeof(T));
}

template <typename T>
std::vector<T> Download(const DeviceBuffer& b, size_t n) {
  std::vector<T> v(n);
  const absl::Status s = b.CopyToHost(v.data(), n * sizeof(T));
  EXPECT_TRUE(s.ok()) << s;
  return v;
}

}  // namespace mempipe::testing

// Skips the test without a GPU device, or fails it when MEMPIPE_REQUIRE_GPU=1.
#define MEMPIPE_SKIP_WITHOUT_GPU(what)                                     \
  do {                                                                     \
    if (::mempipe::GpuDeviceCount() == 0) {                                \
      if (::mempipe::testing::GpuRequired())                               \
        FAIL() << "no GPU device, and MEMPIPE_REQUIRE_GPU=1 requires one"; \
      GTEST_SKIP() << "no GPU device: " << (what) << " skipped";           \
    }                                                                      \
  } while (0)

#endif  // MEMPIPE_TESTS_TESTING_GPU_TEST_UTIL_H_
