// A kernel before Linux 5.3, as seen from user space: install_enosys_filter() makes
// pidfd_open, pidfd_send_signal, clone3 and close_range fail with ENOSYS in the calling process
// (every thread of it) and in everything it forks or execs from then on, as they fail on
// RHEL 8 / Rocky 8 (Linux 4.18). It is a seccomp filter, so it cannot be removed again, and it
// sets PR_SET_NO_NEW_PRIVS (no set-user-ID program gains privileges under it).
//
// Used by tools/enosys_run (a launcher: CI runs suites under it) and by tests that put themselves
// on such a kernel. Not part of the library.

#ifndef PROCPOOL_TOOLS_ENOSYS_FILTER_H_
#define PROCPOOL_TOOLS_ENOSYS_FILTER_H_

namespace procpool::tools {

// Returns 0, or the errno of the prctl/seccomp call that failed (nothing is installed then).
int install_enosys_filter();

}  // namespace procpool::tools

#endif  // PROCPOOL_TOOLS_ENOSYS_FILTER_H_
