// WorkerTraits<W>: what a worker type offers, found at compile time.
//
// A worker declares `using Job = ...; using Result = ...;` or lets them be deduced from a single,
// non-overloaded `run`: one parameter gives Job = that parameter's type; several give
// Job = std::tuple of them (for starmap). `run` may return Result or absl::StatusOr<Result>.
// `run` may also return void or absl::Status: a task with no value (Result is then void, and
// std::monostate, written as the wire's `none`, crosses the boundary).
// `enter()` and `exit()` are optional and may return void or absl::Status.

#ifndef PROCPOOL_INTERNAL_WORKER_TRAITS_H_
#define PROCPOOL_INTERNAL_WORKER_TRAITS_H_

#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace procpool::internal {

template <typename T>
struct IsStatusOr : std::false_type {};
template <typename T>
struct IsStatusOr<absl::StatusOr<T>> : std::true_type {
  using Value = T;
};

template <typename T>
struct UnwrapStatusOr {
  using type = T;
};
template <typename T>
struct UnwrapStatusOr<absl::StatusOr<T>> {
  using type = T;
};

// The Result a task's return type gives: T for T and absl::StatusOr<T>; void for void and
// absl::Status (a task with no value).
template <typename R>
struct ResultOfReturn {
  using type = typename UnwrapStatusOr<R>::type;
};
template <>
struct ResultOfReturn<void> {
  using type = void;
};
template <>
struct ResultOfReturn<absl::Status> {
  using type = void;
};

// What holds a Result in the parent and on the wire: the Result, or std::monostate (`none`) for
// void.
template <typename R>
using Stored = std::conditional_t<std::is_void_v<R>, std::monostate, R>;

// What a call that yields one Result returns: absl::StatusOr<Result>, or absl::Status for void.
template <typename R>
using OutcomeOf = std::conditional_t<std::is_void_v<R>, absl::Status, absl::StatusOr<R>>;

// A stored outcome as its OutcomeOf: drops the std::monostate of a void Result.
template <typename R>
OutcomeOf<R> to_outcome(absl::StatusOr<Stored<R>> stored) {
  if constexpr (std::is_void_v<R>) {
    return stored.status();
  } else {
    return stored;
  }
}

template <typename F>
struct MemberFunction;
#define PROCPOOL_MEMBER_FUNCTION(QUALIFIERS)                          \
  template <typename R, typename C, typename... A>                    \
  struct MemberFunction<R (C::*)(A...) QUALIFIERS> {                  \
    using Return = R;                                                 \
    using Args = std::tuple<std::remove_cvref_t<A>...>;               \
    static constexpr size_t kArity = sizeof...(A);                    \
  };
PROCPOOL_MEMBER_FUNCTION()
PROCPOOL_MEMBER_FUNCTION(const)
PROCPOOL_MEMBER_FUNCTION(noexcept)
PROCPOOL_MEMBER_FUNCTION(const noexcept)
PROCPOOL_MEMBER_FUNCTION(&)
PROCPOOL_MEMBER_FUNCTION(const&)
#undef PROCPOOL_MEMBER_FUNCTION

template <typename W>
concept DeclaresJob = requires { typename W::Job; };
template <typename W>
concept DeclaresResult = requires { typename W::Result; };

template <typename W, bool = DeclaresJob<W>>
struct JobOf {
  using type = typename W::Job;
};
template <typename W>
struct JobOf<W, false> {
  using Run = MemberFunction<decltype(&W::run)>;
  using type = std::conditional_t<Run::kArity == 1, std::tuple_element_t<0, typename Run::Args>,
                                  typename Run::Args>;
};

// Calls w.run(job), or std::apply(w.run, job) when run takes the tuple's elements.
template <typename W, typename Job>
decltype(auto) invoke_run(W& worker, const Job& job) {
  if constexpr (requires { worker.run(job); }) {
    return worker.run(job);
  } else {
    return std::apply([&worker](const auto&... args) -> decltype(auto) { return worker.run(args...); },
                      job);
  }
}

template <typename W, typename Result>
constexpr bool declared_result_matches() {
  if constexpr (DeclaresResult<W>) {
    return std::is_same_v<typename W::Result, Result>;
  } else {
    return true;
  }
}

template <typename W>
struct WorkerTraits {
  using Job = typename JobOf<W>::type;
  using RunReturn = std::remove_cvref_t<decltype(invoke_run(std::declval<W&>(), std::declval<const Job&>()))>;
  using Result = typename ResultOfReturn<RunReturn>::type;
  static constexpr bool kRunReturnsStatusOr = IsStatusOr<RunReturn>::value;
  static constexpr bool kHasEnter = requires(W& w) { w.enter(); };
  static constexpr bool kHasExit = requires(W& w) { w.exit(); };
  static constexpr bool kRunTakesTuple = !requires(W& w, const Job& job) { w.run(job); };

  static_assert(declared_result_matches<W, Result>(),
                "W::Result does not match what W::run returns (Result or absl::StatusOr<Result>)");
};

// Runs a hook that returns void or absl::Status.
template <typename F>
absl::Status run_hook(F&& hook) {
  if constexpr (std::is_void_v<decltype(hook())>) {
    hook();
    return absl::OkStatus();
  } else {
    return hook();
  }
}

}  // namespace procpool::internal

#endif  // PROCPOOL_INTERNAL_WORKER_TRAITS_H_
