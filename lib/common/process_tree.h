// A worker's process tree, without cgroups: the worker leads its own process group and is a child
// subreaper (PR_SET_CHILD_SUBREAPER), so that whatever its tasks start stays below it even when
// an intermediate parent exits (a double fork): orphans are reparented to the worker, not to init.
// While the worker lives, every descendant can therefore be found through /proc (each process's
// parent) and killed, setsid daemons included; once it has died, only its process group can be.
//
// Where the worker also has a cgroup (cgroup.h), that is what stops its tree; this is the
// fallback and the worker's own clean-up when it leaves.

#ifndef PROCPOOL_LIB_COMMON_PROCESS_TREE_H_
#define PROCPOOL_LIB_COMMON_PROCESS_TREE_H_

#include <sys/types.h>

namespace procpool::internal {

// In a worker just forked: leads a process group of its own and becomes a child subreaper.
void become_tree_root();

// SIGKILLs every living descendant of `root` (not `root` itself), again and again until none is
// left alive (those that fork as they die are found on the next pass), for at most about 100 ms.
// Returns how many processes were signalled.
int kill_descendants(pid_t root);

// In a worker about to exit: kills every descendant it still has and reaps its children (its own
// and those reparented to it), so that nothing it started outlives it, not even as a zombie.
void end_own_tree();

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_COMMON_PROCESS_TREE_H_
