// Test hooks for faults that cannot be produced on demand otherwise. Not part of the public API.

#ifndef PROCPOOL_LIB_FAULT_INJECTION_H_
#define PROCPOOL_LIB_FAULT_INJECTION_H_

namespace procpool::internal {

// The next `count` forks this process makes for procpool (workers and fork servers) fail with
// `error`, as fork() does with a full process table. A count of 0 stops it.
void inject_fork_failures(int count, int error);

// The errno the next fork should fail with, or 0 (and counts it down). For lib/ only.
int take_injected_fork_failure();

// The next `count` requests a fork server started after this call serves throw std::bad_alloc
// there, as an allocation that fails would (the server inherits the count when it is forked).
void inject_fork_server_exceptions(int count);

// Whether the request being served should throw (and counts it down). For lib/ only.
bool take_injected_fork_server_exception();

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_FAULT_INJECTION_H_
