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
  # Scalar jobs as raw 8-byte little-endian words of kind `wordKind` (the packed path): one blob
  # instead of `packedJobs`, which the parent can send straight from the caller's array (an
  # external segment) and the worker can read, and overwrite with the results, in place. Its
  # size must be a multiple of 8; `jobs` is empty.
  wordJobs @7 :Data;
  wordKind @8 :WordKind;
  # The batch's tasks have a timeout: the worker stamps the start of every task (task timeouts
  # are measured from it). Without one it stamps packed tasks per stride (see task_server.cc).
  timed @9 :Bool;
  # A caller waits for this batch's result (apply): another request may follow within
  # microseconds, and the worker may poll for it a little before it sleeps.
  awaited @10 :Bool;
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
  # start + i (entries of failed tasks, named by `errors`, are unused). Size: a multiple of 8.
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
  }
}

struct FromWorker {
  union {
    ready @0 :Void;             # enter() succeeded; the worker takes tasks
    enterFailed @1 :Error;      # enter() failed or threw; the worker exits next
    results @2 :ResultBatch;
    exited @3 :Error;           # exit() ran; code 0 when it succeeded
  }
}

# Parent <-> fork server (StartMethod::kForkServer), one message per SOCK_SEQPACKET packet. A
# spawn request carries the new worker's channel and status-page memfd as SCM_RIGHTS.
struct ForkServerRequest {
  slot @0 :UInt32;
  name @1 :Text;                # the worker's process name
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
