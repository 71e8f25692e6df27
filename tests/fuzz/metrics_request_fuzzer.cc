// libFuzzer target: whatever bytes a client of the metrics endpoint sends, in whatever pieces its
// sends arrive, the server's reading of them (metrics_http_read, then metrics_http_response, the
// path MetricsServer::read_request takes for each recv) keeps at most max_request_bytes and ends in
// one well-formed HTTP/1.1 response: a 3-digit status among 200, 400, 404, 405 and 431, one empty
// line after printable header lines, a Content-Length that is the body's size,
// "Connection: close", no body for HEAD, and the rendered metrics for a 200 only (render is called
// for a 200 only). Never a crash, a read outside a buffer or undefined behaviour. Built and run by
// tools/fuzz.sh with clang's -fsanitize=fuzzer,address,undefined.
//
// The input: a byte for max_request_bytes (0: the server's default, else 8 times the byte, so that
// heads too large are reached); a byte whose low 3 bits are how many piece sizes follow; those
// sizes (each byte + 1), used in turn to cut the rest, the client's bytes, into what each recv
// returns (no sizes: recv's 2048 bytes at a time).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "lib/metrics_server.h"

namespace {

using procpool::internal::metrics_http_read;

constexpr absl::string_view kMetrics = "# TYPE procpool_fuzz counter\nprocpool_fuzz_total 1\n";

void check(bool ok) {
  if (!ok) __builtin_trap();
}

bool has_head_end(absl::string_view bytes) {
  return absl::StrContains(bytes, "\r\n\r\n") || absl::StrContains(bytes, "\n\n");
}

size_t count(absl::string_view text, absl::string_view what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != absl::string_view::npos; at = text.find(what, at + 1)) {
    ++n;
  }
  return n;
}

// What the response must be, from the bytes the server kept (the first max_request_bytes the
// client sent, up to the recv that completed the request), read here on its own terms.
void check_response(absl::string_view response, absl::string_view kept, size_t max_request_bytes,
                    int renders) {
  // The status line: "HTTP/1.1 NNN reason".
  check(absl::StartsWith(response, "HTTP/1.1 "));
  check(response.size() > 13 && response[12] == ' ');
  int status = 0;
  check(absl::SimpleAtoi(response.substr(9, 3), &status));
  check(status == 200 || status == 400 || status == 404 || status == 405 || status == 431);

  // One empty line ends the head; its lines are printable, none of them empty.
  check(count(response, "\r\n\r\n") == 1);
  const size_t head_end = response.find("\r\n\r\n");
  const absl::string_view head = response.substr(0, head_end);
  const absl::string_view body = response.substr(head_end + 4);
  int content_length_headers = 0;
  int close_headers = 0;
  size_t content_length = 0;
  for (const absl::string_view line : absl::StrSplit(head, "\r\n")) {
    check(!line.empty());
    for (const char c : line) check(c >= 0x20 && c <= 0x7e);
    absl::string_view value = line;
    if (absl::ConsumePrefix(&value, "Content-Length: ")) {
      ++content_length_headers;
      check(absl::SimpleAtoi(value, &content_length));
    }
    if (line == "Connection: close") ++close_headers;
  }
  check(content_length_headers == 1);
  check(close_headers == 1);

  // The request line, as the client wrote it: up to its first line break; its method is up to the
  // first space.
  const absl::string_view line = kept.substr(0, kept.find_first_of("\r\n"));
  const absl::string_view method = line.substr(0, line.find(' '));
  const std::vector<absl::string_view> parts = absl::StrSplit(line, ' ');
  const bool well_formed = parts.size() == 3 && absl::StartsWith(parts[2], "HTTP/1.");

  if (method == "HEAD") {
    check(body.empty());
  } else {
    check(body.size() == content_length);
  }
  check((status == 200) == (renders == 1));
  check(renders <= 1);
  if (status == 200) {
    check(method == "GET" || method == "HEAD");
    check(well_formed);
    check(method == "HEAD" || body == kMetrics);
  } else {
    check(body != kMetrics);
  }
  if (status == 405) {
    check(method != "GET" && method != "HEAD" && well_formed);
    check(absl::StrContains(head, "\r\nAllow: GET, HEAD"));
  }
  if (status == 404) check(well_formed);
  if (status == 400) check(!well_formed);
  // 431 exactly when the server kept all it may and the head has not ended there.
  check((status == 431) == !has_head_end(kept));
  if (status == 431) check(kept.size() == max_request_bytes);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const size_t max_request_bytes = data[0] == 0 ? size_t{8192} : size_t{data[0]} * 8;
  const size_t sizes_count = data[1] & 7;
  if (size < 2 + sizes_count) return 0;
  std::vector<size_t> piece_sizes;
  for (size_t i = 0; i < sizes_count; ++i) piece_sizes.push_back(size_t{data[2 + i]} + 1);
  if (piece_sizes.empty()) piece_sizes.push_back(2048);
  const absl::string_view sent(reinterpret_cast<const char*>(data) + 2 + sizes_count,
                               size - 2 - sizes_count);

  int renders = 0;
  const std::function<std::string()> render = [&renders] {
    ++renders;
    return std::string(kMetrics);
  };
  std::string request;
  size_t given = 0;
  for (size_t piece = 0; given < sent.size(); ++piece) {
    const absl::string_view received =
        sent.substr(given, std::min(piece_sizes[piece % piece_sizes.size()], size_t{2048}));
    given += received.size();
    std::optional<std::string> response =
        metrics_http_read(request, received, max_request_bytes, render);
    // Never more than max_request_bytes held, whatever the client sends.
    check(request.size() <= max_request_bytes);
    if (response.has_value()) {
      check_response(*response, sent.substr(0, std::min(given, max_request_bytes)),
                     max_request_bytes, renders);
      return 0;
    }
    // Still reading: all sent so far is held, and it is not yet a request or too large.
    check(renders == 0);
    check(request == sent.substr(0, given));
    check(request.size() < max_request_bytes && !has_head_end(request));
  }
  return 0;
}
