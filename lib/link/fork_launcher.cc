#include "lib/link/fork_launcher.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <optional>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "lib/common/child_process.h"
#include "lib/wire/control_page.h"
#include "lib/wire/output_lines.h"
#include "lib/worker/child_setup.h"

namespace procpool::internal {
namespace {

// Watches a worker this process just forked (a pidfd, or its pid on a kernel without pidfds:
// lib/common/child_process.h). If a pidfd cannot be had otherwise (out of descriptors) the worker
// is killed and reaped at once: a worker the pool cannot watch must not live on, nor become a
// zombie.
absl::StatusOr<WorkerProcess> watch_new_worker(pid_t pid) {
  WorkerProcess process(pid, /*adopted=*/false);
  const int error = errno;
  if (process.pidfd() < 0 && pidfds_available()) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    return absl::ErrnoToStatus(error, "pidfd_open of a new worker");
  }
  return process;
}

// In a worker just forked: maps its own control page and region again, which fork left out (no
// worker inherits another's: lib/common/shared_memory.h). Without them it cannot run: it leaves at
// once, and the pool sees it exit before it was ready.
void map_own_memory(ControlPageMapping& page, SharedRegion* region) {
  if (!page.map_in_worker().ok()) ::_exit(kWorkerExitProtocolError);
  if (region != nullptr && !region->map_in_worker().ok()) ::_exit(kWorkerExitProtocolError);
}

// The pipes of a worker's forwarded output, both ends (ForkLauncher::Config::forward_output).
struct OutputPipes {
  OutputPipe out;
  OutputPipe err;
};

absl::StatusOr<std::optional<OutputPipes>> make_output_pipes(bool forward, WorkerLaunch& launch) {
  if (!forward) return std::nullopt;
  absl::StatusOr<OutputPipe> out = make_output_pipe();
  if (!out.ok()) return out.status();
  absl::StatusOr<OutputPipe> err = make_output_pipe();
  if (!err.ok()) return err.status();
  launch.stdout_fd = out->write_end.get();
  launch.stderr_fd = err->write_end.get();
  return OutputPipes{*std::move(out), *std::move(err)};
}

// In the parent once the worker has its copies: the write ends close here (the worker then holds
// the only ones, so the pipes end with it), the read ends go to its link.
void attach_output(std::optional<OutputPipes>& pipes, ForkLink& link) {
  if (!pipes) return;
  pipes->out.write_end.reset();
  pipes->err.write_end.reset();
  link.forward_output(std::move(pipes->out.read_end), std::move(pipes->err.read_end));
}

}  // namespace

ForkLauncher::ForkLauncher(Config config)
    : config_(std::move(config)),
      pool_pid_(::getpid()),
      cgroup_plan_(CgroupPlan::detect(config_.cgroups == Cgroups::kAuto,
                                      config_.max_worker_memory_bytes)),
      cpus_(config_.spread_cpus ? allowed_cpus() : std::vector<int>()) {
  if (config_.crash_backtraces) prepare_crash_stacks();
}

absl::StatusOr<std::optional<WorkerCgroup>> ForkLauncher::make_cgroup(WorkerLaunch& launch) {
  if (!cgroup_plan_.uses_cgroups()) return std::nullopt;
  absl::StatusOr<WorkerCgroup> cgroup = WorkerCgroup::create(
      cgroup_plan_, absl::StrCat(config_.process_name_prefix.substr(0, 32), "-", pool_pid_, "-w",
                                 launch.slot));
  if (!cgroup.ok()) return cgroup.status();
  launch.cgroup_procs = cgroup->procs_files();
  return std::optional<WorkerCgroup>(*std::move(cgroup));
}

WorkerLaunch ForkLauncher::launch_for(int slot) const {
  WorkerLaunch launch;
  launch.slot = slot;
  launch.process_name = absl::StrCat(config_.process_name_prefix, "-w", slot).substr(0, 15);
  launch.parent_death_signal = true;
  launch.max_frame_bytes = config_.max_frame_bytes;
  launch.pool_pid = pool_pid_;
  launch.factory = config_.factory;
  if (cgroup_plan_.memory == CgroupPlan::Memory::kRlimitAs) {
    launch.address_space_limit = cgroup_plan_.memory_bytes;
  }
  launch.placement.workers = workers_;
  launch.placement.pool_name = config_.process_name_prefix;
  launch.crash_backtraces = config_.crash_backtraces;
  return launch;
}

absl::StatusOr<WorkerLaunch> ForkLauncher::placed_launch_for(int slot) {
  WorkerLaunch launch = launch_for(slot);
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> env =
      evaluate_worker_env(config_.worker_env, slot);
  if (!env.ok()) return env.status();
  launch.placement.env = *std::move(env);
  launch.placement.generation = generations_[slot];
  if (config_.spread_cpus) launch.placement.cpu = spread_cpu(cpus_, slot);
  return launch;
}

absl::Status ForkLauncher::ensure_server() {
  if (!config_.fork_server || server_ != nullptr) return absl::OkStatus();
  WorkerLaunch launch = launch_for(0);
  launch.process_name = absl::StrCat(config_.process_name_prefix, "-fs").substr(0, 15);
  absl::StatusOr<std::unique_ptr<ForkServer>> server = ForkServer::start(launch);
  if (!server.ok()) {
    return absl::Status(server.status().code(), absl::StrCat("could not start the fork server: ",
                                                             server.status().message()));
  }
  server_ = *std::move(server);
  watch_server();
  return absl::OkStatus();
}

void ForkLauncher::watch_server() {
  if (poll_set_ != nullptr && server_ != nullptr && !server_watch_) {
    server_watch_ = poll_set_->watch(poll_group_, server_->fd(), POLLIN, /*key=*/0);
  }
}

absl::StatusOr<std::unique_ptr<WorkerLink>> ForkLauncher::launch(int slot,
                                                                 const std::string& name) {
  absl::StatusOr<WorkerLaunch> placed = placed_launch_for(slot);
  if (!placed.ok()) return placed.status();
  WorkerLaunch& launch = *placed;
  absl::StatusOr<std::optional<WorkerCgroup>> cgroup = make_cgroup(launch);
  if (!cgroup.ok()) return cgroup.status();
  const ForkLink::Limits limits{config_.max_frame_bytes, config_.frame_timeout};
  absl::StatusOr<std::optional<OutputPipes>> output =
      make_output_pipes(config_.forward_output, launch);
  if (!output.ok()) return output.status();
  if (config_.fork_server) {
    if (absl::Status started = ensure_server(); !started.ok()) return started;
    absl::StatusOr<ForkServer::Spawned> spawned = server_->spawn(launch);
    if (!spawned.ok()) return spawned.status();
    const pid_t pid = spawned->pid;
    ++generations_[slot];
    // Without pidfds only the server may signal its worker: it alone knows whether it reaped it.
    // Never a later server's: the same pid there is another process.
    auto through_server = [this, pid, slot, server = server_->pid()](int signal) {
      if (server_ != nullptr && server_->pid() == server) server_->signal(pid, slot, signal);
    };
    auto link = std::make_unique<ForkLink>(absl::StrCat(name, " (pid ", pid, ")"),
                                           WorkerProcess(pid, /*adopted=*/true, through_server),
                                           std::move(spawned->channel), std::move(spawned->page),
                                           limits);
    if (*cgroup) link->set_cgroup(**std::move(cgroup));
    attach_output(*output, *link);
    adopted_[pid] = link.get();
    link->on_destroy([this, pid] { adopted_.erase(pid); });
    return link;
  }

  absl::StatusOr<SocketPair> channel = make_socket_pair(kChannelSendBufferBytes);
  if (!channel.ok()) return channel.status();
  absl::StatusOr<ControlPageMapping> page =
      ControlPageMapping::create(absl::StrCat(launch.process_name, "-control"));
  if (!page.ok()) return page.status();
  std::unique_ptr<SharedRegion> region;
  // Not under RLIMIT_AS: the region's address space (hundreds of MiB, mostly never touched) would
  // count against max_worker_memory_bytes there, and leave the worker no room below a cap that
  // fits its tasks. Its blobs travel in frames instead.
  if (config_.blob_regions && cgroup_plan_.memory != CgroupPlan::Memory::kRlimitAs) {
    absl::StatusOr<std::unique_ptr<SharedRegion>> made =
        SharedRegion::create(absl::StrCat(launch.process_name, "-blobs"));
    if (!made.ok()) return made.status();
    region = *std::move(made);
  }
  const pid_t parent = ::getpid();
  absl::StatusOr<pid_t> pid = fork_child("a worker");
  if (!pid.ok()) return pid.status();
  if (*pid == 0) {
    channel->parent_end.release();  // closed in the child with every other inherited descriptor
    map_own_memory(*page, region.get());
    worker_main(channel->child_end.release(), page->get(), launch, parent, region.get());
  }
  ++generations_[slot];
  // The worker has its copies: ours would cost a descriptor per page and region for nothing.
  page->close_descriptor();
  if (region) region->close_descriptor();
  absl::StatusOr<WorkerProcess> process = watch_new_worker(*pid);
  if (!process.ok()) return process.status();
  auto link = std::make_unique<ForkLink>(absl::StrCat(name, " (pid ", *pid, ")"),
                                         *std::move(process), std::move(channel->parent_end),
                                         *std::move(page), limits, std::move(region));
  if (*cgroup) link->set_cgroup(**std::move(cgroup));
  attach_output(*output, *link);
  return link;
}

absl::StatusOr<std::unique_ptr<ForkLink>> ForkLauncher::launch_on(
    int slot, const std::string& name, std::unique_ptr<TlsChannel> channel,
    WorkerPlacement placement) {
  WorkerLaunch launch = launch_for(slot);
  launch.placement = std::move(placement);
  // Its page is ours (a relay's), not the pool's: results held in it would not reach the pool.
  launch.hold_results = false;
  absl::StatusOr<std::optional<WorkerCgroup>> cgroup = make_cgroup(launch);
  if (!cgroup.ok()) return cgroup.status();
  absl::StatusOr<std::optional<OutputPipes>> output =
      make_output_pipes(config_.forward_output, launch);
  if (!output.ok()) return output.status();
  launch.output_read_elsewhere = launch.stdout_fd >= 0;
  absl::StatusOr<ControlPageMapping> page =
      ControlPageMapping::create(absl::StrCat(launch.process_name, "-control"));
  if (!page.ok()) return page.status();
  // Its batches come over `channel` from elsewhere, not through us: it opens their claims.
  page->set_worker_opens_claims();
  const pid_t parent = ::getpid();
  absl::StatusOr<pid_t> pid = fork_child("a worker");
  if (!pid.ok()) return pid.status();
  if (*pid == 0) {
    map_own_memory(*page, nullptr);
    // Its relay is undumpable (it holds the token: relay.cc); the worker, which does not, is
    // dumpable as any program: debuggers, core dumps and its own /proc files work as usual.
    ::prctl(PR_SET_DUMPABLE, 1);
    // The session goes on in the worker (which never returns): ours is its only copy there.
    TlsChannel* session = channel.release();
    worker_main(session->fd(), page->get(), launch, parent, nullptr, session);
  }
  // Ours closes here: the worker holds the only copy, so the connection ends with it.
  channel.reset();
  page->close_descriptor();
  absl::StatusOr<WorkerProcess> process = watch_new_worker(*pid);
  if (!process.ok()) return process.status();
  auto link = std::make_unique<ForkLink>(
      absl::StrCat(name, " (pid ", *pid, ")"), *std::move(process), UniqueFd(), *std::move(page),
      ForkLink::Limits{config_.max_frame_bytes, config_.frame_timeout});
  if (*cgroup) link->set_cgroup(**std::move(cgroup));
  attach_output(*output, *link);
  return link;
}

void ForkLauncher::watch_with(PollSet& set, uint32_t group) {
  poll_set_ = &set;
  poll_group_ = group;
  watch_server();
}

void ForkLauncher::service(const std::vector<PollSet::Fired>& fired, LauncherEvents& events) {
  // Reports read ahead while waiting for a spawn reply are queued: take them without waiting for
  // the socket to say so.
  if (!fired.empty() || has_pending_events()) take_server_reports(events);
}

bool ForkLauncher::has_pending_events() const {
  return server_ != nullptr && server_->has_queued_exits();
}

void ForkLauncher::take_server_reports(LauncherEvents& events) {
  if (server_ == nullptr) return;
  std::vector<std::pair<pid_t, int>> exits;
  const absl::Status alive = server_->take_exits(exits);
  for (const auto& [pid, status] : exits) {
    auto it = adopted_.find(pid);
    if (it != adopted_.end()) it->second->on_reaped_by_server(status, events.events_of(*it->second));
  }
  if (!alive.ok()) {
    // Its workers die with it (PR_SET_PDEATHSIG); no report will come for them. The next
    // launch() starts a new server.
    std::vector<ForkLink*> orphans;
    for (const auto& [pid, link] : adopted_) orphans.push_back(link);
    for (ForkLink* link : orphans) {
      link->stop(StopMode::kKill);
      link->on_reaped_by_server(W_EXITCODE(0, SIGKILL), events.events_of(*link));
    }
    server_watch_.reset();  // before its descriptor closes
    server_.reset();
  }
}

}  // namespace procpool::internal
