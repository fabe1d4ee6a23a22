#include "fpga/host/xclbin_writer.h"

#include <uuid/uuid.h>

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/types/span.h"
#include "fpga/hls/kernels.h"
#include "xclbin.h"

namespace mempipe {
namespace {

constexpr int kHbmBanks = 32;
constexpr uint64_t kHbmBankBytes = 512ull << 20;
constexpr uint64_t kCuBase = 0x1800000;  // AXI-lite address of the first CU
constexpr uint64_t kCuStride = 0x10000;  // 64 KB of registers per CU, as XRT assumes
// HLS control registers: 0x00 ap_ctrl, 0x04 GIE, 0x08 IER, 0x0C ISR; arguments from 0x10.
constexpr uint64_t kFirstArgOffset = 0x10;

struct KernelSpec {
  const char* name;
  absl::Span<const fpga_hls::KernelArg> args;
};

// AXI master port of a global argument: one per HLS bundle (kernels.h keeps args and bundles
// in the same order as the kernel's #pragma HLS interface lines).
std::string PortOf(const char* kernel, const fpga_hls::KernelArg& arg) {
  if (arg.kind == fpga_hls::ArgKind::kScalar) return "S_AXI_CONTROL";
  const std::string name = arg.name;
  if (std::strcmp(kernel, fpga_hls::kScoreTopkName) == 0) {
    return name == "digests" ? "M_AXI_GMEM_DG" : "M_AXI_GMEM_IO";
  }
  if (name == "digests_in") return "M_AXI_GMEM_DG_IN";
  if (name == "digests_out") return "M_AXI_GMEM_DG_OUT";
  return "M_AXI_GMEM_KEY";
}

std::string KernelXml(const KernelSpec& k, int num_cus, int first_cu_index) {
  std::string xml = absl::StrFormat(
      "      <kernel name=\"%s\" language=\"c\" vlnv=\"mempipe:hls:%s:1.0\" "
      "preferredWorkGroupSizeMultiple=\"0\" workGroupSize=\"1\" interrupt=\"true\" "
      "hwControlProtocol=\"ap_ctrl_hs\">\n"
      "        <port name=\"S_AXI_CONTROL\" mode=\"slave\" range=\"0x1000\" dataWidth=\"32\" "
      "portType=\"addressable\" base=\"0x0\"/>\n",
      k.name, k.name);
  std::vector<std::string> ports;
  for (const auto& a : k.args) {
    const std::string port = PortOf(k.name, a);
    if (a.kind == fpga_hls::ArgKind::kGlobal &&
        std::find(ports.begin(), ports.end(), port) == ports.end()) {
      ports.push_back(port);
      absl::StrAppendFormat(&xml,
                            "        <port name=\"%s\" mode=\"master\" "
                            "range=\"0xFFFFFFFFFFFFFFFF\" dataWidth=\"%d\" "
                            "portType=\"addressable\" base=\"0x0\"/>\n",
                            port, a.type[0] == 'a' ? 512 : 32);
    }
  }
  uint64_t offset = kFirstArgOffset;
  for (size_t i = 0; i < k.args.size(); ++i) {
    const auto& a = k.args[i];
    absl::StrAppendFormat(&xml,
                          "        <arg name=\"%s\" addressQualifier=\"%d\" id=\"%d\" port=\"%s\" "
                          "size=\"0x%x\" offset=\"0x%x\" hostOffset=\"0x0\" hostSize=\"0x%x\" "
                          "type=\"%s\"/>\n",
                          a.name, a.kind == fpga_hls::ArgKind::kGlobal ? 1 : 0, i,
                          PortOf(k.name, a), a.size, offset, a.size, a.type);
    offset += a.size == 8 ? 0xC : 0x8;  // HLS leaves a reserved word after each 64-bit pointer
  }
  for (int cu = 0; cu < num_cus; ++cu) {
    absl::StrAppendFormat(&xml,
                          "        <instance name=\"%s\">\n"
                          "          <addrRemap base=\"0x%x\" port=\"S_AXI_CONTROL\"/>\n"
                          "        </instance>\n",
                          CuInstanceName(k.name, cu), kCuBase + (first_cu_index + cu) * kCuStride);
  }
  xml += "      </kernel>\n";
  return xml;
}

template <typename T>
void Append(std::vector<char>& out, const T& v) {
  const size_t at = out.size();
  out.resize(at + sizeof(T));
  std::memcpy(out.data() + at, &v, sizeof(T));
}

}  // namespace

std::string CuInstanceName(const char* kernel, int cu) { return absl::StrCat(kernel, "_", cu); }

std::string CuKernelSelector(const char* kernel, int cu) {
  return absl::StrCat(kernel, ":{", CuInstanceName(kernel, cu), "}");
}

absl::StatusOr<std::vector<char>> WriteMempipeXclbin(int num_cus) {
  if (num_cus < 1 || num_cus > kMaxXclbinCus) {
    return absl::InvalidArgumentError(
        absl::StrCat("the xclbin's num_cus must be in [1, ", kMaxXclbinCus, "], got ", num_cus));
  }
  const KernelSpec kernels[] = {
      {fpga_hls::kScoreTopkName, fpga_hls::kScoreTopkArgs},
      {fpga_hls::kDigestUpdateName, fpga_hls::kDigestUpdateArgs},
  };

  // MEM_TOPOLOGY: HBM[0..31].
  std::vector<char> mem;
  Append(mem, static_cast<int32_t>(kHbmBanks));
  Append(mem, static_cast<int32_t>(0));  // padding: m_mem_data is 8-byte aligned
  for (int b = 0; b < kHbmBanks; ++b) {
    mem_data md{};
    md.m_type = MEM_HBM;
    md.m_used = 1;
    md.m_size = kHbmBankBytes / 1024;  // in KB
    md.m_base_address = b * kHbmBankBytes;
    // "HBM[31]" at most; md is zeroed, so the tag stays terminated.
    const std::string tag = absl::StrCat("HBM[", b, "]");
    std::memcpy(md.m_tag, tag.data(), std::min(tag.size(), sizeof(md.m_tag) - 1));
    Append(mem, md);
  }

  // IP_LAYOUT and CONNECTIVITY: CU i of each kernel, all its global args on HBM[i].
  std::vector<char> ips, conns;
  std::vector<connection> links;
  Append(ips, static_cast<int32_t>(num_cus * 2));
  Append(ips, static_cast<int32_t>(0));  // padding: m_ip_data is 8-byte aligned
  int ip_index = 0;
  std::string kernels_xml;
  for (const KernelSpec& k : kernels) {
    kernels_xml += KernelXml(k, num_cus, ip_index);
    for (int cu = 0; cu < num_cus; ++cu, ++ip_index) {
      ip_data ip{};
      ip.m_type = IP_KERNEL;
      ip.properties = IP_INT_ENABLE_MASK | (AP_CTRL_HS << IP_CONTROL_SHIFT);
      ip.m_base_address = kCuBase + ip_index * kCuStride;
      std::snprintf(reinterpret_cast<char*>(ip.m_name), sizeof(ip.m_name), "%s:%s", k.name,
                    CuInstanceName(k.name, cu).c_str());
      Append(ips, ip);
      for (size_t a = 0; a < k.args.size(); ++a) {
        if (k.args[a].kind != fpga_hls::ArgKind::kGlobal) continue;
        links.push_back(connection{static_cast<int32_t>(a), ip_index, cu % kHbmBanks});
      }
    }
  }
  Append(conns, static_cast<int32_t>(links.size()));
  for (const connection& c : links) Append(conns, c);

  const std::string xml = absl::StrCat(
      "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
      "<project name=\"mempipe\">\n"
      "  <platform vendor=\"xilinx\" boardid=\"u55c\" name=\"",
      kU55cPlatformVbnv,
      "\" featureRomTime=\"0\">\n"
      "    <version major=\"1\" minor=\"0\"/>\n"
      "    <device name=\"fpga0\" fpgaDevice=\"virtexuplus:xcu55c:fsvh2892:-2L:e\" "
      "addrWidth=\"0\">\n"
      "      <core name=\"OCL_REGION_0\" target=\"bitstream\" type=\"clc_region\" "
      "clockFreq=\"300MHz\" numComputeUnits=\"",
      num_cus * 2, "\">\n", kernels_xml,
      "      </core>\n"
      "    </device>\n"
      "  </platform>\n"
      "</project>\n");
  std::vector<char> meta(xml.begin(), xml.end());
  meta.push_back('\0');

  struct Section {
    axlf_section_kind kind;
    const char* name;
    const std::vector<char>* data;
  };
  const Section sections[] = {
      {MEM_TOPOLOGY, "mem_topology", &mem},
      {IP_LAYOUT, "ip_layout", &ips},
      {CONNECTIVITY, "connectivity", &conns},
      {EMBEDDED_METADATA, "metadata", &meta},
  };
  constexpr int kNumSections = 4;
  const size_t header_bytes = sizeof(axlf) + (kNumSections - 1) * sizeof(axlf_section_header);
  std::vector<char> out(header_bytes, 0);
  std::vector<axlf_section_header> headers;
  for (const Section& s : sections) {
    while (out.size() % 8 != 0) out.push_back(0);
    axlf_section_header h{};
    h.m_sectionKind = s.kind;
    std::snprintf(h.m_sectionName, sizeof(h.m_sectionName), "%s", s.name);
    h.m_sectionOffset = out.size();
    h.m_sectionSize = s.data->size();
    headers.push_back(h);
    out.insert(out.end(), s.data->begin(), s.data->end());
  }

  // XRT copies the container with aligned_alloc(4096, size), which C requires to be a multiple
  // of the alignment (AddressSanitizer enforces it): pad the container to whole pages.
  out.resize((out.size() + 4095) / 4096 * 4096, 0);

  axlf top{};
  std::memcpy(top.m_magic, "xclbin2", 8);
  top.m_signature_length = -1;
  std::memset(top.reserved, 0xFF, sizeof(top.reserved));
  std::memset(top.m_keyBlock, 0xFF, sizeof(top.m_keyBlock));
  top.m_uniqueId = static_cast<uint64_t>(std::time(nullptr));
  top.m_header.m_length = out.size();
  top.m_header.m_timeStamp = static_cast<uint64_t>(std::time(nullptr));
  top.m_header.m_versionMajor = 2;
  top.m_header.m_versionMinor = 13;
  top.m_header.m_mode = XCLBIN_FLAT;
  std::snprintf(reinterpret_cast<char*>(top.m_header.m_platformVBNV),
                sizeof(top.m_header.m_platformVBNV), "%s", kU55cPlatformVbnv);
  uuid_generate(top.m_header.uuid);
  top.m_header.m_numSections = kNumSections;
  std::memcpy(out.data(), &top, offsetof(axlf, m_sections));
  std::memcpy(out.data() + offsetof(axlf, m_sections), headers.data(),
              kNumSections * sizeof(axlf_section_header));
  return out;
}

}  // namespace mempipe
