// The kernels' thread pool (thread_pool.h says what and why).
#include "thread_pool.h"

#include <pthread.h>

#include <cstdlib>

namespace ps {

namespace {
constexpr int PART_BITS = 10;
constexpr uint32_t PART_MASK = (1u << PART_BITS) - 1;
ThreadPool* pool = nullptr;

// A forked child has the parent's memory but none of its threads: it starts a pool of its own.
void forget_pool_in_child() { pool = nullptr; }
}  // namespace

thread_local bool ThreadPool::in_pool_ = false;

ThreadPool& ThreadPool::get() {
  if (pool == nullptr) {
    static const int registered = pthread_atfork(nullptr, nullptr, forget_pool_in_child);
    (void)registered;
    pool = new ThreadPool();  // never freed: workers may still be blocked on it at exit
    if (const char* spin = std::getenv("PAGEDSERVE_SPIN_US")) pool->set_spin_us(std::atoi(spin));
  }
  return *pool;
}

void ThreadPool::set_threads(int threads) {
  threads = std::clamp(threads, 1, MAX_THREADS);
  if (threads < threads_) stop_workers();
  threads_ = threads;
}

void ThreadPool::stop_workers() {
  stopping_.store(true);
  wake_.fetch_add(1u << PART_BITS);  // everyone looks, and leaves
  futex_wake_all(&wake_);
  for (std::thread& t : workers_) t.join();
  workers_.clear();
  stopping_.store(false);
}

template <typename T>
bool ThreadPool::spin_until_changed(const std::atomic<T>& word, T old) const {
  const auto deadline = std::chrono::steady_clock::now()
                        + std::chrono::nanoseconds(spin_ns_.load(std::memory_order_relaxed));
  for (int i = 1;; ++i) {
    if (word.load(std::memory_order_acquire) != old) return true;
    cpu_relax();
    if (i % 64 == 0 && std::chrono::steady_clock::now() >= deadline) return false;
  }
}

void ThreadPool::dispatch(int64_t n, int parts, int64_t grain, Call call, const void* ctx) {
  while (static_cast<int>(workers_.size()) < threads_ - 1) {
    // the wake word before this job: the new worker's first job is this one, whenever its
    // thread gets to run
    const int index = static_cast<int>(workers_.size()) + 1;
    const uint32_t seen = wake_.load(std::memory_order_relaxed);
    workers_.emplace_back([this, index, seen] { worker_main(index, seen); });
  }
  // announce the generation first: a late worker that reads a share being rewritten sees it
  // and claims nothing (claim)
  const uint32_t generation = generation_.load(std::memory_order_relaxed) + 1;
  generation_.store(generation, std::memory_order_seq_cst);
  call_ = call;
  ctx_ = ctx;
  items_ = static_cast<uint32_t>(n);
  // a share in chunks of about an eighth, so that the others can take over a preempted one
  chunk_ = std::max<int64_t>(grain, n / (8 * parts));
  done_.store(0, std::memory_order_relaxed);
  for (int p = 0; p < parts; ++p) {
    shares_[p].end.store(n * (p + 1) / parts, std::memory_order_release);
    shares_[p].cursor.store(uint64_t{generation} << 32 | static_cast<uint64_t>(n * p / parts),
                            std::memory_order_release);
  }
  wake_.store(generation << PART_BITS | static_cast<uint32_t>(parts), std::memory_order_seq_cst);
  if (sleepers_.load(std::memory_order_seq_cst) > 0) futex_wake_all(&wake_);

  in_pool_ = true;
  work(0, parts, generation);
  in_pool_ = false;

  const uint32_t items = items_;
  for (uint32_t done; (done = done_.load(std::memory_order_acquire)) != items;) {
    if (spin_until_changed(done_, done)) continue;
    caller_sleeping_.store(1, std::memory_order_seq_cst);
    while ((done = done_.load(std::memory_order_seq_cst)) != items) futex_wait(&done_, done);
    caller_sleeping_.store(0, std::memory_order_relaxed);
  }
}

bool ThreadPool::claim(Share& share, uint32_t generation, int64_t& begin, int64_t& end) {
  uint64_t cursor = share.cursor.load(std::memory_order_acquire);
  for (;;) {
    if (cursor >> 32 != generation) return false;  // another job's share
    const int64_t next = static_cast<int64_t>(cursor & 0xFFFFFFFFu);
    end = share.end.load(std::memory_order_acquire);
    // an end written for the next job comes after its new generation: then this job is over
    if (generation_.load(std::memory_order_acquire) != generation || next >= end) return false;
    if (share.cursor.compare_exchange_weak(cursor, cursor + static_cast<uint64_t>(chunk_),
                                           std::memory_order_acq_rel,
                                           std::memory_order_acquire)) {
      begin = next;
      end = std::min(next + chunk_, end);
      return true;
    }
  }
}

void ThreadPool::work(int part, int parts, uint32_t generation) {
  for (int i = 0; i < parts; ++i) {  // its own share first, then what the others left
    Share& share = shares_[(part + i) % parts];
    for (int64_t begin, end; claim(share, generation, begin, end);) {
      call_(ctx_, begin, end);  // the job lives on until this chunk is counted done
      const uint32_t count = static_cast<uint32_t>(end - begin);
      if (done_.fetch_add(count, std::memory_order_seq_cst) + count == items_
          && caller_sleeping_.load(std::memory_order_seq_cst)) {
        futex_wake_all(&done_);
      }
    }
  }
}

void ThreadPool::worker_main(int index, uint32_t seen) {
  in_pool_ = true;
  bool spin = true;  // a worker that has just worked expects the next loop soon
  for (;;) {
    if (!spin || !spin_until_changed(wake_, seen)) {
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      while (wake_.load(std::memory_order_seq_cst) == seen) futex_wait(&wake_, seen);
      sleepers_.fetch_sub(1, std::memory_order_relaxed);
    }
    seen = wake_.load(std::memory_order_acquire);
    if (stopping_.load(std::memory_order_acquire)) return;
    const int parts = static_cast<int>(seen & PART_MASK);
    spin = index < parts;
    // the generation now running (maybe newer than the word read: claims check it)
    if (spin) work(index, parts, generation_.load(std::memory_order_acquire));
  }
}

int ThreadPool::parallel_threads(int64_t tasks) {
  static std::atomic<int64_t> calls{0};
  thread_local int64_t counted_in = -1;  // the last call this thread counted itself in
  const int64_t call = calls.fetch_add(1) + 1;
  const int expected = static_cast<int>(std::min<int64_t>(threads_, tasks));
  std::atomic<int> arrived{0};
  run(tasks, 1, [&](int64_t, int64_t) {
    if (counted_in == call) return;
    counted_in = call;
    arrived.fetch_add(1);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(1);
    while (arrived.load() < expected && std::chrono::steady_clock::now() < deadline)
      std::this_thread::yield();
  });
  return arrived.load();
}

}  // namespace ps
