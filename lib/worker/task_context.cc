#include "lib/worker/task_context.h"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <thread>
#include <utility>

namespace procpool::internal {
namespace {

constexpr auto kStopWatchInterval = std::chrono::milliseconds(1);

WorkerInfo& info() {
  // Leaked: a worker never runs static destructors (it _exits), and a program must be able to
  // call this_worker() from its own static destructors.
  static WorkerInfo* const value = [] {
    auto* outside = new WorkerInfo();
    outside->slot = -1;  // not a worker (a designated initializer trips -Wmissing-field-initializers)
    return outside;
  }();
  return *value;
}

std::atomic<const ControlPage*> task_page{nullptr};
std::atomic<int> task_attempt{0};

// The running task's stop_source, for stop_token() (see task_context.h).
class TaskStopSource {
 public:
  static TaskStopSource& get() {
    static TaskStopSource* const instance = new TaskStopSource;  // leaked, as info()
    return *instance;
  }

  std::stop_token token(const ControlPage& page) {
    std::stop_source source;
    {
      std::lock_guard lock(mu_);
      const uint64_t key = task_key(page);
      if (key != key_ || !has_source_) {
        source_ = std::stop_source();
        key_ = key;
        has_source_ = true;
      }
      source = source_;
      if (!watching_) {
        watching_ = true;
        std::thread([this, &page] { watch(page); }).detach();
      }
    }
    in_use_.store(true, std::memory_order_relaxed);
    if (stop_requested(page)) source.request_stop();
    return source.get_token();
  }

  // stop_requested() saw the request: the token of the same task stops too.
  void on_seen(const ControlPage& page) {
    if (!in_use_.load(std::memory_order_relaxed)) return;
    std::stop_source source;
    {
      std::lock_guard lock(mu_);
      if (!has_source_ || key_ != task_key(page)) return;
      source = source_;
    }
    source.request_stop();  // callbacks run here, outside the lock
  }

 private:
  static uint64_t task_key(const ControlPage& page) {
    return page.batch_seq.load(std::memory_order_relaxed) * 0x1000000 +
           page.task_index.load(std::memory_order_relaxed);
  }

  [[noreturn]] void watch(const ControlPage& page) {
    while (true) {
      std::this_thread::sleep_for(kStopWatchInterval);
      if (stop_requested(page)) on_seen(page);
    }
  }

  std::mutex mu_;
  std::stop_source source_;
  uint64_t key_ = 0;
  bool has_source_ = false;
  bool watching_ = false;
  std::atomic<bool> in_use_{false};
};

}  // namespace

void set_this_worker(WorkerInfo value) { info() = std::move(value); }

void bind_task_page(const ControlPage* page) { task_page.store(page, std::memory_order_release); }

void set_task_attempt(int attempt) { task_attempt.store(attempt, std::memory_order_relaxed); }

}  // namespace procpool::internal

namespace procpool {

const WorkerInfo& this_worker() { return internal::info(); }

namespace this_task {

bool stop_requested() {
  const internal::ControlPage* page = internal::task_page.load(std::memory_order_relaxed);
  if (page == nullptr || !internal::stop_requested(*page)) return false;
  internal::TaskStopSource::get().on_seen(*page);
  return true;
}

std::stop_token stop_token() {
  const internal::ControlPage* page = internal::task_page.load(std::memory_order_acquire);
  if (page == nullptr) return {};
  return internal::TaskStopSource::get().token(*page);
}

int attempt() {
  if (internal::task_page.load(std::memory_order_relaxed) == nullptr) return 0;
  return internal::task_attempt.load(std::memory_order_relaxed);
}

}  // namespace this_task
}  // namespace procpool
