// Statuses and exceptions crossing the process boundary (declared in internal/worker_body.h).

#include <cxxabi.h>

#include <cstdlib>
#include <exception>
#include <memory>
#include <string>
#include <typeinfo>

#include "absl/strings/str_cat.h"
#include "kj/exception.h"
#include "procpool/internal/worker_body.h"

namespace procpool::internal {
namespace {

std::string demangle(const char* mangled) {
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> name(abi::__cxa_demangle(mangled, nullptr, nullptr, &status),
                                              std::free);
  return status == 0 && name ? std::string(name.get()) : std::string(mangled);
}

}  // namespace

void status_to_wire(const absl::Status& status, wire::Error::Builder out) {
  out.setCode(static_cast<uint32_t>(status.code()));
  out.setMessage(std::string(status.message()));
}

absl::Status status_from_wire(wire::Error::Reader error) {
  uint32_t code = error.getCode();
  if (code == 0) return absl::OkStatus();
  if (code > static_cast<uint32_t>(absl::StatusCode::kUnauthenticated)) {
    code = static_cast<uint32_t>(absl::StatusCode::kUnknown);
  }
  return absl::Status(static_cast<absl::StatusCode>(code), std::string(error.getMessage()));
}

void set_error(wire::Outcome::Builder out, const absl::Status& status) {
  status_to_wire(status, out.initError());
}

std::string describe_worker_type(const std::type_info& worker, const std::type_info& job,
                                 const std::type_info& result) {
  return absl::StrCat(demangle(worker.name()), " (", demangle(job.name()), " -> ",
                      demangle(result.name()), ")");
}

std::string describe_current_exception() {
  std::exception_ptr current = std::current_exception();
  if (!current) return "no exception";
  try {
    std::rethrow_exception(current);
  } catch (const kj::Exception& e) {
    return absl::StrCat("kj::Exception: ", e.getDescription().cStr());
  } catch (const std::exception& e) {
    return absl::StrCat(demangle(typeid(e).name()), ": ", e.what());
  } catch (...) {
    std::type_info* type = abi::__cxa_current_exception_type();
    return absl::StrCat(type ? demangle(type->name()) : std::string("unknown type"),
                        " (not derived from std::exception)");
  }
}

}  // namespace procpool::internal
