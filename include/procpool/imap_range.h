/// \file
/// `ImapRange`: what imap and imap_unordered return, an input range (and a move-only view) of
/// `absl::StatusOr<Result>` (`absl::Status` when the tasks return no value).
///
/// ```cpp
/// for (absl::StatusOr<int64_t> square : pool.imap(std::views::iota(0))) {
///   if (!square.ok()) ...;
///   if (*square > 1000) break;  // cancels what was not started; the pool stays usable
/// }
/// for (absl::StatusOr<int64_t> square : pool.imap(jobs) | std::views::take(10)) ...
/// ```
///
/// The input is pulled lazily, on the consuming thread, as results are consumed: at most
/// `max_in_flight` jobs are taken and not yet consumed, so an endless input keeps the parent's
/// memory flat and the first result arrives while the input is still being produced. Each element
/// is waited for only when it is looked at (dereferenced or compared with `end()`), so a
/// `std::views::take(n)` stops after n results without waiting for one more. The input (a
/// container, a view, a generator-like range) is held by reference when an lvalue, by value when
/// an rvalue. Leaving the loop early, or destroying the range, cancels tasks not yet started;
/// tasks already running finish in the background and are discarded.
///
/// Errors arrive as elements, never as exceptions: a task's failure is its element's status, and
/// the range goes on.
///
/// One pass, one consuming thread. Moving the range keeps its iterators valid. The range must not
/// outlive its pool. If the pool refuses more jobs while a range is in use (it was closed or
/// terminated: kFailedPrecondition; no worker can start: that failure), the next element is that
/// status and the range ends: every element before it is the outcome of the job in its place, and
/// none comes after it (tasks already sent run on, their results dropped with the range). A close()
/// after the range took its whole input refuses nothing: every outcome comes.

#ifndef PROCPOOL_IMAP_RANGE_H_
#define PROCPOOL_IMAP_RANGE_H_

#include <algorithm>
#include <cstddef>
#include <iterator>
#include <memory>
#include <optional>
#include <ranges>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "procpool/internal/imap_call.h"
#include "procpool/internal/pool_core.h"
#include "procpool/internal/worker_traits.h"

namespace procpool {

/// The lazy results of one imap or imap_unordered call: an input range of `Outcome`, one per job
/// taken from `Input` (see the file comment). Move-only; one pass, one consuming thread.
template <typename Job, typename Result, std::ranges::input_range Input>
///
/// A view through `std::ranges::view_base`, not `view_interface`: an input range gets nothing
/// from the latter, and clang (before 16) rejects `view_interface` of a class not complete yet.
class ImapRange : public std::ranges::view_base {
  struct State;

 public:
  /// `absl::StatusOr<Result>`, or `absl::Status` for a void Result.
  using Outcome = internal::OutcomeOf<Result>;
  /// The call behind the range (implementation detail).
  using ImapCallType = internal::ImapCall<Job, internal::Stored<Result>>;

  /// The range's input iterator. Every copy refers to the range's one position.
  class iterator {
   public:
    /// An input iterator.
    using iterator_concept = std::input_iterator_tag;
    /// An input iterator.
    using iterator_category = std::input_iterator_tag;
    /// Required of an iterator; never used.
    using difference_type = std::ptrdiff_t;
    /// What it yields: the outcome of one task.
    using value_type = Outcome;

    /// An iterator of no range, equal to `end()`.
    iterator() = default;
    /// The current element. Blocks, with no bound, until the element is in (the first time it is
    /// looked at); a task's failure is the element's status, not an exception.
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
    /// True at the end. Blocks like `operator*`: whether there is a next element is known only
    /// when it is in.
    friend bool operator==(const iterator& it, std::default_sentinel_t) {
      return it.state_ == nullptr || !it.state_->fetch().has_value();
    }

   private:
    friend class ImapRange;
    explicit iterator(State* state) : state_(state) {}
    State* state_ = nullptr;
  };

  /// An empty range.
  ImapRange() = default;
  /// Made by imap and imap_unordered; not meant to be called by users.
  ImapRange(internal::PoolCore* core, std::shared_ptr<ImapCallType> call, Input input,
            size_t chunksize, size_t max_in_flight)
      : state_(std::make_unique<State>(core, std::move(call), std::move(input), chunksize,
                                       max_in_flight)) {}
  /// Moves the range; iterators stay valid (they point into its state, which does not move).
  ImapRange(ImapRange&&) noexcept = default;
  /// Moves the range; the range assigned to is dropped first (cancelling its unstarted tasks).
  ImapRange& operator=(ImapRange&&) noexcept = default;

  /// Starts the iteration. Call once. Takes no job before the first element is looked at; never
  /// blocks.
  iterator begin() { return iterator(state_.get()); }
  /// The end sentinel.
  std::default_sentinel_t end() const { return {}; }

  /// Jobs taken from the input whose outcome has not been consumed yet (for tests and monitors).
  /// Never blocks.
  size_t in_flight() const { return state_ == nullptr ? 0 : state_->submitted - state_->consumed; }

 private:
  struct State {
    State(internal::PoolCore* core_in, std::shared_ptr<ImapCallType> call_in, Input input_in,
          size_t chunksize_in, size_t max_in_flight_in)
        : core(core_in),
          call(std::move(call_in)),
          input(std::move(input_in)),
          next(std::ranges::begin(input)),
          chunksize(std::max<size_t>(1, chunksize_in)),
          max_in_flight(std::max(max_in_flight_in, chunksize)) {}
    State(const State&) = delete;
    State& operator=(const State&) = delete;
    ~State() {
      if (submitted > consumed) core->cancel(call);
    }

    std::optional<Outcome>& fetch() {
      if (need_fetch) {
        need_fetch = false;
        advance();
      }
      return current;
    }

    void consume() {
      fetch();  // a step past an element nobody looked at still takes it
      need_fetch = true;
    }

    // A refusal (the pool was closed or terminated, or no worker can start) is the next element,
    // in the place of the first job refused, and the range ends there: nothing after it could line
    // up with its input.
    void advance() {
      current.reset();
      if (ended) return;
      refill();
      if (refusal) {
        current.emplace(*std::move(refusal));
        refusal.reset();
        ended = true;
        return;
      }
      if (submitted == consumed) return;  // input exhausted and everything consumed
      current.emplace(internal::to_outcome<Result>(call->next()));
      ++consumed;
    }

    // Takes jobs from the input, a chunk at a time, while a whole chunk more fits in
    // max_in_flight (and the call has a free block for it: see imap_call.h).
    void refill() {
      // Whole chunks only: refilling as soon as one slot frees would send chunks of one task.
      while (!input_done && submitted - consumed + chunksize <= max_in_flight) {
        const std::optional<size_t> first = call->take_block();
        if (!first) break;
        size_t count = 0;
        while (count < chunksize) {
          if (next == std::ranges::end(input)) {
            input_done = true;
            break;
          }
          call->job(*first + count) = Job(*next);
          ++count;
          ++next;
        }
        if (count == 0) {
          call->give_back(*first);
          break;
        }
        // The call's bookkeeping of the block is the consuming thread's own: it may follow the
        // submission, and a refused block goes back unused.
        if (absl::Status submitted_now = core->submit(call, *first, count); !submitted_now.ok()) {
          call->give_back(*first);
          refusal = std::move(submitted_now);
          input_done = true;
          return;
        }
        call->submitted(*first, count);
        submitted += count;
      }
    }

    internal::PoolCore* core;
    std::shared_ptr<ImapCallType> call;
    Input input;
    std::ranges::iterator_t<Input> next;
    const size_t chunksize;
    const size_t max_in_flight;
    size_t submitted = 0;
    size_t consumed = 0;
    bool input_done = false;
    bool need_fetch = true;
    bool ended = false;  // the refusal was yielded
    std::optional<absl::Status> refusal;  // why the pool took no more jobs, until yielded
    std::optional<Outcome> current;
  };

  std::unique_ptr<State> state_;
};

}  // namespace procpool

#endif  // PROCPOOL_IMAP_RANGE_H_
