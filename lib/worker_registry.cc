#include "procpool/internal/worker_registry.h"

#include <map>
#include <mutex>
#include <string>

namespace procpool::internal {
namespace {

std::mutex& registry_mutex() {
  static std::mutex mu;
  return mu;
}

// Never destroyed: registrations happen in static initializers, lookups until exit.
std::map<std::string, WorkerBodyFactory>& registry() {
  static auto* types = new std::map<std::string, WorkerBodyFactory>();
  return *types;
}

}  // namespace

void register_worker_type(const std::string& worker_type, WorkerBodyFactory factory) {
  std::lock_guard lock(registry_mutex());
  registry().emplace(worker_type, std::move(factory));
}

const WorkerBodyFactory* find_worker_type(const std::string& worker_type) {
  std::lock_guard lock(registry_mutex());
  auto it = registry().find(worker_type);
  return it == registry().end() ? nullptr : &it->second;
}

}  // namespace procpool::internal
