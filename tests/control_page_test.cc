// Unit tests of the claim protocol (lib/wire/control_page.h): a task is started by its worker or
// taken back by the parent, never both, and the parent learns exactly how many started, whether
// the parent opens a batch's claims (a forked worker) or the worker does when it reads the batch
// (a remote worker, whose relay revokes).

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "doctest/doctest.h"
#include "lib/wire/control_page.h"

namespace procpool::internal {
namespace {

// Claims tasks one at a time, as a worker does, until a claim fails; returns how many it got.
uint32_t claim_all(ControlPage& page, uint32_t slot, uint16_t tag, uint32_t count) {
  uint32_t next = 0;
  while (next < count && claim_tasks(page, slot, tag, next, 1) == 1) ++next;
  return next;
}

TEST_CASE("a batch the parent opened is claimed in order up to its count") {
  auto page = std::make_unique<ControlPage>();
  open_claims(*page, 3, 7, 5);
  CHECK(claim_tasks(*page, 3, 7, 0, 2) == 2);
  CHECK(claim_tasks(*page, 3, 7, 1, 1) == 0);  // not the next one: refused
  CHECK(claim_tasks(*page, 3, 7, 2, 10) == 3);  // only what is left
  CHECK(claim_tasks(*page, 3, 7, 5, 1) == 0);
  CHECK(revoke_claims(*page, 3, 7, false) == 5);
}

TEST_CASE("a revoke takes back exactly the unstarted tasks") {
  auto page = std::make_unique<ControlPage>();
  open_claims(*page, 0, 1, 10);
  CHECK(claim_tasks(*page, 0, 1, 0, 4) == 4);
  CHECK(revoke_claims(*page, 0, 1, false) == 4);
  CHECK(claim_tasks(*page, 0, 1, 4, 1) == 0);
  CHECK(revoke_claims(*page, 0, 1, false) == 4);  // a second revoke changes nothing
}

TEST_CASE("a worker cannot claim in a slot that holds another batch") {
  auto page = std::make_unique<ControlPage>();
  open_claims(*page, 2, 2, 4);
  CHECK(claim_tasks(*page, 2, 34, 0, 1) == 0);  // a late reader of an older batch in slot 2
  CHECK(claim_tasks(*page, 2, 2, 0, 1) == 1);  // the slot's own batch is untouched
}

TEST_CASE("a worker that opens its own claims runs a batch nobody revoked") {
  auto page = std::make_unique<ControlPage>();
  page->worker_opens_claims = 1;
  // Tag 0 in a fresh (all-zero) word: the first batch a worker ever gets.
  open_claims_on_arrival(*page, 0, 0, 3);
  CHECK(claim_all(*page, 0, 0, 3) == 3);
  CHECK(revoke_claims(*page, 0, 0, true) == 3);
}

TEST_CASE("a revoke that comes before its batch takes the whole batch back") {
  auto page = std::make_unique<ControlPage>();
  page->worker_opens_claims = 1;
  SUBCASE("a fresh word") {
    CHECK(revoke_claims(*page, 0, 0, true) == 0);
    open_claims_on_arrival(*page, 0, 0, 3);
    CHECK(claim_tasks(*page, 0, 0, 0, 1) == 0);
  }
  SUBCASE("a word an older batch used") {
    open_claims_on_arrival(*page, 5, 5, 2);
    CHECK(claim_all(*page, 5, 5, 2) == 2);
    CHECK(revoke_claims(*page, 5, 37, true) == 0);
    CHECK(revoke_claims(*page, 5, 37, true) == 0);  // twice: still nothing started
    open_claims_on_arrival(*page, 5, 37, 4);
    CHECK(claim_tasks(*page, 5, 37, 0, 1) == 0);
  }
}

TEST_CASE("without worker_opens_claims a word the parent did not open as found is overwritten: "
          "all counts as claimed, and the revoke writes nothing") {
  // The parent opens every batch's word before it sends the batch, and revokes only batches it
  // sent: a word that does not hold the batch's tag then was overwritten (by a task, perhaps).
  // Nothing can be known to be unstarted: taking tasks back could run them twice.
  auto page = std::make_unique<ControlPage>();
  CHECK(revoke_claims(*page, 1, 1, false) == ControlPage::kMaxBatchTasks);  // a zeroed word
  open_claims(*page, 1, 1, 2);
  CHECK(claim_all(*page, 1, 1, 2) == 2);
  open_claims(*page, 2, 2, 4);
  page->claims[2].store(pack_claim(0x5a5a, 0, 0));  // another tag
  CHECK(revoke_claims(*page, 2, 2, false) == ControlPage::kMaxBatchTasks);
  CHECK(page->claims[2].load() == pack_claim(0x5a5a, 0, 0));
}

TEST_CASE("a page that says its worker opens its claims does not make the parent think so") {
  // A task overwrote the page, worker_opens_claims included: the parent opened this batch's word,
  // so a word with another tag is still one overwritten, not a batch not read yet. (Taken back
  // whole, the task running in it would run again elsewhere, and again, without end.)
  auto page = std::make_unique<ControlPage>();
  open_claims(*page, 3, 9, 4);
  CHECK(claim_tasks(*page, 3, 9, 0, 1) == 1);
  page->worker_opens_claims = 1;
  page->claims[3].store(pack_claim(0x1234, 7, 2));
  CHECK(revoke_claims(*page, 3, 9, /*worker_opens=*/false) == ControlPage::kMaxBatchTasks);
  CHECK(page->claims[3].load() == pack_claim(0x1234, 7, 2));
}

TEST_CASE("the mapping keeps the parent's own word on who opens claims") {
  absl::StatusOr<ControlPageMapping> mapping = ControlPageMapping::create("control-page-test");
  REQUIRE(mapping.ok());
  CHECK_FALSE(mapping->worker_opens_claims());
  (*mapping)->worker_opens_claims = 1;  // as a task might
  CHECK_FALSE(mapping->worker_opens_claims());
  mapping->set_worker_opens_claims();
  CHECK(mapping->worker_opens_claims());
  CHECK((*mapping)->worker_opens_claims.load() == 1);
  (*mapping)->worker_opens_claims = 0;
  ControlPageMapping moved = *std::move(mapping);
  CHECK(moved.worker_opens_claims());
}

// Exactly-once under contention: the worker claims while the parent revokes at a random
// moment; the count the revoke returns is exactly what the worker started, for both ways of
// opening, the revoke landing before, during or after the batch's arrival.
TEST_CASE("claims and a racing revoke agree on every task, whoever opens the batch") {
  for (const bool worker_opens : {false, true}) {
    CAPTURE(worker_opens);
    for (int round = 0; round < 2000; ++round) {
      auto page = std::make_unique<ControlPage>();
      const uint32_t slot = static_cast<uint32_t>(round) % ControlPage::kClaimSlots;
      const uint16_t tag = static_cast<uint16_t>(round);
      const uint32_t count = 64;
      if (!worker_opens) open_claims(*page, slot, tag, count);
      std::atomic<bool> go{false};
      uint32_t started = 0;
      std::thread worker([&] {
        while (!go.load()) {
        }
        if (worker_opens) open_claims_on_arrival(*page, slot, tag, count);
        started = claim_all(*page, slot, tag, count);
      });
      go = true;
      for (int spin = 0; spin < round % 200; ++spin) std::atomic_signal_fence(std::memory_order_seq_cst);
      const uint32_t taken_at = revoke_claims(*page, slot, tag, worker_opens);
      worker.join();
      REQUIRE(started == taken_at);
    }
  }
}

}  // namespace
}  // namespace procpool::internal
