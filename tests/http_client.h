// A blocking HTTP/1.1 client just big enough for tests of the metrics endpoint: one request per
// connection, the whole answer read until the server closes. Header-only.

#ifndef PROCPOOL_TESTS_HTTP_CLIENT_H_
#define PROCPOOL_TESTS_HTTP_CLIENT_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace procpool::testing {

// A connected socket to "127.0.0.1:port"-style `address` (IPv4 literal), or -1. Reads and writes
// give up after 30 s, so a test never hangs on a server that does not answer.
inline int connect_to(const std::string& address) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) return -1;
  uint32_t port = 0;
  if (!absl::SimpleAtoi(address.substr(colon + 1), &port)) return -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (::inet_pton(AF_INET, address.substr(0, colon).c_str(), &addr.sin_addr) != 1) return -1;
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  timeval timeout{.tv_sec = 30, .tv_usec = 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// Sends `request` as it is and returns everything the server sent until it closed ("" when it
// could not connect).
inline std::string http_exchange(const std::string& address, const std::string& request) {
  const int fd = connect_to(address);
  if (fd < 0) return "";
  size_t sent = 0;
  while (sent < request.size()) {
    const ssize_t n = ::send(fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) break;
    sent += static_cast<size_t>(n);
  }
  std::string answer;
  char buffer[4096];
  while (true) {
    const ssize_t n = ::recv(fd, buffer, sizeof(buffer), 0);
    if (n <= 0) break;
    answer.append(buffer, static_cast<size_t>(n));
  }
  ::close(fd);
  return answer;
}

inline std::string http_get(const std::string& address, const std::string& path) {
  return http_exchange(address, absl::StrCat("GET ", path, " HTTP/1.1\r\nHost: ", address,
                                             "\r\nAccept: */*\r\nConnection: close\r\n\r\n"));
}

// The status code of an answer ("HTTP/1.1 404 Not Found" -> 404), 0 if there is none.
inline int http_status(const std::string& answer) {
  const std::vector<std::string> words = absl::StrSplit(answer.substr(0, answer.find('\r')), ' ');
  int code = 0;
  if (words.size() < 2 || !absl::SimpleAtoi(words[1], &code)) return 0;
  return code;
}

// The body of an answer (after the blank line).
inline std::string http_body(const std::string& answer) {
  const size_t end = answer.find("\r\n\r\n");
  return end == std::string::npos ? "" : answer.substr(end + 4);
}

// The values of every sample of `series` whose labels contain `labels` (e.g. `worker="0"`), from
// Prometheus text, in order.
inline std::vector<double> sample_values(const std::string& text, const std::string& series,
                                         const std::string& labels = "") {
  std::vector<double> values;
  for (const absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::StartsWith(line, absl::StrCat(series, "{"))) continue;
    const size_t close = line.rfind("} ");
    if (close == absl::string_view::npos) continue;
    if (!labels.empty() && line.substr(0, close).find(labels) == absl::string_view::npos) continue;
    double value = 0;
    if (absl::SimpleAtod(line.substr(close + 2), &value)) values.push_back(value);
  }
  return values;
}

// The value of the first such sample; nullopt if there is none.
inline std::optional<double> sample_value(const std::string& text, const std::string& series,
                                          const std::string& labels = "") {
  const std::vector<double> values = sample_values(text, series, labels);
  if (values.empty()) return std::nullopt;
  return values.front();
}

// The sum of every such sample (0 if there is none).
inline double sample_sum(const std::string& text, const std::string& series,
                         const std::string& labels = "") {
  double sum = 0;
  for (const double value : sample_values(text, series, labels)) sum += value;
  return sum;
}

}  // namespace procpool::testing

#endif  // PROCPOOL_TESTS_HTTP_CLIENT_H_
