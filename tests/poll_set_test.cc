// Unit tests of PollSet (lib/common/poll_set.h), the pool loop's epoll set: what poll() would
// report, per group, as descriptors come, change, move between groups, and go — including a
// descriptor closed while a forked child still holds a copy, whose number another group takes.

#include "lib/common/poll_set.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "doctest/doctest.h"
#include "lib/common/unique_fd.h"

namespace procpool::internal {
namespace {

struct Pipe {
  UniqueFd read_end;
  UniqueFd write_end;
};

Pipe make_pipe() {
  int fds[2];
  REQUIRE(::pipe2(fds, O_CLOEXEC | O_NONBLOCK) == 0);
  return {UniqueFd(fds[0]), UniqueFd(fds[1])};
}

void write_byte(const UniqueFd& fd) { REQUIRE(::write(fd.get(), "x", 1) == 1); }

// A forked child that holds copies of this process's descriptors (a worker forked before it
// closed what it inherited) until release(): a file closed here stays open in the kernel.
class CopyHolder {
 public:
  CopyHolder() {
    int go[2];
    REQUIRE(::pipe2(go, O_CLOEXEC) == 0);
    child_ = ::fork();
    REQUIRE(child_ >= 0);
    if (child_ == 0) {
      char byte;
      (void)!::read(go[0], &byte, 1);  // until the parent is done
      ::_exit(0);
    }
    ::close(go[0]);
    go_.reset(go[1]);
  }
  // Lets the child end, and reaps it.
  void release() {
    (void)!::write(go_.get(), "x", 1);
    go_.reset();
    int status = 0;
    REQUIRE(::waitpid(child_, &status, 0) == child_);
  }

 private:
  pid_t child_ = -1;
  UniqueFd go_;
};

// The same number as `number`, another file: `fresh`'s read end moved there if the kernel gave it
// another.
int take_number(int number, Pipe& fresh, UniqueFd& moved) {
  if (fresh.read_end.get() == number) return number;
  REQUIRE(::dup2(fresh.read_end.get(), number) == number);
  moved.reset(number);
  return number;
}


void set_one(PollSet& set, uint32_t group, int fd, short events) {
  const pollfd entry{fd, events, 0};
  set.set(group, &entry, 1);
}

bool is_ready(const PollSet& set, uint32_t group) {
  const auto& ready = set.ready_groups();
  return std::find(ready.begin(), ready.end(), group) != ready.end();
}

TEST_CASE("a wait reports the ready entries of each group, in the order the group gave them") {
  PollSet set;
  CHECK(set.uses_epoll());
  Pipe a = make_pipe();
  Pipe b = make_pipe();
  const pollfd entries[2] = {{a.read_end.get(), POLLIN, 0}, {b.read_end.get(), POLLIN, 0}};
  set.set(3, entries, 2);
  CHECK(set.wait(0) == 0);

  write_byte(b.write_end);
  REQUIRE(set.wait(5000) == 1);
  CHECK(is_ready(set, 3));
  REQUIRE(set.entries(3).size() == 2);
  CHECK(set.entries(3)[0].revents == 0);
  CHECK((set.entries(3)[1].revents & POLLIN) != 0);

  SUBCASE("level-triggered: still ready until read, cleared once read") {
    REQUIRE(set.wait(0) == 1);
    CHECK((set.entries(3)[1].revents & POLLIN) != 0);
    char byte;
    REQUIRE(::read(b.read_end.get(), &byte, 1) == 1);
    CHECK(set.wait(0) == 0);
    CHECK(set.entries(3)[1].revents == 0);
  }
  SUBCASE("an entry left out of the group's next list is no longer reported") {
    set.set(3, entries, 1);
    CHECK(set.wait(0) == 0);
    CHECK(set.entries(3).size() == 1);
  }
  SUBCASE("a closed peer is POLLHUP, as poll() says") {
    b.write_end.reset();
    char byte;
    REQUIRE(::read(b.read_end.get(), &byte, 1) == 1);
    REQUIRE(set.wait(0) == 1);
    CHECK((set.entries(3)[1].revents & POLLHUP) != 0);
  }
}

TEST_CASE("what an entry waits for changes with the group's list") {
  PollSet set;
  UniqueFd a_end, b_end;
  {
    int fds[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, fds) == 0);
    a_end.reset(fds[0]);
    b_end.reset(fds[1]);
  }
  set_one(set, 0, a_end.get(), POLLIN);
  CHECK(set.wait(0) == 0);  // writable, but not asked
  set_one(set, 0, a_end.get(), POLLIN | POLLOUT);
  REQUIRE(set.wait(0) == 1);
  CHECK(set.entries(0)[0].revents == POLLOUT);
  set_one(set, 0, a_end.get(), POLLIN);
  CHECK(set.wait(0) == 0);
  set_one(set, 0, a_end.get(), 0);  // nothing asked: only errors and hang-ups, as poll()
  write_byte(b_end);
  CHECK(set.wait(0) == 0);
  b_end.reset();
  REQUIRE(set.wait(0) == 1);
  CHECK((set.entries(0)[0].revents & POLLHUP) != 0);
}

TEST_CASE("a descriptor handed from one group to another is reported in the group that has it") {
  PollSet set;
  Pipe p = make_pipe();
  Pipe other = make_pipe();
  // The remote launcher's handover of a data connection to a link: both lists change before the
  // next wait.
  const pollfd launcher[2] = {{other.read_end.get(), POLLIN, 0}, {p.read_end.get(), POLLIN, 0}};
  set.set(1, launcher, 2);
  CHECK(set.wait(0) == 0);
  set.set(1, launcher, 1);
  set_one(set, 7, p.read_end.get(), POLLIN);
  write_byte(p.write_end);
  REQUIRE(set.wait(5000) == 1);
  CHECK(is_ready(set, 7));
  CHECK(!is_ready(set, 1));
  CHECK(set.entries(7)[0].revents == POLLIN);
}

TEST_CASE("many idle descriptors and one ready: the wait names only the ready group") {
  PollSet set;
  std::vector<Pipe> pipes;
  for (uint32_t group = 0; group < 300; ++group) {
    pipes.push_back(make_pipe());
    set_one(set, 10 + group, pipes.back().read_end.get(), POLLIN);
  }
  CHECK(set.wait(0) == 0);
  write_byte(pipes[123].write_end);
  REQUIRE(set.wait(5000) == 1);
  REQUIRE(set.ready_groups().size() == 1);
  CHECK(set.ready_groups()[0] == 10 + 123);
}

TEST_CASE("a descriptor closed while a forked child holds a copy reports to no one, and its "
          "number serves the group that takes it next") {
  PollSet set;
  Pipe old_pipe = make_pipe();
  set_one(set, 4, old_pipe.read_end.get(), POLLIN);
  CHECK(set.wait(0) == 0);
  const int number = old_pipe.read_end.get();

  // A child holds a copy of the read end (a worker forked before it closes what it inherited):
  // closing ours leaves the registration alive in the kernel.
  CopyHolder holder;
  // Closed before its group gave it up (a link that closed a descriptor itself): removing it by
  // number fails, and its registration lives on while the child's copy does.
  old_pipe.read_end.reset();
  set.set(4, nullptr, 0);
  write_byte(old_pipe.write_end);  // the old file is ready now, for whoever still watches it

  // The same number, another file, another group.
  Pipe new_pipe = make_pipe();
  UniqueFd moved;
  const int new_fd = take_number(number, new_pipe, moved);
  set_one(set, 5, new_fd, POLLIN);
  CHECK(set.wait(0) == 0);
  write_byte(new_pipe.write_end);
  REQUIRE(set.wait(5000) == 1);
  CHECK(is_ready(set, 5));
  CHECK(!is_ready(set, 4));

  holder.release();
}

TEST_CASE("a group's next descriptors, fresh, are registered even where a number repeats") {
  PollSet set;
  Pipe first = make_pipe();
  set_one(set, 2, first.read_end.get(), POLLIN);
  CHECK(set.wait(0) == 0);
  const int number = first.read_end.get();
  // A slot's link ends (closing its descriptor) and the next one takes the same number before
  // the set hears of either.
  first.read_end.reset();
  Pipe second = make_pipe();
  UniqueFd moved;
  (void)take_number(number, second, moved);
  set_one(set, 2, number, POLLIN);  // the same list as before: not fresh, nothing to register
  write_byte(second.write_end);
  CHECK(set.wait(0) == 0);
  const pollfd entry{number, POLLIN, 0};
  set.set(2, &entry, 1, /*fresh=*/true);
  REQUIRE(set.wait(5000) == 1);
  CHECK(set.entries(2)[0].revents == POLLIN);
}

bool fired_key(const PollSet& set, uint32_t group, uint64_t key, short revents) {
  for (const PollSet::Fired& fired : set.fired(group)) {
    if (fired.key == key) return (fired.revents & revents) == revents;
  }
  return false;
}

TEST_CASE("watches report their keys, beside the entries of groups") {
  PollSet set;
  Pipe listed = make_pipe();
  Pipe watched = make_pipe();
  Pipe other = make_pipe();
  set_one(set, 0, listed.read_end.get(), POLLIN);
  PollSet::Watch watch = set.watch(1, watched.read_end.get(), POLLIN, 42);
  PollSet::Watch quiet = set.watch(1, other.read_end.get(), POLLIN, 43);
  CHECK(watch.key() == 42);
  CHECK(set.wait(0) == 0);
  CHECK(set.fired(1).empty());
  write_byte(watched.write_end);
  REQUIRE(set.wait(5000) == 1);
  CHECK(is_ready(set, 1));
  REQUIRE(set.fired(1).size() == 1);
  CHECK(fired_key(set, 1, 42, POLLIN));
  write_byte(listed.write_end);
  REQUIRE(set.wait(5000) == 2);  // level-triggered: the watch is still ready
  CHECK(set.entries(0)[0].revents == POLLIN);
  CHECK(set.fired(1).size() == 1);

  SUBCASE("reset: no longer reported") {
    watch.reset();
    CHECK(!watch);
    REQUIRE(set.wait(0) == 1);
    CHECK(set.fired(1).empty());
  }
  SUBCASE("changed to wait for nothing: only hang-ups and errors") {
    watch.change(0);
    REQUIRE(set.wait(0) == 1);
    CHECK(set.fired(1).empty());
    watched.write_end.reset();
    REQUIRE(set.wait(0) == 2);
    CHECK(fired_key(set, 1, 42, POLLHUP));
  }
  SUBCASE("moved: the new holder's, reset once") {
    PollSet::Watch moved = std::move(watch);
    CHECK(!watch);
    REQUIRE(set.wait(0) == 2);
    CHECK(fired_key(set, 1, 42, POLLIN));
    moved = PollSet::Watch();
    REQUIRE(set.wait(0) == 1);
    CHECK(set.fired(1).empty());
  }
}

TEST_CASE("a watch waits for writing when asked to") {
  PollSet set;
  int fds[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, fds) == 0);
  UniqueFd a_end(fds[0]);
  UniqueFd b_end(fds[1]);
  PollSet::Watch watch = set.watch(1, a_end.get(), POLLIN, 7);
  CHECK(set.wait(0) == 0);  // writable, but not asked
  watch.change(POLLIN | POLLOUT);
  REQUIRE(set.wait(0) == 1);
  REQUIRE(set.fired(1).size() == 1);
  CHECK(set.fired(1)[0].revents == POLLOUT);
  watch.change(POLLIN);
  CHECK(set.wait(0) == 0);
}

// The remote launcher's case: a connection closed (its watch reset first) and the next accepted
// connection given the same number, while a forked child still holds the old file (a worker
// forked before it closed what it inherited): the new connection is watched, the old file's
// readiness reaches no one.
TEST_CASE("a watch reset before its descriptor closes leaves nothing behind: the number, taken "
          "by another file, reports under its new watch only") {
  PollSet set;
  Pipe old_pipe = make_pipe();
  PollSet::Watch old_watch = set.watch(1, old_pipe.read_end.get(), POLLIN, 1);
  CHECK(set.wait(0) == 0);
  const int number = old_pipe.read_end.get();

  CopyHolder holder;
  old_watch.reset();
  old_pipe.read_end.reset();
  write_byte(old_pipe.write_end);  // the old file is ready, for whoever still watches it

  Pipe new_pipe = make_pipe();
  UniqueFd moved;
  const int new_fd = take_number(number, new_pipe, moved);
  PollSet::Watch new_watch = set.watch(1, new_fd, POLLIN, 2);
  CHECK(set.wait(0) == 0);
  write_byte(new_pipe.write_end);
  REQUIRE(set.wait(5000) == 1);
  REQUIRE(set.fired(1).size() == 1);
  CHECK(fired_key(set, 1, 2, POLLIN));

  holder.release();
}

TEST_CASE("a number a group gives up and a watch takes in the same round stays the watch's") {
  PollSet set;
  Pipe first = make_pipe();
  set_one(set, 5, first.read_end.get(), POLLIN);
  CHECK(set.wait(0) == 0);
  const int number = first.read_end.get();
  // A link closes its descriptor; the launcher accepts a connection that gets its number; then
  // the loop hears the link's list is empty (its removal, by number, comes before the watch's
  // registration).
  first.read_end.reset();
  Pipe second = make_pipe();
  UniqueFd moved;
  const int fd = take_number(number, second, moved);
  PollSet::Watch watch = set.watch(1, fd, POLLIN, 9);
  set.set(5, nullptr, 0);
  write_byte(second.write_end);
  REQUIRE(set.wait(5000) == 1);
  CHECK(fired_key(set, 1, 9, POLLIN));
  CHECK(!is_ready(set, 5));
}

}  // namespace
}  // namespace procpool::internal
