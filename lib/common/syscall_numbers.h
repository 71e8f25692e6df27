// System call numbers of calls newer than some kernel headers we build with (RHEL 8's lack them).
// They are the same on every architecture: the common table from 424 on. The library asks the
// kernel for them (child_process.cc) and copes with ENOSYS; tools/enosys_filter.cc makes exactly
// these fail, to test that.

#ifndef PROCPOOL_LIB_COMMON_SYSCALL_NUMBERS_H_
#define PROCPOOL_LIB_COMMON_SYSCALL_NUMBERS_H_

#include <sys/syscall.h>

#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_clone3
#define SYS_clone3 435
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif

#endif  // PROCPOOL_LIB_COMMON_SYSCALL_NUMBERS_H_
