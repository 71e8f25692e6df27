// The worker types a program's ProcessPools use, so that procpool::serve(argc, argv) can serve
// whichever one a pool asks for (a program that is both the pool and its workers).
//
// Every ProcessPool<W> with a default-constructible W registers W when the program starts (a
// static initializer of the template, run in every process that runs the program, a freshly
// started worker program included). Types built by a factory cannot be registered: serve them
// with procpool::serve<W>(argc, argv, factory).

#ifndef PROCPOOL_INTERNAL_WORKER_REGISTRY_H_
#define PROCPOOL_INTERNAL_WORKER_REGISTRY_H_

#include <concepts>
#include <functional>
#include <memory>
#include <string>

#include "procpool/internal/typed_worker_body.h"
#include "procpool/internal/worker_body.h"

namespace procpool::internal {

// Records that `worker_type` is served by `factory`. Thread-safe; the first registration wins.
void register_worker_type(const std::string& worker_type, WorkerBodyFactory factory);
// The factory of a registered worker type, or null. Valid for the program's lifetime.
const WorkerBodyFactory* find_worker_type(const std::string& worker_type);

template <typename W>
struct WorkerRegistration {
  static bool add() {
    if constexpr (std::default_initializable<W>) {
      static const std::function<std::unique_ptr<W>()> make = [] { return std::make_unique<W>(); };
      register_worker_type(worker_type_name<W>(),
                           [] { return std::make_unique<TypedWorkerBody<W>>(&make); });
      return true;
    } else {
      return false;
    }
  }
  static inline const bool registered = add();
};

}  // namespace procpool::internal

#endif  // PROCPOOL_INTERNAL_WORKER_REGISTRY_H_
