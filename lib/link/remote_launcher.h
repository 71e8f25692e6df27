// RemoteLauncher: a pool's workers on other hosts (PoolOptions::remote), each a TcpLink.
//
// It listens for worker programs (`procpool::serve`) dialling in, does each one's handshake
// (RemoteHost), and gives slots the hosts that are free. Hosts come from a cluster engine: either
// the pool runs RemoteOptions::launch once per worker it needs (replacements included), with
// {address} replaced by the address to dial and PROCPOOL_TOKEN and PROCPOOL_CONNECT in its
// environment (and how to speak TLS: PROCPOOL_ENCRYPT=0, or the PROCPOOL_TLS_* certificates); or something else started them (an `srun -n 64`, ssh, a Kubernetes Job, mpirun)
// and they dial in on their own. Without `launch`, a slot waits for a host until connect_timeout
// has passed since the pool started; after that a slot with no free host fails to start at once
// (kUnavailable, saying how many hosts are connected and why any were refused), and the crash
// guard's delays apply, cut short whenever a host becomes free. With `launch`, each launch has an
// id (PROCPOOL_LAUNCH_ID) its worker's hello repeats: a welcomed worker takes the link made for
// its launch, and a refused one (or a command that exits non-zero before its worker came) ends
// that link at once, a start failure saying why, instead of leaving it to connect_timeout.
//
// Processes it launched are its children: it reaps them, and at its end, once it has closed every
// connection (each relay then ends its worker and exits), it waits a little for them and then
// stops them (SIGTERM, SIGKILL).

#ifndef PROCPOOL_LIB_LINK_REMOTE_LAUNCHER_H_
#define PROCPOOL_LIB_LINK_REMOTE_LAUNCHER_H_

#include <sys/types.h>

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "lib/common/poll_set.h"
#include "lib/common/socket.h"
#include "lib/common/unique_fd.h"
#include "lib/link/launcher.h"
#include "lib/link/tcp_link.h"
#include "procpool/pool_options.h"

namespace procpool::internal {

class RemoteLauncher final : public Launcher {
 public:
  struct Config {
    RemoteOptions remote;
    size_t max_frame_bytes = 0;
    absl::Duration kill_grace;
    absl::Duration frame_timeout;
    std::string name;         // process name prefix of the workers
    std::string worker_type;  // what hosts must serve (serve.h: worker_type_name)
    bool report_resident_bytes = false;  // max_worker_rss_bytes is set
    // For each worker host's relay (lib/common/cgroup.h): PoolOptions' memory cap and cgroups.
    size_t max_worker_memory_bytes = 0;
    bool cgroups_off = false;
    // Who the workers are, what they start with (WorkerPlacement; ForkLauncher::Config's).
    int workers = 0;  // the pool's: what its descriptors must cover
    std::function<std::vector<std::pair<std::string, std::string>>(int)> worker_env;
    bool spread_cpus = false;  // each host pins slot i to the i-th CPU of its own set
    bool forward_output = true;          // relays forward their workers' stdout and stderr
    bool crash_backtraces = true;        // workers record the stack of a crash
  };
  // Raises the soft RLIMIT_NOFILE to the hard limit and listens; kInvalidArgument for a listen
  // address that cannot be parsed, kResourceExhausted (naming RLIMIT_NOFILE) when the workers'
  // descriptors cannot fit under the hard limit, an errno status when it cannot be bound.
  static absl::StatusOr<std::unique_ptr<RemoteLauncher>> start(Config config);
  ~RemoteLauncher() override;

  absl::StatusOr<std::unique_ptr<WorkerLink>> launch(int slot, const std::string& name) override;
  // Its listener, each host's connection and each launch command's pidfd are watched in `set`
  // from when they open until just before they close (a number closed and taken again by the next
  // accept is never another's watch); service() hears only of those that are ready, and check()
  // does its rounds over every host only when a deadline of one of them is due.
  void watch_with(PollSet& set, uint32_t group) override;
  void service(const std::vector<PollSet::Fired>& fired, LauncherEvents& events) override;
  bool has_pending_events() const override { return hosts_changed_; }
  int64_t check(int64_t now_ns, LauncherEvents& events) override;
  // Hosts up to the new size are welcome; without `launch`, slots added now wait connect_timeout
  // for hosts to dial in, as the first ones did.
  void set_workers(int workers) override;
  void finish() override;

  // The address workers dial: RemoteOptions::advertise, or the listen address with this host's
  // name in place of a wildcard, and the port it got.
  const std::string& address() const { return address_; }
  // The token workers must prove: RemoteOptions::token, or the one made for a pool given none.
  const std::string& token() const { return config_.remote.token; }

 private:
  explicit RemoteLauncher(Config config);
  // Runs RemoteOptions::launch with PROCPOOL_LAUNCH_ID=`launch_id` in its environment:
  // kInvalidArgument naming the option when it cannot run, kResourceExhausted when the process
  // table is full.
  absl::Status run_launch_command(const std::string& launch_id);
  void match_free_hosts(LauncherEvents& events);
  // A new connection's host: kept, and watched.
  void add_host(std::unique_ptr<RemoteHost> host);
  void service_host(RemoteHost& host, short revents, int64_t now_ns, LauncherEvents& events);
  // After hosts may have closed or become free (hosts_changed_): closed ones go, their refusals
  // counted, and free ones take waiting links; held connections begin where there is room.
  // Launch commands whose pidfds said they ended are reaped there too.
  void settle(LauncherEvents& events, bool launched_ended = false);
  void forget_closed_hosts(LauncherEvents& events);
  // A connection that presented a spawn's id: to the link that asked for it, if its proof holds.
  void hand_over_data(RemoteHost& host, LauncherEvents& events);
  // Reaps what ended; with `events`, a launch whose command failed before its worker came ends
  // its link at once.
  void reap_launched(LauncherEvents* events);
  // The link made for that launch, if it still waits: taken out of waiting_ for the caller to
  // bind or end. Each id is taken once.
  TcpLink* take_launch(const std::string& launch_id);
  void count_refusal(const std::string& why);
  // Raises the soft RLIMIT_NOFILE to the hard one; kResourceExhausted if the workers' do not fit.
  absl::Status raise_descriptor_limit() const;
  // Accepts what waits (admit() says whom), at most kMaxAcceptsPerTurn; pauses the listener when
  // accept() fails (out of descriptors).
  void accept_connections(const EventsOf& events_of);
  // What becomes of a new connection from `source`: it begins its handshake (there is room, or an
  // older silent connection was closed to make some), it waits for a handshake from its address
  // to end (held_), or it is closed (the pool has no room for it).
  enum class Admission { kBegin, kHold, kClose };
  Admission admit(const std::string& source, int64_t now_ns, const EventsOf& events_of);
  // Held connections whose address has room now begin their handshakes (one that has spoken
  // makes room by closing one of its address silent for kSilentAfterNs); those held past the
  // handshake deadline are closed. Returns when to look again (INT64_MAX: none held).
  int64_t begin_held(int64_t now_ns, const EventsOf& events_of);
  // The oldest connection that has sent nothing since it was accepted kSilentAfterNs or more
  // ago, among handshakes (from `source` only, unless it is empty) and held ones (with `source`
  // empty): closed. False when none was silent that long.
  bool close_oldest_silent(const std::string& source, int64_t now_ns, const EventsOf& events_of);
  int hosts_welcomed() const;  // idle or busy
  std::string unavailable_reason() const;
  std::string refusal_summary() const;  // "; refused: 2 x why, ..." or ""
  std::string launch_command() const;   // "the worker launched by `...`"

  Config config_;
  RemoteHostConfig host_config_;
  // The loop's set and this launcher's group in it (watch_with); null before.
  PollSet* poll_set_ = nullptr;
  uint32_t poll_group_ = 0;
  UniqueFd listener_;
  PollSet::Watch listener_watch_;  // after listener_: goes first
  std::string address_;
  int64_t first_wait_until_ns_ = 0;  // without `launch`: slots wait for hosts until then
  int64_t accept_paused_until_ns_ = 0;  // accept() failed: the listener rests until then
  std::vector<std::unique_ptr<RemoteHost>> hosts_;
  // Each host by its watch's key (never used twice: an event for a host gone finds none).
  absl::flat_hash_map<uint64_t, RemoteHost*> hosts_by_key_;
  uint64_t last_key_ = 0;
  // A host may have closed or become free outside service() (a link let go of it): service()
  // settles at the next wake.
  bool hosts_changed_ = false;
  // check()'s rounds: due at next_check_ns_, or at once after what may bring a deadline closer
  // than that (a launch, a link stopped while it waits).
  int64_t next_check_ns_ = 0;
  bool check_soon_ = true;
  // Connections accepted while their address had kMaxHandshakingPerSource handshakes under way,
  // oldest first: not read (no TLS state, no buffers) until one of those ends. They count
  // against kMaxHandshaking, so they take no descriptors beyond the handshakes' budget.
  struct HeldConnection {
    UniqueFd socket;
    std::string peer;
    std::string source;
    int64_t accepted_ns;
  };
  std::deque<HeldConnection> held_;
  std::map<int, int64_t> generations_;  // workers asked for so far, by slot
  std::vector<TcpLink*> links_;      // every live link, for data connections to find theirs
  std::deque<TcpLink*> waiting_;     // links without a host yet, oldest first
  struct Launched {
    pid_t pid;
    UniqueFd pidfd;  // none once its worker came (take_launch), or without pidfds
    PollSet::Watch watch;  // pidfd's (after it: goes first)
    std::string launch_id;
    bool came = false;  // its worker came: only reaped now, looked for every kCameLookIntervalNs
  };
  std::vector<Launched> launched_;
  int64_t next_look_ns_ = 0;  // without pidfds: when to look for launched_'s exits again
  // With `launch`: each launch's id (PROCPOOL_LAUNCH_ID, which its worker's hello repeats) and
  // the link made for it, until that worker comes (welcomed or refused) or the link ends.
  std::map<std::string, TcpLink*> launches_;
  std::map<std::string, int> refusals_;  // why hosts were refused, and how often
  int connected_ever_ = 0;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_LINK_REMOTE_LAUNCHER_H_
