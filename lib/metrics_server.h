// MetricsServer: `GET /metrics` over HTTP/1.1 (PoolOptions::metrics_listen), on a thread of its
// own, so that a scraper never waits for the pool's loop and the loop never waits for a scraper.
//
// It is built for the one job and for peers that may be hostile: each connection gets one
// request (then "Connection: close"), whose head may be at most `max_request_bytes`, and must be
// read and answered within `client_timeout` in all, or it is dropped; at most `max_clients`
// connections are held, and a new one pushes out the oldest. So its memory is bounded
// (max_clients x (request + one response)) and a client that connects and sends nothing, or
// never reads, costs one slot until its timeout or until it is pushed out. `GET /metrics` (or
// HEAD) is answered with what `render` returns; any other path is 404, any other method 405.
//
// Threads: `render` runs on the server's thread; the server is made and destroyed by one owner.
// Fork: the thread does not cross a fork; a forked child closes the listening socket with its
// other descriptors (lib/worker/child_setup.cc) and must not destroy the server it inherited.

#ifndef PROCPOOL_LIB_METRICS_SERVER_H_
#define PROCPOOL_LIB_METRICS_SERVER_H_

#include <atomic>
#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "lib/common/socket.h"
#include "lib/common/unique_fd.h"

namespace procpool::internal {

// Parses PoolOptions::metrics_listen: "host:port", "[v6]:port", or ":port" / "port" (loopback,
// 127.0.0.1). kInvalidArgument names the field and says what is wrong.
absl::StatusOr<HostPort> parse_metrics_listen(absl::string_view text);

// The server's HTTP, apart from its sockets so that tests and tools/fuzz.sh reach it with bytes
// alone. A peer's bytes are untrusted: neither function trusts a length or a delimiter in them.

// The whole response (head and body, "Connection: close") to a request whose head, up to its
// closing empty line, is `head`: 200 with what `render` returns for GET or HEAD of /metrics (in
// origin form, /metrics?x, or absolute form, http://host/metrics?x), 404 for any other path, 405
// for any other method, 400 if the request line is not METHOD SP TARGET SP HTTP/1.x. `render` is
// called for a 200 only. A HEAD request (its method, the request line up to the first space, is
// HEAD) gets no body, whatever the status.
std::string metrics_http_response(absl::string_view head,
                                  const std::function<std::string()>& render);

// Adds `received` (one read of a client's bytes) to `request`, the request read so far, of which
// at most `max_request_bytes` are ever kept. Returns the response once `request` holds the head's
// end (an empty line: "\r\n\r\n" or "\n\n"; metrics_http_response) or has reached
// `max_request_bytes` without it (431); nullopt while more is needed. Bytes after the head are
// ignored: a GET has no body.
std::optional<std::string> metrics_http_read(std::string& request, absl::string_view received,
                                             size_t max_request_bytes,
                                             const std::function<std::string()>& render);

class MetricsServer {
 public:
  struct Limits {
    size_t max_request_bytes = 8192;
    int max_clients = 16;
    absl::Duration client_timeout = absl::Seconds(10);
  };

  // Listens on `address` now (kUnavailable naming metrics_listen, the address and the cause: an
  // address in use, a host that does not resolve); serving starts with serve().
  static absl::StatusOr<std::unique_ptr<MetricsServer>> listen(const HostPort& address,
                                                               std::function<std::string()> render,
                                                               Limits limits);
  static absl::StatusOr<std::unique_ptr<MetricsServer>> listen(
      const HostPort& address, std::function<std::string()> render) {
    return listen(address, std::move(render), Limits{});
  }
  // Stops the thread (a render in progress finishes first) and closes every connection.
  ~MetricsServer();
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  // Starts the serving thread (once). kResourceExhausted if no thread can be made.
  absl::Status serve();
  // "host:port" it is bound to (the port it got for port 0).
  const std::string& address() const { return address_; }

 private:
  struct Client;
  MetricsServer(UniqueFd listener, UniqueFd wake, std::string address,
                std::function<std::string()> render, Limits limits);
  void run();
  // Reads what `client` sent; once its request is whole, makes the response. False: drop it.
  bool read_request(Client& client);
  // Writes what the socket takes. False: drop it (done, or the peer is gone).
  bool write_response(Client& client);

  const UniqueFd listener_;
  const UniqueFd wake_;
  const std::string address_;
  const std::function<std::string()> render_;
  const Limits limits_;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_METRICS_SERVER_H_
