#include "lib/worker/child_setup.h"

#include <fcntl.h>
#include <signal.h>
#include <stdio_ext.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>

#include "lib/common/child_process.h"

#if defined(__GLIBC__)
// glibc's list of every open FILE (exported since 2.2.5; used by its own fork and exit). Declared
// here because no public header does: an iterator is a FILE*.
extern "C" {
FILE* _IO_iter_begin(void);
FILE* _IO_iter_end(void);
FILE* _IO_iter_next(FILE* iterator);
FILE* _IO_iter_file(FILE* iterator);
}
#endif

namespace procpool::internal {
namespace {

// Set once in prepare_child; read by the signal handlers.
ControlPage* control_page = nullptr;
pid_t pool_pid = 0;
pid_t parent_pid = 0;
pid_t own_pid = 0;

// Every stream's buffer, input and output, is the parent's: drop it without writing it.
void discard_inherited_stdio() {
#if defined(__GLIBC__)
  for (FILE* it = _IO_iter_begin(); it != _IO_iter_end(); it = _IO_iter_next(it)) {
    if (FILE* file = _IO_iter_file(it)) __fpurge(file);
  }
#else
  __fpurge(stdin);
  __fpurge(stdout);
  __fpurge(stderr);
#endif
}

void record_fatal_signal(int signal) {
  // A grandchild (a fork made by user code) shares our page: only our own death counts.
  if (control_page != nullptr && ::getpid() == own_pid) {
    control_page->fatal_signal.store(signal, std::memory_order_relaxed);
  }
}

// Fatal signals: record, restore the default action, and raise the signal again. It is blocked
// while this handler runs, so it is delivered as the handler returns, with its default action.
void on_fatal_signal(int signal, siginfo_t*, void*) {
  record_fatal_signal(signal);
  ::signal(signal, SIG_DFL);
  ::raise(signal);
}

// SIGTERM counts only when the pool sent it (a timeout, terminate(), join's deadline), or the
// fork server that forked this worker, for the pool (on kernels without pidfds only the server
// may signal its workers). One sent to the whole process group, by a terminal or a supervisor,
// is the parent's to act on.
void on_sigterm(int signal, siginfo_t* info, void*) {
  if (info != nullptr && info->si_code == SI_USER && info->si_pid != pool_pid &&
      info->si_pid != parent_pid) {
    return;
  }
  record_fatal_signal(signal);
  ::signal(signal, SIG_DFL);
  ::raise(signal);
}

constexpr int kRecordedSignals[] = {SIGSEGV, SIGBUS,  SIGFPE,  SIGILL,  SIGABRT, SIGTRAP,
                                    SIGSYS,  SIGQUIT, SIGHUP,  SIGUSR1, SIGUSR2, SIGPIPE,
                                    SIGALRM, SIGXCPU, SIGXFSZ, SIGVTALRM, SIGPROF};

void reset_signals() {
  for (int signal = 1; signal < NSIG; ++signal) {
    if (signal == SIGKILL || signal == SIGSTOP) continue;
    std::signal(signal, SIG_DFL);
  }
  std::signal(SIGINT, SIG_IGN);

  // A stack of its own for the fatal handlers: a stack overflow must still be recorded.
  static char alternate_stack[64 * 1024];
  stack_t stack{};
  stack.ss_sp = alternate_stack;
  stack.ss_size = sizeof(alternate_stack);
  ::sigaltstack(&stack, nullptr);

  struct sigaction fatal {};
  fatal.sa_sigaction = on_fatal_signal;
  fatal.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESETHAND;
  sigemptyset(&fatal.sa_mask);
  if (control_page != nullptr) {
    for (int signal : kRecordedSignals) ::sigaction(signal, &fatal, nullptr);
  }
  struct sigaction term {};
  term.sa_sigaction = on_sigterm;
  term.sa_flags = SA_SIGINFO;
  sigemptyset(&term.sa_mask);
  ::sigaction(SIGTERM, &term, nullptr);

  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
}

bool fd_open(int fd) { return ::fcntl(fd, F_GETFD) >= 0; }

void arrange_descriptors(int channel_fd) {
  if (channel_fd != kChildChannelFd) {
    ::dup3(channel_fd, kChildChannelFd, O_CLOEXEC);
    // The channel's old number is closed now, or below (over 3), or reopened on /dev/null (0-2).
    if (channel_fd <= 2) ::close(channel_fd);
  }
  // Every other descriptor the parent had open (its other workers' channels, its files) closes.
  close_descriptors_from(kChildChannelFd + 1);
  for (int fd = 0; fd <= 2; ++fd) {
    if (fd_open(fd)) continue;
    const int null_fd = ::open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY);
    if (null_fd >= 0 && null_fd != fd) {
      ::dup2(null_fd, fd);
      ::close(null_fd);
    }
  }
}

}  // namespace

void prepare_child(const ChildSetup& setup) {
  discard_inherited_stdio();
  own_pid = ::getpid();
  control_page = setup.page;
  pool_pid = setup.pool_pid;
  parent_pid = setup.parent_pid;
  ::prctl(PR_SET_NAME, setup.process_name.c_str(), 0, 0, 0);
  if (setup.parent_death_signal) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    // The parent may have died before the line above: then nobody will signal us.
    if (::getppid() != setup.parent_pid) ::_exit(kWorkerExitOk);
  }
  reset_signals();
  arrange_descriptors(setup.channel_fd);
}

void leave(int status) {
  if (control_page != nullptr) control_page->exit_status.store(status, std::memory_order_relaxed);
  std::fflush(nullptr);
  ::_exit(status);
}

}  // namespace procpool::internal
