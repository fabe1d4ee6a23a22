// Where a small sparse layer's time goes at many threads (README.md): SmolLM2's layer (4 x 6K
// tokens, 3 KV / 9 query heads of 64, pages of 32, budget 512, page_kt, as
// mempipe-cpu-kernel-bench's SMOL shape) over LAYERS layers in turn (from DRAM), with each
// task's start and end taken on its own thread, relative to the call's start:
//   meet    HostParallelFor of T tasks that only wait for each other (the dispatch per worker)
//   scan    ComputeRelevancyThen, each row's end (the thread that finished the row's last chunk)
//   attn    HostParallelFor of one SparseDecodeRows row per task, over the bench's random
//           selection (the attention alone, one row a task, as the fused layer attends)
//   attn1   one row alone on the calling thread (the same rows, no other thread busy)
//   layer   HostSparseLayer's fused call rebuilt here: ScoreAndSelectThen, and in its callback
//           SparseDecodeRows; each row's callback start (scanned and selected) and end (attended)
//   real    HostSparseLayer itself (its wall time only, to show the rebuild is the same call)
// Prints per phase the median over the calls of: the call's wall time, the first and last task
// start, the median task's duration, the last task's end; writes every event to EVENTS (csv).
// Built (one command line) from a Release build in build/rel:
//   g++ -O2 -std=c++17 -I. integration/bench/results/layer_timeline/layer_timeline.cc
//     build/rel/backend/libmempipe_backend.a build/rel/attention/libmempipe_attention.a
//     build/rel/retriever/libmempipe_retriever.a build/rel/core/libmempipe_core.a
//     -o /tmp/layer_timeline $(ls /usr/lib/x86_64-linux-gnu/libabsl_*.so |
//     sed 's/.*lib\(absl_[a-z0-9_]*\)\.so/-l\1/') -lpthread
//   [PHASE=name] /tmp/layer_timeline THREADS bf16|fp32 [LAYERS] [PASSES] [EVENTS.csv]
#include <sys/mman.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "attention/decode.h"
#include "backend/host_sparse_layer.h"
#include "core/dtype.h"
#include "core/host_parallel_runtime.h"
#include "core/paged_kv.h"
#include "core/thread_pool.h"
#include "retriever/digest.h"
#include "retriever/relevancy.h"
#include "retriever/select.h"
using namespace mempipe;

namespace {
inline double NowUs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}
std::atomic<int> next_thread{0};
int ThreadIndex() {
  thread_local int id = next_thread.fetch_add(1);
  return id;
}
struct Event {
  int phase, call, thread, row;
  double start, end;  // us after the call's start
};
struct Calls {
  std::vector<double> wall, first_start, last_start, mid_dur, last_end;
};
double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}
void* Map(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    std::perror("mmap");
    std::exit(1);
  }
  madvise(p, bytes, MADV_HUGEPAGE);
  return p;
}
void Check(const absl::Status& s) {
  if (!s.ok()) {
    std::fprintf(stderr, "layer_timeline: %s\n", std::string(s.message()).c_str());
    std::exit(1);
  }
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: layer_timeline THREADS bf16|fp32 [LAYERS] [PASSES] [EVENTS]\n");
    return 2;
  }
  const int threads = std::atoi(argv[1]);
  const DType dt = std::strcmp(argv[2], "fp32") == 0 ? DType::kFloat32 : DType::kBFloat16;
  const int layers = argc > 3 ? std::atoi(argv[3]) : 64;
  const int passes = argc > 4 ? std::atoi(argv[4]) : 5;
  const char* events_path = argc > 5 ? argv[5] : nullptr;
  if (threads < 1 || layers < 1 || passes < 1) {
    std::fprintf(stderr, "layer_timeline: THREADS, LAYERS and PASSES must be >= 1\n");
    return 2;
  }
  const int seqs = 4, kv = 3, heads = 9, d = 64, bs = 32, ctx = 6144, pages = ctx / bs;
  const int k = 512 / bs, rows = seqs * kv;
  KvCacheView cache{nullptr, dt, seqs * pages, bs, kv, d, KvLayout::kPageMajorKT};
  DigestView digest{nullptr, dt, seqs * pages, kv, d};
  std::mt19937_64 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<char*> kv_mem(layers), dg_mem(layers);
  for (int l = 0; l < layers; ++l) {
    kv_mem[l] = static_cast<char*>(Map(cache.NumBytes()));
    dg_mem[l] = static_cast<char*>(Map(digest.NumBytes()));
    for (size_t i = 0; i < cache.NumElems(); ++i) {
      StoreFromFloat(kv_mem[l], dt, i, static_cast<float>(i % 13) * 0.1f - 0.6f);
    }
    for (size_t i = 0; i < digest.NumElems(); ++i) StoreFromFloat(dg_mem[l], dt, i, normal(rng));
  }
  std::vector<int32_t> table(static_cast<size_t>(seqs) * pages);
  std::iota(table.begin(), table.end(), 0);
  const std::vector<int32_t> lens(seqs, ctx);
  const BlockTableView tv{table.data(), lens.data(), seqs, pages};
  std::vector<uint8_t> q(static_cast<size_t>(seqs) * heads * d * 4), out(q.size());
  for (int i = 0; i < seqs * heads * d; ++i) StoreFromFloat(q.data(), dt, i, normal(rng));
  std::vector<int32_t> selected(static_cast<size_t>(rows) * k), counts(rows, k);
  for (int r = 0; r < rows; ++r) {
    std::vector<int32_t> middle(pages - 2);
    std::iota(middle.begin(), middle.end(), 1);
    std::shuffle(middle.begin(), middle.end(), rng);
    middle.resize(k - 2);
    middle.push_back(0);
    middle.push_back(pages - 1);
    std::sort(middle.begin(), middle.end());
    std::copy(middle.begin(), middle.end(), &selected[static_cast<size_t>(r) * k]);
  }
  const PageList random_list{selected.data(), counts.data(), kv, k};
  std::vector<float> scores(static_cast<size_t>(rows) * pages);
  std::vector<int32_t> sel_pages(static_cast<size_t>(rows) * k), sel_counts(rows);
  SelectionConfig config;
  config.budget_tokens = k * bs;
  const SelectionView sel{sel_pages.data(), sel_counts.data(), seqs, kv, k};
  const PageList sel_list{sel.pages, sel.counts, kv, k};
  const DecodeIo io{q.data(), out.data(), dt, seqs, heads, d, threads};
  const DecodeIo io1{q.data(), out.data(), dt, seqs, heads, d, 1};
  const QueryView qv{q.data(), dt, seqs, heads, d};
  const float scale = 0.125f;
  if (!HostSparseLayerFused(config, bs)) {
    std::fprintf(stderr, "layer_timeline: the layer is not fused at this shape\n");
    return 1;
  }

  enum { kMeet, kScan, kAttn, kAttn1, kLayer, kReal, kPhases };
  const char* names[kPhases] = {"meet", "scan", "attn", "attn1", "layer", "real"};
  std::vector<Event> events;
  std::mutex mu;
  Calls calls[kPhases];
  int call_no = 0;
  // One call of phase p: body(t0, record) runs it; record(row, start, end) is called by the
  // tasks (absolute times), on their own threads.
  auto run = [&](int phase, auto body) {
    // A slot per event, claimed with one atomic add (no lock on the tasks' path).
    std::vector<Event> ev(256);
    std::atomic<int> used{0};
    auto record = [&](int row, double s, double e) {
      const int i = used.fetch_add(1, std::memory_order_relaxed);
      if (i < static_cast<int>(ev.size())) ev[i] = {phase, call_no, ThreadIndex(), row, s, e};
    };
    const double t0 = NowUs();
    body(record);
    const double t1 = NowUs();
    ev.resize(std::min<int>(used.load(), ev.size()));
    Calls& c = calls[phase];
    c.wall.push_back(t1 - t0);
    if (!ev.empty()) {
      double fs = 1e300, ls = -1e300, le = -1e300;
      std::vector<double> durs;
      for (Event& e : ev) {
        e.start -= t0;
        e.end -= t0;
        fs = std::min(fs, e.start);
        ls = std::max(ls, e.start);
        le = std::max(le, e.end);
        durs.push_back(e.end - e.start);
      }
      c.first_start.push_back(fs);
      c.last_start.push_back(ls);
      c.mid_dur.push_back(Median(durs));
      c.last_end.push_back(le);
    }
    std::lock_guard<std::mutex> lock(mu);
    events.insert(events.end(), ev.begin(), ev.end());
    ++call_no;
  };
  // Every thread meets once, untimed, so that each phase's first call finds them awake.
  auto meet = [&](auto record) {
    std::atomic<int> arrived{0};
    HostParallelFor(threads, threads, [&](int t) {
      const double s = NowUs();
      arrived.fetch_add(1);
      while (arrived.load() < threads && NowUs() - s < 1000) {
      }
      record(t, s, NowUs());
    });
  };
  auto noop = [](int, double, double) {};
  const char* only = std::getenv("PHASE");  // one phase alone (for a profile), or all
  for (int pass = 0; pass < passes; ++pass) {
    std::fprintf(stderr, "[pass] %d/%d\n", pass + 1, passes);
    for (int phase = 0; phase < kPhases; ++phase) {
      if (only != nullptr && std::strcmp(only, names[phase]) != 0) continue;
      meet(noop);
      for (int l = 0; l < layers; ++l) {
        cache.data = kv_mem[l];
        digest.data = dg_mem[l];
        switch (phase) {
          case kMeet:
            run(phase, meet);
            break;
          case kScan:
            run(phase, [&](auto record) {
              const double s = NowUs();
              Check(ComputeRelevancyThen(qv, cache, digest, tv, config.aggregation, scores.data(),
                                         threads, [&](int64_t first, int64_t last) {
                                           record(static_cast<int>(first), s, NowUs());
                                           (void)last;
                                         }));
            });
            break;
          case kAttn:
            run(phase, [&](auto record) {
              HostParallelFor(rows, std::min(threads, rows), [&](int r) {
                const double s = NowUs();
                Check(SparseDecodeRows(io, cache, tv, random_list, scale, r, r + 1));
                record(r, s, NowUs());
              });
            });
            break;
          case kAttn1:  // one row per call, rows in turn: l picks the row
            run(phase, [&](auto record) {
              const int r = l % rows;
              const double s = NowUs();
              Check(SparseDecodeRows(io1, cache, tv, random_list, scale, r, r + 1));
              record(r, s, NowUs());
            });
            break;
          case kLayer:
            run(phase, [&](auto record) {
              Check(ScoreAndSelectThen(
                  qv, cache, digest, tv, config, sel, threads, [&](int64_t first, int64_t last) {
                    const double s = NowUs();
                    Check(SparseDecodeRows(io, cache, tv, sel_list, scale, first, last));
                    record(static_cast<int>(first), s, NowUs());
                  }));
            });
            break;
          case kReal:
            run(phase,
                [&](auto) { Check(HostSparseLayer(io, cache, digest, tv, config, sel, scale)); });
            break;
        }
      }
    }
  }
  std::printf("SmolLM2 4 x 6K %s, %d threads, %d layers x %d passes; us, median over calls\n",
              dt == DType::kFloat32 ? "fp32" : "bf16", threads, layers, passes);
  std::printf("%-6s %8s %12s %11s %10s %10s\n", "phase", "wall", "first start", "last start",
              "task dur", "last end");
  for (int p = 0; p < kPhases; ++p) {
    const Calls& c = calls[p];
    std::printf("%-6s %8.2f %12.2f %11.2f %10.2f %10.2f\n", names[p], Median(c.wall),
                Median(c.first_start), Median(c.last_start), Median(c.mid_dur), Median(c.last_end));
  }
  if (events_path != nullptr) {
    FILE* f = std::fopen(events_path, "w");
    if (f == nullptr) {
      std::perror(events_path);
      return 1;
    }
    std::fprintf(f, "phase,call,thread,row,start_us,end_us\n");
    for (const Event& e : events) {
      std::fprintf(f, "%s,%d,%d,%d,%.3f,%.3f\n", names[e.phase], e.call, e.thread, e.row, e.start,
                   e.end);
    }
    std::fclose(f);
  }
  return 0;
}
