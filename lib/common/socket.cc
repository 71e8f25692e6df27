#include "lib/common/socket.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <memory>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/match.h"
#include "absl/time/clock.h"

namespace procpool::internal {
namespace {

void set_nodelay(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

HostPort from_sockaddr(const sockaddr_storage& address) {
  char text[INET6_ADDRSTRLEN] = {};
  HostPort out;
  if (address.ss_family == AF_INET6) {
    const auto* v6 = reinterpret_cast<const sockaddr_in6*>(&address);
    ::inet_ntop(AF_INET6, &v6->sin6_addr, text, sizeof(text));
    out.port = ntohs(v6->sin6_port);
  } else {
    const auto* v4 = reinterpret_cast<const sockaddr_in*>(&address);
    ::inet_ntop(AF_INET, &v4->sin_addr, text, sizeof(text));
    out.port = ntohs(v4->sin_port);
  }
  out.host = text;
  return out;
}

struct AddrInfoDeleter {
  void operator()(addrinfo* info) const { ::freeaddrinfo(info); }
};

absl::StatusOr<std::unique_ptr<addrinfo, AddrInfoDeleter>> resolve(const HostPort& address,
                                                                  bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  addrinfo* found = nullptr;
  const std::string port = std::to_string(address.port);
  const int rc = ::getaddrinfo(address.host.empty() ? nullptr : address.host.c_str(), port.c_str(),
                               &hints, &found);
  if (rc != 0) {
    return absl::UnavailableError(absl::StrCat("cannot resolve ", address.to_string(), ": ",
                                               ::gai_strerror(rc)));
  }
  return std::unique_ptr<addrinfo, AddrInfoDeleter>(found);
}

}  // namespace

std::string HostPort::to_string() const {
  if (absl::StrContains(host, ':')) return absl::StrCat("[", host, "]:", port);
  return absl::StrCat(host, ":", port);
}

absl::StatusOr<HostPort> parse_host_port(absl::string_view text) {
  HostPort out;
  absl::string_view port;
  if (absl::StartsWith(text, "[")) {
    const size_t close = text.find(']');
    if (close == absl::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      return absl::InvalidArgumentError(
          absl::StrCat("'", text, "' is not [address]:port"));
    }
    out.host = std::string(text.substr(1, close - 1));
    port = text.substr(close + 2);
  } else {
    const size_t colon = text.rfind(':');
    if (colon == absl::string_view::npos) {
      return absl::InvalidArgumentError(absl::StrCat("'", text, "' has no :port"));
    }
    out.host = std::string(text.substr(0, colon));
    if (absl::StrContains(out.host, ':')) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", text, "': write an IPv6 address in brackets, [addr]:port"));
    }
    port = text.substr(colon + 1);
  }
  uint32_t number = 0;
  if (!absl::SimpleAtoi(port, &number) || number > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("'", text, "' has no valid port"));
  }
  out.port = static_cast<uint16_t>(number);
  return out;
}

bool is_loopback_host(absl::string_view host) {
  if (host == "localhost" || host == "::1" || host == "ip6-localhost") return true;
  in_addr v4{};
  if (::inet_pton(AF_INET, std::string(host).c_str(), &v4) == 1) {
    return (ntohl(v4.s_addr) >> 24) == 127;
  }
  return false;
}

bool is_wildcard_host(absl::string_view host) {
  return host.empty() || host == "0.0.0.0" || host == "::" || host == "*";
}

static_assert(kLongestBacklog >= SOMAXCONN);

absl::StatusOr<UniqueFd> listen_tcp(const HostPort& address, int backlog) {
  HostPort bind_to = address;
  if (bind_to.host == "*") bind_to.host.clear();
  absl::StatusOr<std::unique_ptr<addrinfo, AddrInfoDeleter>> found = resolve(bind_to, true);
  if (!found.ok()) return found.status();
  int last_error = 0;
  for (addrinfo* info = found->get(); info != nullptr; info = info->ai_next) {
    UniqueFd fd = own_fd(::socket(info->ai_family, info->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
                                  info->ai_protocol));
    if (!fd) {
      last_error = errno;
      continue;
    }
    int one = 1;
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd.get(), info->ai_addr, info->ai_addrlen) != 0 || ::listen(fd.get(), backlog) != 0) {
      last_error = errno;
      continue;
    }
    return fd;
  }
  return absl::ErrnoToStatus(last_error, absl::StrCat("listening on ", address.to_string()));
}

absl::StatusOr<HostPort> local_address(int fd) {
  sockaddr_storage address{};
  socklen_t length = sizeof(address);
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    return absl::ErrnoToStatus(errno, "getsockname");
  }
  return from_sockaddr(address);
}

absl::StatusOr<HostPort> peer_address(int fd) {
  sockaddr_storage address{};
  socklen_t length = sizeof(address);
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    return absl::ErrnoToStatus(errno, "getpeername");
  }
  return from_sockaddr(address);
}

absl::StatusOr<UniqueFd> accept_tcp(int listener) {
  while (true) {
    const int fd = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd >= 0) {
      set_nodelay(fd);
      return own_fd(fd);
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return UniqueFd();
    // A connection that failed before we took it (ECONNABORTED...) is not the listener's fault.
    if (errno == ECONNABORTED || errno == EPROTO || errno == ENETDOWN || errno == EHOSTUNREACH) {
      continue;
    }
    return absl::ErrnoToStatus(errno, "accepting a worker's connection");
  }
}

absl::StatusOr<UniqueFd> connect_tcp(const HostPort& address, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  absl::StatusOr<std::unique_ptr<addrinfo, AddrInfoDeleter>> found = resolve(address, false);
  if (!found.ok()) return found.status();
  std::string last = "no address";
  for (addrinfo* info = found->get(); info != nullptr; info = info->ai_next) {
    UniqueFd fd = own_fd(::socket(info->ai_family, info->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
                                  info->ai_protocol));
    if (!fd) {
      last = std::strerror(errno);
      continue;
    }
    int rc = ::connect(fd.get(), info->ai_addr, info->ai_addrlen);
    if (rc != 0 && errno == EINPROGRESS) {
      pollfd wait{fd.get(), POLLOUT, 0};
      // Clamped: a connect_timeout of years must not wrap into a negative (endless) poll.
      const int ms = static_cast<int>(std::clamp<int64_t>(
          absl::ToInt64Milliseconds(deadline - absl::Now()), 0, std::numeric_limits<int>::max()));
      rc = ::poll(&wait, 1, ms);
      if (rc == 0) {
        last = "timed out";
        continue;
      }
      int error = 0;
      socklen_t length = sizeof(error);
      ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &error, &length);
      if (rc < 0 || error != 0) {
        last = std::strerror(rc < 0 ? errno : error);
        continue;
      }
      rc = 0;
    } else if (rc != 0) {
      last = std::strerror(errno);
      continue;
    }
    if (absl::Status blocking = set_nonblocking(fd.get(), false); !blocking.ok()) return blocking;
    set_nodelay(fd.get());
    return fd;
  }
  return absl::UnavailableError(
      absl::StrCat("cannot connect to ", address.to_string(), ": ", last));
}

}  // namespace procpool::internal
