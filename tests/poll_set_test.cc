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
  int go[2];
  REQUIRE(::pipe2(go, O_CLOEXEC) == 0);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    char byte;
    (void)!::read(go[0], &byte, 1);  // until the parent is done
    ::_exit(0);
  }
  ::close(go[0]);
  // Closed before its group gave it up (a link that closed a descriptor itself): removing it by
  // number fails, and its registration lives on while the child's copy does.
  old_pipe.read_end.reset();
  set.set(4, nullptr, 0);
  write_byte(old_pipe.write_end);  // the old file is ready now, for whoever still watches it

  // The same number, another file, another group.
  Pipe new_pipe = make_pipe();
  UniqueFd moved;
  if (new_pipe.read_end.get() != number) {
    REQUIRE(::dup2(new_pipe.read_end.get(), number) == number);
    moved.reset(number);
  }
  const int new_fd = moved ? moved.get() : new_pipe.read_end.get();
  set_one(set, 5, new_fd, POLLIN);
  CHECK(set.wait(0) == 0);
  write_byte(new_pipe.write_end);
  REQUIRE(set.wait(5000) == 1);
  CHECK(is_ready(set, 5));
  CHECK(!is_ready(set, 4));

  (void)!::write(go[1], "x", 1);
  ::close(go[1]);
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
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
  if (second.read_end.get() != number) {
    REQUIRE(::dup2(second.read_end.get(), number) == number);
    moved.reset(number);
  }
  set_one(set, 2, number, POLLIN);  // the same list as before: not fresh, nothing to register
  write_byte(second.write_end);
  CHECK(set.wait(0) == 0);
  const pollfd entry{number, POLLIN, 0};
  set.set(2, &entry, 1, /*fresh=*/true);
  REQUIRE(set.wait(5000) == 1);
  CHECK(set.entries(2)[0].revents == POLLIN);
}

TEST_CASE("groups polled at each wait report beside registered ones") {
  PollSet set;
  Pipe registered = make_pipe();
  Pipe polled = make_pipe();
  set_one(set, 0, registered.read_end.get(), POLLIN);
  const pollfd entry{polled.read_end.get(), POLLIN, 0};
  set.poll_each_wait(1, &entry, 1);
  CHECK(set.wait(0) == 0);
  write_byte(polled.write_end);
  REQUIRE(set.wait(5000) == 1);
  CHECK(is_ready(set, 1));
  write_byte(registered.write_end);
  set.poll_each_wait(1, &entry, 1);
  REQUIRE(set.wait(5000) == 2);
  CHECK(set.entries(0)[0].revents == POLLIN);
  CHECK(set.entries(1)[0].revents == POLLIN);
  // Its number closed and taken again without a word: polled, it is the new file's.
  polled.read_end.reset();
  Pipe again = make_pipe();
  char byte;
  REQUIRE(::read(registered.read_end.get(), &byte, 1) == 1);
  const pollfd next{again.read_end.get(), POLLIN, 0};
  set.poll_each_wait(1, &next, 1);
  CHECK(set.wait(0) == 0);
  write_byte(again.write_end);
  REQUIRE(set.wait(5000) == 1);
  CHECK(is_ready(set, 1));
}

}  // namespace
}  // namespace procpool::internal
