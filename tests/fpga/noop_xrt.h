// Points XRT at its noop shim for this test process (recipe in docs/FPGA-NOTES.md): a private
// directory whose `lib` links to Debian's XRT libraries as XILINX_XRT, XCL_EMULATION_MODE=noop,
// and an xrt.ini (through XRT_INI_PATH) setting the noop completion delay. Must run before the
// first XRT call of the process, since XRT reads its configuration once.
#ifndef MEMPIPE_TESTS_FPGA_NOOP_XRT_H_
#define MEMPIPE_TESTS_FPGA_NOOP_XRT_H_

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

namespace mempipe::testing {

inline void SetUpNoopXrt(int completion_delay_us) {
  namespace fs = std::filesystem;
  std::string dir = (fs::temp_directory_path() / "mempipe-xrt-XXXXXX").string();
  if (mkdtemp(dir.data()) == nullptr) std::abort();
  fs::create_directory_symlink("/usr/lib/x86_64-linux-gnu", fs::path(dir) / "lib");
  const std::string ini = (fs::path(dir) / "xrt.ini").string();
  std::ofstream(ini) << "[Runtime]\nnoop_completion_delay_us=" << completion_delay_us << "\n";
  setenv("XILINX_XRT", dir.c_str(), 1);
  setenv("XCL_EMULATION_MODE", "noop", 1);
  setenv("XRT_INI_PATH", ini.c_str(), 1);
}

}  // namespace mempipe::testing

#endif  // MEMPIPE_TESTS_FPGA_NOOP_XRT_H_
