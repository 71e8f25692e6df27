#include "lib/worker/child_setup.h"

#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio_ext.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>
#include <unwind.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "lib/common/child_process.h"
#include "procpool/internal/worker_body.h"

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
bool record_stacks = false;
// The thread (its tid) recording a crash's stack now, or 0 (on_fatal_signal).
std::atomic<pid_t> recording_thread{0};
// Whether a crash's stack was recorded in this process: only the first is. Ours, not the page's
// crash_stack_bytes, which a task may have overwritten before it crashed (its stack would then be
// whatever the task left there).
bool crash_stack_recorded = false;
// Set while that thread unwinds, and where a fault of the unwinder's escapes to
// (record_crash_stack).
volatile sig_atomic_t unwinding = 0;
sigjmp_buf unwind_escape;

// The signals whose deaths come with a stack (kCrashSignals, control_page.h) are also those whose
// handlers of the program's are chained.

// The program's handlers for the crash signals, called after the stack is recorded. Only those it
// installed itself count: a handler already there when this library was loaded (a sanitizer's,
// whose report would end the worker with an exit status instead of its signal) is not chained.
// Taken once per line of descent: a fork server's workers chain what the program had when the
// server was forked (the server itself resets every handler).
struct sigaction startup_actions[NSIG];
struct sigaction chained_actions[NSIG];
bool chained[NSIG] = {};
bool chain_taken = false;

bool same_handler(const struct sigaction& a, const struct sigaction& b) {
  return reinterpret_cast<void*>(a.sa_sigaction) == reinterpret_cast<void*>(b.sa_sigaction);
}

const bool startup_actions_taken = [] {
  for (int signal : kCrashSignals) ::sigaction(signal, nullptr, &startup_actions[signal]);
  return true;
}();

void take_chained_handlers() {
  if (chain_taken) return;
  chain_taken = true;
  for (int signal : kCrashSignals) {
    struct sigaction current {};
    if (::sigaction(signal, nullptr, &current) != 0) continue;
    const bool installed = current.sa_handler != SIG_DFL && current.sa_handler != SIG_IGN;
    if (installed && !(startup_actions_taken && same_handler(current, startup_actions[signal]))) {
      chained_actions[signal] = current;
      chained[signal] = true;
    }
  }
}

// Async-signal-safe text into the page's crash_stack, which is published whole at the end.
class StackWriter {
 public:
  explicit StackWriter(ControlPage& page) : page_(page) {}
  void text(const char* s) { bytes(s, std::strlen(s)); }
  void bytes(const char* s, size_t n) {
    for (size_t i = 0; i < n && at_ < ControlPage::kCrashStackBytes; ++i) page_.crash_stack[at_++] = s[i];
  }
  void number(uint64_t value, int base) {
    char digits[24];
    int n = 0;
    do {
      digits[n++] = "0123456789abcdef"[value % base];
      value /= base;
    } while (value != 0 && n < 24);
    while (n > 0) bytes(&digits[--n], 1);
  }
  void publish() { page_.crash_stack_bytes.store(at_, std::memory_order_release); }

 private:
  ControlPage& page_;
  uint32_t at_ = 0;
};

uintptr_t interrupted_pc(const void* context) {
  if (context == nullptr) return 0;
  const auto* uc = static_cast<const ucontext_t*>(context);
#if defined(__x86_64__)
  return static_cast<uintptr_t>(uc->uc_mcontext.gregs[REG_RIP]);
#elif defined(__aarch64__)
  return static_cast<uintptr_t>(uc->uc_mcontext.pc);
#else
  (void)uc;
  return 0;
#endif
}

// The crashing thread's frames, as the unwinder found them: return addresses (the first, the
// signal frame's, is the interrupted pc itself), and for the last frame the stack and frame
// pointers as the unwinder restored them there.
struct UnwoundStack {
  static constexpr int kMaxFrames = 48;
  uintptr_t pcs[kMaxFrames];
  int depth = 0;
  uintptr_t last_sp = 0;
  uintptr_t last_fp = 0;
};

_Unwind_Reason_Code record_frame(_Unwind_Context* context, void* argument) {
  UnwoundStack& stack = *static_cast<UnwoundStack*>(argument);
  if (stack.depth == UnwoundStack::kMaxFrames) return _URC_END_OF_STACK;
  stack.pcs[stack.depth++] = static_cast<uintptr_t>(_Unwind_GetIP(context));
#if defined(__x86_64__)
  // The frame's own stack pointer is the CFA of the frame below it (the one just unwound); rbp is
  // DWARF register 6.
  stack.last_sp = static_cast<uintptr_t>(_Unwind_GetCFA(context));
  stack.last_fp = static_cast<uintptr_t>(_Unwind_GetGR(context, 6));
#endif
  return _URC_NO_REASON;
}

#if defined(__x86_64__)
// What a crash handler may know of its address space, read from /proc/self/maps with open and
// read (async-signal-safe): the code it may read, and the stack that holds one address.
class AddressSpace {
 public:
  // Reads the maps; `stack_address` picks the stack (a writable anonymous mapping).
  bool read(uintptr_t stack_address) {
    const int fd = ::open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return false;
    char buffer[2048];
    char line[160];
    size_t line_length = 0;
    ssize_t n;
    while ((n = ::read(fd, buffer, sizeof(buffer))) > 0) {
      for (ssize_t i = 0; i < n; ++i) {
        if (buffer[i] == '\n') {
          add(line, line_length, stack_address);
          line_length = 0;
        } else if (line_length < sizeof(line)) {
          line[line_length++] = buffer[i];  // the fields before the path fit; the rest is unused
        }
      }
    }
    ::close(fd);
    return n == 0;
  }

  // [begin, end) lies in one readable, executable mapping.
  bool is_code(uintptr_t begin, uintptr_t end) const {
    for (int i = 0; i < code_count_; ++i) {
      if (begin >= code_begin_[i] && begin <= end && end <= code_end_[i]) return true;
    }
    return false;
  }

  // Two words at `address`, aligned, lie on the stack.
  bool holds_frame(uintptr_t address) const {
    return stack_end_ - stack_begin_ >= 16 && address >= stack_begin_ &&
           address <= stack_end_ - 16 && address % 8 == 0;
  }

 private:
  static bool hex(const char*& p, const char* end, uintptr_t& value) {
    value = 0;
    const char* start = p;
    for (; p < end && p - start < 16; ++p) {
      const char c = *p;
      const int digit = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
      if (digit < 0) break;
      value = value * 16 + static_cast<uintptr_t>(digit);
    }
    return p > start;
  }

  // "begin-end perms offset dev inode path"
  void add(const char* line, size_t length, uintptr_t stack_address) {
    const char* p = line;
    const char* end = line + length;
    uintptr_t begin, finish, offset;
    if (!hex(p, end, begin) || p == end || *p++ != '-' || !hex(p, end, finish) || p == end ||
        *p++ != ' ' || end - p < 5) {
      return;
    }
    const bool readable = p[0] == 'r', writable = p[1] == 'w', executable = p[2] == 'x';
    p += 5;
    if (!hex(p, end, offset) || p == end || *p++ != ' ') return;
    while (p < end && *p != ' ') ++p;  // the device
    if (p == end || *p++ != ' ' || p == end) return;
    const bool anonymous = *p == '0' && (p + 1 == end || p[1] == ' ');  // inode 0
    if (readable && executable && code_count_ < kMaxCode) {
      code_begin_[code_count_] = begin;
      code_end_[code_count_] = finish;
      ++code_count_;
    }
    if (readable && writable && anonymous && stack_address >= begin && stack_address < finish) {
      stack_begin_ = begin;
      stack_end_ = finish;
    }
  }

  static constexpr int kMaxCode = 128;
  uintptr_t code_begin_[kMaxCode];
  uintptr_t code_end_[kMaxCode];
  int code_count_ = 0;
  uintptr_t stack_begin_ = 0;
  uintptr_t stack_end_ = 0;
};

// clang emits __clang_call_terminate, which a noexcept function's landing pad calls, without
// unwind tables unless debug info is on: the unwinder stops in it, before the frames that threw.
// Its code is `push %rax; call __cxa_begin_catch; call std::terminate`, so its return address
// lies one word above its stack pointer (the CFA of std::terminate's frame), and rbp is still its
// caller's. From there the frame pointers lead on, as far as each one is on this stack, above the
// last, and each return address is in code. Nothing is read that the maps do not show mapped.
__attribute__((no_sanitize("address"))) void continue_past_clang_call_terminate(
    UnwoundStack& stack) {
  if (stack.depth == 0 || stack.depth == UnwoundStack::kMaxFrames) return;
  const uintptr_t pc = stack.pcs[stack.depth - 1];
  constexpr uintptr_t kCallTerminateBytes = 11;
  AddressSpace space;
  if (pc < kCallTerminateBytes || !space.read(stack.last_sp) ||
      !space.is_code(pc - kCallTerminateBytes, pc)) {
    return;
  }
  const auto* code = reinterpret_cast<const unsigned char*>(pc - kCallTerminateBytes);
  if (code[0] != 0x50 || code[1] != 0xe8 || code[6] != 0xe8) return;
  if (!space.holds_frame(stack.last_sp)) return;
  auto word_at = [](uintptr_t address) { return *reinterpret_cast<const uintptr_t*>(address); };
  uintptr_t return_address = word_at(stack.last_sp + 8);
  uintptr_t floor = stack.last_sp + 16;
  uintptr_t fp = stack.last_fp;
  while (stack.depth < UnwoundStack::kMaxFrames && return_address > 0 &&
         space.is_code(return_address - 1, return_address)) {
    stack.pcs[stack.depth++] = return_address;
    if (fp < floor || fp % 16 != 0 || !space.holds_frame(fp)) break;
    return_address = word_at(fp + 8);
    floor = fp + 16;
    fp = word_at(fp);
  }
}
#endif

// Where each frame of a crash is: the file mapped there and the offset in it, from
// /proc/self/maps (async-signal-safe: open, read and close, into static buffers). The process
// that reads the stack names the functions (crash_stack_text, lib/common/elf_symbols.h).
struct FramePlaces {
  static constexpr int kMaxFiles = 16;
  static constexpr size_t kMaxPathBytes = 512;
  char paths[kMaxFiles][kMaxPathBytes];
  int files = 0;
  int file[UnwoundStack::kMaxFrames];  // index in `paths`, or -1: not in a file
  uint64_t offset[UnwoundStack::kMaxFrames];
};

uint64_t parse_hex(const char*& at) {
  uint64_t value = 0;
  while (true) {
    const char c = *at;
    int digit;
    if (c >= '0' && c <= '9') {
      digit = c - '0';
    } else if (c >= 'a' && c <= 'f') {
      digit = c - 'a' + 10;
    } else {
      return value;
    }
    value = value * 16 + static_cast<uint64_t>(digit);
    ++at;
  }
}

const char* skip_field(const char* at) {
  while (*at != '\0' && *at != ' ') ++at;
  while (*at == ' ') ++at;
  return at;
}

// One line of /proc/self/maps: "start-end perms offset dev inode path".
void place_frames_in(const char* line, const uintptr_t* lookups, int depth, FramePlaces& places) {
  const char* at = line;
  const uint64_t start = parse_hex(at);
  if (*at != '-') return;
  ++at;
  const uint64_t end = parse_hex(at);
  if (*at != ' ') return;
  ++at;
  const bool executable = at[0] != '\0' && at[1] != '\0' && at[2] == 'x';
  at = skip_field(at);
  if (!executable) return;
  const uint64_t file_offset = parse_hex(at);
  at = skip_field(skip_field(skip_field(at)));  // the offset, dev and inode
  if (*at != '/') return;  // anonymous, or [vdso] and the like
  const size_t path_bytes = std::strlen(at);
  if (path_bytes >= FramePlaces::kMaxPathBytes) return;
  for (int i = 0; i < depth; ++i) {
    if (places.file[i] >= 0 || lookups[i] < start || lookups[i] >= end) continue;
    int file = 0;
    while (file < places.files && std::strcmp(places.paths[file], at) != 0) ++file;
    if (file == places.files) {
      if (places.files == FramePlaces::kMaxFiles) return;
      std::memcpy(places.paths[file], at, path_bytes + 1);
      ++places.files;
    }
    places.file[i] = file;
    places.offset[i] = lookups[i] - start + file_offset;
  }
}

void place_frames(const uintptr_t* lookups, int depth, FramePlaces& places) {
  places.files = 0;
  for (int i = 0; i < depth; ++i) places.file[i] = -1;
  const int maps = ::open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
  if (maps < 0) return;
  static char chunk[4096];
  static char line[FramePlaces::kMaxPathBytes + 128];
  size_t length = 0;
  bool too_long = false;
  while (true) {
    const ssize_t got = ::read(maps, chunk, sizeof chunk);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) break;
    for (ssize_t i = 0; i < got; ++i) {
      if (chunk[i] == '\n') {
        line[length] = '\0';
        if (!too_long) place_frames_in(line, lookups, depth, places);
        length = 0;
        too_long = false;
      } else if (length + 1 < sizeof line) {
        line[length++] = chunk[i];
      } else {
        too_long = true;  // a path too long to keep: its frames stay unplaced
      }
    }
  }
  ::close(maps);
}

// Writes the crashing thread's stack into the page, innermost first, in the form
// control_page.h describes: a line "@<file> <path>" for each file the frames are in, then one a
// frame, "#3 0x55d0c2a1b2c3 <file>+0x1b2c3" (or "... ?" for a frame in no file). The unwinder
// (libgcc's, which glibc's backtrace() uses too) follows the tables the compiler leaves (through
// the signal frame, and through code built without frame pointers); prepare_crash_stacks ran it
// once before the crash. Where it stops in clang's __clang_call_terminate (code built by clang
// without -g: an exception that left a noexcept function), frame pointers carry the stack on
// past it, on x86-64.
//
// A stack an overrun scribbled on leads the unwinder to a return address that is garbage, which
// it reads as code (looking for a signal frame there): a fault inside this handler, which would
// end the worker with no stack at all (and as SIGSEGV, whatever the crash was). The unwind is
// done with those faults let in and escapes them (on_fatal_signal): the frames found up to the
// garbage are written.
void record_crash_stack(const void* context) {
  // Static, not on this frame: what the unwind wrote before an escape is still there after it.
  static UnwoundStack stack;
  static sigset_t outside_unwind;
  static FramePlaces places;
  static uintptr_t lookups[UnwoundStack::kMaxFrames];
  stack = UnwoundStack();
  if (sigsetjmp(unwind_escape, /*savemask=*/1) == 0) {
    sigset_t faults;
    sigemptyset(&faults);
    sigaddset(&faults, SIGSEGV);
    sigaddset(&faults, SIGBUS);
    ::pthread_sigmask(SIG_UNBLOCK, &faults, &outside_unwind);
    unwinding = 1;
    _Unwind_Backtrace(record_frame, &stack);
#if defined(__x86_64__)
    continue_past_clang_call_terminate(stack);
#endif
    unwinding = 0;
    ::pthread_sigmask(SIG_SETMASK, &outside_unwind, nullptr);
  }
  // After an escape, siglongjmp restored the mask sigsetjmp saved.
  unwinding = 0;
  const uintptr_t* frames = stack.pcs;
  // Frames of this handler come first: start at the interrupted instruction if it is found.
  const uintptr_t pc = interrupted_pc(context);
  int first = stack.depth > 3 ? 3 : 0;
  for (int i = 0; i < stack.depth; ++i) {
    if (frames[i] == pc) {
      first = i;
      break;
    }
  }
  const int depth = stack.depth - first;
  for (int i = 0; i < depth; ++i) {
    // A return address points past its call: look up the call itself (not for the crash's pc).
    lookups[i] = i == 0 ? frames[first] : frames[first + i] - 1;
  }
  place_frames(lookups, depth, places);

  StackWriter out(*control_page);
  for (int file = 0; file < places.files; ++file) {
    out.text("@");
    out.number(static_cast<uint64_t>(file), 10);
    out.text(" ");
    out.text(places.paths[file]);
    out.text("\n");
  }
  for (int i = 0; i < depth; ++i) {
    out.text("#");
    out.number(static_cast<uint64_t>(i), 10);
    out.text(" 0x");
    out.number(frames[first + i], 16);
    if (places.file[i] >= 0) {
      out.text(" ");
      out.number(static_cast<uint64_t>(places.file[i]), 10);
      out.text("+0x");
      out.number(places.offset[i], 16);
      out.text("\n");
    } else {
      out.text(" ?\n");
    }
  }
  out.publish();
}

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

// Fatal signals: record (and for a crash, its stack, then call the program's own handler), restore
// the default action, and raise the signal again. It is blocked while this handler runs, so it is
// delivered as the handler returns, with its default action. A chained handler that does not
// return (it _exits, or raises another signal) ends the worker its own way.
//
// Several threads may crash at once (a loop a task spread over threads, on corrupt data): the
// first records its stack, and any other waits here until it is written, rather than end the
// process (by its own default action) before it is. (So the handler is not SA_RESETHAND.)
void on_fatal_signal(int signal, siginfo_t* info, void* context) {
  if (unwinding && (signal == SIGSEGV || signal == SIGBUS) &&
      recording_thread.load() == static_cast<pid_t>(::syscall(SYS_gettid))) {
    siglongjmp(unwind_escape, 1);  // the unwinder read garbage (record_crash_stack)
  }
  record_fatal_signal(signal);
  const bool crash = is_crash_signal(signal);
  if (crash && record_stacks && control_page != nullptr && ::getpid() == own_pid) {
    const auto self = static_cast<pid_t>(::syscall(SYS_gettid));
    pid_t recorder = 0;
    if (recording_thread.compare_exchange_strong(recorder, self)) {
      if (!crash_stack_recorded) {
        crash_stack_recorded = true;
        record_crash_stack(context);
      }
      recording_thread.store(0);
    } else if (recorder != self) {
      const timespec a_while{0, 1'000'000};
      while (recording_thread.load() != 0) ::nanosleep(&a_while, nullptr);
    }
  }
  if (crash && chained[signal]) {
    const struct sigaction& action = chained_actions[signal];
    if (action.sa_flags & SA_SIGINFO) {
      action.sa_sigaction(signal, info, context);
    } else {
      action.sa_handler(signal);
    }
  }
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
  take_chained_handlers();
  for (int signal = 1; signal < NSIG; ++signal) {
    if (signal == SIGKILL || signal == SIGSTOP) continue;
    std::signal(signal, SIG_DFL);
  }
  std::signal(SIGINT, SIG_IGN);

  // A stack of its own for the fatal handlers: a stack overflow must still be recorded.
  // Symbolizing a crash's stack needs more than recording a signal: room for both.
  static char alternate_stack[256 * 1024];
  stack_t stack{};
  stack.ss_sp = alternate_stack;
  stack.ss_size = sizeof(alternate_stack);
  ::sigaltstack(&stack, nullptr);

  struct sigaction fatal {};
  fatal.sa_sigaction = on_fatal_signal;
  fatal.sa_flags = SA_SIGINFO | SA_ONSTACK;
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

void arrange_descriptors(int channel_fd, int stdout_fd, int stderr_fd) {
  // Forwarded output: its pipes above the channel's number first, so that moving the channel to 3
  // cannot close one, then onto 1 and 2 once the channel is in place.
  const int out = stdout_fd >= 0 ? ::fcntl(stdout_fd, F_DUPFD_CLOEXEC, kChildChannelFd + 1) : -1;
  const int err = stderr_fd >= 0 ? ::fcntl(stderr_fd, F_DUPFD_CLOEXEC, kChildChannelFd + 1) : -1;
  if (channel_fd != kChildChannelFd) {
    ::dup3(channel_fd, kChildChannelFd, O_CLOEXEC);
    // The channel's old number is closed now, or below (over 3), or reopened on /dev/null (0-2).
    if (channel_fd <= 2) ::close(channel_fd);
  }
  if (out >= 0) ::dup2(out, STDOUT_FILENO);
  if (err >= 0) ::dup2(err, STDERR_FILENO);
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
  record_stacks = setup.crash_backtraces;
  if (record_stacks) prepare_crash_stacks();
  pool_pid = setup.pool_pid;
  parent_pid = setup.parent_pid;
  ::prctl(PR_SET_NAME, setup.process_name.c_str(), 0, 0, 0);
  if (setup.parent_death_signal) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    // The parent may have died before the line above: then nobody will signal us.
    if (::getppid() != setup.parent_pid) ::_exit(kWorkerExitOk);
  }
  reset_signals();
  arrange_descriptors(setup.channel_fd, setup.stdout_fd, setup.stderr_fd);
}

void prepare_crash_stacks() {
  static const bool prepared = [] {
    UnwoundStack stack;
    return _Unwind_Backtrace(record_frame, &stack) == _URC_END_OF_STACK;
  }();
  (void)prepared;
}

void report_escaped_exception(const char* who) noexcept {
  try {
    const std::string line = absl::StrCat("procpool ", who, " (pid ", ::getpid(), "): ",
                                          describe_current_exception(), "; it leaves\n");
    (void)!::write(STDERR_FILENO, line.data(), line.size());
  } catch (...) {
    const std::string_view parts[] = {"procpool ", who,
                                      ": an exception escaped its own code; it leaves\n"};
    for (std::string_view part : parts) (void)!::write(STDERR_FILENO, part.data(), part.size());
  }
}

void leave(int status) {
  if (control_page != nullptr) control_page->exit_status.store(status, std::memory_order_relaxed);
  std::fflush(nullptr);
  ::_exit(status);
}

}  // namespace procpool::internal
