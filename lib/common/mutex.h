// Mutex and MutexLock: std::mutex with clang's thread-safety annotations.
//
// Members guarded by a Mutex say so with ABSL_GUARDED_BY(mu_), and helpers that expect it held
// with ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_); clang's -Wthread-safety checks both (tools/
// thread_safety.sh). A wrapper of std::mutex rather than absl::Mutex: ThreadSanitizer sees
// std::mutex, not the system Abseil's uninstrumented absl::Mutex.

#ifndef PROCPOOL_LIB_COMMON_MUTEX_H_
#define PROCPOOL_LIB_COMMON_MUTEX_H_

#include <condition_variable>
#include <mutex>

#include "absl/base/thread_annotations.h"

namespace procpool::internal {

class ABSL_LOCKABLE Mutex {
 public:
  void lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mu_.lock(); }
  void unlock() ABSL_UNLOCK_FUNCTION() { mu_.unlock(); }
  // For condition variables, which take the std::mutex itself.
  std::mutex& native() { return mu_; }

 private:
  std::mutex mu_;
};

// Holds a Mutex for its scope; may be released and retaken in between (around a poll()).
class ABSL_SCOPED_LOCKABLE MutexLock {
 public:
  explicit MutexLock(Mutex& mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : mu_(mu) { mu_.lock(); }
  ~MutexLock() ABSL_UNLOCK_FUNCTION() {
    if (held_) mu_.unlock();
  }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

  void unlock() ABSL_UNLOCK_FUNCTION() {
    held_ = false;
    mu_.unlock();
  }
  void lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() {
    mu_.lock();
    held_ = true;
  }

 private:
  Mutex& mu_;
  bool held_ = true;
};

// Waits on a std::condition_variable with an annotated Mutex held (the caller holds it).
template <typename Predicate>
void wait_on(std::condition_variable& cv, Mutex& mu, Predicate done)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
  std::unique_lock<std::mutex> lock(mu.native(), std::adopt_lock);
  cv.wait(lock, done);
  lock.release();
}

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_COMMON_MUTEX_H_
