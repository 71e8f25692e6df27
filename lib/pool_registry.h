// The registry of live pools that signal handling (signals.h) acts on. A PoolCore registers in
// its constructor and unregisters first thing in its destructor; the signal thread holds the
// registry's lock while it acts on a pool, so it never touches one being destroyed.

#ifndef PROCPOOL_LIB_POOL_REGISTRY_H_
#define PROCPOOL_LIB_POOL_REGISTRY_H_

#include "procpool/internal/pool_core.h"

namespace procpool::internal {

void register_pool(PoolCore* pool);
void unregister_pool(PoolCore* pool);

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_POOL_REGISTRY_H_
