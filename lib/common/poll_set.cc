#include "lib/common/poll_set.h"

#include <errno.h>
#include <sys/epoll.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <utility>

#include "absl/container/flat_hash_map.h"

namespace procpool::internal {
namespace {

// A registration's token: its group, its place in the group, and a serial that tells a live
// registration from one that outlived its entry (a copy of the descriptor in a forked child).
constexpr int kIndexBits = 20;
constexpr int kSerialBits = 20;
constexpr uint64_t kIndexMask = (uint64_t{1} << kIndexBits) - 1;
constexpr uint64_t kSerialMask = (uint64_t{1} << kSerialBits) - 1;
// A watch's token names this group (no list has it: groups are far fewer) and the watch's index.
constexpr uint32_t kWatchedGroup = (uint32_t{1} << (64 - kIndexBits - kSerialBits)) - 1;
// Events come back at most this many a wait; the rest, still ready, at the next (level-triggered).
constexpr size_t kMaxEventsPerWait = 512;

// poll()'s and epoll's bits are the same numbers on Linux; only those that mean the same go over.
constexpr uint32_t kPollBits = POLLIN | POLLPRI | POLLOUT | POLLERR | POLLHUP;
static_assert(EPOLLIN == POLLIN && EPOLLPRI == POLLPRI && EPOLLOUT == POLLOUT &&
              EPOLLERR == POLLERR && EPOLLHUP == POLLHUP);

bool same(const pollfd& a, const pollfd& b) { return a.fd == b.fd && a.events == b.events; }

}  // namespace

PollSet::PollSet() : epoll_(own_fd(::epoll_create1(EPOLL_CLOEXEC))) {
  events_.resize(kMaxEventsPerWait);
}

void PollSet::set(uint32_t group, const pollfd* wanted, size_t count, bool fresh) {
  Group& g = group_at(group);
  // Nothing changed (the common case: a link with a frame sent and its answer read): nothing to
  // register.
  if (!fresh && !g.has_pending && count == g.entries.size() &&
      std::equal(wanted, wanted + count, g.entries.begin(), same)) {
    return;
  }
  g.pending.assign(wanted, wanted + count);
  for (pollfd& entry : g.pending) entry.revents = 0;
  g.fresh = g.fresh || fresh;
  if (!g.has_pending) changed_.push_back(group);
  g.has_pending = true;
}

PollSet::Group& PollSet::group_at(uint32_t group) {
  if (group >= groups_.size()) groups_.resize(group + 1);
  return groups_[group];
}

PollSet::Watch PollSet::watch(uint32_t group, int fd, short events, uint64_t key) {
  (void)group_at(group);
  uint32_t index;
  if (!free_watched_.empty()) {
    index = free_watched_.back();
    free_watched_.pop_back();
  } else {
    index = static_cast<uint32_t>(watched_.size());
    watched_.emplace_back();
  }
  watched_[index] = Watched{.fd = fd, .events = events, .group = group, .key = key, .token = 0,
                            .live = true};
  // Added at apply(), after the removals of set(): a number a group gave up in this round may be
  // this one's.
  watches_to_add_.push_back(index);
  return Watch(this, index);
}

PollSet::Watch& PollSet::Watch::operator=(Watch&& other) noexcept {
  if (this != &other) {
    reset();
    set_ = std::exchange(other.set_, nullptr);
    index_ = other.index_;
  }
  return *this;
}

void PollSet::Watch::change(short events) {
  if (set_ != nullptr) set_->change_watch(index_, events);
}

void PollSet::Watch::reset() {
  if (set_ != nullptr) std::exchange(set_, nullptr)->drop_watch(index_);
}

uint64_t PollSet::Watch::key() const { return set_ != nullptr ? set_->watched_[index_].key : 0; }

void PollSet::change_watch(uint32_t index, short events) {
  // (May run on another thread while wait() blocks: see the header. Only these two fields are
  // shared with it, and epoll_ctl is safe beside epoll_wait.)
  Watched& watched = watched_[index];
  std::atomic_ref<short> wanted(watched.events);
  if (wanted.load(std::memory_order_relaxed) == events) return;
  wanted.store(events, std::memory_order_relaxed);
  const uint64_t token = std::atomic_ref<uint64_t>(watched.token).load(std::memory_order_relaxed);
  if (token == 0) return;  // registered as it is now at apply()
  // Its descriptor is open (the owner resets the Watch before closing it): the number is its.
  epoll_event event{};
  event.events = static_cast<uint32_t>(events) & kPollBits;
  event.data.u64 = token;
  (void)::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, watched.fd, &event);
}

void PollSet::drop_watch(uint32_t index) {
  Watched& watched = watched_[index];
  if (watched.token != 0) (void)::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, watched.fd, nullptr);
  watched = Watched{};
  free_watched_.push_back(index);
}

void PollSet::register_watches() {
  for (uint32_t index : watches_to_add_) {
    Watched& watched = watched_[index];
    // Reset since (or reset and its index taken again, then added already).
    if (!watched.live || watched.token != 0) continue;
    epoll_event event{};
    event.events = static_cast<uint32_t>(
                       std::atomic_ref<short>(watched.events).load(std::memory_order_relaxed)) &
                   kPollBits;
    event.data.u64 = token_for(kWatchedGroup, index);
    int rc = ::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, watched.fd, &event);
    // The same descriptor in a group's list too: the watch's.
    if (rc != 0 && errno == EEXIST) rc = ::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, watched.fd, &event);
    if (rc == 0) std::atomic_ref<uint64_t>(watched.token).store(event.data.u64, std::memory_order_relaxed);
  }
  watches_to_add_.clear();
}

const PollSet::Entries& PollSet::entries(uint32_t group) const {
  static const Entries none;
  return group < groups_.size() ? groups_[group].entries : none;
}

const std::vector<PollSet::Fired>& PollSet::fired(uint32_t group) const {
  static const std::vector<Fired> none;
  return group < groups_.size() ? groups_[group].fired : none;
}

uint64_t PollSet::token_for(uint32_t group, size_t index) {
  serial_ = (serial_ + 1) & static_cast<uint32_t>(kSerialMask);
  if (serial_ == 0) serial_ = 1;  // 0 is "not registered"
  return (uint64_t{group} << (kIndexBits + kSerialBits)) | (uint64_t{index} << kSerialBits) |
         serial_;
}

void PollSet::remove_gone(Group& group) {
  // Removed by number: a descriptor already closed is gone from the set by itself (EBADF,
  // ENOENT), and one whose number another file took since is not registered under it yet
  // (additions come after every removal).
  for (size_t i = 0; i < group.entries.size(); ++i) {
    if (group.tokens[i] == 0) continue;
    const int fd = group.entries[i].fd;
    const bool kept = !group.fresh &&
                      std::any_of(group.pending.begin(), group.pending.end(),
                                  [fd](const pollfd& entry) { return entry.fd == fd; });
    if (!kept) (void)::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
  }
}

void PollSet::register_wanted(uint32_t index, Group& group) {
  // Where each descriptor was, to change its registration rather than make another. A link has
  // a handful; a remote launcher one per host.
  if (group.fresh) {
    // Every old registration was removed (remove_gone): none is to be changed.
    group.entries.clear();
    group.tokens.clear();
  }
  absl::flat_hash_map<int, size_t> was;
  if (group.entries.size() > 8) {
    for (size_t i = 0; i < group.entries.size(); ++i) was.emplace(group.entries[i].fd, i);
  }
  const auto find_was = [&](int fd) -> std::optional<size_t> {
    if (group.entries.size() > 8) {
      auto it = was.find(fd);
      return it == was.end() ? std::nullopt : std::optional<size_t>(it->second);
    }
    for (size_t i = 0; i < group.entries.size(); ++i) {
      if (group.entries[i].fd == fd) return i;
    }
    return std::nullopt;
  };
  std::vector<uint64_t> tokens(group.pending.size(), 0);
  for (size_t i = 0; i < group.pending.size(); ++i) {
    const pollfd& entry = group.pending[i];
    if (entry.fd < 0) continue;  // poll() skips those too
    const std::optional<size_t> old = find_was(entry.fd);
    if (old && *old == i && group.tokens[i] != 0 && group.entries[i].events == entry.events) {
      tokens[i] = group.tokens[i];
      continue;
    }
    epoll_event event{};
    event.events = static_cast<uint32_t>(entry.events) & kPollBits;
    event.data.u64 = token_for(index, i);
    const bool registered = old && group.tokens[*old] != 0;
    int rc = ::epoll_ctl(epoll_.get(), registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, entry.fd, &event);
    // Closed and its number taken again since (MOD: ENOENT), or registered by another group
    // (ADD: EEXIST, the same descriptor in two lists: the later one's).
    if (rc != 0 && errno == ENOENT) rc = ::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, entry.fd, &event);
    if (rc != 0 && errno == EEXIST) rc = ::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, entry.fd, &event);
    if (rc == 0) tokens[i] = event.data.u64;
  }
  group.entries = std::move(group.pending);
  group.pending.clear();
  group.tokens = std::move(tokens);
  group.has_pending = false;
  group.fresh = false;
}

void PollSet::apply() {
  if (changed_.empty() && watches_to_add_.empty()) return;
  if (epoll_.valid()) {
    for (uint32_t index : changed_) remove_gone(groups_[index]);
    for (uint32_t index : changed_) register_wanted(index, groups_[index]);
    register_watches();
  } else {
    watches_to_add_.clear();  // polled as they are at each wait
    for (uint32_t index : changed_) {
      Group& group = groups_[index];
      group.entries = std::move(group.pending);
      group.pending.clear();
      group.tokens.assign(group.entries.size(), 0);
      group.has_pending = false;
      group.fresh = false;
    }
  }
  changed_.clear();
}

void PollSet::clear_ready() {
  for (uint32_t index : ready_groups_) {
    Group& group = groups_[index];
    group.ready = false;
    for (pollfd& entry : group.entries) entry.revents = 0;
    group.fired.clear();
  }
  ready_groups_.clear();
}

void PollSet::mark_ready(uint32_t index, Group& group) {
  if (group.ready) return;
  group.ready = true;
  ready_groups_.push_back(index);
}

int PollSet::wait(int timeout_ms) {
  clear_ready();
  apply();
  if (!epoll_.valid()) return wait_with_poll(timeout_ms);
  if (!take_epoll_events(timeout_ms)) return -1;
  return static_cast<int>(ready_groups_.size());
}

bool PollSet::take_epoll_events(int timeout_ms) {
  const int count = ::epoll_wait(epoll_.get(), events_.data(), static_cast<int>(events_.size()),
                                 timeout_ms);
  if (count < 0) return false;
  for (int i = 0; i < count; ++i) {
    const uint64_t token = events_[i].data.u64;
    const uint64_t index = token >> (kIndexBits + kSerialBits);
    const size_t at = static_cast<size_t>((token >> kSerialBits) & kIndexMask);
    const short revents = static_cast<short>(events_[i].events & kPollBits);
    if (index == kWatchedGroup) {
      // Reset since it was ready (it cannot be: a reset removes it first), or a registration that
      // outlived its Watch: nobody's.
      if (at >= watched_.size() || watched_[at].token != token) continue;
      Group& group = groups_[watched_[at].group];
      group.fired.push_back({watched_[at].key, revents});
      mark_ready(watched_[at].group, group);
      continue;
    }
    if (index >= groups_.size()) continue;
    Group& group = groups_[index];
    // A registration that outlived its entry (see the header): nobody's event.
    if (at >= group.entries.size() || group.tokens[at] != token) continue;
    group.entries[at].revents = revents;
    mark_ready(static_cast<uint32_t>(index), group);
  }
  return true;
}

int PollSet::wait_with_poll(int timeout_ms) {
  all_.clear();
  all_origin_.clear();
  for (uint32_t index = 0; index < groups_.size(); ++index) {
    const Group& group = groups_[index];
    for (size_t at = 0; at < group.entries.size(); ++at) {
      all_.push_back(group.entries[at]);
      all_origin_.emplace_back(index, static_cast<uint32_t>(at));
    }
  }
  for (uint32_t index = 0; index < watched_.size(); ++index) {
    if (!watched_[index].live) continue;
    all_.push_back({watched_[index].fd,
                    std::atomic_ref<short>(watched_[index].events).load(std::memory_order_relaxed),
                    0});
    all_origin_.emplace_back(kWatchedGroup, index);
  }
  const int count = ::poll(all_.data(), all_.size(), timeout_ms);
  if (count < 0) return -1;
  for (size_t i = 0; i < all_.size(); ++i) {
    if (all_[i].revents == 0) continue;
    const auto [index, at] = all_origin_[i];
    if (index == kWatchedGroup) {
      Group& group = groups_[watched_[at].group];
      group.fired.push_back({watched_[at].key, all_[i].revents});
      mark_ready(watched_[at].group, group);
      continue;
    }
    Group& group = groups_[index];
    group.entries[at].revents = all_[i].revents;
    mark_ready(index, group);
  }
  return static_cast<int>(ready_groups_.size());
}

}  // namespace procpool::internal
