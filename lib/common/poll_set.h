// PollSet: the descriptors an event loop waits on, kept registered in one epoll instance.
//
// poll() costs per descriptor at every call, ready or not: at 256 workers (516 descriptors) one
// call took 40 µs, and the pool's loop makes one per wake. A PollSet registers a descriptor once
// and changes the registration only when what is waited for changes, so that a wait costs per
// ready descriptor. Descriptors come in two ways:
//
// - Lists, in the poll() vocabulary (a `pollfd` list per participant, the `revents` they get
//   back), so that code written against poll() (a link's add_pollfds and service) runs on it
//   unchanged:
//
//     PollSet set;
//     set.set(kMine, wanted.data(), wanted.size());  // whenever `wanted` may have changed
//     set.wait(timeout_ms);
//     for (uint32_t group : set.ready_groups()) { const PollSet::Entries& e = set.entries(group); ... }
//
//   A group is one participant's list (a link's), and set() replaces a whole group's list. The
//   entries of a group keep the order set() gave them, and after wait() their `revents` say what
//   is ready, as poll() would have filled them.
//
// - Watches, one descriptor each, for an owner that opens and closes descriptors whenever it
//   likes (the remote launcher's listener, its hosts' connections): watch() registers one with a
//   key of the owner's choosing, the Watch it returns changes what it waits for, and resetting or
//   destroying that Watch removes it — at once, so the owner does it BEFORE it closes the
//   descriptor. After wait(), fired(group) lists the keys of that group's watches that are ready.
//
// Level-triggered, as poll() is. The hazard of registering: a registration belongs to the file,
// not the number. A descriptor closed while registered leaves the set by itself, unless a forked
// child still holds a copy of it; then its registration lives on, and its events (under a token no
// entry has any more) are dropped. And a number closed and taken by another file between two
// set() calls looks the same as before: owners call set() in the same round as they close a
// descriptor (set() of every group removes before any group, or watch, adds, so a number one
// group gave up and another took is never removed from the one that took it), and pass `fresh`
// when a group's descriptors all changed (a slot's next link); a watch is removed before its
// descriptor closes, so its number is free for anyone.
//
// Where epoll_create1 failed (descriptors exhausted), wait() falls back to one poll() over every
// entry and watch. Threads: one thread at a time, but for Watch::change() of a watch registered
// at an earlier wait, which another thread may call while wait() blocks (a caller's thread
// queues a frame for a remote host while the pool's thread waits; the caller wakes the wait).

#ifndef PROCPOOL_LIB_COMMON_POLL_SET_H_
#define PROCPOOL_LIB_COMMON_POLL_SET_H_

#include <poll.h>
#include <sys/epoll.h>

#include <cstddef>
#include <cstdint>
#include <utility>
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

  // One descriptor watched on its own (see the top): move-only; empty when default-made.
  class Watch {
   public:
    Watch() = default;
    Watch(Watch&& other) noexcept
        : set_(std::exchange(other.set_, nullptr)), index_(other.index_) {}
    Watch& operator=(Watch&& other) noexcept;
    Watch(const Watch&) = delete;
    Watch& operator=(const Watch&) = delete;
    ~Watch() { reset(); }

    // What it waits for from now on (POLLIN, POLLOUT; 0: only errors and hang-ups, as poll()).
    void change(short events);
    // No longer watched, at once: call it before closing the descriptor.
    void reset();
    explicit operator bool() const { return set_ != nullptr; }
    uint64_t key() const;

   private:
    friend class PollSet;
    Watch(PollSet* set, uint32_t index) : set_(set), index_(index) {}
    PollSet* set_ = nullptr;
    uint32_t index_ = 0;
  };
  // Watches `fd` for `events` until the Watch is reset or destroyed (it must not outlive this
  // set); registered at the next wait() (or apply()), after every removal. Its events come back
  // in fired(group) with `key`.
  Watch watch(uint32_t group, int fd, short events, uint64_t key);
  struct Fired {
    uint64_t key;
    short revents;
  };
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
  // `group`'s watches the last wait() found ready, each once, in no particular order.
  const std::vector<Fired>& fired(uint32_t group) const;
  // For tests and figures: whether waits go through epoll.
  bool uses_epoll() const { return epoll_.valid(); }

 private:
  struct Group {
    Entries entries;                 // as set(), revents from the last wait
    std::vector<uint64_t> tokens;    // entries[i]'s registration (0: none)
    Entries pending;                 // what set() asked for, not yet registered
    bool has_pending = false;
    bool fresh = false;              // the pending list's files are all new
    bool ready = false;              // in ready_groups_
    std::vector<Fired> fired;        // its watches that the last wait found ready
  };
  struct Watched {
    int fd = -1;
    short events = 0;    // shared with Watch::change() on another thread (atomic_ref)
    uint32_t group = 0;
    uint64_t key = 0;
    uint64_t token = 0;  // its registration (0: none yet); shared likewise
    bool live = false;   // a Watch holds it
  };
  // (apply(): first every removal of every group, then additions and changes, so that a number
  // one group gave up and another took is never removed from the group that took it.)
  void remove_gone(Group& group);
  void register_wanted(uint32_t index, Group& group);
  void register_watches();
  void change_watch(uint32_t index, short events);
  void drop_watch(uint32_t index);
  Group& group_at(uint32_t group);
  uint64_t token_for(uint32_t group, size_t index);
  void clear_ready();
  // Without epoll: one poll() over every entry and watch.
  int wait_with_poll(int timeout_ms);
  bool take_epoll_events(int timeout_ms);
  void mark_ready(uint32_t index, Group& group);

  UniqueFd epoll_;
  std::vector<Group> groups_;
  std::vector<uint32_t> changed_;       // groups with pending lists
  std::vector<Watched> watched_;         // by a Watch's index
  std::vector<uint32_t> free_watched_;   // indices of watched_ no Watch holds
  std::vector<uint32_t> watches_to_add_;  // registered at the next apply()
  std::vector<uint32_t> ready_groups_;
  std::vector<epoll_event> events_;
  uint32_t serial_ = 0;
  // The poll() fallback: every entry and watch, and where each came from (a watch: its index,
  // under kWatchedOrigin).
  std::vector<pollfd> all_;
  std::vector<std::pair<uint32_t, uint32_t>> all_origin_;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_COMMON_POLL_SET_H_
