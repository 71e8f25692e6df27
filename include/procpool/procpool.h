/// \file
/// procpool: Python's multiprocessing.Pool for C++, faster, safer under faults and honest about
/// errors. This umbrella header is all a user needs:
///
/// ```cpp
/// #include "procpool/procpool.h"
/// ```
///
/// `ProcessPool<W>` (process_pool.h) runs a worker class in N processes; `Pool` (pool.h) runs
/// plain functions; `AsyncResult` (async_result.h) and `ImapRange` (imap_range.h) are what the
/// asynchronous and lazy calls return, and `wait` and `as_completed` (wait.h) wait on many
/// AsyncResults at once; `ProgressBar` (progress_bar.h) draws a map's progress; `PoolOptions`
/// (pool_options.h) sizes and times it; `CallOptions` (call_options.h) tunes one call; `Codec`
/// (codec.h) says which types cross the process boundary; `CapnpStruct` (capnp_struct.h) carries
/// your own Cap'n Proto structs; `PoolStats` (pool_stats.h) shows what the workers do; `serve`
/// (serve.h) is the main of a remote worker program; `install_signal_handlers` (signals.h) makes
/// Ctrl-C close every pool; `this_worker()` and `this_task` (this_worker.h) tell code in a worker
/// which worker it is and whether its task should stop; version.h says which procpool this is.
///
/// The headers in procpool/internal/ are implementation details that the templates above need
/// inline: not part of the API, and they may change in any release.

/// \namespace procpool
/// Everything of procpool's API. Its nested namespace `procpool::internal` is implementation.

#ifndef PROCPOOL_PROCPOOL_H_
#define PROCPOOL_PROCPOOL_H_

#include "procpool/async_result.h"
#include "procpool/bytes.h"
#include "procpool/call_options.h"
#include "procpool/capnp_struct.h"
#include "procpool/codec.h"
#include "procpool/imap_range.h"
#include "procpool/logging.h"
#include "procpool/metrics.h"
#include "procpool/pool.h"
#include "procpool/pool_options.h"
#include "procpool/pool_stats.h"
#include "procpool/process_pool.h"
#include "procpool/progress_bar.h"
#include "procpool/serve.h"
#include "procpool/signals.h"
#include "procpool/this_worker.h"
#include "procpool/version.h"
#include "procpool/wait.h"

#endif  // PROCPOOL_PROCPOOL_H_
