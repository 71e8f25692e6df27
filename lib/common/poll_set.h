// PollSet: the descriptors an event loop waits on, kept registered in one epoll instance.
//
// poll() costs per descriptor at every call, ready or not: at 256 workers (516 descriptors) one
// call took 40 µs, and the pool's loop makes one per wake. A PollSet registers a descriptor once
// and changes the registration only when what is waited for changes, so that a wait costs per
// ready descriptor. Its users keep the poll() vocabulary (a `pollfd` list per participant, the
// `revents` they get back), so that code written against poll() (a link's add_pollfds and
// service) runs on it unchanged:
//
//   PollSet set;
//   set.set(kMine, wanted.data(), wanted.size());  // whenever `wanted` may have changed
//   set.wait(timeout_ms);
//   for (uint32_t group : set.ready_groups()) { const PollSet::Entries& e = set.entries(group); ... }
//
// Descriptors are grouped: a group is one participant's list (a link's, the launcher's), and
// set() replaces a whole group's list. The entries of a group keep the order set() gave them, and
// after wait() their `revents` say what is ready, as poll() would have filled them.
//
// Level-triggered, as poll() is. The hazard of registering: a registration belongs to the file,
// not the number. A descriptor closed while registered leaves the set by itself, unless a forked
// child still holds a copy of it; then its registration lives on, and its events (under a token no
// entry has any more) are dropped. And a number closed and taken by another file between two
// set() calls looks the same as before: owners call set() in the same round as they close a
// descriptor (set() of every group removes before any group adds, so a number one group gave up
// and another took is never removed from the one that took it), pass `fresh` when a group's
// descriptors all changed (a slot's next link), and use poll_each_wait() where they cannot.
//
// Where epoll_create1 failed (descriptors exhausted), wait() falls back to one poll() over every
// entry. Threads: not thread-safe; one thread at a time.

#ifndef PROCPOOL_LIB_COMMON_POLL_SET_H_
#define PROCPOOL_LIB_COMMON_POLL_SET_H_

#include <poll.h>
#include <sys/epoll.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "lib/common/unique_fd.h"

namespace procpool::internal {

class PollSet {
 public:
  using Entries = std::vector<pollfd>;

  PollSet();
  PollSet(const PollSet&) = delete;
  PollSet& operator=(const PollSet&) = delete;

  // `group`'s descriptors from now on (those of earlier calls that are not in `wanted` are no
  // longer waited on). Registered at the next wait() (or apply()). `fresh`: the descriptors of
  // earlier calls are closed or about to be (another link's), so that a number that repeats is
  // another file: every entry is registered anew.
  void set(uint32_t group, const pollfd* wanted, size_t count, bool fresh = false);
  // `group`'s descriptors, not registered: polled at every wait, as poll() does, beside the epoll
  // instance. For an owner that may close a descriptor and reuse its number without calling set()
  // in between (the remote launcher's connections, closed and accepted as hosts come and go).
  void poll_each_wait(uint32_t group, const pollfd* wanted, size_t count);
  // Registers now what set() asked for (wait() does it too): a caller about to close descriptors
  // it gave up calls it first.
  void apply();
  // Waits at most `timeout_ms` (-1: no limit) for any entry to be ready; returns the number of
  // groups with one ready (0 on timeout), or -1 with errno (EINTR). The revents of every entry
  // are cleared first, then set for what is ready.
  int wait(int timeout_ms);
  // The groups wait() found ready, each once, in no particular order.
  const std::vector<uint32_t>& ready_groups() const { return ready_groups_; }
  // `group`'s entries as last set(), with the revents of the last wait().
  const Entries& entries(uint32_t group) const;
  // For tests and figures: whether waits go through epoll.
  bool uses_epoll() const { return epoll_.valid(); }

 private:
  struct Group {
    Entries entries;                 // as set(), revents from the last wait
    std::vector<uint64_t> tokens;    // entries[i]'s registration (0: none)
    Entries pending;                 // what set() asked for, not yet registered
    bool has_pending = false;
    bool fresh = false;              // the pending list's files are all new
    bool polled = false;             // poll_each_wait(): never registered
    bool ready = false;              // in ready_groups_
  };
  // (apply(): first every removal of every group, then additions and changes, so that a number
  // one group gave up and another took is never removed from the group that took it.)
  void remove_gone(Group& group);
  void register_wanted(uint32_t index, Group& group);
  uint64_t token_for(uint32_t group, size_t index);
  void clear_ready();
  // poll() over `polled_groups_`' entries (or every group's, without epoll) and the epoll
  // instance; then what epoll has ready.
  int wait_with_poll(int timeout_ms);
  bool take_epoll_events(int timeout_ms);
  void mark_ready(uint32_t index, Group& group);

  UniqueFd epoll_;
  std::vector<Group> groups_;
  std::vector<uint32_t> changed_;       // groups with pending lists
  std::vector<uint32_t> polled_groups_;  // poll_each_wait()'s, each once
  std::vector<uint32_t> ready_groups_;
  std::vector<epoll_event> events_;
  uint32_t serial_ = 0;
  // The poll() fallback: every entry, and where each came from.
  std::vector<pollfd> all_;
  std::vector<std::pair<uint32_t, uint32_t>> all_origin_;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_COMMON_POLL_SET_H_
