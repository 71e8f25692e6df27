// Plain functions as tasks, for procpool::Pool.
//
// A task of a function call carries two addresses: the function's and that of a trampoline
// instantiated for its signature, which decodes the job, calls the function and encodes the
// result. They are valid in the worker because a worker is a fork() of the parent: the same
// image at the same addresses. Nothing needs registering.

#ifndef PROCPOOL_INTERNAL_FUNCTION_WORKER_H_
#define PROCPOOL_INTERNAL_FUNCTION_WORKER_H_

#include <cstdint>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#include "absl/status/status.h"
#include "procpool/internal/call.h"
#include "procpool/internal/typed_worker_body.h"
#include "procpool/internal/worker_body.h"
#include "procpool/internal/worker_traits.h"

namespace procpool::internal {

using Trampoline = void (*)(uint64_t function, wire::Value::Reader job, wire::Outcome::Builder out);

template <typename F>
struct FunctionTraits;
template <typename R, typename... Args>
struct FunctionTraits<R (*)(Args...)> {
  static_assert(sizeof...(Args) >= 1, "a task function takes at least one parameter");
  using Pointer = R (*)(Args...);
  using Job = std::conditional_t<sizeof...(Args) == 1,
                                 std::remove_cvref_t<std::tuple_element_t<0, std::tuple<Args...>>>,
                                 std::tuple<std::remove_cvref_t<Args>...>>;
  using Result = typename ResultOfReturn<std::remove_cvref_t<R>>::type;  // void for void, Status
  static constexpr bool kTakesTuple = sizeof...(Args) > 1;

  static void trampoline(uint64_t function, wire::Value::Reader job, wire::Outcome::Builder out) {
    auto pointer = reinterpret_cast<Pointer>(function);
    static Job scratch;  // one per job type, in the worker (run_task)
    run_task<Job>(job, out, scratch, [pointer](const Job& decoded) -> decltype(auto) {
      if constexpr (kTakesTuple) {
        return std::apply(pointer, decoded);
      } else {
        return pointer(decoded);
      }
    });
  }
};

// The function pointer a callable converts to: a function, a function pointer, or a lambda
// without captures.
template <typename F>
using FunctionPointerOf = decltype(+std::declval<F>());

template <typename F>
concept TaskFunction = requires { typename FunctionTraits<FunctionPointerOf<F>>; } &&
                       std::is_pointer_v<FunctionPointerOf<F>>;

// The settings a call of `f` adds: where its trampoline and the function itself are.
template <typename F>
CallSettings function_settings(F f) {
  using Traits = FunctionTraits<FunctionPointerOf<F>>;
  CallSettings settings;
  settings.trampoline = reinterpret_cast<uint64_t>(&Traits::trampoline);
  settings.function = reinterpret_cast<uint64_t>(static_cast<typename Traits::Pointer>(+f));
  return settings;
}

// The worker body of a Pool: no state, no hooks; each batch names the function to run.
class FunctionWorkerBody final : public WorkerBody {
 public:
  absl::Status enter() override { return absl::OkStatus(); }
  void run(wire::TaskBatch::Reader batch, wire::Value::Reader job,
           wire::Outcome::Builder out) override {
    if (batch.getTrampoline() == 0 || batch.getFunction() == 0) {
      set_error(out, absl::InternalError("a function task without a function"));
      return;
    }
    reinterpret_cast<Trampoline>(batch.getTrampoline())(batch.getFunction(), job, out);
  }
  absl::Status exit() override { return absl::OkStatus(); }
};

}  // namespace procpool::internal

#endif  // PROCPOOL_INTERNAL_FUNCTION_WORKER_H_
