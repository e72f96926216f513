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
  job_.fetch_add(1u << PART_BITS);  // a job of 0 parts: everyone looks, no one takes part
  futex_wake_all(&job_);
  for (std::thread& t : workers_) t.join();
  workers_.clear();
  stopping_.store(false);
}

bool ThreadPool::spin_until_changed(const std::atomic<uint32_t>& word, uint32_t old) const {
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
    // the job word before this job: the new worker's first job is the next one, whenever
    // its thread gets to run
    const int index = static_cast<int>(workers_.size()) + 1;
    const uint32_t seen = job_.load(std::memory_order_relaxed);
    workers_.emplace_back([this, index, seen] { worker_main(index, seen); });
  }
  call_ = call;
  ctx_ = ctx;
  // a share in chunks of about an eighth, so that the others can take over a preempted one
  chunk_ = std::max<int64_t>(grain, n / (8 * parts));
  for (int p = 0; p < parts; ++p) {
    shares_[p].next.store(n * p / parts, std::memory_order_relaxed);
    shares_[p].end = n * (p + 1) / parts;
  }
  pending_.store(static_cast<uint32_t>(parts - 1), std::memory_order_relaxed);
  const uint32_t word = ((job_.load(std::memory_order_relaxed) >> PART_BITS) + 1) << PART_BITS
                        | static_cast<uint32_t>(parts);
  job_.store(word, std::memory_order_seq_cst);  // publishes the shares above
  if (sleepers_.load(std::memory_order_seq_cst) > 0) futex_wake_all(&job_);

  in_pool_ = true;
  work(0, parts);
  in_pool_ = false;

  for (uint32_t left; (left = pending_.load(std::memory_order_acquire)) != 0;) {
    if (spin_until_changed(pending_, left)) continue;
    caller_sleeping_.store(1, std::memory_order_seq_cst);
    while ((left = pending_.load(std::memory_order_seq_cst)) != 0) futex_wait(&pending_, left);
    caller_sleeping_.store(0, std::memory_order_relaxed);
  }
}

void ThreadPool::work(int part, int parts) {
  const int64_t chunk = chunk_;
  for (int i = 0; i < parts; ++i) {  // its own share first, then what the others left
    Share& share = shares_[(part + i) % parts];
    for (int64_t begin; (begin = share.next.fetch_add(chunk, std::memory_order_relaxed)) < share.end;)
      call_(ctx_, begin, std::min(begin + chunk, share.end));
  }
}

void ThreadPool::worker_main(int index, uint32_t seen) {
  in_pool_ = true;
  bool spin = true;  // a worker that has just worked expects the next loop soon
  for (;;) {
    if (!spin || !spin_until_changed(job_, seen)) {
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      while (job_.load(std::memory_order_seq_cst) == seen) futex_wait(&job_, seen);
      sleepers_.fetch_sub(1, std::memory_order_relaxed);
    }
    seen = job_.load(std::memory_order_acquire);
    if (stopping_.load(std::memory_order_acquire)) return;
    const int parts = static_cast<int>(seen & PART_MASK);
    spin = index < parts;
    if (!spin) continue;
    work(index, parts);
    if (pending_.fetch_sub(1, std::memory_order_seq_cst) == 1
        && caller_sleeping_.load(std::memory_order_seq_cst)) {
      futex_wake_all(&pending_);
    }
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
