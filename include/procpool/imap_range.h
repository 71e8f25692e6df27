// ImapRange: what imap and imap_unordered return, an input range of absl::StatusOr<Result>.
//
//   for (absl::StatusOr<int64_t> square : pool.imap(std::views::iota(0))) {
//     if (!square.ok()) ...;
//     if (*square > 1000) break;  // cancels what was not started; the pool stays usable
//   }
//
// The input is pulled lazily, on the consuming thread, as results are consumed: at most
// `max_in_flight` jobs are taken and not yet consumed, so an endless input keeps the parent's
// memory flat and the first result arrives while the input is still being produced. The input
// (a container, a view, a generator-like range) is held by reference when an lvalue, by value
// when an rvalue. Leaving the loop early, or destroying the range, cancels tasks not yet started;
// tasks already running finish in the background and are discarded.
//
// One pass, one consuming thread. The range must not outlive its pool. If the pool is closed
// while a range is in use, the next element is the kFailedPrecondition status and the range ends.

#ifndef PROCPOOL_IMAP_RANGE_H_
#define PROCPOOL_IMAP_RANGE_H_

#include <cstddef>
#include <iterator>
#include <memory>
#include <optional>
#include <ranges>
#include <utility>

#include "absl/status/statusor.h"
#include "procpool/internal/imap_call.h"
#include "procpool/internal/pool_core.h"

namespace procpool {

template <typename Job, typename Result, std::ranges::input_range Input>
class ImapRange {
 public:
  class iterator {
   public:
    using iterator_category = std::input_iterator_tag;
    using difference_type = std::ptrdiff_t;
    using value_type = absl::StatusOr<Result>;

    iterator() = default;
    explicit iterator(ImapRange* range) : range_(range) {}
    value_type& operator*() const { return *range_->current_; }
    value_type* operator->() const { return &*range_->current_; }
    iterator& operator++() {
      range_->advance();
      return *this;
    }
    void operator++(int) { range_->advance(); }
    friend bool operator==(const iterator& it, std::default_sentinel_t) { return it.at_end(); }

   private:
    bool at_end() const { return range_ == nullptr || !range_->current_.has_value(); }

    ImapRange* range_ = nullptr;
  };

  ImapRange(internal::PoolCore* core, std::shared_ptr<internal::ImapCall<Job, Result>> call,
            Input input, size_t chunksize, size_t max_in_flight)
      : core_(core),
        call_(std::move(call)),
        input_(std::move(input)),
        next_(std::ranges::begin(input_)),
        chunksize_(std::max<size_t>(1, chunksize)),
        max_in_flight_(std::max(max_in_flight, chunksize_)) {}

  ImapRange(const ImapRange&) = delete;
  ImapRange& operator=(const ImapRange&) = delete;

  ~ImapRange() {
    if (submitted_ > consumed_) core_->cancel(call_.get());
  }

  // Starts the iteration: pulls the first jobs and waits for the first outcome. Call once.
  iterator begin() {
    advance();
    return iterator(this);
  }
  std::default_sentinel_t end() const { return {}; }

  // Jobs taken from the input whose outcome has not been consumed yet (for tests and monitors).
  size_t in_flight() const { return submitted_ - consumed_; }

 private:
  void advance() {
    current_.reset();
    refill();
    if (failure_) {
      current_.emplace(*std::move(failure_));
      failure_.reset();
      input_done_ = true;
      return;
    }
    if (submitted_ == consumed_) return;  // input exhausted and everything consumed
    current_.emplace(call_->next());
    ++consumed_;
  }

  // Takes jobs from the input, a chunk at a time, while a whole chunk more fits in
  // max_in_flight.
  void refill() {
    // Whole chunks only: refilling as soon as one slot frees would send chunks of one task.
    while (!input_done_ && submitted_ - consumed_ + chunksize_ <= max_in_flight_) {
      size_t first = 0;
      size_t count = 0;
      while (count < chunksize_ && submitted_ + count - consumed_ < max_in_flight_) {
        if (next_ == std::ranges::end(input_)) {
          input_done_ = true;
          break;
        }
        const size_t index = call_->add_job(Job(*next_));
        if (count == 0) first = index;
        ++count;
        ++next_;
      }
      if (count == 0) break;
      if (absl::Status submitted = core_->submit(call_, first, count); !submitted.ok()) {
        failure_ = submitted;
        return;
      }
      submitted_ += count;
    }
  }

  internal::PoolCore* core_;
  std::shared_ptr<internal::ImapCall<Job, Result>> call_;
  Input input_;
  std::ranges::iterator_t<Input> next_;
  const size_t chunksize_;
  const size_t max_in_flight_;
  size_t submitted_ = 0;
  size_t consumed_ = 0;
  bool input_done_ = false;
  std::optional<absl::Status> failure_;
  std::optional<absl::StatusOr<Result>> current_;
};

}  // namespace procpool

#endif  // PROCPOOL_IMAP_RANGE_H_
