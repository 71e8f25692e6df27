#include "lib/wire/control_page.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <new>
#include <optional>
#include <utility>

#include "absl/status/status.h"
#include "lib/common/elf_symbols.h"
#include "lib/common/shared_memory.h"

namespace procpool::internal {

std::string clean_crash_stack(std::string_view raw) {
  std::string text(raw.substr(0, ControlPage::kCrashStackBytes));
  for (char& c : text) {
    if (c != '\n' && (c < 0x20 || c > 0x7e)) c = '?';
  }
  return text;
}

namespace {

bool parse_number(std::string_view text, int base, uint64_t& value) {
  if (text.empty() || text.size() > 16) return false;
  value = 0;
  for (const char c : text) {
    int digit;
    if (c >= '0' && c <= '9') {
      digit = c - '0';
    } else if (base == 16 && c >= 'a' && c <= 'f') {
      digit = c - 'a' + 10;
    } else {
      return false;
    }
    value = value * static_cast<uint64_t>(base) + static_cast<uint64_t>(digit);
  }
  return true;
}

// A frame's place as the worker wrote it: "<file>+0x<offset>".
bool parse_place(std::string_view place, uint64_t& file, uint64_t& offset) {
  const size_t plus = place.find("+0x");
  return plus != std::string_view::npos && parse_number(place.substr(0, plus), 10, file) &&
         parse_number(place.substr(plus + 3), 16, offset);
}

}  // namespace

std::string symbolize_crash_stack(std::string_view stack) {
  constexpr uint64_t kMaxFiles = 16;
  // Each file the "@" lines name, opened once, when a frame first needs it.
  struct File {
    std::string path;
    bool opened = false;
    std::optional<ElfFunctions> functions;
  };
  File files[kMaxFiles];
  std::string out;
  while (!stack.empty()) {
    const size_t end = std::min(stack.find('\n'), stack.size());
    std::string_view line = stack.substr(0, end);
    stack.remove_prefix(std::min(end + 1, stack.size()));
    if (line.empty()) continue;
    if (line[0] == '@') {
      const size_t space = line.find(' ');
      uint64_t file = 0;
      if (space != std::string_view::npos && parse_number(line.substr(1, space - 1), 10, file) &&
          file < kMaxFiles) {
        files[file] = File{.path = std::string(line.substr(space + 1)), .opened = false,
                           .functions = std::nullopt};
      }
      continue;
    }
    // "#3 0x55d0c2a1b2c3 <place>": the number and address stay, the place becomes a name.
    const size_t first_space = line.find(' ');
    const size_t second_space =
        first_space == std::string_view::npos ? first_space : line.find(' ', first_space + 1);
    if (line[0] == '#' && second_space != std::string_view::npos) {
      out.append(line.substr(0, second_space + 1));
      const std::string_view place = line.substr(second_space + 1);
      uint64_t file = 0;
      uint64_t offset = 0;
      if (place == "?") {
        out.append("(unknown)\n");
        continue;
      }
      if (parse_place(place, file, offset) && file < kMaxFiles && !files[file].path.empty()) {
        File& in = files[file];
        if (!in.opened) {
          in.functions = ElfFunctions::open(in.path);
          in.opened = true;
        }
        const std::optional<std::string> name =
            in.functions ? in.functions->function_at(offset) : std::nullopt;
        if (name) {
          out.append(clean_crash_stack(*name));
        } else {
          out.append("(unknown) ").append(in.path).append(place.substr(place.find('+')));
        }
        out.append("\n");
        continue;
      }
      out.append(place).append("\n");  // not a place: as it is
      continue;
    }
    out.append(line).append("\n");  // not a frame: as it is
  }
  return out;
}

std::string crash_stack_text(const ControlPage& page) {
  const uint32_t bytes = std::min(page.crash_stack_bytes.load(std::memory_order_acquire),
                                  ControlPage::kCrashStackBytes);
  return symbolize_crash_stack(clean_crash_stack(std::string_view(page.crash_stack, bytes)));
}

void open_claims(ControlPage& page, uint32_t slot, uint16_t tag, uint32_t count) {
  page.claims[slot % ControlPage::kClaimSlots].store(pack_claim(tag, count, 0),
                                                      std::memory_order_release);
}

namespace {

// The word of a batch taken back before its worker read it: `next` past any limit, so no claim
// succeeds, and the tag tells the worker it is this batch's.
constexpr uint64_t taken_back_before_arrival(uint16_t tag) {
  return pack_claim(tag, 0, ControlPage::kMaxBatchTasks);
}

}  // namespace

void open_claims_on_arrival(ControlPage& page, uint32_t slot, uint16_t tag, uint32_t count) {
  std::atomic<uint64_t>& word = page.claims[slot % ControlPage::kClaimSlots];
  uint64_t seen = word.load(std::memory_order_acquire);
  while (seen != taken_back_before_arrival(tag)) {
    if (word.compare_exchange_weak(seen, pack_claim(tag, count, 0), std::memory_order_acq_rel,
                                   std::memory_order_acquire)) {
      return;
    }
  }
}

uint32_t claim_tasks(ControlPage& page, uint32_t slot, uint16_t tag, uint32_t next, uint32_t want) {
  std::atomic<uint64_t>& word = page.claims[slot % ControlPage::kClaimSlots];
  uint64_t seen = word.load(std::memory_order_acquire);
  while (true) {
    if (claim_tag(seen) != tag || claim_next(seen) != next || next >= claim_limit(seen)) return 0;
    const uint32_t got = std::min(want, claim_limit(seen) - next);
    if (word.compare_exchange_weak(seen, pack_claim(tag, claim_limit(seen), next + got),
                                   std::memory_order_acq_rel, std::memory_order_acquire)) {
      return got;
    }
  }
}

uint32_t revoke_claims(ControlPage& page, uint32_t slot, uint16_t tag, bool worker_opens) {
  std::atomic<uint64_t>& word = page.claims[slot % ControlPage::kClaimSlots];
  uint64_t seen = word.load(std::memory_order_acquire);
  while (true) {
    if (seen == taken_back_before_arrival(tag)) return 0;
    // Opened for this batch? A fresh word is all zero, like no batch's open claims.
    const bool opened = claim_tag(seen) == tag && seen != 0;
    if (!opened) {
      // The parent opened it before it sent the batch, and no one but the worker's claims
      // changed it since: another tag is a word overwritten (by a task, perhaps). Nothing can be
      // known to be unstarted then: taken as all claimed, so none of it runs twice.
      if (!worker_opens) return ControlPage::kMaxBatchTasks;
      // Not read by its worker yet (the slot is not reused while the batch is in flight).
      if (word.compare_exchange_weak(seen, taken_back_before_arrival(tag),
                                     std::memory_order_acq_rel, std::memory_order_acquire)) {
        return 0;
      }
      continue;
    }
    const uint32_t claimed = claim_next(seen);
    if (word.compare_exchange_weak(seen, pack_claim(tag, claimed, claimed),
                                   std::memory_order_acq_rel, std::memory_order_acquire)) {
      return claimed;
    }
  }
}

void request_stop(ControlPage& page, uint64_t seq, uint32_t from, uint32_t to) {
  // The seq last, released: a worker that sees it sees the range (stop_requested's fence). A seq
  // replacing another is withdrawn first, so no worker pairs the new range with the old seq.
  if (page.stop_seq.load(std::memory_order_relaxed) != seq) {
    page.stop_seq.store(0, std::memory_order_relaxed);
  }
  page.stop_range.store((uint64_t{from} << 32) | to, std::memory_order_release);
  page.stop_seq.store(seq, std::memory_order_release);
}

absl::StatusOr<ControlPageMapping> ControlPageMapping::create(const std::string& name) {
  static_assert(sizeof(ControlPage) <= HeldFrames::kOffset);
  absl::StatusOr<SharedMemory> memory =
      create_shared_memory(name, kControlMappingBytes, "a worker's control page");
  if (!memory.ok()) return memory.status();
  ControlPageMapping mapping;
  mapping.page_ = reinterpret_cast<ControlPage*>(memory->base);
  mapping.fd_ = std::move(memory->fd);
  // Default-initialized, not value-initialized: the memfd is zero already, and the held frames'
  // data must not be touched (a page fault each) before it is used.
  new (mapping.page_) ControlPage;
  new (held_frames(mapping.page_)) HeldFrames;
  return mapping;
}

absl::Status ControlPageMapping::map_in_worker() {
  absl::Status mapped = map_again_after_fork(fd_.get(), reinterpret_cast<char*>(page_),
                                             kControlMappingBytes, "a worker's control page");
  // Closed in the worker with every other inherited descriptor.
  (void)fd_.release();
  if (!mapped.ok()) page_ = nullptr;
  return mapped;
}

absl::StatusOr<ControlPageMapping> ControlPageMapping::map(int fd) {
  void* memory = ::mmap(nullptr, kControlMappingBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (memory == MAP_FAILED) return absl::ErrnoToStatus(errno, "mmap of a worker's control page");
  ControlPageMapping mapping;
  mapping.page_ = static_cast<ControlPage*>(memory);
  return mapping;
}

ControlPageMapping::ControlPageMapping(ControlPageMapping&& other) noexcept
    : page_(std::exchange(other.page_, nullptr)),
      fd_(std::move(other.fd_)),
      worker_opens_claims_(other.worker_opens_claims_) {}

ControlPageMapping& ControlPageMapping::operator=(ControlPageMapping&& other) noexcept {
  if (this != &other) {
    if (page_ != nullptr) ::munmap(page_, kControlMappingBytes);
    page_ = std::exchange(other.page_, nullptr);
    fd_ = std::move(other.fd_);
    worker_opens_claims_ = other.worker_opens_claims_;
  }
  return *this;
}

void ControlPageMapping::set_worker_opens_claims() {
  page_->worker_opens_claims.store(1, std::memory_order_relaxed);
  worker_opens_claims_ = true;
}

ControlPageMapping::~ControlPageMapping() {
  if (page_ != nullptr) ::munmap(page_, kControlMappingBytes);
}

ControlPage* ControlPageMapping::release() {
  fd_.reset();
  return std::exchange(page_, nullptr);
}

}  // namespace procpool::internal
