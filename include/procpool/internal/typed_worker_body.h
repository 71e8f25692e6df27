// TypedWorkerBody<W>: the WorkerBody for a user worker type W.
//
// Lives in the worker process. enter() builds W (through the user's factory, or W's default
// constructor) and runs W::enter if it has one; run() decodes the job, calls W::run and encodes
// what it returns; exit() runs W::exit and destroys W. Every exception user code throws is caught
// here and becomes a status: the worker keeps serving.

#ifndef PROCPOOL_INTERNAL_TYPED_WORKER_BODY_H_
#define PROCPOOL_INTERNAL_TYPED_WORKER_BODY_H_

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <typeinfo>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "procpool/codec.h"
#include "procpool/internal/packed.h"
#include "procpool/internal/worker_body.h"
#include "procpool/internal/worker_traits.h"

namespace procpool::internal {

// Decodes `job` as Job, calls `invoke(job)` (returning R, absl::StatusOr<R>, void or absl::Status)
// and writes its result (`none` for void and absl::Status), or the error, into `out`. Nothing
// escapes: user exceptions become kUnknown, codec failures kDataLoss (job) or kInvalidArgument
// (result).
template <typename Job, typename Invoke>
void run_task(wire::Value::Reader job, wire::Outcome::Builder out, Invoke&& invoke) {
  absl::StatusOr<Job> decoded = decode_value<Job>(job);
  if (!decoded.ok()) {
    set_error(out, absl::DataLossError(
                       absl::StrCat("could not decode the job: ", decoded.status().message())));
    return;
  }
  using Returned = std::remove_cvref_t<decltype(invoke(*decoded))>;
  if constexpr (std::is_void_v<Returned> || std::is_same_v<Returned, absl::Status>) {
    absl::Status status;
    try {
      if constexpr (std::is_void_v<Returned>) {
        invoke(*decoded);
      } else {
        status = invoke(*decoded);
      }
    } catch (...) {
      status = absl::UnknownError(describe_current_exception());
    }
    if (status.ok()) {
      out.initOk().setNone();
    } else {
      set_error(out, status);
    }
    return;
  } else {
    using Result = typename UnwrapStatusOr<Returned>::type;
    std::optional<Result> result;
    try {
      if constexpr (IsStatusOr<Returned>::value) {
        absl::StatusOr<Result> returned = invoke(*decoded);
        if (!returned.ok()) {
          set_error(out, returned.status());
          return;
        }
        result.emplace(*std::move(returned));
      } else {
        result.emplace(invoke(*decoded));
      }
    } catch (...) {
      set_error(out, absl::UnknownError(describe_current_exception()));
      return;
    }
    try {
      encode_value(*result, out.initOk());
    } catch (...) {
      set_error(out, absl::InvalidArgumentError(absl::StrCat("could not encode the result: ",
                                                             describe_current_exception())));
    }
  }
}

template <typename W>
class TypedWorkerBody final : public WorkerBody {
 public:
  using Traits = WorkerTraits<W>;
  using Job = typename Traits::Job;
  using Result = typename Traits::Result;
  using Factory = std::function<std::unique_ptr<W>()>;
  static constexpr bool kPacked = Scalar<Job> && Scalar<Result>;

  explicit TypedWorkerBody(const Factory* factory) : factory_(factory) {}

  absl::Status enter() override {
    try {
      worker_ = (*factory_)();
      if (worker_ == nullptr) return absl::InternalError("the worker factory returned null");
      if constexpr (Traits::kHasEnter) {
        return run_hook([this] { return worker_->enter(); });
      }
      return absl::OkStatus();
    } catch (...) {
      return absl::UnknownError(absl::StrCat("exception: ", describe_current_exception()));
    }
  }

  void run(wire::TaskBatch::Reader, wire::Value::Reader job,
           wire::Outcome::Builder out) override {
    run_task<Job>(job, out, [this](const Job& decoded) -> decltype(auto) {
      return invoke_run(*worker_, decoded);
    });
  }

  PackedWriter init_packed_results(wire::Value::Builder out, uint32_t count) override {
    if constexpr (kPacked) return PackedWriter::make<Result>(out, count);
    return PackedWriter();
  }

  absl::Status run_packed(const PackedReader& jobs, uint32_t index, PackedWriter& results,
                          uint32_t slot) override {
    if constexpr (kPacked) {
      Job job{};
      if (absl::Status read = jobs.get(index, job); !read.ok()) {
        return absl::DataLossError(absl::StrCat("could not decode the job: ", read.message()));
      }
      try {
        if constexpr (Traits::kRunReturnsStatusOr) {
          absl::StatusOr<Result> returned = invoke_run(*worker_, job);
          if (!returned.ok()) return returned.status();
          results.set<Result>(slot, *returned);
        } else {
          results.set<Result>(slot, invoke_run(*worker_, job));
        }
      } catch (...) {
        return absl::UnknownError(describe_current_exception());
      }
      return absl::OkStatus();
    } else {
      return WorkerBody::run_packed(jobs, index, results, slot);
    }
  }

  absl::Status exit() override {
    absl::Status status;
    try {
      if constexpr (Traits::kHasExit) {
        if (worker_ != nullptr) status = run_hook([this] { return worker_->exit(); });
      }
    } catch (...) {
      status = absl::UnknownError(absl::StrCat("exception: ", describe_current_exception()));
    }
    try {
      worker_.reset();
    } catch (...) {
      if (status.ok()) status = absl::UnknownError(describe_current_exception());
    }
    return status;
  }

 private:
  const Factory* factory_;
  std::unique_ptr<W> worker_;
};

// The identity of W for a remote worker's handshake: the pool and the worker program must agree.
template <typename W>
std::string worker_type_name() {
  using Traits = WorkerTraits<W>;
  return describe_worker_type(typeid(W), typeid(typename Traits::Job), typeid(typename Traits::Result));
}

}  // namespace procpool::internal

#endif  // PROCPOOL_INTERNAL_TYPED_WORKER_BODY_H_
