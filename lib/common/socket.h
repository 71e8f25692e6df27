// TCP sockets for remote workers: "host:port" addresses, listening, connecting with a deadline.
// Every socket is CLOEXEC and owned by a UniqueFd (unique_fd.h); TCP_NODELAY is set on
// connections, since frames are written whole and a delayed ACK would stall a round trip.

#ifndef PROCPOOL_LIB_COMMON_SOCKET_H_
#define PROCPOOL_LIB_COMMON_SOCKET_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "lib/common/unique_fd.h"

namespace procpool::internal {

struct HostPort {
  std::string host;  // a name or a literal address, without brackets
  uint16_t port = 0;
  // "host:port", with brackets around an IPv6 literal.
  std::string to_string() const;
};

// Parses "host:port", "[v6 literal]:port", or ":port" (the wildcard). kInvalidArgument says what
// is wrong with `text`.
absl::StatusOr<HostPort> parse_host_port(absl::string_view text);

// True for names and addresses that can only be reached from this machine: localhost, 127.0.0.0/8,
// ::1.
bool is_loopback_host(absl::string_view host);
// True for the wildcard addresses (every interface): "", 0.0.0.0, ::.
bool is_wildcard_host(absl::string_view host);

// A listening, non-blocking socket bound to `address` (port 0 picks one). The kernel cuts
// `backlog` to net.core.somaxconn: by default the longest queue the system allows (at least
// SOMAXCONN), so that a burst of connections waits there rather than being refused.
inline constexpr int kLongestBacklog = 65535;
absl::StatusOr<UniqueFd> listen_tcp(const HostPort& address, int backlog = kLongestBacklog);
// The address a socket is bound to (the port a listener got).
absl::StatusOr<HostPort> local_address(int fd);
// The address of a connected socket's peer.
absl::StatusOr<HostPort> peer_address(int fd);

// Accepts one connection (non-blocking, CLOEXEC, TCP_NODELAY); an invalid UniqueFd when none is
// waiting.
absl::StatusOr<UniqueFd> accept_tcp(int listener);

// Connects to `address` (every address it resolves to, in turn), giving up after `timeout`.
// The socket returned is blocking, with TCP_NODELAY. kUnavailable says why it failed.
absl::StatusOr<UniqueFd> connect_tcp(const HostPort& address, absl::Duration timeout);

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_COMMON_SOCKET_H_
