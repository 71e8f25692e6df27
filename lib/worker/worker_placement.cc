#include "lib/worker/worker_placement.h"

#include <algorithm>
#include <string>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "capnp/message.h"
#include "capnp/serialize.h"
#include "procpool/internal/worker_body.h"

namespace procpool::internal {

void placement_to_wire(const WorkerPlacement& placement, wire::Placement::Builder out) {
  out.setGeneration(placement.generation);
  out.setWorkers(static_cast<uint32_t>(std::max(placement.workers, 0)));
  out.setPoolName(placement.pool_name);
  auto env = out.initEnv(static_cast<uint32_t>(placement.env.size()));
  for (size_t i = 0; i < placement.env.size(); ++i) {
    env[i].setName(placement.env[i].first);
    env[i].setValue(placement.env[i].second);
  }
  out.setCpu(placement.cpu);
  out.setSpreadCpus(placement.spread_cpus);
}

size_t placement_wire_bytes(const WorkerPlacement& placement) {
  capnp::MallocMessageBuilder message;
  placement_to_wire(placement, message.initRoot<wire::Placement>());
  return capnp::computeSerializedSizeInWords(message) * sizeof(capnp::word);
}

namespace {

bool valid_env_name(absl::string_view name) {
  return !name.empty() && name.find('=') == absl::string_view::npos &&
         name.find('\0') == absl::string_view::npos;
}

}  // namespace

WorkerPlacement placement_from_wire(wire::Placement::Reader in) {
  WorkerPlacement placement;
  placement.generation = in.getGeneration();
  placement.workers = static_cast<int>(std::min<uint32_t>(in.getWorkers(), 1u << 20));
  placement.pool_name = std::string(in.getPoolName().cStr(), in.getPoolName().size());
  for (const wire::EnvVar::Reader var : in.getEnv()) {
    std::string name(var.getName().cStr(), var.getName().size());
    std::string value(var.getValue().cStr(), var.getValue().size());
    if (!valid_env_name(name) || value.find('\0') != std::string::npos) continue;
    placement.env.emplace_back(std::move(name), std::move(value));
  }
  placement.cpu = in.getCpu();
  placement.spread_cpus = in.getSpreadCpus();
  return placement;
}

absl::StatusOr<std::vector<std::pair<std::string, std::string>>> evaluate_worker_env(
    const std::function<std::vector<std::pair<std::string, std::string>>(int)>& worker_env,
    int slot) {
  if (!worker_env) return std::vector<std::pair<std::string, std::string>>();
  std::vector<std::pair<std::string, std::string>> env;
  try {
    env = worker_env(slot);
  } catch (...) {
    return absl::InvalidArgumentError(absl::StrCat("PoolOptions::worker_env threw for slot ", slot,
                                                   ": ", describe_current_exception()));
  }
  for (const auto& [name, value] : env) {
    if (!valid_env_name(name) || value.find('\0') != std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(
          "PoolOptions::worker_env for slot ", slot, ": \"", absl::CHexEscape(name),
          "\" is not a variable one can set (empty, or holds '=' or a NUL, or its value a NUL)"));
    }
  }
  return env;
}

}  // namespace procpool::internal
