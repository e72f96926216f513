// The kernels' own thread pool: the caller and threads-1 workers share out each loop.
//
// Why not torch's OpenMP pool: this library does not link torch (it is built with the package,
// for any torch), and its waits are the point. A step of the decoder is ~300 loops of a few
// microseconds each; between them a worker spins (a worker that slept would take a futex
// wake-up, tens of microseconds, per loop), but only for a bounded time (spin_us, default
// below), then blocks in the kernel. So a worker the OS has taken away does not make the
// others spin for its whole time slice, and between steps (the engine's Python) no thread
// burns a core: on a machine shared with other processes that is the difference between a
// fair share and a collapse (docs/performance.md, "Graceful under contention").
//
// Work sharing: a loop of n items is split in equal contiguous shares, one per thread (memory
// streams in order, which is what one-row matmuls want), each share handed out in chunks from
// an atomic cursor; a thread that has finished its own share takes chunks from the others'.
// The caller waits for the loop's items to be done, not for the workers to report: a worker the
// OS has taken away holds nothing up unless it has claimed a chunk, and its unclaimed chunks go
// to the threads that run. Which thread computes an item changes nothing in the result.
//
// Jobs and generations: each loop is a job of a 32-bit generation. A share's cursor holds
// (generation << 32 | next item), so a worker that wakes late, or reads a job while the next is
// being set up, claims nothing: a claim is a compare-and-swap on a cursor of its generation,
// checked again after reading the share's end (the caller announces a new generation before it
// writes any share). A worker that does claim a chunk keeps its job alive until the chunk is
// done, so the job's function and context stay valid for it. Workers are woken through one
// 32-bit word (low bits: the job's threads); those not taking part go back to waiting without
// spinning.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace ps {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Block while *word == expected (spurious returns allowed), and wake every such waiter.
inline void futex_wait(std::atomic<uint32_t>* word, uint32_t expected) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, expected, nullptr,
          nullptr, 0);
#else
  word->wait(expected);
#endif
}
inline void futex_wake_all(std::atomic<uint32_t>* word) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr,
          nullptr, 0);
#else
  word->notify_all();
#endif
}

class ThreadPool {
 public:
  static constexpr int MAX_THREADS = 1 << 10;  // the low bits of the wake word
  static constexpr int DEFAULT_SPIN_US = 50;

  static ThreadPool& get();

  void set_threads(int threads);
  int threads() const { return threads_; }
  void set_spin_us(int us) { spin_ns_.store(int64_t{std::max(0, us)} * 1000); }

  // fn(begin, end) over [0, n) in chunks; chunks of at least `grain` items
  template <typename F>
  void run(int64_t n, int64_t grain, const F& fn) {
    const int64_t parts =
        std::min<int64_t>(threads_, (n + grain - 1) / std::max<int64_t>(grain, 1));
    // one job at a time: a loop inside a job, or a second thread calling in (two engines in
    // one process), runs on its caller's thread
    if (parts <= 1 || in_pool_ || busy_.exchange(true, std::memory_order_acquire)) {
      if (n > 0) fn(0, n);
      return;
    }
    dispatch(n, static_cast<int>(parts), grain,
             [](const void* f, int64_t b, int64_t e) { (*static_cast<const F*>(f))(b, e); }, &fn);
    busy_.store(false, std::memory_order_release);
  }

  // While one lives, this thread runs every loop itself (the self-test: a fault must happen
  // on the thread that guards against it).
  class CallerOnly {
   public:
    CallerOnly() : saved_(in_pool_) { in_pool_ = true; }
    ~CallerOnly() { in_pool_ = saved_; }

   private:
    bool saved_;
  };

  // threads that took part in a job of `tasks` items, each task waiting (up to a second) for
  // the others to arrive: tells a test that the workers exist and run
  int parallel_threads(int64_t tasks);

 private:
  using Call = void (*)(const void*, int64_t, int64_t);
  struct alignas(64) Share {
    std::atomic<uint64_t> cursor{0};  // generation << 32 | next item
    std::atomic<int64_t> end{0};
  };

  void dispatch(int64_t n, int parts, int64_t grain, Call call, const void* ctx);
  bool claim(Share& share, uint32_t generation, int64_t& begin, int64_t& end);
  void work(int part, int parts, uint32_t generation);
  void worker_main(int index, uint32_t seen);
  template <typename T>
  bool spin_until_changed(const std::atomic<T>& word, T old) const;
  void stop_workers();

  int threads_ = 1;
  std::vector<std::thread> workers_;
  std::vector<Share> shares_ = std::vector<Share>(MAX_THREADS);
  // the current job: written before its shares' cursors, read after a successful claim
  Call call_ = nullptr;
  const void* ctx_ = nullptr;
  int64_t chunk_ = 1;
  uint32_t items_ = 0;
  alignas(64) std::atomic<uint32_t> generation_{0};  // of the job set up or running
  alignas(64) std::atomic<uint32_t> done_{0};        // items of the current job done
  alignas(64) std::atomic<uint32_t> wake_{0};        // generation << 10 | parts: workers wait on it
  alignas(64) std::atomic<int> sleepers_{0};         // workers blocked on wake_
  std::atomic<int> caller_sleeping_{0};
  std::atomic<int64_t> spin_ns_{int64_t{DEFAULT_SPIN_US} * 1000};
  std::atomic<bool> stopping_{false};
  std::atomic<bool> busy_{false};
  static thread_local bool in_pool_;
};

}  // namespace ps
