// The XRT host runtime on XRT's noop shim: device open, the project's xclbin, buffer placement,
// argument binding, run/wait, and error mapping. Kernels compute nothing on noop, so these tests
// check plumbing only, never selections.
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "experimental/xrt_xclbin.h"
#include "fpga/device_layout.h"
#include "fpga/fpga_selector.h"
#include "fpga/hls/kernels.h"
#include "fpga/host/xclbin_writer.h"
#include "fpga/host/xrt_selector.h"
#include "gtest/gtest.h"
#include "tests/fpga/noop_xrt.h"
#include "tests/fpga/test_data.h"

namespace mempipe {
namespace {

const auto* const kEnv =
    ::testing::AddGlobalTestEnvironment(new testing::NoopXrtEnvironment(/*completion_delay_us=*/0));

FpgaOptions XrtOptions() {
  FpgaOptions o;
  o.backend = FpgaBackend::kXrt;
  return o;
}

TEST(XclbinWriter, DescribesKernelsMemoriesAndArguments) {
  const xrt::xclbin x(*WriteMempipeXclbin(8));
  EXPECT_EQ(x.get_xsa_name(), kU55cPlatformVbnv);
  const auto mems = x.get_mems();
  ASSERT_EQ(mems.size(), 32u);
  for (size_t i = 0; i < mems.size(); ++i) {
    EXPECT_EQ(mems[i].get_tag(), "HBM[" + std::to_string(i) + "]");
    EXPECT_EQ(mems[i].get_size_kb(), 512u * 1024);
  }
  std::set<std::string> names;
  for (const xrt::xclbin::kernel& k : x.get_kernels()) {
    names.insert(k.get_name());
    EXPECT_EQ(k.get_cus().size(), 8u) << k.get_name();
    const auto& want =
        k.get_name() == fpga_hls::kScoreTopkName
            ? std::vector<fpga_hls::KernelArg>(std::begin(fpga_hls::kScoreTopkArgs),
                                               std::end(fpga_hls::kScoreTopkArgs))
            : std::vector<fpga_hls::KernelArg>(std::begin(fpga_hls::kDigestUpdateArgs),
                                               std::end(fpga_hls::kDigestUpdateArgs));
    ASSERT_EQ(k.get_num_args(), want.size()) << k.get_name();
    for (size_t a = 0; a < want.size(); ++a) {
      const auto arg = k.get_arg(a);
      EXPECT_EQ(arg.get_name(), want[a].name);
      EXPECT_EQ(arg.get_size(), static_cast<uint64_t>(want[a].size));
    }
    // Each CU's global arguments connect to exactly one memory: CU i's to HBM[i].
    for (const xrt::xclbin::ip& cu : k.get_cus()) {
      const std::string name = cu.get_name();
      const int index = std::stoi(name.substr(name.rfind('_') + 1));
      for (size_t a = 0; a < want.size(); ++a) {
        if (want[a].kind != fpga_hls::ArgKind::kGlobal) continue;
        const auto cu_mems = cu.get_arg(static_cast<int32_t>(a)).get_mems();
        ASSERT_EQ(cu_mems.size(), 1u) << name << " arg " << want[a].name;
        EXPECT_EQ(cu_mems[0].get_tag(), "HBM[" + std::to_string(index) + "]") << name;
      }
    }
  }
  EXPECT_EQ(names, (std::set<std::string>{fpga_hls::kScoreTopkName, fpga_hls::kDigestUpdateName}));
}

// The v++ connectivity file and the xclbin the project writes describe the same wiring.
TEST(XclbinWriter, AgreesWithTheVppConnectivityFile) {
  std::ifstream cfg(MEMPIPE_SOURCE_DIR "/fpga/hls/u55c_connectivity.cfg");
  ASSERT_TRUE(cfg.good());
  std::map<std::string, std::string> want;  // "cu.arg" -> "HBM[i]"
  for (std::string line; std::getline(cfg, line);) {
    if (line.rfind("sp=", 0) != 0) continue;
    const size_t colon = line.find(':');
    want[line.substr(3, colon - 3)] = line.substr(colon + 1);
  }
  const xrt::xclbin x(*WriteMempipeXclbin(32));
  std::map<std::string, std::string> got;
  for (const xrt::xclbin::kernel& k : x.get_kernels()) {
    for (const xrt::xclbin::ip& cu : k.get_cus()) {
      const std::string name = cu.get_name();
      const std::string inst = name.substr(name.find(':') + 1);
      for (size_t a = 0; a < cu.get_num_args(); ++a) {
        const auto arg = cu.get_arg(static_cast<int32_t>(a));
        const auto mems = arg.get_mems();
        if (mems.empty()) continue;  // scalars
        got[inst + "." + arg.get_name()] = mems[0].get_tag();
      }
    }
  }
  EXPECT_EQ(got.size(), 32u * 10);
  EXPECT_EQ(got, want);
}

TEST(XrtSelector, OpensDeviceAndLoadsProjectXclbin) {
  auto sel = MakeFpgaSelector(XrtOptions());
  ASSERT_TRUE(sel.ok()) << sel.status();
  EXPECT_EQ((*sel)->Name(), "fpga-xrt");
}

TEST(XrtSelector, DigestBuffersLiveInTheirCusBank) {
  auto sel = XrtPageSelector::Open(XrtOptions());
  ASSERT_TRUE(sel.ok()) << sel.status();
  const CacheShape shape{DType::kFloat16, 64, 16, 8, 128};
  for (int layer : {0, 3, 5}) {
    ASSERT_TRUE((*sel)->AddLayer(layer, shape).ok());
    std::set<int> banks;
    for (int h = 0; h < shape.num_kv_heads; ++h) {
      const int cu = CuFor(layer, h, shape.num_kv_heads, (*sel)->num_cus());
      auto bank = (*sel)->DigestBank(layer, h);
      ASSERT_TRUE(bank.ok()) << bank.status();
      EXPECT_EQ(*bank, cu) << "layer " << layer << " head " << h;
      banks.insert(*bank);
    }
    EXPECT_EQ(banks.size(), 8u) << "a layer's KV heads sit on distinct pseudo-channels";
  }
  for (int cu = 0; cu < (*sel)->num_cus(); ++cu) {
    for (size_t a = 0; a < std::size(fpga_hls::kScoreTopkArgs); ++a) {
      if (fpga_hls::kScoreTopkArgs[a].kind != fpga_hls::ArgKind::kGlobal) continue;
      auto bank = (*sel)->ScoreCuBank(cu, static_cast<int>(a));
      ASSERT_TRUE(bank.ok()) << bank.status();
      EXPECT_EQ(*bank, cu) << "cu " << cu << " arg " << a;
    }
  }
}

TEST(XrtSelector, BuildAppendSubmitWaitRunOnTheShim) {
  std::mt19937_64 rng(testing::FreshSeed("XrtSelector.BuildAppendSubmitWaitRunOnTheShim"));
  auto sel = XrtPageSelector::Open(XrtOptions());
  ASSERT_TRUE(sel.ok()) << sel.status();
  testing::Batch b =
      testing::MakeBatch(rng, DType::kBFloat16, 16, 2, 128, 4, {700, 300, 1000}, 0, false);
  ASSERT_TRUE((*sel)->AddLayer(1, {b.dtype, b.num_blocks, 16, 2, 128}).ok());
  ASSERT_TRUE((*sel)->BuildDigests(1, b.Cache(), b.Table()).ok());
  EXPECT_GT((*sel)->Costs().host_ms, 0.0);
  const int64_t slots[] = {static_cast<int64_t>(b.table[0]) * 16 + 3};  // a page's 4th token
  std::vector<uint8_t> key(2 * 128 * 2, 0);
  ASSERT_TRUE((*sel)->AppendKeys(1, slots, 1, key.data()).ok());

  SelectionConfig config;
  config.budget_tokens = 16 * 8;
  std::vector<int32_t> pages(3 * 2 * 8), counts(3 * 2);
  const SelectRequest req{1, b.Query(), b.Table(), config,
                          SelectionView{pages.data(), counts.data(), 3, 2, 8}};
  size_t pairs_after_first_step = 0;
  for (int step = 0; step < 3; ++step) {
    auto ticket = (*sel)->Submit(req);
    ASSERT_TRUE(ticket.ok()) << ticket.status();
    ASSERT_TRUE((*sel)->Wait(*ticket, absl::Now() + absl::Seconds(10)).ok());
    const SelectorCosts c = (*sel)->Costs();
    EXPECT_GT(c.host_ms, 0.0);
    EXPECT_FALSE(c.modeled_device_ms.has_value()) << "the XRT path reports measured costs only";
    if (step == 0) pairs_after_first_step = (*sel)->io_pairs_allocated();
  }
  // Later steps reuse the first step's buffers (one pair per KV head, plus the update's).
  EXPECT_EQ((*sel)->io_pairs_allocated(), pairs_after_first_step);
  EXPECT_EQ(pairs_after_first_step, 4u);
}

// An int8-digest layer (CacheShape::digest_format) takes the same XRT path: its slices hold the
// int8 records plus the exact rows (fpga/hls/kernel_common.h), and build, append and select run.
TEST(XrtSelector, Int8LayerRunsOnTheShim) {
  std::mt19937_64 rng(testing::FreshSeed("XrtSelector.Int8LayerRunsOnTheShim"));
  auto sel = XrtPageSelector::Open(XrtOptions());
  ASSERT_TRUE(sel.ok()) << sel.status();
  testing::Batch b = testing::MakeBatch(rng, DType::kBFloat16, 16, 2, 128, 4, {500, 900}, 0, false);
  CacheShape shape{b.dtype, b.num_blocks, 16, 2, 128};
  shape.digest_format = DigestFormat::kInt8;
  EXPECT_EQ(HeadSliceWords(shape), static_cast<size_t>(b.num_blocks) * 13);  // 5 + 8 words
  ASSERT_TRUE((*sel)->AddLayer(2, shape).ok());
  ASSERT_TRUE((*sel)->BuildDigests(2, b.Cache(), b.Table()).ok());
  const int64_t slots[] = {static_cast<int64_t>(b.table[0]) * 16 + 5};
  std::vector<uint8_t> key(2 * 128 * 2, 0);
  ASSERT_TRUE((*sel)->AppendKeys(2, slots, 1, key.data()).ok());
  SelectionConfig config;
  config.budget_tokens = 16 * 8;
  std::vector<int32_t> pages(2 * 2 * 8), counts(2 * 2);
  auto ticket = (*sel)->Submit(
      {2, b.Query(), b.Table(), config, SelectionView{pages.data(), counts.data(), 2, 2, 8}});
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  ASSERT_TRUE((*sel)->Wait(*ticket, absl::Now() + absl::Seconds(10)).ok());
}

TEST(XrtSelector, ErrorsBecomeStatuses) {
  FpgaOptions o = XrtOptions();
  o.xclbin_path = "/nonexistent/mempipe.xclbin";
  auto missing = MakeFpgaSelector(o);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInternal);
  EXPECT_NE(missing.status().message().find("/nonexistent/mempipe.xclbin"), std::string::npos)
      << missing.status();

  o = XrtOptions();
  o.params.num_cus = 33;
  auto too_many = MakeFpgaSelector(o);
  EXPECT_EQ(too_many.status().code(), absl::StatusCode::kInvalidArgument) << too_many.status();

  auto sel = XrtPageSelector::Open(XrtOptions());
  ASSERT_TRUE(sel.ok()) << sel.status();
  EXPECT_EQ((*sel)->Wait(42, absl::InfiniteFuture()).code(), absl::StatusCode::kNotFound);
  const CacheShape shape{DType::kFloat32, 16, 16, 1, 64};
  ASSERT_TRUE((*sel)->AddLayer(0, shape).ok());
  EXPECT_EQ((*sel)->AddLayer(0, shape).code(), absl::StatusCode::kAlreadyExists);
  const int64_t bad_slot[] = {16 * 16};
  float key[64] = {};
  const absl::Status s = (*sel)->AppendKeys(0, bad_slot, 1, key);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("256"), std::string::npos) << s;
}

}  // namespace
}  // namespace mempipe
