// mempipe fpga: writes the project's own xclbin, the `axlf` container that describes its kernels.
//
// Debian ships XRT without Vitis or xclbinutil, so the project builds the container itself from
// the structs of <xrt/xclbin.h>: MEM_TOPOLOGY (32 HBM pseudo-channels of 512 MB), IP_LAYOUT
// (`num_cus` compute units of each kernel, AP_CTRL_HS), CONNECTIVITY (every global argument of CU
// i on HBM[i], as fpga/hls/u55c_connectivity.cfg asks v++ for) and EMBEDDED_METADATA (the kernel
// XML with every argument of fpga/hls/kernels.h). It carries no bitstream: XRT's noop shim loads
// it and exercises the full host path; a real card needs the v++-built xclbin (fpga/README.md).
//
//   MEMPIPE_ASSIGN_OR_RETURN(std::vector<char> xclbin, WriteMempipeXclbin(32));
//   xrt::xclbin x(xclbin);
#ifndef MEMPIPE_FPGA_HOST_XCLBIN_WRITER_H_
#define MEMPIPE_FPGA_HOST_XCLBIN_WRITER_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace mempipe {

// Platform the container names (UG1120), and the CU instance names XRT addresses them by.
inline constexpr char kU55cPlatformVbnv[] = "xilinx_u55c_gen3x16_xdma_3_202210_1";
std::string CuInstanceName(const char* kernel, int cu);  // "mempipe_score_topk_3"
std::string CuKernelSelector(const char* kernel,
                             int cu);  // "mempipe_score_topk:{mempipe_score_topk_3}"

// Compute units per kernel the container can describe: one per HBM pseudo-channel.
inline constexpr int kMaxXclbinCus = 32;

// The whole xclbin, `num_cus` compute units of each kernel, CU i wired to HBM[i].
// Errors: InvalidArgument naming num_cus unless it is in [1, kMaxXclbinCus].
absl::StatusOr<std::vector<char>> WriteMempipeXclbin(int num_cus);

}  // namespace mempipe

#endif  // MEMPIPE_FPGA_HOST_XCLBIN_WRITER_H_
