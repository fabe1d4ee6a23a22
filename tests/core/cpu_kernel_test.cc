#include "core/cpu_kernel.h"

#include <fstream>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "gtest/gtest.h"

namespace mempipe {
namespace {

// The value of /proc/cpuinfo's first "<key>\t: value" line, or "" where there is none.
std::string CpuInfo(const std::string& key) {
  std::ifstream f("/proc/cpuinfo");
  for (std::string line; std::getline(f, line);) {
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string k = line.substr(0, colon);
    while (!k.empty() && (k.back() == '\t' || k.back() == ' ')) k.pop_back();
    if (k == key) {
      return std::string(absl::StripLeadingAsciiWhitespace(line.substr(colon + 1)));
    }
  }
  return "";
}

// CpuDescription's family and model, from CPUID, are the ones the kernel reports in
// /proc/cpuinfo (the display values: base plus extended family and model); a description that
// printed the base values alone (family 15 for every AMD CPU since 2011) fails. Its count is
// the process's logical CPUs.
TEST(CpuDescription, FamilyAndModelAreTheKernelsAndTheCountTheProcesss) {
  const std::string d = CpuDescription();
  EXPECT_NE(d.find(absl::StrCat(", ", std::thread::hardware_concurrency(), " logical CPUs")),
            std::string::npos)
      << d;
#if defined(__x86_64__) && defined(__linux__)
  const std::string family = CpuInfo("cpu family"), model = CpuInfo("model");
  if (family.empty() || model.empty()) GTEST_SKIP() << "no cpu family / model in /proc/cpuinfo";
  EXPECT_NE(d.find(absl::StrCat("(x86 family ", family, " model ", model, ")")), std::string::npos)
      << d << " vs /proc/cpuinfo family " << family << " model " << model;
  const std::string name = CpuInfo("model name");
  if (!name.empty()) {
    EXPECT_EQ(d.rfind(name, 0), 0u) << d << " vs model name " << name;
  }
#endif
}

}  // namespace
}  // namespace mempipe
