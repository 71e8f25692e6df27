/// \file
/// `wait` and `as_completed`: waiting on many AsyncResults at once, like Python's
/// concurrent.futures.wait and as_completed.
///
/// ```cpp
/// std::vector<procpool::AsyncResult<int64_t>> pending;
/// for (int64_t job : jobs) pending.push_back(pool.apply_async(job));
///
/// // Handle each as it completes:
/// for (absl::StatusOr<size_t> i : procpool::as_completed(pending, absl::Minutes(1))) {
///   if (!i.ok()) break;                        // kDeadlineExceeded: a minute passed
///   absl::StatusOr<int64_t> value = pending[*i].get();  // in already: does not block
/// }
///
/// // Or stop at the first failure:
/// procpool::WaitResult first = procpool::wait(pending, procpool::WaitFor::kFirstException);
/// ```
///
/// Both take any range of AsyncResults (a `std::vector`, a `std::span`, a braced list), of one
/// pool or several; results of different T mix through AnyAsyncResult: `procpool::wait({a, b})`
/// with a an `AsyncResult<int64_t>` and b an `AsyncResult<std::string>`. Both name results by
/// their index in the input.
///
/// Both block on a condition variable that each result signals as it completes (registered when
/// they are called), bounded by their timeout: no polling. A result signals when its outcome is
/// set: its callbacks may not have run yet. Thread-safe: any number of threads may wait on the
/// same results at once.

#ifndef PROCPOOL_WAIT_H_
#define PROCPOOL_WAIT_H_

#include <cstddef>
#include <deque>
#include <initializer_list>
#include <iterator>
#include <memory>
#include <optional>
#include <ranges>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "procpool/async_result.h"
#include "procpool/internal/completion.h"

namespace procpool {

/// When `wait()` returns (concurrent.futures' FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED).
enum class WaitFor {
  /// As soon as any result is in (at once if one already is, or if there are none).
  kFirstCompleted,
  /// As soon as any result is in with an error (a non-OK status, kCancelled included), or when
  /// all are in.
  kFirstException,
  /// When every result is in.
  kAllCompleted,
};

/// What `wait()` found: indices into its input, each ascending, together every index once.
struct WaitResult {
  std::vector<size_t> done;      ///< The results that are in (a value, an error or kCancelled).
  std::vector<size_t> not_done;  ///< The results still out when wait returned.
  /// True if every result is in.
  bool all_done() const { return not_done.empty(); }
};

/// Blocks until `return_when` holds for `results`, or `timeout` passes; then returns which
/// results are in and which are not (a timeout is no error: not_done says what is missing). Never
/// cancels anything. Returns at once for an empty input.
WaitResult wait(absl::Span<const AnyAsyncResult> results,
                WaitFor return_when = WaitFor::kAllCompleted,
                absl::Duration timeout = absl::InfiniteDuration());

/// As above, for any range whose elements convert to AnyAsyncResult
/// (`std::vector<AsyncResult<T>>`, ...).
template <std::ranges::input_range Results>
  requires std::convertible_to<std::ranges::range_reference_t<Results>, AnyAsyncResult> &&
           (!std::convertible_to<Results, absl::Span<const AnyAsyncResult>>)
WaitResult wait(Results&& results, WaitFor return_when = WaitFor::kAllCompleted,
                absl::Duration timeout = absl::InfiniteDuration());

/// What as_completed returns: an input range (and view) of `absl::StatusOr<size_t>`, the indices
/// of the results in the order they complete; those already in when as_completed was called come
/// first, in input order. Every index comes once. If the timeout passes before all are in, the
/// next element is kDeadlineExceeded (saying how many are still out) and the range ends; the
/// results go on. Iterating blocks until the next result is in, or the deadline. One pass, one
/// consuming thread; move-only.
///
/// A view through `std::ranges::view_base`, not `view_interface`: an input range gets nothing
/// from the latter, and clang (14) rejects `view_interface` of a class that is not complete yet.
class AsCompleted : public std::ranges::view_base {
  struct State;

 public:
  /// The range's input iterator. Every copy refers to the range's one position.
  class iterator {
   public:
    /// An input iterator.
    using iterator_concept = std::input_iterator_tag;
    /// An input iterator.
    using iterator_category = std::input_iterator_tag;
    /// Required of an iterator; never used.
    using difference_type = std::ptrdiff_t;
    /// An index into the input, or kDeadlineExceeded.
    using value_type = absl::StatusOr<size_t>;

    /// An iterator of no range, equal to `end()`.
    iterator() = default;
    /// The current element: blocks until the next result is in or the deadline passes.
    value_type& operator*() const { return *state_->fetch(); }
    /// As `operator*`.
    value_type* operator->() const { return &*state_->fetch(); }
    /// Steps past the current element (taking it first if nobody looked at it; that may block).
    iterator& operator++() {
      state_->consume();
      return *this;
    }
    /// As prefix `++`.
    void operator++(int) { state_->consume(); }
    /// True at the end. Blocks like `operator*`.
    friend bool operator==(const iterator& it, std::default_sentinel_t) {
      return it.state_ == nullptr || !it.state_->fetch().has_value();
    }

   private:
    friend class AsCompleted;
    explicit iterator(State* state) : state_(state) {}
    State* state_ = nullptr;
  };

  /// An empty range.
  AsCompleted() = default;
  /// Watches `results` for `timeout` from now (what `as_completed` calls). Never blocks.
  AsCompleted(std::vector<AnyAsyncResult> results, absl::Duration timeout);
  /// Moves the range; iterators stay valid.
  AsCompleted(AsCompleted&&) noexcept = default;
  /// Moves the range; iterators of the range assigned to are invalidated.
  AsCompleted& operator=(AsCompleted&&) noexcept = default;

  /// Starts the iteration; never blocks. Iterators point into the range's state, which stays put
  /// when the range moves.
  iterator begin() { return iterator(state_.get()); }
  /// The end sentinel.
  std::default_sentinel_t end() const { return {}; }

  /// The indices not yet yielded. Never blocks.
  size_t remaining() const { return state_ == nullptr ? 0 : state_->total - state_->yielded; }

 private:
  struct State {
    std::vector<AnyAsyncResult> results;  // keeps the results alive while they are watched
    std::shared_ptr<internal::DoneNotifier> notifier;
    absl::Time deadline;
    size_t total = 0;
    size_t yielded = 0;
    bool ended = false;
    bool need_fetch = true;
    std::optional<absl::StatusOr<size_t>> current;

    // The current element, fetched (blocking until the next result or the deadline) if it was
    // not yet; nullopt at the end.
    std::optional<absl::StatusOr<size_t>>& fetch();
    // Steps past the current element (taking it first if nobody looked at it).
    void consume();
  };

  std::unique_ptr<State> state_;
};

/// Yields the indices of `results` in completion order (see AsCompleted), within `timeout` of
/// this call overall. Takes any range whose elements convert to AnyAsyncResult; copies the
/// handles, so the input may go away. Never blocks itself; iterating does.
template <std::ranges::input_range Results>
  requires std::convertible_to<std::ranges::range_reference_t<Results>, AnyAsyncResult>
AsCompleted as_completed(Results&& results, absl::Duration timeout = absl::InfiniteDuration()) {
  std::vector<AnyAsyncResult> any;
  for (auto&& result : results) any.emplace_back(result);
  return AsCompleted(std::move(any), timeout);
}
/// As above, for a braced list of AsyncResults of any types: `as_completed({a, b})`.
inline AsCompleted as_completed(std::initializer_list<AnyAsyncResult> results,
                                absl::Duration timeout = absl::InfiniteDuration()) {
  return AsCompleted(std::vector<AnyAsyncResult>(results), timeout);
}

// ---- implementation details ----

/// \cond
inline WaitResult wait(absl::Span<const AnyAsyncResult> results, WaitFor return_when,
                       absl::Duration timeout) {
  const absl::Time deadline =
      timeout == absl::InfiniteDuration() ? absl::InfiniteFuture() : absl::Now() + timeout;
  const size_t total = results.size();
  if (total > 0) {
    auto notifier = std::make_shared<internal::DoneNotifier>();
    for (size_t i = 0; i < total; ++i) results[i].state().add_listener(notifier, i);
    notifier->wait_until(deadline, [&](const std::deque<internal::DoneNotifier::Event>& events) {
      switch (return_when) {
        case WaitFor::kFirstCompleted:
          return !events.empty();
        case WaitFor::kFirstException:
          for (const internal::DoneNotifier::Event& event : events) {
            if (!event.ok) return true;
          }
          return events.size() == total;
        case WaitFor::kAllCompleted:
          return events.size() == total;
      }
      return true;
    });
  }
  WaitResult found;
  for (size_t i = 0; i < total; ++i) {
    (results[i].done() ? found.done : found.not_done).push_back(i);
  }
  return found;
}

template <std::ranges::input_range Results>
  requires std::convertible_to<std::ranges::range_reference_t<Results>, AnyAsyncResult> &&
           (!std::convertible_to<Results, absl::Span<const AnyAsyncResult>>)
WaitResult wait(Results&& results, WaitFor return_when, absl::Duration timeout) {
  std::vector<AnyAsyncResult> any;
  for (auto&& result : results) any.emplace_back(result);
  return wait(absl::Span<const AnyAsyncResult>(any), return_when, timeout);
}

inline AsCompleted::AsCompleted(std::vector<AnyAsyncResult> results, absl::Duration timeout)
    : state_(std::make_unique<State>()) {
  state_->deadline =
      timeout == absl::InfiniteDuration() ? absl::InfiniteFuture() : absl::Now() + timeout;
  state_->results = std::move(results);
  state_->total = state_->results.size();
  state_->notifier = std::make_shared<internal::DoneNotifier>();
  // Those already in notify at once, so in input order.
  for (size_t i = 0; i < state_->total; ++i) {
    state_->results[i].state().add_listener(state_->notifier, i);
  }
}

inline std::optional<absl::StatusOr<size_t>>& AsCompleted::State::fetch() {
  State& s = *this;
  if (!s.need_fetch) return s.current;
  s.need_fetch = false;
  s.current.reset();
  if (s.ended || s.yielded == s.total) return s.current;
  if (std::optional<internal::DoneNotifier::Event> event = s.notifier->take(s.deadline)) {
    ++s.yielded;
    s.current.emplace(event->index);
  } else {
    s.ended = true;
    s.current.emplace(absl::DeadlineExceededError(
        absl::StrCat("as_completed: ", s.total - s.yielded, " of ", s.total,
                     " results were not in by the deadline")));
  }
  return s.current;
}

inline void AsCompleted::State::consume() {
  fetch();
  need_fetch = true;
}
/// \endcond

}  // namespace procpool

#endif  // PROCPOOL_WAIT_H_
