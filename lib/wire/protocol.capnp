# The wire protocol between a procpool parent and its worker processes.
#
# Every frame is one Cap'n Proto message in the standard stream framing (segment table, then
# segments) on the worker's socketpair. The parent only ever sends `ToWorker` and the worker only
# ever sends `FromWorker`. Jobs and results travel as `Value`s, written and read by the codec layer
# (include/procpool/codec.h); nothing else about user types is known here.

@0xcbd725a24a759c7f;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("procpool::wire");

# One job or result. The codec for a C++ type picks the member it writes; reading a member the
# writer did not set is a decoding error (kDataLoss), never a crash.
struct Value {
  union {
    none @0 :Void;              # std::nullopt, an empty tuple
    int @1 :Int64;              # signed integers, enums
    uint @2 :UInt64;            # unsigned integers
    float @3 :Float64;          # float, double
    bool @4 :Bool;
    bytes @5 :Data;             # std::string (binary-safe)
    list @6 :List(Value);       # std::vector, std::pair, std::tuple, std::map (as pairs), optional
    struct @7 :AnyPointer;      # a Cap'n Proto struct from the user's own schema
    ints @8 :List(Int64);       # packed std::vector of signed integers
    uints @9 :List(UInt64);     # packed std::vector of unsigned integers
    floats @10 :List(Float64);  # packed std::vector of floating point
    blob @11 :BlobRef;          # bytes (std::string, procpool::Bytes) left in the worker's shared
                                # region instead of the frame (lib/wire/shared_region.h)
  }
}

# Where a blob lies in the shared region of the worker a frame is for or from: bytes
# [offset, offset + size). The reader checks that they lie inside the area the writer may use.
struct BlobRef {
  offset @0 :UInt64;
  size @1 :UInt64;
}

# An error crossing the process boundary: an absl::StatusCode and its message.
struct Error {
  code @0 :UInt32;
  message @1 :Text;
}

# The outcome of one task.
struct Outcome {
  union {
    ok @0 :Value;
    error @1 :Error;
  }
}

# A chunk of tasks of one call, run in order by one worker.
struct TaskBatch {
  seq @0 :UInt64;               # the parent's number for this batch; results name it
  jobs @1 :List(Value);
  # For procpool::Pool (plain functions): addresses, valid in the worker because it is a fork of
  # the parent's image, of the typed trampoline and of the user's function. Zero otherwise.
  trampoline @2 :UInt64;
  function @3 :UInt64;
  # Retired: scalar jobs once came as one packed list here. They come as `wordJobs` now; nothing
  # sends this field, which keeps its ordinal.
  packedJobs @4 :Value;
  # Where the worker claims each task before it starts it (lib/wire/control_page.h): the slot of
  # the claim table, and the batch's tag there. A claim that fails means the parent took the
  # rest of the batch back: the worker starts none of it.
  claimSlot @5 :UInt32;
  claimTag @6 :UInt16;
  # The tasks' timeout in ns (0: none): the worker then stamps the start of every task (task
  # timeouts are measured from it; without one it stamps packed tasks per stride, see
  # task_server.cc), and a remote worker's relay runs its watchdog on it (lib/link/relay.h).
  timeoutNs @7 :Int64;
  # Scalar jobs as raw 8-byte little-endian words of kind `wordKind` (the packed path): one blob
  # instead of `packedJobs`, which the parent can send straight from the caller's array (an
  # external segment) and the worker can read, and overwrite with the results, in place. Its
  # size must be a multiple of 8; `jobs` is empty.
  wordJobs @8 :Data;
  wordKind @9 :WordKind;
  # A caller waits for this batch's result (apply): another request may follow within
  # microseconds, and the worker may poll for it a little before it sleeps.
  awaited @10 :Bool;
  # Which run of these tasks this is: 0 for their first, 1 for their first retry
  # (procpool::this_task::attempt() says this + 1).
  attempt @11 :UInt32;
  # The tasks' soft timeout in ns (0: none; CallOptions::soft_timeout): the worker stamps every
  # task's start as for timeoutNs, and the pool asks a task past it to stop (StopTasks).
  softTimeoutNs @12 :Int64;
  # Each task's outcome is made safe (held where the parent finds it, or sent) before the next
  # task starts, as in a batch with a timeout, though it has none. Set on tasks run again after a
  # worker was lost whose record placed no task running (lib/scheduler/settlement.cc): if one of
  # them ends the next worker too, the tasks before it are not lost with it, and it is first in
  # line.
  publishEach @13 :Bool;
}

# What the 8-byte words of `wordJobs` / `wordResults` hold.
enum WordKind {
  none @0;
  ints @1;     # Int64
  uints @2;    # UInt64
  floats @3;   # Float64
}

# Outcomes of the tasks [start, start + count) of batch `seq`: the first `count` entries of
# `outcomes` (a piece sent early leaves the rest of its list unused rather than shrink it). A
# worker reports a batch in one or more pieces, in order.
struct ResultBatch {
  seq @0 :UInt64;
  start @1 :UInt32;
  outcomes @2 :List(Outcome);
  busyNs @3 :UInt64;            # time the worker spent running these tasks
  count @4 :UInt32;
  # Retired (see TaskBatch.packedJobs): results of word jobs come as `wordResults`.
  packedResults @5 :Value;
  # For a batch of wordJobs: the tasks that failed, by i (task start + i, ascending); their
  # entries of `wordResults` are unused.
  errors @6 :List(TaskError);
  # For a batch of wordJobs: the results as raw 8-byte words of kind `wordKind`, entry i for task
  # start + i (entries of failed tasks, named by `errors`, are unused). Size: a multiple of 8, of
  # at least `count` entries; entries past `count` are unused (a frame the worker grows in place,
  # lib/worker/task_server.cc).
  wordResults @7 :Data;
  wordKind @8 :WordKind;
  # Where the worker's blobs of these results (BlobRef) end in its result area: once the parent
  # has read them, the worker may reuse the area up to here (lib/wire/shared_region.h).
  blobsEnd @9 :UInt64;
}

struct TaskError {
  index @0 :UInt32;
  error @1 :Error;
}

struct ToWorker {
  union {
    tasks @0 :TaskBatch;
    shutdown @1 :Void;          # finish nothing more: run exit(), report, exit with status 0

    # Remote workers only: the pool to the relay on the worker's host (lib/link/relay.h), over
    # TCP. The handshake (lib/link/handshake.h):
    challenge @2 :Challenge;
    welcome @3 :Welcome;
    refused @4 :Text;           # why the pool will not have this worker; it closes next
    # After it:
    ping @5 :Void;              # answered with a pong
    spawn @6 :Spawn;            # fork a worker; answered with spawned (or ended, if it cannot)
    stop @7 :UInt8;             # signal the worker: 15 (SIGTERM) or 9 (SIGKILL)
    revoke @8 :ClaimRef;        # take a batch's unstarted tasks back; answered with revoked
    stopTasks @9 :StopTasks;    # ask tasks to stop (control_page.h); no answer
  }
}

struct FromWorker {
  union {
    ready @0 :Void;             # enter() succeeded; the worker takes tasks
    enterFailed @1 :Error;      # enter() failed or threw; the worker exits next
    results @2 :ResultBatch;
    exited @3 :Error;           # exit() ran; code 0 when it succeeded

    # Remote workers only: the relay on the worker's host to the pool.
    hello @4 :Hello;
    obsoleteProof @5 :Data;     # protocol 2's proof; see Credentials
    refused @6 :Text;           # why the relay will not serve this pool; it closes next
    pong @7 :Progress;
    spawned @8 :Int32;          # the worker's pid on its host
    revoked @9 :Revoked;
    ended @10 :Ended;           # the worker is gone (its data connection closes with it)
    # The first frame of a worker's data connection (see Spawn): which spawn it is, and proof.
    attach @11 :Attach;
    # The worker's answer to the challenge: its proof first, then what it is (handshake.h).
    credentials @12 :Credentials;

    # A worker's procpool::log (include/procpool/logging.h), in its stream with its results, so
    # that a record logged during a task arrives before the task's outcome.
    log @13 :WorkerLog;
    # Remote workers only: lines of the worker's stdout or stderr, read by its relay
    # (PoolOptions::worker_output), over the control connection.
    output @14 :OutputLines;
    # Remote workers only: the relay's host is leaving (the relay got SIGTERM: a preemption,
    # scancel, an eviction). The pool takes back what its worker has not started (revoke), lets it
    # finish its task, has it run exit() (shutdown), gives the host no other worker, and closes the
    # connection once the worker has ended. It names no task: the pool decides what comes back.
    draining @15 :Void;
  }
}

struct WorkerLog {
  severity @0 :UInt8;           # procpool::LogSeverity: 0 info, 1 warning, 2 error
  message @1 :Text;
  # The task the worker was running when it logged (its control page's stamps): batch `batchSeq`
  # (the parent's number), task `taskIndex` in it; `running` false: none.
  batchSeq @2 :UInt64;
  taskIndex @3 :UInt32;
  running @4 :Bool;
}

struct OutputLines {
  stderr @0 :Bool;              # false: stdout
  lines @1 :List(Data);         # whole lines without their newline (or pieces of a long one)
  # The task the worker had last started when its relay read them (its control page's stamps),
  # if any: lib/link/worker_link.h, OutputPlace.
  hasPlace @2 :Bool;
  batchSeq @3 :UInt64;
  taskIndex @4 :UInt32;
}

# A remote worker's frames (tasks, results, ready, exited) go over a connection of its own, opened
# by its relay for each worker it forks: the relay supervises, and stays off the data path.
struct Spawn {
  slot @0 :UInt32;
  dataId @1 :Data;              # random, one per spawn: the relay presents it on the new connection
  placement @2 :Placement;      # who the worker is, what it starts with (procpool/this_worker.h)
}

# A worker's identity and start-up settings (PoolOptions::worker_env, cpu_affinity), set before
# W's constructor runs.
struct Placement {
  generation @0 :Int64;         # 0 for its slot's first process, +1 per replacement
  workers @1 :UInt32;           # the pool's size
  poolName @2 :Text;            # PoolOptions::name
  env @3 :List(EnvVar);
  cpu @4 :Int32;                # pinned to this CPU (sched_setaffinity); -1: not pinned
  spreadCpus @5 :Bool;          # remote: pin to the slot-th CPU of the host's own set instead
}

struct EnvVar {
  name @0 :Text;
  value @1 :Text;
}

# Tasks [from, to) of batch `seq` should stop (seq 0: withdrawn; see control_page.h).
struct StopTasks {
  seq @0 :UInt64;
  from @1 :UInt32;
  to @2 :UInt32;
}

struct Attach {
  dataId @0 :Data;
  proof @1 :Data;               # HMAC(token, "data", dataId); empty without a token
}

# Nothing in a hello is trusted, and it says nothing about the worker: since protocol 3 its
# obsolete fields are left empty (what the worker is comes in its Credentials, with its proof).
struct Hello {
  version @0 :UInt32;
  obsoleteWorkerType @1 :Text;
  obsoleteHost @2 :Text;
  obsoletePid @3 :Int32;
  nonce @4 :Data;
  # PROCPOOL_LAUNCH_ID from its environment: set when the pool ran RemoteOptions::launch, so that
  # the pool knows which launch a refused (or welcomed) worker came from. A hello keeps these
  # fields in every protocol version: the pool reads them even from a version it then refuses.
  launchId @5 :Text;
}

# The pool proves nothing and says nothing about itself before the worker has proved the token:
# since protocol 3 the obsolete fields are left empty (the pool's proof and type are in Welcome).
struct Challenge {
  version @0 :UInt32;
  nonce @1 :Data;
  obsoleteProof @2 :Data;
  obsoleteWorkerType @3 :Text;
}

struct Credentials {
  proof @0 :Data;               # HMAC(token, "worker", the pool's nonce, the worker's nonce)
  workerType @1 :Text;          # W, its Job and its Result (the pool refuses another type), or
                                # empty: the program serves whatever the pool asks for, if it can
  host @2 :Text;
  pid @3 :Int32;                # the relay's
}

struct Welcome {
  maxFrameBytes @0 :UInt64;
  heartbeatTimeoutNs @1 :Int64; # nothing heard for this long: the other side is gone
  killGraceNs @2 :Int64;
  frameTimeoutNs @3 :Int64;
  name @4 :Text;                # process name prefix: workers are "<name>-w3"
  residentBytes @5 :Bool;       # report the worker's resident memory (max_worker_rss_bytes)
  # Sent only once the worker has proved the token; the worker checks it before it reads the rest.
  proof @6 :Data;               # HMAC(token, "pool", the worker's nonce, the pool's nonce)
  workerType @7 :Text;          # what the pool's workers are: a program serving several picks it
  # Each worker's tree and memory cap on the relay's host (lib/common/cgroup.h): PoolOptions'
  # max_worker_memory_bytes (0: none) and cgroups (true: Cgroups::kOff).
  maxWorkerMemoryBytes @8 :UInt64;
  cgroupsOff @9 :Bool;
  forwardOutput @10 :Bool;      # the relay forwards its worker's stdout and stderr (OutputLines)
  crashBacktraces @11 :Bool = true;  # its worker records its stack when a fatal signal kills it
}

struct ClaimRef {
  slot @0 :UInt32;
  tag @1 :UInt16;
}

struct Revoked {
  slot @0 :UInt32;
  tag @1 :UInt16;
  claimed @2 :UInt32;           # tasks claimed (they ran or run); the rest never start
}

# A worker's control page (lib/wire/control_page.h) as its relay reads it.
struct Progress {
  batchSeq @0 :UInt64;
  taskIndex @1 :UInt32;
  running @2 :Bool;
  runningForNs @3 :Int64;       # how long that task has run (clocks of two hosts never compare)
  tasksDone @4 :Int64;
  busyNs @5 :Int64;
  residentBytes @6 :UInt64;
}

struct Ended {
  how @0 :Text;                 # "was killed by signal 11 (SIGSEGV)", "exited with status 0"
  clean @1 :Bool;               # left on its own after a shutdown, as the protocol expects
  timedOut @2 :Text;            # non-empty: the relay's watchdog stopped it, and why
  brokenStream @3 :Text;        # non-empty: its stream broke (a bad frame), and how
  progress @4 :Progress;        # its last, read after it ended
  memoryExhausted @5 :Text;     # non-empty: it crossed max_worker_memory_bytes, and how
  # The stack the worker's fatal-signal handler recorded (PoolOptions::crash_backtraces), or empty.
  crashStack @6 :Text;
}

# Parent <-> fork server (StartMethod::kForkServer), one message per SOCK_SEQPACKET packet. A
# spawn request carries the new worker's channel and status-page memfd as SCM_RIGHTS (and, when its
# output is forwarded, the write ends of its stdout and stderr pipes).
struct ForkServerRequest {
  slot @0 :UInt32;
  name @1 :Text;                # the worker's process name
  # Not a spawn when nonzero (no descriptors, no reply): send this signal to the server's worker
  # `signalPid` of `slot` if the server has not reaped it. On kernels without pidfds (before
  # Linux 5.3) only the server knows whether that pid is still its worker's.
  signal @2 :Int32;
  signalPid @3 :Int32;
  cgroupProcs @4 :List(Text);   # the cgroup.procs files the worker joins first (cgroup.h)
  placement @5 :Placement;
}

struct ForkServerReport {
  union {
    spawned :group {
      slot @0 :UInt32;
      pid @1 :Int32;
    }
    exited :group {             # a worker of the server's was reaped
      pid @2 :Int32;
      waitStatus @3 :Int32;
    }
    failed @4 :Error;           # the spawn request could not be served
  }
}
