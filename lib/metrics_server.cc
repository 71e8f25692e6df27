// MetricsServer: one thread, one poll loop, a bounded set of one-request connections.

#include "lib/metrics_server.h"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <list>
#include <optional>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "lib/common/clock.h"

namespace procpool::internal {
namespace {

// After accept() fails for want of descriptors (EMFILE), the listener stays readable: wait this
// long before trying again rather than spin.
constexpr int64_t kAcceptPauseNs = 100'000'000;

std::string http_response(absl::string_view status, absl::string_view content_type,
                          absl::string_view body, bool with_body, absl::string_view extra = "") {
  std::string out = absl::StrCat("HTTP/1.1 ", status, "\r\nContent-Type: ", content_type,
                                 "\r\nContent-Length: ", body.size(), "\r\n", extra,
                                 "Connection: close\r\n\r\n");
  if (with_body) out.append(body.data(), body.size());
  return out;
}

// The request line of a head: up to its first line break (RFC 9112, section 3).
absl::string_view request_line(absl::string_view head) {
  return head.substr(0, head.find_first_of("\r\n"));
}

// Whether the request (its head, or as much of it as was read) is HEAD, whose response never has a
// body (RFC 9112, section 6.3), also when the rest of its request line is bad or its head too long:
// a client reads none after a HEAD, so bytes sent there are excess it reports or misreads.
bool is_head(absl::string_view request) {
  const absl::string_view line = request_line(request);
  return line.substr(0, line.find(' ')) == "HEAD";
}

// The path of a request target, in origin form (/metrics?x) or absolute form
// (http://host:port/metrics?x, as a proxy sends it), without its query.
absl::string_view request_path(absl::string_view target) {
  // The absolute form (section 3.2.2), which a server must accept and a proxy sends:
  // http://host:port/path?query. Its path is what follows the authority ("/" if nothing does).
  const size_t scheme_end = target.find("://");
  if (scheme_end != absl::string_view::npos && scheme_end > 0 &&
      (absl::EqualsIgnoreCase(target.substr(0, scheme_end), "http") ||
       absl::EqualsIgnoreCase(target.substr(0, scheme_end), "https"))) {
    const size_t path_start = target.find_first_of("/?", scheme_end + 3);
    if (path_start == absl::string_view::npos || target[path_start] == '?') return "/";
    target.remove_prefix(path_start);
  }
  return target.substr(0, target.find('?'));
}

}  // namespace

absl::StatusOr<HostPort> parse_metrics_listen(absl::string_view text) {
  std::string with_colon(text);
  uint32_t bare_port = 0;
  if (absl::SimpleAtoi(text, &bare_port)) with_colon = absl::StrCat(":", text);
  absl::StatusOr<HostPort> parsed = parse_host_port(with_colon);
  if (!parsed.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("PoolOptions::metrics_listen: ", parsed.status().message(),
                     " (write \"host:port\", e.g. \"127.0.0.1:9464\", or \"\" for none)"));
  }
  // Loopback unless the user names another address: metrics say what the program does.
  if (parsed->host.empty()) parsed->host = "127.0.0.1";
  return parsed;
}

struct MetricsServer::Client {
  UniqueFd fd;
  int64_t deadline_ns = 0;
  std::string request;   // the head read so far
  std::string response;  // once the request is whole
  size_t written = 0;
  bool responding = false;
};

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::listen(
    const HostPort& address, std::function<std::string()> render, Limits limits) {
  absl::StatusOr<UniqueFd> listener = listen_tcp(address, /*backlog=*/64);
  if (!listener.ok()) {
    // One code whatever the errno (EADDRINUSE alone would be kFailedPrecondition, which means a
    // call after close() here): the endpoint cannot be had, and the message says why.
    return absl::UnavailableError(
        absl::StrCat("PoolOptions::metrics_listen: ", listener.status().message()));
  }
  absl::StatusOr<HostPort> bound = local_address(listener->get());
  if (!bound.ok()) return bound.status();
  absl::StatusOr<UniqueFd> wake = make_event_fd();
  if (!wake.ok()) return wake.status();
  return std::unique_ptr<MetricsServer>(new MetricsServer(*std::move(listener), *std::move(wake),
                                                          bound->to_string(), std::move(render),
                                                          limits));
}

MetricsServer::MetricsServer(UniqueFd listener, UniqueFd wake, std::string address,
                             std::function<std::string()> render, Limits limits)
    : listener_(std::move(listener)),
      wake_(std::move(wake)),
      address_(std::move(address)),
      render_(std::move(render)),
      limits_(limits) {}

MetricsServer::~MetricsServer() {
  stopping_.store(true, std::memory_order_relaxed);
  const uint64_t one = 1;
  (void)!::write(wake_.get(), &one, sizeof(one));
  if (thread_.joinable()) thread_.join();
}

absl::Status MetricsServer::serve() {
  if (thread_.joinable()) return absl::OkStatus();
  try {
    thread_ = std::thread([this] { run(); });
  } catch (const std::system_error& e) {
    return absl::ResourceExhaustedError(
        absl::StrCat("could not start the metrics server's thread: ", e.what()));
  }
  return absl::OkStatus();
}

void MetricsServer::run() {
  std::list<Client> clients;  // oldest first
  std::vector<pollfd> fds;
  int64_t accept_paused_until_ns = 0;
  while (!stopping_.load(std::memory_order_relaxed)) {
    int64_t now = monotonic_now_ns();
    // Drop whoever ran out of time: a request never finished, a response never read.
    std::erase_if(clients, [&](const Client& client) { return now >= client.deadline_ns; });
    int64_t next_ns = now + to_ns(limits_.client_timeout);
    for (const Client& client : clients) next_ns = std::min(next_ns, client.deadline_ns);
    const bool accepting = now >= accept_paused_until_ns;
    if (!accepting) next_ns = std::min(next_ns, accept_paused_until_ns);

    fds.clear();
    fds.push_back({wake_.get(), POLLIN, 0});
    fds.push_back({accepting ? listener_.get() : -1, POLLIN, 0});
    for (const Client& client : clients) {
      fds.push_back({client.fd.get(), static_cast<short>(client.responding ? POLLOUT : POLLIN), 0});
    }
    const int timeout_ms = static_cast<int>(std::max<int64_t>(0, (next_ns - now + 999'999) / 1'000'000));
    if (::poll(fds.data(), fds.size(), timeout_ms) < 0) continue;  // EINTR
    if (stopping_.load(std::memory_order_relaxed)) break;

    // Clients first: those polled are the first fds.size() - 2 of the list, in order.
    size_t index = 2;
    for (auto it = clients.begin(); it != clients.end() && index < fds.size(); ++index) {
      const short revents = fds[index].revents;
      bool keep = true;
      if (revents != 0) keep = it->responding ? write_response(*it) : read_request(*it);
      it = keep ? std::next(it) : clients.erase(it);
    }

    if (fds[1].revents != 0) {
      now = monotonic_now_ns();
      // Take what is waiting; a full house makes room by dropping its oldest connection, so
      // that idle connections cannot lock a scraper out.
      for (int taken = 0; taken < limits_.max_clients; ++taken) {
        absl::StatusOr<UniqueFd> accepted = accept_tcp(listener_.get());
        if (!accepted.ok()) {
          accept_paused_until_ns = now + kAcceptPauseNs;
          break;
        }
        if (!accepted->valid()) break;
        if (static_cast<int>(clients.size()) >= limits_.max_clients) clients.pop_front();
        Client& client = clients.emplace_back();
        client.fd = *std::move(accepted);
        client.deadline_ns = now + to_ns(limits_.client_timeout);
      }
    }
  }
}

bool MetricsServer::read_request(Client& client) {
  char buffer[2048];
  while (true) {
    const ssize_t n = ::recv(client.fd.get(), buffer, sizeof(buffer), 0);
    if (n == 0) return false;  // closed before its request was whole
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno == EAGAIN || errno == EWOULDBLOCK;
    }
    std::optional<std::string> response =
        metrics_http_read(client.request, absl::string_view(buffer, static_cast<size_t>(n)),
                          limits_.max_request_bytes, render_);
    if (!response.has_value()) continue;
    client.response = *std::move(response);
    client.request = std::string();  // its memory goes now
    client.responding = true;
    return write_response(client);
  }
}

bool MetricsServer::write_response(Client& client) {
  while (client.written < client.response.size()) {
    const ssize_t n = ::send(client.fd.get(), client.response.data() + client.written,
                             client.response.size() - client.written, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno == EAGAIN || errno == EWOULDBLOCK;
    }
    client.written += static_cast<size_t>(n);
  }
  // All written: closing now is the end of the response ("Connection: close").
  ::shutdown(client.fd.get(), SHUT_WR);
  return false;
}

std::string metrics_http_response(absl::string_view head,
                                  const std::function<std::string()>& render) {
  // The request line: METHOD SP TARGET SP HTTP/1.x (RFC 9112, section 3).
  const std::vector<absl::string_view> parts = absl::StrSplit(request_line(head), ' ');
  const bool with_body = !is_head(head);
  if (parts.size() != 3 || !absl::StartsWith(parts[2], "HTTP/1.")) {
    return http_response("400 Bad Request", "text/plain", "bad request\n", with_body);
  }
  const absl::string_view method = parts[0];
  const absl::string_view path = request_path(parts[1]);
  if (path != "/metrics") {
    return http_response("404 Not Found", "text/plain", "not found; metrics are at /metrics\n",
                         with_body);
  }
  if (method != "GET" && method != "HEAD") {
    return http_response("405 Method Not Allowed", "text/plain", "only GET\n", with_body,
                         "Allow: GET, HEAD\r\n");
  }
  return http_response("200 OK", "text/plain; version=0.0.4; charset=utf-8", render(),
                       with_body);
}

std::optional<std::string> metrics_http_read(std::string& request, absl::string_view received,
                                             size_t max_request_bytes,
                                             const std::function<std::string()>& render) {
  // Only the head matters (a GET has no body): keep at most max_request_bytes of it.
  const size_t room = max_request_bytes - std::min(max_request_bytes, request.size());
  request.append(received.data(), std::min(room, received.size()));
  size_t head_end = request.find("\r\n\r\n");
  if (head_end == std::string::npos) head_end = request.find("\n\n");
  if (head_end != std::string::npos) {
    return metrics_http_response(absl::string_view(request).substr(0, head_end), render);
  }
  if (request.size() >= max_request_bytes) {
    return http_response("431 Request Header Fields Too Large", "text/plain",
                         "request too large\n", !is_head(request));
  }
  return std::nullopt;
}

}  // namespace procpool::internal
