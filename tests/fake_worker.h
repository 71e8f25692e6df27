// Workers without processes, for testing the rules of lib/scheduler and lib/supervision the way
// Cap'n Proto's rpc-test.c++ tests RPC over an in-memory network: fast, deterministic, and every
// step (a task starts, a result arrives, the worker dies) taken by the test itself.
//
// FakeWorker plays a worker's side: it keeps the batches it was sent and claims and stamps its
// tasks in a ControlPage in ordinary memory, through the same claim functions a real worker uses
// (control_page.h). FakeWorkerPort is the scheduler's view of it (WorkerPort); FakeWorkerLink and
// FakeLauncher are supervision's (WorkerLink, Launcher). RecordingCall is a call that counts the
// outcomes each of its tasks gets: the scheduler promises exactly one.
//
// Threads: none; everything runs on the test's thread.

#ifndef PROCPOOL_TESTS_FAKE_WORKER_H_
#define PROCPOOL_TESTS_FAKE_WORKER_H_

#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "capnp/message.h"
#include "capnp/serialize.h"
#include "lib/link/launcher.h"
#include "lib/link/worker_link.h"
#include "lib/scheduler/scheduler.h"
#include "lib/wire/control_page.h"
#include "procpool/internal/call.h"
#include "procpool/internal/protocol.capnp.h"

namespace procpool::testing {

using internal::ControlPage;
using internal::WorkerProgress;

// A call of `size` tasks: job i is the integer i, and a task's value is whatever integer the
// worker sends. Its jobs go as words (TaskBatch.wordJobs) if `words`.
class RecordingCall final : public internal::Call {
 public:
  explicit RecordingCall(size_t size, internal::CallSettings settings = {}, bool words = false)
      : Call(settings), words_(words), outcomes_(size), counts_(size, 0) {}

  void encode_job(size_t index, wire::Value::Builder out) override {
    out.setInt(static_cast<int64_t>(index));
  }
  bool on_value(size_t index, wire::Value::Reader value) override {
    if (value.which() != wire::Value::INT) {
      record(index, absl::DataLossError("not an integer"));
      return false;
    }
    record(index, value.getInt());
    return true;
  }
  void on_error(size_t index, absl::Status status) override { record(index, std::move(status)); }

  bool packs_jobs() const override { return words_; }
  void encode_job_words(size_t first, size_t count, wire::TaskBatch::Builder tasks,
                        capnp::Orphanage, bool) override {
    tasks.setWordKind(wire::WordKind::INTS);
    auto blob = tasks.initWordJobs(static_cast<unsigned>(count * sizeof(uint64_t)));
    for (size_t i = 0; i < count; ++i) {
      const uint64_t job = first + i;
      std::memcpy(blob.begin() + i * sizeof(uint64_t), &job, sizeof(job));
    }
  }
  size_t on_word_results(size_t first, uint32_t count, const uint64_t* words, wire::WordKind kind,
                         absl::Span<const internal::WordFailure> errors) override {
    size_t values = 0;
    size_t cursor = 0;
    for (uint32_t i = 0; i < count; ++i) {
      if (cursor < errors.size() && errors[cursor].index == i) {
        record(first + i, errors[cursor++].status);
      } else if (kind == wire::WordKind::INTS) {
        record(first + i, static_cast<int64_t>(words[i]));
        ++values;
      } else {
        record(first + i, absl::DataLossError("not an integer"));
      }
    }
    return values;
  }

  size_t size() const { return counts_.size(); }
  // How many outcomes task `index` got.
  int count(size_t index) const { return counts_[index]; }
  // Its first outcome (a task without one reads as kUnavailable "no outcome").
  absl::StatusOr<int64_t> outcome(size_t index) const {
    if (!outcomes_[index]) return absl::UnavailableError("no outcome");
    return *outcomes_[index];
  }
  // Every task has at least one outcome.
  bool ended() const {
    for (int n : counts_) {
      if (n == 0) return false;
    }
    return true;
  }
  // Every task has exactly one outcome.
  bool ended_once() const {
    for (int n : counts_) {
      if (n != 1) return false;
    }
    return true;
  }

 private:
  void record(size_t index, absl::StatusOr<int64_t> outcome) {
    if (counts_[index]++ == 0) outcomes_[index] = std::move(outcome);
  }

  bool words_;
  std::vector<std::optional<absl::StatusOr<int64_t>>> outcomes_;
  std::vector<int> counts_;
};

// A worker's side of the protocol, played by the test.
class FakeWorker {
 public:
  // A batch as the worker read it.
  struct Batch {
    uint64_t seq = 0;
    uint32_t claim_slot = 0;
    uint16_t claim_tag = 0;
    uint32_t count = 0;
    bool words = false;
    int64_t timeout_ns = 0;
    bool publish_each = false;  // TaskBatch.publishEach
    std::vector<int64_t> jobs;
    uint32_t next = 0;  // the next task it starts
    uint32_t sent = 0;  // results sent for tasks [0, sent) (the test keeps it)
  };

  explicit FakeWorker(std::string name) : name_(std::move(name)) {}

  const std::string& name() const { return name_; }
  ControlPage& page() { return *page_; }

  // A frame the pool sent (ToWorker): a batch is kept, a shutdown counted.
  void receive(capnp::MessageBuilder& frame) {
    auto to_worker = frame.getRoot<wire::ToWorker>().asReader();
    if (to_worker.which() == wire::ToWorker::SHUTDOWN) {
      ++shutdowns_;
      return;
    }
    if (to_worker.which() != wire::ToWorker::TASKS) return;
    auto tasks = to_worker.getTasks();
    Batch batch;
    batch.seq = tasks.getSeq();
    batch.claim_slot = tasks.getClaimSlot();
    batch.claim_tag = tasks.getClaimTag();
    batch.timeout_ns = static_cast<int64_t>(tasks.getTimeoutNs());
    batch.publish_each = tasks.getPublishEach();
    batch.words = tasks.hasWordJobs();
    if (batch.words) {
      auto blob = tasks.getWordJobs();
      batch.count = static_cast<uint32_t>(blob.size() / sizeof(uint64_t));
      for (uint32_t i = 0; i < batch.count; ++i) {
        int64_t job;
        std::memcpy(&job, blob.begin() + i * sizeof(uint64_t), sizeof(job));
        batch.jobs.push_back(job);
      }
    } else {
      batch.count = tasks.getJobs().size();
      for (auto job : tasks.getJobs()) batch.jobs.push_back(job.getInt());
    }
    batches_.push_back(std::move(batch));
  }

  // Batches received, oldest first (the test pops what it is done with).
  std::deque<Batch>& batches() { return batches_; }
  Batch* find(uint64_t seq) {
    for (Batch& batch : batches_) {
      if (batch.seq == seq) return &batch;
    }
    return nullptr;
  }
  int shutdowns() const { return shutdowns_; }

  // Starts the next task of batch `seq`, at `now_ns`: claims it first, as a real worker does.
  // Returns its index, or nullopt if the pool took it back (or the batch has no task left).
  std::optional<uint32_t> start(uint64_t seq, int64_t now_ns) {
    Batch* batch = find(seq);
    if (batch == nullptr || batch->next >= batch->count) return std::nullopt;
    if (internal::claim_tasks(*page_, batch->claim_slot, batch->claim_tag, batch->next, 1) == 0) {
      return std::nullopt;
    }
    const uint32_t index = batch->next++;
    running_seq_ = seq;
    page_->batch_seq.store(seq);
    page_->task_index.store(index);
    page_->started_ns.store(now_ns);
    page_->running.store(1);
    return index;
  }
  // The task started last has ended.
  void finish() {
    running_seq_.reset();
    page_->running.store(0);
    page_->tasks_done.fetch_add(1);
  }

  // The batch of the task it runs, if it runs one: its own state, whatever its page says (a test
  // may overwrite the page, as a task with a wild pointer might).
  std::optional<uint64_t> running_seq() const { return running_seq_; }

  WorkerProgress progress() const {
    WorkerProgress progress;
    progress.running = page_->running.load() != 0;
    progress.batch_seq = page_->batch_seq.load();
    progress.task_index = page_->task_index.load();
    progress.started_ns = page_->started_ns.load();
    progress.tasks_done = page_->tasks_done.load();
    progress.busy_ns = page_->busy_ns.load();
    progress.exact = exact_;
    return progress;
  }
  // Whether progress is exact (shared memory) or late (a remote worker).
  void set_exact(bool exact) { exact_ = exact; }

  // Claims, as the pool's side of the control page.
  void open_claims(uint32_t slot, uint16_t tag, uint32_t count) {
    internal::open_claims(*page_, slot, tag, count);
  }
  uint32_t revoke(uint32_t slot, uint16_t tag) {
    return internal::revoke_claims(*page_, slot, tag, /*worker_opens=*/false);
  }

 private:
  std::string name_;
  std::unique_ptr<ControlPage> page_ = std::make_unique<ControlPage>();
  std::deque<Batch> batches_;
  std::optional<uint64_t> running_seq_;
  int shutdowns_ = 0;
  bool exact_ = true;
};

// The header of a results frame for `count` tasks from `start` of batch `seq`.
inline wire::ResultBatch::Builder init_results(capnp::MessageBuilder& message, uint64_t seq,
                                               uint32_t start, size_t count) {
  auto results = message.initRoot<wire::FromWorker>().initResults();
  results.setSeq(seq);
  results.setStart(start);
  results.setCount(static_cast<uint32_t>(count));
  results.setBusyNs(1000 * count);
  return results;
}

// A results frame (FromWorker.results) for tasks [start, start + values.size()) of batch `seq`:
// each an `ok` integer, or the error where `errors` has one for that place.
inline kj::Array<capnp::word> results_frame(uint64_t seq, uint32_t start,
                                            const std::vector<int64_t>& values,
                                            const std::vector<std::pair<uint32_t, absl::Status>>&
                                                errors = {}) {
  capnp::MallocMessageBuilder message;
  auto results = init_results(message, seq, start, values.size());
  auto outcomes = results.initOutcomes(static_cast<unsigned>(values.size()));
  for (uint32_t i = 0; i < values.size(); ++i) {
    bool failed = false;
    for (const auto& [at, status] : errors) {
      if (at != i) continue;
      auto error = outcomes[i].initError();
      error.setCode(static_cast<uint32_t>(status.code()));
      error.setMessage(std::string(status.message()));
      failed = true;
    }
    if (!failed) outcomes[i].initOk().setInt(values[i]);
  }
  return capnp::messageToFlatArray(message);
}

// The same as word results (FromWorker.results.wordResults).
inline kj::Array<capnp::word> word_results_frame(uint64_t seq, uint32_t start,
                                                 const std::vector<int64_t>& values) {
  capnp::MallocMessageBuilder message;
  auto results = init_results(message, seq, start, values.size());
  results.setWordKind(wire::WordKind::INTS);
  auto blob = results.initWordResults(static_cast<unsigned>(values.size() * sizeof(uint64_t)));
  if (!values.empty()) std::memcpy(blob.begin(), values.data(), blob.size());
  return capnp::messageToFlatArray(message);
}

// FromWorker.ready, and other frames without content.
inline kj::Array<capnp::word> ready_frame() {
  capnp::MallocMessageBuilder message;
  message.initRoot<wire::FromWorker>().setReady();
  return capnp::messageToFlatArray(message);
}

// Reads a frame as supervision does, and hands its results to `scheduler` (for tests of the
// scheduler alone). What Cap'n Proto throws comes out.
inline absl::Status deliver_results(internal::Scheduler& scheduler, int slot,
                                    kj::ArrayPtr<const capnp::word> frame) {
  capnp::FlatArrayMessageReader message(frame);
  return scheduler.on_results(slot, message.getRoot<wire::FromWorker>().getResults());
}

// The scheduler's view of a FakeWorker. Revokes are answered at once (as through shared memory),
// or, with answer_revokes_later(), when the test calls answer_revokes() (as over TCP).
class FakeWorkerPort final : public internal::WorkerPort {
 public:
  FakeWorkerPort(FakeWorker& worker, internal::Scheduler& scheduler, int slot)
      : worker_(worker), scheduler_(scheduler), slot_(slot) {}

  const std::string& name() const override { return worker_.name(); }
  void send(std::unique_ptr<capnp::MessageBuilder> frame) override { worker_.receive(*frame); }
  void flush() override { ++flushes_; }
  WorkerProgress progress() const override { return worker_.progress(); }
  void open_claims(uint32_t slot, uint16_t tag, uint32_t count) override {
    worker_.open_claims(slot, tag, count);
  }
  void revoke(uint32_t slot, uint16_t tag) override {
    revokes_.emplace_back(slot, tag);
    if (!later_) answer_revokes();
  }
  void stop(absl::Status reason) override { stops_.push_back(std::move(reason)); }
  // Written to the worker's page, as a fork link does: the fake worker's stamps decide.
  void request_stop(uint64_t seq, uint32_t from, uint32_t to) override {
    internal::request_stop(worker_.page(), seq, from, to);
  }

  void answer_revokes_later() { later_ = true; }
  void answer_revokes() {
    while (!revokes_.empty()) {
      const auto [slot, tag] = revokes_.front();
      revokes_.pop_front();
      scheduler_.on_revoked(slot_, slot, tag, worker_.revoke(slot, tag));
    }
  }
  // Why the scheduler asked to stop the worker, each time it did.
  const std::vector<absl::Status>& stops() const { return stops_; }
  int flushes() const { return flushes_; }

 private:
  FakeWorker& worker_;
  internal::Scheduler& scheduler_;
  const int slot_;
  bool later_ = false;
  std::deque<std::pair<uint32_t, uint16_t>> revokes_;
  std::vector<absl::Status> stops_;
  int flushes_ = 0;
};

// Supervision's view of a FakeWorker: a link with no descriptor. Frames from the worker reach
// the pool when the test calls deliver() (the link's events are those the supervisor last passed
// to check() or service()); the worker ends when the test calls end().
class FakeWorkerLink final : public internal::WorkerLink {
 public:
  explicit FakeWorkerLink(std::string name) : worker_(name), name_(std::move(name)) {}

  FakeWorker& worker() { return worker_; }
  // Hands a frame from the worker to the pool (nothing once it ended). False if the link has no
  // events yet (the supervisor has not polled it).
  bool deliver(kj::ArrayPtr<const capnp::word> frame) {
    if (events_ == nullptr || ended_) return false;
    events_->on_frame(frame);
    return true;
  }
  // A frame found after the worker died (held frames, worker_link.h); comes before end().
  void recover(kj::ArrayPtr<const capnp::word> frame) {
    if (events_ != nullptr && !ended_) events_->on_recovered_frame(frame);
  }
  // The worker is gone, as `how` says ("was killed by signal 9 (SIGKILL)").
  void end(std::string how) {
    if (events_ == nullptr || ended_) return;
    ended_ = true;
    events_->on_ended(internal::WorkerEnd{std::move(how), false, std::nullopt});
  }
  bool ended() const { return ended_; }
  // The stops asked for, in order.
  const std::vector<internal::StopMode>& stops() const { return stops_; }

  const std::string& name() const override { return name_; }
  int pid() const override { return 0; }
  void send(std::unique_ptr<capnp::MessageBuilder> frame) override {
    if (!ended_) worker_.receive(*frame);
  }
  void flush() override {}
  bool has_unsent() const override { return false; }
  void add_pollfds(std::vector<pollfd>&, bool) override {}
  void service(const pollfd*, size_t, bool, internal::LinkEvents& events) override {
    events_ = &events;
  }
  int64_t check(int64_t, internal::LinkEvents& events) override {
    events_ = &events;
    return INT64_MAX;
  }
  int channel_fd() const override { return -1; }
  void pump(short, internal::LinkEvents& events) override { events_ = &events; }
  WorkerProgress progress() const override { return worker_.progress(); }
  size_t resident_bytes() const override { return 0; }
  void open_claims(uint32_t slot, uint16_t tag, uint32_t count) override {
    worker_.open_claims(slot, tag, count);
  }
  void revoke(uint32_t slot, uint16_t tag, internal::LinkEvents& events) override {
    events.on_revoked(slot, tag, worker_.revoke(slot, tag));
  }
  void stop(internal::StopMode mode) override { stops_.push_back(mode); }

 private:
  FakeWorker worker_;
  const std::string name_;
  internal::LinkEvents* events_ = nullptr;
  bool ended_ = false;
  std::vector<internal::StopMode> stops_;
};

// Makes FakeWorkerLinks; keeps a pointer to each (they live as long as the supervisor keeps them).
class FakeLauncher final : public internal::Launcher {
 public:
  absl::StatusOr<std::unique_ptr<internal::WorkerLink>> launch(int slot,
                                                               const std::string& name) override {
    auto link = std::make_unique<FakeWorkerLink>(absl::StrCat(name, " (fake ", ++made_, ")"));
    const size_t slots = std::max<size_t>(latest_.size(), static_cast<size_t>(slot) + 1);
    latest_.resize(slots, nullptr);
    launches_.resize(slots, 0);
    latest_[slot] = link.get();
    ++launches_[slot];
    return link;
  }
  // How many links it made for `slot`.
  int launches(int slot) const {
    return static_cast<size_t>(slot) < launches_.size() ? launches_[slot] : 0;
  }
  // The link made last for `slot` (null if none yet). Dangles once the supervisor dropped it:
  // use it only while it has not ended, or until the next after_events().
  FakeWorkerLink* latest(int slot) const {
    return static_cast<size_t>(slot) < latest_.size() ? latest_[slot] : nullptr;
  }
  int made() const { return made_; }

 private:
  std::vector<FakeWorkerLink*> latest_;
  std::vector<int> launches_;
  int made_ = 0;
};

}  // namespace procpool::testing

#endif  // PROCPOOL_TESTS_FAKE_WORKER_H_
