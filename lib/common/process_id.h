// This process's id without a system call per ask.
//
// glibc stopped caching getpid() in 2.25, and the pool asks on every call (a pool used from a
// process it was inherited by must refuse: pool_core.cc). The id is cached here and forgotten in
// every child of fork() (pthread_atfork), so a forked worker asks the kernel again. A child made
// by a raw clone() system call, which runs no fork handlers, would see its parent's id: nothing
// in procpool makes one.

#ifndef PROCPOOL_LIB_COMMON_PROCESS_ID_H_
#define PROCPOOL_LIB_COMMON_PROCESS_ID_H_

#include <sys/types.h>

namespace procpool::internal {

pid_t current_pid();

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_COMMON_PROCESS_ID_H_
