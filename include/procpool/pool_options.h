/// \file
/// `PoolOptions`: how a ProcessPool (or Pool) is sized, timed and observed; `RemoteOptions`: where
/// its workers run when they are on other machines.
///
/// Designed for designated initializers:
///
/// ```cpp
/// procpool::ProcessPool<Indexer> pool({.workers = 4, .join_timeout = absl::Seconds(5)});
/// ```
///
/// C++ requires designated initializers in declaration order; a field out of order does not
/// compile. The order is the one below (docs/guide.md lists it, checked against this header).
///
/// Every field has a safe default; a default-constructed PoolOptions gives one worker per CPU,
/// no task timeout and a 30-second bound on shutdown. A value out of range does not fail the
/// constructor: every call of the pool then returns kInvalidArgument naming the field.

#ifndef PROCPOOL_POOL_OPTIONS_H_
#define PROCPOOL_POOL_OPTIONS_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/time/time.h"

namespace procpool {

/// How much a `LogEvent` matters.
enum class LogSeverity {
  kInfo,     ///< Routine: a worker started, or stopped when asked to.
  kWarning,  ///< A worker died or was stopped unexpectedly (it is replaced); a stop signal came.
  kError     ///< A worker could not start, a stream broke, a join failed, a callback threw.
};

/// Where a `LogEvent` comes from.
enum class LogSource {
  kPool,    ///< The pool itself: a worker started or stopped, a task failed, an escalation.
  kWorker,  ///< Code running in a worker called `procpool::log` (logging.h).
  kStdout,  ///< One line a worker wrote to its standard output (`WorkerOutput::kForward`).
  kStderr   ///< One line a worker wrote to its standard error (`WorkerOutput::kForward`).
};

/// One structured event: from the pool (worker started or stopped, a task failed, an
/// escalation), from worker code (`procpool::log`), or one line of a worker's forwarded output.
struct LogEvent {
  LogSeverity severity = LogSeverity::kInfo;  ///< How much it matters.
  std::string process;          ///< "procpool-w3" for a worker, "procpool-parent" for the pool
  int pid = 0;                  ///< the worker's pid (on its host), or the parent's
  absl::Duration since_start;   ///< time since the pool was created
  std::string message;          ///< What happened, in words; a forwarded line, without its \n.
  LogSource source = LogSource::kPool;  ///< Who said it.
  int worker = -1;                      ///< The worker's slot; -1 for the pool itself.
  std::string host;                     ///< The worker's host name ("" for the pool).
  /// The pool-wide number of the task the worker ran then (as `WorkerStats::current_task`), if
  /// it ran one. For a line of forwarded output, the task the worker had last started when the
  /// line was read (WorkerOutput::kForward says when that can be a later one).
  std::optional<uint64_t> task;
};

/// Receives every event. Runs on the pool's own thread (or a caller's: close/join, resize,
/// terminate, apply), holding the pool: it must be quick and must not call back into the pool
/// (such calls fail kFailedPrecondition, and stats() is empty, rather than wait for themselves).
using LogSink = std::function<void(const LogEvent&)>;

/// The default sink: the pool's warnings and errors to stderr, one line each, as
/// "[procpool +1.234s procpool-w3 pid 4242] warning: ...". With PROCPOOL_LOG_ALL set in the
/// environment it writes the pool's informational events too (workers started and stopped).
/// Records of `procpool::log` (kWorker) are written whatever their severity. Forwarded output
/// goes where the worker meant it: a kStdout line to this process's stdout, a kStderr line to
/// its stderr, each prefixed with the worker's name ("[procpool-w3] ", or
/// "[procpool-w3 on node7] " for a worker on another host). Thread-safe; write errors are ignored.
void log_to_stderr(const LogEvent& event);

/// Where workers' standard output and error go (`PoolOptions::worker_output`).
enum class WorkerOutput {
  /// kInherit for forked workers, kForward for remote ones (whose output would otherwise stay on
  /// their host).
  kAuto,
  /// A worker writes to the descriptors it inherited from the program (or, remote, from its
  /// worker program): its lines mix with the program's own, unattributed.
  kInherit,
  /// A worker's fds 1 and 2 are pipes its pool reads (a remote worker's, its host's relay reads
  /// and sends over its connection): every line becomes one LogEvent (kStdout at kInfo, kStderr
  /// at kWarning) naming the worker, its pid and host and the task it ran. Lines arrive whole,
  /// once each, in the order the worker wrote them, also when it crashes right after writing or
  /// when the pool joins (the pipes are read to their end; a last line without a newline is
  /// delivered as it is). A line longer than 64 KiB arrives in pieces of 64 KiB. A worker that
  /// writes faster than the sink takes blocks in write() (the pool reads at most 64 KiB ahead per
  /// pipe): memory stays bounded. stdio buffers a forwarded stdout (it is a pipe); the worker
  /// flushes it whenever it sends results and before it waits for work, so what a task printed
  /// is in the pipe before its outcome is sent (it reaches the sink within about a millisecond of
  /// the pool reading it, not necessarily before the outcome reaches the caller); for lines in the middle of a long task, fflush(stdout) or
  /// write to stderr (unbuffered). Output still in stdio's buffer when a worker crashes is lost,
  /// as in any program; what reached the pipe is not. A line's LogEvent::task is the task the
  /// worker had last started when the line was read; lines are read before the frames after
  /// them, so that is the task that wrote it wherever tasks run one at a time or each takes
  /// longer than a read; in a chunk of quick tasks it may be a later task of the chunk.
  kForward,
};

/// How worker processes are made (`PoolOptions::start_method`).
enum class StartMethod {
  /// `fork()` the calling process (Python's "fork"): fastest; a worker inherits the parent's
  /// memory as it is at that moment. Replacements are forked from the pool's thread: if the
  /// program's other threads may hold locks then that a worker needs (in W's constructor, hooks,
  /// tasks), use kForkServer.
  kFork,
  /// A single-threaded fork server ("zygote") is forked when the pool is made, and forks every
  /// worker, replacements included (Python's "forkserver"). A worker never inherits a lock held by
  /// another thread of the program, however many threads it runs later. Workers see the memory as
  /// it was when the pool was made. Costs one more process and a round trip per fork. Not a cure
  /// for a lock held when the pool is made: the zygote is itself a fork of the program then.
  kForkServer,
};

/// Certificates for `RemoteOptions::tls` (PEM files): mutual TLS. The pool presents `cert_file`
/// (its chain, leaf first) with `key_file`, and accepts only workers whose certificate chains to
/// a CA in `ca_file`; workers (serve()) read theirs from PROCPOOL_TLS_CA, PROCPOOL_TLS_CERT and
/// PROCPOOL_TLS_KEY, and accept only a pool whose certificate chains to their CA. Host names are
/// not checked: the CA is the cluster's own. The token is still proved inside the session.
struct RemoteTls {
  std::string ca_file;    ///< PEM: the CA(s) a worker's certificate must chain to
  std::string cert_file;  ///< PEM: the pool's certificate chain, leaf first
  std::string key_file;   ///< PEM: the private key of `cert_file`'s leaf
};

/// Whether workers get cgroups of their own (`PoolOptions::cgroups`).
///
/// Whatever this says, each worker leads its own process group and is a child subreaper, and when
/// procpool stops a worker (task_timeout, cancel(), terminate(), join's escalation, recycling, a
/// broken stream) it stops everything the worker started, grandchildren included. A cgroup makes
/// that complete: a descendant that left the tree (a double-forked `setsid` daemon whose worker
/// died on its own) is still in its worker's cgroup.
enum class Cgroups {
  /// A child cgroup per worker wherever this process may create cgroups below its own (root, or a
  /// delegated subtree; cgroup v2, v1 or hybrid): the worker is stopped through it (v2
  /// `cgroup.kill`, or the v1 freezer), and `max_worker_memory_bytes` is its memory limit.
  /// Silently none elsewhere.
  kAuto,
  /// No cgroups: process groups and /proc alone; the memory cap, if any, is RLIMIT_AS.
  kOff,
};

/// Where worker processes run (`PoolOptions::cpu_affinity`).
enum class CpuAffinity {
  kNone,    ///< wherever the kernel puts them (the parent's allowed CPUs)
  /// Slot i is pinned to the i-th CPU of the set the parent may run on (sched_getaffinity when
  /// the pool is made), round robin when there are more slots than CPUs; a replacement keeps its
  /// slot's CPU. A remote worker is pinned the same way within its own host's set.
  kSpread,
};

/// Workers on other machines (`PoolOptions::remote`). The worker program calls
/// `procpool::serve<W>` (serve.h); a cluster engine (Slurm's srun, ssh, mpirun, Kubernetes)
/// starts it, the pool (with `launch`) or something else (an `srun -n 64 ./indexer` of its own);
/// it dials `listen`, proves the token, and then serves exactly as a forked worker does: same
/// calls, hooks, errors and shutdown. Every connection (a worker host's control connection and
/// each worker's data connection) is TLS 1.3, keyed by the token (a pre-shared key derived from
/// it: nothing else to configure) or by certificates (`tls`); the token is also proved inside it
/// (a challenge-response: the token itself never crosses the wire). Jobs and results are
/// encrypted, and a byte changed on the way breaks that connection (its running task fails
/// kDataLoss, or runs again under retries): a forged value never reaches the caller.
///
/// Every remote pool has a token: the one given, at least 16 bytes (`make_token()` makes a good
/// one), or, when `token` is empty, one the pool makes (32 random bytes, as 64 hex digits), which
/// it passes to the workers it launches and returns from `ProcessPool::remote_token()` for workers
/// started by anything else. A worker proves it before the pool proves anything, so a peer without
/// it learns nothing with which to guess the token offline.
///
/// ```cpp
/// procpool::ProcessPool<Indexer> pool({
///     .workers = 64,
///     .remote = procpool::RemoteOptions{
///         .listen = "0.0.0.0:7000",
///         .token = secret,
///         .launch = {"srun", "-n1", "./indexer", "--procpool-connect={address}"}}});
/// ```
///
/// Designated initializers must follow the declaration order below. A value out of range (a
/// `listen` that is not "host:port", a token shorter than 16 bytes, a `connect_timeout` that is
/// not positive, a `heartbeat_timeout` under 100 ms, an empty command) makes every call of the
/// pool return kInvalidArgument naming the field.
struct RemoteOptions {
  /// "host:port" to listen on; port 0 picks a free one. Loopback by default.
  std::string listen = "127.0.0.1:0";
  /// The shared secret workers must prove (serve() reads it from PROCPOOL_TOKEN, or from the file
  /// PROCPOOL_TOKEN_FILE names). Empty: the pool makes one (see above). Otherwise at least 16
  /// bytes; any bytes but NUL.
  std::string token;
  /// Optional: the command the pool runs once per worker it needs (replacements included), as an
  /// argv; "{address}" in any argument becomes the address workers dial. It runs with
  /// PROCPOOL_TOKEN, PROCPOOL_CONNECT and PROCPOOL_LAUNCH_ID (which serve() repeats to the pool)
  /// in its environment and stdin on /dev/null. A program that cannot be run fails the worker's
  /// start with kInvalidArgument naming this field. Without it, workers started by anything else
  /// dial in on their own.
  std::vector<std::string> launch;
  /// The pool waits this long for workers: without `launch`, for the first ones after it is made
  /// (calls then wait for them; places still empty after it wait on for hosts to dial in, which
  /// one warning says, not an error per place); with it, for each launched one. Past it, calls fail with
  /// kUnavailable saying why (none came, or each was refused and why). A launched worker that is
  /// refused, or a command that exits non-zero before its worker connects, fails that start at
  /// once (kUnavailable saying why), without waiting this long.
  absl::Duration connect_timeout = absl::Seconds(60);
  /// A worker host silent this long is gone (its running task fails kAborted, or runs again under
  /// retries; its unstarted ones go elsewhere); a worker host that hears nothing from the pool for
  /// as long stops its worker at once, then dials the pool again as at its start (serve.h): it
  /// serves again when a broken network heals, and exits once that fails for its connect timeout
  /// (PROCPOOL_CONNECT_TIMEOUT, 60 s) when the pool's host died.
  /// At least 100 ms.
  absl::Duration heartbeat_timeout = absl::Seconds(10);
  /// The address workers dial, for {address} and PROCPOOL_CONNECT: by default `listen`, with this
  /// host's name in place of a wildcard address.
  std::string advertise;
  /// TLS on every connection (the default). `false` sends jobs and results in plaintext, for a
  /// `listen` address on loopback only (kInvalidArgument otherwise): workers must then be told
  /// too (PROCPOOL_ENCRYPT=0, which the pool sets for those it launches). The token is still
  /// needed and proved.
  bool encrypt = true;
  /// Mutual certificate TLS instead of the token's key (see RemoteTls). A file that cannot be
  /// read or used is kInvalidArgument naming this field. Launched workers get the same files
  /// (PROCPOOL_TLS_CA/CERT/KEY) unless the pool's environment names their own.
  std::optional<RemoteTls> tls;
};

/// A fresh token for `RemoteOptions::token`: 32 bytes from the system's CSPRNG, as 64 lowercase hex
/// digits (fit for an environment variable or a file). Never blocks for long; thread-safe.
std::string make_token();

/// How a pool is sized, timed and observed (see the file comment). Designated initializers must
/// follow the declaration order below.
struct PoolOptions {
  /// Number of worker processes; 0 means one per CPU this process may run on. At most 4096.
  int workers = 0;
  /// join() (and so the destructor) waits this long for work in flight and every exit() hook,
  /// then sends SIGTERM, waits `kill_grace`, then SIGKILL. A worker told to leave before join
  /// (resize(), idle_timeout, max_tasks_per_worker) gets as long for its exit(). Not negative.
  absl::Duration join_timeout = absl::Seconds(30);
  /// A task running longer than this has its worker killed and fails with kDeadlineExceeded.
  /// Overridable per call. Infinite by default; positive.
  absl::Duration task_timeout = absl::InfiniteDuration();
  /// A worker whose constructor and enter() take longer than this is killed, and the pool fails
  /// with kDeadlineExceeded naming it (as it does for a failing enter()): a hung initializer must
  /// not leave calls waiting for a worker that never comes. A remote worker's counts from when a
  /// worker host was asked to start it (the wait for a host is RemoteOptions::connect_timeout's).
  /// Positive.
  absl::Duration enter_timeout = absl::Seconds(60);
  /// How long a worker asked to stop with SIGTERM gets before SIGKILL. Not negative.
  absl::Duration kill_grace = absl::Seconds(1);
  /// The largest frame either side accepts: a job or result over it fails its task with
  /// kResourceExhausted (the worker lives); a stream that announces a larger frame is broken
  /// (kDataLoss). Raise it for big payloads. From 4096 bytes to 1 TiB.
  size_t max_frame_bytes = size_t{256} << 20;
  /// Recycle a worker after it ran this many tasks (0: never), like Python's maxtasksperchild. A
  /// recycled worker finishes its tasks and runs exit(); a fresh one runs enter(). No task is lost
  /// or run twice.
  int64_t max_tasks_per_worker = 0;
  /// Recycle a worker once its resident memory exceeds this many bytes (0: never). Checked when it
  /// finishes a batch, at most every 50 ms per worker; the batch it ran is not lost. Its own
  /// memory is counted: RssAnon + RssFile of `/proc/PID/status` (pages still shared copy-on-write
  /// with the parent since fork included), not RssShmem, so the shared region that large byte
  /// strings cross in, and any MAP_SHARED memory of its own, do not make it recycle.
  size_t max_worker_rss_bytes = 0;
  /// A hard cap on each worker's memory, in bytes (0: none). Where a memory cgroup can be made
  /// (`cgroups` below), the worker's own cgroup holds it and everything it starts to this many
  /// bytes (cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes`, swap kept out): a task that
  /// crosses it has its worker killed by the kernel and fails kResourceExhausted naming the worker
  /// and the limit; the worker is replaced and its unstarted tasks run elsewhere. Without a usable
  /// cgroup (or with Cgroups::kOff) it is the worker's RLIMIT_AS instead: its address space, what
  /// it inherited from the parent included, and allocations past it fail inside the task
  /// (std::bad_alloc, a null malloc). A worker that would start with less than 16 MiB below the
  /// cap refuses to start, and the tasks sent to it fail kFailedPrecondition saying so (always
  /// under AddressSanitizer, whose shadow memory exceeds any cap). A LogEvent at start says which
  /// is in force. Not below 16 MiB.
  size_t max_worker_memory_bytes = 0;
  /// Whether each worker gets cgroups of its own (see `Cgroups`): by default wherever this
  /// process may make them below its own.
  Cgroups cgroups = Cgroups::kAuto;
  /// Prefix of worker process names (prctl PR_SET_NAME; at most 15 bytes are kept): "procpool-w3".
  std::string name = "procpool";
  /// How workers are made: `StartMethod::kFork` (default) or `StartMethod::kForkServer`. Ignored
  /// for remote workers.
  StartMethod start_method = StartMethod::kFork;
  /// Where events go; the default writes warnings and errors to stderr. Called on the pool's
  /// thread and callers' threads; an exception it throws is written to stderr and dropped.
  LogSink log_sink = log_to_stderr;
  /// Where workers' stdout and stderr go: `WorkerOutput::kAuto` (default) inherits them for
  /// forked workers and forwards them, line by line, to `log_sink` for remote ones.
  WorkerOutput worker_output = WorkerOutput::kAuto;
  /// A worker killed by SIGSEGV, SIGBUS, SIGFPE, SIGILL or SIGABRT (an uncaught exception's
  /// std::terminate included) records the crashing thread's stack before it dies, and the pool
  /// (or a remote worker's relay) names its functions from the binaries' symbol tables, which it
  /// reads once: the failed task's kAborted status carries it (`procpool::backtrace_of`,
  /// logging.h), and one kError LogEvent shows it. A handler for those signals that the program
  /// installed before the pool forked runs after the stack is recorded. A stack an overrun
  /// scribbled on is shown up to the frame it spoiled. A stack overflow in a thread the task
  /// started (a thread without an alternate signal stack) ends the worker with none. False:
  /// nothing is recorded.
  bool crash_backtraces = true;
  /// A frame a worker has begun to send must be complete within this; otherwise its stream is
  /// broken: the task it runs fails kDataLoss and the worker is replaced. A worker cannot wedge
  /// the pool by writing half a frame. The same holds for a worker that closed its channel and
  /// is still there this long after (a task that exec'd another program, or closed fd 3): it is
  /// stopped with what it runs. Positive.
  absl::Duration frame_timeout = absl::Seconds(10);
  /// The crash guard (README, "When workers cannot start"). A worker that could not be started
  /// (fork failed), or that died or failed before it was ready (its constructor, enter(),
  /// enter_timeout), is started again after respawn_delay, doubled for every consecutive such
  /// failure in the pool, up to respawn_max_delay. A worker that starts cleanly resets the delay.
  /// Workers that die while running a task are replaced at once: the task failed, not the pool.
  /// Not negative.
  absl::Duration respawn_delay = absl::Milliseconds(100);
  /// The longest delay between start attempts (see respawn_delay). Not less than respawn_delay.
  absl::Duration respawn_max_delay = absl::Seconds(5);
  /// Run the workers on other machines (RemoteOptions above) instead of forking them here. Only
  /// `ProcessPool<W>` can (procpool::Pool refuses it with kInvalidArgument: function addresses
  /// mean nothing in another program); `workers` must then be given (not 0).
  std::optional<RemoteOptions> remote;
  /// Serve `GET /metrics` (Prometheus text, metrics.h) over HTTP on this "host:port" from a thread
  /// of the pool's own, from when the pool is made until it is destroyed; "" (the default): no
  /// endpoint. ":9464" or "9464" listens on loopback (127.0.0.1); name another address
  /// ("0.0.0.0:9464") to be scraped from other machines (the page is not authenticated). Port 0
  /// picks a free one (`metrics_address()` says which). A value that is not an address makes
  /// every call return kInvalidArgument naming this field; one that cannot be listened on (in use,
  /// not this machine's) fails every call with kUnavailable naming it, the address and the cause.
  std::string metrics_listen;
  /// How long a task asked to stop (procpool::this_task::stop_requested(), this_worker.h: its
  /// AsyncResult cancelled, its soft_timeout passed, the pool terminating) may take to return
  /// before its worker is killed. A task that returns within it has its value discarded (it
  /// reports kCancelled, or kDeadlineExceeded after its soft_timeout) and its worker lives on.
  /// Zero (the default): no wait, the worker is stopped at once as it always was. (Leaving an
  /// imap loop or a signal's close asks running tasks to stop too, but never kills them.) Not
  /// negative.
  absl::Duration cancel_grace = absl::ZeroDuration();
  /// Called in the pool (on the thread that starts workers) before each worker process of `slot`
  /// starts, replacements included: the variables it returns are set (setenv) in that worker
  /// before W's constructor runs, e.g. {{"CUDA_VISIBLE_DEVICES", std::to_string(slot % 4)}}. For
  /// remote workers they are sent to the worker's host and set there: at most 64 KiB of them in
  /// all (with `name`). A name that is empty or holds '=' or a NUL, a value that holds a NUL, more
  /// than a remote worker takes, or an exception thrown, fails that worker's start
  /// (kInvalidArgument).
  std::function<std::vector<std::pair<std::string, std::string>>(int slot)> worker_env;
  /// Pin each worker to a CPU: see CpuAffinity.
  CpuAffinity cpu_affinity = CpuAffinity::kNone;
  /// The fewest workers `idle_timeout` leaves running: from 0 to `workers` (a pool resized below
  /// it keeps all it has). Ignored while idle_timeout is infinite.
  int min_workers = 0;
  /// A worker idle this long (no task in hand) runs exit() and leaves, while more than
  /// `min_workers` remain; work that arrives later starts workers again, as many as it needs, up
  /// to `workers` (or the size given to `resize()`). A worker that left so shows as
  /// `WorkerState::kDead` in stats(). Infinite (the default): workers never leave for idleness.
  /// Positive.
  absl::Duration idle_timeout = absl::InfiniteDuration();
};

}  // namespace procpool

#endif  // PROCPOOL_POOL_OPTIONS_H_
