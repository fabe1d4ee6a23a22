// mempipe backend: a bounded single-producer/single-consumer channel between two stage threads.
//
// The ring itself is Boost.Lockfree's `spsc_queue` (wait-free push/pop, one producer thread, one
// consumer thread). This wrapper adds what a pipeline stage needs on top of it:
//  * blocking Push/Pop that spin briefly and then sleep on a futex (C++20 atomic wait), so a
//    full channel applies back-pressure to its producer and an empty one parks its consumer
//    without burning a core;
//  * Close(), after which Push fails and Pop drains what is left and then reports closed;
//  * depth statistics (max depth seen by the producer, pushes that found the channel full).
//
// Capacity is either compile-time (`SpscChannel<Job, 64>`) or run-time (`SpscChannel<Job>(64)`).
//
//   SpscChannel<int> ch(8);
//   std::thread consumer([&] { while (auto v = ch.Pop()) Use(*v); });  // ends on Close()
//   for (int i = 0; i < n; ++i) ch.Push(i);                             // blocks while full
//   ch.Close();
//   consumer.join();
//
// Memory orders (and why), for the atomics this file adds; Boost's ring publishes each element
// with a release store of its write index that the consumer's pop reads with acquire (and the
// mirror for the read index), so an element's contents are visible to whoever pops it.
//  * `items_epoch_` / `space_epoch_` (uint32): bumped by the producer after each push (resp. by
//    the consumer after each pop) and waited on by the other side. The bump is a seq_cst RMW
//    and the sleeper's `*_waiting_` store and epoch load are seq_cst, so the classic lost-wakeup
//    interleaving cannot happen: in the single total order either the waker's load of
//    `*_waiting_` comes after the sleeper's store (the waker notifies), or the sleeper's epoch
//    load comes after the bump (the sleeper sees a changed epoch and does not sleep). The
//    futex wait itself compares the epoch atomically with going to sleep.
//  * `*_waiting_` (bool): set by the side about to sleep, cleared on wake (seq_cst, see above);
//    lets the other side skip the notify system call when nobody sleeps.
//  * `closed_` (bool): seq_cst store by Close() (any thread), acquire or seq_cst loads by both
//    sides, so whatever the closing thread wrote before Close() is visible to a side that sees
//    the channel closed. Close also bumps both epochs (seq_cst) and notifies, waking any sleeper.
//  * `pushers_` (int): a push attempt's announcement, seq_cst; closes the race between a
//    producer's closed check and its ring push when a third thread closes (see PushOnce): a
//    Push that returns true has queued a value the consumer's Pop will return.
//  * statistics (`max_depth_`, `depth_sum_`, `full_events_`, `pushes_`): written only by the
//    producer with relaxed stores (single writer); read with relaxed loads, so a reader racing
//    the producer sees some recent value; exact when read after the producer has been joined or
//    synchronized with.
#ifndef MEMPIPE_BACKEND_SPSC_CHANNEL_H_
#define MEMPIPE_BACKEND_SPSC_CHANNEL_H_

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <thread>
#include <type_traits>
#include <utility>

#include "boost/lockfree/policies.hpp"
#include "boost/lockfree/spsc_queue.hpp"

namespace mempipe {

namespace internal {

template <typename T, size_t kCapacity>
struct SpscRing {
  using type = boost::lockfree::spsc_queue<T, boost::lockfree::capacity<kCapacity>>;
};
template <typename T>
struct SpscRing<T, 0> {
  using type = boost::lockfree::spsc_queue<T>;
};

}  // namespace internal

// Statistics of one channel, as seen by its producer.
struct ChannelStats {
  uint64_t pushes = 0;
  uint64_t full_events = 0;  // push attempts that found the channel full (back-pressure)
  size_t max_depth = 0;      // most elements queued right after a push
  uint64_t depth_sum = 0;    // sum of the depths right after each push (mean = / pushes)
  size_t capacity = 0;

  double MeanDepth() const { return pushes ? static_cast<double>(depth_sum) / pushes : 0; }
};

template <typename T, size_t kCapacity = 0>
class SpscChannel {
 public:
  // How many failed attempts before sleeping: long enough to catch a partner that is about to
  // act (a stage handoff takes well under a microsecond), short enough not to hog a shared core.
  static constexpr int kSpinAttempts = 64;

  // Compile-time capacity.
  SpscChannel() requires(kCapacity > 0) : capacity_(kCapacity) {}
  // Run-time capacity (>= 1).
  explicit SpscChannel(size_t capacity) requires(kCapacity == 0)
      : ring_(std::max<size_t>(capacity, 1)), capacity_(std::max<size_t>(capacity, 1)) {}

  SpscChannel(const SpscChannel&) = delete;
  SpscChannel& operator=(const SpscChannel&) = delete;

  size_t capacity() const { return capacity_; }

  // Producer side. False if full (counted as a full event) or closed; never blocks.
  [[nodiscard]] bool TryPush(const T& value) {
    const PushResult r = PushOnce(value);
    if (r == PushResult::kFull) {
      full_events_.store(full_events_.load(std::memory_order_relaxed) + 1,
                         std::memory_order_relaxed);
    }
    return r == PushResult::kPushed;
  }

  // Producer side. Blocks while the channel is full (back-pressure). False only if the channel
  // is closed (the value is then not queued).
  [[nodiscard]] bool Push(const T& value) {
    bool counted_full = false;
    for (int spin = 0;; ++spin) {
      const PushResult r = PushOnce(value);
      if (r == PushResult::kClosed) return false;
      if (r == PushResult::kPushed) return true;
      if (!counted_full) {
        full_events_.store(full_events_.load(std::memory_order_relaxed) + 1,
                           std::memory_order_relaxed);
        counted_full = true;
      }
      if (spin < kSpinAttempts) {
        Relax(spin);
        continue;
      }
      Sleep(space_epoch_, space_waiting_,
            [&] { return ring_.write_available() > 0 || closed_.load(std::memory_order_acquire); });
    }
  }

  // Consumer side. Never blocks.
  [[nodiscard]] std::optional<T> TryPop() {
    std::optional<T> out;
    if (ring_.consume_one([&](T& v) { out.emplace(std::move(v)); })) AfterPop();
    return out;
  }

  // Consumer side. Blocks until an element arrives; nullopt once the channel is closed and
  // drained.
  [[nodiscard]] std::optional<T> Pop() {
    for (int spin = 0;; ++spin) {
      if (std::optional<T> v = TryPop()) return v;
      // Closed is checked after a failed pop, and the ring re-checked after seeing closed (and
      // after any push that had not yet seen it has finished), so a value whose Push reported
      // success is never left behind.
      if (closed_.load(std::memory_order_seq_cst)) {
        WaitForPushersToLeave();
        return TryPop();
      }
      if (spin < kSpinAttempts) {
        Relax(spin);
        continue;
      }
      Sleep(items_epoch_, items_waiting_,
            [&] { return ring_.read_available() > 0 || closed_.load(std::memory_order_acquire); });
    }
  }

  // Either side (or a third thread). Idempotent.
  void Close() {
    closed_.store(true, std::memory_order_seq_cst);
    Bump(items_epoch_, items_waiting_, /*force=*/true);
    Bump(space_epoch_, space_waiting_, /*force=*/true);
  }
  bool closed() const { return closed_.load(std::memory_order_acquire); }

  // Approximate from any thread; exact from the consumer when the producer is idle.
  size_t Depth() const { return ring_.read_available(); }

  ChannelStats Stats() const {
    return ChannelStats{pushes_.load(std::memory_order_relaxed),
                        full_events_.load(std::memory_order_relaxed),
                        max_depth_.load(std::memory_order_relaxed),
                        depth_sum_.load(std::memory_order_relaxed), capacity_};
  }
  // Producer side (or when both sides are idle).
  void ResetStats() {
    pushes_.store(0, std::memory_order_relaxed);
    full_events_.store(0, std::memory_order_relaxed);
    max_depth_.store(0, std::memory_order_relaxed);
    depth_sum_.store(0, std::memory_order_relaxed);
  }

 private:
  enum class PushResult { kPushed, kFull, kClosed };

  // One attempt. The producer announces itself in `pushers_` before it reads `closed_`, both
  // seq_cst, and Close() stores `closed_` seq_cst; a consumer that has seen the channel closed
  // waits for `pushers_` to drop to zero before its last look at the ring. In the single total
  // order, a push either reads closed == true (and fails) or its announcement precedes the
  // consumer's read of `pushers_` (so the consumer waits for it and then finds its value).
  PushResult PushOnce(const T& value) {
    pushers_.fetch_add(1, std::memory_order_seq_cst);
    PushResult r = PushResult::kClosed;
    if (!closed_.load(std::memory_order_seq_cst)) {
      r = ring_.push(value) ? PushResult::kPushed : PushResult::kFull;
    }
    pushers_.fetch_sub(1, std::memory_order_seq_cst);
    if (r == PushResult::kPushed) AfterPush();
    return r;
  }

  // A producer inside PushOnce finishes in a bounded number of steps (it never blocks there).
  void WaitForPushersToLeave() const {
    for (int spin = 0; pushers_.load(std::memory_order_seq_cst) != 0; ++spin) Relax(spin);
  }

  static void Relax(int spin) {
    // The first attempts retry at once; later ones yield so a partner sharing this core runs.
    if (spin >= kSpinAttempts / 4) std::this_thread::yield();
  }

  void AfterPush() {
    const size_t depth = capacity_ - ring_.write_available();
    pushes_.store(pushes_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    depth_sum_.store(depth_sum_.load(std::memory_order_relaxed) + depth, std::memory_order_relaxed);
    if (depth > max_depth_.load(std::memory_order_relaxed)) {
      max_depth_.store(depth, std::memory_order_relaxed);
    }
    Bump(items_epoch_, items_waiting_, /*force=*/false);
  }
  void AfterPop() { Bump(space_epoch_, space_waiting_, /*force=*/false); }

  static void Bump(std::atomic<uint32_t>& epoch, std::atomic<bool>& waiting, bool force) {
    epoch.fetch_add(1, std::memory_order_seq_cst);
    if (force || waiting.load(std::memory_order_seq_cst)) epoch.notify_all();
  }

  // Parks the calling side until the epoch moves, unless `ready()` already holds. Spurious
  // returns are fine: every caller loops and re-checks.
  template <typename Ready>
  static void Sleep(std::atomic<uint32_t>& epoch, std::atomic<bool>& waiting, Ready ready) {
    waiting.store(true, std::memory_order_seq_cst);
    const uint32_t seen = epoch.load(std::memory_order_seq_cst);
    if (!ready()) epoch.wait(seen, std::memory_order_seq_cst);
    waiting.store(false, std::memory_order_seq_cst);
  }

  typename internal::SpscRing<T, kCapacity>::type ring_;
  const size_t capacity_;
  std::atomic<bool> closed_{false};
  std::atomic<int> pushers_{0};  // producers between their closed check and their push
  alignas(64) std::atomic<uint32_t> items_epoch_{0};
  std::atomic<bool> items_waiting_{false};
  alignas(64) std::atomic<uint32_t> space_epoch_{0};
  std::atomic<bool> space_waiting_{false};
  alignas(64) std::atomic<uint64_t> pushes_{0};
  std::atomic<uint64_t> full_events_{0};
  std::atomic<size_t> max_depth_{0};
  std::atomic<uint64_t> depth_sum_{0};
};

}  // namespace mempipe

#endif  // MEMPIPE_BACKEND_SPSC_CHANNEL_H_
