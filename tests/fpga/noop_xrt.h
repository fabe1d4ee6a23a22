// Points XRT at its noop shim for this test process (recipe in docs/FPGA-NOTES.md): a private
// directory whose `lib` links to Debian's XRT libraries as XILINX_XRT, XCL_EMULATION_MODE=noop,
// and an xrt.ini (through XRT_INI_PATH) setting the noop completion delay. Must run before the
// first XRT call of the process, since XRT reads its configuration once. Returns the directory,
// for the caller to remove when the process is done with XRT.
#ifndef MEMPIPE_TESTS_FPGA_NOOP_XRT_H_
#define MEMPIPE_TESTS_FPGA_NOOP_XRT_H_

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "gtest/gtest.h"

namespace mempipe::testing {

inline std::string SetUpNoopXrt(int completion_delay_us) {
  namespace fs = std::filesystem;
  std::string dir = (fs::temp_directory_path() / "mempipe-xrt-XXXXXX").string();
  if (mkdtemp(dir.data()) == nullptr) std::abort();
  fs::create_directory_symlink("/usr/lib/x86_64-linux-gnu", fs::path(dir) / "lib");
  const std::string ini = (fs::path(dir) / "xrt.ini").string();
  std::ofstream(ini) << "[Runtime]\nnoop_completion_delay_us=" << completion_delay_us << "\n";
  setenv("XILINX_XRT", dir.c_str(), 1);
  setenv("XCL_EMULATION_MODE", "noop", 1);
  setenv("XRT_INI_PATH", ini.c_str(), 1);
  return dir;
}

// Sets up the noop shim before the tests of a binary and removes its directory after them.
class NoopXrtEnvironment : public ::testing::Environment {
 public:
  explicit NoopXrtEnvironment(int completion_delay_us) : delay_us_(completion_delay_us) {}
  void SetUp() override { dir_ = SetUpNoopXrt(delay_us_); }
  void TearDown() override { std::filesystem::remove_all(dir_); }

 private:
  int delay_us_;
  std::string dir_;
};

}  // namespace mempipe::testing

#endif  // MEMPIPE_TESTS_FPGA_NOOP_XRT_H_
